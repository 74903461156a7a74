"""Loading checkpoint directories: formats, tied heads, clear errors, the 7B layout, random presets."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from agent.cli import main as sg2_main
from sg2_runtime.lm import (
    LMCheckpointError,
    LMConfig,
    SamplingParams,
    TokenizerError,
    expected_shapes,
    load_greetings,
    load_lm,
    preset_config,
    write_random_model_dir,
)
from sg2_runtime.lm.random_model import special_token_ids
from tests.lm_util import single_thread  # noqa: F401

SMALL = {"base": "tiny", "vocab_size": 2048}
REAL_IDS = {
    "<|endoftext|>": 151643,
    "<|im_start|>": 151644,
    "<|im_end|>": 151645,
    "<|sosp|>": 151646,
    "<|eosp|>": 151647,
    "<|empty|>": 151650,
    "<|end_empty|>": 151651,
}


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm_ckpt")
    return {
        "single": write_random_model_dir(root / "single", SMALL, seed=3),
        "sharded": write_random_model_dir(root / "sharded", SMALL, seed=3, shard_max_bytes=150_000),
        "bin": write_random_model_dir(root / "bin", SMALL, seed=3, weights_format="bin"),
        "tied": write_random_model_dir(root / "tied", SMALL, seed=3, include_tied_heads=True),
        "bin_tied": write_random_model_dir(
            root / "bin_tied", SMALL, seed=3, weights_format="bin", include_tied_heads=True
        ),
    }


def fingerprint(lm) -> list:
    sess = lm.open_session(SamplingParams(greedy=True))
    lm.prefill(
        sess, torch.cat([lm.prompt.system_and_greeting(None), lm.prompt.user_text_turn("hello")], dim=1)
    )
    sess.force_next_text = lm.special.sosp
    outs = [lm.step([sess], return_logits=True)[0] for _ in range(4)]
    assert any(o.has_speech for o in outs)
    return [(o.text_id, o.speech.tolist(), o.text_logits) for o in outs]


def copy_dir(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_all_weight_layouts_load_to_the_same_model(dirs):
    sharded = dirs["sharded"]
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    assert not (sharded / "model.safetensors").exists()
    assert "local_transformer_lm_heads.0.weight" in load_file(str(dirs["tied"] / "model.safetensors"))
    ref_lm = load_lm(dirs["single"], max_sessions=1, max_positions=256)
    ref_sd = ref_lm.model.state_dict()
    ref = fingerprint(ref_lm)
    for name in ("sharded", "bin", "tied", "bin_tied"):
        lm = load_lm(dirs[name], max_sessions=1, max_positions=256, progress=name == "sharded")
        sd = lm.model.state_dict()
        assert list(sd) == list(ref_sd), name
        assert all(torch.equal(sd[k], ref_sd[k]) for k in sd), name
        got = fingerprint(lm)
        assert [(t, s) for t, s, _ in got] == [(t, s) for t, s, _ in ref], name
        for (_, _, a), (_, _, b) in zip(got, ref, strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_loaded_heads_are_tied_to_the_speech_embeddings(dirs):
    for name in ("single", "tied"):
        model = load_lm(dirs[name], max_sessions=1, max_positions=16).model
        for head, emb in zip(model.local_transformer_lm_heads, model.speech_embedddings, strict=True):
            assert head.weight is emb.weight


def test_heads_stored_different_from_the_embeddings_are_kept(dirs, tmp_path):
    d = copy_dir(dirs["tied"], tmp_path / "untied")
    sd = load_file(str(d / "model.safetensors"))
    sd["local_transformer_lm_heads.1.weight"] = sd["local_transformer_lm_heads.1.weight"] * 2
    save_file(sd, str(d / "model.safetensors"))
    model = load_lm(d, max_sessions=1, max_positions=16).model
    assert model.local_transformer_lm_heads[0].weight is model.speech_embedddings[0].weight
    assert torch.equal(model.local_transformer_lm_heads[1].weight, 2 * model.speech_embedddings[1].weight)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ("drop", r"missing weights: model\.layers\.1\.mlp\.up_proj\.weight"),
        (
            "reshape",
            r"wrongly shaped weights: hidden_states_downcast\.weight \(checkpoint \[32, 60\], model \[32, 64\]\)",
        ),
        ("extra", r"unexpected weights: model\.layers\.9\.mlp\.up_proj\.weight"),
    ],
)
def test_bad_weights_raise_a_clear_error(dirs, tmp_path, edit, message):
    d = copy_dir(dirs["single"], tmp_path / edit)
    sd = load_file(str(d / "model.safetensors"))
    if edit == "drop":
        del sd["model.layers.1.mlp.up_proj.weight"]
    elif edit == "reshape":
        sd["hidden_states_downcast.weight"] = sd["hidden_states_downcast.weight"][:, :60].contiguous()
    else:
        sd["model.layers.9.mlp.up_proj.weight"] = torch.zeros(2, 2)
    save_file(sd, str(d / "model.safetensors"))
    with pytest.raises(LMCheckpointError, match=message):
        load_lm(d, max_sessions=1, max_positions=16)


def test_missing_shard_and_missing_weights_are_reported(dirs, tmp_path):
    d = copy_dir(dirs["sharded"], tmp_path / "sharded")
    victim = sorted(d.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(LMCheckpointError, match=victim.name):
        load_lm(d, max_sessions=1, max_positions=16)
    e = copy_dir(dirs["single"], tmp_path / "empty")
    (e / "model.safetensors").unlink()
    with pytest.raises(LMCheckpointError, match="no weights"):
        load_lm(e, max_sessions=1, max_positions=16)
    assert issubclass(LMCheckpointError, ValueError)


def test_tokenizer_without_sosp_is_rejected_by_name(dirs, tmp_path):
    d = copy_dir(dirs["single"], tmp_path / "nososp")
    tok = json.loads((d / "tokenizer.json").read_text())
    tok["added_tokens"] = [t for t in tok["added_tokens"] if t["content"] != "<|sosp|>"]
    (d / "tokenizer.json").write_text(json.dumps(tok))
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        cfg = json.loads((d / name).read_text())
        cfg["additional_special_tokens"] = [t for t in cfg["additional_special_tokens"] if t != "<|sosp|>"]
        cfg.get("added_tokens_decoder", {}).pop(str(special_token_ids(2048)["<|sosp|>"]), None)
        (d / name).write_text(json.dumps(cfg))
    with pytest.raises(TokenizerError, match=r"<\|sosp\|>"):
        load_lm(d, max_sessions=1, max_positions=16)


def test_7b_model_on_meta_device_matches_the_expected_state_dict(reference_dir):
    expected = {}
    for line in (reference_dir / "mimo_7b_expected_state_dict.tsv").read_text().splitlines()[1:]:
        key, shape = line.split("\t")[:2]
        expected[key] = tuple(json.loads(shape))
    ours = expected_shapes(preset_config("7b"))
    assert ours == expected
    total = sum(
        torch.Size(s).numel() for k, s in ours.items() if not k.startswith("local_transformer_lm_heads.")
    )
    assert 7.7e9 < total < 7.8e9


def test_config_reads_local_sizes_or_uses_the_reference_defaults(reference_dir, tmp_path):
    tiny = LMConfig.from_dir(reference_dir / "mimo_tiny")
    assert (tiny.local_dim, tiny.local_layers, tiny.local_heads, tiny.local_ffn_dim) == (32, 2, 4, 64)
    assert (tiny.vocab_size, tiny.eos_token_id, tiny.group_size, tiny.n_vq) == (1216, 1201, 3, 3)
    d = tmp_path / "cfg"
    d.mkdir()
    shutil.copy(reference_dir / "mimo_tiny" / "config.json", d / "config.json")
    plain = LMConfig.from_dir(d)
    assert (plain.local_dim, plain.local_layers, plain.local_heads, plain.local_ffn_dim) == (
        1024,
        8,
        16,
        4096,
    )


def test_tiny_random_preset_has_real_vocab_and_special_ids(tmp_path, reference_dir, capsys):
    path = tmp_path / "tiny-random"
    assert sg2_main(["make-random-lm", str(path), "--size", "tiny", "--seed", "1"]) == 0
    assert "<|sosp|>=151646" in capsys.readouterr().out
    lm = load_lm(path, max_sessions=2, max_positions=512)
    assert lm.config.vocab_size == 152064
    vocab = lm.tokenizer.get_vocab()
    assert {name: vocab[name] for name in REAL_IDS} == REAL_IDS
    assert lm.special.eos == 151645 and lm.tokenizer.eos_token == "<|im_end|>"
    text = "你好，SpeechGPT! How are you? 😀"
    ids = lm.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert lm.tokenizer.decode(ids) == text
    # The official greetings' text ids are valid for this vocabulary and build a prompt.
    greetings = load_greetings(reference_dir / "greetings.jsonl", vocab_size=lm.config.vocab_size)
    assert len(greetings) == 24
    sess = lm.open_session(SamplingParams(), seed=3)
    user = torch.randint(0, 1024, (20, 3))
    lm.prefill(
        sess, torch.cat([lm.prompt.system_and_greeting(greetings[0]), lm.prompt.user_speech_turn(user)], 1)
    )
    sess.force_next_text = lm.special.sosp
    outs = [lm.step([sess])[0] for _ in range(3)]
    assert outs[0].in_speech and outs[1].has_speech
    assert (outs[1].speech < 1024).all()
