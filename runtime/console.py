"""What every effiseg command does to the console before its work starts.

* Output that the console's encoding cannot show is escaped, not fatal. On Windows a redirected or
  piped stdout (a log file, Git Bash, an IDE) is written in the ANSI code page (cp1252, ...) with
  errors='strict': a file or folder name outside it, printed after a finished run, raised
  UnicodeEncodeError and turned a successful run into exit 1. The commands' files are UTF-8
  whatever the console (``encoding="utf-8"`` everywhere).
* A file it may not write (read-only, or held open by Excel on Windows) ends the command with a
  one-line error saying so, not a traceback.
* effiseg's logged warnings are printed once: backends log their decisions and also keep them in
  ``Backend.messages``, which effiseg-run and effiseg-bench print themselves.

The console scripts get this through :class:`Command` / :class:`Group` (``@click.command(cls=Command)``).
"""
from __future__ import annotations

import contextlib
import logging
import sys

import click

from .backends.base import BACKEND_MESSAGE


def escape_unencodable_output() -> None:
    """stdout (and stderr) write what their encoding lacks as backslash escapes instead of raising.
    Streams already in UTF-8, or not real text streams (a test runner's), are left alone."""
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        encoding = (getattr(stream, "encoding", None) or "").lower().replace("-", "").replace("_", "")
        if reconfigure is None or encoding in ("utf8", "utf8sig") or getattr(stream, "errors", None) != "strict":
            continue
        try:
            reconfigure(errors="backslashreplace")
        except (ValueError, OSError):  # a closed or detached stream: nothing to protect
            pass


class _NotABackendMessage(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(record, BACKEND_MESSAGE, False)


@contextlib.contextmanager
def print_warnings_except_backend_messages():
    """For commands that print every backend's ``messages`` themselves (effiseg-run, effiseg-bench;
    also a decorator): effiseg's logged warnings go to stderr, as Python's last-resort handler
    would print them, except the records of those messages, which would otherwise print twice."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setLevel(logging.WARNING)
    handler.addFilter(_NotABackendMessage())
    logger = logging.getLogger("effiseg")
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)


def describe_permission_error(error: PermissionError) -> str:
    paths = " -> ".join(str(p) for p in (error.filename, error.filename2) if p)
    return (f"permission denied{': ' + paths if paths else ''} ({error.strerror or error}). If a file there is "
            "open in another program (on Windows, a CSV in Excel or an image in a viewer cannot be replaced "
            "while it stays open), close it and run the command again")


class Command(click.Command):
    """A click command that makes the console safe first (see the module's docstring), and turns a
    file it may not write into a one-line error instead of a traceback."""

    def main(self, *args, **kwargs):
        escape_unencodable_output()
        return super().main(*args, **kwargs)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except PermissionError as e:
            raise click.ClickException(describe_permission_error(e)) from e


class Group(click.Group):
    """As :class:`Command`, for command groups (``python -m effiseg.training.protocol``)."""

    command_class = Command

    def main(self, *args, **kwargs):
        escape_unencodable_output()
        return super().main(*args, **kwargs)
