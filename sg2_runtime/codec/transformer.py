"""Causal transformer with RoPE, LayerNorm, layer scale and a finite attention context.

Numerics follow the moshi-style transformer the codec was trained with: pre-norm layers,
`x + ls1 * out_proj(attn(norm1(x)))`, `x + ls2 * linear2(gelu(linear1(norm2(x))))`, fused
bias-free QKV projection, RoPE on interleaved (even, odd) pairs with angles `t * freq` computed in
float32, and a query at position p attending to the keys at positions p - context < j <= p.

Streaming keeps, per slot and layer, a ring buffer of `context + MAX_STEPS_PER_PASS - 1` keys and
values. A call is processed in passes of at most MAX_STEPS_PER_PASS steps: the pass's keys are
written first, then every query sees its full window (the ring is large enough that nothing a
query needs has been overwritten) — so streaming with any chunk size equals whole-utterance
attention, unlike a ring of exactly `context` entries. Each slot has its own position counter,
hence its own RoPE phases and its own mask.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import TransformerConfig
from .kernels import Linear
from .layers import Norm, ReleasedLayer, WNLinear
from .state import StateSpec, StepContext

MAX_STEPS_PER_PASS = 16
ROPE_TABLE_LENGTH = 1 << 15  # positions with precomputed cos/sin; later ones are computed per call
_OFFLINE_QUERY_BLOCK = 512


def rope_frequencies(head_dim: int, max_period: float) -> Tensor:
    return torch.exp(
        torch.arange(head_dim // 2, dtype=torch.float32) * (-math.log(max_period) * 2 / head_dim)
    )


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate interleaved pairs of x (B, T, H, D) by angles with cos/sin (B or 1, T, 1, D/2)."""
    dtype = x.dtype
    pairs = x.float().unflatten(-1, (-1, 2))
    xr, xi = pairs[..., 0], pairs[..., 1]
    out = torch.stack([xr * cos - xi * sin, xr * sin + xi * cos], dim=-1)
    return out.flatten(-2).to(dtype)


def attention(q: Tensor, k: Tensor, v: Tensor, allowed: Tensor) -> Tensor:
    """softmax(q k^T / sqrt(d) masked) v for (B, H, Tq, D) x (B, H, Tk, D); mask (B|1, 1, Tq, Tk).

    On CPU this is written out (batched matmuls of fixed per-item shape, row-wise softmax) so a
    slot's result does not depend on the batch; on CUDA the fused SDPA kernel is used.
    """
    if q.device.type == "cuda":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
    # Contiguous operands: the batched-matmul kernel (and so the rounding) must not depend on
    # how the caller's views happen to be strided, which can vary with the batch size.
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    # k @ q^T (then transposed) rather than q @ k^T: one long operand per item is ~2x faster on
    # CPU when, as in streaming, a few queries meet a whole KV window.
    scores = torch.matmul(k, q.transpose(-1, -2)).transpose(-1, -2).contiguous()
    scores = (scores * (1.0 / math.sqrt(q.shape[-1]))).float().masked_fill_(~allowed, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1).to(v.dtype), v)


