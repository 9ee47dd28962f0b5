"""effiseg-run --ray: the folder job on Ray Data gives the masks of a local run, byte for byte."""
import json

import pytest
from conftest import write_noise_images

ray = pytest.importorskip("ray")
pytest.importorskip("ray.data")

from click.testing import CliRunner  # noqa: E402

from effiseg.runtime.cli import run_command  # noqa: E402
from effiseg.runtime.ray_job import RayJobError, pool_for, run_ray  # noqa: E402
from effiseg.runtime.segmenter import Segmenter  # noqa: E402


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray with 2 CPUs, as CI has: started once for this module, shut down after it."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_pool_size_comes_from_the_cluster_resources():
    assert pool_for({"CPU": 8.0, "GPU": 2.0}, True, 1, None) == (2, {"num_gpus": 1})
    assert pool_for({"CPU": 8.0, "GPU": 2.0}, False, 2, None) == (4, {"num_cpus": 2})
    assert pool_for({"CPU": 2.0}, True, 1, None) == (2, {"num_cpus": 1})
    assert pool_for({"CPU": 2.0}, True, 1, 1) == (1, {"num_cpus": 1})


@pytest.mark.slow
def test_ray_masks_are_a_local_runs_byte_for_byte_with_errors_and_resume(tiny_onnx, tmp_path, local_ray):
    src = write_noise_images(tmp_path / "in", 7, shape=(40, 50))
    write_noise_images(src / "sub", 2, shape=(33, 21), ext="jpg", seed=3)
    (src / "sub" / "broken.png").write_bytes(b"not an image")
    local, on_ray = tmp_path / "local", tmp_path / "ray"
    with Segmenter.from_onnx(tiny_onnx, backend="onnxruntime", max_batch=4) as seg:
        expected = seg.run_folder(src, local, recursive=True)
    summary = run_ray(src, on_ray, model=tiny_onnx, backend="onnxruntime", batch=4, recursive=True)
    masks = sorted(p.relative_to(local).as_posix() for p in local.rglob("*.png"))
    assert len(masks) == 9
    assert sorted(p.relative_to(on_ray).as_posix() for p in on_ray.rglob("*.png")) == masks
    for rel in masks:
        assert (on_ray / rel).read_bytes() == (local / rel).read_bytes(), rel
    rows = {r["file"]: r for r in summary["files"]}
    assert rows["sub/broken.png"]["status"] == "error" and "not a readable image" in rows["sub/broken.png"]["error"]
    assert summary["n_ok"] == 9 and summary["n_failed"] == 1
    for row in expected["files"]:  # the same statistics as the local summary, file for file
        assert {k: rows[row["file"]][k] for k in ("status", "area_fraction", "regions", "max_probability")} == \
               {k: row[k] for k in ("status", "area_fraction", "regions", "max_probability")}
    assert json.loads((on_ray / "effiseg_summary.json").read_text())["n_ok"] == 9

    (on_ray / masks[0]).write_bytes((on_ray / masks[0]).read_bytes()[:30])  # a mask cut short by a kill
    again = run_ray(src, on_ray, model=tiny_onnx, backend="onnxruntime", batch=4, recursive=True, resume=True)
    assert again["n_skipped"] == 8 and again["n_processed"] == 2  # the cut mask and the broken image
    assert (on_ray / masks[0]).read_bytes() == (local / masks[0]).read_bytes()
    with pytest.raises(RayJobError, match="threshold"):
        run_ray(src, on_ray, model=tiny_onnx, backend="onnxruntime", threshold=0.3, recursive=True, resume=True)


