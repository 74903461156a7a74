"""Silero VAD for many calls at once: the ONNX model shipped in the `silero-vad` package, run by
onnxruntime over every session's new 32 ms windows in one batched call.

The package's own wrapper keeps one hidden state for one stream; here each session owns a slot
in explicit state arrays (recurrent state and the 64-sample context the model expects before
each 512-sample window), so sessions start and stop independently.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

VAD_RATE = 16000
WINDOW = 512  # samples at 16 kHz = 32 ms
CONTEXT = 64
WINDOW_MS = WINDOW * 1000 // VAD_RATE


def silero_model_path() -> str:
    """Path of the ONNX model inside the installed `silero-vad` package.

    Found without importing the package: its ``__init__`` imports torch (seconds), which processes
    that only need the ONNX model (the LiveKit agent's floor control) do not otherwise load."""
    spec = importlib.util.find_spec("silero_vad")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the silero-vad package is not installed")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "silero_vad.onnx"
    if not path.is_file():
        raise FileNotFoundError(f"silero_vad.onnx not found in the silero-vad package at {path}")
    return str(path)


class BatchedVAD:
    """Fixed set of slots; ``run`` advances only the slots it is given."""

    def __init__(self, num_slots: int, threads: int = 1) -> None:
        opts = ort.SessionOptions()
        opts.inter_op_num_threads = 1
        opts.intra_op_num_threads = threads
        self._session = ort.InferenceSession(
            silero_model_path(), sess_options=opts, providers=["CPUExecutionProvider"]
        )
        self.num_slots = num_slots
        self._state = np.zeros((2, num_slots, 128), dtype=np.float32)
        self._context = np.zeros((num_slots, CONTEXT), dtype=np.float32)
        self._sr = np.array(VAD_RATE, dtype=np.int64)

    def reset(self, slot: int) -> None:
        self._state[:, slot] = 0.0
        self._context[slot] = 0.0

    def run(self, slots: Sequence[int], windows: np.ndarray) -> np.ndarray:
        """Speech probability of one 512-sample window per listed slot, shape (len(slots),)."""
        if len(slots) == 0:
            return np.zeros(0, dtype=np.float32)
        idx = np.asarray(slots, dtype=np.int64)
        if windows.shape != (len(idx), WINDOW):
            raise ValueError(f"expected windows of shape ({len(idx)}, {WINDOW}), got {windows.shape}")
        x = np.concatenate([self._context[idx], windows.astype(np.float32, copy=False)], axis=1)
        out, state = self._session.run(None, {"input": x, "state": self._state[:, idx], "sr": self._sr})
        self._state[:, idx] = state
        self._context[idx] = x[:, -CONTEXT:]
        return out[:, 0].astype(np.float32)
