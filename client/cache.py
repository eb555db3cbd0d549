"""The swarm session as transformers' cache: generate() hands it from step to step as `past_key_values`."""
from __future__ import annotations

import torch
from transformers import Cache

from client.session import InferenceSession


class SessionCache(Cache):
    """To transformers, a cache holding the session's positions; the keys and values stay on the peers.

    Its length tells generate which positions are new, so only those are sent. Beam search's
    `reorder_cache` becomes the next step's reorder, which every peer of the route applies to its own cache.
    """

    def __init__(self, session: InferenceSession):
        super().__init__(layers=[])
        self.session = session

    @property
    def is_compileable(self) -> bool:  # nothing here to compile: the blocks run elsewhere
        return False

    @property
    def is_croppable(self) -> bool:  # a peer's cache only grows
        return False

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.session.position

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return self.session.max_length

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.session.reorder(beam_idx.tolist())

    def __repr__(self) -> str:
        return f"SessionCache(position={self.session.position}, route={[(h.start, h.end) for h in self.session.route]})"
