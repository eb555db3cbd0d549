"""The OpenAI-compatible HTTP app over a Gateway: routes, the API key, streaming.

Generation is blocking (client/model.py), so every step runs in a worker thread and the event loop
only awaits it: concurrent requests generate concurrently. A generation ends, and its inference
session on the peers is closed, as soon as its HTTP client goes away (see docs/api.md).
"""
from __future__ import annotations

import hmac
import secrets
import time
from datetime import datetime, timezone
from importlib.metadata import version
from typing import Any, AsyncGenerator, Awaitable, Callable

import anyio
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool
from starlette.types import Receive, Scope, Send

from client.gateway.answers import Answers, ChatAnswers, CompletionAnswers, Run, finish_of, sse, usage_of
from client.gateway.console import Timelines, console_routes
from client.gateway.errors import ERROR_RESPONSES, ApiError, add_error_handlers
from client.gateway.limits import Admission, Limits
from client.gateway.metrics import ApiMetrics, MetricsMiddleware
from client.gateway.openai_schema import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    ErrorResponse,
    Model,
    ModelList,
)
from client.gateway.served import Gateway, ServedModel
from client.health.report import HealthReport
from client.text import PromptError, TextStream
from swarm.errors import SwarmError

CHAT, COMPLETIONS, MODELS, HEALTH, METRICS = "/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics"


def create_app(gateway: Gateway, *, api_key: str | None = None, default_max_tokens: int = 256,
               limits: Limits = Limits()) -> FastAPI:
    """The ASGI app. With `api_key`, every /v1 route wants `Authorization: Bearer <api_key>`."""
    metrics = ApiMetrics()
    app = _App(
        title="swarm-api", version=version("swarm-llm"),
        description="OpenAI-compatible API over a swarm-llm swarm: every transformer block runs on peers.")
    app.add_middleware(MetricsMiddleware, metrics=metrics, endpoints={CHAT, COMPLETIONS, MODELS, HEALTH, METRICS})
    add_error_handlers(app, metrics)
    key_check = None if api_key is None else _key_check(api_key)
    timelines = Timelines()
    generations = Generations(gateway, metrics, timelines, default_max_tokens, Admission(limits))
    app.include_router(_openai_routes(generations, key_check))
    app.include_router(_operator_routes(gateway, metrics))
    app.include_router(console_routes(gateway, timelines, key_check))
    return app


def _openai_routes(generations: Generations, key_check: Callable[..., Awaitable[None]] | None) -> APIRouter:
    """/v1: the chat and text completions and the model list, behind the API key if there is one."""
    gateway = generations.gateway
    errors = {status: response for status, response in ERROR_RESPONSES.items() if key_check or status != 401}
    v1 = APIRouter(dependencies=[Depends(key_check)] if key_check else [], responses=errors)

    @v1.post(CHAT, response_model=ChatCompletion, responses=_streamed_as(ChatCompletionChunk),
             summary="Chat completion", description="The assistant's answer to `messages`, via the model's chat template.")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await generations.answer(request, body, ChatAnswers)

    @v1.post(COMPLETIONS, response_model=Completion, responses=_streamed_as(Completion),
             summary="Text completion", description="The continuation of `prompt`.")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await generations.answer(request, body, CompletionAnswers)

    @v1.get(MODELS, response_model=ModelList, summary="Models the swarm serves fully",
            description="The models given to swarm-api with --model whose every block an online peer serves now.")
    async def models() -> ModelList:
        try:
            report = await run_in_threadpool(gateway.check)
        except SwarmError as e:
            raise ApiError(503, f"the swarm did not answer: {e}", "swarm_unavailable") from None
        return ModelList(data=[Model(id=m.id, created=gateway.started) for m in gateway.covered(report)])

    return v1


def _key_check(api_key: str) -> Callable[..., Awaitable[None]]:
    bearer = HTTPBearer(auto_error=False, description="The gateway's --api-key.")

    async def require_key(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        if credentials is None:
            raise ApiError(401, "no API key: send the header 'Authorization: Bearer KEY'", "invalid_api_key")
        if not hmac.compare_digest(credentials.credentials.encode(), api_key.encode()):
            raise ApiError(401, "incorrect API key", "invalid_api_key")

    return require_key


def _operator_routes(gateway: Gateway, metrics: ApiMetrics) -> APIRouter:
    """/health and /metrics, open to monitoring without the API key."""
    operator = APIRouter()

    @operator.get(HEALTH, response_model=HealthReport, summary="Swarm coverage of the served models",
                  description="swarm-health's JSON report on the served models: 200 if every one is covered, else 503.",
                  responses={503: {"model": HealthReport, "description": "Some block of a served model has no online "
                                                                          "peer, or the swarm did not answer."}})
    async def health() -> JSONResponse:
        try:
            report = await run_in_threadpool(gateway.check)
        except SwarmError as e:
            report = HealthReport(checked_at=datetime.now(timezone.utc), healthy=False, models=[], peers=[],
                                  problems=[f"the swarm did not answer: {e}"])
        return JSONResponse(report.model_dump(mode="json"), status_code=200 if report.healthy else 503)

    @operator.get(METRICS, summary="Prometheus metrics", response_class=Response,
                  responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}},
                                   "description": "Prometheus text format: requests, tokens, latencies, errors."}})
    async def prometheus() -> Response:
        content, media_type = metrics.render()
        return Response(content, media_type=media_type)

    return operator


