"""swarm-api: an OpenAI-compatible HTTP gateway to the swarm, so any OpenAI client can use it.

Exit status: 0 after a clean stop (Ctrl-C, SIGTERM), 1 if the swarm cannot be reached or the port
cannot be bound, 2 for bad arguments (no initial peers, a model reference that names nothing).
"""
from __future__ import annotations

import copy
import logging
import os
import signal
import socket
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer
from rich.console import Console

from client.commands import VERIFY_HELP, Verify, fail, required_initial_peers, swarm_errors_exit
from client.settings import ENV_INITIAL_PEERS

if TYPE_CHECKING:  # imported when serving: --help and argument errors stay fast
    from client.gateway.limits import Limits
    from client.gateway.served import Gateway

app = typer.Typer(add_completion=False, help="Serve the swarm's models through OpenAI's HTTP API.")
err = Console(stderr=True, soft_wrap=True)  # an error stays on one line
ENV_API_KEY = "SWARM_API_KEY"


class LogLevel(str, Enum):
    critical, error, warning, info, debug = "critical", "error", "warning", "info", "debug"


@app.command()
def serve(
    initial_peers: Optional[list[str]] = typer.Option(None, help=f"Multiaddr of a peer (env: {ENV_INITIAL_PEERS})."),
    model: Optional[list[str]] = typer.Option(
        None, help="Model to serve: alias, folder, .gguf file or hub id; repeat for several (default: smollm2-135m). "
                   "Requests name it by its name, e.g. smollm2-135m."),
    swarm_key: Optional[Path] = typer.Option(None, help="A private swarm's key file: use its members only."),
    verify: Verify = typer.Option(Verify.spot, help=VERIFY_HELP),
    host: str = typer.Option("127.0.0.1", help="Address to listen on; 0.0.0.0 exposes the gateway to the network."),
    port: int = typer.Option(8000, min=0, max=65535, help="TCP port to listen on (0: any free port)."),
    api_key: Optional[str] = typer.Option(
        None, envvar=ENV_API_KEY, show_envvar=False,
        help=f"Require 'Authorization: Bearer KEY' on /v1 routes (env: {ENV_API_KEY})."),
    default_max_tokens: int = typer.Option(256, min=1, help="Tokens to generate when a request gives no max_tokens."),
    rate_limit: Optional[int] = typer.Option(
        None, min=1, help="Requests per minute per caller (its API key with --api-key, else its address); "
                          "over it: 429 (default: unlimited)."),
    max_concurrent: Optional[int] = typer.Option(
        None, min=1, help="Generations running at once; over it: 503 at once (default: unlimited)."),
    request_deadline: Optional[float] = typer.Option(
        None, min=0.1, help="Seconds a request may take, checked between tokens; past it: 504, or an error event "
                            "in a stream (default: none)."),
    log_level: LogLevel = typer.Option(LogLevel.info, help="Log level of the HTTP server (one line per request at info)."),
) -> None:
    """Join the swarm as a client and answer /v1/chat/completions, /v1/completions, /v1/models, /health, /metrics."""
    peers = required_initial_peers(initial_peers, "serve", err)
    logging.getLogger("hivemind").setLevel(os.environ.get("SWARM_LOG_LEVEL", "WARNING"))
    from swarm.reference import DEFAULT_MODEL

    try:
        listener = _bind(host, port)  # before joining: a taken port fails at once, not after the swarm is joined
    except OSError as e:
        raise fail(err, f"cannot listen on {host}:{port}: {e.strerror or e}", 1) from None
    from client.gateway.served import Gateway

    with swarm_errors_exit(err), err.status("joining the swarm"):
        gateway = Gateway.connect(peers, model or [DEFAULT_MODEL], swarm_key=swarm_key, verify=verify.value)
    from client.gateway.limits import Limits

    try:
        _run(gateway, listener, api_key, default_max_tokens, Limits(rate_limit, max_concurrent, request_deadline),
             log_level)
    except KeyboardInterrupt:
        pass  # Ctrl-C or SIGTERM, once the requests in flight had their few seconds
    finally:
        gateway.close()


def _bind(host: str, port: int) -> socket.socket:
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    listener = socket.socket(family, kind, proto)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(address)
    listener.listen(128)
    return listener


def _run(gateway: Gateway, listener: socket.socket, api_key: Optional[str], default_max_tokens: int, limits: Limits,
         log_level: LogLevel) -> None:
    """Serve until SIGINT or SIGTERM; streams still open then get a few seconds to finish."""
    import uvicorn
    from uvicorn.config import LOGGING_CONFIG

    from client.gateway.app import create_app

    logs = copy.deepcopy(LOGGING_CONFIG)
    logs["handlers"]["access"]["stream"] = "ext://sys.stderr"  # stdout carries only the ready line
    config = uvicorn.Config(create_app(gateway, api_key=api_key, default_max_tokens=default_max_tokens, limits=limits),
                            log_level=log_level.value, log_config=logs, timeout_graceful_shutdown=5)
    host, port = listener.getsockname()[:2]
    url = f"http://{f'[{host}]' if ':' in host else host}:{port}/v1"
    print(f"ready: {url} serving {', '.join(gateway.models)}" + (" (API key required)" if api_key else ""), flush=True)
    # uvicorn stops on SIGTERM, then raises it again for the previous handler: make that Ctrl-C's, not
    # the default one that would kill the process before the gateway leaves the swarm
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    uvicorn.Server(config).run(sockets=[listener])
