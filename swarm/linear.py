"""Linear layers computed weight-major: out^T = W @ x^T instead of out = x @ W^T.

Both are the same product, but BLAS libraries pick different kernels for them. When a few tokens
(one decode step per session) go through a [out, in] weight, `x @ W^T` is a short-and-wide
product that MKL runs far below memory speed, while `W @ x^T` is a tall-and-thin one it streams
through the weight at full speed. With several threads weight-major wins from 2 tokens up; with
one thread (peers sharing cores) it wins only for a few tokens, so one thread goes weight-major up
to ONE_THREAD_MAX_ROWS only (the measurements are in docs/batching.md). Results differ from
`F.linear` only in the rounding of the sums.
"""
from __future__ import annotations

import torch

ONE_THREAD_MAX_ROWS = 5  # above this many tokens, one thread computes x @ W^T faster


class WeightMajorLinear(torch.nn.Linear):
    """A drop-in nn.Linear whose product puts the weight on the left when that is the faster kernel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if rows == 1 or (rows > ONE_THREAD_MAX_ROWS and torch.get_num_threads() == 1):
            return super().forward(x)  # one token: a matrix-vector product either way; one thread: the faster kernel
        flat = x.reshape(-1, self.in_features).T
        out = torch.mm(self.weight, flat) if self.bias is None else torch.addmm(self.bias[:, None], self.weight, flat)
        return out.T.contiguous().view(*x.shape[:-1], self.out_features)


def weight_major(module: torch.nn.Module) -> torch.nn.Module:
    """Switch every plain nn.Linear inside `module` to WeightMajorLinear, keeping its parameters."""
    for child in module.modules():
        if type(child) is torch.nn.Linear:
            child.__class__ = WeightMajorLinear
    return module
