"""effiseg-run end to end: outputs, layout, summaries, folder rules, kill safety and --resume."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import default_cpu_backend, export_tiny, fast_precision_of_gpu0
from PIL import Image

pytest.importorskip("onnxruntime")

from effiseg.runtime import cli as run_cli  # noqa: E402
from effiseg.runtime.cli import run_command  # noqa: E402
from effiseg.runtime.images import TEMP_SUFFIX, png_is_complete  # noqa: E402


def _make_images(folder, n, size=(40, 48), seed=0, ext="png"):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        small = rng.integers(0, 256, (5, 6, 3), dtype=np.uint8)
        Image.fromarray(small).resize((size[1] + i % 5, size[0] + i % 3), Image.BILINEAR).save(folder / f"{i}.{ext}")


def _run(*args):
    return CliRunner().invoke(run_command, [str(a) for a in args] + ["--no-progress"])


def test_end_to_end_default_output_summary_and_overlay(tiny_onnx, tmp_path):
    src = tmp_path / "frames"
    _make_images(src, 5)
    result = _run("--input", src, "--model", tiny_onnx, "--batch", 2, "--overlay", "--workers", 2)
    assert result.exit_code == 0, result.output
    out = tmp_path / "frames_masks"  # the documented default: a sibling named <input>_masks
    for i in range(5):
        image = Image.open(src / f"{i}.png")
        mask = Image.open(out / f"{i}.png")
        assert mask.mode == "L" and mask.size == image.size
        assert set(np.unique(np.asarray(mask))) <= {0, 255}
        overlay = Image.open(out / "overlays" / f"{i}.jpg")
        assert overlay.size == image.size
    rows = list(csv.DictReader(open(out / "effiseg_summary.csv", newline="")))
    assert [r["file"] for r in rows] == [f"{i}.png" for i in range(5)]
    assert all(r["status"] == "ok" and r["error"] == "" for r in rows)
    assert all(0 <= float(r["area_fraction"]) <= 1 for r in rows)
    assert all(r["regions"] == "" for r in rows)  # counted only when asked (--regions): it costs host time
    summary = json.loads((out / "effiseg_summary.json").read_text())
    assert (summary["backend"], summary["precision"]) == default_cpu_backend() and summary["devices"] == ["cpu"]
    assert summary["n_ok"] == 5 and summary["n_failed"] == 0
    assert summary["images_per_s"] > 0 and summary["batch"] == 2
    assert {"decode_s", "wait_for_slot_s", "infer_s", "write_s"} <= set(summary["timing"])
    assert "5 image(s): 5 ok, 0 failed" in result.output


def test_an_empty_folder_is_not_an_error(tiny_onnx, tmp_path):
    src = tmp_path / "empty"
    src.mkdir()
    (src / "notes.txt").write_text("not an image")
    result = _run("--input", src, "--output", tmp_path / "out", "--model", tiny_onnx)
    assert result.exit_code == 0, result.output
    assert "no image files" in result.output and "(add --recursive for sub-folders)" in result.output
    summary = json.loads((tmp_path / "out" / "effiseg_summary.json").read_text())
    assert summary["n_images"] == 0 and summary["files"] == []


def test_recursive_mirrors_folders_and_separates_name_collisions(tiny_onnx, tmp_path):
    src = tmp_path / "in"
    _make_images(src / "a" / "b", 2)
    _make_images(src, 1)
    Image.open(src / "0.png").convert("RGB").save(src / "0.jpg")  # 0.jpg and 0.png: same mask name
    flat = _run("--input", src, "--output", tmp_path / "flat", "--model", tiny_onnx)
    assert flat.exit_code == 0, flat.output
    assert sorted(p.name for p in (tmp_path / "flat").glob("*.png")) == ["0.jpg.png", "0.png.png"]
    assert not (tmp_path / "flat" / "a").exists()
    deep = _run("--input", src, "--output", tmp_path / "deep", "--model", tiny_onnx, "--recursive")
    assert deep.exit_code == 0, deep.output
    assert (tmp_path / "deep" / "a" / "b" / "0.png").is_file() and (tmp_path / "deep" / "a" / "b" / "1.png").is_file()
    summary = json.loads((tmp_path / "deep" / "effiseg_summary.json").read_text())
    assert [r["file"] for r in summary["files"]] == ["0.jpg", "0.png", "a/b/0.png", "a/b/1.png"]


def test_folder_rules_and_startup_errors(tiny_onnx, tmp_path, monkeypatch):
    src = tmp_path / "in"
    _make_images(src, 1)
    same = _run("--input", src, "--output", src, "--model", tiny_onnx)
    assert same.exit_code == 3 and "may not be the input folder" in same.output
    inside = _run("--input", src, "--output", src / "masks", "--model", tiny_onnx, "--recursive")
    assert inside.exit_code == 3 and "inside the input folder" in inside.output
    ok_inside = _run("--input", src, "--output", src / "masks", "--model", tiny_onnx)  # not recursive: fine
    assert ok_inside.exit_code == 0, ok_inside.output
    missing_input = _run("--input", tmp_path / "nope", "--model", tiny_onnx)
    assert missing_input.exit_code == 3 and "input folder not found" in missing_input.output
    a_file = _run("--input", tiny_onnx, "--model", tiny_onnx)
    assert a_file.exit_code == 3 and f"{tiny_onnx} is a file" in a_file.output
    monkeypatch.setattr(run_cli, "DEFAULT_MODEL", tmp_path / "models" / "effisegnet-default.onnx")
    no_model = _run("--input", src, "--output", tmp_path / "o")
    assert no_model.exit_code == 3 and "bundled model" in no_model.output and "--model" in no_model.output
    bad_device = _run("--input", src, "--output", tmp_path / "o", "--model", tiny_onnx, "--devices", "tpu")
    assert bad_device.exit_code == 2 and "unknown device" in bad_device.output  # a usage error
    not_onnx = tmp_path / "model.onnx"
    not_onnx.write_bytes(b"garbage")
    bad_model = _run("--input", src, "--output", tmp_path / "o", "--model", not_onnx)
    assert bad_model.exit_code == 3 and "model.onnx" in bad_model.output


def test_threshold_rules_for_mask_models(tiny_checkpoint, verify_images_dir, tmp_path):
    mask_model = export_tiny(tiny_checkpoint, tmp_path / "mask.onnx", verify_images_dir, output_format="mask")
    src = tmp_path / "in"
    _make_images(src, 3)
    refused = _run("--input", src, "--output", tmp_path / "o1", "--model", mask_model, "--threshold", 0.3)
    assert refused.exit_code == 3 and "baked" not in refused.output and "threshold" in refused.output
    ok = _run("--input", src, "--output", tmp_path / "o2", "--model", mask_model)
    assert ok.exit_code == 0, ok.output
    summary = json.loads((tmp_path / "o2" / "effiseg_summary.json").read_text())
    assert all(r["max_probability"] is None for r in summary["files"])  # masks carry no probability


def test_torch_backend_from_checkpoint(tiny_checkpoint, tiny_onnx, tmp_path):
    pytest.importorskip("torch")
    src = tmp_path / "in"
    _make_images(src, 3)
    result = _run("--input", src, "--output", tmp_path / "t", "--model", tiny_checkpoint, "--backend", "torch",
                  "--devices", "cpu")
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "t" / "effiseg_summary.json").read_text())
    assert summary["backend"] == "torch" and summary["precision"] == "fp32"
    onnx_run = _run("--input", src, "--output", tmp_path / "o", "--model", tiny_onnx, "--backend", "onnxruntime")
    assert onnx_run.exit_code == 0
    for i in range(3):
        a = np.asarray(Image.open(tmp_path / "t" / f"{i}.png"))
        b = np.asarray(Image.open(tmp_path / "o" / f"{i}.png"))
        assert (a == b).mean() > 0.999
    wrong = _run("--input", src, "--output", tmp_path / "w", "--model", tiny_checkpoint, "--backend", "onnxruntime")
    assert wrong.exit_code == 3 and "torch backend" in wrong.output


# A CLI run whose renames are slowed down so that it can be killed with work in flight, including
# complete temporary files that were not yet renamed into place.
KILL_SCRIPT = textwrap.dedent("""
    import os, sys, time
    real_replace = os.replace
    def slow_replace(src, dst):
        time.sleep(0.04)
        real_replace(src, dst)
    os.replace = slow_replace
    from effiseg.runtime.cli import run_command
    run_command(sys.argv[1:])
