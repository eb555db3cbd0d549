"""Batched steps: several sessions in one pass must compute exactly what each computes alone.

These run in-process (spans and the peer's scheduler); test_generate.py drives concurrent
sessions through real peers.
"""
from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from peer.load import PeerLoad
from peer.metrics import PeerMetrics
from peer.scheduler import StepScheduler
from swarm.reference import resolve_model
from swarm.span import Span
from tiny_models import FAMILIES

PROMPT_LENGTHS = [3, 17, 9, 30]


def sessions(span: Span, batch_sizes: list[int], seed: int = 0):
    """Caches with prompts of different lengths already in them (row 0 of a batch-2 session left-padded)."""
    generator = torch.Generator().manual_seed(seed)
    caches, steps = [], []
    for length, rows in zip(PROMPT_LENGTHS, batch_sizes):
        hidden = torch.randn(rows, length, span.config.hidden_size, generator=generator)
        mask = torch.ones(rows, length, dtype=torch.long)
        mask[0, : length // 3] = 0
        caches.append(span.new_cache(rows, 64))
        steps.append((hidden, mask))
    return caches, steps


def new_scheduler(max_rows: int, max_tokens: int, max_wait: float) -> StepScheduler:
    return StepScheduler(ThreadPoolExecutor(max_workers=1), max_rows, max_tokens, max_wait, PeerMetrics(), PeerLoad())


def relative_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs() / (b.abs() + 1)).max().item()


@pytest.mark.parametrize("family", FAMILIES)  # windows cut the longer prompts; Mixtral routes them through experts
def test_batched_prefill_and_decode_equal_each_session_alone(family, tiny_model_path):
    span = Span(resolve_model(str(tiny_model_path(family))), 0, 5)
    alone, steps = sessions(span, [1, 2, 1, 2])
    batched, _ = sessions(span, [1, 2, 1, 2])
    expected = [span.forward(h, c, m) for (h, m), c in zip(steps, alone)]
    got = span.forward_batch([(h, c, m) for (h, m), c in zip(steps, batched)])
    assert max(relative_diff(g, e) for g, e in zip(got, expected)) < 1e-5
    for round in range(3):  # decode steps of sessions with different cache lengths, one with a prefill chunk
        new = [torch.randn(c.batch_size, 1 if i else 5, span.config.hidden_size) for i, c in enumerate(alone)]
        expected = [span.forward(h, c) for h, c in zip(new, alone)]
        got = span.forward_batch([(h, c, None) for h, c in zip(new, batched)])
        assert max(relative_diff(g, e) for g, e in zip(got, expected)) < 1e-5
    assert [c.length for c in batched] == [c.length for c in alone]
    assert all(torch.equal(b.seen, a.seen) for a, b in zip(alone, batched))


def test_default_model_batched_sessions_give_the_same_logits(default_chain, default_tokenizer):
    """Four real prompts of different lengths through the default model's three spans, prefill and
    eight decode steps batched, against each session alone: logits within 1e-4, same greedy tokens."""
    spans, parts = default_chain
    prompts = ["The capital of France is", "def fibonacci(n):", "Hi", "Once upon a time, in a small village by the sea,"]
    ids = [default_tokenizer(p, return_tensors="pt").input_ids for p in prompts]
    alone = [[span.new_cache(1, 64) for span in spans] for _ in prompts]
    batched = [[span.new_cache(1, 64) for span in spans] for _ in prompts]
    new_ids = ids
    for step in range(9):
        expected, got = [], [parts.embed(i) for i in new_ids]
        for session, i in enumerate(new_ids):
            hidden = parts.embed(i)
            for span, cache in zip(spans, alone[session]):
                hidden = span.forward(hidden, cache)
            expected.append(parts.logits(hidden[:, -1]))
        for index, span in enumerate(spans):
            got = span.forward_batch([(h, caches[index], None) for h, caches in zip(got, batched)])
        got = [parts.logits(h[:, -1]) for h in got]
        assert max((g - e).abs().max().item() for g, e in zip(got, expected)) < 1e-4, f"step {step}"
        assert [g.argmax(-1).tolist() for g in got] == [e.argmax(-1).tolist() for e in expected]
        new_ids = [e.argmax(-1, keepdim=True) for e in expected]


def test_scheduler_batches_waiting_steps_and_chunks_long_prefills(tiny_model_path):
    span = Span(resolve_model(str(tiny_model_path("llama"))), 0, 5)
    hidden = span.config.hidden_size
    long_prompt = torch.randn(1, 40, hidden)
    decodes = [torch.randn(1, 1, hidden) for _ in range(4)]

    async def scenario():
        scheduler = new_scheduler(max_rows=8, max_tokens=8, max_wait=0.02)
        caches = [span.new_cache(1, 64) for _ in range(5)]
        finished: list[str] = []

        async def run(name, h, cache):
            out = await scheduler.run(span, h, cache, None)
            finished.append(name)
            return out

        prefill = asyncio.create_task(run("prefill", long_prompt, caches[0]))
        await asyncio.sleep(0)  # the prefill's first chunk starts alone
        steps = [asyncio.create_task(run(f"decode{i}", h, c)) for i, (h, c) in enumerate(zip(decodes, caches[1:]))]
        outputs = await asyncio.gather(prefill, *steps)
        await scheduler.close()
        return outputs, finished, scheduler

    outputs, finished, scheduler = asyncio.run(scenario())
    # 40 prefill tokens at most 8 per pass: every pass carries a chunk of it, and the decode steps ride along
    # in those passes instead of waiting for the whole prefill or taking passes of their own
    assert finished.index("prefill") == len(finished) - 1
    assert scheduler.passes >= 5 and scheduler.batched_steps == scheduler.passes + len(decodes)
    expected = [span.forward(h, span.new_cache(1, 64)) for h in [long_prompt, *decodes]]
    assert max(relative_diff(g, e) for g, e in zip(outputs, expected)) < 1e-5


