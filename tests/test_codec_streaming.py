"""Streaming == whole utterance on real speech, and batched slots that never influence each other.

Uses tiny codecs with weights from our own random builder (so the checks do not depend on the
one reference checkpoint), real speech from `sg2_reference/audio/`.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from sg2_runtime.codec import build_random_codec
from tests.codec_support import FRAME, random_codec, speech, stream_decode, stream_encode, tiny_config


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors gain nothing from a 2nd thread; on a shared machine its barriers only stall."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def codec(reference_dir):
    return random_codec(reference_dir)


@pytest.fixture(scope="module")
def short_context_codec(reference_dir):
    """Attention windows of 3 frames (12 steps at 100 Hz) and 5 frames (25 Hz): the ring
    buffers wrap many times within a few seconds."""
    cfg = tiny_config(reference_dir)
    cfg = dataclasses.replace(
        cfg,
        encoder_transformer_kwargs=dataclasses.replace(cfg.encoder_transformer_kwargs, context=12),
        vq_transformer_kwargs=dataclasses.replace(cfg.vq_transformer_kwargs, context=5),
        decoder_transformer_kwargs=dataclasses.replace(cfg.decoder_transformer_kwargs, context=12),
    )
    return build_random_codec(cfg, seed=99)


@pytest.mark.parametrize("name", ["demo_zh.wav", "demo_en.wav"])
def test_streaming_encode_equals_whole_utterance_on_speech(codec, reference_dir, name):
    audio = speech(reference_dir, name)
    whole = codec.encode(audio)
    assert whole.shape == (3, 1, audio.shape[-1] // FRAME)
    assert len(whole[0].unique()) > 30, "random codec tokens collapsed; the comparison would be vacuous"
    assert torch.equal(stream_encode(codec, audio, FRAME), whole)
    assert torch.equal(stream_encode(codec, audio, 3 * FRAME), whole)


@pytest.mark.parametrize("name", ["demo_zh.wav", "demo_en.wav"])
def test_streaming_decode_matches_whole_utterance_on_speech(codec, reference_dir, name):
    # 160 frames (6.4 s) is past both attention windows (5 s), so the ring buffers wrap.
    tokens = codec.encode(speech(reference_dir, name))[..., :160]
    whole = codec.decode(tokens)
    assert whole.shape == (1, 1, tokens.shape[-1] * FRAME)
    assert whole.abs().max() > 0.05  # a real signal, not silence
    for frames_per_call in (1, 3):
        streamed = stream_decode(codec, tokens, frames_per_call)
        err = (streamed - whole).abs().max().item()
        assert err <= 1e-5, f"{frames_per_call} frames/call: max error {err:.3g}"


def test_ring_buffers_wrap_and_long_calls(short_context_codec, reference_dir):
    """Windows far shorter than the stream, and calls longer than one attention pass (16 steps)."""
    codec = short_context_codec
    audio = speech(reference_dir, "demo_en.wav")[:, :, : 48 * FRAME]
    whole = codec.encode(audio)
    for chunk in (FRAME, 3 * FRAME, 8 * FRAME, 24 * FRAME):
        assert torch.equal(stream_encode(codec, audio, chunk), whole), f"chunk {chunk}"
    decoded = codec.decode(whole)
    for frames_per_call in (1, 5, 17):
        err = (stream_decode(codec, whole, frames_per_call) - decoded).abs().max().item()
        assert err <= 1e-5, f"{frames_per_call} frames/call: max error {err:.3g}"


def _alone(codec, audio: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A stream run by itself at batch 1: per-frame tokens, each decoded right away."""
    enc, dec = codec.streaming_encoder(1), codec.streaming_decoder(1)
    tokens, pcm = [], []
    for s in range(0, audio.shape[-1], FRAME):
        tok = enc.step(audio[:, :, s : s + FRAME])
        tokens.append(tok)
        pcm.append(dec.step(tok))
    return torch.cat(tokens, -1), torch.cat(pcm, -1)


