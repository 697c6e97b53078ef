"""No request can hurt the next: however a request ends -- failing while it is admitted, while
it runs in the batch, while its output is taken, stopped or cancelled -- it gives back its
batch slot and KV pages, its sampler slot and its routing record, and the next request is
served as if nothing happened.

The engine runs here without HTTP, so the failures can be ones validation would now catch
at the edge (a seed past 2^64 - 1, a logit_bias token outside the vocabulary): the engine
must survive them anyway. Each case runs more times than there are batch slots, on every
engine: transformers' continuous batching, the static batched path (generate()), and
cadre's slot-cache decoder (CPU: eager steps), synchronous and pipelined (as on CUDA).
"""

import asyncio

import pytest
import torch

from server.decode_engine import DecoderEngine
from server.engine import Engine, EngineConfig
from server.metrics import Metrics
from server.sampling import SamplingParams
from server.threads import in_passing_thread
from server_live import tiny_runtime

SLOTS = 2
ROUNDS = SLOTS * 3  # a leak of one slot per failure would block the batch long before this


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    _, runtime = tiny_runtime(tmp_path_factory.mktemp("engine-release"))
    yield runtime
    runtime.close()




class PipelinedDecoderEngine(DecoderEngine):
    pipeline = True  # what CUDA gets; on CPU nothing overlaps, but the bookkeeping is the same


ENGINES = {"continuous-batching": (Engine, "continuous"), "static": (Engine, "static"), "decoder": (DecoderEngine, "auto"),
           "decoder-pipelined": (PipelinedDecoderEngine, "auto")}


@pytest.fixture(params=list(ENGINES))
def runtime(request, tiny):
    tiny.engine_class, tiny.batching = ENGINES[request.param]
    return tiny


async def started_engine(runtime) -> Engine:
    metrics = Metrics()
    config = EngineConfig(max_concurrency=SLOTS, max_queue=SLOTS, max_model_len=128, batching=runtime.batching)
    engine = runtime.engine_class(runtime, config, metrics)
    await in_passing_thread(engine.start)
    metrics.attach_runtime(engine.recorder, runtime.cache, engine.kv_pages_in_use)
    await engine.warmup()
    return engine


def run(runtime, scenario):
    async def main():
        engine = await started_engine(runtime)
        try:
            await scenario(engine)
        finally:
            await engine.shutdown(5)
    asyncio.run(main())


async def wait_until(predicate, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.01)


async def assert_released(engine: Engine) -> None:
    """Nothing held: batch slots, queue, sampler slots, routing records, handlers, pages, pins."""
    assert engine.num_running == 0 and engine.num_waiting == 0
    assert len(engine.samplers) == 0
    assert engine.recorder._requests == {}
    if engine.batching == "continuous":  # the manager's per-request handlers
        assert engine.manager.output_router.result_handlers == {}
    if engine.batching == "static":
        assert engine.manager._handlers == {}
    assert engine.metrics.requests_running._value.get() == 0
    await wait_until(lambda: engine.kv_pages_in_use() == 0)  # cancelled pages free at the loop's next step
    await wait_until(lambda: engine.runtime.cache.pinned() == 0)  # a forward still in flight holds its pins
    assert engine.is_alive


async def generate(engine: Engine, prompt: list[int], **params):
    stream = await engine.submit(prompt, SamplingParams(**{"max_new_tokens": 6, **params}), trace=False)
    return await stream.result()


async def assert_next_is_served(engine: Engine, prompt: list[int], expected: list[int]) -> None:
    stream = await generate(engine, prompt)
    assert stream.finish_reason == "length" and stream.token_ids == expected


def test_failures_release_everything_and_the_next_request_is_served(runtime):
    prompt = runtime.tokenizer("hello world")["input_ids"]
    bad_id = runtime.model.get_output_embeddings().weight.shape[0] + 5

    async def scenario(engine: Engine):
        expected = (await generate(engine, prompt)).token_ids
        # admission: the sampler cannot be built (torch.Generator rejects seeds past 2^64 - 1)
        for _ in range(ROUNDS):
            stream = await generate(engine, prompt, temperature=1.0, seed=2**64)
            assert stream.finish_reason == "error" and "Overflow" in stream.error, stream.error
            await assert_released(engine)
        await assert_next_is_served(engine, prompt, expected)
        # running: the row's processing fails on the compute thread; a request batched with it is unharmed
        for _ in range(ROUNDS):
            good = await engine.submit(prompt, SamplingParams(max_new_tokens=6), trace=False)
            bad = await generate(engine, prompt, logit_bias=((bad_id, 1.0),))
            assert bad.finish_reason == "error" and "IndexError" in bad.error, bad.error
            assert (await good.result()).token_ids == expected
            await assert_released(engine)
        await assert_next_is_served(engine, prompt, expected)

    run(runtime, scenario)


