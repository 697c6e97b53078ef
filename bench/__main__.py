"""`python -m bench NAME [args]`: run one benchmark or tool; each benchmark prints its figures
and the reference's from the same run (--json writes them, with their provenance, for
bench/results/). `python -m bench report` renders the docs' tables from those files.
NAME is a module of this package with a main(argv), with hyphens for underscores
(`python -m bench synth-store`)."""

import importlib
import importlib.util
import pkgutil
import sys
from pathlib import Path

import bench


def available() -> list[str]:
    """Benchmark names: modules with a main(argv), spelled with hyphens (synth_store -> synth-store)."""
    return sorted(m.name.replace("_", "-") for m in pkgutil.iter_modules(bench.__path__)
                  if not m.name.startswith("_") and _has_main(m.name))


def _has_main(module: str) -> bool:
    """Without importing it (benchmarks import torch): helpers such as synth_weights have no main."""
    spec = importlib.util.find_spec(f"bench.{module}")
    return spec is not None and "\ndef main(" in Path(spec.origin).read_text()


def main(argv: list[str]) -> int:
    names = available()
    name = argv[0].replace("_", "-") if argv else None
    if name is None or name in ("-h", "--help") or name not in names:
        print(f"usage: python -m bench {{{','.join(names)}}} [--help]", file=sys.stderr)
        return 0 if name in ("-h", "--help") else 2
    module = importlib.import_module(f"bench.{name.replace('-', '_')}")
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
