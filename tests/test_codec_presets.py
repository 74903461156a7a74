"""Built-in codec presets: the 'sg2' preset has exactly the released architecture."""

from __future__ import annotations

import math

import pytest

from sg2_runtime.codec import CodecConfig, released_shapes
from sg2_runtime.codec.presets import codec_preset


def test_sg2_preset_equals_the_released_config_and_checkpoint_layout(reference_dir) -> None:
    released = CodecConfig.from_yaml(reference_dir / "sg2_codec_config.yaml").to_dict()
    preset = codec_preset("sg2").to_dict()
    released["generator_params"]["encoder_convnext_kwargs"].pop("drop_path_rate")  # training only
    preset["generator_params"]["encoder_convnext_kwargs"].pop("drop_path_rate")
    assert preset == released
    rows = (reference_dir / "codec_full_state_dict.tsv").read_text().splitlines()[1:]
    expected = {
        r.split("\t")[0]: tuple(int(x) for x in r.split("\t")[1].strip("[]").split(",") if x.strip())
        for r in rows
    }
    assert {k: tuple(v) for k, v in released_shapes(codec_preset("sg2")).items()} == expected


def test_tiny_preset_is_small_and_unknown_names_are_refused() -> None:
    tiny = codec_preset("tiny")
    size = lambda cfg: sum(math.prod(shape) for shape in released_shapes(cfg).values())  # noqa: E731
    assert size(tiny) < size(codec_preset("sg2")) / 100
    assert tiny.frame_samples == 960 and tiny.n_q == 3 and tiny.codebook_size == 1024
    with pytest.raises(ValueError, match="unknown codec preset"):
        codec_preset("huge")
