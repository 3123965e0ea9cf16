"""The history topics as an auditor reads them: changes in order, the state at a time, diffs.

Pure: no Kafka here (`portcullis.audit.read` fetches the records). Every change to the
endpoints, profiles and policies topics is a `HistoryRecord` on its history topic. A
change is part of the state at time T when it was published at or before T; per key,
the last such change in log order wins (a key's history is on one partition, in order).
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

from topics.records import (
    EndpointRecord,
    HistoryRecord,
    PolicyRecord,
    ProfileRecord,
    RecordError,
    split_endpoint_key,
    split_profile_key,
)

#: Fields that say when a record was seen, not what it is: left out of diffs.
VOLATILE = frozenset({"v", "observed_at", "applied_at", "resource_version"})

ENDPOINT_KINDS = {
    "pod": "Pod",
    "hostendpoint": "HostEndpoint",
    "networkset": "NetworkSet",
    "globalnetworkset": "GlobalNetworkSet",
    "vm": "VM",
}
_UNDECODED = object()


#: Endpoint records that apply publishes next to a policy object of the same name.
MIRRORED_KINDS = {"NetworkSet", "GlobalNetworkSet", "HostEndpoint"}


class Change:
    """One history record and where it sits in the log; its state record is decoded when
    first asked for."""

    __slots__ = ("_record", "at", "history", "key", "offset", "partition", "topic")

    def __init__(self, history: HistoryRecord, partition: int = 0, offset: int = 0) -> None:
        self.history = history
        self.partition = partition
        self.offset = offset
        self.topic, self.key, self.at = history.topic, history.key, history.at
        self._record: Any = _UNDECODED

    def __repr__(self) -> str:
        return f"Change({self.topic}:{self.key} at {self.at} @{self.partition}:{self.offset})"

    @property
    def record(self) -> EndpointRecord | ProfileRecord | PolicyRecord | None:
        """The state record (None for a delete); RecordError when it is not valid."""
        if self._record is _UNDECODED:
            self._record = decode_record(self.history)
        return self._record  # type: ignore[no-any-return]

    @property
    def slot(self) -> tuple[str, str]:
        return (self.topic, self.key)

    @property
    def kind(self) -> str:
        """The object's kind as users name it (``GlobalNetworkPolicy``, ``Pod``, ``Namespace``)."""
        return kind_of(self.topic, self.key)

    @property
    def namespace(self) -> str | None:
        return identity(self.topic, self.key)[0]

    @property
    def name(self) -> str:
        return identity(self.topic, self.key)[1]


def kind_of(topic: str, key: str) -> str:
    if topic == "profiles":
        return "ServiceAccount" if key.startswith("ksa.") else "Namespace"
    kind = key.split("/", 1)[0]
    return ENDPOINT_KINDS.get(kind, kind) if topic == "endpoints" else kind


def identity(topic: str, key: str) -> tuple[str | None, str]:
    """(namespace, name) of the object a key names."""
    if topic == "profiles":
        ns, account = split_profile_key(key)
        return (ns, account) if account is not None else (None, ns)
    _kind, namespace, name = split_endpoint_key(key)
    return namespace, name


_RECORD_TYPES: Mapping[str, type[EndpointRecord] | type[ProfileRecord] | type[PolicyRecord]] = {
    "endpoints": EndpointRecord,
    "profiles": ProfileRecord,
    "policies": PolicyRecord,
}


def decode_record(
    history: HistoryRecord,
) -> EndpointRecord | ProfileRecord | PolicyRecord | None:
    """The state record a history record carries; RecordError when it is not valid."""
    if history.record is None:
        return None
    record_type = _RECORD_TYPES[history.topic]
    try:
        record = record_type.from_dict(history.record)
    except (RecordError, TypeError) as exc:
        raise RecordError(f"HistoryRecord: record: {exc}") from None
    if record.key != history.key:
        raise RecordError(f"HistoryRecord: key {history.key!r} holds a record for {record.key!r}")
    return record


def in_order(changes: Iterable[Change]) -> list[Change]:
    """Changes by publication time (then topic and key); a key's own changes stay in log
    order (they share a partition)."""
    return sorted(changes, key=lambda c: (c.at, c.topic, c.key, c.offset))


# -- state at a time ---------------------------------------------------------------------------


