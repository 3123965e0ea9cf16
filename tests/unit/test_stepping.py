"""`streams.stepping`: a coroutine stepped at once and resumed behaves as the same
coroutine run as a task (results, exceptions, the order of what it does, cancellation)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streams.stepping import resume, step

# A program: a list of waits; each is ("now",), ("yield",), ("future", delay, fails).
waits = st.one_of(
    st.just(("now",)),
    st.just(("yield",)),
    st.tuples(st.just("future"), st.integers(0, 3), st.booleans()),
)
programs = st.lists(waits, max_size=6)


async def _ticks(n: int) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


async def _program(waits: list[Any], trace: list[str]) -> str:
    loop = asyncio.get_running_loop()
    settling: list[asyncio.Task[None]] = []
    for i, wait in enumerate(waits):
        if wait[0] == "yield":
            await asyncio.sleep(0)
        elif wait[0] == "future":
            _kind, delay, fails = wait
            future: asyncio.Future[int] = loop.create_future()

            async def settle(future: asyncio.Future[int] = future, delay: int = delay,
                             fails: bool = fails, i: int = i) -> None:
                await _ticks(delay)
                if fails:
                    future.set_exception(ValueError(f"step {i}"))
                else:
                    future.set_result(i)

            settling.append(loop.create_task(settle()))
            try:
                trace.append(f"got {await future}")
            except ValueError as exc:
                trace.append(f"caught {exc}")
        trace.append(f"step {i}")
    if len(waits) % 3 == 2:
        raise KeyError("the end")
    return "done"


async def _outcome(run: Any, program: list[Any]) -> tuple[str, list[str]]:
    trace: list[str] = []
    try:
        result = await run(_program(program, trace))
    except KeyError as exc:
        result = f"raised {exc}"
    await _ticks(5)  # let every settle() finish
    return result, trace


async def _as_task(coro: Any) -> Any:
    return await asyncio.create_task(coro)


async def _stepped(coro: Any) -> Any:
    stepped = step(coro)
    if stepped.done:
        return stepped.value
    return await asyncio.create_task(resume(stepped))


@settings(max_examples=150, deadline=None)
@given(programs)
def test_stepped_and_resumed_equals_a_task(program: list[Any]) -> None:
    expected = asyncio.run(_outcome(_as_task, program))
    assert asyncio.run(_outcome(_stepped, program)) == expected


def test_a_coroutine_that_does_not_wait_finishes_in_the_step() -> None:
    async def main() -> None:
        trace: list[str] = []
        before = len(asyncio.all_tasks())
        stepped = step(_program([("now",), ("now",), ("now",)], trace))
        assert stepped.done and stepped.value == "done"
        assert trace == ["step 0", "step 1", "step 2"]
        assert len(asyncio.all_tasks()) == before  # no task was started

    asyncio.run(main())


def test_an_exception_before_the_first_wait_propagates_from_the_step() -> None:
    async def fails() -> None:
        raise KeyError("at once")

    with pytest.raises(KeyError):
        step(fails())


def test_cancelled_while_waiting_the_coroutine_sees_it_where_it_waited() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        never: asyncio.Future[None] = loop.create_future()
        seen: list[str] = []

        async def waits() -> None:
            try:
                await never
            except asyncio.CancelledError:
                seen.append("cancelled at the wait")
                raise
            finally:
                seen.append("cleaned up")

        stepped = step(waits())
        assert not stepped.done
        task = asyncio.create_task(resume(stepped))
        await _ticks(2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert seen == ["cancelled at the wait", "cleaned up"]
        assert never.cancelled()

    asyncio.run(main())
