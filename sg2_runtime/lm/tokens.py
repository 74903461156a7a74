"""Special tokens of the speech-text LM's tokenizer, resolved by name."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

SOSP = "<|sosp|>"
EOSP = "<|eosp|>"
EMPTY = "<|empty|>"
END_EMPTY = "<|end_empty|>"
REQUIRED_NAMES = (SOSP, EOSP, EMPTY, END_EMPTY)


class TokenizerError(ValueError):
    """The tokenizer lacks a token the speech-text format needs."""


@dataclass(frozen=True)
class SpecialTokens:
    """Ids of the tokens the prompt format and the modality rule use."""

    sosp: int  # start of a speech segment
    eosp: int  # end of a speech segment
    empty: int  # text padding inside speech
    end_empty: int  # end of a run of text padding
    eos: int  # end of a turn / of generation (the tokenizer's eos token)
    pad: int | None = None
    eos_token: str = "<|im_end|>"

    def as_dict(self) -> dict[str, Any]:
        return {
            "sosp": self.sosp,
            "eosp": self.eosp,
            "empty": self.empty,
            "end_empty": self.end_empty,
            "eos": self.eos,
            "pad": self.pad,
        }


def resolve_special_tokens(tokenizer: Any) -> SpecialTokens:
    """Look the special tokens up by name in ``tokenizer``; a clear error names any that is absent."""
    vocab = tokenizer.get_vocab()
    missing = [name for name in REQUIRED_NAMES if name not in vocab]
    eos_token = getattr(tokenizer, "eos_token", None)
    if not eos_token or eos_token not in vocab:
        missing.append(f"eos token ({eos_token!r})")
    if missing:
        raise TokenizerError(
            f"the tokenizer lacks the special token(s) {', '.join(missing)} that SpeechGPT 2.0 needs"
        )
    pad_token = getattr(tokenizer, "pad_token", None)
    return SpecialTokens(
        sosp=vocab[SOSP],
        eosp=vocab[EOSP],
        empty=vocab[EMPTY],
        end_empty=vocab[END_EMPTY],
        eos=vocab[eos_token],
        pad=vocab.get(pad_token) if pad_token else None,
        eos_token=eos_token,
    )


def load_tokenizer(model_dir: str | Path) -> Any:
    """The checkpoint directory's tokenizer through ``AutoTokenizer`` (nothing is downloaded)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
