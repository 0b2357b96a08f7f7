"""docs/architecture.md stays true to the package: each part's section names every module of that part and no module
that is gone, and the page's bottom-to-top line lists the parts in the layers tests/test_architecture.py checks."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
from test_architecture import EXPECTED_LAYERS, PACKAGE

PAGE = Path(__file__).resolve().parents[1] / "docs" / "architecture.md"


def _sections(text: str) -> dict[str, str]:
    """`{part: its "### `part/`" section}` for the subpackages."""
    sections = {}
    for chunk in re.split(r"^### ", text, flags=re.M)[1:]:
        heading, _, body = chunk.partition("\n")
        name = heading.strip().strip("`")
        if name.endswith("/"):
            sections[name.removesuffix("/")] = body
    return sections


SUBPACKAGES = sorted(part for part in EXPECTED_LAYERS if (PACKAGE / part).is_dir())


@pytest.mark.parametrize("part", SUBPACKAGES)
def test_each_section_names_exactly_the_modules_of_its_part(part):
    body = _sections(PAGE.read_text(encoding="utf-8"))[part]
    modules = {path.name for path in (PACKAGE / part).glob("*.py") if path.name != "__init__.py"}
    named = set(re.findall(r"`(\w+\.py)`", body))
    assert not modules - named, f"docs/architecture.md, `{part}/`: say what {sorted(modules - named)} own"
    assert not named - modules, f"docs/architecture.md, `{part}/`: {sorted(named - modules)} no longer exist"


def test_the_bottom_to_top_line_follows_the_layers():
    text = PAGE.read_text(encoding="utf-8")
    line = re.search(r"From the bottom: (.*?)\. ", text, flags=re.S).group(1)
    groups = [re.findall(r"`(\w+)(?:/|\.py)`", group) for group in line.split("<-")]
    assert sorted(part for group in groups for part in group) == sorted(EXPECTED_LAYERS)
    assert [{EXPECTED_LAYERS[part] for part in group} for group in groups] == [{i} for i in range(len(groups))]


def test_the_checks_see_a_stale_page(monkeypatch, tmp_path):
    """A module missing from its section, or one that is gone, fails the check above."""
    page = tmp_path / "architecture.md"
    text = PAGE.read_text(encoding="utf-8")
    monkeypatch.setattr(sys.modules[__name__], "PAGE", page)
    page.write_text(text.replace("(`placement.py`)", "(`placements.py`)"), encoding="utf-8")
    with pytest.raises(AssertionError, match=r"pipeline/`: say what \['placement.py'\] own"):
        test_each_section_names_exactly_the_modules_of_its_part("pipeline")
    page.write_text(text.replace("`io/` <- `face/`", "`face/` <- `io/`"), encoding="utf-8")
    with pytest.raises(AssertionError):
        test_the_bottom_to_top_line_follows_the_layers()
