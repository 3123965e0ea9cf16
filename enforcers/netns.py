"""Run code and open sockets inside a named network namespace (``ip netns`` style).

Linux ties a network namespace to a *thread*: ``setns(2)`` switches only the caller.
A netlink socket keeps the namespace it was opened in for its whole life, so we
open it on a short-lived helper thread that switched namespace, and hand the socket
back; the calling thread (and the rest of the process, e.g. an asyncio loop) never
changes namespace. The ``setns`` call itself is pyroute2's (``pyroute2.netns``).
"""

from __future__ import annotations

import os
import socket
import subprocess
import threading
from collections.abc import Callable
from typing import TypeVar

from pyroute2 import netns as _pr_netns

NETNS_RUN_DIR = "/var/run/netns"

T = TypeVar("T")


class NetnsError(RuntimeError):
    """A named network namespace is missing or cannot be entered."""


def netns_path(name: str) -> str:
    """The bind-mount path ``ip netns`` uses for a named namespace."""
    if not name or "/" in name or name in {".", ".."}:
        raise NetnsError(f"invalid network namespace name {name!r}")
    return os.path.join(NETNS_RUN_DIR, name)


def exists(name: str) -> bool:
    return os.path.exists(netns_path(name))


def create(name: str) -> None:
    """Create a named namespace with ``ip netns add`` (with a working ``lo``)."""
    _ip("netns", "add", name)
    _ip("-n", name, "link", "set", "lo", "up")


def remove(name: str) -> None:
    """Delete a named namespace; missing is fine (cleanup must be idempotent)."""
    if exists(name):
        _ip("netns", "del", name)


def run_in(name: str | None, fn: Callable[[], T], timeout: float = 60.0) -> T:
    """Call ``fn()`` on a helper thread that lives in namespace ``name``.

    ``name=None`` calls ``fn`` directly in the caller's namespace. Exceptions raised
    by ``fn`` propagate to the caller.
    """
    if name is None:
        return fn()
    path = netns_path(name)
    result: list[T] = []
    error: list[BaseException] = []

    def target() -> None:
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            error.append(NetnsError(f"network namespace {name!r} does not exist ({path})"))
            return
        try:
            # pyroute2's setns with an fd: switches this thread only, never creates.
            _pr_netns.setns(fd, flags=0)
        except OSError as exc:
            error.append(NetnsError(f"cannot enter network namespace {name!r}: {exc}"))
            return
        finally:
            os.close(fd)
        try:
            result.append(fn())
        except BaseException as exc:
            error.append(exc)

    thread = threading.Thread(target=target, name=f"netns-{name}", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise NetnsError(f"call in network namespace {name!r} did not finish in {timeout}s")
    if error:
        raise error[0]
    return result[0]


def open_socket(name: str | None, family: int, type_: int, proto: int = 0) -> socket.socket:
    """A socket that belongs to namespace ``name`` (the caller's when ``None``)."""
    return run_in(name, lambda: socket.socket(family, type_, proto))


def _ip(*args: str) -> None:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        raise NetnsError(f"ip {' '.join(args)} failed: {proc.stderr.strip()}")
