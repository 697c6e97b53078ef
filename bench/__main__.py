"""`python -m bench NAME [args]`: run one benchmark; each prints its figures and the
reference's from the same run (--json writes them, with their provenance, for
bench/results/). `python -m bench report` renders the docs' tables from those files.
NAME is a module of this package with a main(argv)."""

import importlib
import pkgutil
import sys

import bench


def available() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(bench.__path__) if not m.name.startswith("_"))


def main(argv: list[str]) -> int:
    names = available()
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in names:
        print(f"usage: python -m bench {{{','.join(names)}}} [--help]", file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    module = importlib.import_module(f"bench.{argv[0]}")
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
