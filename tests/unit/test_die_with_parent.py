"""Children started with `die_with_parent_fn` do not outlive us, however we die."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from portcullis.brokers import die_with_parent_fn

REPO = Path(__file__).resolve().parents[2]

PARENT = """
import subprocess, sys, time
from portcullis.brokers import die_with_parent_fn
guarded = sys.argv[1] == "guarded"
child = subprocess.Popen(["sleep", "60"], preexec_fn=die_with_parent_fn() if guarded else None)
print(child.pid, flush=True)
time.sleep(60)
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _child_after_parent_killed(mode: str) -> tuple[int, bool]:
    parent = subprocess.Popen([sys.executable, "-c", PARENT, mode], stdout=subprocess.PIPE,
                              text=True, cwd=REPO)
    assert parent.stdout is not None
    child = int(parent.stdout.readline())
    parent.send_signal(signal.SIGKILL)
    parent.wait(10)
    deadline = time.monotonic() + 5
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    return child, _alive(child)


def test_a_guarded_child_dies_with_its_killed_parent_and_an_unguarded_one_does_not() -> None:
    assert die_with_parent_fn() is not None  # the main thread, on Linux
    _child, alive = _child_after_parent_killed("guarded")
    assert not alive
    child, alive = _child_after_parent_killed("unguarded")  # the control: it would leak
    try:
        assert alive
    finally:
        os.kill(child, signal.SIGKILL)
