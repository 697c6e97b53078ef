"""python -m extractor: slice a Hugging Face MoE checkpoint into an expert store.

Exit codes: 0 done; 2 bad input or a store that fails --verify (one stderr line per
problem, naming it and its path); 1 an I/O failure while writing; 130 interrupted.
"""

from __future__ import annotations

import argparse
import sys

from .errors import ExtractError
from .extract import extract_store, verify_store
from .plan import DTYPE_CHOICES, FP8_BLOCK
from .spec import PROFILE_HELP, SPEC_HELP
from .store import StoreError

EXAMPLES = """\
examples:
  python -m extractor --model ~/models/Qwen3-30B-A3B --out ~/stores/qwen3-30b
  python -m extractor --model Qwen/Qwen3-30B-A3B@main --out ~/stores/qwen3-30b   # from the Hub
  python -m extractor --model CKPT --out STORE --experts 0-7 --layers all --dtype bfloat16 --workers 2
  python -m extractor --model CKPT --out STORE --experts auto:8 --profile usage.json
  python -m extractor --model CKPT --out STORE --dtype fp8          # FP8 experts from a bf16 checkpoint
  python -m extractor --out STORE --verify          # re-hash an existing store

A killed run resumes where it stopped when re-run with the same arguments: files it
finished are re-hashed against its journal and kept.
"""


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse would print the whole usage first
        self.exit(2, f"error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(
        prog="python -m extractor",
        description="Slice a Hugging Face MoE checkpoint (safetensors, sharded or not) into an expert store: "
        "trunk.safetensors, one shard per (layer, expert), copied config/tokenizer files and manifest.json.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", metavar="CKPT", help="checkpoint directory (config.json + *.safetensors), "
                        "e.g. --model ./Qwen3-30B-A3B, or a Hugging Face Hub id org/name[@revision] (downloads "
                        "config, tokenizer and safetensors files only); required unless only --verify is asked")
    parser.add_argument("--out", metavar="STORE", required=True,
                        help="store directory: new, empty, or a store of the same model, e.g. --out ./store")
    parser.add_argument("--experts", metavar="SPEC", default="all",
                        help=f"experts to write in every selected MoE layer: {SPEC_HELP}; or {PROFILE_HELP} "
                        "(default: all)")
    parser.add_argument("--profile", metavar="JSON", help="usage profile for --experts auto:N, e.g. "
                        "--profile usage.json (python -m router.profile writes one)")
    parser.add_argument("--layers", metavar="SPEC", default="all",
                        help=f"layers whose experts to write: {SPEC_HELP}, e.g. --layers 0-23 (default: all); "
                        "the trunk always holds every layer")
    parser.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto",
                        help="dtype of the written weights, e.g. --dtype bfloat16 (default: auto = the source's); "
                        "fp8: experts as float8_e4m3fn with block scales (trunk unchanged)")
    parser.add_argument("--fp8-block", metavar="N", type=int, default=FP8_BLOCK[0],
                        help=f"with --dtype fp8: rows and columns per scale, dividing the experts' shapes "
                        f"(default: {FP8_BLOCK[0]}, DeepSeek-V3's block)")
    parser.add_argument("--workers", metavar="N", type=int, default=1,
                        help="threads writing expert shards, each holding one shard in memory, e.g. --workers 2 "
                        "(default: 1)")
    parser.add_argument("--verify", action="store_true",
                        help="after extracting (or alone, without --model), re-hash every file of the store and "
                        "report each mismatch; exit 2 if any")
    parser.add_argument("--quiet", action="store_true", help="no progress bar and no summary line")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.model is None and not args.verify:
            raise ExtractError("--model CKPT is required (or --verify alone to check an existing store)")
        if args.model is not None:
            summary = extract_store(args.model, args.out, experts=args.experts, layers=args.layers,
                                    dtype=args.dtype, workers=args.workers, quiet=args.quiet,
                                    profile=args.profile, fp8_block=(args.fp8_block, args.fp8_block))
            if not args.quiet:
                print(summary.line())
        if args.verify:
            return _verify(args.out, quiet=args.quiet)
    except (ValueError, StoreError) as exc:  # ExtractError, FamilyError: bad input
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: {exc.filename or args.out}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: re-run the same command to resume", file=sys.stderr)
        return 130
    return 0


def _verify(out: str, quiet: bool) -> int:
    problems = verify_store(out)
    for problem in problems:
        print(f"mismatch: {problem}", file=sys.stderr)
    if not problems and not quiet:
        print(f"verified {out}: every file matches its manifest")
    return 2 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
