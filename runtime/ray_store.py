"""Where a Ray run reads and writes: a local folder, or a URI of one of pyarrow's file systems.

    s3://BUCKET/DIR                                    AWS S3, or any S3-compatible store (MinIO, Ceph...)
    s3://BUCKET/DIR?endpoint_override=HOST:9000&scheme=http    the store named in the URI itself
    gs://BUCKET/DIR    gs://anonymous@BUCKET/DIR?endpoint_override=HOST:PORT&scheme=http
    hdfs://NAMENODE:8020/DIR    file:///DIR

A URI travels as it is to every Ray actor, so what it names (endpoint, scheme) reaches them all;
credentials come from each process's own environment (``AWS_ACCESS_KEY_ID``..., an instance role),
which a local Ray's workers inherit from the run that started it.

What the folder run's guarantees rest on, per kind of store:

* **Whole files only.** A local folder (and ``file://``): a temporary name, then a rename, as a local
  run writes. S3 and GCS have no rename; there an object PUT is atomic (the object appears whole or
  not at all; a large one goes up in parts that become visible only when the upload completes), so
  each file is encoded first and sent in one write: a killed run leaves no partial object. The bytes
  are made before the stream opens, and a write that fails is deleted, because pyarrow's stream,
  closed by an exception, publishes what it holds (an empty or partial object) and has no abort.
  Other file systems (HDFS): a temporary name, then ``move``.
* **Resume trusts masks newer than the settings record.** Stores stamp objects coarsely (S3's
  Last-Modified is to the second), so after writing the record a fresh run waits until the store's
  own clock has passed it (:meth:`Store.tick_past`) before any mask is written.
"""
from __future__ import annotations

import contextlib
import time
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit, urlunsplit

from .images import TEMP_SUFFIX, write_whole

OBJECT_STORES = ("s3", "gcs")  # pyarrow's type_name of the file systems that have no rename
CLOCK_PROBE_NAME = "effiseg_clock_probe"
TICK_LIMIT_S = 5.0  # a store whose clock does not move past the record in this long: masks may be redone


class RayJobError(ValueError):
    """A Ray run that cannot start (no Ray, bad input or output location); the message says why."""


def is_uri(location) -> bool:
    text = str(location)
    return "://" in text and not (len(text) > 1 and text[1] == ":")  # C:\ is a drive, not a scheme


def join_location(location: str, rel: str) -> str:
    """``rel`` ("/" separators) under ``location``: a URI keeps its user and options (``?endpoint_override=``)."""
    if not is_uri(location):
        return str(Path(location) / rel)
    parts = urlsplit(location)
    return urlunsplit(parts._replace(path=parts.path.rstrip("/") + "/" + rel))


class Store:
    """A folder of a file system: the location as given, pyarrow's file system, the root path in it,
    and the local folder where it is one."""

    def __init__(self, location):
        import pyarrow.fs as pafs
        self.location = str(location)
        if is_uri(location):
            try:
                self.fs, path = pafs.FileSystem.from_uri(self.location)
            except Exception as e:  # unknown scheme, missing credentials, a file system pyarrow lacks
                raise RayJobError(f"cannot open {location}: {e}") from None
            self.root = path.rstrip("/")
            self.local = Path(path) if isinstance(self.fs, pafs.LocalFileSystem) else None
        else:
            self.local = Path(location).resolve()
            self.fs, self.root = pafs.LocalFileSystem(), self.local.as_posix()
        self.object_store = self.fs.type_name in OBJECT_STORES

    def path(self, rel: str) -> str:
        return f"{self.root}/{rel}"

    def uri(self, rel: str) -> str:
        """What a user would pass to reach ``rel`` (the summary names files so)."""
        return join_location(self.location, rel)

    def files(self, recursive: bool = True) -> dict:
        """pyarrow FileInfo of every file under the root, by relative path: one listing (1,000 objects a
        request on S3) instead of one request per file."""
        import pyarrow.fs as pafs
        if self.fs.get_file_info(self.root).type != pafs.FileType.Directory:
            return {}
        root = PurePosixPath(self.root)
        return {PurePosixPath(info.path).relative_to(root).as_posix(): info
                for info in self.fs.get_file_info(pafs.FileSelector(self.root, recursive=recursive))
                if info.type == pafs.FileType.File}

    def read(self, rel: str) -> bytes:
        # A stream, not a random-access file: one GET on an object store (and GCS emulators serve no ranges).
        with self.fs.open_input_stream(self.path(rel)) as f:
            return f.read()

    def put(self, rel: str, data: bytes) -> None:
        """``data`` as ``rel``, whole or not at all (see the module's notes)."""
        if self.local is not None:
            write_whole(self.local / rel, data)  # makes the parent folders
            return
        data = memoryview(data)  # what is not bytes fails here, before a stream opens
        path = self.path(rel)
        if self.object_store:  # no folders to make: a key is a name
            stream = self.fs.open_output_stream(path)
            try:
                stream.write(data)  # buffered: a small object goes up in one PUT when the stream closes
            except BaseException:
                # pyarrow's streams have no abort: closing (as their destructor would) publishes what
                # they hold, so what a failed write published is removed.
                with contextlib.suppress(Exception):
                    stream.close()
                self.delete(rel)
                raise
            stream.close()
            return
        self.fs.create_dir(str(PurePosixPath(path).parent), recursive=True)
        tmp = path + TEMP_SUFFIX
        with self.fs.open_output_stream(tmp) as f:
            f.write(data)
        self.fs.move(tmp, path)

    def delete(self, rel: str) -> None:
        try:
            self.fs.delete_file(self.path(rel))
        except (OSError, FileNotFoundError):
            pass

    def mtime_ns(self, rel: str) -> int | None:
        info = self.fs.get_file_info(self.path(rel))
        return None if info.mtime_ns is None else int(info.mtime_ns)

    def tick_past(self, rel: str, limit_s: float = TICK_LIMIT_S) -> bool:
        """Return once a file written now would be stamped later than ``rel``, as the store's own clock
        says (an empty probe written and read back until its time is later): the driver's clock, and
        how coarsely the store stamps, do not matter. False if that did not happen within ``limit_s``."""
        since = self.mtime_ns(rel)
        if since is None:
            return True
        deadline = time.monotonic() + limit_s
        try:
            while True:
                self.put(CLOCK_PROBE_NAME, b"")
                stamped = self.mtime_ns(CLOCK_PROBE_NAME)
                if stamped is None or stamped > since:
                    return True
                if time.monotonic() > deadline:
                    return False
                time.sleep(0.1)
        finally:
            self.delete(CLOCK_PROBE_NAME)
