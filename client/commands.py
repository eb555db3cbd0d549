"""What the client's commands share: where the swarm is (all of them), and how an error ends them (swarm-api, swarm-chat).

An error is one line on stderr and an exit status: 2 for what the user must change (no initial
peers, a model reference that names nothing), 1 when the swarm fails.
"""
from __future__ import annotations

import contextlib
from enum import Enum
from typing import Iterator

import typer
from rich.console import Console

from client.settings import ENV_INITIAL_PEERS, initial_peers_from
from swarm.errors import ModelReferenceError, SwarmError


class Verify(str, Enum):
    """The client's `verify` setting as a flag (docs/security.md#caught-liars-verify)."""

    off = "off"
    spot = "spot"
    strict = "strict"


VERIFY_HELP = ("Check peers' outputs on other peers serving the same blocks: a share of the steps (spot), "
               "every step before its token is chosen (strict), or none (off).")


def fail(console: Console, message: str, code: int) -> typer.Exit:
    console.print(f"[red]error:[/red] {' '.join(message.split())}")
    return typer.Exit(code)


def required_initial_peers(flags: list[str] | None, purpose: str, console: Console) -> list[str]:
    """The initial peers from the flags or the environment; exit 2 if there are none."""
    peers = initial_peers_from(flags)
    if not peers:
        raise fail(console, f"no swarm to {purpose}: give --initial-peers MULTIADDR or set {ENV_INITIAL_PEERS}", 2)
    return peers


@contextlib.contextmanager
def swarm_errors_exit(console: Console) -> Iterator[None]:
    """Inside: a ModelReferenceError exits 2, any other SwarmError 1, each as one line."""
    try:
        yield
    except ModelReferenceError as e:
        raise fail(console, str(e), 2) from None
    except SwarmError as e:
        raise fail(console, str(e), 1) from None
