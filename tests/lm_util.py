"""Helpers shared by the speech-text LM tests (tests/test_lm_*.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
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


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """The tiny models' ops are too small for intra-op threads; on a shared 2-core machine a second
    thread mostly waits. Restored after the module."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
