"""Linear layers computed weight-major: out^T = W @ x^T instead of out = x @ W^T.

Both are the same product, but BLAS libraries pick different kernels for them. When a few tokens
(one decode step per session) go through a [out, in] weight, `x @ W^T` is a short-and-wide
product that MKL runs far below memory speed, while `W @ x^T` is a tall-and-thin one it streams
through the weight at full speed. With several threads weight-major wins from 2 tokens up; with
one thread (peers sharing cores) it wins only for a few tokens, so one thread goes weight-major up
to ONE_THREAD_MAX_ROWS only (the measurements are in docs/batching.md). Results differ from
`F.linear` only in the rounding of the sums.

float16 weights on a CPU: one row is a matrix-vector product that reads half the bytes of float32,
the fastest of all, but CPUs without float16 arithmetic (AVX-512 FP16) multiply several rows
several times slower than in float32. So from a few rows on, the weight is widened to float32 for
the product (exactly: every float16 is a float32) and the result rounded back to float16.
"""
from __future__ import annotations

import torch

ONE_THREAD_MAX_ROWS = 5  # above this many tokens, one thread computes x @ W^T faster
FLOAT16_WIDEN_ROWS = 4  # from this many tokens on, one thread multiplies float16 weights in float32
FLOAT16_WIDEN_ROWS_THREADS = 8  # the same with several threads


class WeightMajorLinear(torch.nn.Linear):
    """A drop-in nn.Linear whose product puts the weight on the left when that is the faster kernel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if self.weight.dtype == torch.float16 and self.weight.device.type == "cpu" and rows >= widen_rows():
            bias = None if self.bias is None else self.bias.float()
            return product(x.float(), self.weight.float(), bias, rows).to(x.dtype)
        return product(x, self.weight, self.bias, rows)


def product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, rows: int) -> torch.Tensor:
    """x @ weight^T + bias, weight-major unless one row or one thread's many rows make F.linear the faster."""
    if rows == 1 or (rows > ONE_THREAD_MAX_ROWS and torch.get_num_threads() == 1):
        return torch.nn.functional.linear(x, weight, bias)  # one token: a matrix-vector product either way
    flat = x.reshape(-1, weight.shape[1]).T
    out = torch.mm(weight, flat) if bias is None else torch.addmm(bias[:, None], weight, flat)
    return out.T.contiguous().view(*x.shape[:-1], weight.shape[0])


def widen_rows() -> int:
    """Rows from which a float16 product on a CPU is faster widened to float32."""
    return FLOAT16_WIDEN_ROWS if torch.get_num_threads() == 1 else FLOAT16_WIDEN_ROWS_THREADS


def weight_major(module: torch.nn.Module) -> torch.nn.Module:
    """Switch every plain nn.Linear inside `module` to WeightMajorLinear, keeping its parameters."""
    for child in module.modules():
        if type(child) is torch.nn.Linear:
            child.__class__ = WeightMajorLinear
    return module
