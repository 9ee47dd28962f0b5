"""One run per output folder: a lock file held for the life of a folder run.

Two runs writing masks into one folder at once would leave masks of two models under one settings
record, and each would delete the other's temporary files as "left by an interrupted run". So a
run takes an operating-system lock on ``effiseg_run.lock`` in its output folder before it touches
anything there, and a second run into that folder stops, naming the process that holds it.

Why an operating-system lock and not a PID file alone: the system releases the lock when its
process dies, however it dies (a crash, ``kill -9``, a power cut on a network share's client). So a
lock file whose lock is free is stale by definition, whatever PID it names: no guessing whether a
PID is still alive, or was reused, or lives on another host. The owner's details (PID, host, start
time) are written into the file only so that the message can name the other run.

Portable: ``fcntl.flock`` on Linux and macOS, ``msvcrt.locking`` on Windows. Windows locks are
mandatory (a locked range cannot be read by others), so the lock covers one byte far past the
details, which stay readable. The file stays in the folder between runs, emptied when a run ends:
deleting it could let a third run lock a file that a second one has just unlinked.
"""
from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from pathlib import Path

LOCK_NAME = "effiseg_run.lock"
_LOCK_OFFSET = 1 << 20  # Windows: the locked byte lies past the owner's details, which stay readable

# Locks this process holds, by folder: a run that holds its folder (the CLI takes it before the model
# loads) may enter it again (run_folder takes it too); another thread of this process may not.
_held: dict[Path, "OutputFolderLock"] = {}
_held_guard = threading.Lock()


class FolderLockedError(ValueError):
    """Another run holds the output folder; the message names it. (A ValueError like FolderError:
    a run that cannot start.)"""


def _try_os_lock(fd: int) -> bool:
    """Take the lock without waiting: True if taken, False if another open file holds it."""
    if sys.platform == "win32":
        import msvcrt
        os.lseek(fd, _LOCK_OFFSET, os.SEEK_SET)
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True
    import fcntl
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _os_unlock(fd: int) -> None:
    if sys.platform == "win32":
        import msvcrt
        os.lseek(fd, _LOCK_OFFSET, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
    else:
        import fcntl
        fcntl.flock(fd, fcntl.LOCK_UN)


def _read_owner(fd: int) -> dict | None:
    """The details a holder wrote, or None (an empty file: the last run ended cleanly)."""
    os.lseek(fd, 0, os.SEEK_SET)
    raw = os.read(fd, 4096)
    if not raw.strip():
        return None
    try:
        owner = json.loads(raw.decode("utf-8"))
        return owner if isinstance(owner, dict) else {}
    except (UnicodeDecodeError, json.JSONDecodeError):  # written part-way when its run died
        return {}


def describe_owner(owner: dict | None) -> str:
    if not owner:
        return "a process that left no details"
    when = owner.get("started")
    since = f", since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(when))}" if isinstance(when, (int, float)) else ""
    return f"process {owner.get('pid', '?')} on {owner.get('host', '?')}{since}"


class OutputFolderLock:
    """Hold ``folder``'s lock from ``acquire`` (or ``with``) to ``release``.

    Raises FolderLockedError when another run, in this process or another, holds it. ``say`` gets
    one line when a stale lock (its run died) is taken over.
    """

    def __init__(self, folder: Path, say=None):
        self.folder = Path(folder).resolve()
        self.path = self.folder / LOCK_NAME
        self._say = say or (lambda message: None)
        self._fd: int | None = None
        self._owner_thread: int | None = None
        self._depth = 0

    def acquire(self) -> "OutputFolderLock":
        with _held_guard:
            held = _held.get(self.folder)
            if held is not None:
                if held._owner_thread == threading.get_ident():
                    held._depth += 1  # the same run entering again (CLI, then run_folder)
                    return held
                raise FolderLockedError(f"{self.folder} is in use by another run in this process; "
                                        "wait for it to finish or pick another --output")
            self._lock_file()
            self._owner_thread, self._depth = threading.get_ident(), 1
            _held[self.folder] = self
            return self

    def _lock_file(self) -> None:
        flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_BINARY", 0)
        try:
            fd = os.open(self.path, flags, 0o666)
        except OSError as e:
            raise FolderLockedError(f"cannot take the lock {self.path} ({e.strerror or e})") from None
        try:
            if not _try_os_lock(fd):
                owner = _read_owner(fd)
                raise FolderLockedError(f"{self.folder} is in use by another effiseg-run ({describe_owner(owner)}); "
                                        "wait for it to finish or pick another --output")
            stale = _read_owner(fd)
            if stale is not None:
                self._say(f"took over the lock on {self.folder} left by {describe_owner(stale)}, which is no "
                          "longer running (it was interrupted or crashed; --resume finishes its work)")
            details = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
                       "argv": sys.argv}
            os.lseek(fd, 0, os.SEEK_SET)
            os.ftruncate(fd, 0)
            os.write(fd, json.dumps(details).encode("utf-8"))
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    def release(self) -> None:
        with _held_guard:
            held = _held.get(self.folder)
            if held is None:
                return
            held._depth -= 1
            if held._depth > 0:
                return
            del _held[self.folder]
            fd, held._fd = held._fd, None
        try:
            os.ftruncate(fd, 0)  # a clean end: the next run finds no details, so nothing to call stale
        except OSError:
            pass  # a full or vanished share: the next run then says it took over; nothing is lost
        finally:
            try:
                _os_unlock(fd)
            except OSError:
                pass  # closing releases it anyway
            os.close(fd)

    def __enter__(self) -> "OutputFolderLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
