"""Text files are UTF-8 on every system, and console output never fails a command.

Python opens text files in the locale's encoding unless told (until 3.15): on Windows that is the
ANSI code page (cp1252 and the like), which has no "Δ", so writing the protocol report (ΔDice,
±, —) failed there, and the model card would have been written in cp1252, not the UTF-8 that
GitHub and Hugging Face read. A POSIX process started with the C locale and UTF-8 mode off has
an ASCII locale encoding: the same failure, reproducible here.
"""
from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCE_FOLDERS = ("training", "export", "runtime", "benchmarks")
NOT_FILE_OPENERS = {"Image", "os", "tarfile", "zipfile", "gzip", "webbrowser"}  # X.open(...) that are not Path.open


def _ascii_locale_env() -> dict:
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"}
    env.pop("PYTHONIOENCODING", None)
    return env


def test_the_protocol_report_is_written_in_utf8_under_a_non_utf8_locale(tmp_path):
    script = textwrap.dedent(f"""
        import json, locale, sys
        from pathlib import Path
        sys.path.insert(0, {str(ROOT / "tests" / "training")!r})
        if locale.getpreferredencoding(False).lower().replace("-", "") in ("utf8", "cp65001"):
            sys.exit(77)  # a system whose locale is UTF-8 (e.g. Windows with its UTF-8 option) shows nothing
        from test_protocol_report import _write_eval
        from effiseg.training.protocol_report import build_protocol_report

        out = Path({str(tmp_path)!r})
        ev = out / "evaluations"
        ev.mkdir()
        for seed in (0, 1, 2):
            _write_eval(ev, f"baseline_s{{seed}}", lambda t, th, m: 0.80, lambda t, th, m: 0.80 + 0.001 * seed)
            _write_eval(ev, f"cand_s{{seed}}", lambda t, th, m: 0.85, lambda t, th, m: 0.82 + 0.001 * seed)
        (out / "plan.json").write_text(json.dumps({{"variant": "x", "epochs": 1, "seeds": [0, 1, 2]}}))
        print(build_protocol_report(out, n_boot=200))
    """)
    done = subprocess.run([sys.executable, "-c", script], env=_ascii_locale_env(), capture_output=True,
                          text=True, encoding="utf-8", errors="replace", cwd=tmp_path)
    if done.returncode == 77:
        pytest.skip("this system's locale encoding is UTF-8 even in a C-locale process")
    assert done.returncode == 0, done.stderr
    md = (tmp_path / "PROTOCOL.md").read_bytes().decode("utf-8")  # raises if not UTF-8
    assert "ΔDice" in md and "±" in md
    assert json.loads((tmp_path / "protocol_results.json").read_text(encoding="utf-8"))["winner"]["arm"] == "cand"


def _text_file_calls_without_encoding(path: Path):
    """(line, call) for each open()/Path.open()/read_text()/write_text() in text mode with no encoding=."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call) or "encoding" in {k.arg for k in node.keywords}:
            continue
        f = node.func
        mode_kw = next((k.value for k in node.keywords if k.arg == "mode"), None)
        if isinstance(f, ast.Attribute) and f.attr in ("read_text", "write_text"):
            yield node.lineno, f.attr
            continue
        if isinstance(f, ast.Name) and f.id == "open":
            mode = node.args[1] if len(node.args) > 1 else mode_kw
        elif isinstance(f, ast.Attribute) and f.attr == "open":
            if isinstance(f.value, ast.Name) and f.value.id in NOT_FILE_OPENERS:
                continue
            if node.args and not (isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
                continue  # some other object's open(...) (e.g. a benchmark measurement's open(warmup))
            mode = node.args[0] if node.args else mode_kw
        else:
            continue
        if mode is None or (isinstance(mode, ast.Constant) and "b" not in str(mode.value)):
            yield node.lineno, ast.unparse(node)[:80]


def test_every_text_file_effiseg_reads_or_writes_names_its_encoding():
    """The report test above covers one writer; this keeps the rest from regressing."""
    found = [f"{path.relative_to(ROOT)}:{line}: {call}"
             for folder in SOURCE_FOLDERS for path in sorted((ROOT / folder).rglob("*.py"))
             for line, call in _text_file_calls_without_encoding(path)]
    assert not found, "text files opened without encoding='utf-8':\n" + "\n".join(found)


def test_a_finished_run_survives_a_console_that_cannot_show_its_paths(tiny_onnx, tmp_path):
    """stdout piped in Windows' ANSI code page (cp1252 has no "Δ"): effiseg-run prints the mask and
    summary paths after the work is done. Before, that raised UnicodeEncodeError and a run whose
    every image succeeded exited 1 ("some files failed")."""
    pytest.importorskip("onnxruntime")
    from PIL import Image

    frames = tmp_path / "framesΔ"
    frames.mkdir()
    for i in range(2):
        Image.fromarray(np.full((40, 48, 3), 90 * i, np.uint8)).save(frames / f"{i}.png")
    env = {**os.environ, "PYTHONIOENCODING": "cp1252"}
    env.pop("PYTHONUTF8", None)
    done = subprocess.run([sys.executable, "-m", "effiseg.runtime.cli", "--input", str(frames), "--model",
                           str(tiny_onnx), "--no-progress", "--workers", "1"],
                          env=env, capture_output=True, cwd=tmp_path)
    stdout = done.stdout.decode("cp1252")
    assert done.returncode == 0, stdout + done.stderr.decode("cp1252", errors="replace")
    assert "2 image(s): 2 ok, 0 failed" in stdout
    assert "framesΔ_masks".replace("Δ", "\\u0394") in stdout  # escaped, not fatal
    assert sorted(p.name for p in (tmp_path / "framesΔ_masks").glob("*.png")) == ["0.png", "1.png"]
