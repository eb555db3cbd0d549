"""The step scheduler: every step of every session goes through one queue and runs in batches.

One decode token is a matrix-vector product per weight matrix; the steps of many sessions together
are one matrix-matrix product at nearly the same cost. The scheduler therefore never runs a step
alone if others are waiting: each pass takes every waiting step that fits the limits and runs them
as one batch (Span.forward_batch).

Each session's steps reach this peer at its own pace, one every so many milliseconds (its whole
route's round trip). Before a pass, the scheduler waits for the sessions due within `max_wait`
(never more than half a session's interval): sessions spread along a route's pipeline then meet
here once and from then on arrive together, so every pass carries all of them. A lone session
never waits, nor does anyone wait for a session that is late by more than `max_wait` (it paused)
or has closed, nor for part of a group of sessions that travel together when the rest would not fit.

Long inputs (prefills, forward calls) run in chunks of at most `max_tokens` tokens, so one long
prompt delays other sessions' decode steps by at most one chunk. Steps that were left out of a
pass go first in the next one, so no session starves.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, TypeVar

import torch

from peer.load import PeerLoad
from peer.metrics import PeerMetrics
from swarm.kv_cache import KVCache
from swarm.span import Span

logger = logging.getLogger(__name__)
T = TypeVar("T")


# Steps that left one place together (one LM head product, one batched push) reach this peer within a
# few ms of each other; a session expected later than this after the previous one travels in
# another group (docs/batching.md).
GROUP_SPREAD = 0.005


@dataclass
class _Pace:
    """When one session's steps reach this peer: its last arrival and the usual interval between two."""

    last: float
    rows: int
    period: float | None = None

    def arrived(self, now: float) -> None:
        interval = now - self.last
        self.period = interval if self.period is None else (self.period + interval) / 2
        self.last = now


@dataclass
class _Job:
    span: Span
    hidden: torch.Tensor  # [rows, positions, hidden]
    cache: KVCache
    mask: torch.Tensor | None
    future: asyncio.Future
    order: int
    done: int = 0  # positions computed so far
    skipped: int = 0  # passes this job waited through
    outputs: list[torch.Tensor] = field(default_factory=list)

    @property
    def rows(self) -> int:
        return self.hidden.shape[0]

    @property
    def remaining(self) -> int:
        return self.hidden.shape[1] - self.done


