"""Helpers for the health and metrics tests: `portcullis` subprocesses, real HTTP scrapes."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import orjson

from portcullis.observe import TEST_HOOKS_ENV


@contextlib.asynccontextmanager
async def portcullis(log: Path, *argv: str) -> AsyncIterator[asyncio.subprocess.Process]:
    """`portcullis ARGV` as a process (test hooks on), stopped with SIGINT at the end."""
    env = dict(os.environ, **{TEST_HOOKS_ENV: "1"})
    with log.open("ab") as out:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", "import sys; from portcullis.cli import main; sys.exit(main())",
            *argv, stdout=out, stderr=out, env=env,
        )
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGINT)
            try:
                await asyncio.wait_for(proc.wait(), 15)
            except TimeoutError:
                proc.kill()
                await proc.wait()


def _request(port: int, path: str, method: str) -> tuple[int, bytes] | None:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method)
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except (ConnectionError, urllib.error.URLError, TimeoutError):
        return None  # not serving (yet)


async def http(port: int, path: str, method: str = "GET") -> tuple[int, bytes] | None:
    return await asyncio.to_thread(_request, port, path, method)


async def probe(port: int, path: str) -> tuple[int, dict[str, Any]] | None:
    answer = await http(port, path)
    return None if answer is None else (answer[0], orjson.loads(answer[1]))


def series(text: str, name: str) -> dict[str, float]:
    """Every sample of metric `name` in an exposition: labels text -> value."""
    out = {}
    for match in re.finditer(rf"^{re.escape(name)}(\{{[^}}]*\}})? (\S+)$", text, re.M):
        out[match.group(1) or ""] = float(match.group(2))
    return out


async def scrape(port: int) -> str:
    answer = await http(port, "/metrics")
    return "" if answer is None or answer[0] != 200 else answer[1].decode()


async def until(read: Callable[[], Any], check: Callable[[Any], bool], log: Path,
                timeout: float = 60.0) -> Any:
    """Poll `read` until `check` holds (no timing asserted: the deadline only ends a hang)."""
    deadline = time.monotonic() + timeout
    value = None
    while time.monotonic() < deadline:
        value = await read()
        if check(value):
            return value
        await asyncio.sleep(0.1)
    raise AssertionError(f"not reached; last {value!r}\nlog:\n{log.read_text()[-4000:]}")
