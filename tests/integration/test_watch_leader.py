"""Two `portcullis watch kubernetes --leader-elect` against one kmock API and a broker:
one publishes, the other stands by; kill the leader and the standby takes over, relists
and publishes the state as it is. Health and metrics are read over real HTTP."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import kmock
import pytest
import yaml

from portcullis.brokers import Broker, free_port
from portcullis.topics_admin import check_topics
from topics.records import EndpointRecord
from topics.specs import topic_name
from watchers.topicstate import read_state

sys.path.insert(0, os.path.dirname(__file__))
from observing import http, portcullis, probe, scrape, series, until
from test_watch_harness import Leases, ScriptedKubernetes, pod

PARTITIONS = 2
RESOURCES = [("v1", "pods", "Pod"), ("v1", "namespaces", "Namespace"),
             ("v1", "serviceaccounts", "ServiceAccount")]
LEASE = ("portcullis", "portcullis-watch-kubernetes")


@pytest.fixture
async def prefix(broker: Broker, topic_prefix: str) -> str:
    report = await check_topics({"bootstrap_servers": broker.bootstrap}, topic_prefix,
                                PARTITIONS, create=True)
    assert report.ok, report.lines()
    return topic_prefix


def kubeconfig(path: Path, server: kmock.KubernetesEmulator) -> Path:
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "kmock",
        "clusters": [{"name": "kmock", "cluster": {"server": str(server.url).rstrip("/")}}],
        "users": [{"name": "u", "user": {}}],
        "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "u"}}],
    }))
    return path


def leader_gauge(text: str) -> float | None:
    return series(text, "portcullis_watch_leader").get("")


def published(text: str) -> float:
    return sum(series(text, "portcullis_watch_published_records_total").values())


async def test_only_the_leader_publishes_and_a_standby_takes_over_with_the_whole_state(
    kmock: kmock.KubernetesEmulator, broker: Broker, prefix: str, tmp_path: Path
) -> None:
    api = ScriptedKubernetes(kmock, RESOURCES)
    leases = Leases(kmock)
    await api.create("namespaces", {"metadata": {"name": "prod"}})
    await api.create("pods", pod("prod", "p1", "10.1.0.1"))
    await api.create("pods", pod("prod", "p2", "10.1.0.2"))
    config = kubeconfig(tmp_path / "kubeconfig", kmock)
    kafka = {"bootstrap_servers": broker.bootstrap}

    async def endpoints() -> set[str]:
        return set(await read_state(kafka, topic_name(prefix, "endpoints"), EndpointRecord))

    ports = [free_port(), free_port()]

    def argv(port: int) -> tuple[str, ...]:
        return ("watch", "kubernetes", "--kubeconfig", str(config), "--no-policy-resources",
                "--no-network-policies", "--bootstrap", broker.bootstrap, "--topic-prefix",
                prefix, "--partitions", str(PARTITIONS), "--leader-elect",
                "--leader-elect-namespace", LEASE[0], "--leader-elect-lease-duration", "3",
                "--leader-elect-renew-deadline", "2", "--leader-elect-retry-period", "0.3",
                "--health-port", str(port), "--metrics-port", str(port),
                "--health-max-age", "5", "--watch-timeout", "5")

    api.list_delay = 1.0  # slow lists: the first leader is not ready until they are published
    log_a, log_b = tmp_path / "a.log", tmp_path / "b.log"
    async with portcullis(log_a, *argv(ports[0])) as a:
        status, body = await until(lambda: probe(ports[0], "/readyz"), bool, log_a)
        assert status == 503, body
        await until(lambda: probe(ports[0], "/readyz"), lambda r: r and r[0] == 200, log_a)
        api.list_delay = 0.0
        assert await until(endpoints, lambda s: s == {"pod/prod/p1", "pod/prod/p2"}, log_a)
        async with portcullis(log_b, *argv(ports[1])) as b:
            # the second one stands by: ready, says so, publishes nothing
            status, body = await until(lambda: probe(ports[1], "/readyz"),
                                       lambda r: r and r[0] == 200, log_b)
            assert "standby" in body["conditions"]["leader"]["detail"]
            assert "not publishing" in body["conditions"]["leader"]["detail"]
            text_a, text_b = await scrape(ports[0]), await scrape(ports[1])
            assert (leader_gauge(text_a), leader_gauge(text_b)) == (1, 0)
            await api.create("pods", pod("prod", "p3", "10.1.0.3"))
            await until(endpoints, lambda s: "pod/prod/p3" in s, log_a)
            text_b = await scrape(ports[1])
            assert published(text_b) == 0, text_b
            assert published(await scrape(ports[0])) >= 3
            holder_a = leases.holder(*LEASE)
            assert holder_a is not None and holder_a in body["notes"]["election"]

            # the leader dies without a word; the cluster changes while no one leads
            a.kill()
            await a.wait()
            await api.delete("pods", "prod", "p1")
            await api.create("pods", pod("prod", "p4", "10.1.0.4"))
            await until(lambda: scrape(ports[1]), lambda t: leader_gauge(t) == 1, log_b)
            assert await until(endpoints, lambda s: s == {
                "pod/prod/p2", "pod/prod/p3", "pod/prod/p4"}, log_b)
            holder_b = leases.holder(*LEASE)
            assert holder_b not in (None, holder_a)
            lease = leases.objects[LEASE]
            assert lease["spec"]["leaseTransitions"] == 1
            status, body = await until(lambda: probe(ports[1], "/readyz"),
                                       lambda r: r and r[0] == 200, log_b)
            assert "leader" in body["conditions"]["leader"]["detail"]
            assert published(await scrape(ports[1])) > 0

            # a wedged election loop turns /healthz to 503 and names it
            answer = await http(ports[1], "/debug/stall?loop=election", "POST")
            assert answer is not None and answer[0] == 200
            status, body = await until(lambda: probe(ports[1], "/healthz"),
                                       lambda r: r and r[0] == 503, log_b)
            assert "election loop silent" in body["why"]
    assert b.returncode is not None


async def test_a_single_watcher_is_ready_once_listed_and_counts_what_it_sees(
    kmock: kmock.KubernetesEmulator, broker: Broker, prefix: str, tmp_path: Path
) -> None:
    api = ScriptedKubernetes(kmock, RESOURCES)
    await api.create("namespaces", {"metadata": {"name": "prod"}})
    await api.create("pods", pod("prod", "p1", "10.1.0.1"))
    config = kubeconfig(tmp_path / "kubeconfig", kmock)
    port = free_port()
    log = tmp_path / "watch.log"
    api.list_delay = 1.0
    async with portcullis(log, "watch", "kubernetes", "--kubeconfig", str(config),
                          "--no-policy-resources", "--no-network-policies", "--bootstrap",
                          broker.bootstrap, "--topic-prefix", prefix, "--partitions",
                          str(PARTITIONS), "--health-port", str(port), "--metrics-port",
                          str(port), "--watch-timeout", "5"):
        status, body = await until(lambda: probe(port, "/readyz"), bool, log)
        assert status == 503 and "listed" in body["why"], body
        status, body = await until(lambda: probe(port, "/readyz"),
                                   lambda r: r and r[0] == 200, log)
        assert "leader" not in body["conditions"]  # no election: always publishing
        text = await scrape(port)
        assert leader_gauge(text) == 1
        listed = series(text, "portcullis_watch_events_total")
        assert listed['{resource="pods",type="LISTED"}'] == 1, listed
        assert series(text, "portcullis_watch_last_list_timestamp_seconds")[
            '{resource="pods"}'] > 0
        before = published(text)
        assert before >= 2  # the pod (and its history copy), the namespace profile
        await api.create("pods", pod("prod", "p2", "10.1.0.2"))
        text = await until(lambda: scrape(port), lambda t: series(
            t, "portcullis_watch_events_total").get('{resource="pods",type="ADDED"}') == 1, log)
        await until(lambda: scrape(port), lambda t: published(t) > before, log)
        assert series(text, "portcullis_watch_last_event_timestamp_seconds")[
            '{resource="pods"}'] > 0


async def test_a_leader_stopped_with_sigterm_stops_publishing_and_releases_the_lease(
    kmock: kmock.KubernetesEmulator, broker: Broker, prefix: str, tmp_path: Path
) -> None:
    import signal

    api = ScriptedKubernetes(kmock, RESOURCES)
    leases = Leases(kmock)
    await api.create("pods", pod("prod", "p1", "10.1.0.1"))
    config = kubeconfig(tmp_path / "kubeconfig", kmock)
    ports = [free_port(), free_port()]

    def argv(port: int) -> tuple[str, ...]:
        return ("watch", "kubernetes", "--kubeconfig", str(config), "--no-policy-resources",
                "--no-network-policies", "--bootstrap", broker.bootstrap, "--topic-prefix",
                prefix, "--partitions", str(PARTITIONS), "--leader-elect",
                "--leader-elect-namespace", LEASE[0], "--leader-elect-lease-duration", "60",
                "--leader-elect-renew-deadline", "40", "--leader-elect-retry-period", "0.3",
                "--health-port", str(port), "--watch-timeout", "5")

    log_a, log_b = tmp_path / "a.log", tmp_path / "b.log"
    async with portcullis(log_a, *argv(ports[0])) as a:
        await until(lambda: probe(ports[0], "/readyz"), lambda r: r and r[0] == 200, log_a)
        async with portcullis(log_b, *argv(ports[1])):
            status, body = await until(lambda: probe(ports[1], "/readyz"),
                                       lambda r: r and r[0] == 200, log_b)
            assert "standby" in body["conditions"]["leader"]["detail"]
            holder_a = leases.holder(*LEASE)
            a.send_signal(signal.SIGTERM)
            assert await a.wait() == 0, log_a.read_text()[-3000:]
            assert (LEASE[1], None) in leases.writes  # released, not left to expire
            # a released lease is free: the standby takes it (no waiting out the 60 s lease),
            # and is ready once it has listed and published as the leader
            status, body = await until(lambda: probe(ports[1], "/readyz"), lambda r: r and (
                r[0] == 200 and "leader (" in r[1]["conditions"]["leader"]["detail"]), log_b)
            assert status == 200 and leases.holder(*LEASE) not in (None, holder_a)
            assert "released" in log_a.read_text()
