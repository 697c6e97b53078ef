"""The image gets what it installs: every package pyproject.toml ships is copied into the
builder, and .dockerignore lets each COPY source through while keeping the venv, git
history and checkpoints out of the build context (no Docker engine: rules evaluated here)."""

from __future__ import annotations

import fnmatch
import tomllib

from compose_helpers import DOCKERFILE, REPO


def dockerignore_rules() -> list[tuple[bool, str]]:
    """(is_exception, pattern) in file order; the last matching rule decides, as in Docker."""
    rules = []
    for line in (REPO / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            rules.append((line.startswith("!"), line.lstrip("!").rstrip("/")))
    return rules


def sent_to_builder(path: str) -> bool:
    """Whether Docker sends `path` (relative to the root): a path is excluded when it or
    any parent matches an exclusion rule that no later exception overrides."""
    included = True
    parts = path.split("/")
    for is_exception, pattern in dockerignore_rules():
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(fnmatch.fnmatchcase(p, pattern) or fnmatch.fnmatchcase(p, pattern.removeprefix("**/"))
               for p in prefixes):
            included = is_exception
    return included


def copied_sources() -> list[str]:
    sources = []
    for line in DOCKERFILE.read_text().splitlines():
        words = line.split()
        if words[:1] == ["COPY"] and not any(w.startswith("--from") for w in words):
            sources += [w.rstrip("/") for w in words[1:-1] if not w.startswith("--")]
    return sources


def test_every_shipped_package_is_copied_into_the_builder():
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    packages = {p.rstrip("*") for p in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]}
    assert packages <= set(copied_sources()), packages - set(copied_sources())
    assert {"pyproject.toml", "README.md"} <= set(copied_sources())  # the build reads both


def test_dockerignore_sends_every_copy_source():
    for source in copied_sources():
        assert (REPO / source).exists(), source
        assert sent_to_builder(source), f".dockerignore keeps {source} out of the build context"
        assert sent_to_builder(f"{source}/x.py") or (REPO / source).is_file()


def test_dockerignore_keeps_local_state_out():
    for path in (".venv", ".git", "checkpoints", "tests", "bench/out", "models/__pycache__/x.pyc"):
        assert not sent_to_builder(path), path
