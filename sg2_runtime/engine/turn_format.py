"""The pieces of the reference prompt format that the engine appends to a history as a call goes on.

The engine never builds a whole prompt at once: it streams a user's speech into the LM while they
talk, then closes the turn. This class cuts the reference format (built by
``sg2_runtime.lm.prompt``) into those incremental pieces, precomputing the constant text segments
once per engine. Concatenating the pieces of one turn gives exactly the reference matrix — the
engine tests check it.
"""

from __future__ import annotations

from typing import Any, Protocol

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

    def agent_open(self) -> torch.Tensor: ...

    def agent_close(self, in_speech: bool) -> torch.Tensor: ...

    def decode_text(self, ids: list[int]) -> str: ...


class SG2TurnFormat:
    """:class:`TurnFormat` on top of the LM package's reference prompt builder."""

    def __init__(self, prompt: Any) -> None:
        from sg2_runtime.lm.prompt import AGENT_PREFIX, system_text

        self.prompt = prompt
        special = prompt.special
        self.zero_id = prompt.zero_speech_id
        self.sosp, self.eosp, self.eos = special.sosp, special.eosp, special.eos
        self._system_text = system_text()
        self._system_len = prompt.text_segment(self._system_text).shape[1]
        self._reply_open = prompt.text_segment([special.sosp])
        self._agent_open = prompt.text_segment(AGENT_PREFIX)
        self._user_open = prompt.user_turn_prefix()

    def first_turn(self, greeting: Any | None, instructions: str | None) -> torch.Tensor:
        """System text (with the caller's instructions, if any) and the greeting as a finished turn.

        Without instructions this is exactly the reference's first turn. Instructions go at the end
        of the system line, before its blank lines, so the rest of the format is unchanged.
        """
        whole = self.prompt.system_and_greeting(greeting)
        if not instructions:
            return whole
        system = self._system_text.rstrip("\n") + " " + instructions.strip() + "\n\n\n"
        return torch.cat([self.prompt.text_segment(system), whole[:, self._system_len :]], dim=1)

    def user_audio_open(self) -> torch.Tensor:
        return self._user_open

    def user_audio_groups(self, frames: torch.Tensor) -> torch.Tensor:
        return self.prompt.user_speech(frames)

    def user_audio_close(self, frames: torch.Tensor) -> torch.Tensor:
        whole = frames.shape[0] - frames.shape[0] % 3
        parts = [self.prompt.user_speech(frames[:whole])] if whole else []
        parts.append(self.prompt.user_turn_suffix(frames[whole:]))
        return torch.cat(parts, dim=1)

    def user_text_turn(self, text: str) -> torch.Tensor:
        return self.prompt.user_text_turn(text)

    def reply_open(self) -> torch.Tensor:
        return self._reply_open

    def agent_open(self) -> torch.Tensor:
        """``[|SpeechGPT|]: `` for a reply that does not follow a user turn (whose suffix has it)."""
        return self._agent_open

    def agent_close(self, in_speech: bool) -> torch.Tensor:
        return self.prompt.agent_turn_closing(in_speech)

    def decode_text(self, ids: list[int]) -> str:
        return self.prompt.tokenizer.decode(ids, skip_special_tokens=True)