@dataclass
class AuditState:
    """The state topics as they stood: latest record per key."""

    endpoints: dict[str, EndpointRecord] = field(default_factory=dict)
    profiles: dict[str, ProfileRecord] = field(default_factory=dict)
    policies: dict[str, PolicyRecord] = field(default_factory=dict)
    #: Records that could not be read (the key is then left out), one line each.
    problems: list[str] = field(default_factory=list)

    def table(self, topic: str) -> dict[str, Any]:
        tables: dict[str, dict[str, Any]] = {
            "endpoints": self.endpoints, "profiles": self.profiles, "policies": self.policies,
        }
        return tables[topic]

    def take(self, change: Change) -> None:
        table = self.table(change.topic)
        try:
            record = change.record
        except (RecordError, TypeError) as exc:
            table.pop(change.key, None)
            self.problems.append(f"{change.topic} {change.key} (partition "
                                 f"{change.partition}, offset {change.offset}): {exc}")
            return
        if record is None:
            table.pop(change.key, None)
        else:
            table[change.key] = record


def state_at(changes: Iterable[Change], at: float | None = None) -> AuditState:
    """Replay `changes` (any order: they are put in log order per key) up to `at` (None: all)."""
    latest: dict[tuple[str, str], tuple[int, int, Change]] = {}
    for change in changes:
        if at is not None and change.at > at:
            continue
        position = (change.partition, change.offset)
        held = latest.get(change.slot)
        if held is None or (held[0], held[1]) < position:
            latest[change.slot] = (position[0], position[1], change)
    state = AuditState()
    for _p, _o, change in latest.values():
        state.take(change)
    return state


# -- the log -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LogEntry:
    """One change as `audit log` shows it: what it was before, and the diff."""

    change: Change
    verb: str  # created | changed | deleted | recreated
    previous: EndpointRecord | ProfileRecord | PolicyRecord | None
    diff: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class LogFilter:
    since: float | None = None
    until: float | None = None
    kinds: frozenset[str] = frozenset()  # user-facing kinds; empty: every kind
    name: str | None = None
    namespace: str | None = None
    actor: str | None = None

    def admits(self, change: Change) -> bool:
        if self.since is not None and change.at < self.since:
            return False
        if self.until is not None and change.at > self.until:
            return False
        if self.kinds and change.kind not in self.kinds:
            return False
        if self.name is not None and change.name != self.name:
            return False
        if self.namespace is not None and change.namespace != self.namespace:
            return False
        return self.actor is None or change.history.actor == self.actor


def log_entries(changes: Iterable[Change], where: LogFilter = LogFilter()) -> Iterator[LogEntry]:
    """Every admitted change with a diff against the version before it (even one older
    than ``since``). Endpoint records that `apply` publishes alongside a network set or host
    endpoint object are folded into that object's entry."""
    ordered = in_order(changes)
    mirrored = {
        (c.at, c.kind, c.namespace, c.name)
        for c in ordered if c.topic == "policies" and c.kind in MIRRORED_KINDS
    }
    previous: dict[tuple[str, str], Change] = {}
    for change in ordered:
        before = previous.get(change.slot)
        previous[change.slot] = change
        if change.topic == "endpoints" and (
            (change.at, change.kind, change.namespace, change.name) in mirrored
        ):
            continue
        if not where.admits(change):
            continue
        old = _readable(before)
        yield LogEntry(change, _verb(before, change), old, diff(old, _readable(change)))


def _readable(change: Change | None) -> EndpointRecord | ProfileRecord | PolicyRecord | None:
    if change is None:
        return None
    try:
        return change.record
    except RecordError:
        return None


def _verb(before: Change | None, change: Change) -> str:
    if change.history.change == "delete":
        return "deleted"
    if before is None:
        return "created"
    return "recreated" if before.history.change == "delete" else "changed"


def meaning(record: EndpointRecord | ProfileRecord | PolicyRecord | None) -> dict[str, Any]:
    """What a record says, without when it was seen: the policy document, or the fields."""
    if record is None:
        return {}
    if isinstance(record, PolicyRecord):
        return dict(record.document)
    return {k: v for k, v in record.to_dict().items() if k not in VOLATILE}


def diff(
    old: EndpointRecord | ProfileRecord | PolicyRecord | None,
    new: EndpointRecord | ProfileRecord | PolicyRecord | None,
) -> tuple[str, ...]:
    """A unified diff of the two versions as YAML (empty when they mean the same)."""
    before, after = meaning(old), meaning(new)
    if before == after:
        return ()
    lines = difflib.unified_diff(
        _yaml_lines(before), _yaml_lines(after), "before", "after", lineterm="", n=2
    )
    return tuple(lines)


def _yaml_lines(data: Mapping[str, Any]) -> list[str]:
    if not data:
        return []
    text = yaml.safe_dump(json.loads(json.dumps(data)), sort_keys=True, default_flow_style=False)
    return text.splitlines()
