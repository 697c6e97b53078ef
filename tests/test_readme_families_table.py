"""The README's family table is docs/families.md's (both from scripts/families_table.py)."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def table_rows(text: str) -> list[str]:
    start = text.index("| model_type | status")
    return re.findall(r"^\|.*\|$", text[start:].split("\n\n")[0], flags=re.M)


def test_readme_table_matches_the_docs():
    readme = (REPO / "README.md").read_text()
    block = readme[readme.index("<!-- families-table -->"):readme.index("<!-- /families-table -->")]
    assert table_rows(block) == table_rows((REPO / "docs" / "families.md").read_text())
