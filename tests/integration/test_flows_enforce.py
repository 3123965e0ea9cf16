"""`portcullis enforce` logs flows and `portcullis flows` shows them, as a user runs them: a
broker (both kinds), the enforcer in a node namespace, real TCP from a pod, the flows
topic, the command's JSON and table output."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from portcullis.brokers import Broker, free_port
from tests.dataplane.conftest import make_netns  # noqa: F401  (fixture)
from tests.dataplane.test_flow_logs import POLICIES, WEB
from tests.dataplane.test_traffic import (
    NODE,
    Topology,
    World,
    topology,  # noqa: F401  (fixture)
)
from tests.integration.test_enforcer import _metric, _stop, eventually, make_topics, publish

NETNS_PREFIX = "pc-fe-"
pytestmark = pytest.mark.dataplane
EXE = os.path.join(os.path.dirname(sys.executable), "portcullis")

DENIED = {("10.66.3.1", 80): 3, ("10.66.3.1", 443): 1, ("10.66.0.2", 80): 2}
ALLOWED = {("10.66.1.1", 443): 2}


def _flows(bootstrap: str, prefix: str, *args: str) -> str:
    proc = subprocess.run([EXE, "flows", "--bootstrap", bootstrap, "--topic-prefix", prefix,
                           *args], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


async def test_enforce_publishes_flow_records_that_portcullis_flows_shows(
    broker: Broker, topic_prefix: str, topology: Topology, tmp_path: Path,  # noqa: F811
) -> None:
    bootstrap = broker.bootstrap
    await make_topics(bootstrap, topic_prefix)
    world = World()
    world.put_endpoint("pod", "shop", "a", ("10.65.1.2",), {"app": "web"}, "veth-a")
    world.put_objects(POLICIES)
    await publish(bootstrap, topic_prefix, world.changes())
    port = free_port()
    log = tmp_path / "enforcer.log"
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [EXE, "enforce", "--node", NODE, "--netns", topology.node.name,
             "--bootstrap", bootstrap, "--topic-prefix", topic_prefix, "--metrics-port",
             str(port), "--no-dns-learning", "--flow-interval", "0.5",
             "--flow-log-group", "21"],
            stdout=subprocess.DEVNULL, stderr=out)
    try:
        await eventually(lambda: _metric(port, "portcullis_enforcer_in_sync") == 1, 30)
        for cases, ok in ((DENIED, False), (ALLOWED, True)):
            for (dst, dport), attempts in cases.items():
                for _ in range(attempts):
                    assert topology.connect("pod-a", dst, dport) is ok, (dst, dport)
        denied = sum(DENIED.values())
        await eventually(lambda: (_metric(port, "portcullis_enforcer_flow_events_total")
                                  or 0) >= denied, 20)
        await eventually(lambda: (_metric(
            port, "portcullis_enforcer_flow_records_published_total") or 0) >= len(DENIED), 20)
        assert _metric(port, "portcullis_enforcer_flow_errors_total") == 0
    finally:
        _stop(proc, signal.SIGTERM)
    assert proc.returncode == 0, log.read_text()[-2000:]

    records = json.loads(_flows(bootstrap, topic_prefix, "-o", "json", "--source", "shop/a"))
    attempts: Counter[tuple[str, int]] = Counter()
    for record in records:
        assert (record["node"], record["action"], record["source_ip"]) == (
            NODE, "deny", "10.65.1.2")
        assert record["source_endpoint"] == "pod/shop/a"
        if record["dest_ip"] == "10.66.3.1":
            assert (record["tier"], record["policy"], record["rule"], record["reason"]) == (
                "default", WEB, "egress[0]", "rule")
        else:
            assert (record["tier"], record["policy"], record["reason"]) == (
                "default", None, "end of tier")
        attempts[(record["dest_ip"], record["dest_port"])] += record["attempts"]
    assert dict(attempts) == DENIED

    only = json.loads(_flows(bootstrap, topic_prefix, "-o", "json", "--dest", "10.66.0.2",
                             "--since", "1h"))
    assert {(r["dest_ip"], r["dest_port"]) for r in only} == {("10.66.0.2", 80)}
    assert json.loads(_flows(bootstrap, topic_prefix, "-o", "json", "--action", "allow")) == []
    assert json.loads(_flows(bootstrap, topic_prefix, "-o", "json", "--until",
                             "2000-01-01T00:00:00Z")) == []
    table = _flows(bootstrap, topic_prefix, "--dest", "10.66.3.1").splitlines()
    assert table[0].split()[:4] == ["LAST", "SEEN", "NODE", "ACTION"]
    assert all("DENY" in row and f"default · {WEB} · egress[0]" in row for row in table[1:])
    assert len(table) >= 3  # ports 80 and 443
