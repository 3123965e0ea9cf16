"""Run a coroutine at once when it does not have to wait, else in a task (asyncio only).

Faust's consumer hands every fetched record on with ``wait_first(deliver(record),
suspend_flow.wait())``: four tasks and an ``asyncio.wait`` per record, so that a delivery
blocked on a full buffer or on paused flow gives way when a rebalance suspends the flow.
Almost always the delivery does not block at all. `step` runs a coroutine up to its first
real wait; `resume` finishes one that stopped there, in a task that can be raced and
cancelled exactly as the whole coroutine could have been.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

__all__ = ["Stepped", "resume", "step"]


class Stepped:
    """A coroutine stepped once: finished (`done`, `value`) or waiting on `awaiting`."""

    __slots__ = ("awaiting", "coro", "done", "value")

    def __init__(self, coro: Coroutine[Any, Any, Any], done: bool, value: Any,
                 awaiting: Any) -> None:
        self.coro, self.done, self.value, self.awaiting = coro, done, value, awaiting


def step(coro: Coroutine[Any, Any, Any]) -> Stepped:
    """Run `coro` until it finishes or first waits; its exception propagates."""
    try:
        awaiting = coro.send(None)
    except StopIteration as stop:
        return Stepped(coro, True, stop.value, None)
    return Stepped(coro, False, None, awaiting)


async def resume(stepped: Stepped) -> Any:
    """Finish a coroutine that `step` left waiting, as an asyncio task would have.

    A future it yielded is awaited without taking its result (the coroutine reads it when
    sent ``None``, as `asyncio.Future.__await__` does); a bare yield is a trip through the
    loop. Cancelled while waiting, the future is cancelled and the coroutine resumed, so
    it sees `CancelledError` where it waited and its cleanup runs.
    """
    coro, awaiting = stepped.coro, stepped.awaiting
    while True:
        thrown: BaseException | None = None
        try:
            await _wait_for(awaiting)
        except asyncio.CancelledError as cancelled:
            if isinstance(awaiting, asyncio.Future):
                awaiting.cancel()  # the coroutine reads the cancellation from it
            else:
                thrown = cancelled  # a bare yield: nothing to read it from
        try:
            awaiting = coro.send(None) if thrown is None else coro.throw(thrown)
        except StopIteration as stop:
            return stop.value


async def _wait_for(awaiting: Any) -> None:
    if awaiting is None:
        await asyncio.sleep(0)
        return
    if not isinstance(awaiting, asyncio.Future):
        raise RuntimeError(f"a coroutine yielded {awaiting!r}, not an asyncio future")
    awaiting._asyncio_future_blocking = False  # taken over, as Task.__step does
    if not awaiting.done():
        await asyncio.wait((awaiting,))  # done or failed: not read here
