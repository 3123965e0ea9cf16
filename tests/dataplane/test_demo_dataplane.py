"""The real `portcullis demo`: namespaces, the processor, a real enforcer, real TCP.

Runs the demo as a user would (a subprocess, as root) and checks that real connections were
allowed and denied as `policy.verdict` says, that the label change flipped the connection
it should, and that nothing is left behind: no namespace with the run's prefix, no process,
and no change to the host's own firewall.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time

import pytest

from portcullis.demo.netsim import leftover_namespaces
from tests.integration.test_demo import (
    REPO,
    check_demo_output,
    demo_command,
    run_demo,
    workdir_of,
)

pytestmark = pytest.mark.timeout(180)


def host_firewall() -> str:
    """The host's iptables rules, without counters (which change with traffic)."""
    proc = subprocess.run(["iptables-save"], capture_output=True, text=True, timeout=30)
    return "\n".join(
        line for line in proc.stdout.splitlines()
        if not line.startswith("#") and not line.startswith(":")
    )


def run_id(out: str) -> str:
    match = re.search(r"node node1: pcd-([0-9a-f]+)-node", out)
    assert match, out
    return match[1]


def test_real_demo_connections_follow_policy_and_nothing_is_left_behind() -> None:
    firewall = host_firewall()
    proc = run_demo("--once")
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    assert "DRY RUN" not in out
    before, _after = check_demo_output(out, "REAL TCP")
    # real connections both opened and were blocked
    assert any(r.observed for r in before) and any(r.observed is False for r in before)
    assert "dataplane programmed: every connection as policy says" in out
    rid = run_id(out)
    assert not [n for n in leftover_namespaces() if n.startswith(f"pcd-{rid}-")]
    assert not workdir_of(out).exists()
    assert host_firewall() == firewall, "the demo changed the host's firewall"


def test_sigterm_mid_demo_removes_the_namespaces_and_stops_the_enforcer() -> None:
    proc = subprocess.Popen(demo_command("--watch"), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=REPO,
                            start_new_session=True)
    assert proc.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + 120
    try:
        for line in proc.stdout:
            lines.append(line)
            if "enforcer pid" in line or time.monotonic() > deadline:
                break
        out = "".join(lines)
        enforcer = re.search(r"enforcer pid (\d+)", out)
        assert enforcer, out
        rid = run_id(out)
        assert [n for n in leftover_namespaces() if n.startswith(f"pcd-{rid}-")]
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=40)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out += rest
    assert proc.returncode == 143, out
    assert not [n for n in leftover_namespaces() if n.startswith(f"pcd-{rid}-")], out
    with pytest.raises(ProcessLookupError):
        os.kill(int(enforcer[1]), 0)
