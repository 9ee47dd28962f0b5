"""Hub models (hf://OWNER/NAME[@REVISION]) in effiseg-run, -eval, -export and -bench, without the network.

The Hugging Face cache is laid out by the test as huggingface_hub lays it out (models--OWNER--NAME/
refs/<branch>, snapshots/<commit>/<file> -> blobs/<hash>), and the commands run in a child process
whose environment points huggingface_hub at it (HF_HUB_CACHE, read when the library is imported) with
HF_HUB_OFFLINE=1, or at a Hub address that refuses connections: the library's own code finds the files.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from conftest import write_noise_images
from PIL import Image

from effiseg.runtime.hub import HubError, HubModel, parse_hub_id, resolve_model

pytest.importorskip("huggingface_hub")
pytest.importorskip("onnxruntime")

COMMANDS = {"run": "effiseg.runtime.cli:run_command", "eval": "effiseg.training.cli:eval_command",
            "export": "effiseg.export.cli:export_command", "bench": "effiseg.benchmarks.cli:bench_command"}
# Runs each command with click's test runner in one child process (one start-up for all of them) and
# prints {name: {"exit_code", "output"}} as JSON; each command runs in its own working folder.
RUNNER = textwrap.dedent("""
    import importlib, json, os, sys
    from click.testing import CliRunner
    jobs, results = json.loads(sys.argv[1]), {}
    for name, (command, cwd, args) in jobs.items():
        module, func = command.split(":")
        os.makedirs(cwd, exist_ok=True)
        os.chdir(cwd)
        res = CliRunner().invoke(getattr(importlib.import_module(module), func), args)
        results[name] = {"exit_code": res.exit_code, "output": res.output}
    print("RESULTS=" + json.dumps(results))
""")


def lay_out_hub_cache(cache: Path, repo_id: str, files: dict[str, Path], branch: str = "main") -> str:
    """``files`` (name in the repository -> local file) as one commit of ``repo_id`` in a Hugging Face
    cache; returns the commit hash."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    digest = hashlib.sha1()
    for name in sorted(files):
        digest.update(name.encode() + b"\0" + Path(files[name]).read_bytes())
    commit = digest.hexdigest()
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / branch).write_text(commit, encoding="ascii")  # no newline: the library reads it as is
    for name, source in files.items():
        data = Path(source).read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = repo / "snapshots" / commit / name
        link.parent.mkdir(parents=True, exist_ok=True)
        try:
            link.symlink_to(Path("../..") / "blobs" / blob.name)
        except OSError:  # Windows without the symlink privilege: the library copies there too
            shutil.copyfile(blob, link)
    return commit


def run_commands(jobs: dict, env: dict, timeout: float = 600) -> dict:
    jobs = {name: (COMMANDS[cmd], str(cwd), [str(a) for a in args]) for name, (cmd, cwd, args) in jobs.items()}
    proc = subprocess.run([sys.executable, "-c", RUNNER, json.dumps(jobs)], env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULTS="))
    return json.loads(line[len("RESULTS="):])


def cache_listing(cache: Path) -> list[str]:
    return sorted(str(p.relative_to(cache)) for p in cache.rglob("*"))


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory, tiny_onnx, tiny_checkpoint):
    """A cache holding me/tiny (checkpoint + ONNX + export report, as effiseg-model-card writes
    them) and me/onnxonly (an ONNX file alone)."""
    cache = tmp_path_factory.mktemp("hf_cache") / "hub"
    files = {"model.onnx": tiny_onnx, "model.onnx.export.json": Path(f"{tiny_onnx}.export.json"),
             "config.json": tiny_checkpoint / "config.json",
             "model.safetensors": tiny_checkpoint / "model.safetensors"}
    readme = tmp_path_factory.mktemp("card") / "README.md"
    readme.write_text("---\nlibrary_name: effiseg\n---\n# tiny\n", encoding="utf-8")
    files["README.md"] = readme
    commit = lay_out_hub_cache(cache, "me/tiny", files)
    lay_out_hub_cache(cache, "me/onnxonly", {"model.onnx": tiny_onnx})
    return cache, commit


def _env(cache: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HUB_CACHE=str(cache), HF_HUB_DISABLE_TELEMETRY="1", **extra)
    return env


