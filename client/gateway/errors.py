"""The gateway's errors in OpenAI's format, {"error": {"message", "type", "param", "code"}}, for every way a request fails."""
from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from client.gateway.metrics import ApiMetrics
from client.gateway.openai_schema import ErrorDetail, ErrorResponse
from swarm.errors import RouteError, SwarmError

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "A bad request; `param` names the field at fault."},
    401: {"model": ErrorResponse, "description": "No API key, or a wrong one (only with --api-key)."},
    404: {"model": ErrorResponse, "description": "The model is not served here (`code`: model_not_found)."},
    429: {"model": ErrorResponse, "description": "Over --rate-limit (`code`: rate_limited); see Retry-After."},
    502: {"model": ErrorResponse, "description": "Peers failed the generation."},
    503: {"model": ErrorResponse, "description": "The swarm cannot serve the model now: some blocks have no peer "
                                                 "(`code`: swarm_unavailable); or --max-concurrent generations run "
                                                 "already (`code`: overloaded)."},
    504: {"model": ErrorResponse, "description": "The request ran past --request-deadline (`code`: deadline_exceeded)."},
}


class ApiError(Exception):
    """An error answered in OpenAI's format, with the HTTP status it goes with."""

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.headers = status, headers
        self.detail = ErrorDetail(message=message, type="invalid_request_error" if status < 500 else "server_error",
                                  param=param, code=code)

    @classmethod
    def from_swarm(cls, error: SwarmError) -> "ApiError":
        """No route means the swarm lacks blocks right now (503); anything else, peers failed us (502)."""
        if isinstance(error, RouteError):
            return cls(503, f"the swarm cannot serve this model now: {error}", "swarm_unavailable")
        return cls(502, f"the swarm failed this request: {error}", "swarm_error")


def add_error_handlers(app: FastAPI, metrics: ApiMetrics) -> None:
    """Every error the app can meet leaves in OpenAI's format and is counted by type."""

    def error_response(error: ApiError) -> JSONResponse:
        metrics.errors.labels(error.detail.type).inc()
        return JSONResponse(ErrorResponse(error=error.detail).model_dump(), status_code=error.status,
                            headers=error.headers)

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
