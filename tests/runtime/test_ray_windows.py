"""effiseg-run --ray on Windows, simulated on Linux: a summary CSV open in Excel, object keys that
Windows cannot name (the temporary copy of an input, the mask in a local output folder)."""
import json
import os
from pathlib import Path

import numpy as np
import pytest
from conftest import write_noise_images

pytest.importorskip("ray")
pytest.importorskip("ray.data")

from click.testing import CliRunner  # noqa: E402
from test_ray_job import _in_process_ray  # noqa: E402

from effiseg.runtime import ray_job, ray_store, windows_names  # noqa: E402
from effiseg.runtime.cli import run_command  # noqa: E402
from effiseg.runtime.ray_job import SegmentBatch, run_ray  # noqa: E402
from effiseg.runtime.windows_names import windows_name_problem  # noqa: E402

WINERROR_123 = "The filename, directory name, or volume label syntax is incorrect"


def test_a_summary_csv_open_in_excel_is_said_and_the_run_is_not_stopped(tiny_onnx, tmp_path, monkeypatch):
    src = write_noise_images(tmp_path / "in", 2, shape=(40, 50))
    out = tmp_path / "out"
    out.mkdir()
    held = str(out / "effiseg_summary.csv")  # the earlier run's, open in Excel: Windows refuses to replace it
    real_replace = os.replace

    def replace(src_path, dst, **kw):
        if str(dst) == held:
            raise PermissionError(13, "The process cannot access the file because it is being used by another "
                                      "process", held)
        return real_replace(src_path, dst, **kw)

    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(ray_job, "import_ray", _in_process_ray)
    result = CliRunner().invoke(run_command, ["--input", str(src), "--output", str(out), "--model", str(tiny_onnx),
                                              "--backend", "onnxruntime", "--devices", "cpu", "--ray", "--no-progress"])
    assert result.exit_code == 0, result.output  # every mask is written: not "the Ray run stopped part-way" (4)
    assert f"could not write {held}" in result.output and "Excel" in result.output
    summary = json.loads((out / "effiseg_summary.json").read_text())
    assert summary["n_ok"] == 2 and summary["summary_csv"] is None
    assert sorted(p.name for p in out.glob("*.png")) == ["0.png", "1.png"]


def _windows_refuses_such_names(monkeypatch):
    """Writing a file whose name Windows does not allow fails there with [WinError 123]."""
    real_write_bytes = Path.write_bytes

    def write_bytes(self, data):
        if windows_name_problem(self.name):
            raise OSError(22, WINERROR_123, str(self))
        return real_write_bytes(self, data)

    monkeypatch.setattr(Path, "write_bytes", write_bytes)


def test_an_object_whose_key_windows_cannot_name_is_read_all_the_same(tmp_path, monkeypatch):
    image = write_noise_images(tmp_path / "in", 1, shape=(30, 20), ext="jpg")
    data = (image / "0.jpg").read_bytes()

    class ObjectStore:  # an S3 input: keys may hold ':' (times) or be named like a Windows device
        local = None

        def read(self, rel):
            return data

    _windows_refuses_such_names(monkeypatch)
    reader = SegmentBatch.__new__(SegmentBatch)  # its reading alone: no Segmenter needed
    reader.input, reader.max_pixels = ObjectStore(), 10**6
    for key in ("scans/2026-12-08T10:30:00.jpg", "con.jpg", "what?.jpg"):
        assert reader._read(key).shape == (30, 20, 3), key


def test_masks_that_a_windows_folder_cannot_name_are_per_file_errors_naming_them(tiny_onnx, tmp_path, monkeypatch):
    # A local folder stands in for an object store's keys (on Linux it holds such names).
    src = write_noise_images(tmp_path / "in", 1, shape=(40, 50))
    for name in ("10:30:00.png", "nul.png", "dot./0.png"):
        (src / name).parent.mkdir(exist_ok=True)
        (src / name).write_bytes((src / "0.png").read_bytes())
    real_write_whole = ray_store.write_whole

    def write_whole(path, data):  # Windows: [WinError 123], or a trailing dot dropped (dot./0.png -> dot/0.png)
        if windows_name_problem(Path(path).relative_to(tmp_path / "out").as_posix()):
            raise OSError(22, WINERROR_123, str(path))
        real_write_whole(path, data)

    monkeypatch.setattr(ray_store, "write_whole", write_whole)
    monkeypatch.setattr(windows_names, "ON_WINDOWS", True)
    monkeypatch.setattr(ray_job, "import_ray", _in_process_ray)
    summary = run_ray(src, tmp_path / "out", model=tiny_onnx, backend="onnxruntime", devices="cpu", batch=2,
                      recursive=True)
    rows = {r["file"]: r for r in summary["files"]}
    assert rows["0.png"]["status"] == "ok"
    for name, why in (("10:30:00.png", "':'"), ("nul.png", "device name"), ("dot./0.png", "ends in a dot")):
        assert rows[name]["status"] == "error", name
        assert f"the mask {name} cannot be written to a Windows folder" in rows[name]["error"]
        assert why in rows[name]["error"]
    assert summary["n_processed"] == 1  # refused when planned, before any actor read them
    assert np.isfinite(summary["images_per_s"])
