"""The pieces of the reference prompt format that the engine appends to a history as a call goes on.

The engine never builds a whole prompt at once: it streams a user's speech into the LM while they
talk, then closes the turn. This class cuts the reference format (built by
``sg2_runtime.lm.prompt``) into those incremental pieces, precomputing the constant text segments
once per engine. Concatenating the pieces of one turn gives exactly the reference matrix — the
engine tests check it.
"""

from __future__ import annotations

from typing import Protocol

import torch


class TurnFormat(Protocol):
    """What the conversation needs from the prompt format (all matrices are (4, 3*n) long)."""

    zero_id: int
    sosp: int
    eosp: int
    eos: int

    def first_turn(self, greeting: object | None, instructions: str | None) -> torch.Tensor: ...

    def user_audio_open(self) -> torch.Tensor: ...

    def user_audio_groups(self, frames: torch.Tensor) -> torch.Tensor: ...

    def user_audio_close(self, frames: torch.Tensor) -> torch.Tensor: ...

    def user_text_turn(self, text: str) -> torch.Tensor: ...

    def reply_open(self) -> torch.Tensor: ...

    def agent_close(self, in_speech: bool) -> torch.Tensor: ...

    def decode_text(self, ids: list[int]) -> str: ...
