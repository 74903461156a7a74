"""The runner owns the device: it executes the scheduler's batched work on the models.

Every call here is one batched operation over the sessions the scheduler picked (one codec frame
per session, one VAD window per session, one LM step for every generating session, one 120 ms
chunk decode per session). Slots are fixed per session for the codec and VAD states; the LM keeps
its own slot in its static KV pool.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from .vad import BatchedVAD

SILENCE_FRAME = (688, 131, 226)


class Runner:
    def __init__(self, codec: Any, lm: Any, num_slots: int, vad_threads: int = 1) -> None:
        self.codec = codec
        self.lm = lm
        self.encoder = codec.streaming_encoder(num_slots=num_slots)
        self.decoder = codec.streaming_decoder(num_slots=num_slots)
        self.vad = BatchedVAD(num_slots, threads=vad_threads)
        self._silence = torch.tensor(SILENCE_FRAME, dtype=torch.long)
        self._zero = int(getattr(lm, "zero_speech_id", 1024))

    def reset_slot(self, slot: int) -> None:
        self.encoder.reset([slot])
        self.decoder.reset([slot])
        self.vad.reset(slot)

    def encode(self, slots: Sequence[int], audio: np.ndarray) -> np.ndarray:
        """(n, 960k) samples, the same k whole frames per slot -> (n, k, 3) codec tokens."""
        x = torch.from_numpy(audio).to(self.codec.device, self.codec.dtype).unsqueeze(1)
        tokens = self.encoder.step(x, slots=list(slots))  # (3, n, k)
        return tokens.permute(1, 2, 0).cpu().numpy()

    def vad_probs(self, slots: Sequence[int], windows: np.ndarray) -> np.ndarray:
        return self.vad.run(slots, windows)

    def decode(
        self, slots: Sequence[int], speech: Sequence[torch.Tensor], reset: Sequence[int]
    ) -> np.ndarray:
        """One (3 frames, 3) token block per slot -> (n, 2880) float32 PCM."""
        if reset:
            self.decoder.reset(list(reset))
        block = torch.stack([self._decodable(s) for s in speech])  # (n, 3 frames, 3 q)
        tokens = block.permute(2, 0, 1).to(self.codec.device)  # (3 q, n, 3 frames)
        pcm = self.decoder.step(tokens, slots=list(slots))  # (n, 1, 2880)
        return pcm[:, 0].float().cpu().numpy()

    def _decodable(self, speech: torch.Tensor) -> torch.Tensor:
        """Frames holding the zero-embedding id (possible under greedy decoding) decode as silence."""
        bad = (speech >= self._zero).any(dim=1, keepdim=True)
        return torch.where(bad, self._silence.expand_as(speech), speech).long()

    def prefill(self, items: Sequence[tuple[Any, torch.Tensor]]) -> None:
        if len(items) == 1 or not hasattr(self.lm, "prefill_many"):
            for sess, matrix in items:
                self.lm.prefill(sess, matrix)
        else:
            self.lm.prefill_many(list(items))

    def step(self, sessions: Sequence[Any]) -> list[Any]:
        return self.lm.step(list(sessions))
