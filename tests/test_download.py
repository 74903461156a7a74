"""`sg2 download` asks the hub for the released repositories and lays them out as the config expects.

The Hugging Face hub and GitHub are boundaries we do not own (and cannot reach from CI), so they are
replaced by local stand-ins that record what was asked.
"""

from __future__ import annotations

import io

import pytest

from agent import download
from agent.cli import main


class _Response(io.BytesIO):
    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def test_download_fetches_both_repos_and_the_greetings(tmp_path, monkeypatch, capsys) -> None:
    calls = []

    def fake_snapshot(repo_id, revision, local_dir):
        calls.append((repo_id, revision, local_dir))

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    monkeypatch.setattr(download.urllib.request, "urlopen", lambda url, timeout: _Response(b'{"text": []}\n'))
    assert main(["download", "--dest", str(tmp_path), "--revision", "main"]) == 0
    assert calls == [
        ("fnlp/SpeechGPT-2.0-preview-Codec", "main", str(tmp_path / "SpeechGPT-2.0-preview-Codec")),
        ("fnlp/SpeechGPT-2.0-preview-7B", "main", str(tmp_path / "SpeechGPT-2.0-preview-7B")),
    ]
    assert (tmp_path / "greetings.jsonl").read_bytes() == b'{"text": []}\n'
    out = capsys.readouterr().out
    assert f"codec_checkpoint: {tmp_path / 'SpeechGPT-2.0-preview-Codec' / 'sg2_codec_ckpt.pkl'}" in out


def test_download_failure_is_reported_with_a_retry_hint(tmp_path, monkeypatch, capsys) -> None:
    import huggingface_hub

    def offline(**kw):
        raise OSError("network unreachable")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    assert main(["download", "--dest", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "network unreachable" in err and "re-run to resume" in err


@pytest.mark.parametrize("flag", ["--help"])
def test_download_help(flag, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["download", flag])
    assert exc.value.code == 0 and "--dest" in capsys.readouterr().out
