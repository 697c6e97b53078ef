"""Id selections on the command line: `all`, or ids and ranges like `0-7,12,40-47`."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable

from .errors import ExtractError

SPEC_HELP = "'all', or ids and inclusive ranges such as 0-7,12,40-47"
_ITEM = re.compile(r"(\d+)(?:-(\d+))?")

Ranges = list[tuple[int, int]] | None  # None: all


def parse_spec(spec: str | Iterable[int], option: str) -> Ranges:
    """Syntax only (ranges stay ranges, so '0-99999999999' costs nothing until resolved)."""
    if not isinstance(spec, str):
        ids = list(spec)
        if not all(isinstance(i, int) and i >= 0 for i in ids):
            raise ExtractError(f"{option}: ids must be non-negative integers, got {ids!r:.80}")
        return [(i, i) for i in ids]
    text = spec.strip()
    if text == "all":
        return None
    ranges = []
    for item in text.split(","):
        match = _ITEM.fullmatch(item.strip())
        if match is None:
            raise ExtractError(f"{option} {spec!r}: malformed, expected {SPEC_HELP}")
        low, high = int(match[1]), int(match[2] or match[1])
        if low > high:
            raise ExtractError(f"{option} {spec!r}: range {item.strip()} runs backwards")
        ranges.append((low, high))
    return ranges


def resolve_spec(ranges: Ranges, count: int, option: str, what: str) -> list[int]:
    """Sorted ids among 0..count-1; ExtractError names the first id out of range."""
    if ranges is None:
        return list(range(count))
    for _, high in ranges:
        if high >= count:
            raise ExtractError(f"{option}: {what} {high} out of range, the checkpoint has {count} (0-{count - 1})")
    return sorted({i for low, high in ranges for i in range(low, high + 1)})


_AUTO = re.compile(r"auto:(\d+)")
PROFILE_HELP = "auto:N keeps the N most used experts of each layer, read from --profile usage.json (router.profile)"


def profile_selection(spec, profile, option: str = "--experts") -> dict[int, list[int]] | None:
    """`auto:N` + a usage profile -> {layer: the N most used expert ids, sorted}; None if spec is not auto:N.

    The profile is router.profile's JSON: {"layers": {"<layer>": [use count of expert 0, 1, ...]}}.
    Ties go to the lower expert id, so a selection is reproducible.
    """
    match = _AUTO.fullmatch(spec.strip()) if isinstance(spec, str) else None
    if match is None:
        if isinstance(spec, str) and spec.strip().startswith("auto"):
            raise ExtractError(f"{option} {spec!r}: malformed, expected auto:N with N >= 1")
        return None
    keep = int(match[1])
    if keep < 1:
        raise ExtractError(f"{option} {spec!r}: N must be at least 1")
    if profile is None:
        raise ExtractError(f"{option} {spec}: needs --profile usage.json (a usage profile from router.profile)")
    try:
        with open(profile) as f:
            layers = json.load(f)["layers"]
        counts = {int(layer): [float(c) for c in row] for layer, row in layers.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ExtractError(f"{profile}: not a usage profile ({exc.__class__.__name__}: {exc})") from exc
    return {layer: sorted(sorted(range(len(row)), key=lambda e: (-row[e], e))[:keep]) for layer, row in counts.items()}
