"""Loading the speech-text LM's weights from an unchanged checkpoint directory.

Accepted layouts: ``model.safetensors``; sharded safetensors with ``model.safetensors.index.json``;
``pytorch_model.bin`` (optionally sharded with ``pytorch_model.bin.index.json``), read with
``torch.load(weights_only=True, mmap=True)``. The tied ``local_transformer_lm_heads.*`` entries may
be present or absent. The module is built on the meta device and each tensor is moved into place
once (``assign``-style), so a 15.5 GB checkpoint needs its own size in memory, not twice that.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from .config import LMConfig
from .model import SG2Model

log = logging.getLogger(__name__)

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"

# Keys that may be absent because they duplicate others (tied weights).
TIED_PREFIX = "local_transformer_lm_heads."
# Non-parameter entries older checkpoints may carry; ignored when present.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class LMCheckpointError(ValueError):
    """The checkpoint directory's weights do not match the model its config describes."""


def expected_shapes(config: LMConfig) -> dict[str, tuple[int, ...]]:
    """Every state-dict entry (tied heads included) with its shape, built on the meta device."""
    with torch.device("meta"):
        model = SG2Model(config)
    return {name: tuple(t.shape) for name, t in model.state_dict(keep_vars=True).items()}


def checkpoint_files(model_dir: Path) -> tuple[str, list[Path]]:
    """("safetensors" | "bin", files) for the weights in ``model_dir``."""
    for index_name, kind in ((SAFETENSORS_INDEX, "safetensors"), (BIN_INDEX, "bin")):
        index = model_dir / index_name
        if index.is_file():
            weight_map = json.loads(index.read_text()).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise LMCheckpointError(f"{index} has no weight_map")
            files = sorted({model_dir / name for name in weight_map.values()})
            absent = [str(f.name) for f in files if not f.is_file()]
            if absent:
                raise LMCheckpointError(f"{index} names shard(s) that are missing: {absent}")
            return kind, files
    if (model_dir / SAFETENSORS_SINGLE).is_file():
        return "safetensors", [model_dir / SAFETENSORS_SINGLE]
    if (model_dir / BIN_SINGLE).is_file():
        return "bin", [model_dir / BIN_SINGLE]
    raise LMCheckpointError(
        f"no weights in {model_dir}: expected {SAFETENSORS_SINGLE}, {SAFETENSORS_INDEX}, {BIN_SINGLE} or {BIN_INDEX}"
    )


