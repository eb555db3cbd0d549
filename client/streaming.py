"""Tokens as they are decoded: transformers' generate run in a thread of its own, read as an iterator."""
from __future__ import annotations

import queue
import threading
from typing import TYPE_CHECKING, Iterator, cast

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

if TYPE_CHECKING:
    from client.model import DistributedModelForCausalLM


class Generation:
    """model.generate of one row in a thread of its own, handing its reader one token at a time.

    transformers' generate is a loop, not an iterator: it runs in a thread and hands each token over
    through its streamer, at most one step ahead of the reader. close() stops it after the step in
    flight, so the session holds exactly the tokens already read and the one being read.
    """

    def __init__(self, model: "DistributedModelForCausalLM", input_ids: torch.Tensor, **options):
        self._handed: queue.Queue[int | BaseException | None] = queue.Queue()
        self._wanted = threading.Semaphore(0)  # the reader asked for a token
        self._stopped = threading.Event()
        self._prompt_put = False
        criteria = StoppingCriteriaList([_StopWhen(self._stopped)])
        self._thread = threading.Thread(target=self._run, args=(model, input_ids, criteria, options),
                                        name="swarm-generation", daemon=True)
        self._thread.start()

    def _run(self, model: "DistributedModelForCausalLM", input_ids: torch.Tensor, criteria: StoppingCriteriaList,
             options: dict) -> None:
        try:
            model.generate(input_ids, streamer=self, stopping_criteria=criteria, **options)
        except BaseException as e:  # the reader raises it
            self._handed.put(e)
        finally:
            self._handed.put(None)

    def put(self, value: torch.Tensor) -> None:
        """transformers' streamer call: first the prompt, then each new token."""
        if not self._prompt_put:
            self._prompt_put = True
            return
        self._wanted.acquire()
        self._handed.put(int(value.reshape(-1)[0]))

    def end(self) -> None:
        pass

    def __iter__(self) -> Iterator[int]:
        while True:
            self._wanted.release()
            item = self._handed.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def close(self) -> None:
        self._stopped.set()
        self._wanted.release()  # a token waiting for its reader is handed over, and then the generation stops
        self._thread.join()


class _StopWhen(StoppingCriteria):
    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        return cast(torch.BoolTensor, torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool))
