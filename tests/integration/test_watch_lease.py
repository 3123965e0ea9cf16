"""The lease adapter with the real kubernetes-asyncio client against kmock's Leases: a leader
whose renewals no longer get through ends its term before a standby can take over."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator

import kmock
import pytest
from kubernetes_asyncio import client as k8s

from watchers.leader import Timing
from watchers.lease import LeaderElector, default_namespace, micro_time

sys.path.insert(0, os.path.dirname(__file__))
from test_watch_harness import Leases

TIMING = Timing(lease_duration=3.0, renew_deadline=2.0, retry_period=0.2)


@pytest.fixture
async def clients(kmock: kmock.KubernetesEmulator) -> AsyncIterator[list[k8s.ApiClient]]:
    conf = k8s.Configuration(host=str(kmock.url).rstrip("/"))
    async with k8s.ApiClient(conf) as a, k8s.ApiClient(conf) as b:
        yield [a, b]


async def test_a_cut_off_leader_steps_down_before_the_standby_takes_over(
    kmock: kmock.KubernetesEmulator, clients: list[k8s.ApiClient]
) -> None:
    leases = Leases(kmock)
    events: list[str] = []
    a = LeaderElector(clients[0], "ns", "lease", "a", TIMING,
                      on_lost=lambda: events.append("a lost"))
    b = LeaderElector(clients[1], "ns", "lease", "b", TIMING,
                      on_lost=lambda: events.append("b lost"))
    task_a = asyncio.create_task(a.run())
    try:
        await asyncio.wait_for(a.leading.wait(), 30)
        task_b = asyncio.create_task(b.run())
        try:
            for _ in range(300):  # b has read the lease and stands by
                if b.state == "standby":
                    break
                await asyncio.sleep(0.05)
            assert (b.state, b.holder) == ("standby", "a")
            leases.hang_writes_of.add("a")  # a's renewals never arrive from now on
            await asyncio.wait_for(b.leading.wait(), 30)
            events.append("b acquired")
            assert events == ["a lost", "b acquired"]  # a stopped first
            assert a.state == "standby" and not a.leading.is_set()
            assert leases.holder("ns", "lease") == "b"
            assert leases.objects[("ns", "lease")]["spec"]["leaseTransitions"] == 1
        finally:
            leases.unhang()
            task_b.cancel()
    finally:
        task_a.cancel()


async def test_a_race_to_create_the_lease_has_one_winner(
    kmock: kmock.KubernetesEmulator, clients: list[k8s.ApiClient]
) -> None:
    leases = Leases(kmock)
    electors = [LeaderElector(c, "ns", "lease", name, TIMING) for c, name in
                zip(clients, "ab", strict=True)]
    await asyncio.gather(*(e._try() for e in electors))  # both read "no lease", both create
    await asyncio.gather(*(e._try() for e in electors))
    assert sorted(e.state for e in electors) == ["leader", "standby"]
    leader = next(e for e in electors if e.state == "leader")
    assert leases.holder("ns", "lease") == leader.identity


def test_defaults_come_from_the_pod() -> None:
    assert default_namespace("/nonexistent/namespace") == "portcullis"
    assert micro_time(0.5) == "1970-01-01T00:00:00.500000Z"
