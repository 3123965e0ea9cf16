"""The whole processor in one process, over in-memory partition queues (no Kafka).

Events are published to per-partition FIFO queues exactly as the real topics are
partitioned; `step` processes the head of one chosen queue, so tests can explore every
interleaving of the endpoints, profiles, policies and selectors streams that the brokers
could produce, and benchmarks can time the pure core alone. Memberships accumulate in a
compacted map (last value per key, a tombstone deletes), like a reader of the topic sees.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

from policy.load import PolicyError
from streams.compile import CompileState, Registration
from streams.membership import Delta, PartitionState
from topics.partitioner import partition_for_key
from topics.records import (
    EndpointRecord,
    MembershipRecord,
    PolicyRecord,
    ProfileRecord,
    RecordError,
    split_endpoint_key,
)

__all__ = ["LocalProcessor", "QueueName"]

QueueName = tuple[Literal["endpoints", "profiles", "policies", "selectors"], int]


@dataclass
class _Queues:
    endpoints: dict[int, deque[tuple[str, EndpointRecord | None]]] = field(default_factory=dict)
    profiles: dict[int, deque[tuple[str, ProfileRecord | None]]] = field(default_factory=dict)
    policies: dict[int, deque[tuple[str, PolicyRecord | None]]] = field(default_factory=dict)
    selectors: dict[int, deque[Registration]] = field(default_factory=dict)


class LocalProcessor:
    """Compile and match for every partition, fed from in-memory queues."""

    def __init__(self, partitions: int, *, brute_force: bool = False) -> None:
        self.partitions = partitions
        self.compile = [CompileState(p, partitions) for p in range(partitions)]
        self.match = [PartitionState(brute_force=brute_force) for _ in range(partitions)]
        self.memberships: dict[str, MembershipRecord] = {}
        self.rejected: list[tuple[str, str]] = []  # (key, reason) of dead-lettered records
        self.emitted = 0
        self._q = _Queues()
        for p in range(partitions):
            self._q.endpoints[p] = deque()
            self._q.profiles[p] = deque()
            self._q.policies[p] = deque()
            self._q.selectors[p] = deque()

    # ------------------------------------------------------------------ publishing

    def publish_endpoint(self, key: str, record: EndpointRecord | None) -> None:
        _kind, namespace, name = split_endpoint_key(key)
        p = partition_for_key(namespace if namespace is not None else name, self.partitions)
        self._q.endpoints[p].append((key, record))

    def publish_profile(self, key: str, record: ProfileRecord | None) -> None:
        namespace = key[4:].partition(".")[0]
        self._q.profiles[partition_for_key(namespace, self.partitions)].append((key, record))

    def publish_policy(self, key: str, record: PolicyRecord | None) -> None:
        _kind, namespace, name = split_endpoint_key(key)
        p = partition_for_key(namespace if namespace is not None else name, self.partitions)
        self._q.policies[p].append((key, record))

    # ------------------------------------------------------------------ processing

    def pending(self) -> list[QueueName]:
        """The queues that have something to process, in a fixed order."""
        out: list[QueueName] = []
        for p in range(self.partitions):
            if self._q.policies[p]:
                out.append(("policies", p))
            if self._q.selectors[p]:
                out.append(("selectors", p))
            if self._q.profiles[p]:
                out.append(("profiles", p))
            if self._q.endpoints[p]:
                out.append(("endpoints", p))
        return out

    def step(self, queue: QueueName, observed_at: float = 0.0) -> None:
        """Process the head of `queue`."""
        topic, p = queue
        if topic == "policies":
            key, policy = self._q.policies[p].popleft()
            try:
                at = policy.observed_at if policy is not None else observed_at
                regs = self.compile[p].apply_policy(key, policy, at)
            except (PolicyError, RecordError) as exc:
                self.rejected.append((key, str(exc)))
                return
            for reg in regs:
                self._q.selectors[reg.partition].append(reg)
        elif topic == "selectors":
            reg = self._q.selectors[p].popleft()
            source = int(reg.key.rpartition("@")[2])
            self.emit(self.match[p].apply_selector(reg.uid, source, reg.record))
        elif topic == "profiles":
            pkey, profile = self._q.profiles[p].popleft()
            self.emit(self.match[p].apply_profile(pkey, profile))
        else:
            ekey, endpoint = self._q.endpoints[p].popleft()
            self.emit(self.match[p].apply_endpoint(ekey, endpoint))

    def drain(self) -> None:
        """Process everything, policies first round by round (any order is correct)."""
        while queues := self.pending():
            for queue in queues:
                topic, p = queue
                while getattr(self._q, topic)[p]:
                    self.step(queue)

    def emit(self, deltas: Iterable[Delta]) -> None:
        """Apply deltas to the compacted memberships (subclasses also collect them)."""
        for delta in deltas:
            self.emitted += 1
            if delta.record is None:
                self.memberships.pop(delta.key, None)
            else:
                self.memberships[delta.key] = delta.record