def test_scheduler_rejects_a_bad_step_without_harming_the_batch(tiny_model_path):
    span = Span(resolve_model(str(tiny_model_path("llama"))), 0, 5)
    hidden = span.config.hidden_size

    async def scenario():
        scheduler = new_scheduler(max_rows=8, max_tokens=64, max_wait=0.02)
        full = span.new_cache(1, 2)
        good = asyncio.create_task(scheduler.run(span, torch.randn(1, 3, hidden), span.new_cache(1, 8), None))
        with pytest.raises(Exception, match="exceed the session's max length"):
            await scheduler.run(span, torch.randn(1, 3, hidden), full, None)
        result = await good
        await scheduler.close()
        return result

    assert asyncio.run(scenario()).shape == (1, 3, hidden)


def test_scheduler_brings_sessions_out_of_phase_together(tiny_model_path):
    """Two sessions stepping at the same pace, half a period apart: once the peer knows their pace, it
    waits for the later one and from then on both share every pass. Nobody waits for a lone session, for
    one that closed, or when the waiting steps fill the pass, even with a long max_wait."""
    span = Span(resolve_model(str(tiny_model_path("llama"))), 0, 2)
    hidden = span.config.hidden_size

    async def session(scheduler, cache, steps, period, delay=0.0):
        await asyncio.sleep(delay)
        for _ in range(steps):
            await scheduler.run(span, torch.randn(1, 1, hidden), cache, None)
            await asyncio.sleep(period)  # the rest of the route
        scheduler.forget(cache)

    async def out_of_phase():
        scheduler = new_scheduler(max_rows=8, max_tokens=64, max_wait=0.1)
        caches = [span.new_cache(1, 64) for _ in range(2)]
        await asyncio.gather(session(scheduler, caches[0], 12, 0.08), session(scheduler, caches[1], 12, 0.08, 0.04))
        await scheduler.close()
        return scheduler

    scheduler = asyncio.run(out_of_phase())
    assert scheduler.batched_steps == 24
    assert scheduler.passes <= 24 - 8, f"{scheduler.passes} passes: the sessions rarely met"

    async def never_waits():
        scheduler = new_scheduler(max_rows=8, max_tokens=64, max_wait=60)
        await asyncio.wait_for(session(scheduler, span.new_cache(1, 64), 5, 0.01), 30)  # alone
        await session(scheduler, span.new_cache(1, 64), 3, 0.01)  # closes (forget) after 3 steps
        await asyncio.wait_for(session(scheduler, span.new_cache(1, 64), 3, 0.01), 30)
        await scheduler.close()

    async def full_pass_never_waits():
        scheduler = new_scheduler(max_rows=1, max_tokens=64, max_wait=60)
        paused = span.new_cache(1, 64)
        for _ in range(3):
            await scheduler.run(span, torch.randn(1, 1, hidden), paused, None)
            await asyncio.sleep(0.01)
        # `paused` is due from now on for max_wait (60 s), but one row already fills a pass
        await asyncio.wait_for(session(scheduler, span.new_cache(1, 64), 3, 0.01), 30)
        await scheduler.close()

    asyncio.run(never_waits())
    asyncio.run(full_pass_never_waits())


def test_scheduler_never_takes_part_of_a_group(tiny_model_path):
    """Two steps wait and a group of four sessions is due, with room for two of them: the pass runs now.

    Waiting for the group would take half of it and leave the rest a whole round behind; on a route
    through several peers the two groups then split each other at every peer, and every pass waits
    most of a round for its second half (8 sessions on three peers ran at two thirds of their speed).
    """
    span = Span(resolve_model(str(tiny_model_path("llama"))), 0, 2)
    hidden = span.config.hidden_size

    async def scenario() -> tuple[float, int]:
        scheduler = new_scheduler(max_rows=4, max_tokens=64, max_wait=1.0)
        group = [span.new_cache(1, 64) for _ in range(4)]
        pair = [span.new_cache(1, 64) for _ in range(2)]

        def steps(caches):
            return asyncio.gather(*(scheduler.run(span, torch.randn(1, 1, hidden), c, None) for c in caches))

        for gap in (0.2, 0.2, 0.15):  # the peer learns the group's pace (together, every 0.2 s); due in 0.05 s
            await steps(group)
            await asyncio.sleep(gap)
        started = time.perf_counter()
        await steps(pair)
        waited = time.perf_counter() - started
        passes = scheduler.passes
        await steps(group)
        group_passes = scheduler.passes - passes
        await scheduler.close()
        return waited, group_passes

    waited, group_passes = asyncio.run(scenario())
    assert waited < 0.05, f"the two steps waited {waited:.3f} s for a group that could not join them whole"
    assert group_passes == 1, f"the group took {group_passes} passes"
