"""Pipelined decode steps (DecoderEngine.pipeline, on by default on CUDA): each step is queued,
fed on the device by the last one's argmax, before the host reads the last one's tokens. A
request must get exactly the tokens and the routing trace the synchronous engine gives it:
when it stops on a stop token (the step queued past it is dropped), when its row is freed
and taken by the next request, and when a sampled request in the batch makes its steps run
synchronously."""

import asyncio

import pytest

from server.decode_engine import DecoderEngine
from server.engine import EngineConfig
from server.metrics import Metrics
from server.sampling import SamplingParams
from server.threads import in_passing_thread
from server_live import tiny_runtime


@pytest.fixture(scope="module", params=["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def runtime(request, tmp_path_factory):
    """On the CPU the bookkeeping runs without the overlap; on CUDA the steps are graphs and each
    step's routing is copied behind it and emitted when the step is read (Decoder.defer_routing)."""
    _, runtime = tiny_runtime(tmp_path_factory.mktemp("pipeline"), device=request.param)
    yield runtime
    runtime.close()


def trace(stream) -> list[list[list[int]]]:
    """Per generated token, per MoE layer: the experts its step routed this request's token to."""
    return [[layer["experts"] for layer in step.layers] for step in stream.steps]


def serve(runtime, pipeline: bool, requests) -> tuple[list, dict]:
    """Run `requests(engine)` (an async function returning finished streams) on a decoder engine;
    also count its pipelined and synchronous decode steps."""
    steps = {"queued": 0, "synchronous": 0}

    async def main():
        engine = DecoderEngine(runtime, EngineConfig(max_concurrency=4, max_queue=16, max_model_len=128), Metrics())
        engine.pipeline = pipeline
        await in_passing_thread(engine.start)
        await engine.warmup()
        decode, decode_queued = engine.decoder.decode, engine.decoder.decode_queued
        engine.decoder.decode = lambda *a: steps.__setitem__("synchronous", steps["synchronous"] + 1) or decode(*a)
        engine.decoder.decode_queued = lambda *a: steps.__setitem__("queued", steps["queued"] + 1) or decode_queued(*a)
        try:
            return await requests(engine)
        finally:
            await engine.shutdown(5)

    return asyncio.run(main()), steps


def test_pipelined_steps_give_each_request_the_synchronous_tokens_and_trace(runtime):
    prompts = [runtime.tokenizer(t)["input_ids"] for t in ("hello world", "to be or not", "the cache holds")]
    stop = serve(runtime, False, lambda e: _one(e, prompts[1], SamplingParams(max_new_tokens=9, ignore_eos=True)))[0]
    stop_token = stop.token_ids[3]  # the second request will stop there, mid-batch

    async def requests(engine):
        first = [await engine.submit(prompts[0], SamplingParams(max_new_tokens=11, ignore_eos=True), trace=True),
                 await engine.submit(prompts[1], SamplingParams(max_new_tokens=9, ignore_eos=True,
                                                                stop_token_ids=(stop_token,)), trace=True)]
        await first[1].result()  # its row is free now: the next request takes it while the first decodes
        later = await engine.submit(prompts[2], SamplingParams(max_new_tokens=5, ignore_eos=True), trace=True)
        for stream in (*first, later):
            await stream.result()
        return [*first, later]

    synchronous, sync_steps = serve(runtime, False, requests)
    pipelined, steps = serve(runtime, True, requests)
    assert sync_steps["queued"] == 0 and steps["synchronous"] == 0 and steps["queued"] > 0
    assert pipelined[1].finish_reason == "stop" and pipelined[1].token_ids[-1] == stop_token
    assert len(pipelined[1].token_ids) == stop.token_ids.index(stop_token) + 1
    for mine, reference in zip(pipelined, synchronous):
        assert (mine.finish_reason, mine.token_ids) == (reference.finish_reason, reference.token_ids)
        assert trace(mine) == trace(reference) and all(trace(mine))


def test_a_sampled_request_makes_the_batch_synchronous_and_keeps_its_seeded_tokens(runtime):
    prompt = runtime.tokenizer("hello world")["input_ids"]

    async def requests(engine):
        greedy = await engine.submit(prompt, SamplingParams(max_new_tokens=12, ignore_eos=True), trace=False)
        await asyncio.sleep(0)
        sampled = await engine.submit(prompt, SamplingParams(max_new_tokens=4, temperature=0.9, seed=5,
                                                             ignore_eos=True), trace=False)
        for stream in (greedy, sampled):
            await stream.result()
        return [greedy, sampled]

    synchronous, _ = serve(runtime, False, requests)
    pipelined, steps = serve(runtime, True, requests)
    assert steps["synchronous"] > 0  # the sampled request's steps
    assert [s.token_ids for s in pipelined] == [s.token_ids for s in synchronous]


async def _one(engine, prompt, params):
    stream = await engine.submit(prompt, params, trace=True)
    await stream.result()
    return stream


def test_a_mixed_crowd_leaves_every_greedy_request_its_solo_tokens_and_nothing_held(runtime):
    """Greedy, sampled and stopped requests, some cancelled mid-stream, arriving in bursts past
    the engine's four rows: with steps pipelined, every greedy request that ran to its end has
    the tokens it has alone, and afterwards no row, sampler or routing record is held."""
    texts = ["hello world", "to be or not", "the cache holds", "a model of experts", "once upon a time"]
    prompts = [runtime.tokenizer(t)["input_ids"] for t in texts]
    greedy = lambda n: SamplingParams(max_new_tokens=n, ignore_eos=True)

    async def alone(engine):
        return [await _one(engine, p, greedy(6 + i)) for i, p in enumerate(prompts)]

    solo = [s.token_ids for s in serve(runtime, False, alone)[0]]

    async def crowd(engine):
        streams, cancelled = [], []
        for wave in range(3):
            for i, prompt in enumerate(prompts):
                params = (greedy(6 + i) if (wave + i) % 3 else
                          SamplingParams(max_new_tokens=5, temperature=0.8, seed=wave * 10 + i, ignore_eos=True))
                streams.append((i, params, await engine.submit(prompt, params, trace=wave == 1)))
            victim = streams[-len(prompts)][2]  # the wave's first: running by now, or soon
            for _ in range(200):
                if victim.finished or len(victim.token_ids) >= 2:
                    break
                await asyncio.sleep(0.005)
            if not victim.finished:  # cancelled mid-stream, a step of it likely queued
                victim.cancel()
                cancelled.append(victim)
        for _, _, stream in streams:
            await stream.result()
        assert engine.num_running == 0 and len(engine.samplers) == 0 and engine.recorder._requests == {}
        assert engine.kv_pages_in_use() == 0 and engine.is_alive
        return [(i, params, stream, stream in cancelled) for i, params, stream in streams]

    done, steps = serve(runtime, True, crowd)
    assert steps["queued"] > 0 and steps["synchronous"] > 0
    for i, params, stream, was_cancelled in done:
        if was_cancelled:
            assert stream.finish_reason in ("cancelled", "length")
        elif params.temperature == 0:
            assert (stream.finish_reason, stream.token_ids) == ("length", solo[i])
        else:
            assert stream.finish_reason == "length" and len(stream.token_ids) == 5
