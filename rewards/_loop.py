"""One long-lived event loop in a daemon thread, for calling async rewards from sync code.

Why not ``asyncio.run`` per training step: an ``httpx.AsyncClient`` (and its pool of kept-alive
connections to the judge) belongs to the loop it was first used on. A persistent loop keeps the
connections warm across steps, and works whether or not the caller is itself inside a loop
(a notebook, an async trainer), because the coroutine runs on another thread.
"""
from __future__ import annotations

import asyncio
import atexit
import threading
from typing import Any, Coroutine

_lock = threading.Lock()
_loop: asyncio.AbstractEventLoop | None = None
_thread: threading.Thread | None = None


def _start() -> asyncio.AbstractEventLoop:
    global _loop, _thread
    with _lock:
        if _loop is None or _loop.is_closed():
            _loop = asyncio.new_event_loop()
            _thread = threading.Thread(target=_loop.run_forever, name="rewards-loop", daemon=True)
            _thread.start()
        return _loop


def background_loop() -> asyncio.AbstractEventLoop:
    """The shared background loop (started on first use)."""
    return _start()


def run_sync(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run ``coro`` on the background loop and block until it finishes; re-raise its error."""
    loop = _start()
    if threading.current_thread() is _thread:
        coro.close()
        raise RuntimeError("run_sync() called from the rewards loop itself; await the coroutine instead")
    return asyncio.run_coroutine_threadsafe(coro, loop).result()


@atexit.register
def _stop() -> None:
    if _loop is not None and not _loop.is_closed():
        _loop.call_soon_threadsafe(_loop.stop)
