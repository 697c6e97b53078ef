"""Where one client's decode time goes: the same greedy requests, one at a time, through
each layer of the serving stack in one process, interleaved, medians over rounds.

    python -m bench serve_steps                       # the demo model on CPU
    python -m bench serve_steps --max-tokens 64 --rounds 5

Rows, each adding one thing to the one before:
  transformers generate()          the checkpoint's model, no cadre
  transformers CB manager          its continuous batching (the server's geometry), one request
  cadre runtime generate()         cadre's experts and routing (models/), no server
  cadre Engine, no listener        server/engine.py: CB + sampler + detokenizer + metrics, no HTTP
  cadre Engine                     ... with the routing listener (per-request routing, /v1/experts)
The HTTP layer on top is `python -m bench serve --clients 1`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import threading
import time
from statistics import median


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m bench serve_steps", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--max-tokens", type=int, default=32, help="greedy tokens per request (exactly: no eos stop)")
    p.add_argument("--prompts", type=int, default=8, help="requests per row and round")
    p.add_argument("--rounds", type=int, default=3, help="rounds, every row once per round (interleaved)")
    p.add_argument("--dtype", default="float32", help="compute dtype of both models (the server's CPU default)")
    return p.parse_args(argv)


def main(argv) -> int:
    args = parse_args(argv)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, ContinuousBatchingConfig, GenerationConfig

    from models import Runtime, RuntimeConfig
    from models.demo import CHECKPOINT_DIR, HELDOUT_TEST_TEXT, ensure_demo_store
    from server.engine import MAX_BATCH_TOKENS, PAGE_SIZE, Engine, EngineConfig
    from server.metrics import Metrics
    from server.sampling import SamplingParams

    torch.set_grad_enabled(False)
    n = args.max_tokens
    lines = [line.strip() for line in HELDOUT_TEST_TEXT.read_text().splitlines() if len(line.strip()) > 24]
    tokenizer = AutoTokenizer.from_pretrained(CHECKPOINT_DIR)
    prompts = [tokenizer(line)["input_ids"] for line in lines[::20][: args.prompts]]
    reference = AutoModelForCausalLM.from_pretrained(CHECKPOINT_DIR, dtype=getattr(torch, args.dtype)).eval()
    runtime = Runtime.from_store(ensure_demo_store(), RuntimeConfig(device="cpu", dtype=args.dtype))

    def timed(one_request) -> float:
        """tok/s of the prompts one after another; every request must give exactly n tokens."""
        elapsed = 0.0
        for ids in prompts:
            started = time.perf_counter()
            assert one_request(ids) == n
            elapsed += time.perf_counter() - started
        return len(prompts) * n / elapsed

    def generate(model, ids) -> int:
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False)
        return out.shape[1] - len(ids)

    cb = ContinuousBatchingConfig(page_size=PAGE_SIZE, num_blocks=18 * 8, max_batch_tokens=MAX_BATCH_TOKENS,
                                  max_requests_per_batch=18, use_cuda_graph=False, use_async_batching=False,
                                  auto_switch_to_flash=False)
    manager = reference.init_continuous_batching(
        generation_config=GenerationConfig(do_sample=False, max_new_tokens=512, eos_token_id=-1),
        continuous_batching_config=cb)
    manager.start()
    request_ids = iter(range(1 << 30))

    def manager_request(ids) -> int:
        rid = manager.add_request(ids, request_id=f"r{next(request_ids)}", max_new_tokens=n, streaming=True,
                                  eos_token_id=-1)
        for output in manager.request_id_iter(rid):
            last = output
        return len(last.generated_tokens)

    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    engine = Engine(runtime, EngineConfig(max_model_len=512), Metrics())
    engine.start()
    asyncio.run_coroutine_threadsafe(engine.warmup(), loop).result()

    async def engine_request(ids) -> int:
        stream = await engine.submit(ids, SamplingParams(max_new_tokens=n), trace=False)
        async for _ in stream.events():
            pass
        return len((await stream.result()).token_ids)

    def through_engine(listening: bool):
        def one(ids) -> int:
            if listening != (engine.recorder in runtime._listeners):
                (runtime.add_routing_listener if listening else runtime.remove_routing_listener)(engine.recorder)
            return asyncio.run_coroutine_threadsafe(engine_request(ids), loop).result()
        return one

    def without_listener(fn):
        def one(ids) -> int:
            if engine.recorder in runtime._listeners:
                runtime.remove_routing_listener(engine.recorder)
            return fn(ids)
        return one

    rows = {
        "transformers generate()": lambda ids: generate(reference, ids),
        "transformers CB manager, 1 request": manager_request,
        "cadre runtime generate()": without_listener(lambda ids: generate(runtime.model, ids)),
        "cadre Engine, no routing listener": through_engine(False),
        "cadre Engine (no HTTP)": through_engine(True),
    }
    try:
        for one in rows.values():  # warm-up
            one(prompts[0])
        results = {name: [] for name in rows}
        for _ in range(args.rounds):
            for name, one in rows.items():
                results[name].append(timed(one))
    finally:
        asyncio.run_coroutine_threadsafe(engine.shutdown(5), loop).result()
        manager.stop(block=True, timeout=30)
    print(f"\npython -m bench serve_steps: demo model on cpu ({args.dtype}), {len(prompts)} requests of {n} greedy "
          f"tokens one at a time, {args.rounds} rounds interleaved; {os.cpu_count()} CPUs, "
          f"{torch.get_num_threads()} torch threads, 1-min load average {os.getloadavg()[0]:.1f}")
    base = median(results["transformers generate()"])
    for name, values in results.items():
        print(f"{name:36s} {median(values):7.1f} tok/s  ({median(values) / base:4.2f} x generate())  "
              f"rounds {[round(v, 1) for v in values]}")
    return 0
