"""swarm-chat: ask the swarm one question, or chat with it in one session that is never sent twice.

Exit status: 0 after an answer (one question) or /exit, 1 if the swarm fails, 2 for bad arguments
(no initial peers, a model reference that names nothing, a prompt that cannot be answered), 130
after Ctrl-C at the prompt.
"""
from __future__ import annotations

import json
import logging
import os
import signal
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from client.commands import VERIFY_HELP, Verify, fail, required_initial_peers, swarm_errors_exit
from client.settings import ENV_INITIAL_PEERS

app = typer.Typer(add_completion=False, help="Chat with a swarm's model from the terminal.")
err = Console(stderr=True, soft_wrap=True, highlight=False)
HELP = "/reset starts over, /exit leaves; Ctrl-C stops an answer"


@app.command()
def chat(
    question: Optional[str] = typer.Argument(None, help="Ask this one question, print the answer and exit."),
    initial_peers: Optional[list[str]] = typer.Option(None, help=f"Multiaddr of a peer (env: {ENV_INITIAL_PEERS})."),
    model: Optional[str] = typer.Option(None, help="Model reference (default: smollm2-135m)."),
    swarm_key: Optional[Path] = typer.Option(None, help="A private swarm's key file: use its members only."),
    verify: Verify = typer.Option(Verify.spot, help=VERIFY_HELP),
    max_tokens: int = typer.Option(256, min=1, help="Tokens to generate at most per answer."),
    temperature: float = typer.Option(0.0, min=0.0, max=2.0, help="0 is greedy: the same answer every time."),
    system: Optional[str] = typer.Option(None, help="A system message that opens the conversation."),
    max_length: int = typer.Option(2048, min=16, help="Tokens the conversation's session may hold on each peer."),
    json_output: bool = typer.Option(False, "--json", help="Print each answer as one JSON object (questions from stdin)."),
    verbose: bool = typer.Option(False, "--verbose", help="After each answer, say how many tokens went to the swarm."),
) -> None:
    """Without a question: an interactive chat, one session across turns (the history is never sent again)."""
    peers = required_initial_peers(initial_peers, "talk to", err)
    logging.getLogger("hivemind").setLevel(os.environ.get("SWARM_LOG_LEVEL", "CRITICAL"))
    from client.chat.conversation import Conversation
    from client.text import PromptError, SwarmClient

    with swarm_errors_exit(err), err.status("joining the swarm"):
        client = SwarmClient(peers, model, swarm_key=swarm_key, verify=verify.value)
    conversation = Conversation(client, max_length, system)
    options = dict(max_new_tokens=max_tokens, temperature=temperature)
    try:
        with swarm_errors_exit(err):
            if question is not None:
                _answer(conversation, question, options, json_output, verbose, prefix="")
            else:
                _interactive(conversation, options, json_output, verbose)
    except PromptError as e:
        raise fail(err, str(e), 2) from None
    finally:
        conversation.close()
        client.close()


def _interactive(conversation, options: dict, json_output: bool, verbose: bool) -> None:
    from client.text import PromptError
    from swarm.errors import SwarmError

    if not json_output:
        err.print(f"[dim]{HELP}[/dim]")
    while True:
        try:
            line = input("" if json_output else "you> ")
        except EOFError:
            return
        except KeyboardInterrupt:
            print()
            raise typer.Exit(130)
        text = line.strip()
        if text in ("/exit", "/quit"):
            return
        if text == "/reset":
            conversation.reset()
            err.print("[dim]a new conversation[/dim]")
            continue
        if not text:
            continue
        try:
            _answer(conversation, text, options, json_output, verbose, prefix="assistant> ")
        except PromptError as e:
            err.print(f"[red]error:[/red] {e}")
        except SwarmError as e:  # the session may hold half a step: start a fresh one
            err.print(f"[red]error:[/red] {' '.join(str(e).split())}; starting a new conversation")
            conversation.reset()


def _answer(conversation, question: str, options: dict, json_output: bool, verbose: bool, prefix: str) -> None:
    """Stream one answer; Ctrl-C stops it after the step in flight, so the session stays whole."""
    stream = conversation.ask(question, **options)
    stopped = False

    def stop(signum, frame) -> None:
        nonlocal stopped
        stopped = True

    previous = signal.signal(signal.SIGINT, stop)
    pieces: list[str] = []
    try:
        if not json_output:
            print(prefix, end="", flush=True)
        for piece in stream:
            pieces.append(piece)
            if not json_output:
                print(piece, end="", flush=True)
            if stopped:
                break
    finally:
        stream.close()
        signal.signal(signal.SIGINT, previous)
    text = "".join(pieces)
    conversation.answered(stream, text)
    finish = "stopped" if stopped else stream.finish_reason
    if json_output:
        print(json.dumps({"answer": text, "finish_reason": finish, "prompt_tokens": stream.prompt_tokens,
                          "completion_tokens": stream.completion_tokens, "sent_tokens": conversation.sent_last}),
              flush=True)
    else:
        print(" [stopped]" if stopped else "", flush=True)
    if verbose:
        err.print(f"[dim]sent {conversation.sent_last} new tokens; the session holds {conversation.session.position}[/dim]")

