"""One batch of *match* events: each applied in order, the table writes coalesced (pure).

The Faust adapter takes events from the stream in batches (``stream.take_events``) and
hands each to a `MatchBatch`, which applies it to its partition's `PartitionState` at
once, as the one-at-a-time path did, but only *collects* the table rows it changes: the
input tables' rows (``endpoints``, ``profiles``, ``selectors``) and the ``members`` rows
(whose changelog is the memberships topic). Per table and partition a key keeps its last
value, so a row written twice in a batch is stored and produced once; the adapter then
writes each group to its store and sends it to its changelog as one record batch.

Coalescing changes nothing a reader of a compacted topic sees: keys are independent and
the last value of each is the one-at-a-time path's last value. A tombstone carries
`force` if any write of its key in the batch did (see ``Processor._write``).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from streams.compile import split_selector_message_key
from streams.membership import Delta, PartitionState
from topics.codec import decode_as, encode
from topics.partitioner import partition_for_key
from topics.records import (
    EndpointRecord,
    ProfileRecord,
    RecordError,
    SelectorRecord,
    split_endpoint_key,
)

__all__ = [
    "ENDPOINTS_TABLE",
    "MEMBERS_TABLE",
    "PROFILES_TABLE",
    "SELECTORS_TABLE",
    "BatchWrites",
    "MatchBatch",
    "Row",
    "partition_of_endpoint_key",
    "partition_of_profile_key",
]

#: The table names a `BatchWrites` groups rows by (the Faust tables of the same names).
ENDPOINTS_TABLE, PROFILES_TABLE, SELECTORS_TABLE = "endpoints", "profiles", "selectors"
MEMBERS_TABLE = "members"


def partition_of_endpoint_key(key: str, partitions: int) -> int:
    """The partition an endpoint (or policy) key belongs to: its namespace's, else its name's."""
    _kind, namespace, name = split_endpoint_key(key)
    return _partition_of(namespace if namespace is not None else name, partitions)


@functools.lru_cache(maxsize=1 << 14)
def _partition_of(partition_key: str, partitions: int) -> int:
    """`partition_for_key`, cached: a cluster has few namespaces, and every event hashes one."""
    return partition_for_key(partition_key, partitions)


def partition_of_profile_key(key: str, partitions: int) -> int:
    """The partition of a ``kns.<ns>`` / ``ksa.<ns>.<sa>`` profile key: its namespace's."""
    return _partition_of(key[4:].partition(".")[0], partitions)


@dataclass(frozen=True, slots=True)
class Row:
    """A table row's last value in a batch (None: delete), and whether its tombstone is
    sent even when the store does not hold the row."""

    value: bytes | None
    force: bool


class BatchWrites:
    """Table rows written by a batch: per (table, partition), the last value of each key."""

    def __init__(self) -> None:
        self._groups: dict[tuple[str, int], dict[bytes, Row]] = {}

    def put(
        self, table: str, partition: int, key: bytes, value: bytes | None, force: bool = False
    ) -> None:
        group = self._groups.setdefault((table, partition), {})
        old = group.get(key)
        group[key] = Row(value, force or (old is not None and old.force))

    def put_members(self, partition: int, deltas: Iterable[Delta], force: bool = False) -> None:
        for delta in deltas:
            value = encode(delta.record) if delta.record is not None else None
            self.put(MEMBERS_TABLE, partition, delta.key.encode(), value, force)

    def groups(self) -> Iterator[tuple[str, int, dict[bytes, Row]]]:
        """(table, partition, rows) in the order each group was first written."""
        for (table, partition), rows in self._groups.items():
            yield table, partition, rows

    def __len__(self) -> int:
        return sum(len(rows) for rows in self._groups.values())


class MatchBatch:
    """Applies match events to partition states, collecting their writes in `writes`.

    Each method raises `RecordError` (or `SelectorError`) for a record to dead-letter;
    nothing is collected for it then, as nothing was written on the one-at-a-time path.
    """

    def __init__(self, partitions: int) -> None:
        self.partitions = partitions
        self.writes = BatchWrites()

    def endpoint(self, state: PartitionState, partition: int, key: str, raw: bytes | None) -> None:
        endpoint = decode_as(EndpointRecord, raw)
        if partition_of_endpoint_key(key, self.partitions) != partition:
            raise RecordError(f"endpoint {key!r} is on the wrong partition")
        deltas = state.apply_endpoint(key, endpoint)
        self.writes.put(ENDPOINTS_TABLE, partition, key.encode(), raw, force=True)
        self.writes.put_members(partition, deltas)

    def profile(self, state: PartitionState, partition: int, key: str, raw: bytes | None) -> None:
        profile = decode_as(ProfileRecord, raw)
        if partition_of_profile_key(key, self.partitions) != partition:
            raise RecordError(f"profile {key!r} is on the wrong partition")
        deltas = state.apply_profile(key, profile)
        self.writes.put(PROFILES_TABLE, partition, key.encode(), raw, force=True)
        self.writes.put_members(partition, deltas)

    def selector(self, state: PartitionState, partition: int, key: str, raw: bytes | None) -> None:
        selector = decode_as(SelectorRecord, raw)
        uid, source = split_selector_message_key(key)
        deltas = state.apply_selector(uid, source, selector)
        text = selector.selector.encode() if selector and selector.active else None
        self.writes.put(SELECTORS_TABLE, partition, f"{partition}/{key}".encode(), text, force=True)
        self.writes.put_members(partition, deltas)