def test_slots_are_independent_bit_for_bit(codec, reference_dir):
    """4 slots; one starts late, one idles, one is reset onto a new call, subsets vary per step.

    Every stream's tokens and audio must be identical (torch.equal) to that stream run alone.
    """
    en = speech(reference_dir, "demo_en.wav")
    zh = speech(reference_dir, "demo_zh.wav")
    n = 14
    streams = {
        "a": en[:, :, : n * FRAME],
        "b": zh[:, :, : n * FRAME],
        "c": en[:, :, 40 * FRAME : (40 + n) * FRAME],
        "d": zh[:, :, 30 * FRAME : (30 + n) * FRAME],
        "e": (torch.randn(1, 1, n * FRAME, generator=torch.Generator().manual_seed(5)) * 0.05),
    }
    alone = {k: _alone(codec, v) for k, v in streams.items()}

    # slot -> list of (global step, stream name) "start" events; a slot with no frame due idles.
    plan = {0: {0: "a"}, 1: {5: "b"}, 2: {0: "c"}, 3: {0: "d", 9: "e"}}
    idle = {2: range(6, 10)}  # slot 2 sits out steps 6..9, then continues its stream
    enc, dec = codec.streaming_encoder(4), codec.streaming_decoder(4)
    current: dict[int, str] = {}
    pos: dict[int, int] = {}
    got_tokens: dict[str, list[torch.Tensor]] = {k: [] for k in streams}
    got_pcm: dict[str, list[torch.Tensor]] = {k: [] for k in streams}
    subsets_seen = set()
    for step in range(n + 9):
        for slot, events in plan.items():
            if step in events:
                current[slot], pos[slot] = events[step], 0
                enc.reset([slot])
                dec.reset([slot])
        active = [s for s in sorted(current) if pos[s] < n and step not in idle.get(s, ())]
        if not active:
            continue
        subsets_seen.add(tuple(active))
        audio = torch.cat([streams[current[s]][:, :, pos[s] * FRAME : (pos[s] + 1) * FRAME] for s in active])
        slots = None if active == [0, 1, 2, 3] else active
        tok = enc.step(audio, slots=slots)
        pcm = dec.step(tok, slots=slots)
        for i, s in enumerate(active):
            got_tokens[current[s]].append(tok[:, i : i + 1])
            got_pcm[current[s]].append(pcm[i : i + 1])
            pos[s] += 1
    assert {(0, 2, 3), (0, 1, 2, 3), (0, 1, 3), (1, 2, 3), (1, 3), (3,)} <= subsets_seen
    expected_frames = {"a": n, "b": n, "c": n, "d": 9, "e": n}  # "d" is cut off by the reset at step 9
    for name, frames in expected_frames.items():
        assert len(got_tokens[name]) == frames, name
        assert torch.equal(torch.cat(got_tokens[name], -1), alone[name][0][..., :frames]), f"tokens of {name}"
        assert torch.equal(torch.cat(got_pcm[name], -1), alone[name][1][..., : frames * FRAME]), (
            f"audio of {name}"
        )


def test_idle_slot_state_is_untouched(codec, reference_dir):
    audio = speech(reference_dir, "demo_zh.wav")[:, :, : 4 * FRAME].expand(3, 1, -1).contiguous()
    enc = codec.streaming_encoder(3)
    enc.step(audio[:, :, :FRAME])
    before = {k: v[1].clone() for k, v in enc.state.tensors.items()}
    enc.step(audio[[0, 2], :, FRAME : 2 * FRAME], slots=[0, 2])
    assert all(torch.equal(enc.state.tensors[k][1], v) for k, v in before.items())
    assert enc.frames_done.tolist() == [2, 1, 2]
    enc.reset([0])
    assert enc.frames_done.tolist() == [0, 1, 2]
    assert all(not v[0].any() for v in enc.state.tensors.values())


