"""The OpenAI-compatible HTTP app over a Gateway: routes, OpenAI-style errors, the API key, streaming.

Generation is blocking (client/model.py), so every step runs in a worker thread and the event loop
only awaits it: concurrent requests generate concurrently. A generation ends, and its inference
session on the peers is closed, as soon as its HTTP client goes away (see docs/api.md).
"""
from __future__ import annotations

import hmac
import secrets
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib.metadata import version
from typing import AsyncIterator, Awaitable, Callable

import anyio
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.types import Receive, Scope, Send

from client.api_metrics import ApiMetrics, MetricsMiddleware
from client.gateway import Gateway, ServedModel
from client.health import HealthReport
from client.openai_schema import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatDelta,
    Completion,
    CompletionChoice,
    CompletionRequest,
    ErrorDetail,
    ErrorResponse,
    Model,
    ModelList,
    Usage,
)
from client.text import FinishReason, PromptError, TextStream
from swarm.errors import RouteError, SwarmError

CHAT, COMPLETIONS, MODELS, HEALTH, METRICS = "/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics"
ERROR_RESPONSES = {
    400: {"model": ErrorResponse, "description": "A bad request; `param` names the field at fault."},
    401: {"model": ErrorResponse, "description": "No API key, or a wrong one (only with --api-key)."},
    404: {"model": ErrorResponse, "description": "The model is not served here (`code`: model_not_found)."},
    502: {"model": ErrorResponse, "description": "Peers failed the generation."},
    503: {"model": ErrorResponse, "description": "The swarm cannot serve the model now: some blocks have no peer."},
}


class ApiError(Exception):
    """An error answered in OpenAI's format: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.status = status
        self.detail = ErrorDetail(message=message, type="invalid_request_error" if status < 500 else "server_error",
                                  param=param, code=code)

    @classmethod
    def from_swarm(cls, error: SwarmError) -> "ApiError":
        """No route means the swarm lacks blocks right now (503); anything else, peers failed us (502)."""
        if isinstance(error, RouteError):
            return cls(503, f"the swarm cannot serve this model now: {error}", "swarm_unavailable")
        return cls(502, f"the swarm failed this request: {error}", "swarm_error")


def _param(loc: tuple) -> str | None:
    """A validation error's location as OpenAI names fields: ("body", "messages", 0, "role") -> messages[0].role."""
    name = ""
    for part in loc[1:]:
        name += f"[{part}]" if isinstance(part, int) else f".{part}" if name else str(part)
    return name or None


def _validation_error(error: RequestValidationError) -> ApiError:
    first = error.errors()[0]
    if first["type"] == "json_invalid":
        return ApiError(400, f"the body is not valid JSON: {first.get('ctx', {}).get('error', first['msg'])}")
    param = _param(tuple(first["loc"]))
    if param is None:
        return ApiError(400, "the body must be a JSON object, sent with 'Content-Type: application/json'")
    message = first["msg"].removeprefix("Value error, ")
    more = len(error.errors()) - 1
    return ApiError(400, f"{param}: {message}" + (f" (and {more} more problems)" if more else ""), param=param)


@dataclass
class _Run:
    """One generation request in flight: what its answers are stamped with, and when it arrived."""

    model: str
    id: str
    created: int = field(default_factory=lambda: int(time.time()))
    arrived: float = field(default_factory=time.perf_counter)

    @property
    def stamp(self) -> dict:
        return {"id": self.id, "created": self.created, "model": self.model}


def _usage(stream: TextStream) -> Usage:
    return Usage(prompt_tokens=stream.prompt_tokens, completion_tokens=stream.completion_tokens,
                 total_tokens=stream.prompt_tokens + stream.completion_tokens)


class _ChatAnswers:
    """How a chat completion is answered: whole, or as chunks that open with the assistant's role."""

    prompt_param, id_prefix = "messages", "chatcmpl-"

    @staticmethod
    def prompt(body: ChatCompletionRequest) -> dict:
        return {"messages": [m.model_dump(include={"role", "content"}) for m in body.messages]}

    @staticmethod
    def whole(run: _Run, text: str, stream: TextStream) -> BaseModel:
        choice = ChatChoice(message=AssistantMessage(content=text), finish_reason=stream.finish_reason)
        return ChatCompletion(**run.stamp, choices=[choice], usage=_usage(stream))

    @staticmethod
    def chunk(run: _Run, delta: ChatDelta | None = None, finish: FinishReason | None = None,
              usage: Usage | None = None) -> BaseModel:
        """A chunk with `delta`, or without choices (the usage chunk)."""
        choices = [] if delta is None else [ChatChunkChoice(delta=delta, finish_reason=finish)]
        return ChatCompletionChunk(**run.stamp, choices=choices, usage=usage)

    @classmethod
    def opening(cls, run: _Run) -> list[BaseModel]:
        return [cls.chunk(run, ChatDelta(role="assistant", content=""))]

    @classmethod
    def piece(cls, run: _Run, text: str) -> BaseModel:
        return cls.chunk(run, ChatDelta(content=text))

    @classmethod
    def end(cls, run: _Run, finish: FinishReason) -> BaseModel:
        return cls.chunk(run, ChatDelta(), finish)

    @classmethod
    def usage(cls, run: _Run, usage: Usage) -> BaseModel:
        return cls.chunk(run, usage=usage)


