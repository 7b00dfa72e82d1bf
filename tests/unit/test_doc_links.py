"""Every relative link of the user docs and the notebooks points at a file of this repository.

The README once sent readers to ``../shared/DESIGN.md``, a file outside the
repository. Links are read from Markdown (``[text](target)``, ``<a href>``,
``[ref]: target``) in README.md, CHANGELOG.md, docs/*.md, benchmarks/README.md,
notebooks/README.md and the notebooks' Markdown cells.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").glob("*.md")),
        ROOT / "benchmarks" / "README.md", ROOT / "notebooks" / "README.md"]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
_LINK = re.compile(r"\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)"
                   r"|href=[\"']([^\"']+)[\"']|^\s*\[[^\]]+\]:\s*(\S+)", re.MULTILINE)
_CODE = re.compile(r"```.*?```|`[^`\n]*`", re.DOTALL)


def links(markdown: str) -> list[str]:
    """The link targets of a Markdown text, outside code spans and blocks."""
    text = _CODE.sub("", markdown)
    return [next(g for g in m.groups() if g) for m in _LINK.finditer(text)]


def relative(target: str) -> str | None:
    """The file part of a relative link, or None for URLs, mail and in-page anchors."""
    if re.match(r"[a-z][a-z0-9+.-]*:", target, re.IGNORECASE) or target.startswith(("#", "//")):
        return None
    return target.split("#", 1)[0].split("?", 1)[0] or None


def sources() -> list[tuple[str, Path, str]]:
    out = [(str(p.relative_to(ROOT)), p, p.read_text(encoding="utf-8")) for p in DOCS if p.exists()]
    for nb in NOTEBOOKS:
        cells = json.loads(nb.read_text(encoding="utf-8"))["cells"]
        text = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "markdown")
        out.append((str(nb.relative_to(ROOT)), nb, text))
    return out


def test_the_docs_that_must_exist_do() -> None:
    for name in ("README.md", "CHANGELOG.md", "docs/DESIGN.md", "docs/API.md",
                 "benchmarks/README.md", "notebooks/README.md"):
        assert (ROOT / name).is_file(), name
    assert NOTEBOOKS


@pytest.mark.parametrize(("name", "path", "text"), sources(), ids=lambda v: v if isinstance(v, str)
                         and v.endswith((".md", ".ipynb")) else "")
def test_every_relative_link_resolves_inside_the_repository(name: str, path: Path, text: str) -> None:
    broken = []
    for target in links(text):
        file_part = relative(target)
        if file_part is None:
            continue
        resolved = (path.parent / file_part).resolve()
        if not resolved.exists() or ROOT not in (resolved, *resolved.parents):
            broken.append(target)
    assert not broken, f"{name}: links to files not in the repository: {broken}"


def test_no_doc_mentions_the_shared_folder() -> None:
    for name, _, text in sources():
        assert "../shared" not in text and "CONTRACT.md" not in text, name


def test_the_link_reader_finds_links_and_skips_code() -> None:
    md = "see [d](../shared/DESIGN.md), [w](https://x.org) and `[c](nope.md)`\n[r]: docs/API.md\n"
    assert links(md) == ["../shared/DESIGN.md", "https://x.org", "docs/API.md"]
    assert relative("https://x.org") is None and relative("#top") is None
    assert relative("docs/API.md#errors") == "docs/API.md"
