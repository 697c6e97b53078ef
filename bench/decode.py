"""Decode benchmark: cadre at several expert-cache budgets against transformers, same run.

    python -m bench decode                       # demo model (or a tiny random one) on CPU
    python -m bench decode --model qwen3-30b-a3b-8l --device cuda --budgets 1.0,0.25 --compile --accelerate
    python -m bench decode --model qwen3-30b-a3b-8l --device cuda --batch 16 --compile
    python -m bench decode --model qwen3-30b-a3b-8l --device cuda --budgets 0.25 --expert-formats bf16,fp8
    python -m bench decode --store STORE --device cuda --sequential --isolate --compile --compile-modes gpt-fast \
        --budgets 1.0 --gpu-memory 24GiB,16GiB --host-memory 32GiB,8GiB     # a real-size synthetic store

Prints tokens/s (greedy, a fixed number of new tokens per prompt, after a warm-up, batch
of --batch prompts decoded together; each timed round decodes prompts of its own, never the
warm-up's: see round_prompts) end to end, and apart: the time to the first token
(the prompt's prefill) and the decode rate of the tokens after it, as serving benchmarks
report them (a cold prefill loads most of a layer's experts: at 32 tokens it weighs on the
end-to-end rate of a capped cadre far more than on a resident model's), cache hit rate and expert loads per token for each
cadre budget, beside transformers with the whole model resident: eager with every experts
implementation, and with --compile its static cache with torch.compile (CUDA graphs:
transformers' automatic compile, and gpt-fast's manual `torch.compile(forward,
mode="reduce-overhead", fullgraph=True)`); with --accelerate also transformers +
accelerate offload at cadre's GPU memory. cadre runs its slot-cache decoder (CUDA graphs
on a GPU) and, with --cadre-eager, also transformers' generate() over cadre's model.

On a GPU it also measures the pinned host -> device copy bandwidth, and prints for every
cadre row the copy-bound floor: loads per token x bytes per expert / that bandwidth.

Every system is loaded first and the timed runs are interleaved (round r times each
system once), so a machine whose speed drifts (a shared VM, a GPU warming up) shifts every
system alike; the median of the rounds is reported. Where two copies of the model do not
fit (full depth), --sequential loads, times and frees one system at a time. --isolate times
the transformers rows in child processes (each names its transformers version): a crash in
the compiler becomes an error row, and no CUDA-graph pool or allocator state leaks between
systems. --gpu-memory/--host-memory add cadre rows under the memory plan's caps, as a
smaller machine would run it; each cadre row prints hit rate, loads (and those read from
the store's files) per token, MB moved and the H2D rate that achieved, peak GPU and pinned
host memory, and the routing entropy it saw.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
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
PROMPT_LEN = 16
WARMUP_TOKENS = 8  # tokens of each reference warm-up run (the static cache holds at least this many)


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m bench decode", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="demo",
                   help="demo (the built-in model), tiny, qwen3-30b-a3b-8l, or a checkpoint directory")
    p.add_argument("--store", type=Path,
                   help="an expert store instead of --model (e.g. python -m bench synth-store's): the transformers "
                        "rows load it through bench.store_reference")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 (default: float32 on CPU, bfloat16 on GPU)")
    p.add_argument("--budgets", default="1.0,0.5,0.25", help="cadre cache budgets as fractions of all experts")
    p.add_argument("--batch", type=int, default=1, help="prompts decoded together")
    p.add_argument("--gather-rows", default="",
                   help="also cadre rows (each budget, and the compiled step) whose GPU steps gather experts' weights "
                        "only up to this many (token, expert) rows, a grouped matmul above (comma-separated; "
                        "0 = always grouped; default: the kernels' GATHER_ROWS only)")
    p.add_argument("--prefetch", default="0",
                   help="cadre rows at these prefetch depths (comma-separated; 1 = predict the next MoE "
                        "layer's experts from this layer's input and load them while it computes)")
    p.add_argument("--prefetch-tiers", default=["device"], type=prefetch_tiers,
                   help="where the prefetch rows' loads go (comma-separated, a row each): device (slots) | host "
                        "(store reads of predicted experts into the host tier only)")
    p.add_argument("--tokens", type=int, default=64, help="new tokens per prompt per timed run")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per configuration (median reported)")
    p.add_argument("--compile", action="store_true", help="also transformers static cache + torch.compile")
    p.add_argument("--compile-impls", default="grouped_mm,batched_mm",
                   help="with --compile: the experts implementations compiled")
    p.add_argument("--inductor", action="append", default=[], metavar="KEY=VALUE",
                   help="with --compile: set torch._inductor.config.KEY (Python literal VALUE); repeatable")
    p.add_argument("--compile-modes", default="compiled",
                   help="with --compile, any of: compiled (torch.compile of generate()'s forward, static cache), "
                        "auto-compile (transformers' own), gpt-fast (eager prefill into a StaticCache, the "
                        "decode step alone compiled, as gpt-fast does)")
    p.add_argument("--cadre-eager", action="store_true", help="also cadre through transformers' generate()")
    p.add_argument("--cadre-compile", action="store_true",
                   help="also cadre with RuntimeConfig(compile=True): its norms, gates and experts compiled")
    p.add_argument("--cadre-compile-step", action="store_true",
                   help="also cadre at 100%% with RuntimeConfig(compile_step=True): each decode step's forward "
                        "compiled, then captured")
    p.add_argument("--impls", default="grouped_mm,batched_mm,eager", help="transformers experts implementations")
    p.add_argument("--accelerate", action="store_true",
                   help="also transformers + accelerate offload (GPU) at the first --gpu-memory, else at the GPU "
                        "memory cadre's smallest budget used")
    p.add_argument("--expert-formats", default="store",
                   help="cadre's expert stores: store (as extracted), or a list of bf16,fp8 (FP8 e4m3, 128x128 "
                        "block scales, dequantised on the device after each load)")
    p.add_argument("--gpu-memory", default="",
                   help="cadre rows under these device budgets (comma-separated, e.g. 24GiB,16GiB): the memory "
                        "plan sizes the expert slots, simulating a smaller GPU on a big one")
    p.add_argument("--host-memory", default="",
                   help="with --gpu-memory: pinned host tier caps (comma-separated, e.g. 32GiB,8GiB); misses "
                        "beyond the tier read the store's files")
    p.add_argument("--load-workers", type=int, help="cadre's loader threads (RuntimeConfig.load_workers; default: "
                   "one on CPU, up to 8 on a GPU)")
    p.add_argument("--eviction", default="lru",
                   help="cadre's eviction policy (RuntimeConfig.eviction: lru, layer-lru, salience; the server's "
                        "default is layer-lru); rows name it when it is not lru")
    p.add_argument("--sequential", action="store_true",
                   help="load, time and free one system at a time (a full-depth model twice does not fit)")
    p.add_argument("--isolate", action="store_true",
                   help="time the transformers rows in child processes (one per experts implementation), so "
                        "a crash in the compiler becomes an error row and no state leaks between systems")
    p.add_argument("--reference-pythonpath", action="append", metavar="PATH",
                   help="with --isolate: run the children with this PYTHONPATH ('' = none: the interpreter's "
                        "own packages), e.g. to time another transformers version; repeatable, each row "
                        "names its version")
    p.add_argument("--reference-timeout", type=float, metavar="SECONDS",
                   help="with --isolate: end a reference child after this long (its unwritten rows become "
                        "error rows), so a slow compile cannot use up a run's time")
    p.add_argument("--reference-child", help=argparse.SUPPRESS)  # IMPL: this process times transformers' rows
    p.add_argument("--child-json", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--workdir", type=Path, help="where synthetic checkpoints and stores go (default: a temp dir)")
    return p.parse_args(argv)


def prompt_ids(vocab_size: int, batch: int) -> torch.Tensor:
    return torch.randint(10, min(vocab_size, 4000), (batch, PROMPT_LEN), generator=torch.Generator().manual_seed(0))


@dataclass
class Contender:
    """A loaded system: generate(ids, tokens) -> ids, and its row's extra figures afterwards."""

    system: str
    generate: Callable
    finish: Callable[[], dict] = field(default=lambda: {})


