"""lm-eval against cadre: its `local-completions` model, default settings, pointed at a cadre
server, beside its `hf` model on the same checkpoint in the same run.

    python -m bench lmeval                      # the demo model on CPU, 100 docs per task
    python -m bench lmeval --docs 20 --json bench/results/lmeval_cpu_demo.json

Three local tasks (no hub access), written as JSONL + YAML from the demo's held-out text
(Macbeth and Twelfth Night, never trained on): `loglikelihood` (the rest of a line given its
start), `multiple_choice` (the next line among four), `generate_until` (the next line,
greedy, up to a newline). It prints each task's metrics from both models and the largest
per-document loglikelihood difference; cadre's must stay within 1e-3 of transformers' (float32).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TASKS = {"cadre_ll": "loglikelihood", "cadre_mc": "multiple_choice", "cadre_gen": "generate_until"}
TOLERANCE = 1e-3


def heldout_lines() -> list[str]:
    from models.demo import HELDOUT_TEST_TEXT

    lines = [line.strip() for line in HELDOUT_TEST_TEXT.read_text().splitlines()]
    return [line for line in lines if len(line) >= 24 and not line.isupper()]


def task_docs(docs: int, seed: int = 0) -> dict[str, list[dict]]:
    """Documents of the three tasks, drawn from held-out lines (deterministic for a seed)."""
    lines = heldout_lines()
    rng = random.Random(seed)
    picks = rng.sample(range(1, len(lines) - 1), docs)
    ll, mc, gen = [], [], []
    for i in picks:
        words = lines[i].split(" ")
        cut = max(1, len(words) // 2)
        ll.append({"context": " ".join(words[:cut]), "continuation": " " + " ".join(words[cut:])})
        distractors = rng.sample([j for j in range(len(lines)) if abs(j - i) > 2], 3)
        choices = [lines[i + 1]] + [lines[j] for j in distractors]
        order = list(range(4))
        rng.shuffle(order)
        mc.append({"context": lines[i], "choices": [choices[k] for k in order], "label": order.index(0)})
        gen.append({"context": "\n".join(lines[i - 1:i + 1]) + "\n", "target": lines[i + 1]})
    return {"cadre_ll": ll, "cadre_mc": mc, "cadre_gen": gen}


TASK_YAML = {
    "cadre_ll": """output_type: loglikelihood
doc_to_text: "{{context}}"
doc_to_target: "{{continuation}}"
metric_list:
  - metric: perplexity
  - metric: acc
""",
    "cadre_mc": """output_type: multiple_choice
doc_to_text: "{{context}}\\n"
doc_to_choice: "{{choices}}"
doc_to_target: label
metric_list:
  - metric: acc
  - metric: acc_norm
""",
    "cadre_gen": """output_type: generate_until
doc_to_text: "{{context}}"
doc_to_target: "{{target}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 24
  do_sample: false
metric_list:
  - metric: exact_match
