"""The Kubernetes watcher: the real kubernetes-asyncio client against kmock; records on a broker.

kmock's KubernetesEmulator stores objects; `test_watch_harness.ScriptedKubernetes`
adds, as kmock reactions, what it lacks (resourceVersions, watch-from-version,
bookmarks, 410 Gone, dropped connections, slow and stalled servers).
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator
from typing import Any

import kmock
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from kubernetes_asyncio import client as k8s

from portcullis.brokers import Broker
from portcullis.topics_admin import check_topics
from topics.partitioner import partition_for_key
from topics.records import EndpointRecord, ProfileRecord
from topics.specs import topic_name
from watchers import kubernetes as kw
from watchers import translate
from watchers.publisher import KafkaPublisher, producer_for
from watchers.reflector import Reflector
from watchers.topicstate import read_state

sys.path.insert(0, os.path.dirname(__file__))
from test_watch_harness import ScriptedKubernetes, pod

PARTITIONS = 4
FAST = kw.WatchOptions(
    page_size=100, timeout_seconds=5, request_slack=1.0, backoff_initial=0.05, backoff_max=0.2
)


@pytest.fixture
async def api(kmock: kmock.KubernetesEmulator) -> ScriptedKubernetes:
    return ScriptedKubernetes(
        kmock, [("v1", "pods", "Pod"), ("v1", "namespaces", "Namespace")]
    )


@pytest.fixture
async def client(kmock: kmock.KubernetesEmulator) -> AsyncIterator[k8s.ApiClient]:
    conf = k8s.Configuration(host=str(kmock.url).rstrip("/"))
    async with k8s.ApiClient(conf) as api_client:
        yield api_client


class Recorder:
    """A publisher that only remembers (for the mechanics tests that need no broker)."""

    def __init__(self) -> None:
        self.batches: list[list[Any]] = []
        self.fail = False

    async def publish(self, pubs: Any) -> None:
        if self.fail:
            raise RuntimeError("broker unreachable (scripted)")
        if pubs:
            self.batches.append(list(pubs))

    def state(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for batch in self.batches:
            for pub in batch:
                if pub.value is None:
                    out.pop(pub.key, None)
                else:
                    out[pub.key] = pub.value
        return out


def expected_endpoints(api: ScriptedKubernetes) -> dict[str, tuple[Any, ...]]:
    out = {}
    for obj in api.live("pods"):
        pub = translate.pod_endpoint(obj, 0.0)
        if pub.value is not None:
            out[pub.key] = _meaning(pub.value)
    return out


def _meaning(rec: Any) -> tuple[Any, ...]:
    return (rec.node, rec.interface, tuple(rec.ips), tuple(sorted(rec.labels.items())))


async def eventually(check: Any, timeout: float = 20.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        if check():
            return
        if asyncio.get_running_loop().time() > deadline:
            assert check(), "condition not met in time"
        await asyncio.sleep(0.05)


async def start(watcher: kw.ResourceWatcher) -> asyncio.Task[None]:
    task = asyncio.create_task(watcher.run())
    await asyncio.wait_for(watcher.synced.wait(), 10)
    return task


async def stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


# -- mechanics (recording publisher) ------------------------------------------------------


async def test_initial_list_in_pages_then_adds_updates_deletes_and_bookmarks(
    api: ScriptedKubernetes, client: k8s.ApiClient
) -> None:
    for i in range(7):
        await api.create("pods", pod("ns1", f"p{i}", f"10.0.0.{i + 1}", {"app": "a"}))
    await api.create("pods", pod("ns1", "pending", "10.0.0.99", phase="Pending"))
    await api.create("pods", pod("ns1", "done", "10.0.0.98", phase="Succeeded"))
    rec = Recorder()
    watcher = kw.ResourceWatcher(
        client, kw.PODS, Reflector({"pods": translate.pod_endpoint}, rec),
        kw.WatchOptions(page_size=3, timeout_seconds=5, request_slack=1),
    )
    task = await start(watcher)
    try:
        assert [r.get("continue") for r in api.list_requests] == [None, "9:3", "9:6"]
        # A Pending pod with an IP is an endpoint; a finished one is not, though kmock
        # ignores the field selector and serves it.
        assert set(rec.state()) == {*(f"pod/ns1/p{i}" for i in range(7)), "pod/ns1/pending"}
        await eventually(lambda: bool(api.watch_requests))
        assert api.watch_requests[0]["resourceVersion"] == "9"
        assert api.watch_requests[0]["allowWatchBookmarks"].lower() == "true"
        assert int(api.watch_requests[0]["timeoutSeconds"]) == 5
        for request in (*api.list_requests, *api.watch_requests):
            assert request["fieldSelector"] == "status.phase!=Succeeded,status.phase!=Failed"

        await api.create("pods", pod("ns1", "new", "10.0.1.1"))
        await api.patch("pods", "ns1", "p0", {"metadata": {"labels": {"app": "b"}}})
        await api.patch("pods", "ns1", "pending", {"status": {"phase": "Running"}})
        await api.delete("pods", "ns1", "p1")
        await eventually(lambda: rec.state().keys() == {
            *(f"pod/ns1/p{i}" for i in range(7) if i != 1), "pod/ns1/new", "pod/ns1/pending"})
        assert rec.state()["pod/ns1/p0"].labels == {"app": "b"}
        # Idle streams carry bookmarks; the watcher follows their resourceVersion.
        await eventually(lambda: watcher.stats.bookmarks >= 2)
        await api.create("namespaces", {"metadata": {"name": "unrelated"}})
        await eventually(lambda: watcher.resource_version == str(api.rv))
    finally:
        await stop(task)


async def test_an_update_that_changes_nothing_we_publish_is_not_published(
    api: ScriptedKubernetes, client: k8s.ApiClient
) -> None:
    await api.create("pods", pod("ns1", "p", "10.0.0.1", {"app": "a"}))
    rec = Recorder()
    watcher = kw.ResourceWatcher(
        client, kw.PODS, Reflector({"pods": translate.pod_endpoint}, rec), FAST
    )
    task = await start(watcher)
    try:
        await api.patch("pods", "ns1", "p", {"metadata": {"annotations": {"x": "y"}}})
        await api.patch("pods", "ns1", "p", {"status": {"conditions": [{"type": "Ready"}]}})
        await eventually(lambda: watcher.stats.events == 2)
        assert len(rec.batches) == 1  # the initial list only
        await api.patch("pods", "ns1", "p", {"metadata": {"labels": {"app": "b"}}})
        await eventually(lambda: len(rec.batches) == 2)
    finally:
        await stop(task)


async def test_410_in_the_middle_relists_and_tombstones_what_vanished(
    api: ScriptedKubernetes, client: k8s.ApiClient
) -> None:
    for i in range(6):
        await api.create("pods", pod("ns1", f"p{i}", f"10.0.0.{i + 1}"))
    rec = Recorder()
    watcher = kw.ResourceWatcher(
        client, kw.PODS, Reflector({"pods": translate.pod_endpoint}, rec), FAST
    )
    task = await start(watcher)
    try:
        api.paused = True  # the watcher falls behind ...
        await api.delete("pods", "ns1", "p2")
        await api.delete("pods", "ns1", "p4")
        await api.patch("pods", "ns1", "p0", {"metadata": {"labels": {"moved": "yes"}}})
        await api.create("pods", pod("ns1", "late", "10.0.0.50"))
        await api.expire()  # ... and the history it needs is compacted: 410 Gone
        api.paused = False
        await eventually(lambda: watcher.stats.gone >= 1 and watcher.stats.lists >= 2)
        await eventually(lambda: set(rec.state()) == {
            "pod/ns1/p0", "pod/ns1/p1", "pod/ns1/p3", "pod/ns1/p5", "pod/ns1/late"})
        assert rec.state()["pod/ns1/p0"].labels == {"moved": "yes"}
        assert watcher.stats.errors == 0
    finally:
        await stop(task)


async def test_dropped_connection_resumes_from_the_last_version_without_a_relist(
    api: ScriptedKubernetes, client: k8s.ApiClient
) -> None:
    await api.create("pods", pod("ns1", "a", "10.0.0.1"))
    rec = Recorder()
    watcher = kw.ResourceWatcher(
        client, kw.PODS, Reflector({"pods": translate.pod_endpoint}, rec), FAST
    )
    task = await start(watcher)
    try:
        await api.create("pods", pod("ns1", "b", "10.0.0.2"))
        await eventually(lambda: "pod/ns1/b" in rec.state())
        seen = watcher.resource_version
        await api.drop_connections()
        await api.create("pods", pod("ns1", "c", "10.0.0.3"))
        await eventually(lambda: "pod/ns1/c" in rec.state())
        assert watcher.stats.errors >= 1  # the broken stream was noticed ...
        assert watcher.stats.lists == 1  # ... and resumed, not relisted
        assert any(r.get("resourceVersion") == seen for r in api.watch_requests[1:])
    finally:
        await stop(task)


async def test_slow_list_and_stalled_stream_are_survived(
    api: ScriptedKubernetes, client: k8s.ApiClient
) -> None:
    await api.create("pods", pod("ns1", "a", "10.0.0.1"))
    api.list_delay = 1.5
    rec = Recorder()
    options = kw.WatchOptions(
        timeout_seconds=1, request_slack=0.5, backoff_initial=0.05, backoff_max=0.2
    )
    watcher = kw.ResourceWatcher(
        client, kw.PODS, Reflector({"pods": translate.pod_endpoint}, rec), options
    )
    task = await start(watcher)
    try:
        assert "pod/ns1/a" in rec.state()
        api.stalled = True  # new streams hang forever, ignoring timeoutSeconds
        await eventually(lambda: len(api.watch_requests) >= 3)  # server-side timeouts end streams
        await api.create("pods", pod("ns1", "b", "10.0.0.2"))
        await asyncio.sleep(2.0)  # longer than timeout + slack: the client gives up on its own
        assert watcher.stats.errors >= 1
        api.stalled = False
        await eventually(lambda: "pod/ns1/b" in rec.state())
        assert watcher.stats.lists == 1
    finally:
        api.stalled = False
        await stop(task)


async def test_a_failed_publish_is_retried_by_a_relist(
    api: ScriptedKubernetes, client: k8s.ApiClient
) -> None:
    await api.create("pods", pod("ns1", "a", "10.0.0.1"))
    rec = Recorder()
    watcher = kw.ResourceWatcher(
        client, kw.PODS, Reflector({"pods": translate.pod_endpoint}, rec), FAST
    )
    task = await start(watcher)
    try:
        rec.fail = True
        await api.delete("pods", "ns1", "a")
        await api.create("pods", pod("ns1", "b", "10.0.0.2"))
        await eventually(lambda: watcher.stats.errors >= 1)
        rec.fail = False
        await eventually(lambda: set(rec.state()) == {"pod/ns1/b"})
        assert watcher.stats.lists >= 2
    finally:
        await stop(task)


# -- on a real broker ------------------------------------------------------------------------


async def _endpoints_on_topic(broker: Broker, prefix: str) -> dict[str, tuple[Any, ...]]:
    state = await read_state(
        {"bootstrap_servers": broker.bootstrap}, topic_name(prefix, "endpoints"), EndpointRecord
    )
    return {k: _meaning(v) for k, v in state.items()}


@pytest.fixture
async def topics_ready(broker: Broker, topic_prefix: str) -> str:
    report = await check_topics(
        {"bootstrap_servers": broker.bootstrap}, topic_prefix, PARTITIONS, create=True
    )
    assert report.ok, report.lines()
    return topic_prefix


async def test_namespaces_become_profiles_on_the_broker(
    api: ScriptedKubernetes, client: k8s.ApiClient, broker: Broker, topics_ready: str
) -> None:
    await api.create("namespaces", {"metadata": {"name": "prod", "labels": {"env": "prod"}}})
    await api.create("namespaces", {"metadata": {"name": "dev"}})
    producer = producer_for({"bootstrap_servers": broker.bootstrap}, "test-watch")
    await producer.start()
    try:
        reflector = Reflector(
            {"namespaces": translate.namespace_profile},
            KafkaPublisher(producer, topics_ready),
        )
        watcher = kw.ResourceWatcher(client, kw.NAMESPACES, reflector, FAST)
        task = await start(watcher)
        try:
            await api.delete("namespaces", None, "dev")
            await api.patch("namespaces", None, "prod", {"metadata": {"labels": {"env": "p2"}}})
            await eventually(lambda: watcher.stats.events == 2)
        finally:
            await stop(task)
    finally:
        await producer.stop()
    state = await read_state(
        {"bootstrap_servers": broker.bootstrap}, topic_name(topics_ready, "profiles"),
        ProfileRecord,
    )
    assert set(state) == {"kns.prod"}
    assert state["kns.prod"].labels == {"env": "p2"}
    # only metadata was asked for (kmock answers with whole objects, as an old server would)
    assert len(api.accept_headers) >= 2
    assert all("as=PartialObjectMetadata" in h for h in api.accept_headers)


async def test_pending_pods_with_ips_are_endpoints_until_they_finish(
    api: ScriptedKubernetes, client: k8s.ApiClient, broker: Broker, topics_ready: str
) -> None:
    """Init containers send traffic before a pod runs: from its first IP it is filtered, and
    when it finishes (its IP released) it is tombstoned, even by a server that still sends it
    (kmock ignores the field selector, so "Succeeded" arrives as MODIFIED, not DELETED)."""
    await api.create("pods", pod("jobs", "listed", "10.2.0.1", {"app": "job"}, phase="Pending"))
    producer = producer_for({"bootstrap_servers": broker.bootstrap}, "test-watch")
    await producer.start()
    try:
        watcher = kw.ResourceWatcher(
            client, kw.PODS,
            Reflector({"pods": translate.pod_endpoint}, KafkaPublisher(producer, topics_ready)),
            FAST,
        )
        task = await start(watcher)

        async def caught_up() -> dict[str, tuple[Any, ...]]:
            await eventually(lambda: watcher.resource_version == str(api.rv))
            return await _endpoints_on_topic(broker, topics_ready)

        try:
            assert set(await caught_up()) == {"pod/jobs/listed"}  # from the list
            # Scheduled, no IP yet: nothing to filter.
            watched = pod("jobs", "watched", "10.2.0.2", {"app": "job"}, phase="Pending")
            watched["status"] = {"phase": "Pending"}
            await api.create("pods", watched)
            assert set(await caught_up()) == {"pod/jobs/listed"}
            # The CNI gave it an IP; its init containers start: an endpoint, still Pending.
            await api.patch("pods", "jobs", "watched", {"status": {
                "podIP": "10.2.0.2", "podIPs": [{"ip": "10.2.0.2"}]}})
            on_topic = await caught_up()
            assert set(on_topic) == {"pod/jobs/listed", "pod/jobs/watched"}
            assert on_topic["pod/jobs/watched"][2] == ("10.2.0.2",)
            assert [o["status"]["phase"] for o in api.live("pods")] == ["Pending", "Pending"]
            # Both finish; their status keeps the IPs, which no longer belong to them.
            await api.patch("pods", "jobs", "listed", {"status": {"phase": "Succeeded"}})
            await api.patch("pods", "jobs", "watched", {"status": {"phase": "Failed"}})
            assert await caught_up() == {}
            assert all(o["status"]["podIP"] for o in api.live("pods"))
            assert watcher.stats.lists == 1  # all of it through the watch
        finally:
            await stop(task)
    finally:
        await producer.stop()


async def test_thousand_pods_mirrored_exactly_across_410_and_dropped_connection(
    api: ScriptedKubernetes, client: k8s.ApiClient, broker: Broker, topics_ready: str
) -> None:
    """Done-when: 1,000 pods created, relabelled and deleted end up exactly on the topic."""
    n = 1000

    def ip(i: int) -> str:
        return f"10.{i // 250}.{i % 250}.{7}"

    for i in range(300):  # some exist before the watcher starts: they come from the list
        await api.create("pods", pod(f"ns{i % 7}", f"pod-{i}", ip(i), {"gen": "1"}))
    producer = producer_for({"bootstrap_servers": broker.bootstrap}, "test-watch")
    await producer.start()
    try:
        publisher = KafkaPublisher(producer, topics_ready)
        watcher = kw.ResourceWatcher(
            client, kw.PODS, Reflector({"pods": translate.pod_endpoint}, publisher), FAST
        )
        task = await start(watcher)
        try:
            for i in range(300, n):  # the rest are watched being created
                await api.create("pods", pod(f"ns{i % 7}", f"pod-{i}", ip(i), {"gen": "1"}))
                if i == 600:
                    await api.drop_connections()
            for i in range(0, n, 2):  # relabel half
                await api.patch("pods", f"ns{i % 7}", f"pod-{i}",
                                {"metadata": {"labels": {"gen": "2"}}})
            api.paused = True  # fall behind, then lose the history: 410
            for i in range(0, n, 3):
                await api.delete("pods", f"ns{i % 7}", f"pod-{i}")
            await api.expire()
            api.paused = False
            for i in range(1, n, 5):  # more changes after the relist
                if i % 3:
                    await api.patch("pods", f"ns{i % 7}", f"pod-{i}",
                                    {"metadata": {"labels": {"gen": "3"}}})
            await api.drop_connections()
            for i in range(0, n, 10):
                if i % 3 == 1:
                    await api.delete("pods", f"ns{i % 7}", f"pod-{i}")
            await eventually(lambda: watcher.resource_version == str(api.rv), timeout=30)
            assert watcher.stats.gone >= 1
            assert watcher.stats.lists >= 2
            assert watcher.stats.errors >= 2  # two dropped connections
        finally:
            await stop(task)
    finally:
        await producer.stop()
    expected = expected_endpoints(api)
    assert 500 < len(expected) < 700
    on_topic = await _endpoints_on_topic(broker, topics_ready)
    assert on_topic == expected
    await _partitioned_by_namespace(broker, topic_name(topics_ready, "endpoints"))
    await _partitioned_by_namespace(broker, topic_name(topics_ready, "endpoints.history"))


async def _partitioned_by_namespace(broker: Broker, topic: str) -> None:
    """Every record (tombstones too) is on its namespace's partition, as the contract says."""
    consumer = AIOKafkaConsumer(bootstrap_servers=broker.bootstrap)
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(PARTITIONS)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        seen = 0
        while any([await consumer.position(tp) < ends[tp] for tp in tps]):
            for tp, messages in (await consumer.getmany(timeout_ms=500)).items():
                for msg in messages:
                    namespace = msg.key.decode().split("/")[1]
                    assert tp.partition == partition_for_key(namespace, PARTITIONS)
                    seen += 1
        # Tansu reports a partition's end as the base offset of its last batch + 1, so reading
        # to that position yields the whole last batch: at least the end offsets, on Kafka equal.
        assert seen >= sum(ends.values()) > 1000
        if broker.kind == "kafka":
            assert seen == sum(ends.values())
    finally:
        await consumer.stop()