class FirstTokenClock:
    """When the running generate() had its first token: each system's generate calls `mark`
    once its prefill is done (it synchronises the device there, once a run)."""

    def __init__(self):
        self.device, self.at = "cpu", None

    def reset(self, device) -> None:
        self.device, self.at = device, None

    def mark(self, *_) -> None:
        if self.at is None:
            sync(self.device)
            self.at = time.perf_counter()


FIRST_TOKEN = FirstTokenClock()


def timed_rounds(contenders: list[Contender], ids, tokens: int, repeats: int, device) -> dict[str, float]:
    """Median tokens/s (all prompts together) of each contender over `repeats` interleaved rounds."""
    return {system: timing["tok_s"] for system, timing in timings(contenders, ids, tokens, repeats, device).items()}


def timings(contenders: list[Contender], ids, tokens: int, repeats: int, device) -> dict[str, dict]:
    """Each contender's medians over `repeats` interleaved rounds: tok_s end to end (all prompts
    together), and where its generate marks its first token, ttft_ms (the prefill) and
    decode_tok_s (the tokens after the first, over the time after it)."""
    runs: dict[str, list[tuple[float, float | None]]] = {c.system: [] for c in contenders}
    for prompt in round_prompts(ids, repeats):
        for contender in contenders:
            sync(device)
            FIRST_TOKEN.reset(device)
            start = time.perf_counter()
            out = contender.generate(prompt, tokens)
            sync(device)
            end = time.perf_counter()
            assert out.shape == (ids.shape[0], ids.shape[1] + tokens), (contender.system, tuple(out.shape))
            runs[contender.system].append((end - start, None if FIRST_TOKEN.at is None else FIRST_TOKEN.at - start))
    return {system: _timing(r, ids.shape[0], tokens) for system, r in runs.items()}


def round_prompts(ids: torch.Tensor, repeats: int) -> list[torch.Tensor]:
    """One fresh prompt per timed round, each of the warm-up prompt's shape and token range
    (prompt_ids': 10 to its largest id), none the warm-up's and each the same for every system
    of its round. Greedy decoding of one prompt repeats its routing exactly, so a capped cache
    warmed by the very sequence it then decodes would report hits that a server never sees."""
    high = int(ids.max()) + 1
    return [torch.randint(10, high, tuple(ids.shape), generator=torch.Generator().manual_seed(1 + r)).to(ids.dtype)
            for r in range(repeats)]


