"""The client's shared LM head and the weight-major linear layers it and the spans use."""
from __future__ import annotations

import copy
import threading
import time

import pytest
import torch

from client.head import SharedHead
from swarm.client_parts import ClientParts
from swarm.linear import WeightMajorLinear, weight_major, widen_rows


def test_weight_major_linear_equals_f_linear():
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.Linear(96, 32, bias=False))
    expected = {n: module(torch.ones(n, 3, 64) * 0.1 * n) for n in (1, 2, 5)}  # 3, 6 and 15 rows
    weight_major(module)
    assert all(type(layer) is WeightMajorLinear for layer in module)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        for n, out in expected.items():  # weight-major: the same sums, other rounding
            got = module(torch.ones(n, 3, 64) * 0.1 * n)
            assert got.shape == out.shape and torch.allclose(got, out, rtol=1e-5, atol=1e-6)
        torch.set_num_threads(1)  # one thread: weight-major up to ONE_THREAD_MAX_ROWS rows, F.linear itself above
        assert torch.allclose(module(torch.ones(1, 3, 64) * 0.1), expected[1], rtol=1e-5, atol=1e-6)
        for n in (2, 5):
            x = torch.ones(n, 3, 64) * 0.1 * n
            first = torch.nn.functional.linear(x, module[0].weight, module[0].bias)
            assert torch.equal(module(x), torch.nn.functional.linear(first, module[1].weight))
    finally:
        torch.set_num_threads(threads)
    one = torch.randn(1, 1, 64)
    first = torch.nn.functional.linear(one, module[0].weight, module[0].bias)
    assert torch.equal(module(one), torch.nn.functional.linear(first, module[1].weight))


def test_float16_weight_major_linear_is_float16_rounding_of_the_exact_product():
    """One row multiplies in float16; from widen_rows() rows on, widened to float32: both within float16 rounding."""
    torch.manual_seed(0)
    layer = weight_major(torch.nn.Linear(64, 96)).half()
    exact_weight, exact_bias = layer.weight.double(), layer.bias.double()
    threads = torch.get_num_threads()
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            for rows in sorted({1, 2, widen_rows() - 1, widen_rows(), 32}):
                x = torch.randn(rows, 64).half()
                got = layer(x)
                exact = x.double() @ exact_weight.T + exact_bias
                assert got.dtype == torch.float16 and got.shape == (rows, 96)
                assert torch.allclose(got.double(), exact, rtol=2e-3, atol=2e-3), (count, rows)
    finally:
        torch.set_num_threads(threads)


def test_a_float32_head_reads_its_float16_copy_for_one_float16_row_only(default_model):
    """One row that came back from float16 peers: a float16 model's final norm and head (within float16
    rounding), close to the float32 head; several rows, float32 states or no copy: the float32 head itself."""
    torch.manual_seed(0)
    parts, plain = ClientParts(default_model, half_head=True), ClientParts(default_model)
    if parts.half_head is None:
        pytest.skip("one float16 row is not clearly faster than float32 on this CPU: the client keeps no copy")
    half_norm, half_weight = copy.deepcopy(plain.norm).half(), plain.lm_head.weight.half()
    rows = (torch.randn(4, default_model.config.hidden_size) * 3).half()  # float16-exact, as float16 peers send
    exact = plain.logits(rows.float())
    for i in range(len(rows)):
        got = parts.logits(rows[i:i + 1])
        wanted = torch.nn.functional.linear(half_norm(rows[i:i + 1]), half_weight).float()
        assert got.dtype == torch.float32 and torch.equal(got, got.half().float())  # computed in float16
        assert torch.allclose(got, wanted, rtol=1e-2, atol=2e-2)
        assert (got - exact[i]).abs().max() < 0.1 and got.argmax() == exact[i].argmax()
    assert torch.equal(parts.logits(rows), exact)
    one = plain.logits(rows[:1].float())
    assert torch.equal(parts.logits(rows[:1].float()), one) and torch.equal(plain.logits(rows[:1]), one)


