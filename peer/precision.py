"""The precision a peer computes in when --dtype is not given: the faster faithful one, measured on this machine.

Faithful means greedy tokens equal float32's (docs/models.md measures it): float32 and float16 are;
bfloat16, with 7 mantissa bits, diverged within a dozen tokens, so it is used only when asked for.
Which of the two is faster depends on the processor (float16 was 2.4x faster on one AMD CPU and
no faster on an Intel one), so it is measured, not assumed: decode steps through the model's first
block in each, taken in turns, best of each, cached like the throughput. float16 must win by a margin
to be chosen, since float32 is the closer to the reference. A GPU computes in float16 (peer/device.py).
"""
from __future__ import annotations

import logging

import torch

from peer.device import default_dtype
from peer.throughput import cached, measure_steps, measurement_key
from swarm.dtypes import DTypeName, QuantName
from swarm.reference import ResolvedModel
from swarm.span import Span

logger = logging.getLogger(__name__)
CANDIDATES: tuple[DTypeName, ...] = ("float32", "float16")
MARGIN = 1.15  # float16 is chosen only if this much faster than float32
ROUNDS = 3


def choose_dtype(model: ResolvedModel, device: torch.device, quant: QuantName) -> DTypeName:
    """float16 on a GPU; on a CPU the faster of float32 and float16 for this model, quantization and thread count."""
    if device.type != "cpu":
        return default_dtype(device)
    key = measurement_key("precision", model.dht_prefix, device, quant, threads=torch.get_num_threads())  # compute thread
    speeds = cached(key, lambda: _measure(model, device, quant))
    chosen = faster_dtype(speeds)
    logger.info(f"computing in {chosen}: decode steps per second through one block, "
                + ", ".join(f"{dtype} {speed:.0f}" for dtype, speed in speeds.items())
                + " (measured once on this machine; --dtype overrides)")
    return chosen


def faster_dtype(speeds: dict[str, float]) -> DTypeName:
    return "float16" if speeds["float16"] > MARGIN * speeds["float32"] else "float32"


def _measure(model: ResolvedModel, device: torch.device, quant: QuantName) -> dict[DTypeName, float]:
    spans = {dtype: Span(model, 0, 1, dtype, str(device), quant=quant) for dtype in CANDIDATES}
    best = dict.fromkeys(CANDIDATES, 0.0)
    for _ in range(ROUNDS):  # in turns, so a busy moment of the machine does not favour one
        for dtype, span in spans.items():
            best[dtype] = max(best[dtype], measure_steps(span))
    return best
