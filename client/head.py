"""The LM head shared by concurrent generations of one client (a gateway, a benchmark, a batch job).

The head is the biggest matrix a client holds (vocab x hidden), and on a CPU one token through it
costs nearly as much as several. So concurrent sessions
do not each run their own product: whoever finds the head idle computes every request waiting at
that moment, the others wait for their share. Before computing, it waits up to `max_wait` for the
sessions whose step is on its last hop: the last peer answers the sessions of one batched pass one
after the other, and without the wait those answers would each take a product of their own. It
stops waiting after `quiet` seconds without a request (the rest are in a later pass), and a lone
generation never waits. A side effect helps the peers too: sessions whose logits came out of
one product send their next tokens together, so the peers batch those steps (peer/scheduler.py).
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Callable, Hashable

import torch


# The last peer answers the sessions of one pass back to back, a few ms apart, while a session in a
# later pass comes tens of ms later (docs/batching.md). After this much quiet, the sessions still on
# their last hop are in a later pass: stop waiting for them.
QUIET = 0.005


@dataclass
class _Request:
    key: Hashable  # the session asking
    hidden: torch.Tensor  # [rows, hidden]
    logits: torch.Tensor | None = None
    error: BaseException | None = None


class SharedHead:
    def __init__(self, logits: Callable[[torch.Tensor], torch.Tensor], max_wait: float, quiet: float = QUIET):
        self._logits, self.max_wait, self.quiet = logits, max_wait, quiet
        self._waiting: list[_Request] = []
        self._coming: set[Hashable] = set()  # sessions whose step is on its last hop: they ask soon
        self._latest = 0.0  # when the latest request came
        self._arrival = threading.Condition()  # guards _waiting and _coming; notified on every request
        self._computing = threading.Lock()  # held by the thread computing a product for everyone waiting

    def __call__(self, hidden: torch.Tensor, key: Hashable) -> torch.Tensor:
        """Logits for `hidden` [rows, hidden] of session `key`, computed in one product with other sessions'."""
        request = _Request(key, hidden)
        with self._arrival:
            self._coming.discard(key)
            self._waiting.append(request)
            self._latest = time.monotonic()
            self._arrival.notify_all()
        with self._computing:
            if request.logits is None and request.error is None:  # nobody took it along: compute all waiting
                self._compute(self._gather())
        if request.error is not None:
            raise request.error
        assert request.logits is not None  # computed by us or by whoever took it along
        return request.logits

    def expect(self, key: Hashable) -> None:
        """Session `key` will ask soon: its step reached the last hop of its route."""
        with self._arrival:
            self._coming.add(key)

    def forget(self, key: Hashable) -> None:
        """Session `key` will not ask after all: its step failed."""
        with self._arrival:
            self._coming.discard(key)
            self._arrival.notify_all()

    def _gather(self) -> list[_Request]:
        """Every waiting request, after waiting briefly for the sessions that are about to ask."""
        with self._arrival:
            deadline = time.monotonic() + self.max_wait
            while self._coming and (now := time.monotonic()) < (until := min(deadline, self._latest + self.quiet)):
                self._arrival.wait(until - now)
            batch, self._waiting = self._waiting, []
        return batch

    def _compute(self, batch: list[_Request]) -> None:
        try:
            logits = self._logits(torch.cat([r.hidden for r in batch]))
        except BaseException as e:  # every waiting caller gets the error, none hangs
            for r in batch:
                r.error = e
            return
        for r, part in zip(batch, logits.split([r.hidden.shape[0] for r in batch])):
            r.logits = part
