"""Batch-size independence of the compute kernels, at the real model's shapes and 2 threads.

Slot independence (tests/test_codec_streaming.py) is proven end to end on the tiny config; these
checks make sure the same property holds for the full-size layer shapes, where the math
libraries may pick other code paths. Each kernel's output for one row/sample must be identical
(torch.equal) whether it is computed alone or among others.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sg2_runtime.codec.kernels import Linear, depthwise_taps, im2col
from sg2_runtime.codec.layers import CausalConv
from sg2_runtime.codec.transformer import ROPE_TABLE_LENGTH, Transformer, attention
from tests.codec_support import tiny_config


@pytest.fixture(autouse=True)
def _two_threads():
    """Production CPU setting on this machine; thread count is part of what must not matter."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize(
    ("k", "n"),
    [
        (512, 1536),
        (512, 512),
        (512, 2048),
        (2048, 512),
        (1024, 3072),
        (1024, 1024),
        (1024, 4096),
        (4096, 1024),
        (384, 1536),
        (1536, 384),
        (7 * 128, 128),
        (7 * 512, 512),
        (4 * 512, 512),
        (513, 128),
        (512, 1024),
        (512, 2 * 2 * 512),
        (512, 10 * 256),
        (768, 256),
        (7 * 32, 1),
    ],
)
def test_linear_rows_do_not_depend_on_row_count(k, n):
    lin = Linear(k, n, bias=True)
    lin.weight.copy_(torch.randn(n, k, generator=_gen(k + n)) / k**0.5)
    lin.bias.copy_(torch.randn(n, generator=_gen(1)))
    lin.prepare()
    x = torch.randn(80, k, generator=_gen(2))
    full = lin(x)
    for rows in (1, 2, 3, 4, 5, 7, 11, 16, 17, 64):
        assert torch.equal(lin(x[:rows]), full[:rows]), f"{rows} rows"
    assert (full - F.linear(x, lin.weight, lin.bias)).abs().max() < 1e-3


@pytest.mark.parametrize(
    ("channels", "dilation", "steps"), [(768, 1, 20), (768, 5, 20), (384, 3, 80), (96, 5, 960)]
)
def test_grouped_conv_samples_do_not_depend_on_batch(channels, dilation, steps):
    """The HiFi-GAN grouped convs (pre-packed kernel for short calls, conv1d for long ones)."""
    conv = CausalConv("c", channels, channels, 11, dilation=dilation, groups=3)
    conv.weight.copy_(torch.randn(channels, channels // 3, 11, generator=_gen(channels)) * 0.05)
    conv.bias.copy_(torch.randn(channels, generator=_gen(3)))
    conv.prepare()
    for length in (steps, 4 * steps):
        x = torch.randn(6, channels, length + 10 * dilation, generator=_gen(4))
        full = conv._apply(x)
        ref = F.conv1d(x, conv.weight, conv.bias, dilation=dilation, groups=3)
        assert (full - ref).abs().max() < 1e-3
        for batch in (1, 2, 5):
            assert torch.equal(conv._apply(x[:batch]), full[:batch]), f"batch {batch}, {length} steps"


def test_im2col_and_depthwise_match_torch_convs():
    x = torch.randn(3, 40, 24, generator=_gen(5))
    w = torch.randn(16, 24, 7, generator=_gen(6))
    cols = im2col(x, 7, 2, 1, 1)[0]  # (3 * 28, 7 * 24), tap-major
    y = (cols @ w.permute(0, 2, 1).reshape(16, -1).t()).view(3, -1, 16)
    ref = F.conv1d(x.transpose(1, 2), w, dilation=2).transpose(1, 2)
    assert (y - ref).abs().max() < 1e-4
    taps = torch.randn(7, 24, generator=_gen(7))
    bias = torch.randn(24, generator=_gen(8))
    ref = F.conv1d(x.transpose(1, 2), taps.t().unsqueeze(1), bias, groups=24).transpose(1, 2)
    assert (depthwise_taps(x, taps, bias) - ref).abs().max() < 1e-5


@pytest.mark.parametrize(
    ("heads", "steps", "keys", "dim"), [(8, 4, 515, 64), (8, 1, 140, 128), (8, 16, 515, 64)]
)
def test_attention_rows_do_not_depend_on_batch(heads, steps, keys, dim):
    # q as the model makes it: a (B, T, H, D) projection viewed as (B, H, T, D).
    q = torch.randn(5, steps, heads, dim, generator=_gen(9)).transpose(1, 2)
    k = torch.randn(5, heads, keys, dim, generator=_gen(10))
    v = torch.randn(5, heads, keys, dim, generator=_gen(11))
    allowed = torch.rand(5, 1, steps, keys, generator=_gen(12)) > 0.3
    allowed[..., 0] = True
    full = attention(q, k, v, allowed)
    for batch in (1, 2, 3):
        assert torch.equal(attention(q[:batch], k[:batch], v[:batch], allowed[:batch]), full[:batch])
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
    assert (full - ref).abs().max() < 1e-5


def test_rope_beyond_the_table_is_computed_identically(reference_dir):
    """Positions past the precomputed table use the same float32 formula, bit for bit."""
    transformer = Transformer("t", tiny_config(reference_dir).encoder_transformer_kwargs, 4)
    positions = torch.arange(ROPE_TABLE_LENGTH - 40, ROPE_TABLE_LENGTH).view(1, -1)
    cos_table, sin_table = transformer._rope(positions, ROPE_TABLE_LENGTH - 1)
    cos_live, sin_live = transformer._rope(positions, ROPE_TABLE_LENGTH)
    assert torch.equal(cos_table, cos_live) and torch.equal(sin_table, sin_live)
    far_cos, _ = transformer._rope(torch.tensor([[ROPE_TABLE_LENGTH + 1000]]), ROPE_TABLE_LENGTH + 1000)
    assert torch.isfinite(far_cos).all()
