"""What every effiseg command does to the console before its work starts.

* Output that the console's encoding cannot show is escaped, not fatal. On Windows a redirected or
  piped stdout (a log file, Git Bash, an IDE) is written in the ANSI code page (cp1252, ...) with
  errors='strict': a file or folder name outside it, printed after a finished run, raised
  UnicodeEncodeError and turned a successful run into exit 1. The commands' files are UTF-8
  whatever the console (``encoding="utf-8"`` everywhere).
* A file it may not write (read-only, or held open by Excel on Windows) ends the command with a
  one-line error saying so, not a traceback.
* Backend decisions (``Backend.note``) print as they happen, once; effiseg's warnings print once.
* A package that the command needs and this install lacks (``effiseg-train`` on an inference install)
  is named with the extra that brings it, in one line.

The console scripts get this through :class:`Command` / :class:`Group` (``@click.command(cls=Command)``).
"""
from __future__ import annotations

import contextlib
import importlib.util
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


class _ConsoleHandler(logging.Handler):
    """Prints backend decisions as they happen, labelled ("tensorrt [cuda:0]: ..."), and effiseg's
    other warnings; remembers which decisions it printed."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.printed: set[tuple[str, str]] = set()

    def emit(self, record: logging.LogRecord) -> None:
        source = getattr(record, BACKEND_MESSAGE, None)
        if source is None and record.levelno < logging.WARNING:
            return  # effiseg's other INFO records stay quiet, as without this handler
        try:
            message = record.getMessage()
            text = f"{source}: {message}" if source else message
            if source:
                self.printed.add((source, message))
            stream = sys.stderr
            if stream is not None:
                stream.write(text + "\n")
                stream.flush()
        except Exception:
            self.handleError(record)


_live: list[_ConsoleHandler] = []  # the handlers of the commands running now (nested: a test runner)


def printed_live(source: str, message: str) -> bool:
    """Whether a running command's console handler already printed this backend decision."""
    return any((source, message) in handler.printed for handler in _live)


def unprinted_messages(backend) -> list[str]:
    """The backend's decisions that no running command's console handler printed as they happened
    (made before the command started, or with live printing off): for the front end to print."""
    label = getattr(backend, "label", "")
    return [m for m in getattr(backend, "messages", []) if not printed_live(label, m)]


@contextlib.contextmanager
def print_backend_notes_live():
    """For commands that report what their backends decided (effiseg-run, effiseg-bench; also a
    decorator): backend decisions print as they happen, so a failed start still shows the ones made
    before it, and effiseg's warnings print once. A program that configured logging itself (handlers
    on the root logger) keeps its own configuration; the command then prints the messages after."""
    if logging.getLogger().handlers:
        yield
        return
    handler = _ConsoleHandler()
    logger = logging.getLogger("effiseg")
    level = logger.level
    logger.addHandler(handler)
    if logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)  # backend decisions are INFO records
    _live.append(handler)
    try:
        yield
    finally:
        _live.remove(handler)
        logger.removeHandler(handler)
        logger.setLevel(level)


def describe_permission_error(error: PermissionError) -> str:
    paths = " -> ".join(str(p) for p in (error.filename, error.filename2) if p)
    return (f"permission denied{': ' + paths if paths else ''} ({error.strerror or error}). If a file there is "
            "open in another program (on Windows, a CSV in Excel or an image in a viewer cannot be replaced "
            "while it stays open), close it and run the command again (a training run: with --resume)")


# The effiseg extra (pyproject.toml) that installs each optional package a command may import.
EXTRA_OF_MODULE = {"torch": "train", "timm": "train", "torchvision": "train", "safetensors": "train",
                   "scipy": "train", "matplotlib": "train", "onnx": "export", "onnxscript": "export",
                   "onnxruntime": "ort", "tensorrt": "trt", "cuda": "trt"}


def describe_missing_module(error: ModuleNotFoundError, command: str) -> str | None:
    """'<command> needs <package> ...: pip install ...' for an optional package, else None."""
    package = (error.name or "").split(".")[0]
    extra = EXTRA_OF_MODULE.get(package)
    # Installed but broken (a submodule missing from an old or damaged version) is not "not installed".
    if extra is None or importlib.util.find_spec(package) is not None:
        return None
    return f"{command} needs {package}, which is not installed here: pip install \"effiseg[{extra}]\""


class _SafeConsole:
    def main(self, *args, **kwargs):
        escape_unencodable_output()
        return super().main(*args, **kwargs)


class Command(_SafeConsole, click.Command):
    """A click command that makes the console safe first (see the module's docstring), and turns a
    file it may not write, or an optional package this install lacks, into a one-line error instead
    of a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except PermissionError as e:
            raise click.ClickException(describe_permission_error(e)) from e
        except ModuleNotFoundError as e:
            message = describe_missing_module(e, ctx.command_path or "this command")
            if message is None:
                raise
            raise click.ClickException(message) from e


class Group(_SafeConsole, click.Group):
    """As :class:`Command`, for command groups (``python -m effiseg.training.protocol``)."""

    command_class = Command