class TransformerLayer(ReleasedLayer):
    def __init__(self, ref: str, cfg: TransformerConfig):
        super().__init__()
        d = cfg.d_model
        self.ref = ref
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.norm1 = Norm(ref + ".norm1", d, 1e-5)
        self.norm2 = Norm(ref + ".norm2", d, 1e-5)
        self.in_proj = Linear(d, 3 * d, bias=False)
        self.out_proj = WNLinear(ref + ".self_attn.out_proj", d, d, bias=False)
        self.linear1 = WNLinear(ref + ".linear1", d, cfg.dim_feedforward, bias=False)
        self.linear2 = WNLinear(ref + ".linear2", cfg.dim_feedforward, d, bias=False)
        self.has_layer_scale = cfg.layer_scale is not None
        self.register_buffer("ls1", torch.ones(d))
        self.register_buffer("ls2", torch.ones(d))

    def released_shapes(self) -> dict[str, tuple[int, ...]]:
        d = self.in_proj.in_features
        shapes = {self.ref + ".self_attn.in_proj_weight": (3 * d, d)}
        if self.has_layer_scale:
            shapes[self.ref + ".layer_scale_1.scale"] = (d,)
            shapes[self.ref + ".layer_scale_2.scale"] = (d,)
        return shapes

    def load_released(self, sd: Mapping[str, Tensor]) -> None:
        self.in_proj.weight.copy_(sd[self.ref + ".self_attn.in_proj_weight"])
        if self.has_layer_scale:
            self.ls1.copy_(sd[self.ref + ".layer_scale_1.scale"])
            self.ls2.copy_(sd[self.ref + ".layer_scale_2.scale"])

    def export_released(self) -> dict[str, Tensor]:
        out = {self.ref + ".self_attn.in_proj_weight": self.in_proj.weight.float().clone()}
        if self.has_layer_scale:
            out[self.ref + ".layer_scale_1.scale"] = self.ls1.float().clone()
            out[self.ref + ".layer_scale_2.scale"] = self.ls2.float().clone()
        return out

    def qkv(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Projected q, k, v as (B, T, H, D), q and k rotated."""
        b, t, _ = x.shape
        q, k, v = self.in_proj(self.norm1(x)).view(b, t, 3, self.num_heads, self.head_dim).unbind(2)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def finish(self, x: Tensor, attn: Tensor) -> Tensor:
        """Residual adds after attention output `attn` (B, H, T, D), then the feed-forward."""
        b, _, t, _ = attn.shape
        x = x + self.ls1 * self.out_proj(attn.transpose(1, 2).reshape(b, t, -1))
        return x + self.ls2 * self.linear2(F.gelu(self.linear1(self.norm2(x))))


class Transformer(ReleasedLayer):
    """A ProjectedTransformer of the reference: `{ref}.transformer.layers.N` (+ optional projections)."""

    KEEP_FLOAT32 = ("freqs", "rope_cos", "rope_sin")

    def __init__(self, ref: str, cfg: TransformerConfig, steps_per_frame: int):
        super().__init__()
        self.input_proj = (
            WNLinear(ref + ".input_proj", cfg.input_dimension, cfg.d_model, bias=False)
            if cfg.input_dimension != cfg.d_model
            else None
        )
        out_dim = cfg.output_dimensions[0]
        self.output_proj = (
            WNLinear(ref + ".output_projs.0", cfg.d_model, out_dim, bias=False)
            if out_dim != cfg.d_model
            else None
        )
        self.ref = ref
        self.cfg = cfg
        self.context = int(cfg.context)
        self.capacity = self.context + MAX_STEPS_PER_PASS - 1
        self.steps_per_frame = steps_per_frame
        self.layers = nn.ModuleList(
            TransformerLayer(f"{ref}.transformer.layers.{i}", cfg) for i in range(cfg.num_layers)
        )
        freqs = rope_frequencies(cfg.head_dim, cfg.max_period)
        angles = torch.arange(ROPE_TABLE_LENGTH, dtype=torch.float32)[:, None] * freqs
        self.register_buffer("ring_index", torch.arange(self.capacity), persistent=False)
        self.register_buffer("freqs", freqs, persistent=False)
        self.register_buffer("rope_cos", torch.cos(angles), persistent=False)
        self.register_buffer("rope_sin", torch.sin(angles), persistent=False)

    def _rope(self, positions: Tensor, max_position: int) -> tuple[Tensor, Tensor]:
        """cos/sin for integer positions (B|1, T) -> (B|1, T, 1, D/2), float32."""
        if max_position < ROPE_TABLE_LENGTH:
            cos, sin = self.rope_cos[positions], self.rope_sin[positions]
        else:  # beyond the table: same float32 product, computed on the fly
            angles = positions.to(torch.float32).unsqueeze(-1) * self.freqs
            cos, sin = torch.cos(angles), torch.sin(angles)
        return cos.unsqueeze(-2), sin.unsqueeze(-2)

    # ---- whole utterance ----
    def forward(self, x: Tensor) -> Tensor:
        if self.input_proj is not None:
            x = self.input_proj(x)
        t = x.shape[1]
        positions = torch.arange(t, device=x.device).unsqueeze(0)
        cos, sin = self._rope(positions, t - 1)
        for layer in self.layers:
            q, k, v = (y.transpose(1, 2) for y in layer.qkv(x, cos, sin))
            x = layer.finish(x, self._offline_attention(q, k, v))
        return self.output_proj(x) if self.output_proj is not None else x

    def _offline_attention(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        t = q.shape[2]
        outs = []
        for qs in range(0, t, _OFFLINE_QUERY_BLOCK):
            qe = min(t, qs + _OFFLINE_QUERY_BLOCK)
            ks = max(0, qs - self.context + 1)
            delta = (
                torch.arange(qs, qe, device=q.device)[:, None]
                - torch.arange(ks, qe, device=q.device)[None, :]
            )
            allowed = ((delta >= 0) & (delta < self.context)).view(1, 1, qe - qs, qe - ks)
            outs.append(attention(q[:, :, qs:qe], k[:, :, ks:qe], v[:, :, ks:qe], allowed))
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)

    # ---- streaming ----
    def state_specs(self) -> dict[str, StateSpec]:
        shape = (self.cfg.num_heads, self.capacity, self.cfg.head_dim)
        specs = {}
        for i in range(len(self.layers)):
            specs[f"{self.ref}.k{i}"] = StateSpec(shape)
            specs[f"{self.ref}.v{i}"] = StateSpec(shape)
        return specs

    def step(self, x: Tensor, ctx: StepContext) -> Tensor:
        if self.input_proj is not None:
            x = self.input_proj(x)
        t = x.shape[1]
        outs = []
        for ps in range(0, t, MAX_STEPS_PER_PASS):
            pe = min(t, ps + MAX_STEPS_PER_PASS)
            outs.append(self._pass(x[:, ps:pe], ctx, ps))
        x = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
        return self.output_proj(x) if self.output_proj is not None else x

    def _pass(self, x: Tensor, ctx: StepContext, pass_start: int) -> Tensor:
        t = x.shape[1]
        device = x.device
        start = ctx.frames_before_t * self.steps_per_frame + pass_start  # (n,) first position
        steps = torch.arange(t, device=device)
        positions = start[:, None] + steps  # (n, t)
        max_position = int(ctx.frames_before.max()) * self.steps_per_frame + pass_start + t - 1
        cos, sin = self._rope(positions, max_position)
        cap = self.capacity
        ring = positions % cap  # where each new key goes
        # Position held by each ring entry once this pass's keys are written (-1: never written).
        end = (start + t)[:, None]
        slot_pos = end - 1 - torch.remainder(end - 1 - self.ring_index, cap)
        delta = positions[:, :, None] - slot_pos[:, None, :]
        allowed = ((slot_pos >= 0)[:, None, :] & (delta >= 0) & (delta < self.context)).unsqueeze(1)
        rows = ctx.rows[:, None]
        for i, layer in enumerate(self.layers):
            q, k, v = layer.qkv(x, cos, sin)
            kname, vname = f"{self.ref}.k{i}", f"{self.ref}.v{i}"
            kc, vc = ctx.tensor(kname), ctx.tensor(vname)
            kc[rows, :, ring] = k.to(kc.dtype)
            vc[rows, :, ring] = v.to(vc.dtype)
            attn = attention(q.transpose(1, 2), ctx.read(kname), ctx.read(vname), allowed)
            x = layer.finish(x, attn)
        return x
