"""alloc_probe: each glibc setting measured in its own process; no timing assertions."""
import json
import platform
import sys

import pytest
from click.testing import CliRunner

pytest.importorskip("onnxruntime")

from effiseg.benchmarks.lab.alloc_probe import main  # noqa: E402

linux_glibc = pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                                 reason="the probe measures glibc's allocator on Linux")


@linux_glibc
def test_probe_measures_each_setting_in_its_own_process(tiny_checkpoint, tiny_onnx, verify_images_dir, tmp_path):
    out = tmp_path / "probe.json"
    res = CliRunner().invoke(main, ["--checkpoint", str(tiny_checkpoint), "--onnx", str(tiny_onnx),
                                    "--images", str(verify_images_dir), "--batch-sizes", "1,2", "--reps", "1",
                                    "--rounds", "1", "--tunables", "", "--tunables", "glibc.malloc.hugetlb=1",
                                    "--output", str(out)])
    assert res.exit_code == 0, res.output
    result = json.loads(out.read_text())
    assert [r["tunables"] for r in result["runs"]] == ["", "glibc.malloc.hugetlb=1"]
    for setting in ("(default)", "glibc.malloc.hugetlb=1"):
        for batch in ("1", "2"):
            entry = result["summary"][setting][batch]
            assert set(entry) == {"torch-eager", "onnxruntime"}
            assert all(m["samples"] == 1 and m["median_minor_faults"] >= 0 for m in entry.values())


def test_a_broken_child_is_reported(tiny_checkpoint, tmp_path):
    empty = tmp_path / "no-images"
    empty.mkdir()
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        res = CliRunner().invoke(main, ["--checkpoint", str(tiny_checkpoint), "--images", str(empty)])
        assert res.exit_code == 1 and "glibc" in res.output
        return
    res = CliRunner().invoke(main, ["--checkpoint", str(tiny_checkpoint), "--images", str(empty), "--rounds", "1",
                                    "--tunables", ""])
    assert res.exit_code == 1 and "the measuring process failed" in res.output and "holds 0 images" in res.output
