"""The READMEs' links to their own sections lead somewhere: a renamed heading left the contents
line pointing at nothing, which no reader reports until they click it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation but `-` and `_` dropped, spaces
    as `-` (`Separate workers (one per GPU)` -> `separate-workers-one-per-gpu`)."""
    text = heading.strip().lower().replace("`", "")
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(markdown: str) -> set[str]:
    """Every heading's anchor, outside fenced code (a shell comment is no heading)."""
    found: set[str] = set()
    fenced = False
    for line in markdown.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and (heading := re.match(r"#{1,6} (.+)", line)):
            found.add(github_anchor(heading[1]))
    return found


def test_github_anchor_follows_github_s_rule() -> None:
    assert github_anchor("Separate workers (one per GPU)") == "separate-workers-one-per-gpu"
    assert github_anchor("`drafts.py`: the API's overhead") == "draftspy-the-apis-overhead"


@pytest.mark.parametrize("name", ["README.md", "bench/README.md"])
def test_every_link_to_a_section_names_a_heading(name: str) -> None:
    markdown = (ROOT / name).read_text()
    linked = set(re.findall(r"\]\(#([^)\s]+)\)", markdown))
    assert linked - anchors(markdown) == set()
    if name == "README.md":  # the contents line: every section of the top level is listed
        assert {github_anchor(h) for h in re.findall(r"^## (.+)$", markdown, re.M)} <= linked
