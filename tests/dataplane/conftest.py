"""Fixtures for dataplane tests: real network namespaces, created and removed per test.

``netns`` gives one fresh namespace; ``make_netns`` makes as many as a test needs
(pod / node / outside). Names are ``<prefix><random>``; a test module picks its prefix
with a module-level ``NETNS_PREFIX = "pc-xyz-"`` (default ``pc-dp-``). Everything a
test creates inside a namespace (ipsets, iptables rules, veth ends moved in) dies with it.

Not root: skipped with a reason, or failed when ``CI=true`` (CI must run these).
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import pytest

from enforcers import netns as netns_mod

DEFAULT_PREFIX = "pc-dp-"


@dataclass
class Netns:
    """A named network namespace and a way to run commands in it."""

    name: str

    def run(self, *cmd: str, check: bool = True, timeout: float = 30.0,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run ``cmd`` inside the namespace (``ip netns exec``); text output captured."""
        proc = subprocess.run(["ip", "netns", "exec", self.name, *cmd], capture_output=True,
                              text=True, timeout=timeout, input=input)
        if check and proc.returncode != 0:
            raise AssertionError(
                f"in netns {self.name}: {' '.join(cmd)} exited {proc.returncode}:\n"
                f"{proc.stdout}{proc.stderr}")
        return proc

    def popen(self, *cmd: str, **kwargs: object) -> subprocess.Popen[bytes]:
        """Start a long-running process in the namespace; the caller stops it by PID."""
        return subprocess.Popen(["ip", "netns", "exec", self.name, *cmd], **kwargs)  # type: ignore[call-overload, no-any-return]

    def remove(self) -> None:
        netns_mod.remove(self.name)


def _require_root(tools: Sequence[str] = ("ip",)) -> None:
    problems = []
    if os.geteuid() != 0:
        problems.append("needs root (network namespaces)")
    problems += [f"needs the {t!r} command" for t in tools if shutil.which(t) is None]
    if problems:
        reason = "dataplane test " + ", ".join(problems)
        if os.environ.get("CI") == "true":
            pytest.fail(reason + " (CI=true: dataplane tests must run)")
        pytest.skip(reason)


@pytest.fixture
def make_netns(request: pytest.FixtureRequest) -> Iterator[Callable[[], Netns]]:
    """Factory: each call creates one more namespace; all are removed after the test."""
    _require_root()
    prefix = getattr(request.module, "NETNS_PREFIX", DEFAULT_PREFIX)
    made: list[Netns] = []

    def make() -> Netns:
        ns = Netns(f"{prefix}{secrets.token_hex(4)}")
        netns_mod.create(ns.name)
        made.append(ns)
        return ns

    try:
        yield make
    finally:
        errors = []
        for ns in reversed(made):
            try:
                ns.remove()
            except Exception as exc:  # keep removing the others
                errors.append(exc)
        if errors:
            raise errors[0]


@pytest.fixture
def netns(make_netns: Callable[[], Netns]) -> Netns:
    """One fresh network namespace (``netns.name``, ``netns.run(...)``)."""
    return make_netns()
