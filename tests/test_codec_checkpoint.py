"""Checkpoint format: released key scheme, strict loading, clear refusals, random checkpoints, CLI."""

from __future__ import annotations

import re

import pytest
import torch

from agent.cli import main as sg2_main
from sg2_runtime.codec import (
    CodecCheckpointError,
    CodecConfig,
    CodecConfigError,
    build_random_codec_checkpoint,
    load_codec,
    load_state_dict_file,
    released_shapes,
    save_codec_checkpoint,
)
from sg2_runtime.codec.layers import WN_G, WN_V
from sg2_runtime.codec.model import CodecModel
from tests.codec_support import golden, tiny_config


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _read_tsv(path) -> dict[str, tuple[tuple[int, ...], str]]:
    rows = {}
    for line in path.read_text().splitlines()[1:]:
        key, shape, dtype = line.split("\t")
        dims = tuple(int(d) for d in re.findall(r"\d+", shape))
        rows[key] = (dims, dtype)
    return rows


@pytest.fixture(scope="module")
def tiny_sd(reference_dir):
    return load_state_dict_file(reference_dir / "codec_tiny_ckpt.pkl")


@pytest.fixture(scope="module")
def tiny_cfg(reference_dir):
    return tiny_config(reference_dir)


def test_full_config_model_has_the_released_state_dict(reference_dir):
    """Build the real-size model on the meta device: keys, shapes and dtypes = the release."""
    config = CodecConfig.from_yaml(reference_dir / "sg2_codec_config.yaml")
    expected = _read_tsv(reference_dir / "codec_full_state_dict.tsv")
    assert len(expected) == 991
    with torch.device("meta"):
        model = CodecModel(config)
    exported = model.export_released()
    assert {k: (tuple(v.shape), str(v.dtype).replace("torch.", "")) for k, v in exported.items()} == expected
    assert released_shapes(config) == {k: s for k, (s, _) in expected.items()}
    params = sum(torch.Size(s).numel() for k, (s, _) in expected.items() if "pad_buffer" not in k)
    assert params > 237_000_000


def test_tiny_listing_matches(reference_dir, tiny_cfg, tiny_sd):
    expected = _read_tsv(reference_dir / "codec_tiny_state_dict.tsv")
    assert released_shapes(tiny_cfg) == {k: s for k, (s, _) in expected.items()}
    assert {k: tuple(v.shape) for k, v in tiny_sd.items()} == released_shapes(tiny_cfg)


def test_weight_norm_is_folded_once_at_load(tiny_cfg, tiny_sd):
    codec = load_codec(tiny_sd, tiny_cfg)
    model = codec.model
    assert not any("parametrizations" in name for name, _ in model.named_buffers())
    assert not list(model.parameters())  # plain buffers: nothing for autograd to track
    prefix = "encoder_transformer.transformer.layers.0.linear1"
    folded = torch._weight_norm(tiny_sd[prefix + WN_V], tiny_sd[prefix + WN_G], 0)
    assert torch.equal(model.encoder_transformer.layers[0].linear1.lin.weight, folded)
    assert not model.training


def test_random_checkpoint_saves_in_released_format_and_reloads(tmp_path, tiny_cfg, reference_dir):
    sd = build_random_codec_checkpoint(tiny_cfg, seed=7)
    assert {k: tuple(v.shape) for k, v in sd.items()} == released_shapes(tiny_cfg)
    assert all(v.dtype == torch.float32 for v in sd.values())
    assert any(k.endswith(WN_G) for k in sd) and "quantizer.codebook.layers.2.embed_avg" in sd
    path = tmp_path / "random_codec.pkl"
    save_codec_checkpoint(sd, path)
    raw = torch.load(path, map_location="cpu", weights_only=True)
    assert type(raw) is dict and list(raw) == list(sd)
    assert all(torch.equal(raw[k], sd[k]) for k in sd)
    from_file = load_codec(path, reference_dir / "codec_tiny_config.yaml")
    from_dict = load_codec(sd, tiny_cfg)
    wav = golden(reference_dir)["wav0"].view(1, 1, -1)
    tokens = from_file.encode(wav)
    assert torch.equal(tokens, from_dict.encode(wav))
    assert torch.equal(from_file.decode(tokens), from_dict.decode(tokens))
    # Exporting the loaded model gives the same network back (fold -> unfold -> fold).
    again = load_codec(from_file.model.export_released(), tiny_cfg)
    assert torch.equal(again.encode(wav), tokens)
    assert (again.decode(tokens) - from_file.decode(tokens)).abs().max() < 1e-5
    # Same seed, same checkpoint; another seed, another one.
    assert torch.equal(
        build_random_codec_checkpoint(tiny_cfg, seed=7)["mel_transform.melmat"], sd["mel_transform.melmat"]
    )
    other = build_random_codec_checkpoint(tiny_cfg, seed=8)
    assert not torch.equal(
        other["quantizer.codebook.layers.0.embed"], sd["quantizer.codebook.layers.0.embed"]
    )


def test_random_melmat_matches_released_filterbank(tiny_cfg, tiny_sd):
    sd = build_random_codec_checkpoint(tiny_cfg, seed=0)
    assert torch.equal(sd["mel_transform.melmat"], tiny_sd["mel_transform.melmat"])
    assert torch.equal(sd["mel_transform.window"], tiny_sd["mel_transform.window"])