class _Gate:
    """Logits whose first product holds until the other callers queue behind it; the second may fail."""

    def __init__(self, lm_head: torch.nn.Module, fail_second: bool = False):
        self.lm_head, self.fail_second, self.rows = lm_head, fail_second, []
        self.release = threading.Event()

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        self.rows.append(hidden.shape[0])
        if len(self.rows) == 1:
            self.release.wait(10)
        elif self.fail_second and len(self.rows) == 2:
            raise RuntimeError("out of memory")
        return self.lm_head(hidden)


def _wait_until(condition) -> None:
    deadline = time.monotonic() + 10
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.001)


def _concurrent_calls(gate: _Gate, inputs: list[torch.Tensor]) -> dict[int, torch.Tensor | BaseException]:
    """Caller 0 starts a product; callers 1.. queue behind it; then the product finishes."""
    head = SharedHead(gate, max_wait=0)
    results: dict[int, torch.Tensor | BaseException] = {}

    def call(i: int) -> None:
        try:
            results[i] = head(inputs[i], i)
        except RuntimeError as e:
            results[i] = e

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(inputs))]
    threads[0].start()
    _wait_until(lambda: gate.rows)
    for t in threads[1:]:
        t.start()
    _wait_until(lambda: len(head._waiting) == len(inputs) - 1)
    gate.release.set()
    for t in threads:
        t.join(10)
    results["after"] = head(inputs[0], 0)  # the head works on after a failed product
    return results


def test_shared_head_serves_concurrent_callers_in_one_product():
    torch.manual_seed(0)
    lm_head = weight_major(torch.nn.Linear(32, 1000, bias=False))
    inputs = [torch.randn(1 + i % 2, 32) for i in range(6)]
    gate = _Gate(lm_head)
    results = _concurrent_calls(gate, inputs)
    assert gate.rows == [1, sum(h.shape[0] for h in inputs[1:]), 1]  # the five queued callers: one product
    for i, h in enumerate(inputs):
        assert torch.allclose(results[i], lm_head(h), rtol=1e-5, atol=1e-6)


def test_shared_head_error_reaches_every_caller_of_the_failed_product():
    lm_head = torch.nn.Linear(32, 100, bias=False)
    inputs = [torch.randn(1, 32) for _ in range(4)]
    results = _concurrent_calls(_Gate(lm_head, fail_second=True), inputs)
    assert isinstance(results[0], torch.Tensor)
    assert all(isinstance(results[i], RuntimeError) and "out of memory" in str(results[i]) for i in (1, 2, 3))
    assert torch.allclose(results["after"], lm_head(inputs[0]))


def test_shared_head_waits_for_sessions_on_their_last_hop_only():
    """A session expected soon is waited for, so both share one product; a session that will not come
    (forgotten) or was never expected is not, nor one still silent after `quiet`, even with a minute
    of allowed wait."""
    rows: list[int] = []
    lm_head = torch.nn.Linear(8, 16, bias=False)
    head = SharedHead(lambda h: rows.append(h.shape[0]) or lm_head(h), max_wait=60, quiet=60)
    x = {key: torch.randn(1, 8) for key in "abc"}
    results = {}
    head.expect("a")
    head.expect("b")
    first = threading.Thread(target=lambda: results.update(a=head(x["a"], "a")))
    first.start()
    time.sleep(0.3)
    assert first.is_alive() and not rows  # "a" waits for "b"
    results["b"] = head(x["b"], "b")
    first.join(10)
    assert rows == [2] and all(torch.allclose(results[k], lm_head(x[k])) for k in "ab")
    head.expect("c")
    head.forget("c")  # its step failed: it will not ask
    started = time.monotonic()
    head(x["a"], "a")
    head(x["b"], "b")  # nobody expected at all
    assert rows == [2, 1, 1] and time.monotonic() - started < 5
    head.quiet = 0.05
    head.expect("c")  # on its last hop, but its pass is a later one: it stays silent
    started = time.monotonic()
    head(x["a"], "a")
    assert rows == [2, 1, 1, 1] and time.monotonic() - started < 5
