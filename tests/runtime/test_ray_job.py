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
