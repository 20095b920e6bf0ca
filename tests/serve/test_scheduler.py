"""The server's scheduler over a real engine (tiny random model, no HTTP): many concurrent jobs sharing a system
prompt get the replies they get alone, the shared prefix is prefilled once, a long prompt joins without stalling
the running streams, and the bound refuses at once."""

from __future__ import annotations

import asyncio

import pytest

from chatforge.generation.engine import Engine
from chatforge.serve.scheduler import QueueFull, Scheduler
from conftest import greedy_params as greedy, make_tokenizer, prompt_ids as ids, random_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return random_model(tok)


async def collect(job) -> list[int]:
    tokens = []
    async for _, delta in job.stream():
        tokens += delta.token_ids
    return tokens


def run_jobs(scheduler: Scheduler, prompts: list[list[int]], n: int) -> list[list[int]]:
    async def main():
        jobs = [scheduler.submit([p], [greedy(n)]) for p in prompts]
        return await asyncio.gather(*(collect(j) for j in jobs))

    try:
        return asyncio.run(main())
    finally:
        scheduler.close()


def test_concurrent_jobs_with_a_shared_system_prompt(tok, model):
    system = ids(48, 0)
    prompts = [system + ids(4 + i % 5, 100 + i) for i in range(12)]
    engine = Engine(model, tok, max_batch_size=4)
    got = run_jobs(Scheduler(engine, 4, max_queue=16), prompts, 10)
    alone = Engine(model, tok, max_batch_size=1, prefix_cache=False)
    assert got == [alone.generate_batch([p], greedy(10))[0].token_ids for p in prompts]
    # The first 4 are admitted together (no row holds the system prompt yet); every later one reuses it.
    assert engine.stats.cached_tokens >= 8 * 48
    assert engine.stats.prefill_tokens == engine.stats.prompt_tokens - engine.stats.cached_tokens


def test_a_long_prompt_prefills_in_chunks_while_a_stream_runs(tok, model):
    engine = Engine(model, tok, max_batch_size=2, prefill_chunk=8, prefix_cache=False)
    scheduler = Scheduler(engine, 2, max_queue=0)
    short, long = ids(4, 1), ids(90, 2)

    async def main():
        first = scheduler.submit([short], [greedy(40)])
        stream = first.stream()
        await stream.__anext__()  # the short request is running
        second = scheduler.submit([long], [greedy(5)])
        rest = asyncio.ensure_future(collect(second))
        tokens = [t async for _, d in stream for t in d.token_ids]
        return tokens, await rest

    try:
        _, late = asyncio.run(main())
    finally:
        scheduler.close()
    assert late == Engine(model, tok, prefix_cache=False).generate_batch([long], greedy(5))[0].token_ids
    assert engine.stats.prefill_forwards >= 90 // 8  # the long prompt took many steps, not one


def test_queue_bound_refuses_at_once(tok, model):
    scheduler = Scheduler(Engine(model, tok, max_batch_size=1), 1, max_queue=1)

    async def main():
        a = scheduler.submit([ids(5, 3)], [greedy(30)])
        b = scheduler.submit([ids(5, 4)], [greedy(30)])
        with pytest.raises(QueueFull, match=r"the server is busy \(2 sequences in progress, capacity 2\)"):
            scheduler.submit([ids(5, 5)], [greedy(30)])
        await asyncio.gather(collect(a), collect(b))

    try:
        asyncio.run(main())
    finally:
        scheduler.close()
    assert scheduler.outstanding == 0
