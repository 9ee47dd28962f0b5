"""What every effiseg command does to the console (runtime/console.py)."""
from __future__ import annotations

import importlib
import os
import sys
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
    from effiseg.training.result_files import write_rows_csv
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


def test_an_optional_package_this_install_lacks_is_named_with_its_extra(monkeypatch):
    pytest.importorskip("onnxruntime")
    monkeypatch.setitem(sys.modules, "scipy", None)  # as if not installed: find_spec answers None

    @click.command(cls=Command)
    def needs_scipy():
        raise ModuleNotFoundError("No module named 'scipy'", name="scipy")

    @click.command(cls=Command)
    def broken_import():
        raise ModuleNotFoundError("No module named 'leftpad'", name="leftpad")

    @click.command(cls=Command)
    def broken_onnxruntime_install():  # installed, but a part of it is missing: not "not installed"
        raise ModuleNotFoundError("No module named 'onnxruntime.capi.gone'", name="onnxruntime.capi.gone")

    result = CliRunner().invoke(needs_scipy, [], prog_name="effiseg-analyze")
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "effiseg-analyze needs scipy" in result.output and 'pip install "effiseg[train]"' in result.output
    # A module effiseg does not install as an extra, or a broken installed one, is a bug to see whole.
    for command in (broken_import, broken_onnxruntime_install):
        result = CliRunner().invoke(command, [])
        assert isinstance(result.exception, ModuleNotFoundError)


INFERENCE_INSTALL_COMMANDS = """
from effiseg.training.cli import score_command, train_command
command = {"score": score_command, "train": train_command}[sys.argv[1]]
command.main(sys.argv[2:], prog_name="effiseg-" + sys.argv[1])
"""


def test_an_inference_install_scores_masks_and_names_the_extra_for_training(tmp_path):
    """effiseg-run then effiseg-score needs no torch; effiseg-train says what to install."""
    import numpy as np
    from PIL import Image

    from conftest import run_as_inference_install
    root, pred = tmp_path / "data", tmp_path / "pred"
    for folder in (root / "images", root / "masks", pred):
        folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for stem in ("1", "2"):
        mask = np.zeros((40, 50), np.uint8)
        mask[10:30, 5 + int(stem) * 10:25 + int(stem) * 10] = 255
        Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(root / "images" / f"{stem}.png")
        Image.fromarray(mask).save(root / "masks" / f"{stem}.png")
        Image.fromarray(mask).save(pred / f"{stem}.png")
    proc = run_as_inference_install(tmp_path, INFERENCE_INSTALL_COMMANDS, "score", str(pred), "--data", str(root),
                                    "--split", "none")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "mean Dice 1.0000" in proc.stdout
    assert (pred / "score-none.json").is_file() and (pred / "score-none.csv").is_file()
    proc = run_as_inference_install(tmp_path, INFERENCE_INSTALL_COMMANDS, "train", "--data", str(root))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stdout + proc.stderr
    assert "effiseg-train needs torch" in proc.stderr and "pip install \"effiseg[train]\"" in proc.stderr
