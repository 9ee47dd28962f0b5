"""effiseg-bench through its command line: one tiny real CPU run (table, JSON, plot), the time
budget, Ctrl-C, and unreadable end-to-end images. The other topics have their own files:
test_bench_results, _runner, _settings, _models, _machine, _inference_install. No timing assertions."""
from __future__ import annotations

import json
import math

import pytest
from click.testing import CliRunner

from effiseg.benchmarks.cli import bench_command
from effiseg.benchmarks.report import validate_result_file


# -- one tiny real run -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    pytest.importorskip("torch")
    pytest.importorskip("onnxruntime")
    from effiseg.training.checkpoint import model_config, save_checkpoint
    from effiseg.training.model import build_model
    folder = tmp_path_factory.mktemp("ckpt")
    save_checkpoint(folder, build_model("effisegnet-lite0").eval(), model_config("effisegnet-lite0", input_size=64))
    return folder


def test_tiny_cpu_run_writes_table_json_and_plot(tiny_checkpoint, tmp_path):
    out = tmp_path / "out"
    args = ["--checkpoint", str(tiny_checkpoint), "--backends", "ort-cpu,torch-eager", "--batch-sizes", "1,2",
            "--rounds", "1", "--warmup", "1", "--iters", "2", "--mode", "both", "--images", "3",
            "--settle", "0", "--devices", "cpu", "--slots", "3", "--output", str(out),
            "--cache-dir", str(tmp_path / "cache")]
    res = CliRunner().invoke(bench_command, args)
    assert res.exit_code == 0, res.output + repr(res.exception)
    assert {p.name for p in out.iterdir()} >= {"effiseg_bench.json", "effiseg_bench.txt", "effiseg_bench.png"}
    assert (out / "effiseg_bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads((out / "effiseg_bench.json").read_text())
    validate_result_file(data)
    keys = {r["key"] for r in data["results"]}
    for batch in (1, 2):
        assert f"model|torch-eager@cpu|uint8-nhwc|b{batch}|64x64" in keys
        assert f"model|ort-cpu@cpu|uint8-nhwc|b{batch}|64x64" in keys
        assert f"model|ort-cpu@cpu|float32-nchw|b{batch}|64x64" in keys
        assert f"e2e|ort-cpu@cpu|uint8-nhwc|b{batch}|64x64" in keys
        assert f"e2e|torch-eager@cpu|uint8-nhwc|b{batch}|64x64" in keys
    for r in data["results"]:
        assert r["error"] is None, r["error"]
        assert len(r["samples_ms"]) == (1 if r["mode"] == "e2e" else 2)
        assert r["speedup_vs_baseline"] is not None and math.isfinite(r["speedup_vs_baseline"])
        if r["backend"] == "torch-eager":
            assert r["speedup_vs_baseline"] == pytest.approx(1.0)
        if r["mode"] == "e2e":
            assert r["pipeline_efficiency"] is not None and r["images"] == 3
            assert r["pipeline_timing"][0]["images"] == 3
            assert r["slots"] == 3  # the backends were built with the slots asked for
    assert data["settings"]["slots"] == 3
    by_key = {r["key"]: r for r in data["results"]}
    assert by_key["model|ort-cpu@cpu|float32-nchw|b1|64x64"]["bytes_in_per_image"] == 4 * 64 * 64 * 3
    assert by_key["model|ort-cpu@cpu|uint8-nhwc|b1|64x64"]["bytes_in_per_image"] == 64 * 64 * 3
    assert data["machine"]["cpu_model"] and data["machine"]["libraries"]["numpy"]
    assert data["model"]["variant"] == "effisegnet-lite0"
    text = (out / "effiseg_bench.txt").read_text()
    assert "Model-only" in text and "End-to-end" in text and "torch-eager@cpu" in text
    assert "once %" in text
    assert all(t["fill_s"] is not None and t["drain_s"] is not None
               for r in data["results"] if r["mode"] == "e2e" for t in r["pipeline_timing"])


def test_pipeline_breakdown_shows_the_calls_own_time_and_where_fill_and_drain_weigh():
    from effiseg.benchmarks.report import pipeline_table

    def row(batch, fill_s, drain_s):
        timing = {"bench_wall_s": 0.5, "wall_s": 0.49, "decode_s": 0.1, "infer_s": 0.4, "write_s": 0.2,
                  "runner_idle_s": 0.0, "wait_for_slot_s": 0.3, "wait_for_writer_s": 0.05,
                  "fill_s": fill_s, "drain_s": drain_s, "batches": 256 // batch, "images": 256}
        return {"mode": "e2e", "key": f"e2e|x|b{batch}", "batch_size": batch, "pipeline_timing": [timing]}

    light = pipeline_table([row(8, 0.01, 0.01), row(32, 0.02, 0.01)])
    line = next(l for l in light.splitlines() if l.startswith("e2e|x|b8"))
    assert line.split()[1:3] == [f"{500 / 256:.1f}", f"{490 / 256:.1f}"]  # call, then the pipeline's wall
    assert line.split()[-1] == "6"  # (10 ms outside the pipeline + 10 fill + 10 drain) of the 500 ms call
    assert "wr wait" in light and "pays once" not in light
    heavy = pipeline_table([row(8, 0.01, 0.01), row(32, 0.04, 0.03)])
    assert "pays once" in heavy and "e2e|x|b32 16%" in heavy and "b8 6%" not in heavy
    older = row(8, None, None)  # a file from a runtime that did not measure them
    assert pipeline_table([older]).splitlines()[-1].split()[-1] == "-"


def test_time_budget_keeps_the_finished_rounds_and_says_so(tiny_checkpoint, tmp_path):
    out = tmp_path / "out"
    args = ["--checkpoint", str(tiny_checkpoint), "--backends", "ort-cpu", "--batch-sizes", "1",
            "--rounds", "4", "--warmup", "1", "--iters", "2", "--mode", "model", "--input-formats", "uint8",
            "--settle", "0", "--devices", "cpu", "--output", str(out), "--cache-dir", str(tmp_path / "cache"),
            "--time-budget", "0.01", "--no-plot"]
    res = CliRunner().invoke(bench_command, args)  # preparing alone takes longer than 10 ms
    assert res.exit_code == 0, res.output + repr(res.exception)
    data = json.loads((out / "effiseg_bench.json").read_text())
    validate_result_file(data)
    assert data["complete"] is True and data["rounds_completed"] == 1
    assert data["settings"]["time_budget_s"] == 0.01
    assert any("1 of 4 rounds" in n for n in data["notes"])
    by_backend = {r["backend"]: r for r in data["results"]}
    assert set(by_backend) == {"torch-eager", "ort-cpu"}
    # The budget was spent opening the baseline: ONNX Runtime is listed, not opened, and says why.
    assert len(by_backend["torch-eager"]["samples_ms"]) == 2 and by_backend["torch-eager"]["error"] is None
    assert by_backend["ort-cpu"]["samples_ms"] == [] and "time budget" in by_backend["ort-cpu"]["error"]
    assert "not opened" in res.output  # said, and noted in the file; a budget's cut is not a failure (exit 0)
    assert any("1 configuration(s) were not opened" in n and "model|ort-cpu@cpu" in n for n in data["notes"])


def test_ctrl_c_keeps_the_finished_rounds_and_exits_130(tiny_checkpoint, tmp_path, monkeypatch):
    from effiseg.benchmarks import runner
    real_sample, calls = runner.ModelOnly.sample, []

    def sample(self):
        calls.append(1)
        if len(calls) == 7:  # 2 warm-up + 4 round-1 samples, then the first of round 2
            raise KeyboardInterrupt
        return real_sample(self)
    monkeypatch.setattr(runner.ModelOnly, "sample", sample)
    out = tmp_path / "out"
    (out).mkdir()
    (out / "effiseg_bench.png").write_bytes(b"a plot of an earlier run")
    args = ["--checkpoint", str(tiny_checkpoint), "--backends", "ort-cpu", "--batch-sizes", "1", "--rounds", "3",
            "--warmup", "1", "--iters", "2", "--mode", "model", "--input-formats", "uint8", "--settle", "0",
            "--devices", "cpu", "--output", str(out), "--cache-dir", str(tmp_path / "cache")]
    res = CliRunner().invoke(bench_command, args)
    assert res.exit_code == 130, res.output + repr(res.exception)
    assert "1 finished round(s)" in res.output
    data = json.loads((out / "effiseg_bench.json").read_text())
    validate_result_file(data)
    assert data["complete"] is False and data["rounds_completed"] == 1
    assert all(len(r["samples_ms"]) == 2 for r in data["results"])
    assert "1 of 3 rounds" in (out / "effiseg_bench.txt").read_text()
    assert not (out / "effiseg_bench.png").exists()  # the stale plot is gone, not passed off as this run's


# -- unreadable end-to-end images ------------------------------------------------------------------

def _readable_images(folder):
    from conftest import write_noise_images
    return write_noise_images(folder, 2, ext="jpg")  # 0.jpg, 1.jpg


def _images_with_two_broken(folder):
    _readable_images(folder)
    (folder / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a JPEG")
    (folder / "empty.png").write_bytes(b"")
    return folder


def test_unreadable_images_from_a_given_folder_are_named(tmp_path):
    from effiseg.benchmarks.imagesets import prepare_image_folder
    source = _images_with_two_broken(tmp_path / "given")
    with pytest.raises(ValueError) as err:
        prepare_image_folder(tmp_path / "dest", 8, 64, 64, source=source)
    message = str(err.value)
    assert "2 of 4 image files cannot be read" in message
    assert "corrupt.jpg: " in message and "empty.png: empty file (0 bytes)" in message
    assert "0.jpg" not in message and "1.jpg" not in message

    info = prepare_image_folder(tmp_path / "dest_ok", 5, 64, 64, source=_readable_images(tmp_path / "ok"))
    assert info["distinct"] == 2
    assert sorted(p.name for p in (tmp_path / "dest_ok").iterdir()) == [
        "000000_0.jpg", "000001_1.jpg", "000002_0.jpg", "000003_1.jpg", "000004_0.jpg"]


def test_the_cli_stops_on_unreadable_images_naming_them(tiny_checkpoint, tmp_path):
    source = _images_with_two_broken(tmp_path / "given")
    args = ["--checkpoint", str(tiny_checkpoint), "--backends", "ort-cpu", "--mode", "e2e", "--images", "4",
            "--images-from", str(source), "--devices", "cpu", "--output", str(tmp_path / "out"),
            "--cache-dir", str(tmp_path / "cache")]
    res = CliRunner().invoke(bench_command, args)
    assert res.exit_code != 0 and not isinstance(res.exception, ValueError), repr(res.exception)
    assert "corrupt.jpg" in res.output and "empty.png: empty file (0 bytes)" in res.output


def test_a_failed_end_to_end_run_names_its_files():
    from effiseg.benchmarks.e2e import failed_files
    rows = [{"file": f"{i:06d}_img{i}.jpg", "error": "" if i % 2 else f"corrupt or truncated image: #{i}"}
            for i in range(20)]
    text = failed_files({"files": rows})
    assert text.startswith("000000_img0.jpg: corrupt or truncated image: #0; 000002_img2.jpg: ")
    assert "000008_img8.jpg" in text and "000010_img10.jpg" not in text and text.endswith("; and 5 more")
