"""The effiseg version recorded in checkpoints, exports and benchmark results.

Installed (``pip install -e .`` or a wheel), the version comes from the package metadata. Run
from a source tree that is only on ``PYTHONPATH`` (the GPU session scripts do this, because the
lent machine has no package registry), there is no metadata; the version is then read from the
tree's ``pyproject.toml`` and marked ``+source``, so a model card still says which code made it.
"""
from __future__ import annotations

import re
from pathlib import Path

_PROJECT_VERSION = re.compile(r'^\[project\][^\[]*?^version\s*=\s*"([^"]+)"', re.M | re.S)


def version_from_pyproject(pyproject: Path) -> str | None:
    """The ``[project]`` table's version in a pyproject.toml, or None."""
    try:
        match = _PROJECT_VERSION.search(pyproject.read_text(encoding="utf-8"))
    except OSError:
        return None
    return match.group(1) if match else None


def effiseg_version() -> str:
    try:
        from importlib.metadata import PackageNotFoundError, version
        try:
            return version("effiseg")
        except PackageNotFoundError:
            pass
    except ImportError:
        pass
    # runtime/ sits at the top of the repo; resolve() follows the session scripts' symlinks.
    found = version_from_pyproject(Path(__file__).resolve().parent.parent / "pyproject.toml")
    return f"{found}+source" if found else "unknown"