""")


def test_killed_run_leaves_no_partial_masks_and_resume_completes(tiny_onnx, tmp_path):
    src, out, fresh = tmp_path / "in", tmp_path / "out", tmp_path / "fresh"
    n = 40
    _make_images(src, n, size=(120, 150))
    script = tmp_path / "slow_cli.py"
    script.write_text(KILL_SCRIPT)
    args = ["--input", str(src), "--output", str(out), "--model", str(tiny_onnx), "--batch", "4",
            "--workers", "2", "--no-progress", "--overlay"]
    proc = subprocess.Popen([sys.executable, str(script), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            if out.is_dir() and len(list(out.glob("*.png"))) >= 3:
                break
            time.sleep(0.01)
        proc.kill()  # SIGKILL on POSIX, TerminateProcess on Windows: no cleanup code runs
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    masks = list(out.glob("*.png"))
    assert 3 <= len(masks) < n, "the run should have been killed part-way"
    for m in masks:  # every mask present is a whole PNG
        assert png_is_complete(m)
        with Image.open(m) as im:
            im.load()
            assert im.size == Image.open(src / m.name).size
    leftovers = [p for p in out.rglob("*") if p.is_file() and p.suffix not in (".png", ".jpg")
                 and p.name not in ("effiseg_journal.jsonl", "effiseg_run_settings.json", "effiseg_run.lock")]
    assert all(p.name.endswith(TEMP_SUFFIX) for p in leftovers), leftovers
    for p in (out / "overlays").glob("*.jpg"):
        with Image.open(p) as im:
            im.load()

    done_before = {m.name for m in masks}
    resumed = _run(*args[:-1], "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert "took over the lock" in resumed.output  # the killed run's lock, freed by the system
    assert not list(out.rglob(f"*{TEMP_SUFFIX}"))
    summary = json.loads((out / "effiseg_summary.json").read_text())
    assert summary["n_images"] == n and summary["n_failed"] == 0
    assert summary["n_skipped"] == len(done_before) and summary["n_ok"] == n - len(done_before)
    skipped = {r["mask"] for r in summary["files"] if r["status"] == "skipped"}
    assert skipped == done_before
    # The journal restores the statistics of images finished before the kill.
    assert all(r["area_fraction"] is not None for r in summary["files"])

    full = _run("--input", src, "--output", fresh, "--model", tiny_onnx, "--batch", "3")
    assert full.exit_code == 0
    for i in range(n):
        assert np.array_equal(np.asarray(Image.open(out / f"{i}.png")), np.asarray(Image.open(fresh / f"{i}.png")))


@pytest.mark.skipif(os.name == "nt", reason="POSIX signals (Windows delivers Ctrl-C to a console group)")
def test_ctrl_c_exits_130_with_every_mask_complete_and_resume_finishes(tiny_onnx, tmp_path):
    import signal
    src, out = tmp_path / "in", tmp_path / "out"
    n = 40
    _make_images(src, n, size=(120, 150))
    script = tmp_path / "slow_cli.py"
    script.write_text(KILL_SCRIPT)
    args = ["--input", str(src), "--output", str(out), "--model", str(tiny_onnx), "--batch", "4", "--no-progress",
            "--backend", "onnxruntime"]
    proc = subprocess.Popen([sys.executable, str(script), *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None and len(list(out.glob("*.png"))) < 3:
            time.sleep(0.01)
        proc.send_signal(signal.SIGINT)  # what Ctrl-C in a terminal sends
        output, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, output
    assert "--resume" in output and "Traceback" not in output
    masks = list(out.glob("*.png"))
    assert 3 <= len(masks) < n and all(png_is_complete(m) for m in masks)
    resumed = _run(*args, "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert "took over the lock" not in resumed.output  # the interrupted run released it
    assert len(list(out.glob("*.png"))) == n


def test_resume_redoes_incomplete_and_failed_files(tiny_onnx, tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    _make_images(src, 4)
    (src / "4.png").write_bytes(b"")
    assert _run("--input", src, "--output", out, "--model", tiny_onnx).exit_code == 1
    (out / "0.png").write_bytes((out / "0.png").read_bytes()[:30])  # a mask cut short (e.g. a full disk)
    (out / (".1.png.123-0" + TEMP_SUFFIX)).write_bytes(b"stale")
    Image.open(src / "1.png").save(src / "4.png")  # the broken input has been fixed
    again = _run("--input", src, "--output", out, "--model", tiny_onnx, "--resume")
    assert again.exit_code == 0, again.output
    summary = json.loads((out / "effiseg_summary.json").read_text())
    status = {r["file"]: r["status"] for r in summary["files"]}
    assert status == {"0.png": "ok", "1.png": "skipped", "2.png": "skipped", "3.png": "skipped", "4.png": "ok"}
    assert png_is_complete(out / "0.png") and not list(out.glob(f"*{TEMP_SUFFIX}"))
    assert "removed 1 temporary file" in again.output


def test_a_backend_that_fails_part_way_stops_the_run_with_its_own_status_and_resume_finishes(
        tiny_onnx, tmp_path, monkeypatch):
    """A device lost mid-run is not a bad input file: after three failed batches in a row the run
    stops with exit 4 (not 1, and without marking every remaining file failed), the masks already
    written stay, and --resume completes the folder."""
    from effiseg.runtime.segmenter import Segmenter
    src, out = tmp_path / "in", tmp_path / "out"
    _make_images(src, 12)
    real_from_model = Segmenter.from_model.__func__

    def failing_from_model(cls, *args, **kwargs):
        segmenter = real_from_model(cls, *args, **kwargs)
        backend = segmenter.backends[0]
        real_submit, calls = backend.submit, []

        def submit(slot, n):
            calls.append(n)
            if len(calls) > 2:
                raise RuntimeError("CUDA error: device lost (simulated)")
            return real_submit(slot, n)
        backend.submit = submit
        return segmenter

    monkeypatch.setattr(Segmenter, "from_model", classmethod(failing_from_model))
    args = ["--input", src, "--output", out, "--model", tiny_onnx, "--batch", 2, "--slots", 1]
    out.mkdir()
    (out / "effiseg_summary.json").write_text('{"n_ok": 999}')  # from an earlier run into this folder
    stopped = _run(*args)
    assert stopped.exit_code == run_cli.EXIT_RUN_STOPPED == 4, stopped.output
    assert not (out / "effiseg_summary.json").exists()  # it would contradict what this run did
    assert "failed 3 batches in a row" in stopped.output and "device lost (simulated)" in stopped.output
    assert "--resume" in stopped.output
    written = sorted(out.glob("*.png"))
    assert 1 <= len(written) <= 4  # two batches of two went through before the failure
    assert all(png_is_complete(m) for m in written)
    monkeypatch.undo()
    resumed = _run(*args, "--resume")
    assert resumed.exit_code == 0, resumed.output
    summary = json.loads((out / "effiseg_summary.json").read_text())
    assert summary["n_ok"] + summary["n_skipped"] == 12 and summary["n_failed"] == 0
    assert summary["n_skipped"] == len(written)


@pytest.mark.gpu
def test_cli_torch_fp16_on_cuda_reports_precision_and_timing(tiny_checkpoint, tmp_path):
    src = tmp_path / "in"
    _make_images(src, 10, size=(90, 120))
    result = _run("--input", src, "--output", tmp_path / "o", "--model", tiny_checkpoint, "--backend", "torch",
                  "--precision", "fp16", "--devices", "0", "--batch", "4")
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "o" / "effiseg_summary.json").read_text())
    assert summary["backend"] == "torch" and summary["devices"] == ["cuda:0"]
    assert summary["precision"] == fast_precision_of_gpu0()  # fp32 on a Maxwell GPU, with a warning
    assert summary["backends"][0]["cuda_graphs"] is True
    assert summary["n_ok"] == 10 and summary["timing"]["batches"] == 3


def test_an_unwritable_output_is_refused_before_the_model_loads(tmp_path, monkeypatch):
    import tempfile

    from effiseg.runtime import folder as folder_module
    src = tmp_path / "in"
    _make_images(src, 1)
    locked = tmp_path / "locked"
    locked.mkdir()
    # Root (CI) may write anywhere, so creating a file in that one folder is made to fail as a
    # read-only folder makes it fail.
    real = tempfile.TemporaryFile

    def refuse(*args, dir=None, **kwargs):
        if dir is not None and Path(dir) == locked.resolve():
            raise PermissionError(13, "Permission denied")
        return real(*args, dir=dir, **kwargs)
    monkeypatch.setattr(folder_module.tempfile, "TemporaryFile", refuse)
    result = _run("--input", src, "--output", locked, "--model", tmp_path / "missing.onnx")
    # Refused for the folder, not for the (missing) model: the folder check comes first.
    assert result.exit_code == 3 and f"{locked.resolve()} is not writable (Permission denied)" in result.output
    # A folder that takes no file may still take a folder (Windows' C:\ for a user): the missing
    # output folder is created to be probed, and removed again when the run cannot start.
    result = _run("--input", src, "--output", locked / "masks", "--model", tmp_path / "missing.onnx")
    assert result.exit_code == 3 and "model not found" in result.output and not (locked / "masks").exists()
    # ... and a folder that takes neither is refused, naming the folder that could not be created.
    real_mkdir = Path.mkdir

    def refuse_mkdir(self, *args, **kwargs):
        if self.parent == locked.resolve():
            raise PermissionError(13, "Permission denied")
        return real_mkdir(self, *args, **kwargs)
    monkeypatch.setattr(Path, "mkdir", refuse_mkdir)
    result = _run("--input", src, "--output", locked / "masks" / "deeper", "--model", tmp_path / "missing.onnx")
    assert result.exit_code == 3 and f"cannot create {(locked / 'masks').resolve()} (Permission denied)" in result.output
    monkeypatch.setattr(Path, "mkdir", real_mkdir)
    a_file = tmp_path / "a.txt"
    a_file.write_text("x")
    result = _run("--input", src, "--output", a_file / "masks", "--model", tmp_path / "missing.onnx")
    assert result.exit_code == 3 and f"{a_file.resolve()} is a file" in result.output


def test_a_drive_root_input_needs_an_output_folder(tmp_path, monkeypatch):
    """E:\\ (a card reader) or / has no sibling for the default INPUT_masks: a clear refusal, not a
    traceback. Simulated with the filesystem root, which the run never writes to."""
    from effiseg.runtime import folder as folder_module
    root = Path(tmp_path.anchor)
    with pytest.raises(folder_module.FolderError, match="root of a drive or share: name the mask folder"):
        folder_module.default_output_dir(root)
    result = _run("--input", root, "--model", tmp_path / "missing.onnx")
    assert result.exit_code == 3 and "--output" in result.output and "Traceback" not in result.output


def test_a_summary_csv_held_open_is_handled_before_and_after_the_run(tiny_onnx, tmp_path, monkeypatch):
    """Windows: a summary CSV open in Excel can be neither deleted nor replaced. Left by an earlier
    run, it stops the new run before any work, saying what to do (exit 3); opened during the run,
    it costs only the CSV: the masks and the JSON (same rows) are written and the run succeeds."""
    from effiseg.runtime import replace_file

    src = tmp_path / "frames"
    _make_images(src, 3)
    out = tmp_path / "masks"
    real_unlink, real_replace = Path.unlink, os.replace

    def excel_holds_unlink(self, *args, **kwargs):
        if self.name == "effiseg_summary.csv":
            raise PermissionError(13, "The process cannot access the file", str(self))
        return real_unlink(self, *args, **kwargs)
    monkeypatch.setattr(Path, "unlink", excel_holds_unlink)
    result = _run("--input", src, "--output", out, "--model", tiny_onnx)
    assert result.exit_code == 3 and "effiseg_summary.csv" in result.output and "close it" in result.output
    assert not list(out.glob("*.png"))
    monkeypatch.setattr(Path, "unlink", real_unlink)

    def excel_holds_replace(src_path, dst_path):
        if Path(dst_path).name == "effiseg_summary.csv":
            raise PermissionError(13, "The process cannot access the file", str(src_path), None, str(dst_path))
        return real_replace(src_path, dst_path)
    monkeypatch.setattr(os, "replace", excel_holds_replace)
    monkeypatch.setattr(replace_file.time, "sleep", lambda s: None)
    result = _run("--input", src, "--output", out, "--model", tiny_onnx)
    assert result.exit_code == 0, result.output
    assert "could not write" in result.output and "effiseg_summary.json has the same rows" in result.output
    assert json.loads((out / "effiseg_summary.json").read_text())["n_ok"] == 3
    assert sorted(p.name for p in out.glob("*.png")) == ["0.png", "1.png", "2.png"]


def test_a_folder_this_user_may_not_read_is_a_folder_error(tmp_path, monkeypatch):
    """Checking a folder can itself be refused (is_dir() raises PermissionError on Python 3.11 for
    a path under a folder the user may not list): exit 3 (bad folders), naming it."""
    src = tmp_path / "private" / "frames"
    real_is_dir = Path.is_dir

    def refused(self):
        if "private" in self.parts:
            raise PermissionError(13, "Permission denied", str(self))
        return real_is_dir(self)
    monkeypatch.setattr(Path, "is_dir", refused)
    result = _run("--input", src, "--model", tmp_path / "missing.onnx")
    assert result.exit_code == 3 and f"cannot use {src}: Permission denied" in result.output


def test_a_write_that_fails_once_masks_exist_is_a_stopped_run_not_a_failed_start(tiny_onnx, tmp_path, monkeypatch):
    """A full disk at the summary: the masks are there and --resume finishes; exit 4, not 3."""
    from effiseg.runtime import folder
    src, out = tmp_path / "in", tmp_path / "out"
    _make_images(src, 3)
    real = folder._write_json

    def write_json(path, obj):
        if path.name.startswith(folder.SUMMARY_STEM):
            raise OSError(28, "No space left on device", str(path))
        real(path, obj)
    monkeypatch.setattr(folder, "_write_json", write_json)
    result = _run("--input", src, "--output", out, "--model", tiny_onnx)
    assert result.exit_code == 4, result.output
    assert "summary could not be written" in result.output and "--resume" in result.output
    assert len(list(out.glob("*.png"))) == 3
    monkeypatch.setattr(folder, "_write_json", real)
    again = _run("--input", src, "--output", out, "--model", tiny_onnx, "--resume")
    assert again.exit_code == 0 and "3 skipped" in again.output, again.output


@pytest.mark.parametrize("devices", ["foo", "0,0", "cpu,0"])
def test_a_device_list_that_cannot_be_parsed_is_a_usage_error(tmp_path, devices):
    src = tmp_path / "in"
    _make_images(src, 1)
    result = _run("--input", src, "--devices", devices)
    assert result.exit_code == 2 and "--devices" in result.output, result.output


def test_regions_are_counted_when_asked_and_match_the_written_masks(tmp_path, tiny_onnx):
    from effiseg.runtime.postprocess import count_regions
    src = tmp_path / "frames"
    _make_images(src, 4)
    out = tmp_path / "counted"
    result = _run("--input", src, "--output", out, "--model", tiny_onnx, "--batch", 2, "--regions")
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(open(out / "effiseg_summary.csv", newline="")))
    assert len(rows) == 4
    for r in rows:
        mask = np.asarray(Image.open(out / r["mask"])) > 127
        assert int(r["regions"]) == count_regions(mask)
    summary = json.loads((out / "effiseg_summary.json").read_text())
    assert summary["regions"] is True
    assert all(isinstance(row["regions"], int) for row in summary["files"])
