"""Number-for-number parity with the reference codec (tiny random weights, golden tensors).

The tiny reference checkpoint is loaded through the public loader; every tensor in
`codec_tiny_golden.safetensors` is checked: tokens exactly, audio and intermediate activations
within 1e-4 absolute.
"""

from __future__ import annotations

import pytest
import torch

from tests.codec_support import FRAME, golden, golden_codec

TOL = 1e-4
ENCODER_KEYS = ["mel", "encoder_convnext", "encoder_transformer", "down_sample_1", "z"]
DECODER_KEYS = [
    "zq",
    "post_projector",
    "vq_transformer",
    "post_projector_of_vq_transformer",
    "up_sample_1",
    "up_sample_2",
    "decoder_transformer",
    "decoder_convnext",
]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors gain nothing from a 2nd thread; on a shared machine its barriers only stall."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def ref(reference_dir):
    return golden(reference_dir)


@pytest.fixture(scope="module")
def codec(reference_dir):
    return golden_codec(reference_dir)


def _close(actual: torch.Tensor, expected: torch.Tensor, name: str) -> None:
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = (actual.float() - expected.float()).abs().max().item()
    assert err <= TOL, f"{name}: max abs error {err:.3g} > {TOL}"


def _checked_keys() -> set[str]:
    keys = {f"wav{i}" for i in (0, 1)}
    keys |= {f"offline_tokens{i}" for i in (0, 1)} | {f"offline_audio{i}" for i in (0, 1)}
    keys |= {f"enc0_{k}" for k in ENCODER_KEYS if k != "z"} | {"enc0_z"}
    keys |= {f"dec0_{k}" for k in DECODER_KEYS}
    keys |= {"stream_batch_input", "stream_tokens", "stream_audio"}
    keys |= {"stream_decode_of_offline_tokens0", "stream_tokens_chunk2880_wav0"}
    return keys


def test_every_golden_key_is_covered(ref):
    assert _checked_keys() == set(ref.keys())


def test_codec_facts(codec):
    assert (codec.sample_rate, codec.frame_samples, codec.n_q, codec.codebook_size) == (24000, 960, 3, 1024)
    assert codec.device == torch.device("cpu") and codec.dtype == torch.float32


@pytest.mark.parametrize("i", [0, 1])
def test_offline_encode_decode(codec, ref, i):
    wav = ref[f"wav{i}"].view(1, 1, -1)
    tokens = codec.encode(wav)
    assert tokens.dtype == torch.long
    assert torch.equal(tokens, ref[f"offline_tokens{i}"])
    audio = codec.decode(ref[f"offline_tokens{i}"])
    assert audio.dtype == torch.float32
    _close(audio, ref[f"offline_audio{i}"], f"offline_audio{i}")


def test_encoder_intermediates(codec, ref):
    tokens, inter = codec.encode(ref["wav0"].view(1, 1, -1), return_intermediates=True)
    assert set(inter) == set(ENCODER_KEYS)
    for key in ENCODER_KEYS:
        _close(inter[key], ref[f"enc0_{key}"], f"enc0_{key}")
    assert torch.equal(tokens, ref["offline_tokens0"])


def test_decoder_intermediates(codec, ref):
    audio, inter = codec.decode(ref["offline_tokens0"], return_intermediates=True)
    assert set(inter) == set(DECODER_KEYS)
    for key in DECODER_KEYS:
        _close(inter[key], ref[f"dec0_{key}"], f"dec0_{key}")
    _close(audio, ref["offline_audio0"], "offline_audio0")


def test_batched_streaming_matches_reference(codec, ref):
    """Batch 2, 960 samples per call, each frame's tokens decoded right away."""
    x = ref["stream_batch_input"]
    enc, dec = codec.streaming_encoder(num_slots=2), codec.streaming_decoder(num_slots=2)
    tokens, audio = [], []
    for start in range(0, x.shape[-1], FRAME):
        tok = enc.step(x[:, :, start : start + FRAME])
        assert tok.shape == (3, 2, 1)
        tokens.append(tok)
        audio.append(dec.step(tok))
    assert torch.equal(torch.cat(tokens, -1), ref["stream_tokens"])
    _close(torch.cat(audio, -1), ref["stream_audio"], "stream_audio")


def test_streaming_decode_of_offline_tokens(codec, ref):
    tokens = ref["offline_tokens0"]
    dec = codec.streaming_decoder(num_slots=1)
    audio = torch.cat([dec.step(tokens[:, :, t : t + 1]) for t in range(tokens.shape[-1])], -1)
    _close(audio, ref["stream_decode_of_offline_tokens0"], "stream_decode_of_offline_tokens0")


def test_streaming_encode_in_2880_sample_calls(codec, ref):
    wav = ref["wav0"].view(1, 1, -1)
    enc = codec.streaming_encoder(num_slots=1)
    tokens = torch.cat([enc.step(wav[:, :, s : s + 2880]) for s in range(0, wav.shape[-1], 2880)], -1)
    assert torch.equal(tokens, ref["stream_tokens_chunk2880_wav0"])
