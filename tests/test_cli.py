"""The `sg2` command line is installed and answers."""

from __future__ import annotations

import subprocess
import sys

import sg2_runtime
from agent.cli import main


def test_version_flag_prints_package_version(capsys) -> None:
    try:
        main(["--version"])
    except SystemExit as exc:
        assert exc.code == 0
    assert sg2_runtime.__version__ in capsys.readouterr().out


def test_cli_without_command_prints_help_and_fails() -> None:
    proc = subprocess.run([sys.executable, "-m", "agent.cli"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "usage: sg2" in proc.stdout
