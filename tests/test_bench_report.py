"""The docs' measured tables cannot drift from bench/results/: `python -m bench report
--check` passes on the repository, and fails when a checked-in table differs from what its
results file renders, when a block names no renderer, or when a renderer has no block."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

from bench import report

REPO = Path(__file__).resolve().parents[1]


def docs_copy(tmp_path: Path) -> Path:
    docs = tmp_path / "docs"
    shutil.copytree(REPO / "docs", docs)
    return docs


def test_every_table_in_docs_is_what_its_results_file_renders():
    done = subprocess.run([sys.executable, "-m", "bench", "report", "--check"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_a_changed_figure_fails_the_check_and_report_restores_it(tmp_path):
    docs = docs_copy(tmp_path)
    page = docs / "server.md"
    text = page.read_text()
    block = report.BLOCK.search(text)
    assert block, "server.md has a rendered table"
    body = block["body"]
    figure = re.search(r"\| (\d+\.\d) \|", body)
    edited = body.replace(figure[0], f"| {float(figure[1]) + 1:.1f} |", 1)
    page.write_text(text.replace(body, edited))
    problems = report.report(check=True, docs=docs)
    assert any("server.md" in p and block["name"] in p for p in problems), problems
    assert report.report(check=False, docs=docs) == []  # rewritten from the results file
    assert page.read_text() == text and report.report(check=True, docs=docs) == []


def test_an_unknown_block_and_an_unused_renderer_are_problems(tmp_path):
    docs = docs_copy(tmp_path)
    (docs / "extra.md").write_text("<!-- bench:no-such-table -->\n<!-- /bench:no-such-table -->\n")
    for page in docs.glob("*.md"):
        page.write_text(page.read_text().replace("<!-- bench:locality -->", "<!-- bench-was:locality -->")
                        .replace("<!-- /bench:locality -->", "<!-- /bench-was:locality -->"))
    problems = report.report(check=True, docs=docs)
    assert any("no renderer named 'no-such-table'" in p for p in problems), problems
    assert any("renderer 'locality' has no" in p for p in problems), problems


def test_every_results_file_records_its_provenance_and_output():
    files = sorted((REPO / "bench" / "results").glob("*.json"))
    assert files
    for path in files:
        record = json.loads(path.read_text())
        assert set(report.REQUIRED) <= set(record), path.name
        assert record["rows"] and re.fullmatch(r"\d{4}-\d{2}-\d{2}", record["date"]), path.name
        assert record["command"].startswith("python -m "), path.name
        assert not record["commit"].endswith("-dirty"), f"{path.name}: measured on uncommitted code"
        assert path.with_suffix(".log").is_file(), f"{path.name}: no printed output beside it"


def test_results_that_lack_provenance_are_refused(tmp_path):
    (tmp_path / "decode_cpu_demo.json").write_text(json.dumps({"rows": [{"system": "x", "tok_s": 1.0}]}))
    try:
        report.load("decode_cpu_demo", tmp_path)
    except ValueError as exc:
        assert "command" in str(exc)
    else:
        raise AssertionError("a results file without command/commit/machine/date was accepted")
