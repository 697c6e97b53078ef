"""python -m bench extract: the extractor on a synthetic Qwen3-MoE-like checkpoint (>= 2 GB),
beside a raw sequential read of the same files, measured the same way in the same run.

For each cache state ("cold": page cache dropped before each measurement, which needs
root; "warm": every source file already in the page cache) it prints
  raw read     GB/s of reading every checkpoint file front to back in 16 MB blocks,
  raw copy     GB/s of copying them (same reads, plus writing and fsyncing a copy): the
               floor for any extractor on this disk, which must write what it reads,
  extractor    GB/s of `python -m extractor` as a subprocess (the same bytes / its wall
               time, interpreter start-up included) and its peak RSS (VmHWM at exit),
and, as the floor on CPU work per byte, sha256 of in-memory data (the manifest needs
every file's hash, so a warm-cache extraction cannot beat it on one core).
The checkpoint and stores are deleted afterwards unless --keep.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

import torch
from safetensors.torch import save_file

from bench import _provenance

REPO = Path(__file__).resolve().parents[1]
BLOCK = 16 << 20
FILE_BYTES = 512 << 20  # source shard size, like a hub checkpoint's ~5 GB files scaled down


def qwen3_moe_config(layers: int, experts: int) -> dict:
    """Qwen3-30B-A3B's shapes, with fewer layers/experts and a 32k vocabulary (so the
    largest tensor, the embedding, stays small and the RSS goal stays strict)."""
    return {
        "model_type": "qwen3_moe", "architectures": ["Qwen3MoeForCausalLM"], "hidden_size": 2048,
        "moe_intermediate_size": 768, "intermediate_size": 6144, "num_hidden_layers": layers,
        "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128, "num_experts": experts,
        "num_experts_per_tok": 8, "norm_topk_prob": True, "vocab_size": 32768, "decoder_sparse_step": 1,
        "mlp_only_layers": [], "tie_word_embeddings": False, "dtype": "bfloat16",
    }


def tensor_shapes(config: dict):
    """(key, shape) in the order a hub checkpoint stores them."""
    h, i, hd = config["hidden_size"], config["moe_intermediate_size"], config["head_dim"]
    q, kv = config["num_attention_heads"] * hd, config["num_key_value_heads"] * hd
    yield "model.embed_tokens.weight", (config["vocab_size"], h)
    for layer in range(config["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        yield from [(p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,)),
                    (p + "self_attn.q_proj.weight", (q, h)), (p + "self_attn.k_proj.weight", (kv, h)),
                    (p + "self_attn.v_proj.weight", (kv, h)), (p + "self_attn.o_proj.weight", (h, q)),
                    (p + "self_attn.q_norm.weight", (hd,)), (p + "self_attn.k_norm.weight", (hd,)),
                    (p + "mlp.gate.weight", (config["num_experts"], h))]
        for e in range(config["num_experts"]):
            yield from [(p + f"mlp.experts.{e}.gate_proj.weight", (i, h)),
                        (p + f"mlp.experts.{e}.up_proj.weight", (i, h)),
                        (p + f"mlp.experts.{e}.down_proj.weight", (h, i))]
    yield "model.norm.weight", (h,)
    yield "lm_head.weight", (config["vocab_size"], h)


def build_checkpoint(path: Path, config: dict) -> tuple[list[Path], tuple[str, int]]:
    """Random bf16 tensors in ~FILE_BYTES safetensors files + index; (files, largest tensor)."""
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(config, indent=2))
    shapes = list(tensor_shapes(config))
    groups, current, size = [], [], 0
    for key, shape in shapes:
        if current and size + math.prod(shape) * 2 > FILE_BYTES:
            groups.append(current)
            current, size = [], 0
        current.append((key, shape))
        size += math.prod(shape) * 2
    groups.append(current)
    weight_map, files = {}, []
    generator = torch.Generator().manual_seed(0)
    for n, group in enumerate(groups):
        name = f"model-{n + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {key: (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16) for key, shape in group}
        save_file(tensors, path / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
        files.append(path / name)
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    largest = max(shapes, key=lambda item: math.prod(item[1]))
    return files, (largest[0], math.prod(largest[1]) * 2)


def can_drop_caches() -> bool:
    try:
        drop_caches()
        return True
    except OSError:
        return False


def drop_caches() -> None:
    os.sync()  # dirty pages cannot be dropped
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def prepare(cache: str, files: list[Path]) -> None:
    os.sync()
    if cache == "cold":
        drop_caches()
    else:
        raw_read(files)  # pull every file into the page cache


def raw_read(files: list[Path]) -> float:
    """Seconds to read every file front to back (the reference: no parsing, no writing)."""
    buffer = bytearray(BLOCK)
    started = time.perf_counter()
    for path in files:
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buffer):
                pass
    return time.perf_counter() - started


# `python -m extractor` that reports its own peak RSS on exit. Not ru_maxrss: Linux
# carries the forking parent's RSS over into the child's maxrss at exec (this benchmark
# holds ~1.7 GB of generated tensors, so every child would "peak" there); VmHWM is the
# high-water mark of the process's own memory since exec.
_MEASURED_CLI = (
    "import sys\n"
    "from extractor.__main__ import main\n"
    "code = main(sys.argv[1:])\n"
    "hwm = next(line for line in open('/proc/self/status') if line.startswith('VmHWM:'))\n"
    "print('peak-rss-kb', hwm.split()[1], file=sys.stderr)\n"
    "sys.exit(code)\n"
)


def raw_copy(files: list[Path], dest: Path) -> float:
    """Seconds to copy every file to `dest` in 16 MB blocks and fsync the copies: what any
    extraction must at least do on this disk (read it all, write it all, durably)."""
    dest.mkdir()
    buffer = bytearray(BLOCK)
    started = time.perf_counter()
    for path in files:
        with open(path, "rb", buffering=0) as src, open(dest / path.name, "wb", buffering=0) as dst:
            while n := src.readinto(buffer):
                dst.write(memoryview(buffer)[:n])
            os.fsync(dst.fileno())
    seconds = time.perf_counter() - started
    shutil.rmtree(dest)
    return seconds


def run_extractor(ckpt: Path, out: Path, workers: int) -> tuple[float, int, str]:
    """(wall seconds, peak RSS bytes, summary line) of one extractor process."""
    command = [sys.executable, "-c", _MEASURED_CLI, "--model", str(ckpt), "--out", str(out), "--workers", str(workers)]
    started = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"extractor failed ({done.returncode}): {done.stderr.strip()}")
    peak_kb = int(done.stderr.split("peak-rss-kb")[-1])
    return seconds, peak_kb * 1024, done.stdout.strip()


def sha256_rate() -> float:
    data = os.urandom(256 << 20)
    started = time.perf_counter()
    hashlib.sha256(data).digest()
    return len(data) / (time.perf_counter() - started)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench extract", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, default=None, help="where to build the checkpoint (default: a temp dir)")
    parser.add_argument("--layers", type=int, default=6, help="MoE layers (default 6: 2.3 GB)")
    parser.add_argument("--experts", type=int, default=32, help="experts per layer (default 32)")
    parser.add_argument("--workers", default="1,2", help="extractor --workers values to measure (default 1,2)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per figure; medians are printed (default 3)")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoint and stores")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)
    load_before = _provenance.load_average()
    root = Path(tempfile.mkdtemp(prefix="cadre-bench-extract-", dir=args.dir))
    try:
        rows, extra = _measure(root, args)
        if args.json:
            _provenance.write(args.json, "extract", argv, rows, load_before, **extra)
        return 0
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


def _measure(root: Path, args) -> tuple[list[dict], dict]:
    config = qwen3_moe_config(args.layers, args.experts)
    ckpt = root / "ckpt"
    files, (largest_name, largest_bytes) = build_checkpoint(ckpt, config)
    total = sum(path.stat().st_size for path in files)
    rss_goal = 3 * largest_bytes + 300_000_000
    caches = ["cold", "warm"] if can_drop_caches() else ["warm"]
    sha_rate = sha256_rate()
    print(f"synthetic qwen3_moe checkpoint: {total / 1e9:.2f} GB in {len(files)} files, "
          f"{args.layers} layers x {args.experts} experts, largest tensor {largest_bytes / 1e6:.0f} MB ({largest_name})")
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start; "
          f"sha256 of in-memory data: {sha_rate / 1e9:.2f} GB/s")
    if "cold" not in caches:
        print("cold cache: not measured (writing /proc/sys/vm/drop_caches needs root)")
    print(f"{'cache':5}  {'workers':>7}  {'raw read':>8}  {'raw copy':>8}  {'extractor':>9}  {'/read':>5}  "
          f"{'/copy':>5}  {'peak RSS':>8}   (GB/s, medians of {args.repeat} interleaved runs; RSS: the largest)")
    met, rows = True, []
    for cache in caches:
        for workers in map(int, args.workers.split(",")):
            reads, copies, extracts, peaks = [], [], [], []
            for _ in range(args.repeat):  # interleaved, so all three see the same machine
                prepare(cache, files)
                reads.append(total / raw_read(files))
                prepare(cache, files)
                copies.append(total / raw_copy(files, root / "copy"))
                out = root / f"store-{cache}-{workers}"
                prepare(cache, files)
                seconds, rss, summary = run_extractor(ckpt, out, workers)
                extracts.append(total / seconds)
                peaks.append(rss)
                shutil.rmtree(out)
            read, copy, rate, rss = median(reads), median(copies), median(extracts), max(peaks)
            met &= rss < rss_goal
            rows.append({"cache": cache, "workers": workers, "raw_read_gbs": read / 1e9, "raw_copy_gbs": copy / 1e9,
                         "extractor_gbs": rate / 1e9, "peak_rss_mb": rss / 1e6,
                         "extractor_runs_gbs": [r / 1e9 for r in extracts]})
            print(f"{cache:5}  {workers:>7}  {read / 1e9:>8.2f}  {copy / 1e9:>8.2f}  {rate / 1e9:>9.2f}  "
                  f"{rate / read:>5.0%}  {rate / copy:>5.0%}  {rss / 1e6:>5.0f} MB   "
                  f"(extractor runs: {', '.join(f'{r / 1e9:.2f}' for r in extracts)})")
    print(f"peak RSS goal: < 3 x {largest_bytes / 1e6:.0f} MB + 300 MB = {rss_goal / 1e6:.0f} MB: "
          f"{'met' if met else 'MISSED'}; throughput goal: >= 70% of raw read")
    print(f"last extractor summary: {summary}")
    print(f"load average {os.getloadavg()[0]:.1f} at the end (other processes share these CPUs and disk)")
    return rows, {"checkpoint_gb": total / 1e9, "files": len(files), "largest_tensor_mb": largest_bytes / 1e6,
                  "rss_goal_mb": rss_goal / 1e6, "sha256_gbs": sha_rate / 1e9, "repeat": args.repeat}