def _timing(runs: list[tuple[float, float | None]], batch: int, tokens: int) -> dict:
    median = lambda values: sorted(values)[len(values) // 2]
    timing = {"tok_s": median([batch * tokens / total for total, _ in runs])}
    if tokens > 1 and all(first is not None for _, first in runs):
        timing["ttft_ms"] = median([first * 1e3 for _, first in runs])
        timing["decode_tok_s"] = median([batch * (tokens - 1) / (total - first) for total, first in runs])
    return timing


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


class _FirstTokenStreamer:
    """generate(streamer=...) hands it the prompt, then each new token: the second call marks
    the first token (transformers copies each step's tokens to the host for it anyway)."""

    def __init__(self):
        self.calls = 0

    def put(self, value) -> None:
        self.calls += 1
        if self.calls == 2:
            FIRST_TOKEN.mark()

    def end(self) -> None:
        pass


def hf_generate(model, **kwargs):
    def run(ids, tokens):
        with torch.inference_mode():
            return model.generate(ids.to(model.device), max_new_tokens=tokens, min_new_tokens=tokens,
                                  do_sample=False, streamer=_FirstTokenStreamer(), **kwargs)
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
    copy_demo_tokenizer(path)  # so the server can take text prompts (ids stay below the vocab size)
    del model
    free_memory()
    return path


def copy_demo_tokenizer(path: Path) -> None:
    from models.demo import CHECKPOINT_DIR

    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(CHECKPOINT_DIR / name, path / name)


def free_memory():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


MODE_ORDER = ("eager", "gpt-fast", "auto-compile", "compiled")  # "compiled" replaces model.forward: last
MODE_NAMES = {"eager": "eager", "auto-compile": "static cache, automatic compile",
              "compiled": "static cache, torch.compile reduce-overhead",
              "gpt-fast": "static cache, compiled decode step (gpt-fast)"}


def reference_variants(args) -> dict[str, list[str]]:
    """{experts implementation: its modes}, ordered so that the modes of one implementation
    share one loaded model (a full-depth model fits the GPU once, not once per mode)."""
    variants: dict[str, list[str]] = {impl: ["eager"] for impl in args.impls.split(",") if impl}
    if args.compile:
        for impl in args.compile_impls.split(","):
            variants.setdefault(impl, []).extend(args.compile_modes.split(","))
    unknown = {m for modes in variants.values() for m in modes} - set(MODE_ORDER)
    if unknown:
        raise SystemExit(f"--compile-modes: unknown {sorted(unknown)} (compiled, auto-compile, gpt-fast)")
    return {impl: sorted(set(modes), key=MODE_ORDER.index) for impl, modes in variants.items()}


def reference_name(impl: str, mode: str) -> str:
    return f"transformers {impl}, {MODE_NAMES[mode]}"


def load_reference(source: Path, device, dtype, impl: str, args):
    from transformers import AutoModelForCausalLM

    if args.store:
        from bench.store_reference import reference_from_store

        return reference_from_store(source, device, dtype, impl)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, experts_implementation=impl)
    return model.to(device).eval()


def reference_generate(model, mode: str, ids, args):
    """The mode's generate(ids, tokens), warmed up (kernels, allocator, compile and graph recording)."""
    generate = gptfast_generate(model, ids.shape[1] + max(args.tokens, WARMUP_TOKENS)) if mode == "gpt-fast" else \
        hf_generate(model, **_compile_kwargs(model, mode))
    for _ in range(2 if mode != "eager" else 1):
        generate(ids, WARMUP_TOKENS)
    return generate


def error_row(system: str, exc: BaseException | str) -> dict:
    return {"system": system, "error": str(exc).strip().splitlines()[0][:160] if str(exc).strip() else repr(exc)}


def transformers_contenders(source: Path, device, dtype, ids, args) -> tuple[list[Contender], list[dict]]:
    """transformers with every expert resident, every variant loaded for interleaved timing:
    eager with each experts implementation, and (--compile) static cache + torch.compile. A
    configuration this device/dtype cannot run becomes an error row, not a hidden gap."""
    set_inductor_options(args.inductor)
    contenders, errors = [], []
    for impl, modes in reference_variants(args).items():
        try:
            model = load_reference(source, device, dtype, impl, args)
        except Exception as exc:
            errors += [error_row(reference_name(impl, mode), exc) for mode in modes]
            continue
        for mode in modes:
            try:
                contenders.append(Contender(reference_name(impl, mode), reference_generate(model, mode, ids, args)))
            except Exception as exc:
                errors.append(error_row(reference_name(impl, mode), exc))
                free_memory()
    return contenders, errors


