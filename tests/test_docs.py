"""README.md and docs/*.md: every relative link leads to a file that exists, and every #anchor to a
heading in it (GitHub's anchor rule)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)


def anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"`|\*\*|__", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """Every heading anchor of a page (repeated headings get -1, -2, ... as on GitHub)."""
    seen: dict[str, int] = {}
    out = set()
    for line in FENCE.sub("", page.read_text(encoding="utf-8")).splitlines():
        if m := re.match(r"#{1,6} (.+)", line):
            slug = anchor(m.group(1))
            n = seen.get(slug, 0)
            seen[slug] = n + 1
            out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def links(page: Path) -> list[str]:
    """The relative links of a page, outside code blocks and inline code."""
    text = FENCE.sub("", page.read_text(encoding="utf-8"))
    text = re.sub(r"`[^`\n]*`(?!\])", "", text)
    return [t for t in LINK.findall(text) if not re.match(r"[a-z][a-z0-9+.-]*:", t)]


def test_the_anchor_rule() -> None:
    assert anchor("Which backbone and recipe: `train`'s defaults") == "which-backbone-and-recipe-trains-defaults"
    assert anchor("Naming a model: `--model`") == "naming-a-model---model"
    assert anchor("Encoder models: the Transformers engine (BERT family, `Trainer`)") == \
        "encoder-models-the-transformers-engine-bert-family-trainer"


def test_the_pages_exist_and_link_each_other() -> None:
    assert (ROOT / "docs" / "measurements.md").is_file()
    readme_links = links(ROOT / "README.md")
    for page in PAGES[1:]:
        assert f"docs/{page.name}" in readme_links, f"README.md does not link docs/{page.name}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve(page: Path) -> None:
    found = links(page)
    assert found or page.name != "README.md"
    broken = []
    for target in found:
        path, _, fragment = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target}: no file {file.relative_to(ROOT) if file.is_relative_to(ROOT) else file}")
        elif fragment and (file.suffix != ".md" or fragment not in anchors(file)):
            broken.append(f"{target}: no heading #{fragment} in {file.name}")
    assert not broken, f"{page.relative_to(ROOT)}: broken links:\n" + "\n".join(broken)


def test_the_readme_shows_training_on_your_csv_on_its_first_screen() -> None:
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    first = "\n".join(lines[:40])
    assert lines[2:6] == ["```bash", lines[3], lines[4], "```"] and lines[3].startswith("make demo") \
        and lines[4].startswith("make test"), "the README starts with make demo and make test"
    for command in ("llmclf data split", "llmclf train", "llmclf evaluate", "llmclf predict", "llmclf serve"):
        assert command in first, f"{command!r} is not on the README's first screen"
    assert len(lines) <= 350