@pytest.fixture(scope="module")
def offline_results(hub_cache, tmp_path_factory, verify_images_dir):
    cache, commit = hub_cache
    work = tmp_path_factory.mktemp("hub_work")
    frames = write_noise_images(work / "frames", 3)
    data = work / "data"
    write_noise_images(data / "images", 2, shape=(48, 56))
    (data / "masks").mkdir()
    for i in range(2):
        mask = np.zeros((48, 56), np.uint8)
        mask[10:30, 12:40] = 255
        Image.fromarray(mask).save(data / "masks" / f"{i}.png")
    before = cache_listing(cache)
    run = ["-i", frames, "--no-progress"]
    jobs = {
        # ONNX Runtime by name: it is compared with torch below (auto may take OpenVINO at bf16)
        "run_onnx": ("run", work, run + ["-o", work / "out_onnx", "-m", "hf://me/tiny", "--backend", "onnxruntime"]),
        "run_torch": ("run", work, run + ["-o", work / "out_torch", "-m", "hf://me/tiny", "--backend", "torch"]),
        "run_commit": ("run", work, run + ["-o", work / "out_commit", "-m", f"hf://me/tiny@{commit}",
                                           "--backend", "onnxruntime"]),
        "run_absent": ("run", work, run + ["-o", work / "out_absent", "-m", "hf://me/absent"]),
        "run_no_branch": ("run", work, run + ["-o", work / "out_v2", "-m", "hf://me/tiny@v2"]),
        "run_torch_onnx_only": ("run", work, run + ["-o", work / "out_t", "-m", "hf://me/onnxonly",
                                                    "--backend", "torch"]),
        "run_bad_id": ("run", work, run + ["-o", work / "out_bad", "-m", "hf://tiny"]),
        "eval": ("eval", work / "eval_cwd", ["hf://me/tiny", "--data", data, "--split", "none", "--device", "cpu"]),
        "eval_absent": ("eval", work, ["hf://me/absent", "--data", data, "--split", "none"]),
        "export": ("export", work / "export_cwd", ["hf://me/tiny", "--verify-images", verify_images_dir,
                                                  "--verify-count", "1"]),
        "export_absent": ("export", work, ["hf://me/absent", "-o", work / "absent.onnx"]),
        "bench": ("bench", work, ["--model", "hf://me/tiny", "--checkpoint", "hf://me/tiny", "--backends",
                                  "ort-cpu", "--mode", "model", "--rounds", "1", "--iters", "1", "--warmup",
                                  "1", "--batch-sizes", "1", "--input-formats", "uint8", "--devices", "cpu",
                                  "--threads", "1", "--no-plot", "-o", work / "bench", "--cache-dir",
                                  work / "bench_cache"]),
        "bench_absent": ("bench", work, ["--model", "hf://me/absent", "--backends", "ort-cpu", "--devices",
                                         "cpu", "-o", work / "bench_absent"]),
    }
    results = run_commands(jobs, _env(cache, HF_HUB_OFFLINE="1"))
    return results, work, commit, before, cache_listing(cache)


def _masks(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("*.png"))


def test_hub_ids_parse_and_bad_ones_say_what_is_expected():
    assert parse_hub_id("hf://me/tiny") == HubModel("me/tiny", None)
    assert parse_hub_id("hf://Org-1/seg.v2_x@v1.0") == HubModel("Org-1/seg.v2_x", "v1.0")
    assert str(HubModel("me/tiny", "abc")) == "hf://me/tiny@abc" and HubModel("me/tiny").name == "tiny"
    assert parse_hub_id("runs/best") is None and parse_hub_id(Path("hf:/me/x")) is None
    for bad in ("hf://tiny", "hf://me/tiny/extra", "hf://me/-x", "hf://me/tiny@", "hf://me/tiny@a b"):
        with pytest.raises(ValueError, match="hf://"):
            parse_hub_id(bad)
    assert resolve_model(Path("a/model.onnx"), "onnx") == Path("a/model.onnx")  # a path stays a path


def test_the_runtime_imports_huggingface_hub_only_when_a_hub_id_is_used():
    code = ("import sys, effiseg.runtime.cli, effiseg.runtime.hub as hub; "
            "assert 'huggingface_hub' not in sys.modules, 'imported at start'; "
            "hub.resolve_model('model.onnx', 'onnx'); assert 'huggingface_hub' not in sys.modules")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_without_huggingface_hub_the_error_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import fails as if not installed
    with pytest.raises(HubError, match=r'effiseg\[hub\]'):
        resolve_model("hf://me/tiny", "onnx")


