"""A new request takes the decoder engine's lowest free row: a step decodes every row below the
highest in use, so a lone request after a burst that ended out of order must decode as a batch
of one, not as the burst's width with padding rows routed and computed."""

import asyncio
import threading

from server.decode_engine import DecoderEngine
from server.engine import EngineConfig
from server.metrics import Metrics
from server.sampling import SamplingParams
from server.threads import in_passing_thread
from server_live import tiny_runtime


def test_a_lone_request_after_an_out_of_order_burst_decodes_at_batch_one(tmp_path):
    _, runtime = tiny_runtime(tmp_path)
    prompt = runtime.tokenizer("hello world")["input_ids"]
    highest_rows = []  # per decode step: the highest row it decoded

    async def main():
        engine = DecoderEngine(runtime, EngineConfig(max_concurrency=4, max_queue=4, max_model_len=128), Metrics())
        await in_passing_thread(engine.start)
        await engine.warmup()
        decode = engine.decoder.decode
        engine.decoder.decode = lambda tokens: highest_rows.append(max(tokens)) or decode(tokens)
        try:
            # rows 0, 1, 2 in order of arrival; the first to arrive finishes first
            burst = [await engine.submit(prompt, SamplingParams(max_new_tokens=n, ignore_eos=True), trace=False)
                     for n in (2, 5, 8)]
            await asyncio.gather(*(stream.result() for stream in burst))
            highest_rows.clear()
            lone = await engine.submit(prompt, SamplingParams(max_new_tokens=4, ignore_eos=True), trace=False)
            await lone.result()
        finally:
            await engine.shutdown(5)
        assert lone.finish_reason == "length" and len(lone.token_ids) == 4

    try:
        asyncio.run(main())
    finally:
        runtime.close()
    assert highest_rows == [0, 0, 0]  # three decode steps after the prefill's token, all on row 0


def test_requests_arriving_together_are_prefilled_together_with_their_own_tokens(tmp_path):
    _, runtime = tiny_runtime(tmp_path)
    texts = ["hello world", "the cache holds a few experts", "to be"]
    prompts = [runtime.tokenizer(t)["input_ids"] for t in texts]
    prefills = []  # rows of each prefill_rows call

    async def main():
        engine = DecoderEngine(runtime, EngineConfig(max_concurrency=4, max_queue=4, max_model_len=128), Metrics())
        await in_passing_thread(engine.start)
        await engine.warmup()
        params = SamplingParams(max_new_tokens=5, ignore_eos=True)
        alone = [await (await engine.submit(p, params, trace=True)).result() for p in prompts]
        prefill_rows = engine.decoder.prefill_rows
        engine.decoder.prefill_rows = lambda rows, *a: prefills.append(sorted(rows)) or prefill_rows(rows, *a)
        blocker = threading.Event()  # hold the compute thread so that the three arrive together
        held = asyncio.ensure_future(engine._outside_batch(blocker.wait))
        streams = [await engine.submit(p, params, trace=True) for p in prompts]
        blocker.set()
        await held
        together = [(await s.result()) for s in streams]
        await engine.shutdown(5)
        return alone, together

    try:
        alone, together = asyncio.run(main())
    finally:
        runtime.close()
    assert prefills == [[0, 1, 2]]
    assert [s.token_ids for s in together] == [s.token_ids for s in alone]
    # each request's trace: its own steps, the first (from the batched prefill) its own last prompt token's
    for mine, solo in zip(together, alone):
        assert [[layer["experts"] for layer in step.layers] for step in mine.steps] == \
            [[layer["experts"] for layer in step.layers] for step in solo.steps]
        assert len(mine.steps) == 5 and all(step.layers for step in mine.steps)
