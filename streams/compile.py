"""Policy changes → selector registrations per match partition (the pure core of *compile*).

One `CompileState` per partition of the policies topic (its *source* number). It remembers,
per policy, the effective selectors the policy needs (`policy.compile.all_selectors`, with
Calico's namespace scoping) and the match partitions each selector can match in: a selector
that pins ``projectcalico.org/namespace`` goes only to those namespaces' partitions, any
other (global) one to every partition. From that it keeps a reference count per
(selector, match partition).

A policy change returns the *current status* (registered or withdrawn) of every
(selector, partition) pair the change touched, not just the transitions: re-sending a
status is harmless (the match side keeps, per selector, the set of compile partitions that
hold it), so a change processed twice after a crash gives the same result.

Several compile partitions may reference the same selector (two global policies hashed to
different partitions), so a registration is keyed ``<uid>@<source>`` on the selectors
topic: the selector is active in a match partition while any source holds it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from policy.compile import all_selectors
from policy.labels import NAMESPACE_LABEL
from policy.load import load_document
from policy.model import Policy
from policy.selectors import Selector
from topics.partitioner import partition_for_key
from topics.records import PolicyRecord, RecordError, SelectorRecord

__all__ = [
    "CompileState",
    "Registration",
    "SelectorRef",
    "policy_selector_refs",
    "selector_message_key",
    "selector_partitions",
    "split_selector_message_key",
]


@dataclass(frozen=True, slots=True, order=True)
class SelectorRef:
    """A selector a policy needs, and the match partitions it must be registered in."""

    uid: str
    text: str
    namespace: str | None  # the one namespace it is pinned to, if exactly one
    partitions: tuple[int, ...]

    def to_json(self) -> list[Any]:
        return [self.uid, self.text, self.namespace, list(self.partitions)]

    @classmethod
    def from_json(cls, data: Any) -> SelectorRef:
        uid, text, namespace, partitions = data
        return cls(str(uid), str(text), namespace, tuple(int(p) for p in partitions))


@dataclass(frozen=True, slots=True)
class Registration:
    """One message for the selectors topic: `record` None is a withdrawal (a tombstone)."""

    partition: int
    key: str  # <uid>@<source>
    uid: str
    record: SelectorRecord | None


def selector_message_key(uid: str, source: int) -> str:
    """The selectors-topic key of compile partition `source`'s registration of `uid`."""
    return f"{uid}@{source}"


def split_selector_message_key(key: str) -> tuple[str, int]:
    """(uid, source compile partition) from ``<uid>@<source>``."""
    uid, sep, source = key.rpartition("@")
    if not sep or not uid or not source.isdigit():
        raise RecordError(f"not a <selector-uid>@<partition> key: {key!r}")
    return uid, int(source)


def selector_partitions(selector: Selector, partitions: int) -> tuple[str | None, tuple[int, ...]]:
    """(pinned namespace or None, match partitions where `selector` can match anything)."""
    namespaces = selector.required_values(NAMESPACE_LABEL)
    if namespaces is None:
        return None, tuple(range(partitions))
    pinned = next(iter(namespaces)) if len(namespaces) == 1 else None
    return pinned, tuple(sorted({partition_for_key(ns, partitions) for ns in namespaces}))


def policy_selector_refs(record: PolicyRecord, partitions: int) -> tuple[SelectorRef, ...]:
    """The selectors a policy record needs (none for tiers and other non-policy objects).

    Raises `policy.load.PolicyError` when the document does not validate.
    """
    obj = load_document(record.document, source=f"policies {record.key}")
    if not isinstance(obj, Policy):
        return ()
    if obj.key != record.key:
        raise RecordError(f"policy record key {record.key!r} holds a document for {obj.key!r}")
    refs = []
    for selector in all_selectors(obj):
        namespace, targets = selector_partitions(selector, partitions)
        refs.append(SelectorRef(selector.uid, selector.source, namespace, targets))
    return tuple(sorted(refs))


class CompileState:
    """The selector references held by the policies of one compile partition."""

    def __init__(self, source: int, partitions: int) -> None:
        self.source = source
        self.partitions = partitions
        self.refs: dict[str, tuple[SelectorRef, ...]] = {}
        self._counts: dict[tuple[str, int], int] = {}
        self._texts: dict[str, tuple[str, str | None]] = {}
        self._uid_refs: dict[str, int] = {}  # uid -> references held, for forgetting texts

    def restore(self, refs: Mapping[str, Iterable[SelectorRef]]) -> None:
        """Load the persisted references of every policy, emitting nothing."""
        for key, items in refs.items():
            self._hold(key, tuple(items))

    def apply_policy(
        self, key: str, record: PolicyRecord | None, observed_at: float
    ) -> list[Registration]:
        """A policy was created, changed or deleted (None): the registrations to send.

        Raises `PolicyError`/`RecordError` for an invalid policy, changing nothing.
        """
        if record is not None and record.key != key:
            raise RecordError(f"policy record for {record.key!r} under key {key!r}")
        new = () if record is None else policy_selector_refs(record, self.partitions)
        return self.set_refs(key, new, observed_at)

    def set_refs(
        self, key: str, new: tuple[SelectorRef, ...], observed_at: float
    ) -> list[Registration]:
        """Replace policy `key`'s references with `new`; the status of every touched pair."""
        old = self.refs.get(key, ())
        self._release(key)
        if new:
            self._hold(key, new)
        touched = sorted(
            {(ref.uid, p) for ref in old for p in ref.partitions}
            | {(ref.uid, p) for ref in new for p in ref.partitions}
        )
        texts = {ref.uid: (ref.text, ref.namespace) for ref in (*old, *new)}
        out = []
        for uid, partition in touched:
            message_key = selector_message_key(uid, self.source)
            if self._counts.get((uid, partition), 0) > 0:
                text, namespace = texts[uid]
                record = SelectorRecord(uid, text, namespace, True, observed_at)
                out.append(Registration(partition, message_key, uid, record))
            else:
                out.append(Registration(partition, message_key, uid, None))
        return out

    def registrations(self, observed_at: float) -> list[Registration]:
        """The status of every held (selector, partition) pair (for a full resync)."""
        out = []
        for uid, partition in sorted(self._counts):
            text, namespace = self._texts[uid]
            record = SelectorRecord(uid, text, namespace, True, observed_at)
            out.append(
                Registration(partition, selector_message_key(uid, self.source), uid, record)
            )
        return out

    def _hold(self, key: str, refs: tuple[SelectorRef, ...]) -> None:
        self.refs[key] = refs
        for ref in refs:
            self._texts[ref.uid] = (ref.text, ref.namespace)
            self._uid_refs[ref.uid] = self._uid_refs.get(ref.uid, 0) + 1
            for p in ref.partitions:
                self._counts[(ref.uid, p)] = self._counts.get((ref.uid, p), 0) + 1

    def _release(self, key: str) -> None:
        for ref in self.refs.pop(key, ()):
            for p in ref.partitions:
                pair = (ref.uid, p)
                count = self._counts[pair] - 1
                if count:
                    self._counts[pair] = count
                else:
                    del self._counts[pair]
            left = self._uid_refs[ref.uid] - 1
            if left:
                self._uid_refs[ref.uid] = left
            else:
                del self._uid_refs[ref.uid]
                self._texts.pop(ref.uid, None)
