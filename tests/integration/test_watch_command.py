"""`portcullis watch kubernetes|hosts` as a process: kubeconfig to kmock, records on a broker."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import kmock
import pytest
import yaml

from portcullis.brokers import Broker
from portcullis.topics_admin import check_topics
from topics.records import EndpointRecord, PolicyRecord, ProfileRecord
from topics.specs import topic_name
from watchers.topicstate import read_state

sys.path.insert(0, os.path.dirname(__file__))
from test_watch_harness import ScriptedKubernetes, pod

PARTITIONS = 3
GROUP = "policy.portcullis.io/v1"
RESOURCES = [
    ("v1", "pods", "Pod"), ("v1", "namespaces", "Namespace"),
    ("v1", "serviceaccounts", "ServiceAccount"), ("v1", "nodes", "Node"),
    ("networking.k8s.io/v1", "networkpolicies", "NetworkPolicy"),
    (GROUP, "tiers", "Tier"), (GROUP, "globalnetworkpolicies", "GlobalNetworkPolicy"),
    (GROUP, "networkpolicies", "NetworkPolicy"), (GROUP, "globalnetworksets", "GlobalNetworkSet"),
    (GROUP, "networksets", "NetworkSet"), (GROUP, "hostendpoints", "HostEndpoint"),
    (GROUP, "stagedglobalnetworkpolicies", "StagedGlobalNetworkPolicy"),
    (GROUP, "stagednetworkpolicies", "StagedNetworkPolicy"),
    (GROUP, "stagedkubernetesnetworkpolicies", "StagedKubernetesNetworkPolicy"),
]


@pytest.fixture
async def prefix(tansu_broker: Broker, topic_prefix: str) -> str:
    report = await check_topics(
        {"bootstrap_servers": tansu_broker.bootstrap}, topic_prefix, PARTITIONS, create=True
    )
    assert report.ok, report.lines()
    return topic_prefix


@contextlib.asynccontextmanager
async def portcullis(log: Path, *argv: str) -> AsyncIterator[asyncio.subprocess.Process]:
    with log.open("ab") as out:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", "import sys; from portcullis.cli import main; sys.exit(main())",
            *argv, stdout=out, stderr=out,
        )
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGINT)
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()


async def until(read: Callable[[], Any], check: Callable[[Any], bool], log: Path) -> Any:
    value = None
    for _ in range(150):
        value = await read()
        if check(value):
            return value
        await asyncio.sleep(0.1)
    raise AssertionError(f"not reached; last state {value!r}\nlog:\n{log.read_text()[-3000:]}")


async def test_watch_kubernetes_publishes_pods_profiles_and_policies_and_resumes(
    kmock: kmock.KubernetesEmulator, tansu_broker: Broker, prefix: str, tmp_path: Path
) -> None:
    api = ScriptedKubernetes(kmock, RESOURCES)
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "kmock",
        "clusters": [{"name": "kmock", "cluster": {"server": str(kmock.url).rstrip("/")}}],
        "users": [{"name": "u", "user": {}}],
        "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "u"}}],
    }))
    await api.create("namespaces", {"metadata": {"name": "prod", "labels": {"env": "prod"}}})
    await api.create("nodes", {"metadata": {"name": "node-1", "labels": {"zone": "a"}},
                               "status": {"addresses": [
                                   {"type": "InternalIP", "address": "192.168.0.1"}]}})
    await api.create("pods", pod("prod", "web-1", "10.1.0.1", {"app": "web"}))
    await api.create("pods", pod("prod", "web-2", "10.1.0.2", {"app": "web"}))
    await api.create("globalnetworkpolicies", {
        "apiVersion": GROUP, "kind": "GlobalNetworkPolicy", "metadata": {"name": "deny-egress"},
        "spec": {"selector": "all()", "types": ["Egress"]},
    })
    await api.create("globalnetworkpolicies", {  # invalid: reported, not published
        "apiVersion": GROUP, "kind": "GlobalNetworkPolicy", "metadata": {"name": "broken"},
        "spec": {"selector": "app = 'x'", "types": ["Egress"]},
    })
    await api.create("networking.k8s.io/v1/networkpolicies", {
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": "allow-dns", "namespace": "prod"},
        "spec": {"podSelector": {}, "policyTypes": ["Egress"],
                 "egress": [{"ports": [{"protocol": "UDP", "port": 53}]}]},
    })
    kafka = {"bootstrap_servers": tansu_broker.bootstrap}

    async def endpoints() -> dict[str, EndpointRecord]:
        return await read_state(kafka, topic_name(prefix, "endpoints"), EndpointRecord)

    async def policies() -> dict[str, PolicyRecord]:
        return await read_state(kafka, topic_name(prefix, "policies"), PolicyRecord)

    argv = ("watch", "kubernetes", "--auto-host-endpoints", "--kubeconfig", str(kubeconfig),
            "--bootstrap",
            tansu_broker.bootstrap, "--topic-prefix", prefix, "--partitions", str(PARTITIONS))
    log = tmp_path / "watch.log"
    async with portcullis(log, *argv):
        state = await until(endpoints, lambda s: set(s) == {
            "pod/prod/web-1", "pod/prod/web-2", "hostendpoint//node-1-auto-hep"}, log)
        hep = state["hostendpoint//node-1-auto-hep"]
        assert (hep.node, hep.interface, hep.ips) == ("node-1", "*", ("192.168.0.1",))
        assert hep.profiles == ("projectcalico-default-allow",)
        state = await until(policies, lambda s: len(s) == 2, log)
        assert set(state) == {"GlobalNetworkPolicy//deny-egress",
                              "NetworkPolicy/prod/knp.default.allow-dns"}
        assert state["GlobalNetworkPolicy//deny-egress"].actor == "kubernetes"
        profiles = await read_state(kafka, topic_name(prefix, "profiles"), ProfileRecord)
        assert profiles["kns.prod"].labels == {"env": "prod"}
        await api.create("pods", pod("prod", "web-3", "10.1.0.3"))
        await until(endpoints, lambda s: "pod/prod/web-3" in s, log)
    assert "broken" in log.read_text() and "spec.selector" in log.read_text()

    # While the watcher is down a pod goes away; the restarted watcher tombstones it.
    await api.delete("pods", "prod", "web-1")
    async with portcullis(log, *argv):
        await until(endpoints, lambda s: set(s) == {
            "pod/prod/web-2", "pod/prod/web-3", "hostendpoint//node-1-auto-hep"}, log)


async def test_watch_hosts_publishes_a_dropped_vm_file(
    tansu_broker: Broker, prefix: str, tmp_path: Path
) -> None:
    inventory = tmp_path / "hosts"
    inventory.mkdir()
    kafka = {"bootstrap_servers": tansu_broker.bootstrap}

    async def endpoints() -> dict[str, EndpointRecord]:
        return await read_state(kafka, topic_name(prefix, "endpoints"), EndpointRecord)

    log = tmp_path / "hosts.log"
    async with portcullis(log, "watch", "hosts", str(inventory), "--bootstrap",
                          tansu_broker.bootstrap, "--topic-prefix", prefix,
                          "--partitions", str(PARTITIONS)):
        await until(lambda: asyncio.sleep(0.1, log.read_text()),
                    lambda text: "watching" in text, log)
        (inventory / "vm1.yaml").write_text(
            "name: vm1\ninterfaces:\n  - name: eth0\n    ips: [10.30.0.1]\nlabels: {app: db}\n")
        state = await until(endpoints, lambda s: "vm//vm1" in s, log)
        assert state["vm//vm1"].labels == {"app": "db"}


def test_watch_hosts_without_a_directory_is_a_usage_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from portcullis import cli

    assert cli.main(["watch", "hosts"]) == 1
    assert "needs the inventory directory" in capsys.readouterr().err
