"""The KV cache of one session on one span. Its owner (a peer, per session) decides its lifetime."""
from __future__ import annotations

import torch


class KVCache:
    """Preallocated keys and values for every block of a span, plus which positions hold real tokens.

    Preallocation makes a session's memory known when it opens, so a peer can refuse what it cannot
    hold instead of running out of memory halfway through a generation.
    """

    def __init__(
        self,
        first_block: int,
        num_blocks: int,
        batch_size: int,
        max_length: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ):
        shape = (num_blocks, batch_size, num_kv_heads, max_length, head_dim)
        self.first_block = first_block
        self.max_length = max_length
        # empty, not zeros: allocation is instant and positions past `length` are never read;
        # one view per block, so a layer's update indexes no more than its positions
        self.keys = torch.empty(shape, dtype=dtype, device=device).unbind(0)
        self.values = torch.empty(shape, dtype=dtype, device=device).unbind(0)
        self.valid = torch.zeros(batch_size, max_length, dtype=torch.bool, device=device)
        self.seen = torch.zeros(batch_size, dtype=torch.long, device=device)  # real tokens per row
        self.length = 0  # positions filled, real or padding

    @property
    def batch_size(self) -> int:
        return self.valid.shape[0]

    @property
    def tokens(self) -> int:
        """Token slots this cache reserves: what a peer's cache budget counts."""
        return self.batch_size * self.max_length

    def update(self, keys: torch.Tensor, values: torch.Tensor, layer_idx: int, *_) -> tuple[torch.Tensor, torch.Tensor]:
        """Called by transformers' attention: store the new positions, return all positions so far.

        A cache kept in another precision than the compute (--cache-dtype) is returned in the compute's.
        """
        block_keys, block_values = self.keys[layer_idx - self.first_block], self.values[layer_idx - self.first_block]
        end = self.length + keys.shape[2]
        block_keys[:, :, self.length : end] = keys
        block_values[:, :, self.length : end] = values
        return block_keys[:, :, :end].to(keys.dtype), block_values[:, :, :end].to(values.dtype)

    def reorder(self, rows: list[int]) -> None:
        """Beam search: row i becomes what row rows[i] was, in every block (the positions so far only)."""
        index = torch.tensor(rows, device=self.valid.device)
        for block in (*self.keys, *self.values):
            block[:, :, : self.length] = block[:, :, : self.length].index_select(0, index)
        self.valid = self.valid.index_select(0, index)
        self.seen = self.seen.index_select(0, index)
