"""Open inference sessions and the KV cache budget they share.

A session reserves its whole cache (batch x max length) when it opens, so a peer refuses what it
cannot hold at once, and the process never runs out of memory halfway through someone's generation.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from peer.metrics import PeerMetrics
from swarm.kv_cache import KVCache
from swarm.errors import SwarmError
from swarm.protocol import ErrorCode
from swarm.span import Span


class SessionRefused(SwarmError):
    def __init__(self, code: ErrorCode, message: str):
        super().__init__(message)
        self.code = code


@dataclass
class Session:
    session_id: str
    span: Span  # the part of the peer's span this hop uses
    cache: KVCache
    push_token: str | None = None  # what a push must carry: only the client and the hops it told can push
    steps: int = 0  # steps computed: the number of the next one
    pushed_inputs: asyncio.Queue = field(default_factory=asyncio.Queue)  # inputs other peers pushed for this session


class SessionRegistry:
    def __init__(self, max_cache_tokens: int, metrics: PeerMetrics):
        self.max_cache_tokens, self.metrics = max_cache_tokens, metrics
        self.sessions: dict[str, Session] = {}
        self.accepting = True
        self._counted()

    def _counted(self) -> None:
        self.metrics.open_sessions.set(len(self.sessions))
        self.metrics.cache_tokens.labels("used").set(self.tokens_used)
        self.metrics.cache_tokens.labels("left").set(self.tokens_left)

    @property
    def tokens_used(self) -> int:
        return sum(s.cache.tokens for s in self.sessions.values())

    @property
    def tokens_left(self) -> int:
        return self.max_cache_tokens - self.tokens_used

    def reserve(self, session_id: str, batch_size: int, max_length: int) -> None:
        """Check that a session may open; raises SessionRefused with the reason."""
        if not self.accepting:
            raise SessionRefused("shutting_down", "peer is shutting down and accepts no new sessions")
        if session_id in self.sessions:
            raise SessionRefused("duplicate_session", f"session {session_id} is already open on this peer")
        needed = batch_size * max_length
        if needed > self.tokens_left:
            raise SessionRefused(
                "cache_full", f"cache full: session needs {needed} tokens, {self.tokens_left} of {self.max_cache_tokens} left"
            )

    def add(self, session: Session) -> None:
        self.reserve(session.session_id, session.cache.batch_size, session.cache.max_length)
        self.sessions[session.session_id] = session
        self._counted()

    def close(self, session_id: str) -> None:
        self.sessions.pop(session_id, None)
        self._counted()
