"""Renames that ride out Windows' short-lived locks (antivirus, indexer, a viewer)."""
from __future__ import annotations

import os

import pytest

from effiseg.runtime import replace_file
from effiseg.runtime.images import atomic_write


def _locked_for(n_attempts: int, monkeypatch):
    """os.replace fails like a locked file on Windows for the first ``n_attempts`` calls."""
    real_replace, calls = os.replace, []

    def replace(src, dst):
        calls.append(dst)
        if len(calls) <= n_attempts:
            raise PermissionError(13, "Access is denied")
        real_replace(src, dst)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(replace_file.time, "sleep", lambda s: None)
    return calls


def test_a_brief_lock_is_waited_out(tmp_path, monkeypatch):
    target = tmp_path / "mask.png"
    target.write_bytes(b"old")
    calls = _locked_for(3, monkeypatch)
    atomic_write(target, lambda f: f.write(b"new"))
    assert target.read_bytes() == b"new" and len(calls) == 4
    assert [p.name for p in tmp_path.iterdir()] == ["mask.png"]  # no temporary file left


def test_a_lasting_lock_is_reported_and_leaves_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "metrics.csv"
    target.write_bytes(b"old")
    calls = _locked_for(1000, monkeypatch)
    with pytest.raises(PermissionError):
        atomic_write(target, lambda f: f.write(b"new"))
    assert target.read_bytes() == b"old" and len(calls) == 10
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.csv"]


def test_other_errors_are_not_retried(tmp_path, monkeypatch):
    calls = []

    def replace(src, dst):
        calls.append(dst)
        raise FileNotFoundError(2, "No such file or directory")
    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(FileNotFoundError):
        replace_file.replace_with_retry(tmp_path / "a", tmp_path / "b")
    assert len(calls) == 1


def test_a_write_past_windows_path_limit_says_so(tmp_path, monkeypatch):
    """Windows without long paths fails such a write with a bare "No such file or directory"; the
    error names the limit and what to do (simulated: the limit is only in force on Windows)."""
    from effiseg.runtime import images

    deep = tmp_path / ("d" * 120) / ("e" * 120) / "mask.png"
    real_open = open

    def windows_open(file, *args, **kwargs):
        if len(str(file)) >= images.WINDOWS_MAX_PATH:
            raise FileNotFoundError(2, "No such file or directory")
        return real_open(file, *args, **kwargs)
    monkeypatch.setattr(images, "open", windows_open, raising=False)
    monkeypatch.setattr(images, "_ON_WINDOWS", True)
    with pytest.raises(FileNotFoundError, match=r"too long for Windows .* choose a shorter --output") as err:
        atomic_write(deep, lambda f: f.write(b"png"))
    assert err.value.filename == str(deep)  # the mask, not its temporary name
    # Other errors at such a path are not relabelled (a disk full, a locked file).
    def disk_full(file, *args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(images, "open", disk_full, raising=False)
    with pytest.raises(OSError, match="No space left on device"):
        atomic_write(deep, lambda f: f.write(b"png"))
    monkeypatch.setattr(images, "open", windows_open, raising=False)
    monkeypatch.setattr(images, "_ON_WINDOWS", False)  # elsewhere the error is left as it is
    with pytest.raises(FileNotFoundError, match="No such file or directory"):
        atomic_write(deep, lambda f: f.write(b"png"))


def test_a_name_near_the_file_name_limit_is_written_too(tmp_path):
    """The temporary name is longer than the final one; a legal mask name must not fail on it."""
    from effiseg.runtime.images import MAX_NAME_BYTES, TEMP_SUFFIX, remove_stale_temp_files
    name = "m" * (MAX_NAME_BYTES - 14) + ".png"  # legal here, too long once the temporary suffix is added
    target = tmp_path / name
    atomic_write(target, lambda f: f.write(b"png"))
    assert target.read_bytes() == b"png"
    assert not list(tmp_path.glob(f"*{TEMP_SUFFIX}"))
    # A stray short stand-in is still recognised as a temporary and cleaned up by the next run.
    (tmp_path / f".0123456789abcdef.1-1{TEMP_SUFFIX}").write_bytes(b"x")
    assert remove_stale_temp_files(tmp_path) == 1
