"""The peer's RPC handlers: inference sessions, pushes from other peers, stateless forward, and info.

Handlers run on the event loop and only parse, check and route; all model work goes through the
step scheduler, which batches steps of different sessions on the peer's compute thread, so a slow
step never stalls the DHT or other sessions' I/O.
"""
from __future__ import annotations

import asyncio
import enum
import hmac
import logging
import time
from dataclasses import dataclass
from typing import AsyncIterator

import torch
from hivemind.p2p import P2P, P2PContext
from hivemind.proto import runtime_pb2

import swarm
from peer.announcer import Announcer
from peer.metrics import PeerMetrics
from peer.push import Pusher
from peer.scheduler import StepScheduler
from peer.sessions import Session, SessionRefused, SessionRegistry
from swarm import protocol
from swarm.errors import ProtocolError
from swarm.kv_cache import KVCache
from swarm.membership import NOT_MEMBER, SwarmKey, admits_call
from swarm.protocol import ErrorReply, Leaving, Opened, OpenSession, PushReply, Step, StepResult
from swarm.span import Span

logger = logging.getLogger(__name__)
PUSH_ACK_WAIT = 1.0  # how long a step's result waits to tell the client its push was accepted


class PeerService:
    def __init__(
        self,
        span: Span,
        sessions: SessionRegistry,
        scheduler: StepScheduler,
        pusher: Pusher,
        announcer: Announcer,
        metrics: PeerMetrics,
        idle_timeout: float,
        swarm_key: SwarmKey | None = None,
    ):
        self.span, self.sessions, self.scheduler, self.pusher, self.announcer = span, sessions, scheduler, pusher, announcer
        self.metrics, self.swarm_key = metrics, swarm_key
        self.idle_timeout = idle_timeout
        self.leaving = asyncio.Event()
        self.steps_in_flight = 0

    async def register(self, p2p: P2P) -> None:
        ExpertRequest = runtime_pb2.ExpertRequest
        await p2p.add_protobuf_handler(protocol.INFERENCE, self.inference, ExpertRequest, stream_input=True, stream_output=True)
        # a stream, not a unary call: unary messages are capped at 4 MiB by the daemon
        await p2p.add_protobuf_handler(protocol.FORWARD, self.forward, ExpertRequest, stream_output=True)
        await p2p.add_protobuf_handler(protocol.INFO, self.rpc_info, ExpertRequest)
        await p2p.add_protobuf_handler(protocol.PUSH, self.rpc_push, ExpertRequest)

    async def rpc_info(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        try:
            message, _ = self._received(request)
        except ProtocolError as e:
            return self._reply(ErrorReply(code="bad_request", message=str(e)))
        if not isinstance(message, protocol.InfoRequest):
            return self._reply(ErrorReply(code="bad_request", message=f"expected an info request, got {message.type!r}"))
        return self._refusal(message) or self._reply(self.info())

    def _refusal(self, message: protocol.RequestMessage) -> runtime_pb2.ExpertResponse | None:
        """The answer to a caller a private swarm does not admit, if this one is such."""
        if admits_call(self.swarm_key, getattr(message, "member", None)):
            return None
        return self._reply(ErrorReply(code="not_member", message=NOT_MEMBER))

    def _reply(self, message: protocol.ResponseMessage, *tensors: torch.Tensor) -> runtime_pb2.ExpertResponse:
        """A response, counted: its bytes, and its error code if it refuses."""
        response = protocol.pack_response(message, *tensors)
        self.metrics.bytes.labels("out").inc(response.ByteSize())
        if isinstance(message, ErrorReply):
            self.metrics.refusals.labels(message.code).inc()
        return response

    def _received(self, request: runtime_pb2.ExpertRequest) -> tuple[protocol.RequestMessage, list[torch.Tensor]]:
        """A request, counted and parsed; raises ProtocolError as unpack_request does."""
        self.metrics.bytes.labels("in").inc(request.ByteSize())
        return protocol.unpack_request(request)

    def info(self) -> protocol.PeerInfo:
        """What this peer serves and how loaded it is: its announcement, and the sessions and passes of now."""
        announced = self.announcer
        return protocol.PeerInfo(
            model=announced.model.name,
            dht_prefix=announced.model.dht_prefix,
            start=announced.start,
            end=announced.end,
            version=swarm.__version__,
            dtype=announced.dtype,
            quant=announced.quant,
            public_name=announced.public_name,
            throughput=announced.throughput,
            cache_tokens_left=self.sessions.tokens_left,
            max_cache_tokens=self.sessions.max_cache_tokens,
            open_sessions=len(self.sessions.sessions),
            steps=self.scheduler.batched_steps,
            passes=self.scheduler.passes,
            hidden_size=self.span.config.hidden_size,
        )

    async def forward(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        try:
            message, tensors = self._received(request)
            if not isinstance(message, protocol.ForwardRequest):
                raise ProtocolError(f"expected a forward request, got {message.type!r}")
            if (refusal := self._refusal(message)) is not None:
                return refusal
            part = self.span.subspan(message.start, message.end)
            hidden, mask = protocol.check_inputs(tensors, self.span.config.hidden_size)
            cache = await self.scheduler.on_device(part.new_cache, *hidden.shape[:2])
            try:
                output = await self._compute(part, hidden, cache, mask)
            finally:
                self.scheduler.forget(cache)  # a one-shot cache: no pace to keep, and its id may come back
            return self._reply(StepResult(step=0, length=hidden.shape[1]), output.to(hidden.dtype))
        except ProtocolError as e:
            return self._reply(ErrorReply(code="bad_request", message=str(e)))
        except Exception as e:
            logger.exception("forward failed")
            return self._reply(ErrorReply(code="internal", message=f"internal error: {e}"))

    async def inference(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        session: Session | None = None
        inputs = _Inputs(aiter(requests))
        try:
            while True:
                event = await inputs.next(session, self.leaving, self.idle_timeout)
                if event is _End.closed:
                    return
                if event is _End.leaving:
                    yield self._reply(Leaving())
                    return
                if event is _End.idle:
                    yield self._reply(ErrorReply(code="idle", message=f"session idle for {self.idle_timeout:.0f} s, closed"))
                    return
                try:
                    if isinstance(event, _PushedInput):
                        if session is not None and event.step == session.steps:  # else the client's own copy came first
                            yield await self._run_step(session, event.step, event.hidden, event.mask, event.next_hops,
                                                       event.trace_id, event.reorder)
                        continue
                    message, tensors = self._received(event)
                    if session is None:
                        session = await self._open(message, str(context.remote_id))
                        yield self._reply(Opened(session_id=session.session_id, cache_tokens_left=self.sessions.tokens_left))
                    elif (reply := await self._step(session, message, tensors)) is not None:
                        yield reply
                except SessionRefused as e:
                    yield self._reply(ErrorReply(code=e.code, message=str(e)))
                    return
                except ProtocolError as e:
                    yield self._reply(ErrorReply(code="bad_request", message=str(e)))
        except Exception as e:
            logger.exception("inference session failed")
            yield self._reply(ErrorReply(code="internal", message=f"internal error: {e}"))
        finally:
            inputs.close()
            if session is not None:
                self.sessions.close(session.session_id)
                self.scheduler.forget(session.cache)
                logger.info(f"session {session.session_id} closed after {session.steps} steps")

    async def _open(self, message: protocol.RequestMessage, remote: str) -> Session:
        if not isinstance(message, OpenSession):
            raise ProtocolError(f"the first message of a session must open it, got {message.type!r}")
        if not admits_call(self.swarm_key, message.member):
            raise SessionRefused("not_member", NOT_MEMBER)
        try:
            part = self.span.subspan(message.start, message.end)
        except ProtocolError as e:  # blocks outside the span: the client's view is stale
            raise SessionRefused("not_served", str(e)) from None
        self.sessions.reserve(message.session_id, message.batch_size, message.max_length)
        cache = await self.scheduler.on_device(part.new_cache, message.batch_size, message.max_length)
        session = Session(message.session_id, part, cache, message.push_token)
        self.sessions.add(session)  # checks the budget again: another session may have opened meanwhile
        logger.info(f"session {message.session_id} opened by {remote[-8:]}: blocks {message.start}:{message.end}, "
                    f"{message.batch_size}x{message.max_length} tokens")
        return session

    async def _step(self, session: Session, message: protocol.RequestMessage,
                    tensors: list[torch.Tensor]) -> runtime_pb2.ExpertResponse | None:
        if not isinstance(message, Step):
            raise ProtocolError(f"expected a step, got {message.type!r}")
        if message.session_id != session.session_id:
            return self._reply(ErrorReply(
                code="unknown_session", message=f"unknown session {message.session_id}: this stream carries {session.session_id}"))
        if message.step > session.steps:
            raise ProtocolError(f"step {message.step} skips ahead: the session's next step is {session.steps}")
        if message.step < session.steps:
            return None  # its pushed copy came first and was answered
        hidden, mask = protocol.check_inputs(tensors, self.span.config.hidden_size, session.cache.batch_size)
        protocol.check_reorder(message.reorder, session.cache.batch_size)
        return await self._run_step(session, message.step, hidden, mask, message.next_hops, message.trace_id,
                                    message.reorder)

    async def _run_step(self, session: Session, step: int, hidden: torch.Tensor, mask: torch.Tensor | None,
                        next_hops: list[protocol.NextHop], trace_id: str | None,
                        reorder: list[int] | None) -> runtime_pb2.ExpertResponse:
        if reorder is not None:  # the session's steps run one at a time: no pass is using its cache now
            await self.scheduler.on_device(session.cache.reorder, reorder)
        output = (await self._compute(session.span, hidden, session.cache, mask)).to(hidden.dtype)
        session.steps += 1
        if trace_id is not None:
            logger.debug(f"step {trace_id}: session {session.session_id[:8]} step {step}, "
                         f"{hidden.shape[0]}x{hidden.shape[1]} positions through {session.span.start}:{session.span.end}")
        pushed = bool(next_hops) and await self._accepted_soon(self.pusher.push(next_hops, output, mask, trace_id, reorder))
        return self._reply(StepResult(step=step, length=session.cache.length, pushed=pushed), output)

    @staticmethod
    async def _accepted_soon(accepted: asyncio.Future) -> bool:
        """Whether the next hop accepted our push within PUSH_ACK_WAIT: if so, the client will not send it
        this input itself. A slower push goes on, and then the client's copy is sent too."""
        done, _ = await asyncio.wait({accepted}, timeout=PUSH_ACK_WAIT)
        return accepted in done and accepted.result()

    async def rpc_push(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        """Other peers' outputs for steps of our sessions, each queued for its session's stream to compute."""
        try:
            message, tensors = self._received(request)
            if not isinstance(message, protocol.Push):
                raise ProtocolError(f"expected a push, got {message.type!r}")
            counts = [1 + item.masked for item in message.items]  # hidden states, and a mask if masked
            if len(tensors) != sum(counts):
                raise ProtocolError(f"{len(message.items)} push items do not match {len(tensors)} tensors")
        except ProtocolError as e:
            return self._reply(ErrorReply(code="bad_request", message=str(e)))
        if (refusal := self._refusal(message)) is not None:
            return refusal
        accepted, offset = [], 0
        for item, count in zip(message.items, counts):
            accepted.append(self._accept_push(item, tensors[offset : offset + count]))
            self.metrics.pushes.labels("received", "accepted" if accepted[-1] else "refused").inc()
            offset += count
        return self._reply(PushReply(accepted=accepted))

    def _accept_push(self, item: protocol.PushItem, tensors: list[torch.Tensor]) -> bool:
        session = self.sessions.sessions.get(item.session_id)
        if session is None or item.step != session.steps:  # unknown, or the client's copy came first
            return False
        if session.push_token is None or not hmac.compare_digest(item.token, session.push_token):
            logger.debug(f"refused a push for session {item.session_id}: not the token its client gave its route")
            return False
        try:
            hidden, mask = protocol.check_inputs(tensors, self.span.config.hidden_size, session.cache.batch_size)
            protocol.check_reorder(item.reorder, session.cache.batch_size)
        except ProtocolError as e:
            logger.debug(f"refused a push for session {item.session_id}: {e}")
            return False
        session.pushed_inputs.put_nowait(_PushedInput(item.step, hidden, mask, item.next_hops, item.trace_id,
                                                      item.reorder))
        return True

    async def _compute(self, span: Span, hidden: torch.Tensor, cache: KVCache, mask: torch.Tensor | None) -> torch.Tensor:
        self.steps_in_flight += 1
        started = time.perf_counter()
        try:
            return await self.scheduler.run(span, hidden, cache, mask)
        finally:
            self.steps_in_flight -= 1
            self.metrics.step_seconds.observe(time.perf_counter() - started)

    async def drain(self, grace: float) -> None:
        """Let steps in flight finish (up to `grace` seconds), then tell every open session we leave."""
        deadline = asyncio.get_running_loop().time() + grace
        while self.steps_in_flight and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        self.leaving.set()
        await asyncio.sleep(0.2)  # let the streams send their Leaving message


@dataclass
class _PushedInput:
    """A step's input that the previous hop's peer pushed here, waiting for its session's stream."""

    step: int
    hidden: torch.Tensor
    mask: torch.Tensor | None
    next_hops: list[protocol.NextHop]
    trace_id: str | None
    reorder: list[int] | None


class _End(enum.Enum):
    """Why a session's stream stops waiting without a request: the client closed it, we leave, or it idled."""

    closed = "closed"
    leaving = "leaving"
    idle = "idle"


class _Inputs:
    """What a session's stream waits for: the client's next request, a pushed input, or a reason to stop.

    The pending read of the client's stream survives a push that arrives first: cancelling a read
    halfway would break hivemind's request iterator.
    """

    def __init__(self, requests: AsyncIterator[runtime_pb2.ExpertRequest]):
        self.requests = requests
        self.pending: asyncio.Future | None = None

    async def next(
        self, session: Session | None, leaving: asyncio.Event, idle_timeout: float
    ) -> runtime_pb2.ExpertRequest | _PushedInput | _End:
        if self.pending is None:
            self.pending = asyncio.ensure_future(anext(self.requests))
        stop = asyncio.ensure_future(leaving.wait())
        pushed = asyncio.ensure_future(session.pushed_inputs.get()) if session is not None else None
        waiting = {self.pending, stop} | ({pushed} if pushed is not None else set())
        done, _ = await asyncio.wait(waiting, timeout=idle_timeout, return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()
        if pushed is not None:
            if pushed in done:
                return pushed.result()
            pushed.cancel()
        if self.pending in done:
            request, self.pending = self.pending, None
            try:
                return request.result()
            except StopAsyncIteration:
                return _End.closed
        return _End.leaving if stop in done else _End.idle

    def close(self) -> None:
        if self.pending is not None:
            self.pending.cancel()