class _CompletionAnswers:
    """How a text completion is answered: whole, or as chunks of the same shape with pieces of the text."""

    prompt_param, id_prefix = "prompt", "cmpl-"

    @staticmethod
    def prompt(body: CompletionRequest) -> dict:
        return {"prompt": body.prompt}

    @staticmethod
    def whole(run: _Run, text: str, stream: TextStream) -> BaseModel:
        return _CompletionAnswers.chunk(run, [CompletionChoice(text=text, finish_reason=stream.finish_reason)],
                                        _usage(stream))

    @staticmethod
    def chunk(run: _Run, choices: list[CompletionChoice], usage: Usage | None = None) -> BaseModel:
        return Completion(**run.stamp, choices=choices, usage=usage)

    @staticmethod
    def opening(run: _Run) -> list[BaseModel]:
        return []

    @classmethod
    def piece(cls, run: _Run, text: str) -> BaseModel:
        return cls.chunk(run, [CompletionChoice(text=text)])

    @classmethod
    def end(cls, run: _Run, finish: FinishReason) -> BaseModel:
        return cls.chunk(run, [CompletionChoice(text="", finish_reason=finish)])

    @classmethod
    def usage(cls, run: _Run, usage: Usage) -> BaseModel:
        return cls.chunk(run, [], usage)


def _sse(message: BaseModel) -> str:
    return f"data: {message.model_dump_json()}\n\n"


async def _next_piece(stream: TextStream) -> str | None:
    """The stream's next piece, computed in a worker thread; None once it has ended."""
    return await run_in_threadpool(next, stream, None)