def reference_rows(source: Path, device, dtype, ids, args, impl: str, on_row=lambda row: None) -> list[dict]:
    """One experts implementation's transformers rows, timed one mode after another on one
    loaded model, then freed (--sequential, and the child processes of --isolate)."""
    set_inductor_options(args.inductor)
    modes = reference_variants(args)[impl]
    try:
        model = load_reference(source, device, dtype, impl, args)
    except Exception as exc:
        rows = [{**error_row(reference_name(impl, mode), exc), "transformers": _transformers_version()}
                for mode in modes]
        for row in rows:
            on_row(row)
        return rows
    rows = []
    for mode in modes:
        name = reference_name(impl, mode)
        try:
            generate = reference_generate(model, mode, ids, args)
            row = {"system": name, **timings([Contender(name, generate)], ids, args.tokens, args.repeats, device)[name]}
        except Exception as exc:
            row = error_row(name, exc)
        row["transformers"] = _transformers_version()
        rows.append(row)
        on_row(row)
    del model
    free_memory()
    return rows


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def isolated_reference_rows(source: Path, argv: list[str], args) -> list[dict]:
    """Each experts implementation's transformers rows timed in a child process (this module
    with --reference-child): a segfault in the compiler or a leaked CUDA-graph pool ends that
    child, not the benchmark, and the rows it had not written become error rows."""
    environments = args.reference_pythonpath or [None]
    rows = []
    for pythonpath in environments:
        for impl, modes in reference_variants(args).items():
            written, failure = _run_child(source, argv, args, impl, pythonpath)
            done = {row["system"] for row in written}
            rows += written + [error_row(reference_name(impl, m), failure) for m in modes
                               if failure and reference_name(impl, m) not in done]
    if len(environments) > 1:  # say which transformers each row ran
        for row in rows:
            row["system"] += f" [transformers {row.get('transformers', '?')}]"
    return rows


def _run_child(source: Path, argv: list[str], args, impl: str, pythonpath: str | None) -> tuple[list[dict], str]:
    import os
    import subprocess

    env = dict(os.environ)
    if pythonpath is not None:
        env["PYTHONPATH"] = pythonpath
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rows.json"
        command = [sys.executable, "-m", "bench", "decode", *_without_outputs(argv), "--reference-child", impl,
                   "--child-json", str(out)] + ([] if args.store else ["--model", str(source)])
        try:  # its output: this one's
            child = subprocess.run(command, env=env, cwd=Path(__file__).parent.parent, timeout=args.reference_timeout)
            failure = _child_failure(child) if child.returncode else ""
        except subprocess.TimeoutExpired:
            failure = f"child process timed out after {args.reference_timeout:g} s (--reference-timeout)"
        written = json.loads(out.read_text()) if out.exists() else []
    return written, failure


def _without_outputs(argv: list[str]) -> list[str]:
    """argv less what a child must not inherit: outputs, the work dir, the parent's --model."""
    with_value = ("--workdir", "--model", "--reference-pythonpath", "--reference-timeout")
    out, skip = [], False
    for token in _provenance.without_outputs(argv):
        if skip:
            skip = False
        elif token in with_value:
            skip = True
        elif token not in ("--isolate", "--sequential") and not token.startswith(tuple(f + "=" for f in with_value)):
            out.append(token)
    return out


def _child_failure(child) -> str:
    import signal

    code = child.returncode
    return "child process " + (f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit {code}") + \
        " (its output is in the log above)"


def run_reference_child(args) -> int:
    """--reference-child IMPL: time that implementation's rows, writing each as it is measured."""
    device = args.device
    dtype = getattr(torch, args.dtype or ("bfloat16" if torch.device(device).type == "cuda" else "float32"))
    source = args.store or Path(args.model)
    config = json.loads((source / "config.json").read_text())
    ids = prompt_ids(config.get("vocab_size", 512), args.batch)
    rows = []

    def write(row):
        rows.append(row)
        args.child_json.write_text(json.dumps(rows))
        print(f"  {row['system']}: " + (f"{row['tok_s']:.1f} tok/s" if "tok_s" in row else row["error"]),
              file=sys.stderr, flush=True)

    reference_rows(source, device, dtype, ids, args, args.reference_child, on_row=write)
    return 0


def gptfast_generate(model, max_len: int):
    """gpt-fast's loop on a transformers model: one StaticCache allocated once, the prompt
    prefilled eagerly (so the cache's buffers are created outside the compiler and marked
    static), then each token from a decode step compiled with mode="reduce-overhead"."""
    from transformers import StaticCache

    from models.loading import cache_keyword

    cache = StaticCache(config=model.config, max_cache_len=max_len)
    kwarg = cache_keyword(model)

    def step(token, position):  # [B,1], [B,1] -> next token [B,1]
        logits = model(input_ids=token, position_ids=position, use_cache=True, **{kwarg: cache}).logits
        return logits[:, -1].argmax(dim=-1, keepdim=True)

    compiled = torch.compile(step, mode="reduce-overhead", fullgraph=True)

    def run(ids, tokens):
        ids = ids.to(model.device)
        batch, length = ids.shape
        with torch.inference_mode():
            cache.reset()
            logits = model(input_ids=ids, use_cache=True, **{kwarg: cache}).logits
            token = logits[:, -1].argmax(dim=-1, keepdim=True)
            FIRST_TOKEN.mark()
            out = [token]
            for i in range(tokens - 1):
                position = torch.full((batch, 1), length + i, device=model.device)
                token = compiled(token, position).clone()
                out.append(token)
        return torch.cat([ids, *out], dim=1)
    return run


def set_inductor_options(options: list[str]) -> None:
    """--inductor KEY=VALUE: torch 2.11 on an H200 segfaulted in inductor's static Triton
    launcher while recording the compiled forward's CUDA graphs, so its settings are
    exposed for the run (and recorded in the results' command line)."""
    import ast

    import torch._inductor.config as inductor_config

    for option in options:
        key, _, value = option.partition("=")
        inductor_config.__setattr__(key, ast.literal_eval(value))


def _compile_kwargs(model, mode: str) -> dict:
    if mode == "eager":
        return {}

    if mode == "compiled":  # gpt-fast's recipe, as transformers' docs give it
        model.forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)
        return {"cache_implementation": "static", "disable_compile": True}
    return {"cache_implementation": "static"}  # transformers compiles the forward itself


