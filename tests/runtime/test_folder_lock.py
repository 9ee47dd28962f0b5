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


class _WindowsByteLocks:
    """``msvcrt`` as Windows has it, for the handles of one machine: LK_NBLCK locks the byte at the
    handle's file position and fails (PermissionError) while another handle holds it; the lock is
    mandatory, so a read through another handle over that byte fails as well; the system frees a
    handle's locks when its process ends."""
    LK_UNLCK, LK_NBLCK = 0, 2

    def __init__(self, real_read):
        self.held: dict[tuple, int] = {}  # (device, inode, offset) -> the handle holding it
        self._real_read = real_read

    @staticmethod
    def _where(fd: int) -> tuple:
        st = os.fstat(fd)
        return st.st_dev, st.st_ino, os.lseek(fd, 0, os.SEEK_CUR)

    def locking(self, fd: int, mode: int, nbytes: int) -> None:
        assert nbytes == 1
        key = self._where(fd)
        owner = self.held.get(key)
        if owner is not None and owner != fd:
            raise PermissionError(13, "Permission denied")
        if mode == self.LK_NBLCK:
            self.held[key] = fd
        else:
            assert mode == self.LK_UNLCK and owner == fd, "unlocking a byte this handle does not hold"
            del self.held[key]

    def read(self, fd: int, n: int) -> bytes:
        device, inode, start = self._where(fd)
        if any((d, i) == (device, inode) and start <= offset < start + n and owner != fd
               for (d, i, offset), owner in self.held.items()):
            raise PermissionError(13, "The process cannot access the file because another process has locked "
                                      "a portion of the file")
        return self._real_read(fd, n)

    def process_ended(self, fd: int) -> None:
        self.held = {key: owner for key, owner in self.held.items() if owner != fd}
        os.close(fd)


def test_on_windows_the_lock_is_a_byte_lock_that_leaves_the_holders_details_readable(tmp_path, monkeypatch):
    """The msvcrt branch, on a simulated Windows (this machine has fcntl): another process is refused
    with the holder named (the details lie outside the mandatory lock), a clean end leaves nothing to
    call stale, and a holder that died is taken over with a message."""
    import effiseg.runtime.folder_lock as folder_lock
    windows = _WindowsByteLocks(os.read)
    monkeypatch.setattr(folder_lock.sys, "platform", "win32")
    monkeypatch.setitem(sys.modules, "msvcrt", windows)
    monkeypatch.setitem(sys.modules, "fcntl", None)  # importing it fails, as on Windows
    monkeypatch.setattr(folder_lock.os, "read", windows.read)
    folder = tmp_path / "out"
    folder.mkdir()

    holder = OutputFolderLock(folder).acquire()
    other_process = OutputFolderLock(folder)  # its own handle, as a second effiseg-run would open
    with pytest.raises(FolderLockedError, match=f"in use by another effiseg-run \\(process {os.getpid()} on"):
        other_process._lock_file()
    holder.release()
    assert windows.held == {} and (folder / LOCK_NAME).read_bytes() == b""

    messages = []
    with OutputFolderLock(folder, messages.append):
        pass
    assert messages == [] and windows.held == {}

    died = OutputFolderLock(folder)
    died._lock_file()
    windows.process_ended(died._fd)  # killed: no release, its details stay in the file
    with OutputFolderLock(folder, messages.append):
        assert len(windows.held) == 1
    assert len(messages) == 1 and f"left by process {os.getpid()} on" in messages[0]
