"""Decode benchmark: cadre at several expert-cache budgets against transformers, same run.

    python -m bench decode                       # demo model (or a tiny random one) on CPU
    python -m bench decode --model qwen3-30b-a3b-8l --device cuda --budgets 1.0,0.25 --accelerate

Prints tokens/s at batch 1 (greedy, fixed token count, after a warm-up generation),
cache hit rate and expert loads per token for each cadre budget, beside transformers
with the whole model resident (every experts implementation that runs) and, with
--accelerate, transformers + accelerate offload at cadre's GPU memory.

Every system is loaded first and the timed runs are interleaved (round r times each
system once), so a machine whose speed drifts during the run (a shared VM, a GPU
warming up) shifts every system alike; the median of the rounds is reported.
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from bench import _provenance

# Qwen3-30B-A3B's dimensions with the depth cut to 8 layers (random weights).
QWEN3_30B_A3B_8L = dict(
    hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_hidden_layers=8,
    num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8,
    norm_topk_prob=True, vocab_size=151936, max_position_embeddings=4096, rope_theta=1e6,
)
TINY = dict(
    hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=32, num_experts_per_tok=4,
    norm_topk_prob=True, vocab_size=512,
)


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m bench decode", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="demo",
                   help="demo (the built-in model), tiny, qwen3-30b-a3b-8l, or a checkpoint directory")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 (default: checkpoint's; bf16 for synthetic on GPU)")
    p.add_argument("--budgets", default="1.0,0.5,0.25", help="cadre cache budgets as fractions of all experts")
    p.add_argument("--tokens", type=int, default=64, help="generated tokens per timed run")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per configuration (median reported)")
    p.add_argument("--full-depth", choices=["off", "on", "both"], default="both",
                   help="cadre's full-depth prefetch mode(s) to measure")
    p.add_argument("--accelerate", action="store_true", help="also run transformers + accelerate offload (GPU)")
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--workdir", type=Path, help="where synthetic checkpoints and stores go (default: a temp dir)")
    return p.parse_args(argv)


def prompt_ids(vocab_size: int) -> torch.Tensor:
    return torch.randint(10, min(vocab_size, 4000), (1, 16), generator=torch.Generator().manual_seed(0))


@dataclass
class Contender:
    """A loaded system: generate(ids, tokens) -> ids, and its row's extra figures afterwards."""

    system: str
    generate: Callable
    finish: Callable[[], dict] = field(default=lambda: {})


def timed_rounds(contenders: list[Contender], ids, tokens: int, repeats: int, device) -> dict[str, float]:
    """Median tokens/s of each contender over `repeats` interleaved rounds of `tokens` greedy tokens."""
    rates: dict[str, list[float]] = {c.system: [] for c in contenders}
    for _ in range(repeats):
        for contender in contenders:
            sync(device)
            start = time.perf_counter()
            out = contender.generate(ids, tokens)
            sync(device)
            assert out.shape[1] == ids.shape[1] + tokens
            rates[contender.system].append(tokens / (time.perf_counter() - start))
    return {system: sorted(r)[len(r) // 2] for system, r in rates.items()}


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def hf_generate(model):
    def run(ids, tokens):
        with torch.inference_mode():
            return model.generate(ids.to(model.device), max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
    return run


def build_checkpoint(name: str, workdir: Path, device: str, dtype: torch.dtype) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM

    if name == "demo":
        from models.demo import CHECKPOINT_DIR
        return CHECKPOINT_DIR
    if Path(name).is_dir():
        return Path(name)
    dims = {"tiny": TINY, "qwen3-30b-a3b-8l": QWEN3_30B_A3B_8L}[name]
    path = workdir / name
    if (path / "config.json").exists():
        return path
    torch.manual_seed(0)
    config = AutoConfig.for_model("qwen3_moe", **dims)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.02)
    model.save_pretrained(path, max_shard_size="2GB")
    del model
    free_memory()
    return path


def free_memory():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def transformers_contenders(checkpoint: Path, device, dtype, ids) -> tuple[list[Contender], list[dict]]:
    """transformers with every expert resident, one contender per experts implementation
    (an implementation this device/dtype lacks becomes an error row, not a hidden gap)."""
    from transformers import AutoModelForCausalLM

    contenders, errors = [], []
    for impl in ("grouped_mm", "batched_mm", "eager"):
        try:
            model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=dtype, experts_implementation=impl)
            generate = hf_generate(model.to(device).eval())
            generate(ids, 4)  # warm-up: kernels, allocator
        except Exception as exc:
            errors.append({"system": f"transformers ({impl})", "error": str(exc).splitlines()[0][:80]})
            free_memory()
            continue
        contenders.append(Contender(f"transformers ({impl}), all resident", generate))
    return contenders, errors


def cadre_contender(store: Path, device, dtype_name, ids, fraction, full_depth, args) -> Contender:
    from models import Runtime, RuntimeConfig

    on_gpu = torch.device(device).type == "cuda"
    allocated = torch.cuda.memory_allocated() if on_gpu else 0
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    runtime = Runtime.from_store(store, RuntimeConfig(device=device, dtype=dtype_name, cache_fraction=fraction,
                                                      full_depth=full_depth))
    if runtime.cache.host is not None:  # GPU: every expert in pinned host RAM, the budget on the GPU
        runtime.cache.host.warm(runtime.store, all_experts(runtime.store), runtime.cache.dtype)
    generate = lambda ids, tokens: runtime.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens)
    generate(ids, 4)  # warm-up: kernels, allocator, first loads
    before = runtime.cache.stats()
    peak = torch.cuda.max_memory_allocated() - allocated if on_gpu else 0  # this runtime's own

    def finish() -> dict:
        after = runtime.cache.stats()
        tokens = args.tokens * args.repeats
        queries = after.queries - before.queries
        row = {
            "hit_rate": (after.hits - before.hits) / queries if queries else 0.0,
            "loads_per_token": (sum(after.loads.values()) - sum(before.loads.values())) / tokens,
            "cache_gib": after.capacity_bytes / 2**30,
        }
        if on_gpu:
            row["gpu_peak_gib"] = peak / 2**30  # trunk + cache slots + warm-up activations
        runtime.close()
        return row

    name = f"cadre {fraction:.0%} of experts" + (" full-depth" if full_depth else "")
    return Contender(name, generate, finish)