def test_run_uses_the_cached_onnx_file_or_the_checkpoint_for_torch(offline_results):
    results, work, commit, _, _ = offline_results
    for name, backend in (("run_onnx", "onnxruntime"), ("run_torch", "torch"), ("run_commit", "onnxruntime")):
        r = results[name]
        assert r["exit_code"] == 0, r["output"]
        assert f"snapshots/{commit}" in r["output"].replace("\\", "/") and f"backend {backend}" in r["output"]
        assert _masks(work / name.replace("run_", "out_")) == ["0.png", "1.png", "2.png"]
    assert "model.onnx" in results["run_onnx"]["output"]
    # The ONNX file and the checkpoint are the same network: the masks agree.
    for f in ("0.png", "1.png", "2.png"):
        a = np.asarray(Image.open(work / "out_onnx" / f))
        b = np.asarray(Image.open(work / "out_torch" / f))
        assert (a == b).mean() > 0.99


def test_offline_a_model_not_in_the_cache_is_one_line_and_exit_3(offline_results):
    results, work, *_ = offline_results
    for name, words in (("run_absent", "hf://me/absent is not in the Hugging Face cache"),
                        ("run_no_branch", "hf://me/tiny@v2 is not in the Hugging Face cache"),
                        ("run_torch_onnx_only", "hf://me/onnxonly (commit"),
                        ("run_bad_id", "is not a Hub model id")):
        r = results[name]
        assert words in r["output"], r["output"]
        lines = [ln for ln in r["output"].splitlines() if ln.strip()]
        if name == "run_bad_id":  # a malformed id is a usage error, found before anything starts
            assert r["exit_code"] == 2
            continue
        assert r["exit_code"] == 3 and len(lines) == 1, r["output"]
        assert not any((work / name.replace("run_", "out_")).glob("*.png"))
    assert "HF_HUB_OFFLINE=1" in results["run_absent"]["output"]
    assert "no checkpoint" in results["run_torch_onnx_only"]["output"]


def test_eval_export_and_bench_take_hub_ids_and_write_nothing_into_the_cache(offline_results):
    results, work, commit, before, after = offline_results
    r = results["eval"]
    assert r["exit_code"] == 0, r["output"]
    metrics = json.loads((work / "eval_cwd" / "eval-tiny-none" / "metrics.json").read_text())
    assert metrics["checkpoint"] == "hf://me/tiny" and metrics["n_images"] == 2
    assert Path(metrics["hub_snapshot"]).name == commit
    r = results["export"]
    assert r["exit_code"] == 0, r["output"]
    report = json.loads((work / "export_cwd" / "tiny.onnx.export.json").read_text())
    assert report["ok"] and Path(report["checkpoint"]).name == commit
    r = results["bench"]
    assert r["exit_code"] == 0, r["output"]
    bench = json.loads((work / "bench" / "effiseg_bench.json").read_text())
    assert Path(bench["model"]["given_onnx"]).parent.name == commit
    assert Path(bench["model"]["checkpoint"]).name == commit and bench["model"]["trained"]
    for name, code in (("eval_absent", 2), ("export_absent", 1), ("bench_absent", 1)):
        assert results[name]["exit_code"] == code and "is not in the Hugging Face cache" in results[name]["output"]
    assert not (work / "absent.onnx").exists()
    assert after == before  # results went to the working folders, not beside the cached files


def test_an_unreachable_hub_falls_back_to_the_cache(hub_cache, tmp_path):
    """Not offline, but the Hub refuses connections (port 9 on this machine): the cached model runs;
    one that is not cached says so."""
    cache, commit = hub_cache
    frames = write_noise_images(tmp_path / "frames", 2)
    results = run_commands({
        "cached": ("run", tmp_path, ["-i", frames, "-o", tmp_path / "out", "-m", "hf://me/tiny", "--no-progress"]),
        "absent": ("run", tmp_path, ["-i", frames, "-o", tmp_path / "out2", "-m", "hf://me/absent",
                                     "--no-progress"]),
    }, _env(cache, HF_ENDPOINT="http://127.0.0.1:9"))
    assert results["cached"]["exit_code"] == 0, results["cached"]["output"]
    assert _masks(tmp_path / "out") == ["0.png", "1.png"]
    assert results["absent"]["exit_code"] == 3
    assert "could not be reached" in results["absent"]["output"]
