"""The normkit command line."""

from __future__ import annotations

import subprocess
import sys

from normkit import cli


def test_help_lists_subcommands():
    out = subprocess.run([sys.executable, "-m", "normkit.cli", "--help"], capture_output=True, text=True, check=True)
    for name in ("info", "demo"):
        assert name in out.stdout


def test_info(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "torch" in out and "backend reference  available" in out and "threads" in out


def test_demo_runs_one_epoch(capsys):
    assert cli.main(["demo", "--epochs", "1"]) == 0
    out = capsys.readouterr().out
    assert "with BatchNorm2d" in out and "without BatchNorm2d" in out