@pytest.mark.slow
def test_cli_ray_option(tiny_onnx, tmp_path, local_ray):
    src = write_noise_images(tmp_path / "in", 3)
    # A URI, as for s3:// or gs://: file:// reaches the same pyarrow file system code.
    result = CliRunner().invoke(run_command, ["--input", src.as_uri(), "--output", str(tmp_path / "out"), "--model",
                                              str(tiny_onnx), "--backend", "onnxruntime", "--ray", "--ray-actors", "1",
                                              "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "3 image(s): 3 ok" in result.output
    assert len(list((tmp_path / "out").glob("*.png"))) == 3


class _InProcessDataset:
    """Ray Data's from_items -> map_batches -> iter_rows, run in this process: what the resume rule
    needs (which masks are trusted) without starting Ray."""

    def __init__(self, items):
        self.items = items

    def map_batches(self, cls, batch_size, compute, batch_format, fn_constructor_kwargs, **resources):
        self.fn, self.batch_size = cls(**fn_constructor_kwargs), batch_size
        return self

    def iter_rows(self):
        import numpy as np
        for i in range(0, len(self.items), self.batch_size):
            chunk = self.items[i:i + self.batch_size]
            out = self.fn({k: np.array([c[k] for c in chunk]) for k in chunk[0]})
            for row in out["row"]:
                yield {"row": row}


def _in_process_ray(interrupt_at_start=False):
    import types

    def is_initialized():
        if interrupt_at_start:
            raise KeyboardInterrupt  # Ctrl-C just after the run started (its settings record is written)
        return True

    return types.SimpleNamespace(
        is_initialized=is_initialized, cluster_resources=lambda: {"CPU": 1},
        data=types.SimpleNamespace(from_items=_InProcessDataset, ActorPoolStrategy=lambda size: None))


def test_resume_after_an_interrupted_fresh_run_redoes_the_older_runs_masks(tiny_onnx, tmp_path, monkeypatch):
    from effiseg.runtime import ray_job
    src = write_noise_images(tmp_path / "in", 3, shape=(40, 50))
    out = tmp_path / "out"
    monkeypatch.setattr(ray_job, "import_ray", _in_process_ray)
    first = run_ray(src, out, model=tiny_onnx, backend="onnxruntime", devices="cpu", batch=2, threshold=0.9)
    assert first["n_ok"] == 3
    monkeypatch.setattr(ray_job, "import_ray", lambda: _in_process_ray(interrupt_at_start=True))
    with pytest.raises(KeyboardInterrupt):  # run B, another threshold, stopped before any mask
        run_ray(src, out, model=tiny_onnx, backend="onnxruntime", devices="cpu", batch=2, threshold=0.1)
    monkeypatch.setattr(ray_job, "import_ray", _in_process_ray)
    resumed = run_ray(src, out, model=tiny_onnx, backend="onnxruntime", devices="cpu", batch=2, threshold=0.1,
                      resume=True)
    assert resumed["n_skipped"] == 0 and resumed["n_ok"] == 3  # run A's masks (threshold 0.9) are not kept
    again = run_ray(src, out, model=tiny_onnx, backend="onnxruntime", devices="cpu", batch=2, threshold=0.1,
                    resume=True)
    assert again["n_skipped"] == 3  # run B's own masks are
    with Segmenter.from_onnx(tiny_onnx, backend="onnxruntime", max_batch=2, threshold=0.1) as seg:
        seg.run_folder(src, tmp_path / "local")
    for mask in (tmp_path / "local").glob("*.png"):
        assert (out / mask.name).read_bytes() == mask.read_bytes()


def test_a_local_output_folder_is_locked_and_cleared_of_stale_temporary_files(tiny_onnx, tmp_path, monkeypatch):
    from effiseg.runtime import ray_job
    from effiseg.runtime.folder_lock import FolderLockedError, OutputFolderLock
    from effiseg.runtime.images import TEMP_SUFFIX
    src = write_noise_images(tmp_path / "in", 2, shape=(40, 50))
    out = tmp_path / "out"
    out.mkdir()
    stale = out / f"0.png{TEMP_SUFFIX}"
    stale.write_bytes(b"half a mask")  # left by a killed run
    monkeypatch.setattr(ray_job, "import_ray", _in_process_ray)
    import threading
    taken, done = threading.Event(), threading.Event()

    def another_run():  # another run writing this folder (the lock lets its own thread in again)
        with OutputFolderLock(out):
            taken.set()
            done.wait(30)

    holder = threading.Thread(target=another_run)
    holder.start()
    taken.wait(30)
    try:
        with pytest.raises(FolderLockedError):
            run_ray(src, out, model=tiny_onnx, backend="onnxruntime", devices="cpu", batch=2)
    finally:
        done.set()
        holder.join(30)
    summary = run_ray(src, out, model=tiny_onnx, backend="onnxruntime", devices="cpu", batch=2)
    assert summary["n_ok"] == 2 and not stale.exists()


def test_an_actor_counts_regions_only_when_asked(tiny_onnx, tmp_path):
    # The actor's own call, without Ray: --regions reaches each actor through its constructor.
    from pathlib import Path

    import numpy as np
    from PIL import Image

    from effiseg.runtime.postprocess import count_regions
    from effiseg.runtime.ray_job import SegmentBatch
    src = write_noise_images(tmp_path / "in", 2, shape=(40, 50))
    files = sorted(p.name for p in src.iterdir())
    batch = {"file": np.array(files), "mask": np.array([f"{Path(f).stem}.png" for f in files])}
    for regions in (False, True):
        out = tmp_path / f"out_{regions}"
        out.mkdir()
        actor = SegmentBatch(str(tiny_onnx), str(src), str(out), 10**6, {"workers": 1}, regions=regions)
        try:
            rows = [json.loads(r) for r in actor(batch)["row"]]
        finally:
            actor.segmenter.close()
        assert [r["status"] for r in rows] == ["ok", "ok"]
        for row in rows:
            mask = np.asarray(Image.open(out / row["mask"])) > 127
            assert row["regions"] == (count_regions(mask) if regions else None)