class _EventStream(StreamingResponse):
    """Server-sent events whose generation is closed the moment the response ends, by a client's
    disconnect too (Starlette then cancels the sending): `done` closes it and is awaited exactly once."""

    def __init__(self, events: AsyncIterator[str], done: Callable[[], Awaitable[None]]):
        super().__init__(events, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.done = done

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()
                await self.done()


def create_app(gateway: Gateway, *, api_key: str | None = None, default_max_tokens: int = 256) -> FastAPI:
    """The ASGI app. With `api_key`, every /v1 route wants `Authorization: Bearer <api_key>`."""
    metrics = ApiMetrics()
    app = FastAPI(
        title="swarm-api", version=version("swarm-llm"),
        description="OpenAI-compatible API over a swarm-llm swarm: every transformer block runs on peers.")
    app.add_middleware(MetricsMiddleware, metrics=metrics, endpoints={CHAT, COMPLETIONS, MODELS, HEALTH, METRICS})

    def error_response(error: ApiError) -> JSONResponse:
        metrics.errors.labels(error.detail.type).inc()
        return JSONResponse(ErrorResponse(error=error.detail).model_dump(), status_code=error.status)

    @app.exception_handler(ApiError)
    async def on_api_error(request: Request, error: ApiError) -> JSONResponse:
        return error_response(error)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        return error_response(_validation_error(error))

    @app.exception_handler(HTTPException)
    async def on_http_error(request: Request, error: HTTPException) -> JSONResponse:
        return error_response(ApiError(error.status_code, f"{request.method} {request.url.path}: {error.detail}"))

    @app.exception_handler(Exception)
    async def on_unexpected(request: Request, error: Exception) -> JSONResponse:  # uvicorn logs the traceback
        return error_response(ApiError(500, f"internal error: {type(error).__name__}"))

    bearer = HTTPBearer(auto_error=False, description="The gateway's --api-key.")

    async def require_key(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        if credentials is None:
            raise ApiError(401, "no API key: send the header 'Authorization: Bearer KEY'", "invalid_api_key")
        if not hmac.compare_digest(credentials.credentials.encode(), api_key.encode()):
            raise ApiError(401, "incorrect API key", "invalid_api_key")

    errors = {status: response for status, response in ERROR_RESPONSES.items() if api_key or status != 401}
    v1 = APIRouter(dependencies=[Depends(require_key)] if api_key else [], responses=errors)

    def served(model: str) -> ServedModel:
        if model not in gateway.models:
            raise ApiError(404, f"the model {model!r} is not served here; served: {', '.join(gateway.models)}",
                           "model_not_found", "model")
        return gateway.models[model]

    async def generate(request: Request, body: ChatCompletionRequest | CompletionRequest,
                       answers: type[_ChatAnswers] | type[_CompletionAnswers]) -> Response:
        target = served(body.model)
        run = _Run(target.id, answers.id_prefix + secrets.token_hex(12))
        try:
            stream = await run_in_threadpool(lambda: target.client.start(
                **answers.prompt(body), max_new_tokens=body.token_limit or default_max_tokens,
                fit_context=body.token_limit is None,  # our default, not the caller's: it yields to a long prompt
                temperature=body.temperature, top_p=body.top_p, stop=body.stop, seed=body.seed))
        except PromptError as e:
            raise ApiError(400, str(e), e.code, answers.prompt_param) from None

        async def done() -> None:
            """Close the stream, and so the session on the peers, whether it ended or not; count its tokens."""
            with anyio.CancelScope(shield=True):  # a disconnect cancels us: closing must happen all the same
                await run_in_threadpool(stream.close)
            metrics.count_tokens(target.id, stream.prompt_tokens, stream.completion_tokens)

        try:
            first = await _next_piece(stream)  # before answering: a swarm that cannot serve is still a 503
        except SwarmError as e:
            await done()
            raise ApiError.from_swarm(e) from None
        if first is not None:
            metrics.first_token.labels(target.id).observe(time.perf_counter() - run.arrived)

        if not body.stream:
            text, piece = [], first
            try:
                while piece is not None and not await request.is_disconnected():  # nobody to answer: stop
                    text.append(piece)
                    piece = await _next_piece(stream)
            except SwarmError as e:
                raise ApiError.from_swarm(e) from None
            finally:
                await done()
            return JSONResponse(answers.whole(run, "".join(text), stream).model_dump(mode="json"))

        async def events() -> AsyncIterator[str]:
            for chunk in answers.opening(run):
                yield _sse(chunk)
            piece = first
            try:
                while piece is not None:
                    yield _sse(answers.piece(run, piece))
                    piece = await _next_piece(stream)
            except SwarmError as e:  # the answer has begun with 200: the error can only be an event
                error = ApiError.from_swarm(e)
                metrics.errors.labels(error.detail.type).inc()
                yield _sse(ErrorResponse(error=error.detail))
                return
            yield _sse(answers.end(run, stream.finish_reason))
            if body.stream_options.include_usage:
                yield _sse(answers.usage(run, _usage(stream)))
            yield "data: [DONE]\n\n"

        return _EventStream(events(), done)

    @v1.post(CHAT, response_model=ChatCompletion, responses=_streamed_as(ChatCompletionChunk),
             summary="Chat completion", description="The assistant's answer to `messages`, via the model's chat template.")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await generate(request, body, _ChatAnswers)

    @v1.post(COMPLETIONS, response_model=Completion, responses=_streamed_as(Completion),
             summary="Text completion", description="The continuation of `prompt`.")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await generate(request, body, _CompletionAnswers)

    @v1.get(MODELS, response_model=ModelList, summary="Models the swarm serves fully",
            description="The models given to swarm-api with --model whose every block an online peer serves now.")
    async def models() -> ModelList:
        try:
            report = await run_in_threadpool(gateway.check)
        except SwarmError as e:
            raise ApiError(503, f"the swarm did not answer: {e}", "swarm_unavailable") from None
        return ModelList(data=[Model(id=m.id, created=gateway.started) for m in gateway.covered(report)])

    app.include_router(v1)

    @app.get(HEALTH, response_model=HealthReport, summary="Swarm coverage of the served models",
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

    @app.get(METRICS, summary="Prometheus metrics", response_class=Response,
             responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}},
                              "description": "Prometheus text format: requests, tokens, latencies, errors."}})
    async def prometheus() -> Response:
        content, media_type = metrics.render()
        return Response(content, media_type=media_type)

    app.openapi = _openapi_with_chunks(app)
    return app


def _streamed_as(chunk: type[BaseModel]) -> dict:
    """The OpenAPI 200 response of a generation route: JSON, or with `stream: true` events carrying `chunk`."""
    return {200: {"description": f"JSON; with `stream: true`, server-sent events `data: <{chunk.__name__}>`, "
                                 "then `data: [DONE]`",
                  "content": {"text/event-stream": {"schema": {"$ref": f"#/components/schemas/{chunk.__name__}"}}}}}


def _openapi_with_chunks(app: FastAPI) -> Callable[[], dict]:
    """FastAPI lists only models used as JSON bodies; the event-stream chunk must be in the schema too."""

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            definitions = ChatCompletionChunk.model_json_schema(ref_template="#/components/schemas/{model}")
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            components.update(definitions.pop("$defs", {}))
            components[ChatCompletionChunk.__name__] = definitions
            app.openapi_schema = schema
        return app.openapi_schema

    return openapi