def _expect_error(sd, cfg, *fragments: str) -> str:
    with pytest.raises(CodecCheckpointError) as info:
        load_codec(sd, cfg)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in error: {message}"
    return message


def test_missing_key_is_named(tiny_sd, tiny_cfg):
    sd = dict(tiny_sd)
    del sd["decoder_hifigan.output_conv.conv.bias"]
    _expect_error(sd, tiny_cfg, "1 missing", "decoder_hifigan.output_conv.conv.bias")


def test_unexpected_key_is_named(tiny_sd, tiny_cfg):
    sd = dict(tiny_sd)
    sd["encoder_transformer.transformer.layers.9.norm1.weight"] = torch.ones(32)
    _expect_error(sd, tiny_cfg, "1 unexpected", "encoder_transformer.transformer.layers.9.norm1.weight")


def test_wrong_shape_is_named_with_both_shapes(tiny_sd, tiny_cfg):
    sd = dict(tiny_sd)
    sd["quantizer.codebook.layers.1.embed"] = torch.zeros(1024, 31)
    _expect_error(
        sd, tiny_cfg, "wrong shape", "quantizer.codebook.layers.1.embed", "[1024, 31]", "[1024, 32]"
    )


def test_long_lists_are_truncated(tiny_sd, tiny_cfg):
    sd = {k: v for k, v in tiny_sd.items() if not k.startswith("decoder_")}
    missing = len(tiny_sd) - len(sd)
    message = _expect_error(sd, tiny_cfg, f"{missing} missing", "more")
    assert len(message) < 2000


def test_config_that_does_not_match_the_checkpoint(tiny_sd, reference_dir):
    full = CodecConfig.from_yaml(reference_dir / "sg2_codec_config.yaml")
    _expect_error(tiny_sd, full, "does not match", "wrong shape", "missing")
    path = reference_dir / "sg2_codec_config.yaml"
    with pytest.raises(CodecCheckpointError, match=f"does not match config {re.escape(str(path))}"):
        load_codec(tiny_sd, path)


class _NotATensor:
    pass


def test_non_tensor_pickle_content_is_refused(tmp_path, tiny_sd, reference_dir):
    cfg_path = reference_dir / "codec_tiny_config.yaml"
    objects = {
        "custom_object.pkl": ({"a": _NotATensor()}, "weights_only"),
        "string_value.pkl": (dict(tiny_sd) | {"note": "hello"}, "non-tensor entries"),
        "list.pkl": (list(tiny_sd.values()), "expected a state dict"),
        "nested.pkl": ({"state_dict": dict(tiny_sd)}, "non-tensor entries"),
        "int_tensor.pkl": (
            dict(tiny_sd) | {"quantizer.codebook.layers.0.inited": torch.ones(1, dtype=torch.long)},
            "not floating point",
        ),
    }
    for name, (obj, fragment) in objects.items():
        path = tmp_path / name
        torch.save(obj, path)
        with pytest.raises(CodecCheckpointError, match=fragment):
            load_codec(path, cfg_path)
    with pytest.raises(CodecCheckpointError, match="does not exist"):
        load_codec(tmp_path / "absent.pkl", cfg_path)


def test_bad_configs_are_refused(tmp_path, reference_dir, tiny_cfg, tiny_sd):
    import yaml

    data = yaml.safe_load((reference_dir / "codec_tiny_config.yaml").read_text())
    for mutate, fragment in [
        (lambda d: d["generator_params"].__setitem__("mode", "noncausal"), "mode"),
        (lambda d: d["generator_params"]["vq_transformer_kwargs"].__setitem__("gating", "silu"), "gating"),
        (lambda d: d["generator_params"]["mel_kwargs"].__setitem__("num_melz", 3), "unknown keys"),
        (lambda d: d["generator_params"].pop("quantizer_kwargs"), "quantizer_kwargs"),
    ]:
        bad = yaml.safe_load(yaml.safe_dump(data))  # deep copy
        mutate(bad)
        path = tmp_path / "bad.yaml"
        path.write_text(yaml.safe_dump(bad))
        with pytest.raises(CodecConfigError, match=fragment):
            CodecConfig.from_yaml(path)
        with pytest.raises(CodecCheckpointError, match=fragment):
            load_codec(tiny_sd, path)
    # A config written back by to_yaml reads back identical.
    path = tmp_path / "same.yaml"
    tiny_cfg.to_yaml(path)
    assert CodecConfig.from_yaml(path) == tiny_cfg


def test_cli_make_random_codec(tmp_path, reference_dir, capsys):
    out = tmp_path / "ckpt" / "codec.pkl"
    code = sg2_main(
        [
            "make-random-codec",
            "--config",
            str(reference_dir / "codec_tiny_config.yaml"),
            "--out",
            str(out),
            "--seed",
            "3",
        ]
    )
    assert code == 0
    assert "wrote" in capsys.readouterr().out
    config_out = out.with_name("codec_config.yaml")
    codec = load_codec(out, config_out)
    assert torch.equal(load_state_dict_file(out)["mel_transform.window"], torch.hann_window(1024))
    wav = golden(reference_dir)["wav1"].view(1, 1, -1)
    assert codec.encode(wav).shape == (3, 1, 20)
