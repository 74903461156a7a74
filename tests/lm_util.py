"""Helpers shared by the speech-text LM tests (tests/test_lm_*.py)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from sg2_runtime.lm import SG2LM, load_lm, validate_greeting


def golden(reference_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(reference_dir / "mimo_tiny_golden.safetensors"))


def tiny_lm(reference_dir: Path, **options) -> SG2LM:
    options.setdefault("max_sessions", 4)
    options.setdefault("max_positions", 256)
    return load_lm(reference_dir / "mimo_tiny", **options)


def golden_prompt(lm: SG2LM, gold: dict[str, torch.Tensor]) -> torch.Tensor:
    greeting = validate_greeting(
        {"text": gold["greeting_text_ids"].tolist(), "audio": gold["greeting_audio_flat"].tolist()},
        vocab_size=lm.config.vocab_size,
    )
    return torch.cat(
        [lm.prompt.system_and_greeting(greeting), lm.prompt.user_speech_turn(gold["user_audio_flat"])], dim=1
    )


def sosp_position(lm: SG2LM) -> torch.Tensor:
    return lm.prompt.text_segment([lm.special.sosp])