def all_experts(store):
    return [(layer, e) for layer in store.moe_layers for e in store.experts_present(layer)]


def bench_accelerate(checkpoint: Path, dtype, ids, gpu_bytes: int, args) -> dict:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=dtype, device_map="auto",
                                                 max_memory={0: gpu_bytes, "cpu": 200 * 2**30})
    generate = hf_generate(model)
    generate(ids, 2)
    rate = timed_rounds([Contender("accelerate", generate)], ids, min(args.tokens, 16), 1, "cuda")["accelerate"]
    del model
    free_memory()
    return {"system": f"transformers + accelerate offload, {gpu_bytes / 2**30:.1f} GiB GPU", "tok_s": rate}


def print_table(title: str, rows: list[dict]) -> None:
    print(f"\n{title}")
    print(f"{'system':<52} {'tok/s':>8} {'hit rate':>9} {'loads/tok':>10} {'GPU peak GiB':>13}")
    for r in rows:
        if "error" in r:
            print(f"{r['system']:<52} {'n/a':>8}  ({r['error']})")
            continue
        hit = f"{r['hit_rate']:.1%}" if "hit_rate" in r else "-"
        loads = f"{r['loads_per_token']:.2f}" if "loads_per_token" in r else "-"
        peak = f"{r['gpu_peak_gib']:.2f}" if "gpu_peak_gib" in r else "-"
        print(f"{r['system']:<52} {r['tok_s']:>8.1f} {hit:>9} {loads:>10} {peak:>13}")


def main(argv) -> int:
    args = parse_args(argv)
    load_before = _provenance.load_average()
    from extractor import extract_store
    from extractor.store import ExpertStore

    device = args.device
    on_gpu = torch.device(device).type == "cuda"
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="cadre-bench-"))
    synthetic_dtype = torch.bfloat16 if on_gpu else torch.float32
    checkpoint = build_checkpoint(args.model, workdir, device if args.model != "demo" else "cpu", synthetic_dtype)
    store = workdir / "store"
    extract_store(checkpoint, store, quiet=True)
    store_dtype = ExpertStore.open(store).dtype
    dtype_name = args.dtype or ("bfloat16" if on_gpu else "float32")
    dtype = getattr(torch, dtype_name)
    config = json.loads((checkpoint / "config.json").read_text())
    ids = prompt_ids(config.get("vocab_size", 512))

    contenders, errors = transformers_contenders(checkpoint, device, dtype, ids)
    budgets = [float(f) for f in args.budgets.split(",")]
    modes = {"off": [False], "on": [True], "both": [False, True]}[args.full_depth]
    contenders += [cadre_contender(store, device, dtype_name, ids, fraction, full_depth, args)
                   for fraction in budgets for full_depth in modes]
    rates = timed_rounds(contenders, ids, args.tokens, args.repeats, device)
    rows = [{"system": c.system, "tok_s": rates[c.system], **c.finish()} for c in contenders] + errors
    del contenders
    free_memory()
    if args.accelerate and on_gpu:  # at the GPU memory of cadre's smallest budget
        peak = max(r["gpu_peak_gib"] for r in rows if r["system"].startswith(f"cadre {min(budgets):.0%}"))
        rows.append(bench_accelerate(checkpoint, dtype, ids, int(peak * 2**30), args))

    device_name = torch.cuda.get_device_name() if on_gpu else f"CPU ({torch.get_num_threads()} threads)"
    print_table(f"decode, batch 1, {args.tokens} tokens, {args.model} ({dtype_name}, store {store_dtype}) "
                f"on {device_name}", rows)
    if args.json:
        _provenance.write(args.json, "decode", argv, rows, load_before, device=device_name, model=args.model,
                          tokens=args.tokens, repeats=args.repeats)
    if args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