class Generations:
    """Answers generation requests: starts each on its model's SwarmClient, then answers whole or streamed."""

    def __init__(self, gateway: Gateway, metrics: ApiMetrics, timelines: Timelines, default_max_tokens: int,
                 admission: Admission):
        self.gateway, self.metrics, self.timelines = gateway, metrics, timelines
        self.default_max_tokens, self.admission = default_max_tokens, admission

    def served(self, model: str) -> ServedModel:
        if model not in self.gateway.models:
            raise ApiError(404, f"the model {model!r} is not served here; served: {', '.join(self.gateway.models)}",
                           "model_not_found", "model")
        return self.gateway.models[model]

    async def answer(self, request: Request, body: ChatCompletionRequest | CompletionRequest,
                     answers: Answers) -> Response:
        target = self.served(body.model)
        run = Run(target.id, answers.id_prefix + secrets.token_hex(12))
        # per API key when the gateway has one (callers holding it share its budget), else per address
        self.admission.admit(request.headers.get("authorization") or (request.client.host if request.client else "-"))
        try:
            stream = await run_in_threadpool(lambda: target.client.start(
                **body.prompt_args(), max_new_tokens=body.token_limit or self.default_max_tokens,
                fit_context=body.token_limit is None,  # our default, not the caller's: it yields to a long prompt
                temperature=body.temperature, top_p=body.top_p, stop=body.stop, seed=body.seed))
        except PromptError as e:
            self.admission.release()
            raise ApiError(400, str(e), e.code, body.prompt_param) from None
        except BaseException:
            self.admission.release()
            raise
        self.timelines.keep(run.id, stream)

        async def done() -> None:
            """Close the stream, and so the session on the peers, whether it ended or not; count its tokens."""
            with anyio.CancelScope(shield=True):  # a disconnect cancels us: closing must happen all the same
                await run_in_threadpool(stream.close)
            self.admission.release()
            self.metrics.count_tokens(target.id, stream.prompt_tokens, stream.completion_tokens)

        try:
            first = await _next_piece(stream)  # before answering: a swarm that cannot serve is still a 503
            self.admission.check_deadline(run.arrived)
        except SwarmError as e:
            await done()
            raise ApiError.from_swarm(e) from None
        except ApiError:
            await done()
            raise
        if first is not None:
            self.metrics.first_token.labels(target.id).observe(time.perf_counter() - run.arrived)
        if not body.stream:
            return await self._whole(request, run, stream, first, answers, done)
        return _EventStream(self._events(run, stream, first, answers, body.stream_options.include_usage), done)

    async def _whole(self, request: Request, run: Run, stream: TextStream, first: str | None, answers: Answers,
                     done: Callable[[], Awaitable[None]]) -> Response:
        text, piece = [], first
        try:
            while piece is not None and not await request.is_disconnected():  # nobody to answer: stop
                text.append(piece)
                piece = await _next_piece(stream)
                self.admission.check_deadline(run.arrived)
        except SwarmError as e:
            raise ApiError.from_swarm(e) from None
        finally:
            await done()
        return JSONResponse(answers.whole(run, "".join(text), stream).model_dump(mode="json"))

    async def _events(self, run: Run, stream: TextStream, first: str | None, answers: Answers,
                      include_usage: bool) -> AsyncGenerator[str, None]:
        for chunk in answers.opening(run):
            yield sse(chunk)
        piece = first
        try:
            while piece is not None:
                yield sse(answers.piece(run, piece))
                piece = await _next_piece(stream)
                self.admission.check_deadline(run.arrived)
        except (SwarmError, ApiError) as e:  # the answer has begun with 200: the error can only be an event
            error = e if isinstance(e, ApiError) else ApiError.from_swarm(e)
            self.metrics.errors.labels(error.detail.type).inc()
            yield sse(ErrorResponse(error=error.detail))
            return
        yield sse(answers.end(run, finish_of(stream)))
        if include_usage:
            yield sse(answers.usage(run, usage_of(stream)))
        yield "data: [DONE]\n\n"


async def _next_piece(stream: TextStream) -> str | None:
    """The stream's next piece, computed in a worker thread; None once it has ended."""
    return await run_in_threadpool(next, stream, None)


class _EventStream(StreamingResponse):
    """Server-sent events whose generation is closed the moment the response ends, by a client's
    disconnect too (Starlette then cancels the sending): `done` closes it and is awaited exactly once."""

    def __init__(self, events: AsyncGenerator[str, None], done: Callable[[], Awaitable[None]]):
        super().__init__(events, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.events, self.done = events, done

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.events.aclose()
                await self.done()


def _streamed_as(chunk: type[BaseModel]) -> dict:
    """The OpenAPI 200 response of a generation route: JSON, or with `stream: true` events carrying `chunk`."""
    return {200: {"description": f"JSON; with `stream: true`, server-sent events `data: <{chunk.__name__}>`, "
                                 "then `data: [DONE]`",
                  "content": {"text/event-stream": {"schema": {"$ref": f"#/components/schemas/{chunk.__name__}"}}}}}


class _App(FastAPI):
    def openapi(self) -> dict[str, Any]:
        """FastAPI lists only models used as JSON bodies; the event-stream chunk must be in the schema too."""
        if self.openapi_schema is None:
            schema = get_openapi(title=self.title, version=self.version, description=self.description, routes=self.routes)
            definitions = ChatCompletionChunk.model_json_schema(ref_template="#/components/schemas/{model}")
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            components.update(definitions.pop("$defs", {}))
            components[ChatCompletionChunk.__name__] = definitions
            self.openapi_schema = schema
        return self.openapi_schema
