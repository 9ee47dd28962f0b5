"""The docs a newcomer reads first stay true to the repository: the README's command table lists
exactly the commands pyproject.toml installs, and every relative link in a committed Markdown file
leads somewhere that exists."""
import re
import subprocess
from pathlib import Path
from urllib.parse import unquote

import pytest

try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]

# [text](target) and ![alt](target), the text possibly over several lines; <...> targets too.
_INLINE_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
# [label]: target (reference definitions)
_REFERENCE = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)", re.MULTILINE)
_FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)
_CODE_SPAN = re.compile(r"`[^`\n]*`")


def console_scripts() -> set[str]:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return set(tomllib.load(f)["project"]["scripts"])


def readme_command_table(text: str) -> list[str]:
    """The first cell's command name of each row of the table under '## Commands'."""
    section = re.search(r"^## Commands\s*$(.*?)(?=^## |\Z)", text, re.MULTILINE | re.DOTALL)
    assert section, "README.md has no '## Commands' section"
    names = []
    for line in section.group(1).splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not line.lstrip().startswith("|") or set(cells[0]) <= set("-: "):
            continue  # not a table row, or the header's rule
        match = re.match(r"`([^`\s]+)", cells[0])
        if match:  # the header row's first cell is plain text
            names.append(match.group(1))
    return names


def test_the_readme_command_table_lists_exactly_the_installed_commands():
    listed = readme_command_table((ROOT / "README.md").read_text(encoding="utf-8"))
    assert len(listed) == len(set(listed)), f"listed twice: {sorted(n for n in listed if listed.count(n) > 1)}"
    scripts = console_scripts()
    assert not scripts - set(listed), f"console scripts missing from README.md's command table: {sorted(scripts - set(listed))}"
    assert not set(listed) - scripts, f"README.md lists commands pyproject.toml does not install: {sorted(set(listed) - scripts)}"


def test_the_command_table_reader_sees_every_row():
    text = ("# x\n\n## Commands\n\n| command | what |\n|---|---|\n| `effiseg-a --x` | one |\n"
            "| `effiseg-b` | two |\n\nnot a row: `effiseg-c`\n\n## Next\n\n| `effiseg-d` | elsewhere |\n")
    assert readme_command_table(text) == ["effiseg-a", "effiseg-b"]


def relative_links(text: str) -> list[str]:
    """Link targets that point into the repository (no scheme, not a bare anchor), outside code."""
    text = _CODE_SPAN.sub("", _FENCE.sub("", text))
    targets = _INLINE_LINK.findall(text) + _REFERENCE.findall(text)
    return [t for t in targets if not re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", t) and not t.startswith("#")]


def test_the_link_reader_finds_relative_links_and_skips_the_rest():
    text = ("[a](training/README.md) ![img](figs/x.png#frag) [web](https://example.org) [top](#top)\n"
            "[multi\nline](b.md) `[code](not-a-link.md)`\n```\n[fenced](nope.md)\n```\n[ref]: c/d.md\n")
    assert sorted(relative_links(text)) == ["b.md", "c/d.md", "figs/x.png#frag", "training/README.md"]


def committed_markdown() -> list[Path]:
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--", "*.md"], cwd=ROOT, capture_output=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: the committed Markdown files are unknown")
    return [ROOT / p for p in out.stdout.decode("utf-8").split("\0") if p]


def test_every_relative_link_in_the_docs_resolves():
    files = committed_markdown()
    assert any(f.name == "README.md" and f.parent == ROOT for f in files)
    broken = []
    for md in files:
        if not md.exists():  # deleted in the working tree, not yet committed
            continue
        for target in relative_links(md.read_text(encoding="utf-8")):
            path = unquote(target.split("#", 1)[0])
            resolved = (ROOT / path.lstrip("/")) if path.startswith("/") else (md.parent / path)
            if not resolved.exists():
                broken.append(f"{md.relative_to(ROOT)}: {target}")
    assert not broken, "links to nothing:\n" + "\n".join(broken)


def test_the_readme_fits_one_screen():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 150, f"README.md has {len(lines)} lines; details belong in the part READMEs"