def prefetch_tiers(value: str) -> list[str]:
    """--prefetch-tiers: comma-separated device | host."""
    tiers = [tier for tier in value.split(",") if tier]
    unknown = sorted(set(tiers) - {"device", "host"})
    if not tiers or unknown:
        raise argparse.ArgumentTypeError(f"unknown prefetch tier(s) {', '.join(unknown) or '(none)'}: device or host")
    return tiers


def cadre_runtime(store: Path, device, dtype_name, fraction, caps: tuple[str, str | None] | None, max_len: int,
                  batch: int, **config):
    """A runtime at `fraction` of all experts, every expert warmed into the pinned host tier
    (misses come from RAM); or under caps (GPU, host): the memory plan sizes the slots for
    `batch` sequences of `max_len`, and the host tier fills as misses read the store."""
    from models import Runtime, RuntimeConfig

    budget = dict(cache_fraction=fraction) if caps is None else \
        dict(gpu_memory=caps[0], host_memory=caps[1] or None, max_model_len=max_len, max_concurrency=batch)
    runtime = Runtime.from_store(store, RuntimeConfig(device=device, dtype=dtype_name, **budget, **config))
    if runtime.cache.host is not None and caps is None and fraction < 1:
        runtime.cache.host.warm(runtime.store, all_experts(runtime.store), runtime.cache.dtype)
    return runtime


def cadre_contender(store: Path, device, dtype_name, ids, fraction, graphs: bool, prefetch: tuple[int, str],
                    args, compiled: bool = False, label: str = "", caps: tuple[str, str] | None = None,
                    compile_step: bool = False, gather_rows: int | None = None) -> Contender:
    """cadre at a budget: `fraction` of all experts, or (caps) the memory plan's slots under a
    device budget and a pinned host tier cap (GPU, host), as a smaller machine would have."""
    on_gpu = torch.device(device).type == "cuda"
    allocated = torch.cuda.memory_allocated() if on_gpu else 0
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    max_len = PROMPT_LEN + args.tokens + 8
    prefetch, prefetch_tier = prefetch  # (depth, tier)
    runtime = cadre_runtime(store, device, dtype_name, fraction, caps, max_len, ids.shape[0], prefetch_layers=prefetch,
                            prefetch_tier=prefetch_tier, compile=compiled, compile_step=compile_step, load_workers=args.load_workers,
                            eviction=args.eviction,
                            gather_rows=gather_rows)
    loads = lambda: sum(runtime.cache.stats().loads.values())
    decode_loads, at_first = [], [0]  # per run: the loads after its first token (the prefill's apart)

    def prefilled(logits) -> None:
        FIRST_TOKEN.mark()
        at_first[0] = loads()

    if graphs:
        decoder = runtime.decoder(max_batch=ids.shape[0], max_len=max_len)

        def generate(ids, tokens):
            out = decoder.generate(ids, tokens, on_prefilled=prefilled)
            decode_loads.append(loads() - at_first[0])
            return out
    else:
        generate = lambda ids, tokens: runtime.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens)
    generate(ids, args.tokens)  # warm-up: kernels, first loads, and (graphs) every step shape captured
    decode_loads.clear()
    before = runtime.cache.stats()
    peak = torch.cuda.max_memory_allocated() - allocated if on_gpu else 0  # this runtime's own

    if graphs:
        from models.decoder import SplitTimes

        decoder.split_times = SplitTimes()  # the timed runs' alone

    def finish() -> dict:
        splits = decoder.split_times.per_split_us() if graphs else None
        after = runtime.cache.stats()
        tokens = args.tokens * args.repeats * ids.shape[0]
        queries = after.queries - before.queries
        row = {
            "hit_rate": (after.hits - before.hits) / queries if queries else 0.0,
            "loads_per_token": (sum(after.loads.values()) - sum(before.loads.values())) / tokens,
            "decode_loads_per_token": sum(decode_loads) / (len(decode_loads) * ids.shape[0] * (args.tokens - 1))
            if decode_loads and args.tokens > 1 else None,  # after the first token: the prefill's apart
            "disk_loads_per_token": (after.loads["disk"] - before.loads["disk"]) / tokens,
            "writebacks_per_token": (after.writebacks - before.writebacks) / tokens,  # exclusive host tier
            # speculative reads into the host tier (prefetch to host), and those a load then found there
            "host_prefetch_per_token": {kind: (after.prefetch[f"host_{kind}"] - before.prefetch[f"host_{kind}"]) / tokens
                                        for kind in ("issued", "used")},
            "bytes_per_token": (after.bytes_loaded - before.bytes_loaded) / tokens,  # as moved: quantised stays so
            "expert_bytes": runtime.cache.slot_bytes,
            "cache_gib": after.capacity_bytes / 2**30,
            "experts_fraction": runtime.cache.num_slots / len(all_experts(runtime.store)),
            "routing_entropy": routing_entropy(runtime, generate, ids, args.tokens),
        }
        if splits is not None:  # host time at each MoE layer that can miss, per decode step
            row["split_us"] = splits
        if on_gpu:  # alone on the GPU (--sequential), the entropy pass counts too; else other systems would
            row["gpu_peak_gib"] = (max(peak, torch.cuda.max_memory_allocated() - allocated)
                                   if args.sequential else peak) / 2**30
        if runtime.cache.host is not None:
            host = runtime.cache.host.stats()
            row["host_cap_gib"] = host.capacity_bytes / 2**30 if host.capacity_bytes else None
            row["host_peak_gib"] = host.peak_pinned_bytes / 2**30
        if caps:
            row["gpu_cap"], row["host_cap"] = caps
        runtime.close()
        return row

    if caps:
        share = runtime.cache.num_slots / len(all_experts(runtime.store))
        name = f"cadre {caps[0]} GPU" + (f", {caps[1]} host" if caps[1] else "") + f" ({share:.0%} of experts){label}"
    else:
        name = f"cadre {fraction:.0%} of experts{label}"
    name += ", " + ("slot-cache decoder" + (" (CUDA graphs)" if on_gpu else "") if graphs else "transformers generate()")
    if prefetch:
        name += f", prefetch {prefetch} layer" + ("s" if prefetch > 1 else "") + \
            (" to host" if prefetch_tier == "host" else "")
    if args.eviction != "lru":
        name += f", {args.eviction} eviction"
    if compiled:
        name += ", compiled leaves"
    if compile_step:
        name += ", compiled step"
    if gather_rows is not None:
        name += f", gathers up to {gather_rows} rows"
    return Contender(name, generate, finish)


