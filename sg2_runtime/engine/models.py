"""Building the engine's models: the real checkpoints, or tiny random ones for tests and demos."""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from sg2_runtime.codec import build_random_codec, load_codec
from sg2_runtime.codec.presets import codec_preset
from sg2_runtime.lm import Greeting, choose_greeting, load_greetings, load_lm, validate_greeting
from sg2_runtime.lm.random_model import random_lm

from .engine import EngineModels
from .options import SessionOptions
from .turn_format import SG2TurnFormat

log = logging.getLogger("sg2.models")


def _resolve_dtype(name: str, device: str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def _greeting_resolver(greetings: Sequence[Greeting], vocab_size: int) -> Any:
    def resolve(options: SessionOptions) -> tuple[Greeting | None, torch.Tensor | None]:
        choice = options.greeting
        if choice is None:
            return None, None
        if isinstance(choice, int):
            if not greetings:
                raise ValueError("no greetings are configured; pass greeting tokens or greeting=None")
            try:
                greeting = choose_greeting(greetings, index=choice)
            except ValueError as exc:
                raise ValueError(str(exc)) from exc
        else:
            greeting = validate_greeting({"text": choice[0], "audio": choice[1]}, vocab_size=vocab_size)
        return greeting, greeting.frames

    return resolve


def _engine_models(codec: Any, lm: Any, greetings: Sequence[Greeting]) -> EngineModels:
    return EngineModels(
        codec=codec,
        lm=lm,
        fmt=SG2TurnFormat(lm.prompt),
        resolve_greeting=_greeting_resolver(greetings, lm.config.vocab_size),
    )


def load_models(
    *,
    codec_checkpoint: str | Path,
    codec_config: str | Path,
    lm_dir: str | Path,
    greetings: str | Path | None,
    device: str = "cpu",
    dtype: str = "auto",
    max_sessions: int = 8,
    max_positions: int = 4096,
    progress: bool | None = None,
) -> EngineModels:
    """The released checkpoints: codec ``.pkl`` + YAML, LM directory, greetings JSONL.
    ``progress``: show a bar while the LM weights load (None: only on a terminal)."""
    torch_dtype = _resolve_dtype(dtype, device)
    log.info("loading codec %s", codec_checkpoint)
    codec = load_codec(codec_checkpoint, codec_config, device=device, dtype=torch_dtype)
    log.info("loading speech-text LM %s", lm_dir)
    lm = load_lm(
        lm_dir,
        device=device,
        dtype=torch_dtype,
        max_sessions=max_sessions,
        max_positions=max_positions,
        progress=progress,
    )
    greeting_list = load_greetings(greetings, vocab_size=lm.config.vocab_size) if greetings else []
    return _engine_models(codec, lm, greeting_list)


def random_greetings(lm: Any, count: int = 4, seed: int = 0, seconds: float = 1.2) -> list[Greeting]:
    """Greetings for random-weight models: real words on the text channel, random codec tokens."""
    rng = random.Random(seed)
    words = ["你好，我是SpeechGPT。", "Hello, this is SpeechGPT.", "您好！", "Hi there."]
    frames = int(seconds * 25) // 3 * 3
    out = []
    for i in range(count):
        text = lm.prompt.encode(words[i % len(words)])[: frames // 3]
        audio = [rng.randrange(1024) for _ in range(frames * 3)]
        out.append(validate_greeting({"text": text, "audio": audio}, vocab_size=lm.config.vocab_size))
    return out


def tiny_random_models(
    *, max_sessions: int = 8, max_positions: int = 4096, seed: int = 0, device: str = "cpu"
) -> EngineModels:
    """Tiny random codec and LM built in memory in a second or two: the whole stack, no weights."""
    codec = build_random_codec(codec_preset("tiny"), seed=seed, device=device)
    lm = random_lm("tiny", seed, max_sessions=max_sessions, max_positions=max_positions, device=device)
    return _engine_models(codec, lm, random_greetings(lm, seed=seed))
