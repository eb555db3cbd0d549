"""One background event loop per process for the client's network work, so user code stays synchronous."""
from __future__ import annotations

import asyncio
import threading
from typing import Any, Coroutine

_lock = threading.Lock()
_loop: asyncio.AbstractEventLoop | None = None


def event_loop() -> asyncio.AbstractEventLoop:
    global _loop
    with _lock:
        if _loop is None or _loop.is_closed():
            _loop = asyncio.new_event_loop()
            threading.Thread(target=_loop.run_forever, name="swarm-client-loop", daemon=True).start()
        return _loop


def run(coroutine: Coroutine, timeout: float | None = None) -> Any:
    """Run a coroutine on the client loop and wait for its result from any other thread."""
    future = asyncio.run_coroutine_threadsafe(coroutine, event_loop())
    try:
        return future.result(timeout)
    except BaseException:
        future.cancel()
        raise