def routing_entropy(runtime, generate, ids, tokens: int) -> float:
    """Mean over MoE layers of the routing entropy / log(E) of one untimed run (1 = uniform):
    the spread a synthetic store's routers give, printed beside its results."""
    counts: dict[int, torch.Tensor] = {}

    def count(event):
        chosen = event.experts[event.experts >= 0].flatten()
        total = counts.setdefault(event.layer, torch.zeros(runtime.store.num_experts))
        total += torch.bincount(chosen, minlength=total.numel())[: total.numel()].float()

    runtime.add_routing_listener(count)
    try:
        generate(ids, tokens)
    finally:
        runtime.remove_routing_listener(count)
    entropies = []
    for total in counts.values():
        p = total[total > 0] / total.sum()
        entropies.append(float(-(p * p.log()).sum() / math.log(total.numel())))
    return sum(entropies) / len(entropies) if entropies else float("nan")


def expert_stores(checkpoint: Path, store: Path, workdir: Path, formats: str) -> dict[str, Path]:
    """{row label: store} for --expert-formats: the extracted store as it is, or bf16 / fp8 ones."""
    from extractor import extract_store

    if formats == "store":
        return {"": store}
    stores = {}
    for fmt in formats.split(","):
        if fmt == "fp8":
            path = workdir / "store-fp8"
            config = json.loads((checkpoint / "config.json").read_text())
            dims = (config["moe_intermediate_size"], config["hidden_size"])
            block = next(b for b in (128, 64, 32, 16) if all(d % b == 0 for d in dims))  # 128: DeepSeek's
            extract_store(checkpoint, path, dtype="fp8", fp8_block=(block, block), quiet=True)
        elif fmt == "bf16":
            path = workdir / "store-bf16"
            extract_store(checkpoint, path, dtype="bfloat16", quiet=True)
        else:
            raise SystemExit(f"--expert-formats: unknown format {fmt!r} (store, bf16, fp8)")
        stores[f", {fmt} experts"] = path
    return stores


def all_experts(store):
    return [(layer, e) for layer in store.moe_layers for e in store.experts_present(layer)]


def h2d_bandwidth(nbytes: int = 1 << 30) -> float:
    """Pinned host -> device copy, bytes/s (the median of 5 copies of `nbytes`)."""
    host = torch.empty(nbytes, dtype=torch.uint8).pin_memory()
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    times = []
    for _ in range(6):
        torch.cuda.synchronize()
        start = time.perf_counter()
        dev.copy_(host, non_blocking=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return nbytes / sorted(times[1:])[2]


def bench_accelerate(source: Path, dtype, ids, gpu_bytes: int, args) -> dict:
    """transformers + accelerate offload with `gpu_bytes` of the GPU, the rest in host RAM
    (its hooks move each offloaded module's weights in for every forward): a checkpoint
    through from_pretrained(device_map="auto"), a store through bench.store_reference."""
    from transformers import AutoModelForCausalLM

    max_memory = {0: gpu_bytes, "cpu": 200 * 2**30}
    if args.store:
        from bench.store_reference import offloaded_from_store

        model = offloaded_from_store(source, dtype, max_memory)
    else:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, device_map="auto", max_memory=max_memory)
    generate = hf_generate(model)
    generate(ids, 2)
    tokens = min(args.tokens, 16)
    rate = timed_rounds([Contender("accelerate", generate)], ids, tokens, 1, "cuda")["accelerate"]
    del model
    free_memory()
    return {"system": f"transformers + accelerate offload, {gpu_bytes / 2**30:.1f} GiB GPU", "tok_s": rate,
            "tokens_timed": tokens}


