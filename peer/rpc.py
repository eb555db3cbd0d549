"""The peer's RPC handlers: inference sessions, stateless forward, and info.

Handlers run on the event loop and only parse, check and route; all model work goes through the
step scheduler, which batches steps of different sessions on the peer's compute thread, so a slow
step never stalls the DHT or other sessions' I/O.
"""
from __future__ import annotations

import asyncio
import logging
from typing import AsyncIterator, Callable

import torch
from hivemind.p2p import P2P, P2PContext
from hivemind.proto import runtime_pb2

from peer.scheduler import StepScheduler
from peer.sessions import Session, SessionRefused, SessionRegistry
from swarm import protocol
from swarm.errors import ProtocolError
from swarm.protocol import ErrorReply, Leaving, OpenSession, Opened, Step, StepResult
from swarm.cache import SpanCache
from swarm.span import Span

logger = logging.getLogger(__name__)
_LEAVING, _IDLE, _CLOSED = object(), object(), object()


class PeerService:
    def __init__(
        self,
        span: Span,
        sessions: SessionRegistry,
        scheduler: StepScheduler,
        info: Callable[[], protocol.PeerInfo],
        idle_timeout: float,
    ):
        self.span, self.sessions, self.scheduler, self.info = span, sessions, scheduler, info
        self.idle_timeout = idle_timeout
        self.leaving = asyncio.Event()
        self.steps_in_flight = 0

    async def register(self, p2p: P2P) -> None:
        ExpertRequest = runtime_pb2.ExpertRequest
        await p2p.add_protobuf_handler(protocol.INFERENCE, self.inference, ExpertRequest, stream_input=True, stream_output=True)
        # a stream, not a unary call: unary messages are capped at 4 MiB by the daemon
        await p2p.add_protobuf_handler(protocol.FORWARD, self.forward, ExpertRequest, stream_output=True)
        await p2p.add_protobuf_handler(protocol.INFO, self.rpc_info, ExpertRequest)

    async def rpc_info(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        return protocol.pack_response(self.info())

    async def forward(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        try:
            message, tensors = protocol.unpack_request(request)
            if not isinstance(message, protocol.ForwardRequest):
                raise ProtocolError(f"expected a forward request, got {message.type!r}")
            part = self.span.view(message.start, message.end)
            hidden, mask = protocol.check_inputs(tensors, self.span.config.hidden_size)
            output = await self._compute(part, hidden, part.new_cache(*hidden.shape[:2]), mask)
            return protocol.pack_response(StepResult(step=0, length=hidden.shape[1]), output.to(hidden.dtype))
        except ProtocolError as e:
            return protocol.pack_response(ErrorReply(code="bad_request", message=str(e)))
        except Exception as e:
            logger.exception("forward failed")
            return protocol.pack_response(ErrorReply(code="internal", message=f"internal error: {e}"))

    async def inference(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        session: Session | None = None
        requests = aiter(requests)
        try:
            while True:
                request = await self._next(requests)
                if request is _CLOSED:
                    return
                if request is _LEAVING:
                    yield protocol.pack_response(Leaving())
                    return
                if request is _IDLE:
                    yield protocol.pack_response(ErrorReply(code="idle", message=f"session idle for {self.idle_timeout:.0f} s, closed"))
                    return
                try:
                    message, tensors = protocol.unpack_request(request)
                    if session is None:
                        session = self._open(message, str(context.remote_id))
                        yield protocol.pack_response(Opened(session_id=session.session_id, cache_tokens_left=self.sessions.tokens_left))
                    else:
                        yield await self._step(session, message, tensors)
                except SessionRefused as e:
                    yield protocol.pack_response(ErrorReply(code=e.code, message=str(e)))
                    return
                except ProtocolError as e:
                    yield protocol.pack_response(ErrorReply(code="bad_request", message=str(e)))
        except Exception as e:
            logger.exception("inference session failed")
            yield protocol.pack_response(ErrorReply(code="internal", message=f"internal error: {e}"))
        finally:
            if session is not None:
                self.sessions.close(session.session_id)
                logger.info(f"session {session.session_id} closed after {session.steps} steps")

    def _open(self, message, remote: str) -> Session:
        if not isinstance(message, OpenSession):
            raise ProtocolError(f"the first message of a session must open it, got {message.type!r}")
        part = self.span.view(message.start, message.end)
        self.sessions.reserve(message.session_id, message.batch_size, message.max_length)
        session = Session(message.session_id, part, part.new_cache(message.batch_size, message.max_length), remote)
        self.sessions.add(session)
        logger.info(f"session {message.session_id} opened by {remote[-8:]}: blocks {message.start}:{message.end}, "
                    f"{message.batch_size}x{message.max_length} tokens")
        return session

    async def _step(self, session: Session, message, tensors: list[torch.Tensor]) -> runtime_pb2.ExpertResponse:
        if not isinstance(message, Step):
            raise ProtocolError(f"expected a step, got {message.type!r}")
        if message.session_id != session.session_id:
            return protocol.pack_response(ErrorReply(
                code="unknown_session", message=f"unknown session {message.session_id}: this stream carries {session.session_id}"))
        hidden, mask = protocol.check_inputs(tensors, self.span.config.hidden_size, session.cache.batch_size)
        output = await self._compute(session.span, hidden, session.cache, mask)
        session.steps += 1
        return protocol.pack_response(StepResult(step=message.step, length=session.cache.length), output.to(hidden.dtype))

    async def _compute(self, span: Span, hidden: torch.Tensor, cache: SpanCache, mask: torch.Tensor | None) -> torch.Tensor:
        self.steps_in_flight += 1
        try:
            return await self.scheduler.run(span, hidden, cache, mask)
        finally:
            self.steps_in_flight -= 1

    async def _next(self, requests):
        """The next request, or why there is none: the peer is leaving, the session idled, or it ended."""
        next_request = asyncio.ensure_future(anext(requests))
        leaving = asyncio.ensure_future(self.leaving.wait())
        done, _ = await asyncio.wait({next_request, leaving}, timeout=self.idle_timeout, return_when=asyncio.FIRST_COMPLETED)
        leaving.cancel()
        if next_request in done:
            try:
                return next_request.result()
            except StopAsyncIteration:
                return _CLOSED
        next_request.cancel()
        return _LEAVING if leaving in done else _IDLE

    async def drain(self, grace: float) -> None:
        """Let steps in flight finish (up to `grace` seconds), then tell every open session we leave."""
        deadline = asyncio.get_running_loop().time() + grace
        while self.steps_in_flight and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        self.leaving.set()
        await asyncio.sleep(0.2)  # let the streams send their Leaving message
