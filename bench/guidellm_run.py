"""guidellm (0.8.1) against cadre: its synchronous and concurrent profiles on synthetic prompts,
through `/v1/chat/completions` streaming as guidellm sends it (`ignore_eos: true`, fixed
`max_completion_tokens`, `stream_options.continuous_usage_stats`).

    python -m bench guidellm_run                 # the demo model on CPU
    python -m bench guidellm_run --requests 48 --streams 4,16 --json bench/results/guidellm_cpu_demo.json

guidellm is not a test dependency: this script installs it (pip install guidellm==0.8.1) into
the running environment when it is missing. It prints one row per profile from guidellm's own
JSON report, and checks that every request returned exactly the output tokens asked for
(cadre honours ignore_eos) and that none failed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GUIDELLM = "guidellm==0.8.1"
SERVED = "cadre-demo"


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m bench guidellm_run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--output-tokens", type=int, default=64)
    p.add_argument("--requests", type=int, default=32, help="requests per profile")
    p.add_argument("--streams", default="4,16", help="concurrent profiles' stream counts")
    p.add_argument("--max-concurrency", type=int, default=16, help="server --max-concurrency")
    p.add_argument("--json", type=Path, help="also write the results here")
    return p.parse_args(argv)


def ensure_guidellm() -> None:
    if importlib.util.find_spec("guidellm") is None:
        print(f"installing {GUIDELLM} ...", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", GUIDELLM], check=True)


def run_profile(url: str, profile: str, args, out: Path) -> dict:
    """One guidellm run; returns its (only) benchmark from the JSON report."""
    from models.demo import CHECKPOINT_DIR

    command = [sys.executable, "-m", "guidellm", "run",
               "--backend", f"kind=openai_http,target={url},model={SERVED}",
               "--profile", profile,
               "--constraint", f"kind=max_requests,count={args.requests}",
               "--tokenizer", f"kind=huggingface_auto,model={CHECKPOINT_DIR}",
               "--data", f"kind=synthetic_text,prompt_tokens={args.prompt_tokens},output_tokens={args.output_tokens}",
               "--output", f"kind=json,path={out}", "--disable-console-interactive"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())["benchmarks"][0]


def summarize(name: str, benchmark: dict, asked: int) -> dict:
    metrics = benchmark["metrics"]
    counts = metrics["request_totals"]
    outputs = metrics["output_token_count"]["successful"]
    stat = lambda key, which="median": metrics[key]["successful"][which]  # noqa: E731
    return {
        "profile": name, "requests": counts["successful"], "errored": counts["errored"],
        "incomplete": counts["incomplete"], "duration_s": benchmark["duration"],
        "output_tokens_min": outputs["min"], "output_tokens_max": outputs["max"], "output_tokens_asked": asked,
        "output_tok_s": outputs["total_sum"] / benchmark["duration"],
        "req_s": counts["successful"] / benchmark["duration"],
        "ttft_ms_p50": stat("time_to_first_token_ms"),
        "ttft_ms_p95": metrics["time_to_first_token_ms"]["successful"]["percentiles"]["p95"],
        "itl_ms_p50": stat("inter_token_latency_ms"), "latency_s_p50": stat("request_latency"),
        "concurrency_mean": stat("request_concurrency", "mean"),
    }


def table(rows: list[dict]) -> str:
    lines = ["| profile | requests ok / errored | output tokens per request (asked) | output tok/s | req/s | "
             "TTFT p50 / p95 ms | ITL p50 ms | latency p50 s |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        tokens = f"{r['output_tokens_min']:.0f}-{r['output_tokens_max']:.0f} ({r['output_tokens_asked']})"
        lines.append(f"| {r['profile']} | {r['requests']} / {r['errored']} | {tokens} | {r['output_tok_s']:.1f} | "
                     f"{r['req_s']:.2f} | {r['ttft_ms_p50']:.0f} / {r['ttft_ms_p95']:.0f} | {r['itl_ms_p50']:.1f} | "
                     f"{r['latency_s_p50']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    ensure_guidellm()
    from bench.results_file import header, load_average
    from bench.serve import free_port, wait_ready

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "server", "--port", str(port), "--device", "cpu",
                               "--max-concurrency", str(args.max_concurrency), "--max-queue", "256",
                               "--log-level", "warning"], cwd=REPO, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
    profiles = [("synchronous", "kind=synchronous")] + \
        [(f"concurrent {s}", f"kind=concurrent,streams={s}") for s in args.streams.split(",")]
    rows, loads = [], [load_average()]
    try:
        wait_ready(url, server)
        with tempfile.TemporaryDirectory() as tmp:
            for name, profile in profiles:
                started = time.perf_counter()
                benchmark = run_profile(url, profile, args, Path(tmp) / f"{len(rows)}.json")
                rows.append(summarize(name, benchmark, args.output_tokens))
                loads.append(load_average())
                print(f"  {name}: {rows[-1]['requests']} requests in {time.perf_counter() - started:.1f} s",
                      file=sys.stderr)
    finally:
        server.terminate()
        server.wait(timeout=60)
    print(f"guidellm 0.8.1 -> cadre (demo model, CPU float32), /v1/chat/completions streaming, "
          f"{args.prompt_tokens} prompt tokens (synthetic), {args.output_tokens} output tokens with ignore_eos; "
          f"{os.cpu_count()} CPUs, 1-min load average {' / '.join(f'{x:.1f}' for x in loads)} "
          f"(before / after each profile)")
    print(table(rows))
    exact = all(r["output_tokens_min"] == r["output_tokens_max"] == args.output_tokens for r in rows)
    print(f"every request returned exactly {args.output_tokens} output tokens: {exact}; "
          f"errored requests: {sum(r['errored'] for r in rows)}")
    if args.json:
        args.json.write_text(json.dumps({**header(["python", "-m", "bench", "guidellm_run", *argv]),
                                         "load_average": loads, "rows": rows}, indent=2))
    return 0 if exact and all(r["errored"] == 0 and r["incomplete"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
