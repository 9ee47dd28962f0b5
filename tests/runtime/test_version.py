"""The version a checkpoint, export or benchmark records: installed metadata, else the source tree's."""
import importlib.metadata
from pathlib import Path

from effiseg.runtime import version as version_mod

REPO = Path(__file__).resolve().parents[2]


def test_reads_the_project_table_version_only(tmp_path):
    p = tmp_path / "pyproject.toml"
    p.write_text('[build-system]\nrequires = ["setuptools"]\n\n[project]\nname = "x"\nversion = "1.2.3"\n\n'
                 '[tool.other]\nversion = "9.9.9"\n', encoding="utf-8")
    assert version_mod.version_from_pyproject(p) == "1.2.3"
    p.write_text('[tool.other]\nversion = "9.9.9"\n', encoding="utf-8")
    assert version_mod.version_from_pyproject(p) is None
    assert version_mod.version_from_pyproject(tmp_path / "missing.toml") is None


def test_source_tree_without_metadata_is_marked(monkeypatch):
    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)
    monkeypatch.setattr(importlib.metadata, "version", not_installed)
    expected = version_mod.version_from_pyproject(REPO / "pyproject.toml")
    assert expected and expected[0].isdigit()
    assert version_mod.effiseg_version() == f"{expected}+source"


def test_installed_metadata_wins(monkeypatch):
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "7.0.0")
    assert version_mod.effiseg_version() == "7.0.0"
