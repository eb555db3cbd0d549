"""swarm-api started as an operator would: for the gateway's and the console's tests."""
from __future__ import annotations

import contextlib
import os
import queue
import subprocess
import sys
import threading
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parent.parent


def start_api(*args: str, log: Path | None = None) -> tuple[subprocess.Popen, "queue.Queue[str]"]:
    """`swarm-api ARGS` with its stdout lines pumped into a queue; stderr goes to `log`, else to a pipe."""
    env = {k: v for k, v in os.environ.items() if k != "SWARM_INITIAL_PEERS"}
    stderr = subprocess.PIPE if log is None else log.open("w")
    try:
        process = subprocess.Popen([sys.executable, "-m", "client.gateway", *args], stdout=subprocess.PIPE,
                                   stderr=stderr, env=env, text=True, cwd=ROOT)
    finally:
        if log is not None:
            stderr.close()  # the child has its own copy
    lines: "queue.Queue[str]" = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in process.stdout], daemon=True).start()
    return process, lines


@contextlib.contextmanager
def running_api(*args: str, log: Path) -> Iterator[str]:
    """The ready line of `swarm-api ARGS --port 0`; SIGTERM at the end, which must exit 0."""
    process, lines = start_api(*args, "--port", "0", log=log)
    try:
        try:
            ready = lines.get(timeout=120)
        except queue.Empty:
            ready = ""
        assert ready.startswith("ready: http://127.0.0.1:"), f"{ready!r}, log: {log.read_text()[-3000:]}"
        yield ready
    finally:
        process.terminate()
        try:
            assert process.wait(30) == 0
        finally:
            process.kill()