""",
}


def write_tasks(directory: Path, docs: int, seed: int = 0) -> list[str]:
    """JSONL data + one YAML task per output type under `directory` (lm-eval's include_path)."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, rows in task_docs(docs, seed).items():
        data = directory / f"{name}.jsonl"
        data.write_text("".join(json.dumps(row) + "\n" for row in rows))
        (directory / f"{name}.yaml").write_text(
            f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
            f"test_split: test\n{TASK_YAML[name]}metadata:\n  version: 1.0\n")
    return list(TASKS)


def offline_environment() -> None:
    """No hub access: datasets and transformers read local files only."""
    for name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ[name] = "1"
    os.environ.setdefault("HF_ALLOW_CODE_EVAL", "0")


def evaluate(model: str, model_args: str, tasks: list[str], include_path: Path) -> dict:
    """lm_eval.simple_evaluate with per-document samples kept."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    return simple_evaluate(model=model, model_args=model_args, tasks=tasks, batch_size=1, log_samples=True,
                           task_manager=TaskManager(include_path=str(include_path)), random_seed=0,
                           numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0)


def cadre_args(base_url: str, served: str) -> str:
    """local-completions with its defaults: only the model name and where the server is."""
    return f"model={served},base_url={base_url}/v1/completions"


def hf_args(checkpoint: Path) -> str:
    return f"pretrained={checkpoint},dtype=float32,device=cpu"


def loglikelihoods(results: dict, task: str) -> list[float]:
    """Every request's loglikelihood, document by document (choices in order)."""
    out = []
    for sample in sorted(results["samples"][task], key=lambda s: s["doc_id"]):
        out.extend(float(resp[0][0]) for resp in sample["resps"])
    return out


def generations(results: dict, task: str) -> list[str]:
    return [sample["resps"][0][0] for sample in sorted(results["samples"][task], key=lambda s: s["doc_id"])]


def compare(cadre: dict, hf: dict) -> list[dict]:
    """One row per task: both models' metrics and how far cadre's numbers are from transformers'."""
    rows = []
    for task, kind in TASKS.items():
        metrics = {k: v for k, v in cadre["results"][task].items()
                   if k.endswith(",none") and "stderr" not in k and isinstance(v, (int, float))}
        row = {"task": task, "output_type": kind, "docs": len(cadre["samples"][task]),
               "cadre": {k.removesuffix(",none"): v for k, v in metrics.items()},
               "hf": {k.removesuffix(",none"): hf["results"][task][k] for k in metrics}}
        if kind == "generate_until":
            row["same_text"] = sum(a == b for a, b in zip(generations(cadre, task), generations(hf, task)))
        else:
            ours, theirs = loglikelihoods(cadre, task), loglikelihoods(hf, task)
            row["requests"] = len(ours)
            row["max_abs_diff"] = max(abs(a - b) for a, b in zip(ours, theirs, strict=True))
        rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| task | output type | docs | metric | cadre (local-completions) | transformers (hf) | "
             "max per-request loglikelihood diff / same generations |", "|---|---|---|---|---|---|---|"]
    for row in rows:
        detail = f"{row['max_abs_diff']:.2e} over {row['requests']} requests" if "max_abs_diff" in row \
            else f"{row['same_text']} / {row['docs']}"
        for metric, value in row["cadre"].items():
            lines.append(f"| {row['task']} | {row['output_type']} | {row['docs']} | {metric} | {value:.6g} | "
                         f"{row['hf'][metric]:.6g} | {detail} |")
    return "\n".join(lines)


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m bench lmeval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--docs", type=int, default=100, help="documents per task")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", type=Path, default=REPO / ".cache" / "lmeval", help="task files and the demo store")
    p.add_argument("--json", type=Path, help="also write the results here")
    return p.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    offline_environment()
    from bench.serve import free_port, wait_ready
    from models.demo import CHECKPOINT_DIR

    import subprocess

    tasks = write_tasks(args.workdir / "tasks", args.docs, args.seed)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "server", "--port", str(port), "--device", "cpu",
                               "--log-level", "warning"], cwd=REPO, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
    try:
        wait_ready(url, server)
        started = time.perf_counter()
        cadre = evaluate("local-completions", cadre_args(url, "cadre-demo"), tasks, args.workdir / "tasks")
        cadre_s = time.perf_counter() - started
    finally:
        server.terminate()
        server.wait(timeout=60)
    started = time.perf_counter()
    hf = evaluate("hf", hf_args(CHECKPOINT_DIR), tasks, args.workdir / "tasks")
    hf_s = time.perf_counter() - started
    rows = compare(cadre, hf)
    print(table(rows))
    load = os.getloadavg()[0]
    print(f"wall: cadre {cadre_s:.1f} s, transformers {hf_s:.1f} s (1-min load average {load:.1f}); "
          f"loglikelihood tolerance {TOLERANCE}")
    worst = max(row.get("max_abs_diff", 0.0) for row in rows)
    if args.json:
        from bench.results_file import header

        args.json.write_text(json.dumps({**header(["python", "-m", "bench", "lmeval", *argv]), "load_average": load,
                                         "cadre_wall_s": cadre_s, "hf_wall_s": hf_s, "rows": rows}, indent=2))
    return 0 if worst <= TOLERANCE else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
