"""``effiseg-export MODEL.onnx --engine OUT.engine``: a TensorRT engine built once, ahead of time.

A first ``effiseg-run --backend tensorrt`` builds its engine into the per-user cache, which takes
from seconds to minutes per GPU. A deployment that must start at once (or a machine whose users
may not write a cache) builds the engine here, ships ``OUT.engine`` with ``OUT.engine.json`` (what
it was built from and for), and opens it with ``Segmenter.from_onnx(MODEL.onnx, backend="tensorrt",
engine="OUT.engine")``. The engine is valid only for the TensorRT version, GPU model and operating
system it was built on; the backend checks the record and says so.
"""
from __future__ import annotations

from pathlib import Path

import click

PRECISION_CHOICES = ("auto", "fp16", "fp32")


def write_engine(onnx_path: Path, engine_path: Path, precision: str, max_batch: int, slots: int,
                 device: str) -> dict:
    """Build the engine of ``onnx_path`` into ``engine_path`` (and its ``.json`` record); progress
    and decisions go to stderr. Raises what ``build_engine_file`` raises."""
    from effiseg.runtime.backends.tensorrt import BuildSettings, build_engine_file

    settings = BuildSettings(precision=precision, max_batch=max_batch, n_profiles=slots)

    def report(message: str, warning: bool) -> None:
        click.echo(("warning: " if warning else "") + message, err=True)

    click.echo(f"building a TensorRT engine for {onnx_path} on {device} ({precision}, batch 1..{max_batch}, "
               f"{slots} slot(s)) -> {engine_path}", err=True)
    return build_engine_file(onnx_path, engine_path, settings, device=device, report=report)


def build_engine_or_exit(onnx_path: Path, engine_path: Path, precision: str, max_batch: int, slots: int,
                         device: str) -> None:
    """``write_engine`` for the command line: one summary line, exit status 1 on failure with the
    reason (the engine file is then not written or changed)."""
    from effiseg.runtime.backends.base import BackendUnavailable

    try:
        record = write_engine(onnx_path, engine_path, precision, max_batch, slots, device)
    except (BackendUnavailable, RuntimeError, ValueError, OSError) as e:
        click.echo(f"engine build failed; {engine_path} was not written or changed: {e}", err=True)
        raise SystemExit(1)
    click.echo(f"wrote {engine_path} ({record['engine_bytes']:,} bytes, {record['precision']}, TensorRT "
               f"{record['tensorrt_version']}, {record['gpu_name']} {record['compute_capability']}) and "
               f"{engine_path.name}.json in {record['build_seconds']} s", err=True)
