"""The LM head shared by concurrent generations of one client (a gateway, a benchmark, a batch job).

The head is the biggest matrix a client holds (vocab x hidden: 49152 x 576 for SmolLM2), and on a
CPU one token through it costs about as much as eight. So concurrent sessions do not each run
their own product: whoever finds the head idle computes every request waiting at that moment, the
others wait for their share. Nobody waits for a timer, so a lone generation runs exactly as fast
as without sharing. A side effect helps the peers too: sessions whose logits came out of one
product send their next tokens together, so the peers batch those steps (peer/scheduler.py).
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class _Request:
    hidden: torch.Tensor  # [rows, hidden]
    logits: torch.Tensor | None = None
    error: BaseException | None = None


class SharedHead:
    def __init__(self, logits: Callable[[torch.Tensor], torch.Tensor]):
        self._logits = logits
        self._waiting: list[_Request] = []
        self._waiting_lock = threading.Lock()
        self._computing = threading.Lock()  # held by the thread computing a product for everyone waiting

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits for `hidden` [rows, hidden], computed in one product with other threads' requests."""
        request = _Request(hidden)
        with self._waiting_lock:
            self._waiting.append(request)
        with self._computing:
            if request.logits is None and request.error is None:  # nobody took it along: compute all waiting
                with self._waiting_lock:
                    batch, self._waiting = self._waiting, []
                self._compute(batch)
        if request.error is not None:
            raise request.error
        return request.logits

    def _compute(self, batch: list[_Request]) -> None:
        try:
            logits = self._logits(torch.cat([r.hidden for r in batch]))
        except BaseException as e:  # every waiting caller gets the error, none hangs
            for r in batch:
                r.error = e
            return
        for r, part in zip(batch, logits.split([r.hidden.shape[0] for r in batch])):
            r.logits = part