def accelerate_budget(rows: list[dict], args) -> int:
    """The GPU bytes the offload reference gets: the first --gpu-memory, else the GPU peak of
    cadre's smallest fraction row."""
    if args.gpu_memory:
        from models.memory_plan import device_memory, parse_budget

        return parse_budget(args.gpu_memory.split(",")[0], device_memory("cuda").free, "--gpu-memory")[0]
    smallest = min(float(f) for f in args.budgets.split(",") if f)
    return int(max(r["gpu_peak_gib"] for r in rows if r["system"].startswith(f"cadre {smallest:.0%}")) * 2**30)


def add_floors(rows: list[dict], bandwidth: float) -> None:
    """Copy-bound floor of each cadre row: the time its expert loads take at `bandwidth`, per
    token end to end (the prefill's loads too), and of the decode alone where counted apart."""
    for r in rows:
        if "loads_per_token" in r:
            seconds = r.get("bytes_per_token", r["loads_per_token"] * r["expert_bytes"]) / bandwidth
            r["copy_floor_tok_s"] = 1 / seconds if seconds else None
            if r.get("decode_loads_per_token") is not None:
                per_load = r["bytes_per_token"] / r["loads_per_token"] if r.get("loads_per_token") else r["expert_bytes"]
                seconds = r["decode_loads_per_token"] * per_load / bandwidth
                r["decode_copy_floor_tok_s"] = 1 / seconds if seconds else None


def print_table(title: str, rows: list[dict]) -> None:
    """tok/s beside each cadre row's cache figures: hit rate, loads per token (end to end, then
    of the decode alone), those from disk, MB moved per token and the H2D rate that achieved,
    the copy-bound floors (end to end, decode alone), peak GPU
    and pinned host memory, and the routing entropy it saw (1 = uniform over the experts)."""
    print(f"\n{title}")
    print(f"{'system':<66} {'tok/s':>7} {'TTFT ms':>8} {'decode':>7} {'hit':>6} {'loads/tok':>9} {'decode':>6} "
          f"{'disk/tok':>8} {'MB/tok':>7} {'GB/s':>5} {'floor':>6} {'decode':>6} {'GPU GiB':>7} {'host GiB':>8} "
          f"{'entropy':>7}")
    fmt = lambda row, key, spec: format(row[key], spec) if row.get(key) is not None else "-"
    for r in rows:
        if "error" in r:
            print(f"{r['system']:<66} {'n/a':>7}  ({r['error']})")
            continue
        moved = r.get("bytes_per_token")
        rate = f"{moved * r['tok_s'] / 1e9:.1f}" if moved else "-"
        print(f"{r['system']:<66} {r['tok_s']:>7.1f} {fmt(r, 'ttft_ms', '.0f'):>8} {fmt(r, 'decode_tok_s', '.1f'):>7} "
              f"{fmt(r, 'hit_rate', '.1%'):>6} "
              f"{fmt(r, 'loads_per_token', '.2f'):>9} {fmt(r, 'decode_loads_per_token', '.1f'):>6} "
              f"{fmt(r, 'disk_loads_per_token', '.2f'):>8} "
              f"{(f'{moved / 1e6:.1f}' if moved is not None else '-'):>7} {rate:>5} {fmt(r, 'copy_floor_tok_s', '.0f'):>6} "
              f"{fmt(r, 'decode_copy_floor_tok_s', '.0f'):>6} "
              f"{fmt(r, 'gpu_peak_gib', '.2f'):>7} {fmt(r, 'host_peak_gib', '.2f'):>8} "
              f"{fmt(r, 'routing_entropy', '.3f'):>7}")
    split = [r for r in rows if r.get("split_us")]
    if split:
        print("host time at each MoE layer that can miss, per replayed decode step (us): waiting for its routing "
              "/ deciding and queuing its loads / queuing the next piece and the write-backs")
        for r in split:
            times = r["split_us"]
            print(f"  {r['system']:<64} {times['sync']:>7.0f} {times['issue']:>7.0f} {times['after']:>7.0f}")
    ahead = [r for r in rows if (r.get("host_prefetch_per_token") or {}).get("issued")]
    if ahead:
        print("store reads into the host tier ahead of need, per token: started / found there by a load")
        for r in ahead:
            counts = r["host_prefetch_per_token"]
            print(f"  {r['system']:<64} {counts['issued']:>7.2f} {counts['used']:>7.2f}")