class _Checkpoint:
    """Lazy access to a checkpoint's tensors: names and shapes first, data one tensor at a time."""

    def __init__(self, kind: str, files: list[Path]) -> None:
        self.kind = kind
        self.files = files
        self.shapes: dict[str, tuple[int, ...]] = {}
        self._where: dict[str, int] = {}
        self._bins: dict[int, dict[str, torch.Tensor]] = {}
        for i, path in enumerate(files):
            for name, shape in self._scan(i, path):
                if name in self._where:
                    raise LMCheckpointError(f"tensor {name} appears in more than one shard")
                self.shapes[name] = shape
                self._where[name] = i

    def _scan(self, i: int, path: Path) -> Iterator[tuple[str, tuple[int, ...]]]:
        if self.kind == "safetensors":
            from safetensors import safe_open

            try:
                with safe_open(str(path), framework="pt", device="cpu") as f:
                    for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                        yield name, tuple(f.get_slice(name).get_shape())
            except Exception as exc:  # corrupt header etc.
                raise LMCheckpointError(f"cannot read {path}: {exc}") from exc
        else:
            try:
                state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
            except Exception as exc:
                raise LMCheckpointError(f"cannot read {path}: {exc}") from exc
            if not isinstance(state, dict):
                raise LMCheckpointError(f"{path} does not hold a state dict")
            self._bins[i] = state
            for name, t in state.items():
                if not isinstance(t, torch.Tensor):
                    raise LMCheckpointError(f"{path}: entry {name} is not a tensor")
                yield name, tuple(t.shape)

    def tensors(self, names: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield tensors grouped by file (each shard opened once)."""
        by_file: dict[int, list[str]] = {}
        for name in names:
            by_file.setdefault(self._where[name], []).append(name)
        for i in sorted(by_file):
            if self.kind == "safetensors":
                from safetensors import safe_open

                with safe_open(str(self.files[i]), framework="pt", device="cpu") as f:
                    for name in by_file[i]:
                        yield name, f.get_tensor(name)
            else:
                state = self._bins[i]
                for name in by_file[i]:
                    yield name, state[name]
                del self._bins[i]


def _describe(names: list[str], limit: int = 12) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" ... (+{len(names) - limit} more)" if len(names) > limit else "")


def validate_checkpoint_keys(
    expected: dict[str, tuple[int, ...]], found: dict[str, tuple[int, ...]]
) -> list[str]:
    """Check names and shapes; returns the names to load. Raises LMCheckpointError naming each problem."""
    missing = [k for k in expected if k not in found and not k.startswith(TIED_PREFIX)]
    unexpected = [k for k in found if k not in expected and not k.endswith(IGNORED_SUFFIXES)]
    misshaped = [
        f"{k} (checkpoint {list(found[k])}, model {list(expected[k])})"
        for k in expected
        if k in found and tuple(found[k]) != tuple(expected[k])
    ]
    problems = []
    if missing:
        problems.append(f"missing weights: {_describe(missing)}")
    if unexpected:
        problems.append(f"unexpected weights: {_describe(unexpected)}")
    if misshaped:
        problems.append(f"wrongly shaped weights: {_describe(misshaped)}")
    if problems:
        raise LMCheckpointError("checkpoint does not match the model config; " + "; ".join(problems))
    return [k for k in expected if k in found]


def _progress(total: int, desc: str, enabled: bool | None):
    if enabled is None:
        enabled = sys.stderr.isatty() and total > 50
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is a declared dependency; stay silent if it is absent anyway
        return None
    return tqdm(total=total, desc=desc, unit="tensor", disable=not enabled, leave=False)


def _assign(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    owner_name, _, leaf = name.rpartition(".")
    owner = model.get_submodule(owner_name)
    setattr(owner, leaf, nn.Parameter(tensor, requires_grad=False))


def _tie_or_keep_heads(model: SG2Model, loaded: set[str]) -> None:
    """Tie each patch-decoder head to its speech embedding unless the checkpoint carries a different one.

    The reference ties them at construction; a checkpoint may omit the heads (tied) or store
    copies. Copies equal to the embeddings are dropped (tied); copies that differ are kept, since
    those are the weights that checkpoint was run with.
    """
    heads, embs = model.local_transformer_lm_heads, model.speech_embedddings
    for c in range(len(heads)):
        if f"{TIED_PREFIX}{c}.weight" in loaded and not torch.equal(heads[c].weight, embs[c].weight):
            log.warning(
                "checkpoint's local_transformer_lm_heads.%d differs from speech_embedddings.%d; kept untied",
                c,
                c,
            )
            continue
        heads[c].weight = embs[c].weight


def load_weights(
    model_dir: str | Path,
    config: LMConfig,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    progress: bool | None = None,
) -> SG2Model:
    """Build :class:`SG2Model` on the meta device and fill it from the checkpoint in ``model_dir``."""
    model_dir = Path(model_dir)
    kind, files = checkpoint_files(model_dir)
    ckpt = _Checkpoint(kind, files)
    with torch.device("meta"):
        model = SG2Model(config)
    expected = {n: tuple(t.shape) for n, t in model.state_dict(keep_vars=True).items()}
    names = validate_checkpoint_keys(expected, ckpt.shapes)
    bar = _progress(len(names), f"loading {model_dir.name}", progress)
    device = torch.device(device)
    try:
        for name, tensor in ckpt.tensors(names):
            if not tensor.is_floating_point():
                raise LMCheckpointError(f"weight {name} has non-float dtype {tensor.dtype}")
            _assign(model, name, tensor.to(device=device, dtype=dtype))
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    _tie_or_keep_heads(model, set(names))
    leftover = [n for n, p in model.named_parameters() if p.is_meta]
    if leftover:  # cannot happen after validation; guards against a config/module mismatch
        raise LMCheckpointError(f"weights left unset: {_describe(leftover)}")
    model.eval()
    log.info("loaded %d tensors from %s (%s, %d file(s))", len(names), model_dir, kind, len(files))
    return model
