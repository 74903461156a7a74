"""Models and engine for ``sg2 serve``: the tiny-random preset or the real checkpoints, with progress."""

from __future__ import annotations

import importlib
import logging
import sys
import time
from collections.abc import Callable
from typing import Any

from sg2_runtime.engine.engine import Engine, EngineModels
from sg2_runtime.engine.options import SessionOptions

from .config import Settings

log = logging.getLogger("sg2.serve")


def _say(message: str) -> None:
    print(f"sg2 serve: {message}", file=sys.stderr, flush=True)


def build_models(settings: Settings, progress: bool | None = None) -> EngineModels:
    """The engine's models as the settings describe them (checked paths, timed steps)."""
    m, e = settings.models, settings.engine
    if m.preset == "tiny-random":
        from sg2_runtime.engine.models import tiny_random_models

        t0 = time.perf_counter()
        _say(f"building tiny random-weight models (seed {m.seed}, {m.device})")
        models = tiny_random_models(
            max_sessions=e.max_sessions, max_positions=e.max_positions, seed=m.seed, device=m.device
        )
        _say(f"models ready in {time.perf_counter() - t0:.1f} s")
        return models
    m.check_loadable()
    greetings = m.greetings or e.greetings_path
    for name, path in (
        ("codec_checkpoint", m.codec_checkpoint),
        ("codec_config", m.codec_config),
        ("greetings", greetings),
    ):
        if path is not None and not path.is_file():
            raise FileNotFoundError(f"models.{name}: {path} does not exist")
    if m.lm_dir is None or not m.lm_dir.is_dir():
        raise FileNotFoundError(f"models.lm_dir: {m.lm_dir} is not a directory")
    from sg2_runtime.engine.models import load_models

    t0 = time.perf_counter()
    _say(f"[1/3] codec {m.codec_checkpoint}")
    _say(f"[2/3] speech-text LM {m.lm_dir} (a progress bar follows on a terminal)")
    _say(f"[3/3] greetings {greetings}" if greetings else "[3/3] no greetings file: voices must map to null")
    models = load_models(
        codec_checkpoint=m.codec_checkpoint,
        codec_config=m.codec_config,
        lm_dir=m.lm_dir,
        greetings=greetings,
        device=m.device,
        dtype=m.dtype,
        max_sessions=e.max_sessions,
        max_positions=e.max_positions,
        progress=progress,
    )
    _say(f"models loaded in {time.perf_counter() - t0:.1f} s")
    return models


def check_voices(settings: Settings, models: EngineModels) -> None:
    """Every configured voice must name a greeting these models have."""
    for name, index in settings.realtime.voices.items():
        try:
            models.resolve_greeting(SessionOptions(greeting=index))
        except ValueError as exc:
            raise ValueError(f"realtime.voices.{name}: greeting {index!r} is not usable: {exc}") from exc
    settings.realtime.session_defaults()


def build_engine(settings: Settings, progress: bool | None = None) -> Engine:
    models = build_models(settings, progress)
    check_voices(settings, models)
    engine = Engine(models, settings.engine).start()
    _say(
        f"engine started: {settings.engine.max_sessions} session slots, {settings.engine.max_positions} positions each"
    )
    return engine


def resolve_extensions(names: list[str]) -> list[Callable[[Any], None]]:
    """``module:function`` -> the callables (imported now, so a typo fails before models load)."""
    out = []
    for name in names:
        module_name, sep, attr = name.partition(":")
        if not sep or not module_name or not attr:
            raise ValueError(f"extension {name!r} must be 'module:function'")
        fn = getattr(importlib.import_module(module_name), attr, None)
        if not callable(fn):
            raise ImportError(f"extension {name!r}: {attr} is not a callable in {module_name}")
        out.append(fn)
    return out