def test_streaming_input_validation(codec):
    enc, dec = codec.streaming_encoder(2), codec.streaming_decoder(2)
    with pytest.raises(ValueError, match="multiple of 960"):
        enc.step(torch.zeros(2, 1, 1000))
    with pytest.raises(ValueError, match="n_slots=2"):
        enc.step(torch.zeros(3, 1, FRAME))
    with pytest.raises(ValueError, match="n_slots=1"):
        enc.step(torch.zeros(2, 1, FRAME), slots=[1])
    with pytest.raises(ValueError, match="out of range"):
        enc.step(torch.zeros(1, 1, FRAME), slots=[2])
    with pytest.raises(ValueError, match="duplicate"):
        enc.step(torch.zeros(2, 1, FRAME), slots=[1, 1])
    with pytest.raises(ValueError, match=r"\[0, 1023\]"):
        dec.step(torch.full((3, 2, 1), 1024))
    with pytest.raises(ValueError, match="integer"):
        dec.step(torch.zeros(3, 2, 1))
    with pytest.raises(ValueError, match="slots"):
        dec.step(torch.zeros(3, 1, 1, dtype=torch.long))
    assert enc.step(torch.zeros(2, 1, 0)).shape == (3, 2, 0)
    assert dec.step(torch.zeros(3, 2, 0, dtype=torch.long)).shape == (2, 1, 0)
    assert enc.frames_done.tolist() == [0, 0] and dec.frames_done.tolist() == [0, 0]
    with pytest.raises(ValueError, match="num_slots"):
        codec.streaming_encoder(0)


def test_whole_utterance_partial_frames(codec, reference_dir):
    """A trailing partial frame adds one token frame (>= one 240-sample hop), never changes others."""
    audio = speech(reference_dir, "demo_zh.wav")[:, :, : 6 * FRAME]
    full = codec.encode(audio[:, :, : 5 * FRAME])
    for extra, frames in ((0, 5), (100, 5), (240, 6), (500, 6), (959, 6)):
        tokens = codec.encode(audio[:, :, : 5 * FRAME + extra])
        assert tokens.shape == (3, 1, frames) and codec.num_frames(5 * FRAME + extra) == frames
        assert torch.equal(tokens[:, :, :5], full)
    assert codec.encode(torch.zeros(2, 1, 200)).shape == (3, 2, 0)
    assert codec.decode(torch.zeros(3, 2, 0, dtype=torch.long)).shape == (2, 1, 0)
    with pytest.raises(ValueError, match=r"\(batch, 1, samples\)"):
        codec.encode(torch.zeros(1, 960))


def test_bfloat16_codec_runs_with_float32_islands(reference_dir):
    """Half-precision weights/activations; mel, codebooks and the output stay float32."""
    from sg2_runtime.codec import load_codec

    fp32 = load_codec(reference_dir / "codec_tiny_ckpt.pkl", reference_dir / "codec_tiny_config.yaml")
    bf16 = load_codec(
        reference_dir / "codec_tiny_ckpt.pkl", reference_dir / "codec_tiny_config.yaml", dtype=torch.bfloat16
    )
    model = bf16.model
    assert model.encoder_transformer.layers[0].in_proj.weight.dtype == torch.bfloat16
    assert model.quantizer.codebooks[0].weight.dtype == torch.float32
    assert model.mel.proj.weight.dtype == torch.float32
    assert model.decoder_hifigan.output_conv.lins[0].weight.dtype == torch.float32
    audio = speech(reference_dir, "demo_en.wav")[:, :, : 25 * FRAME]
    tokens = fp32.encode(audio)
    agree = (bf16.encode(audio) == tokens).float().mean().item()
    assert agree > 0.5
    ref, out = fp32.decode(tokens), bf16.decode(tokens)
    assert out.dtype == torch.float32
    corr = torch.corrcoef(torch.stack([ref.flatten(), out.flatten()]))[0, 1].item()
    assert corr > 0.9
    streamed = stream_decode(bf16, tokens, 1)
    assert streamed.dtype == torch.float32 and streamed.shape == out.shape
