"""The web console at /: the swarm's coverage and peers, a chat, each answer's per-hop timeline, how to join.

The page (static/, plain HTML, CSS and JavaScript, no build, no CDN) only calls the gateway's own
endpoints: /health for the swarm, /v1/chat/completions for the chat (with the API key, when the
gateway wants one), and the two below.
"""
from __future__ import annotations

import shlex
from collections import OrderedDict
from pathlib import Path
from typing import Awaitable, Callable

from fastapi import APIRouter, Depends
from fastapi.responses import FileResponse
from pydantic import BaseModel, Field

from client.gateway.errors import ApiError
from client.gateway.served import Gateway
from client.session import StepTiming
from client.text import TextStream

STATIC = Path(__file__).resolve().parent / "static"
MAX_TIMELINES = 256  # generations whose timelines are kept, newest first
REFRESH_SECONDS = 2.0  # how often the page reads /health


class ConsoleInfo(BaseModel):
    models: list[str] = Field(description="the models this gateway serves, by id")
    api_key_required: bool
    refresh_seconds: float = Field(description="how often the page refreshes the swarm view")
    join: dict[str, str] = Field(description="per model, the swarm-serve command that joins this swarm to serve it")


class Timeline(BaseModel):
    id: str = Field(description="the completion's id, as in its answer")
    steps: list[StepTiming]


class Timelines:
    """Recent generations by completion id, for their step timings (which grow while a generation runs)."""

    def __init__(self, limit: int = MAX_TIMELINES):
        self.limit = limit
        self._runs: OrderedDict[str, TextStream] = OrderedDict()

    def keep(self, run_id: str, stream: TextStream) -> None:
        self._runs[run_id] = stream
        while len(self._runs) > self.limit:
            self._runs.popitem(last=False)

    def timeline(self, run_id: str) -> Timeline | None:
        stream = self._runs.get(run_id)
        if stream is None:
            return None
        return Timeline(id=run_id, steps=list(stream.timings))  # a copy: the generation may still be adding steps


def join_command(initial_peers: list[str], ref: str) -> str:
    return shlex.join(["swarm-serve", "--model", ref, *(arg for m in initial_peers for arg in ("--initial-peers", m))])


def console_routes(gateway: Gateway, timelines: Timelines, key_check: Callable[..., Awaitable[None]] | None) -> APIRouter:
    """The page and its assets (open, like /health), and the timeline of a generation (behind the API key)."""
    console = APIRouter(include_in_schema=False)

    @console.get("/")
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @console.get("/console/static/{name}")
    async def asset(name: str) -> FileResponse:
        files = {f.name: f for f in STATIC.iterdir()}  # only our own files: a name is never a path
        if name not in files:
            raise ApiError(404, f"no console asset {name!r}")
        return FileResponse(files[name])

    @console.get("/console/info")
    async def info() -> ConsoleInfo:
        return ConsoleInfo(models=list(gateway.models), api_key_required=key_check is not None,
                           refresh_seconds=REFRESH_SECONDS,
                           join={m.id: join_command(gateway.initial_peers, m.ref) for m in gateway.models.values()})

    @console.get("/console/timeline/{run_id}", dependencies=[Depends(key_check)] if key_check else [])
    async def timeline(run_id: str) -> Timeline:
        found = timelines.timeline(run_id)
        if found is None:
            raise ApiError(404, f"no timeline for {run_id!r}: unknown, or older than the last {timelines.limit}")
        return found

    return console
