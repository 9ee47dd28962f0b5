"""What every effiseg command does to the console (runtime/console.py)."""
from __future__ import annotations

import importlib
import os
from importlib import metadata

import click
import pytest
from click.testing import CliRunner

from effiseg.runtime.console import Command, Group


def _console_scripts() -> dict[str, str]:
    """effiseg's console scripts as installed (pyproject.toml's [project.scripts])."""
    scripts = {ep.name: ep.value for ep in metadata.entry_points(group="console_scripts")
               if ep.dist is not None and ep.dist.name == "effiseg"}
    assert scripts, "effiseg is not installed (pip install -e .)"
    return scripts


@pytest.mark.parametrize("script", sorted(_console_scripts()))
def test_every_console_script_is_an_effiseg_command(script):
    module_name, attr = _console_scripts()[script].split(":")
    try:
        command = getattr(importlib.import_module(module_name), attr)
    except ImportError as e:  # e.g. the training commands without torch
        pytest.skip(f"{script}: {e}")
    assert isinstance(command, (Command, Group)), f"{script} is a plain click command"


def test_the_protocol_group_and_its_subcommands_are_effiseg_commands():
    pytest.importorskip("torch")
    from effiseg.training.protocol import main
    assert isinstance(main, Group) and all(isinstance(c, Command) for c in main.commands.values())


def test_a_file_held_open_ends_the_command_with_a_clear_error(tmp_path, monkeypatch):
    """Excel holds an open CSV on Windows: replacing it fails with PermissionError."""
    from effiseg.training.evaluate import write_rows_csv
    from effiseg.runtime import replace_file

    def excel_holds(src, dst):
        raise PermissionError(13, "Access is denied", str(src), None, str(dst))
    monkeypatch.setattr(os, "replace", excel_holds)
    monkeypatch.setattr(replace_file.time, "sleep", lambda s: None)

    @click.command(cls=Command)
    def write_results():
        write_rows_csv(tmp_path / "per_image.csv", [{"file": "1.jpg", "dice": 0.9}])

    result = CliRunner().invoke(write_results, [])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "permission denied" in result.output and "per_image.csv" in result.output
    assert "close it and run the command again" in result.output
    assert not list(tmp_path.iterdir())  # no temporary file left behind