class StepScheduler:
    def __init__(self, compute: ThreadPoolExecutor, max_rows: int, max_tokens: int, max_wait: float,
                 metrics: PeerMetrics, load: PeerLoad, device: torch.device = torch.device("cpu")):
        self.compute, self.max_rows, self.max_tokens, self.max_wait = compute, max_rows, max_tokens, max_wait
        self.metrics, self.load, self.device = metrics, load, device  # the compute thread owns the device
        self.waiting: list[_Job] = []
        self.passes = self.batched_steps = 0  # what the batches looked like, reported by swarm.info
        self._arrivals = itertools.count()
        self._paces: dict[int, _Pace] = {}  # id(cache) -> when that session's steps arrive
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None

    async def run(self, span: Span, hidden: torch.Tensor, cache: KVCache, mask: torch.Tensor | None) -> torch.Tensor:
        """The output of `span` for new positions of one session; runs together with other sessions' steps."""
        span.check(hidden, cache)  # a bad step fails alone, before it can join a batch
        if self._task is None:
            self._task = asyncio.create_task(self._serve())
        loop = asyncio.get_running_loop()
        if (pace := self._paces.get(id(cache))) is None:
            self._paces[id(cache)] = _Pace(loop.time(), hidden.shape[0])
        else:
            pace.arrived(loop.time())
        future = loop.create_future()
        self.waiting.append(_Job(span, hidden, cache, mask, future, next(self._arrivals)))
        self._count_queued()
        self._wake.set()
        return await future

    async def on_device(self, work: Callable[..., T], *args: Any) -> T:
        """Other work that touches a GPU (allocating a session's cache), on the compute thread that owns it;
        on a CPU it is plain memory and runs here, so opening a session never waits for a pass."""
        if self.device.type == "cpu":
            return work(*args)
        return await asyncio.get_running_loop().run_in_executor(self.compute, work, *args)

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self.waiting:
                await self._gather()
                if not (batch := self._take()):
                    break
                steps = [self._next_chunk(job, positions) for job, positions in batch]
                started = loop.time()
                try:
                    outputs = await loop.run_in_executor(self.compute, batch[0][0].span.forward_batch, steps)
                except Exception as e:
                    logger.exception("batched step failed")
                    for job, _ in batch:
                        self._finish(job, e)
                    continue
                self.passes += 1
                self.batched_steps += len(batch)
                self.metrics.passes.inc()
                self.metrics.steps.inc(len(batch))
                self.metrics.rows_per_pass.observe(sum(job.rows for job, _ in batch))
                if all(positions == 1 for _, positions in batch):  # a decode pass: what a session's step waits here
                    self.load.passed(loop.time() - started, batch[0][0].span.num_blocks, sum(job.rows for job, _ in batch))
                for (job, positions), output in zip(batch, outputs):
                    job.outputs.append(output)
                    job.done += positions
                    if job.remaining == 0:
                        self._finish(job, None)

    async def _gather(self) -> None:
        """Wait briefly for the steps of sessions that are due here: they then share this pass."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.max_wait
        while (remaining := deadline - loop.time()) > 0 and self._worth_waiting(loop.time()):
            try:
                await asyncio.wait_for(self._wake.wait(), remaining)
            except asyncio.TimeoutError:
                return
            self._wake.clear()

    def _worth_waiting(self, now: float) -> bool:
        """Whether sessions due here should join this pass: those that fit, but never part of a group.

        A session is due at its last arrival plus its usual interval; we wait at most half an
        interval for it. One late by more than `max_wait` has paused: nobody waits for it. Sessions
        that travel together (a group of the pipeline) arrive together: if only part of the next
        group fits, the pass runs now and the group keeps its own. Taking part of it would leave the
        rest a whole round behind, and from then on the two groups would split each other at every
        peer, each pass waiting most of a round for its second half.
        """
        free = self.max_rows - sum(job.rows for job in self.waiting)
        present = {id(job.cache) for job in self.waiting}
        due = sorted(
            (pace.last + pace.period, pace.rows)
            for key, pace in self._paces.items()
            if key not in present and pace.period is not None
            and -min(self.max_wait, pace.period / 2) <= now - pace.last - pace.period <= self.max_wait
        )
        joining = 0  # the earliest due sessions that fit
        while joining < len(due) and due[joining][1] <= free:
            free -= due[joining][1]
            joining += 1
        if joining == 0:
            return False
        return joining == len(due) or due[joining][0] - due[joining - 1][0] > GROUP_SPREAD

    def _take(self) -> list[tuple[_Job, int]]:
        """The jobs of the next pass and how many positions of each: left-out jobs first, then short ones."""
        self.waiting = [job for job in self.waiting if not job.future.done()]  # the caller went away
        self.waiting.sort(key=lambda job: (-job.skipped, job.remaining * job.rows, job.order))
        batch: list[tuple[_Job, int]] = []
        rows = tokens = 0
        for job in self.waiting:
            blocks = (batch[0][0].span.start, batch[0][0].span.end) if batch else (job.span.start, job.span.end)
            positions = min(job.remaining, (self.max_tokens - tokens) // job.rows)
            fits = (job.span.start, job.span.end) == blocks and rows + job.rows <= self.max_rows and positions > 0
            if not batch:  # the first job always runs, if need be one position at a time
                fits, positions = True, max(positions, 1)
            if fits:
                batch.append((job, positions))
                rows, tokens = rows + job.rows, tokens + job.rows * positions
                job.skipped = 0
            else:
                job.skipped += 1
        taken = {id(job) for job, _ in batch}
        self.waiting = [job for job in self.waiting if id(job) not in taken] + [job for job, _ in batch]
        return batch

    @staticmethod
    def _next_chunk(job: _Job, positions: int) -> tuple[torch.Tensor, KVCache, torch.Tensor | None]:
        cut = slice(job.done, job.done + positions)
        return job.hidden[:, cut], job.cache, None if job.mask is None else job.mask[:, cut]

    def _finish(self, job: _Job, error: Exception | None) -> None:
        self.waiting.remove(job)
        self._count_queued()
        if job.future.done():
            return
        if error is not None:
            job.future.set_exception(error)
        else:
            job.future.set_result(torch.cat(job.outputs, dim=1))

    def _count_queued(self) -> None:
        self.metrics.queued.set(len(self.waiting))
        self.load.queued = len(self.waiting)

    def forget(self, cache: KVCache) -> None:
        """A session closed: nobody waits for its next step."""
        self._paces.pop(id(cache), None)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