def test_failure_while_taking_output_releases_everything(runtime):
    prompt = runtime.tokenizer("hello world")["input_ids"]

    def broken(token_id: int) -> str:
        raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "cannot decode")

    async def scenario(engine: Engine):
        expected = (await generate(engine, prompt)).token_ids
        for _ in range(ROUNDS):
            stream = await engine.submit(prompt, SamplingParams(max_new_tokens=50), trace=False)
            stream.detokenizer.add = broken  # the event loop's side fails on the first token
            await stream.result()
            assert stream.finish_reason == "error" and "UnicodeDecodeError" in stream.error
            await assert_released(engine)
        await assert_next_is_served(engine, prompt, expected)

    run(runtime, scenario)


def test_cancelled_stopped_and_queued_requests_release_everything(runtime):
    prompt = runtime.tokenizer("hello world")["input_ids"]

    async def scenario(engine: Engine):
        expected = (await generate(engine, prompt)).token_ids
        text = runtime.tokenizer.decode(expected)
        for _ in range(ROUNDS):
            running = [await engine.submit(prompt, SamplingParams(max_new_tokens=100), trace=False)
                       for _ in range(SLOTS + 1)]  # the last one waits in the queue
            assert engine.num_waiting == 1
            await wait_until(lambda: len(running[0].token_ids) >= 2)
            for stream in running:
                stream.cancel()
            assert all(s.finish_reason == "cancelled" for s in running)
            await assert_released(engine)
            stopped = await generate(engine, prompt, max_new_tokens=20, stop=(text[2:4],))
            assert stopped.finish_reason == "stop"
            await assert_released(engine)
        await assert_next_is_served(engine, prompt, expected)

    run(runtime, scenario)


def test_sampling_results_follow_each_request(runtime):
    """The sampler's chosen token is the one the batch emits, token for token, with logprobs."""
    prompt = runtime.tokenizer("hello world")["input_ids"]

    async def scenario(engine: Engine):
        streams = [await engine.submit(prompt, SamplingParams(max_new_tokens=8, temperature=1.0, seed=s, logprobs=2),
                                       trace=False) for s in range(SLOTS)]
        for stream in streams:
            await stream.result()
            assert stream.finish_reason == "length" and len(stream.logprobs) == 8
            assert [e.token_id for e in stream.logprobs] == stream.token_ids
            assert all(len(e.top) == 2 and e.logprob <= e.top[0][1] + 1e-6 for e in stream.logprobs)
        await assert_released(engine)

    run(runtime, scenario)


def test_scoring_runs_outside_the_batch(runtime):
    """Prompt logprobs while requests decode: the same numbers as the model alone, and the
    running requests' tokens unchanged."""
    prompt = runtime.tokenizer("the cat sat on the mat")["input_ids"]

    async def scenario(engine: Engine):
        expected = (await generate(engine, prompt, max_new_tokens=20)).token_ids
        running = [await engine.submit(prompt, SamplingParams(max_new_tokens=20), trace=False) for _ in range(SLOTS)]
        scored = await engine.score(prompt, top_n=3)
        for stream in running:
            assert (await stream.result()).token_ids == expected
        with torch.no_grad():
            logits = runtime.model(torch.tensor([prompt]), use_cache=False).logits[0].float()
        reference = torch.log_softmax(logits[:-1], dim=-1)
        assert scored[0] is None and len(scored) == len(prompt)
        for t, entry in enumerate(scored[1:]):
            assert entry.token_id == prompt[t + 1]
            assert abs(entry.logprob - float(reference[t, prompt[t + 1]])) < 1e-5
            assert [i for i, _ in entry.top] == reference[t].topk(3).indices.tolist()
        await assert_released(engine)

    run(runtime, scenario)
