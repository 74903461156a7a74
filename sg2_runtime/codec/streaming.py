"""Batched streaming encoder/decoder over independent slots (one slot = one live call).

Each object owns a :class:`~.state.StreamState` for `num_slots` slots on the codec's device; the
codec's modules are shared and never mutated. A `step` advances either every slot
(`slots=None`) or only the listed ones; unlisted slots keep their state bit for bit. On CPU float32
a slot's outputs are bit-identical to running that stream alone, whatever the other slots do
(see `kernels.py` for how). Audio goes in whole frames: a multiple of `frame_samples` (960) per
call; any other length is refused with ValueError (buffer partial frames in the caller).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from .state import StepContext, StreamState

if TYPE_CHECKING:
    from .codec import SG2Codec


class _SlotStream:
    def __init__(self, codec: SG2Codec, num_slots: int, decoder: bool):
        model = codec.model
        parts = model.decoder_parts() if decoder else model.encoder_parts()
        self.codec = codec
        self.num_slots = int(num_slots)
        self.state = StreamState(model.state_specs(parts), self.num_slots, codec.device, codec.dtype)

    def reset(self, slots: Sequence[int] | None = None) -> None:
        """Start the listed slots (all if None) afresh: empty context, timeline back to 0."""
        self.state.reset(slots)

    @property
    def frames_done(self) -> np.ndarray:
        """Frames each slot has processed since its last reset (a copy)."""
        return self.state.frames_done.copy()

    def state_bytes(self) -> int:
        return self.state.nbytes()


class StreamingEncoder(_SlotStream):
    """Audio frames -> tokens, per slot. `step(audio (n, 1, 960k)) -> tokens (3, n, k)`."""

    def __init__(self, codec: SG2Codec, num_slots: int = 1):
        super().__init__(codec, num_slots, decoder=False)

    @torch.no_grad()
    def step(self, audio: Tensor, slots: Sequence[int] | None = None) -> Tensor:
        ctx = StepContext(self.state, slots)
        codec = self.codec
        if (
            not isinstance(audio, Tensor)
            or audio.dim() != 3
            or audio.shape[0] != ctx.n
            or audio.shape[1] != 1
        ):
            shape = tuple(audio.shape) if isinstance(audio, Tensor) else type(audio).__name__
            raise ValueError(f"audio must be (n_slots={ctx.n}, 1, samples), got {shape}")
        length = audio.shape[-1]
        if length % codec.frame_samples:
            raise ValueError(
                f"streaming encode takes whole frames: samples per call must be a multiple of "
                f"{codec.frame_samples}, got {length}"
            )
        frames = length // codec.frame_samples
        if frames == 0:
            return torch.zeros(codec.n_q, ctx.n, 0, dtype=torch.long, device=codec.device)
        x = audio.reshape(ctx.n, length).to(device=codec.device, dtype=torch.float32)
        tokens = codec.model.encode_step(x, ctx)
        ctx.advance(frames)
        return tokens


class StreamingDecoder(_SlotStream):
    """Tokens -> audio, per slot. `step(tokens (3, n, k)) -> audio (n, 1, 960k)` float32."""

    def __init__(self, codec: SG2Codec, num_slots: int = 1):
        super().__init__(codec, num_slots, decoder=True)

    @torch.no_grad()
    def step(self, tokens: Tensor, slots: Sequence[int] | None = None) -> Tensor:
        ctx = StepContext(self.state, slots)
        codec = self.codec
        tokens = codec.check_tokens(tokens, batch=ctx.n)
        frames = tokens.shape[-1]
        if frames == 0:
            return torch.zeros(ctx.n, 1, 0, dtype=torch.float32, device=codec.device)
        audio = codec.model.decode_step(tokens, ctx)
        ctx.advance(frames)
        return audio.view(ctx.n, 1, -1)