def cadre_factories(checkpoint: Path, store: Path, workdir: Path, device, dtype_name, ids, args) -> list:
    """A builder per cadre row: each budget (fractions, then --gpu-memory x --host-memory caps),
    with and without prefetch, and the optional eager and compiled variants."""
    budgets = [float(f) for f in args.budgets.split(",") if f]
    caps = [(gpu, host) for gpu in args.gpu_memory.split(",") if gpu for host in (args.host_memory.split(",") or [""])]
    modes = [True, False] if args.cadre_eager else [True]
    depths = [(d, tier) for d in (int(d) for d in args.prefetch.split(","))
              for tier in (args.prefetch_tiers if d else ["device"])]
    build = lambda path, fraction, graphs, depth, **kw: \
        lambda: cadre_contender(path, device, dtype_name, ids, fraction, graphs, depth, args, **kw)
    factories = [build(path, fraction, graphs, depth, label=label)
                 for label, path in expert_stores(checkpoint, store, workdir, args.expert_formats).items()
                 for fraction in budgets for graphs in modes for depth in (depths if fraction < 1 else [(0, "device")])]
    factories += [build(store, None, True, depth, caps=cap) for cap in caps for depth in depths]
    if args.cadre_compile:
        factories += [build(store, fraction, True, (0, "device"), compiled=True) for fraction in budgets]
    if args.cadre_compile_step:  # only a budget holding every expert compiles its step
        factories += [build(store, 1.0, True, (0, "device"), compile_step=True)]
    for rows in (int(r) for r in args.gather_rows.split(",") if r):  # the same rows, experts gathered up to `rows`
        factories += [build(store, fraction, True, (0, "device"), gather_rows=rows) for fraction in budgets]
        if args.cadre_compile_step:
            factories += [build(store, 1.0, True, (0, "device"), compile_step=True, gather_rows=rows)]
    return factories


def measure_all(checkpoint, store, workdir, device, dtype, dtype_name, ids, argv, args) -> list[dict]:
    """Every row. By default every system is loaded first and the rounds interleaved; with
    --sequential each is loaded, timed and freed in turn (each row printed as it is measured,
    so a run cut short keeps what it measured); with --isolate the transformers rows are timed
    first, in child processes (bounded by --reference-timeout), while cadre holds no GPU memory."""
    factories = cadre_factories(checkpoint, store, workdir, device, dtype_name, ids, args)
    if args.sequential:
        rows = isolated_reference_rows(checkpoint, argv, args) if args.isolate else []
        for factory in factories:
            contender = factory()
            timing = timings([contender], ids, args.tokens, args.repeats, device)[contender.system]
            rows.append({"system": contender.system, **timing, **contender.finish()})
            print(f"  {contender.system}: {timing['tok_s']:.1f} tok/s", file=sys.stderr, flush=True)
            del contender
            free_memory()
        if args.isolate:
            return rows
        return rows + [row for impl in reference_variants(args)
                       for row in reference_rows(checkpoint, device, dtype, ids, args, impl)]
    rows = isolated_reference_rows(checkpoint, argv, args) if args.isolate else []
    contenders, errors = ([], []) if args.isolate else transformers_contenders(checkpoint, device, dtype, ids, args)
    contenders += [factory() for factory in factories]
    measured = timings(contenders, ids, args.tokens, args.repeats, device)
    return rows + [{"system": c.system, **measured[c.system], **c.finish()} for c in contenders] + errors


def main(argv) -> int:
    args = parse_args(argv)
    if args.reference_child:
        return run_reference_child(args)
    from models.runtime import eviction_class

    try:
        eviction_class(args.eviction)
    except ValueError as exc:
        print(f"python -m bench decode: error: --eviction: {exc}", file=sys.stderr)
        return 2
    load_before = _provenance.load_average()
    from extractor import extract_store
    from extractor.store import ExpertStore

    device = args.device
    on_gpu = torch.device(device).type == "cuda"
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="cadre-bench-"))
    dtype_name = args.dtype or ("bfloat16" if on_gpu else "float32")
    dtype = getattr(torch, dtype_name)
    if args.store:
        checkpoint = store = args.store
    else:
        checkpoint = build_checkpoint(args.model, workdir, device if args.model != "demo" else "cpu",
                                      torch.bfloat16 if on_gpu else torch.float32)
        store = workdir / "store"
        extract_store(checkpoint, store, quiet=True)
    store_dtype = ExpertStore.open(store).dtype
    config = json.loads((checkpoint / "config.json").read_text())
    ids = prompt_ids(config.get("vocab_size", 512), args.batch)

    if args.store and args.expert_formats != "store":
        raise SystemExit("--expert-formats extracts its stores from a checkpoint: give --model, not --store")
    rows = measure_all(checkpoint, store, workdir, device, dtype, dtype_name, ids, argv, args)
    free_memory()
    bandwidth = None
    if on_gpu:
        bandwidth = h2d_bandwidth()
        add_floors(rows, bandwidth)
    if args.accelerate and on_gpu:  # at cadre's GPU budget
        rows.append(bench_accelerate(checkpoint, dtype, ids, accelerate_budget(rows, args), args))

    device_name = torch.cuda.get_device_name() if on_gpu else f"CPU ({torch.get_num_threads()} threads)"
    model_name = str(args.store) if args.store else args.model
    title = (f"decode, batch {args.batch}, {args.tokens} new tokens per prompt, {model_name} ({dtype_name}, "
             f"store {store_dtype}) on {device_name}")
    if bandwidth:
        title += f"; pinned H2D {bandwidth / 1e9:.1f} GB/s"
    synthetic = ExpertStore.open(store).manifest.get("synthetic")
    if synthetic:
        title += f"\nsynthetic store (random weights, seed {synthetic.get('seed')}); routing spread: " + \
            ", ".join(f"{k} {v}" for k, v in synthetic.items() if k not in ("config", "seed", "device"))
    print_table(title, rows)
    if args.json:
        _provenance.write(args.json, "decode", argv, rows, load_before, device=device_name, model=model_name,
                          batch=args.batch, tokens=args.tokens, repeats=args.repeats, h2d_bytes_per_s=bandwidth)
    if args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
