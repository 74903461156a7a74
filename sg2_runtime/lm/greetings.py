"""Greetings: the spoken first line of the agent, in the official ``greetings.jsonl`` format.

Each line is ``{"text": [token ids], "audio": [codec tokens, frame-major]}``: the greeting's words
(the speech segment's text channel, with ``<|empty|>``/``<|end_empty|>`` padding already in
place) and its codec tokens, 3 per 40 ms frame. The audio must cover whole LM positions (3
frames = 9 tokens each) and the text must not be longer than the number of positions.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch


class GreetingError(ValueError):
    """A greeting entry is malformed."""


@dataclass(frozen=True)
class Greeting:
    text_ids: tuple[int, ...]
    audio: tuple[int, ...]  # flat, frame-major: f0q0 f0q1 f0q2 f1q0 ...
    n_vq: int = 3

    @property
    def frames(self) -> torch.Tensor:
        """Codec tokens as (frames, n_vq) int64."""
        return torch.tensor(self.audio, dtype=torch.int64).reshape(-1, self.n_vq)

    @property
    def num_frames(self) -> int:
        return len(self.audio) // self.n_vq

    @property
    def seconds(self) -> float:
        return self.num_frames * 0.04


def validate_greeting(
    entry: Any,
    *,
    vocab_size: int | None = None,
    n_vq: int = 3,
    group_size: int = 3,
    codebook_size: int = 1024,
) -> Greeting:
    """Check one greeting entry and return it as a :class:`Greeting`; :class:`GreetingError` otherwise."""
    if not isinstance(entry, dict) or "text" not in entry or "audio" not in entry:
        raise GreetingError("a greeting must be an object with 'text' and 'audio' lists")
    text, audio = entry["text"], entry["audio"]
    if not isinstance(text, list) or not isinstance(audio, list):
        raise GreetingError("greeting 'text' and 'audio' must be lists of integers")
    if not all(isinstance(t, int) and not isinstance(t, bool) for t in text + audio):
        raise GreetingError("greeting 'text' and 'audio' must hold integers only")
    per_position = n_vq * group_size
    if not audio or len(audio) % per_position:
        raise GreetingError(
            f"greeting audio has {len(audio)} tokens; it must be a non-empty multiple of {per_position} "
            f"({group_size} frames of {n_vq} codec tokens per LM position)"
        )
    bad_audio = [t for t in audio if not 0 <= t < codebook_size]
    if bad_audio:
        raise GreetingError(f"greeting audio tokens must be in [0, {codebook_size}); found {bad_audio[:5]}")
    if vocab_size is not None:
        bad_text = [t for t in text if not 0 <= t < vocab_size]
        if bad_text:
            raise GreetingError(f"greeting text ids must be in [0, {vocab_size}); found {bad_text[:5]}")
    elif any(t < 0 for t in text):
        raise GreetingError("greeting text ids must be non-negative")
    positions = len(audio) // per_position
    if len(text) > positions:
        raise GreetingError(
            f"greeting text has {len(text)} tokens but its audio covers only {positions} positions"
        )
    return Greeting(tuple(text), tuple(audio), n_vq=n_vq)


def parse_greetings(lines: Sequence[str], *, source: str = "<greetings>", **limits: Any) -> list[Greeting]:
    greetings = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as exc:
            raise GreetingError(f"{source}:{number}: not JSON ({exc.msg})") from exc
        try:
            greetings.append(validate_greeting(entry, **limits))
        except GreetingError as exc:
            raise GreetingError(f"{source}:{number}: {exc}") from exc
    if not greetings:
        raise GreetingError(f"{source} holds no greetings")
    return greetings


def load_greetings(path: str | Path, **limits: Any) -> list[Greeting]:
    """All greetings of a JSONL file, validated (``vocab_size=`` checks text ids too)."""
    path = Path(path)
    return parse_greetings(path.read_text(encoding="utf-8").splitlines(), source=str(path), **limits)


def choose_greeting(
    greetings: Sequence[Greeting], index: int | None = None, seed: int | None = None
) -> Greeting:
    """The greeting at ``index``, or one picked at random (reproducibly with ``seed``)."""
    if not greetings:
        raise GreetingError("no greetings to choose from")
    if index is not None:
        if not -len(greetings) <= index < len(greetings):
            raise GreetingError(f"greeting index {index} out of range (0..{len(greetings) - 1})")
        return greetings[index]
    return greetings[random.Random(seed).randrange(len(greetings))]
