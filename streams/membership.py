"""Selector membership of one partition, maintained incrementally (the pure core of *match*).

A `PartitionState` holds what one match partition knows: its endpoints, the namespace and
service-account profiles they inherit labels from, the selectors registered there (with the
compile partitions that registered them) and the memberships already emitted. Every change
returns the membership deltas to publish: an upsert (a `MembershipRecord`) or a tombstone
(None) per ``selector-uid|endpoint-key``.

Deltas are always computed as *desired from the current inputs* minus *what was emitted*
(the members map), never from the previous input alone. That makes every operation
idempotent: re-applying an event after a crash (at-least-once delivery, with restored
tables possibly ahead of the committed offset) converges to the same memberships instead of
losing or duplicating a change.

Candidate selectors for an endpoint come from a `SelectorIndex`, so an endpoint change
costs the few selectors filed under its labels, not all of them.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Mapping
from dataclasses import dataclass
from typing import TypeVar

from policy.labelindex import SelectorIndex
from policy.labels import effective_labels as labels_of
from policy.selectors import Selector, parse
from topics.records import (
    EndpointRecord,
    MembershipRecord,
    ProfileRecord,
    RecordError,
    SelectorRecord,
    membership_key,
    split_membership_key,
    split_profile_key,
)

_K = TypeVar("_K", bound=Hashable)
_V = TypeVar("_V", bound=Hashable)

__all__ = [
    "BruteForceIndex",
    "Delta",
    "PartitionState",
    "effective_labels",
    "member_record",
    "same_member",
]


@dataclass(frozen=True, slots=True)
class Delta:
    """One change to publish on `memberships`: an upsert, or a tombstone when record is None."""

    key: str
    record: MembershipRecord | None


def effective_labels(
    endpoint: EndpointRecord,
    namespace_labels: Mapping[str, str] | None,
    service_account_labels: Mapping[str, str] | None,
) -> dict[str, str]:
    """The labels selectors see for `endpoint`, with what it inherits (as Felix builds them)."""
    return labels_of(
        endpoint.kind, endpoint.labels, namespace=endpoint.namespace,
        service_account=endpoint.service_account, namespace_labels=namespace_labels,
        service_account_labels=service_account_labels,
    )


def member_record(uid: str, endpoint: EndpointRecord, observed_at: float,
                  endpoint_key: str | None = None) -> MembershipRecord:
    """The membership of `endpoint` in selector `uid`: where it is and its IPs (or nets).

    `endpoint_key` is ``endpoint.key``, when the caller has it already."""
    return MembershipRecord.of_endpoint(uid, endpoint, observed_at, endpoint_key)


def same_member(a: MembershipRecord, b: MembershipRecord | EndpointRecord) -> bool:
    """Equal for an enforcer: everything but `observed_at`, which only measures latency.

    `b` may be the endpoint itself: its membership would carry exactly these fields."""
    return (
        a.namespace == b.namespace
        and a.node == b.node
        and a.interface == b.interface
        and a.ips == b.ips
    )


class BruteForceIndex:
    """`SelectorIndex`'s interface without the index: every selector evaluated per lookup.

    The baseline the benchmarks measure the index against; never used in production.
    """

    def __init__(self) -> None:
        self._matchers: dict[str, Callable[[Mapping[str, str]], bool]] = {}

    def add(self, key: str, selector: Selector) -> None:
        self._matchers[key] = selector.matcher

    def remove(self, key: str) -> None:
        self._matchers.pop(key, None)

    def matching(self, labels: Mapping[str, str]) -> set[str]:
        return {key for key, matcher in self._matchers.items() if matcher(labels)}


class PartitionState:
    """Endpoints, profiles, selectors and members of one match partition."""

    def __init__(self, *, brute_force: bool = False) -> None:
        self.endpoints: dict[str, EndpointRecord] = {}
        self.profiles: dict[str, ProfileRecord] = {}
        # uid -> (selector, compile partitions that hold a reference to it)
        self.selectors: dict[str, tuple[Selector, set[int]]] = {}
        self.members: dict[str, MembershipRecord] = {}
        self._index: SelectorIndex[str] | BruteForceIndex = (
            BruteForceIndex() if brute_force else SelectorIndex()
        )
        self._labels: dict[str, dict[str, str]] = {}  # endpoint key -> effective labels
        self._by_namespace: dict[str, set[str]] = {}  # namespace -> endpoint keys
        self._by_account: dict[tuple[str, str], set[str]] = {}  # (ns, sa) -> pod keys
        self._member_uids: dict[str, set[str]] = {}  # endpoint key -> selector uids
        self._member_keys: dict[str, set[str]] = {}  # selector uid -> endpoint keys

    # ------------------------------------------------------------------ restore

    def restore(
        self,
        endpoints: Iterable[EndpointRecord] = (),
        profiles: Iterable[ProfileRecord] = (),
        selectors: Iterable[tuple[str, int, str]] = (),
        members: Iterable[MembershipRecord] = (),
    ) -> None:
        """Load persisted state (from table changelogs) without emitting anything.

        `selectors` are (uid, compile partition, selector text). Call `resync` afterwards
        to correct any emitted membership that the inputs no longer justify.
        """
        for profile in profiles:
            self.profiles[profile.key] = profile
        for endpoint in endpoints:
            self._store_endpoint(endpoint.key, endpoint)
        for uid, source, text in selectors:
            self._register(uid, source, text)
        for member in members:
            self._set_member(member)

    def resync(self, observed_at: float) -> list[Delta]:
        """Deltas that make the members equal to what the inputs say, for every endpoint."""
        deltas: list[Delta] = []
        for key in list(self.endpoints):
            deltas.extend(self._reconcile_endpoint(key, observed_at))
        for uid in list(self._member_keys):
            for key in list(self._member_keys.get(uid, ())):
                if key not in self.endpoints or uid not in self.selectors:
                    deltas.append(self._drop_member(membership_key(uid, key)))
        return deltas

    def republish(self, keys: Iterable[str], observed_at: float) -> list[Delta]:
        """Deltas that state the true membership of `keys`, whatever was emitted for them.

        For member keys whose published value is unknown (a crashed worker may have
        written them locally but never produced them): an upsert if the inputs make it
        a member, a tombstone otherwise, even if the members map already agrees.
        """
        deltas: list[Delta] = []
        for key in sorted(set(keys)):
            uid, endpoint_key = split_membership_key(key)
            endpoint = self.endpoints.get(endpoint_key)
            entry = self.selectors.get(uid)
            if endpoint is not None and entry is not None and entry[0].matcher(
                self._labels[endpoint_key]
            ):
                record = member_record(uid, endpoint, observed_at, endpoint_key)
                self._set_member(record, key)
                deltas.append(Delta(key, record))
            else:
                deltas.append(self._drop_member(key))
        return deltas

    # ------------------------------------------------------------------ events

    def apply_endpoint(self, key: str, record: EndpointRecord | None) -> list[Delta]:
        """An endpoint was created, updated (labels, IPs, node…) or deleted (None)."""
        if record is not None and record.key != key:
            raise RecordError(f"endpoint record for {record.key!r} under key {key!r}")
        old = self.endpoints.get(key)
        if old is not None:
            self._forget_endpoint(key, old)
        if record is None:
            return [self._drop_member(membership_key(u, key)) for u in self._uids_of(key)]
        self._store_endpoint(key, record)
        return self._reconcile_endpoint(key, record.observed_at)

    def apply_profile(self, key: str, record: ProfileRecord | None) -> list[Delta]:
        """A namespace's or service account's labels changed: re-evaluate who inherits them."""
        if record is not None and record.key != key:
            raise RecordError(f"profile record for {record.key!r} under key {key!r}")
        namespace, account = split_profile_key(key)
        if record is None:
            self.profiles.pop(key, None)
        else:
            self.profiles[key] = record
        if account is None:
            affected = self._by_namespace.get(namespace, set())
        else:
            affected = self._by_account.get((namespace, account), set())
        deltas: list[Delta] = []
        for endpoint_key in sorted(affected):
            endpoint = self.endpoints[endpoint_key]
            self._labels[endpoint_key] = self._effective(endpoint)
            at = record.observed_at if record is not None else endpoint.observed_at
            deltas.extend(self._reconcile_endpoint(endpoint_key, at))
        return deltas

    def apply_selector(self, uid: str, source: int, record: SelectorRecord | None) -> list[Delta]:
        """Compile partition `source` registered (active record) or withdrew a selector."""
        if record is not None and record.uid != uid:
            raise RecordError(f"selector record for {record.uid!r} under uid {uid!r}")
        if record is not None and record.active:
            known = self.selectors.get(uid)
            self._register(uid, source, record.selector)
            if known is not None:
                return []  # already active here: another compile partition holds it too
            return self._reconcile_selector(uid, record.observed_at)
        entry = self.selectors.get(uid)
        if entry is None:
            return []
        entry[1].discard(source)
        if entry[1]:
            return []
        del self.selectors[uid]
        self._index.remove(uid)
        keys = sorted(self._member_keys.get(uid, ()))
        return [self._drop_member(membership_key(uid, k)) for k in keys]

    # ------------------------------------------------------------------ internals

    def _register(self, uid: str, source: int, text: str) -> None:
        entry = self.selectors.get(uid)
        if entry is None:
            selector = parse(text)
            if selector.uid != uid:
                raise RecordError(
                    f"selector uid {uid!r} does not match its selector {text!r} "
                    f"(expected {selector.uid!r})"
                )
            entry = (selector, set())
            self.selectors[uid] = entry
            self._index.add(uid, selector)
        entry[1].add(source)

    def _effective(self, endpoint: EndpointRecord) -> dict[str, str]:
        ns_labels: Mapping[str, str] | None = None
        sa_labels: Mapping[str, str] | None = None
        if endpoint.namespace is not None:
            profile = self.profiles.get(f"kns.{endpoint.namespace}")
            ns_labels = profile.labels if profile is not None else None
            if endpoint.service_account:
                account = self.profiles.get(
                    f"ksa.{endpoint.namespace}.{endpoint.service_account}"
                )
                sa_labels = account.labels if account is not None else None
        return effective_labels(endpoint, ns_labels, sa_labels)

    def _store_endpoint(self, key: str, endpoint: EndpointRecord) -> None:
        self.endpoints[key] = endpoint
        self._labels[key] = self._effective(endpoint)
        if endpoint.namespace is not None:
            self._by_namespace.setdefault(endpoint.namespace, set()).add(key)
            if endpoint.kind == "pod" and endpoint.service_account:
                pair = (endpoint.namespace, endpoint.service_account)
                self._by_account.setdefault(pair, set()).add(key)

    def _forget_endpoint(self, key: str, endpoint: EndpointRecord) -> None:
        self.endpoints.pop(key, None)
        self._labels.pop(key, None)
        if endpoint.namespace is not None:
            _discard(self._by_namespace, endpoint.namespace, key)
            if endpoint.kind == "pod" and endpoint.service_account:
                _discard(self._by_account, (endpoint.namespace, endpoint.service_account), key)

    def _uids_of(self, endpoint_key: str) -> list[str]:
        return sorted(self._member_uids.get(endpoint_key, ()))

    def _reconcile_endpoint(self, key: str, observed_at: float) -> list[Delta]:
        endpoint = self.endpoints[key]
        desired = self._index.matching(self._labels[key])
        deltas: list[Delta] = []
        for uid in self._uids_of(key):
            if uid not in desired:
                deltas.append(self._drop_member(membership_key(uid, key)))
        for uid in sorted(desired):
            delta = self._upsert_member(uid, key, endpoint, observed_at)
            if delta is not None:
                deltas.append(delta)
        return deltas

    def _reconcile_selector(self, uid: str, observed_at: float) -> list[Delta]:
        selector = self.selectors[uid][0]
        matcher = selector.matcher
        deltas: list[Delta] = []
        current = set(self._member_keys.get(uid, ()))
        for key in sorted(self.endpoints):
            if matcher(self._labels[key]):
                current.discard(key)
                delta = self._upsert_member(uid, key, self.endpoints[key], observed_at)
                if delta is not None:
                    deltas.append(delta)
        for key in sorted(current):
            deltas.append(self._drop_member(membership_key(uid, key)))
        return deltas

    def _upsert_member(
        self, uid: str, endpoint_key: str, endpoint: EndpointRecord, observed_at: float
    ) -> Delta | None:
        key = membership_key(uid, endpoint_key)
        old = self.members.get(key)
        if old is not None and same_member(old, endpoint):  # no record built to compare
            return None
        record = member_record(uid, endpoint, observed_at, endpoint_key)
        self._set_member(record, key)
        return Delta(key, record)

    def _set_member(self, record: MembershipRecord, key: str | None = None) -> None:
        """Note `record` as emitted (`key`: its membership key, if the caller has it)."""
        if key is None:
            key = membership_key(record.selector_uid, record.endpoint_key)
        self.members[key] = record
        self._member_uids.setdefault(record.endpoint_key, set()).add(record.selector_uid)
        self._member_keys.setdefault(record.selector_uid, set()).add(record.endpoint_key)

    def _drop_member(self, key: str) -> Delta:
        uid, endpoint_key = split_membership_key(key)
        self.members.pop(key, None)
        _discard(self._member_uids, endpoint_key, uid)
        _discard(self._member_keys, uid, endpoint_key)
        return Delta(key, None)


def _discard(mapping: dict[_K, set[_V]], key: _K, value: _V) -> None:
    bucket = mapping.get(key)
    if bucket is not None:
        bucket.discard(value)
        if not bucket:
            del mapping[key]
