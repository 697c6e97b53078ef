"""A new request takes the decoder engine's lowest free row: a step decodes every row below the
highest in use, so a lone request after a burst that ended out of order must decode as a batch
of one, not as the burst's width with padding rows routed and computed."""

import asyncio

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
