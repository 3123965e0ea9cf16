"""`portcullis demo` end to end in dry-run mode: embedded broker, topics, the real processor,
the enforcer's rules computed and packets run through them; and cleanup on Ctrl-C/SIGTERM.

The demo starts its own embedded broker (that is what a new user runs), so these tests use
no broker fixture; each run is a subprocess, as a user would start it.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from portcullis.demo.netsim import leftover_namespaces

REPO = Path(__file__).resolve().parents[2]
ENTRY = "import sys; from portcullis.cli import main; sys.exit(main())"

pytestmark = pytest.mark.timeout(180)

ROW = re.compile(
    r"^(?P<changed>→| ) (?P<source>\S.*?)?\s{2,}(?P<dest>\S+ \S+:\d+)\s{2,}"
    r"(?P<emark>[✔✘]) (?P<expected>allow|deny)\s+(?P<omark>[✔✘·]) (?P<observed>open|blocked|—)"
    r"\s{2,}(?P<why>.*?)(?P<disagree>\s+⚠ .*)?$"
)


@dataclass(frozen=True)
class Row:
    source: str
    destination: str
    expected: bool
    observed: bool | None
    why: str
    changed: bool
    disagrees: bool


def parse_tables(output: str) -> list[list[Row]]:
    """Every connection table in the demo's (colourless) output, in order."""
    tables: list[list[Row]] = []
    current: list[Row] | None = None
    source = ""
    for line in output.splitlines():
        if line.startswith("  SOURCE "):
            current = []
            tables.append(current)
            source = ""
            continue
        if current is None:
            continue
        match = ROW.match(line)
        if match is None:
            current = None
            continue
        source = match["source"] or source
        observed = {"open": True, "blocked": False, "—": None}[match["observed"]]
        current.append(Row(source, match["dest"], match["expected"] == "allow", observed,
                           match["why"], match["changed"] == "→", match["disagree"] is not None))
    return tables


def by_case(table: list[Row]) -> dict[tuple[str, str], Row]:
    return {(r.source, r.destination): r for r in table}


def demo_command(*args: str) -> list[str]:
    return [sys.executable, "-c", ENTRY, "demo", "--color", "never", *args]


def run_demo(*args: str, timeout: float = 150) -> subprocess.CompletedProcess[str]:
    return subprocess.run(demo_command(*args), capture_output=True, text=True, timeout=timeout,
                          cwd=REPO)


SAAS_443 = "payments-api 203.0.113.10:443"
BY_NAME = "payments-api api.payments.example.com:443"


def check_demo_output(out: str, observed_title: str) -> tuple[list[Row], list[Row]]:
    """What any demo run must show: allowed and denied connections as policy says, a label
    change that flips exactly the connections it should, and the propagation time."""
    assert f"POLICY    {observed_title}" in out
    tables = parse_tables(out)
    assert len(tables) == 2, out
    before, after = tables
    assert len(before) == len(after) == 26, out
    for table in tables:
        assert all(r.observed is not None for r in table), out
        wrong = [r for r in table if r.observed != r.expected or r.disagrees]
        assert not wrong, f"connections that disagree with policy.verdict: {wrong}\n{out}"
    cases = by_case(before)
    # prod has a default deny with DNS; billing may reach the SaaS API on 443 only
    assert cases[("prod/billing", SAAS_443)].expected
    assert "billing-to-saas" in cases[("prod/billing", SAAS_443)].why
    assert not cases[("prod/billing", "payments-api 203.0.113.10:80")].expected
    assert not cases[("prod/billing", "orders-db 10.0.20.5:5432")].expected
    assert cases[("prod/billing", "kube-dns 10.65.4.2:53")].expected
    assert "default-deny" in cases[("prod/billing", "kube-dns 10.65.4.2:53")].why
    assert not cases[("prod/reports", SAAS_443)].expected
    # by name: the network set's allowedEgressDomains, learned from kube-dns's answer
    assert cases[("prod/billing", BY_NAME)].expected
    assert "billing-to-saas" in cases[("prod/billing", BY_NAME)].why
    assert not cases[("prod/reports", BY_NAME)].expected
    # staging has no policy: everything allowed
    assert all(r.expected for r in before if r.source == "staging/web")
    # the node's host endpoint: mirror allowed, database denied, failsafe API server port open
    assert cases[("node1 (host)", "pkg-mirror 10.0.30.5:80")].expected
    assert not cases[("node1 (host)", "orders-db 10.0.20.5:5432")].expected
    assert cases[("node1 (host)", "kube-apiserver 10.0.40.5:6443")].expected
    assert "failsafe" in cases[("node1 (host)", "kube-apiserver 10.0.40.5:6443")].why
    # the label change flips prod/reports to the SaaS API (by address and by name), and
    # nothing else
    changed = [r for r in after if r.changed]
    flipped = [("prod/reports", SAAS_443), ("prod/reports", BY_NAME)]
    assert [(r.source, r.destination) for r in changed] == flipped, out
    assert all(r.expected and r.observed for r in changed)
    assert {(r.source, r.destination, r.expected) for r in after if not r.changed} == {
        (r.source, r.destination, r.expected) for r in before
        if (r.source, r.destination) not in flipped
    }
    match = re.search(r"connection flipped after (\d+) ms", out)
    assert match, out
    return before, after


def workdir_of(out: str) -> Path:
    match = re.search(r"log (/\S+)/processor\.log", out)
    assert match, out
    return Path(match[1])


def test_dry_run_demo_shows_allowed_and_denied_connections_and_the_label_change() -> None:
    proc = run_demo("--once", "--dry-run")
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    check_demo_output(out, "RULES (sim)")
    # layer (a): the published records were read back from the broker
    assert "read back 15 keys" in out
    assert "endpoints    pod/prod/billing  ips=10.65.1.2 labels=app=billing" in out
    # the processor's memberships and the enforcer's rendered rules are shown
    assert "∋ pod/prod/billing" in out
    assert "∋ globalnetworkset//saas-apis" in out
    assert re.search(r"pc-s:\S+  \{198\.51\.100\.16/28, 203\.0\.113\.0/24\}", out), out
    assert "--match-set" in out
    assert "\033[" not in out  # no colours when not a terminal
    # nothing left behind: no work directory, no namespaces
    workdir = workdir_of(out)
    assert not workdir.exists()
    run_id = workdir.name.split("-")[2]
    assert not [n for n in leftover_namespaces() if n.startswith(f"pcd-{run_id}-")]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_interrupted_demo_stops_its_processes_and_removes_its_work_directory(sig: int) -> None:
    proc = subprocess.Popen(demo_command("--dry-run", "--watch"), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=REPO,
                            start_new_session=True)
    assert proc.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + 120
    try:
        for line in proc.stdout:
            lines.append(line)
            if "Connections after the label change" in line or time.monotonic() > deadline:
                break
        out = "".join(lines)
        assert "Connections after the label change" in out, out
        processor = int(re.search(r"processor pid (\d+)", out)[1])  # type: ignore[index]
        assert _pid_alive(processor)
        proc.send_signal(sig)
        rest, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out += rest
    assert proc.returncode == (130 if sig == signal.SIGINT else 143), out
    assert not _pid_alive(processor), "the processor outlived the demo"
    assert not workdir_of(out).exists(), out
