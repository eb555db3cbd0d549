"""The throughput a peer announces: measured once per model, settings and hardware, then read from the cache."""
from __future__ import annotations

import json

from peer import throughput
from swarm.reference import resolve_model
from swarm.span import Span


def test_throughput_is_cached_per_hardware(tiny_model_path, tmp_path, monkeypatch):
    monkeypatch.setenv("SWARM_CACHE_DIR", str(tmp_path))
    span = Span(resolve_model(str(tiny_model_path("llama"))), 0, 2)
    assert throughput.measure_throughput(span) > 0
    path = tmp_path / "throughput.json"
    (key,) = json.loads(path.read_text())
    assert key.endswith(throughput.hardware(span.device)) and "torch" in key

    path.write_text(json.dumps({key: 1234.5}))  # a later start reads the figure, it does not measure again
    assert throughput.measure_throughput(span) == 1234.5

    monkeypatch.setattr(throughput, "hardware", lambda device: "another CPU:torch 9")  # moved, or torch upgraded
    fresh = throughput.measure_throughput(span)
    assert fresh != 1234.5 and fresh > 0
    assert len(json.loads(path.read_text())) == 2
