"""What we last published, per topic and key: dedupe, and deletions for objects that vanished.

Pure: no I/O. The watchers translate what they see into `Publication`s (the
desired state of some keys), ask the mirror which of those change anything,
publish only those, and `commit` them once the broker has acknowledged. A
relist is a full snapshot of one owner's keys: `snapshot_changes` adds
tombstones for every key the owner published before and no longer wants,
which is how a deletion missed during a 410 Gone or a restart still reaches
the topic.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from topics.records import Record

#: Fields that change on every observation without changing what the record means.
VOLATILE_FIELDS = frozenset({"observed_at", "resource_version", "applied_at"})


@dataclass(frozen=True, slots=True)
class Publication:
    """The desired state of one key: a record, or None for "this key must not exist"."""

    topic: str  # a topic suffix: "endpoints", "profiles", "policies"
    key: str
    partition_key: str
    value: Record | None
    #: Who made the change, for the history topic (None: the publisher's own actor).
    actor: str | None = field(default=None, compare=False)

    @classmethod
    def upsert(cls, topic: str, record: Record, *, actor: str | None = None) -> Publication:
        partition_key = record.partition_key
        if partition_key is None:
            raise ValueError(f"{type(record).__name__} {record.key!r} has no partition key")
        if record.key is None:
            raise ValueError(f"{type(record).__name__} has no key")
        return cls(topic, record.key, partition_key, record, actor)

    @classmethod
    def tombstone(
        cls, topic: str, key: str, partition_key: str, *, actor: str | None = None
    ) -> Publication:
        return cls(topic, key, partition_key, None, actor)

    @property
    def slot(self) -> tuple[str, str]:
        return (self.topic, self.key)


def fingerprint(record: Record | None) -> bytes | None:
    """The meaning of a record, without the fields that change on every observation."""
    if record is None:
        return None
    data: dict[str, Any] = {k: v for k, v in record.to_dict().items() if k not in VOLATILE_FIELDS}
    return orjson.dumps(data, option=orjson.OPT_SORT_KEYS)


@dataclass(frozen=True, slots=True)
class _Entry:
    owner: str
    partition_key: str
    fingerprint: bytes


class Mirror:
    """The published state (fingerprints) of every key, tagged with the owner that wrote it."""

    def __init__(self) -> None:
        self._entries: dict[tuple[str, str], _Entry] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, slot: object) -> bool:
        return slot in self._entries

    def keys(self, owner: str | None = None) -> Iterator[tuple[str, str]]:
        """The (topic, key) slots published, optionally only `owner`'s."""
        for slot, entry in self._entries.items():
            if owner is None or entry.owner == owner:
                yield slot

    def changes(self, publications: Iterable[Publication]) -> list[Publication]:
        """The publications that change the published state (last one per key wins)."""
        latest: dict[tuple[str, str], Publication] = {}
        for pub in publications:
            latest.pop(pub.slot, None)  # keep the order of the last write
            latest[pub.slot] = pub
        out: list[Publication] = []
        for slot, pub in latest.items():
            entry = self._entries.get(slot)
            if pub.value is None:
                if entry is not None:
                    out.append(pub)
            elif entry is None or entry.fingerprint != fingerprint(pub.value):
                out.append(pub)
        return out

    def snapshot_changes(
        self, owner: str, publications: Iterable[Publication],
        keep: Iterable[tuple[str, str]] = (),
    ) -> list[Publication]:
        """Changes that make `owner`'s published keys exactly the upserts in `publications`.

        Slots in `keep` are left alone (objects that exist but could not be translated).
        """
        pubs = list(publications)
        wanted = {p.slot for p in pubs if p.value is not None} | set(keep)
        out = self.changes(pubs)
        mentioned = {p.slot for p in out}
        for slot, entry in self._entries.items():
            if entry.owner == owner and slot not in wanted and slot not in mentioned:
                out.append(Publication.tombstone(slot[0], slot[1], entry.partition_key))
        return out

    def commit(self, owner: str, publications: Iterable[Publication]) -> None:
        """Record that `publications` were acknowledged by the broker."""
        for pub in publications:
            if pub.value is None:
                self._entries.pop(pub.slot, None)
            else:
                fp = fingerprint(pub.value)
                assert fp is not None
                self._entries[pub.slot] = _Entry(owner, pub.partition_key, fp)

    def seed(self, owner: str, records: Mapping[tuple[str, str], Record]) -> None:
        """Start from what the topics already hold (read back at startup)."""
        self.commit(owner, (Publication.upsert(t, r) for (t, _k), r in records.items()))
