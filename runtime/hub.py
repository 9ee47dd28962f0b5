"""Models on the Hugging Face Hub: ``hf://OWNER/NAME[@REVISION]`` wherever a command takes a model.

The id is fetched with ``huggingface_hub.snapshot_download`` into the standard Hugging Face cache
(``HF_HUB_CACHE``, else ``HF_HOME/hub``, else ``~/.cache/huggingface/hub``) and used from there: a
file is downloaded once, and with ``HF_HUB_OFFLINE=1`` nothing is asked of the network, the cache
answers or the command says in one line that the model is not there. The spelling follows
huggingface_hub's own ``hf://`` paths (``hf://OWNER/NAME@REVISION``); REVISION is a branch, a tag
or a commit hash [default: main].

Only what the command needs is fetched: the ONNX file (and its export report) for the ONNX Runtime
and TensorRT backends, the checkpoint (``config.json`` + ``model.safetensors``) for the torch
backend, effiseg-eval and effiseg-export; ``auto`` takes the ONNX file when the repository has one,
else the checkpoint. A repository made by ``effiseg-model-card`` carries both.

This module imports huggingface_hub only when a Hub id is used (the ``hub`` extra), and neither
torch nor timm.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import click

HUB_PREFIX = "hf://"
HUB_INSTALL = 'pip install "effiseg[hub]"'
ONNX_NAME = "model.onnx"
CHECKPOINT_FILES = ("config.json", "model.safetensors")
KINDS = ("onnx", "checkpoint", "auto")
# What each backend runs; any other name (a future backend) gets "auto".
KIND_FOR_BACKEND = {"auto": "auto", "onnxruntime": "onnx", "tensorrt": "onnx", "torch": "checkpoint"}
# Files fetched per kind: the model itself, plus the small files that describe it.
_PATTERNS = {"onnx": ["*.onnx", "*.onnx.export.json", "config.json", "README.md"],
             "checkpoint": list(CHECKPOINT_FILES) + ["README.md"]}
# The Hub's rules for a user/organisation or repository name: letters, digits, '-', '_' and '.',
# starting and ending with a letter or digit.
_NAME = r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?"
_REPO_ID = re.compile(rf"{_NAME}/{_NAME}")
_REVISION = re.compile(r"[A-Za-z0-9._/-]+")


class HubError(Exception):
    """A Hub model that cannot be used here; the message is one line naming the id and the reason."""


@dataclass(frozen=True)
class HubModel:
    repo_id: str
    revision: str | None = None

    @property
    def name(self) -> str:
        return self.repo_id.split("/", 1)[1]

    def __str__(self) -> str:
        return HUB_PREFIX + self.repo_id + (f"@{self.revision}" if self.revision else "")


def parse_hub_id(text) -> HubModel | None:
    """``hf://OWNER/NAME[@REVISION]`` -> HubModel; anything not starting with ``hf://`` -> None (a
    local path). A malformed id raises ValueError saying what is wrong."""
    if isinstance(text, HubModel):
        return text
    if not isinstance(text, str) or not text.startswith(HUB_PREFIX):
        return None
    repo_id, at, revision = text[len(HUB_PREFIX):].partition("@")
    if not _REPO_ID.fullmatch(repo_id):
        raise ValueError(f"{text!r} is not a Hub model id: expected hf://OWNER/NAME or hf://OWNER/NAME@REVISION "
                         "(names of letters, digits, '-', '_' and '.')")
    if at and not _REVISION.fullmatch(revision):
        raise ValueError(f"{text!r}: the revision after '@' must be a branch, tag or commit hash")
    return HubModel(repo_id, revision or None)


class ModelLocation(click.ParamType):
    """A click type for a model argument: a Hub id stays a HubModel (fetched later, inside the
    command, where its errors get the command's own exit status); anything else is a path, checked
    as ``click.Path(exists=exists)`` checks it."""
    name = "PATH|hf://OWNER/NAME[@REVISION]"

    def __init__(self, exists: bool = False):
        self.path = click.Path(exists=exists, path_type=Path)

    def get_metavar(self, param, ctx=None):
        # An argument keeps its own name (CHECKPOINT); an option shows the forms, as written (click
        # would upper-case the type's name into HF://).
        return None if isinstance(param, click.Argument) else self.name

    def convert(self, value, param, ctx):
        if isinstance(value, (Path, HubModel)):
            return value
        try:
            hub = parse_hub_id(value)
        except ValueError as e:
            self.fail(str(e), param, ctx)
        return hub if hub is not None else self.path.convert(value, param, ctx)


def resolve_model(value, kind: str = "auto") -> Path:
    """A local path for ``value``: a path as it is; a Hub id (HubModel or ``hf://`` text) fetched
    into the Hugging Face cache (or found there), then the file ``kind`` asks for: the ONNX file
    (``onnx``), the checkpoint folder (``checkpoint``) or the ONNX file when there is one, else the
    checkpoint (``auto``). Raises HubError with a one-line reason."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    try:
        hub = parse_hub_id(value)
    except ValueError as e:
        raise HubError(str(e)) from None
    if hub is None:
        return Path(value)
    if kind in ("onnx", "auto"):
        folder = _snapshot(hub, "onnx")
        onnx = _onnx_file(folder)
        if onnx is not None:
            return onnx
        if kind == "onnx":
            raise HubError(f"{hub} ({_commit(folder)}) has no .onnx file{_offline_hint()}; the torch "
                           "backend runs its checkpoint (--backend torch)")
    folder = _snapshot(hub, "checkpoint")
    missing = [f for f in CHECKPOINT_FILES if not (folder / f).is_file()]
    if missing:
        lacks = "neither an ONNX file nor a checkpoint" if kind == "auto" else "no checkpoint"
        raise HubError(f"{hub} ({_commit(folder)}) has {lacks} (missing {', '.join(missing)})"
                       f"{_offline_hint()}")
    return folder


def _onnx_file(folder: Path) -> Path | None:
    """model.onnx, else the repository's only .onnx file at its top level."""
    if (folder / ONNX_NAME).is_file():
        return folder / ONNX_NAME
    found = sorted(p for p in folder.glob("*.onnx") if p.is_file())
    if len(found) > 1:
        raise HubError(f"{folder}: several .onnx files ({', '.join(p.name for p in found)}) and no {ONNX_NAME}; "
                       "download the one you want and pass its path")
    return found[0] if found else None


def _commit(folder: Path) -> str:
    return f"commit {folder.name[:12]}"


def _offline_hint() -> str:
    """With HF_HUB_OFFLINE only what an earlier run fetched is in the cache: say so."""
    if _offline():
        return " in the Hugging Face cache (with HF_HUB_OFFLINE=1 nothing more is downloaded)"
    return ""


def _offline() -> bool:
    try:
        from huggingface_hub import constants
    except ImportError:
        return False
    return bool(constants.HF_HUB_OFFLINE)


def _snapshot(hub: HubModel, kind: str) -> Path:
    try:
        from huggingface_hub import constants, snapshot_download
        from huggingface_hub.errors import (HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError,
                                            RevisionNotFoundError)
    except ImportError:
        raise HubError(f"{hub}: models from the Hugging Face Hub need huggingface_hub: {HUB_INSTALL}") from None
    try:
        # The library's own download: resumable, one copy per file in the cache, progress bars.
        return Path(snapshot_download(hub.repo_id, revision=hub.revision, allow_patterns=_PATTERNS[kind]))
    except LocalEntryNotFoundError as e:
        if constants.HF_HUB_OFFLINE:
            raise HubError(f"{hub} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and HF_HUB_OFFLINE=1 "
                           "forbids downloading it: run once with the network (HF_HUB_OFFLINE unset)") from None
        raise HubError(f"{hub}: the Hub could not be reached and the model is not in the Hugging Face cache "
                       f"({constants.HF_HUB_CACHE}): {_first_line(e.__cause__ or e)}") from None
    except RevisionNotFoundError:
        raise HubError(f"{hub}: the repository has no revision {hub.revision!r}") from None
    except RepositoryNotFoundError:
        raise HubError(f"{hub}: no such model repository on the Hub, or it is private or gated "
                       "(log in with `hf auth login` if you have access)") from None
    except (HfHubHTTPError, OSError, ValueError) as e:
        raise HubError(f"{hub}: cannot fetch it from the Hub: {type(e).__name__}: {_first_line(e)}") from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
