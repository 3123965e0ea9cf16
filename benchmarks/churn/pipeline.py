"""The pipelines the harness drives without a broker: ours (pure core) and the naive baseline.

`PurePipeline` is Portcullis' own processing with the transport taken out: the streams'
in-memory processor (`streams.local.LocalProcessor`: compile and match per partition, the
same code the Faust agents run) feeding a `Fleet` of dry-run enforcers. It is what the
unit tests check against the oracle and what the baseline is compared with, event for
event.

`NaivePipeline` is the baseline the issue asks for: after every event, every selector is
recomputed against every endpoint (the oracle, no index, no increments), and every node
rewrites every set it uses in full, `ipset restore`-style (a temporary set filled and
swapped in), in dry run.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from benchmarks.churn.cluster import ChurnEvent, Cluster
from benchmarks.churn.fleet import Fleet, Raw
from streams.local import LocalProcessor
from streams.membership import Delta
from streams.oracle import oracle_memberships
from topics import codec
from topics.records import (
    EndpointRecord,
    MembershipRecord,
    PolicyRecord,
    ProfileRecord,
    Record,
    split_membership_key,
)

__all__ = ["CollectingProcessor", "NaivePipeline", "PurePipeline", "initial_records"]


class CollectingProcessor(LocalProcessor):
    """The streams' in-memory processor, keeping the deltas it emits for the caller."""

    def __init__(self, partitions: int) -> None:
        super().__init__(partitions)
        self.out: list[Delta] = []

    def emit(self, deltas: Iterable[Delta]) -> None:
        deltas = list(deltas)
        self.out.extend(deltas)
        super().emit(deltas)

    def take(self) -> list[Delta]:
        out, self.out = self.out, []
        return out


def initial_records(cluster: Cluster, observed_at: float = 1.0) -> tuple[
        list[ProfileRecord], list[PolicyRecord], list[EndpointRecord]]:
    """Profiles, policy records and every endpoint (sets, host endpoints, pods) to publish."""
    pods = [p.record(observed_at) for p in cluster.pods.values()]
    return list(cluster.profiles), list(cluster.policy_records), [*cluster.endpoint_records, *pods]


class PurePipeline:
    """Ours, in one process: LocalProcessor → Fleet, no broker."""

    def __init__(self, cluster: Cluster, partitions: int = 8, read_all: bool = False,
                 nodes: Iterable[str] | None = None) -> None:
        """``read_all``: every node reads every endpoint and membership record as bytes
        (`Fleet.read_all`); ``nodes``: the nodes to simulate (default all)."""
        self.cluster = cluster
        self.processor = CollectingProcessor(partitions)
        self.fleet = Fleet.of(cluster.nodes if nodes is None else nodes)
        self.fleet.read_all = read_all
        self.events: set[float] = set()

    def _raw(self, key: str, rec: Record | None) -> Raw | None:
        if not self.fleet.read_all:
            return None
        return key.encode(), None if rec is None else codec.encode(rec)

    def load(self) -> None:
        profiles, policies, endpoints = initial_records(self.cluster)
        for prof in profiles:
            self.processor.publish_profile(prof.key, prof)
            self.fleet.profile(prof.key, prof, 0.0)
        for pol in policies:
            self.processor.publish_policy(pol.key, pol)
            self.fleet.policy(pol.key, pol, 0.0)
        for ep in endpoints:
            self.processor.publish_endpoint(ep.key, ep)
            self.fleet.endpoint(ep.key, ep, 0.0, self._raw(ep.key, ep))
        self.settle()

    def publish_event(self, event: ChurnEvent, at: float) -> None:
        rec = event.record(at)
        self.events.add(at)
        self.fleet.cause[event.key] = at
        self.processor.publish_endpoint(event.key, rec)
        self.fleet.endpoint(event.key, rec, at, self._raw(event.key, rec))

    def publish_policy(self, rec: PolicyRecord) -> None:
        self.events.add(rec.observed_at)
        self.processor.publish_policy(rec.key, rec)
        self.fleet.policy(rec.key, rec, rec.observed_at)

    def publish_endpoint(self, rec: EndpointRecord) -> None:
        self.events.add(rec.observed_at)
        self.fleet.cause[rec.key] = rec.observed_at
        self.processor.publish_endpoint(rec.key, rec)
        self.fleet.endpoint(rec.key, rec, rec.observed_at, self._raw(rec.key, rec))

    def settle(self) -> None:
        """Process everything queued and program every node that changed."""
        self.processor.drain()
        now = time.time()
        for delta in self.processor.take():
            self.fleet.membership(delta.key, delta.record, now,
                                  self._raw(delta.key, delta.record))
        self.fleet.program(self.events)

    def inputs(self) -> tuple[list[EndpointRecord], list[ProfileRecord], list[PolicyRecord]]:
        """The final state of the inputs (what the compacted topics hold)."""
        return (list(self.fleet.endpoints.values()), list(self.cluster.profiles),
                list(self.fleet.policies.values()))


class NaivePipeline:
    """The baseline: every selector recomputed and every node rewritten in full, per event."""

    def __init__(self, cluster: Cluster, nodes: Iterable[str] | None = None) -> None:
        self.cluster = cluster
        profiles, policies, endpoints = initial_records(cluster)
        self.profiles = profiles
        self.policies = {p.key: p for p in policies}
        self.endpoints = {e.key: e for e in endpoints}
        self.fleet = Fleet.of(cluster.nodes if nodes is None else nodes)
        self.fleet.naive = True
        self.memberships: dict[str, MembershipRecord] = {}
        self.events: set[float] = set()
        for prof in profiles:
            self.fleet.profile(prof.key, prof, 0.0)
        for pol in policies:
            self.fleet.policy(pol.key, pol, 0.0)
        for ep in endpoints:
            self.fleet.endpoint(ep.key, ep, 0.0)

    def apply(self, key: str, rec: EndpointRecord | None, at: float) -> None:
        self.events.add(at)
        self.fleet.cause[key] = at
        if rec is None:
            self.endpoints.pop(key, None)
        else:
            self.endpoints[key] = rec
        self.fleet.endpoint(key, rec, at)
        self.recompute(at)

    def apply_policy(self, rec: PolicyRecord) -> None:
        self.events.add(rec.observed_at)
        self.policies[rec.key] = rec
        self.fleet.policy(rec.key, rec, rec.observed_at)
        self.recompute(rec.observed_at)

    def recompute(self, at: float = 1.0) -> None:
        """Every selector against every endpoint (the oracle), then every node from scratch."""
        wanted = oracle_memberships(self.endpoints.values(), self.profiles,
                                    self.policies.values())
        now = time.time()
        for key in [k for k in self.memberships if k not in wanted]:
            del self.memberships[key]
            self.fleet.membership(key, None, now)
        for key, (namespace, node, interface, ips) in wanted.items():
            uid, ep = split_membership_key(key)
            old = self.memberships.get(key)
            if old is None or (old.node, old.interface, old.ips) != (node, interface, ips):
                rec = MembershipRecord(uid, ep, namespace, node, interface, ips, at)
                self.memberships[key] = rec
                self.fleet.membership(key, rec, now)
        for sim in self.fleet.nodes.values():
            sim.dirty = True  # naive: every node redoes everything, changed or not
            if not sim.pending:
                sim.pending.append((now, _nothing, ()))
        self.fleet.program(self.events)

    def programmed_sets(self) -> dict[str, dict[str, set[str]]]:
        return self.fleet.programmed_sets()


def _nothing() -> None:
    """A no-op record, so that every node runs its (naive) transaction."""
