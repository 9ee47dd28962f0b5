"""One run per output folder: a second run into a held folder stops naming the holder; a lock left by
a run that died is taken over with a message."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading

import pytest
from click.testing import CliRunner
from PIL import Image

from effiseg.runtime.images import TEMP_SUFFIX
from effiseg.runtime.folder_lock import LOCK_NAME, FolderLockedError, OutputFolderLock

# A separate process that takes the lock, says so, and waits (until killed or told to go).
_HOLDER = textwrap.dedent("""
    import sys
    from effiseg.runtime.folder_lock import OutputFolderLock
    lock = OutputFolderLock(sys.argv[1]).acquire()
    print("held", flush=True)
    sys.stdin.readline()
    lock.release()
""")


@pytest.fixture
def holder(tmp_path):
    """Start a process holding tmp_path/'out'; yields (process, folder)."""
    folder = tmp_path / "out"
    folder.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(folder)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        yield proc, folder
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)


def test_a_second_process_is_refused_naming_the_holder(holder):
    proc, folder = holder
    with pytest.raises(FolderLockedError) as refused:
        OutputFolderLock(folder).acquire()
    assert f"process {proc.pid} on" in str(refused.value) and str(folder.resolve()) in str(refused.value)
    proc.stdin.write("\n")
    proc.stdin.flush()
    proc.wait(timeout=30)
    messages = []
    with OutputFolderLock(folder, messages.append):  # released cleanly: free, and nothing to call stale
        pass
    assert messages == []
    assert (folder / LOCK_NAME).read_bytes() == b""


def test_a_lock_left_by_a_killed_run_is_taken_over_with_a_message(holder):
    proc, folder = holder
    proc.kill()  # no clean release: its details stay in the file, the system frees the lock
    proc.wait(timeout=30)
    assert json.loads((folder / LOCK_NAME).read_text())["pid"] == proc.pid
    messages = []
    with OutputFolderLock(folder, messages.append):
        assert json.loads((folder / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert len(messages) == 1 and f"process {proc.pid}" in messages[0] and "no longer running" in messages[0]


def test_the_holding_thread_may_enter_again_another_thread_may_not(tmp_path):
    lock = OutputFolderLock(tmp_path).acquire()
    again = OutputFolderLock(tmp_path).acquire()  # the CLI holds it, then run_folder enters
    errors = []

    def other_thread():
        try:
            OutputFolderLock(tmp_path).acquire()
        except FolderLockedError as e:
            errors.append(str(e))

    t = threading.Thread(target=other_thread)
    t.start()
    t.join()
    assert len(errors) == 1 and "another run in this process" in errors[0]
    again.release()
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()  # still held once
    lock.release()
    with OutputFolderLock(tmp_path):  # free again
        pass


def test_effiseg_run_into_a_held_folder_exits_3_and_leaves_it_untouched(tiny_onnx, holder, tmp_path):
    pytest.importorskip("onnxruntime")
    from effiseg.runtime.cli import run_command
    proc, folder = holder
    src = tmp_path / "frames"
    src.mkdir()
    Image.new("RGB", (40, 30), (120, 60, 30)).save(src / "a.png")
    in_flight = folder / f"a.png{TEMP_SUFFIX}"  # the other run's mask being written: not ours to remove
    in_flight.write_bytes(b"the other run's file")
    result = CliRunner().invoke(run_command, ["--input", str(src), "--output", str(folder), "--model",
                                              str(tiny_onnx), "--no-progress"])
    assert result.exit_code == 3, result.output
    assert f"process {proc.pid}" in result.output
    assert sorted(p.name for p in folder.iterdir()) == sorted([LOCK_NAME, in_flight.name])
    proc.kill()
    proc.wait(timeout=30)
    result = CliRunner().invoke(run_command, ["--input", str(src), "--output", str(folder), "--model",
                                              str(tiny_onnx), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "took over the lock" in result.output and (folder / "a.png").is_file()
    assert (folder / LOCK_NAME).read_bytes() == b""  # released when the command ended
