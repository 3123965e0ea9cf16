"""An inverted index from labels to selectors: which registered selectors match a label set?

The match stage of the streams asks this for every endpoint change, against thousands of
selectors; evaluating them all would cost milliseconds per endpoint. Like Calico's label
index, each selector is filed under ONE label restriction that every match must satisfy:

* ``key in {v1, v2, …}`` (from a top-level ``==`` / ``in`` term, or an ``||`` group whose
  branches all pin ``key``): filed under each ``(key, v)``;
* ``key`` must be present (``has(key)``, ``contains``, ``starts with``, ``ends with``):
  filed under ``key``;
* nothing (only ``!=``, ``not in``, ``!…``, ``all()``, ``global()``): kept in an unindexed
  list that is evaluated for every lookup.

A lookup gathers the candidates filed under the label set's own keys and values and
evaluates only those, so the result always equals brute-force evaluation.

Choosing the restriction: a finite value set beats mere presence; among those, the one
whose buckets are currently emptiest wins. A value that many selectors name (``env ==
"prod"``) is usually one that many endpoints carry too, so spreading selectors over rare
buckets keeps the number of candidates per lookup low.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator, Mapping
from dataclasses import dataclass
from typing import Generic, TypeVar

from policy.selectors import Matcher, Selector

__all__ = ["IndexStats", "SelectorIndex"]

K = TypeVar("K", bound=Hashable)

# A presence-only restriction is picked only when no finite value set exists: a label key
# is carried by far more endpoints than any one of its values.
_PRESENCE_PENALTY = 1_000_000


@dataclass(frozen=True)
class IndexStats:
    """How the registered selectors are filed (for benchmarks and diagnostics)."""

    by_value: int
    by_key: int
    unindexed: int
    never: int


@dataclass(frozen=True, slots=True)
class _Placement:
    key: str | None  # None: unindexed (or never, when values is the empty set)
    values: frozenset[str] | None  # None with a key: filed under the key's presence


class SelectorIndex(Generic[K]):
    """Selectors registered under keys of type ``K``; answers "which match these labels?"."""

    def __init__(self) -> None:
        self._selectors: dict[K, Selector] = {}
        self._placements: dict[K, _Placement] = {}
        self._by_value: dict[str, dict[str, dict[K, Matcher]]] = {}
        self._by_key: dict[str, dict[K, Matcher]] = {}
        self._unindexed: dict[K, Matcher] = {}
        self._never: set[K] = set()

    # ------------------------------------------------------------------ registration

    def add(self, key: K, selector: Selector) -> None:
        """Register ``selector`` under ``key``, replacing whatever ``key`` had."""
        if key in self._selectors:
            self.remove(key)
        placement = self._choose(selector)
        self._selectors[key] = selector
        self._placements[key] = placement
        matcher = selector.matcher
        if placement.key is None:
            if placement.values is not None:  # an empty value set: can never match
                self._never.add(key)
            else:
                self._unindexed[key] = matcher
        elif placement.values is None:
            self._by_key.setdefault(placement.key, {})[key] = matcher
        else:
            by_value = self._by_value.setdefault(placement.key, {})
            for value in placement.values:
                by_value.setdefault(value, {})[key] = matcher

    def remove(self, key: K) -> None:
        """Forget ``key``; a no-op when it is not registered."""
        if self._selectors.pop(key, None) is None:
            return
        placement = self._placements.pop(key)
        if placement.key is None:
            self._never.discard(key)
            self._unindexed.pop(key, None)
        elif placement.values is None:
            bucket = self._by_key[placement.key]
            del bucket[key]
            if not bucket:
                del self._by_key[placement.key]
        else:
            by_value = self._by_value[placement.key]
            for value in placement.values:
                bucket = by_value[value]
                del bucket[key]
                if not bucket:
                    del by_value[value]
            if not by_value:
                del self._by_value[placement.key]

    def _choose(self, selector: Selector) -> _Placement:
        best = _Placement(None, None)
        best_rank: tuple[int, str] | None = None
        for label, values in selector.required_keys().items():
            if values is not None and not values:
                return _Placement(None, frozenset())  # contradictory: matches nothing
            if values is None:
                cost = _PRESENCE_PENALTY + len(self._by_key.get(label, ()))
            else:
                buckets = self._by_value.get(label, {})
                cost = sum(1 + len(buckets.get(v, ())) for v in values)
            rank = (cost, label)  # the label breaks ties, so placement is deterministic
            if best_rank is None or rank < best_rank:
                best, best_rank = _Placement(label, values), rank
        return best

    # ------------------------------------------------------------------ queries

    def matching(self, labels: Mapping[str, str]) -> set[K]:
        """Keys of every registered selector that matches ``labels``."""
        result: set[K] = set()
        add = result.add
        for key, matcher in self._unindexed.items():
            if matcher(labels):
                add(key)
        by_value = self._by_value
        by_key = self._by_key
        for label, value in labels.items():
            values = by_value.get(label)
            if values is not None:
                bucket = values.get(value)
                if bucket is not None:
                    for key, matcher in bucket.items():
                        if matcher(labels):
                            add(key)
            present = by_key.get(label)
            if present is not None:
                for key, matcher in present.items():
                    if matcher(labels):
                        add(key)
        return result

    def get(self, key: K) -> Selector | None:
        """The selector registered under ``key``, if any."""
        return self._selectors.get(key)

    def stats(self) -> IndexStats:
        by_value = sum(1 for p in self._placements.values() if p.key and p.values is not None)
        by_key = sum(len(bucket) for bucket in self._by_key.values())
        return IndexStats(by_value, by_key, len(self._unindexed), len(self._never))

    def __len__(self) -> int:
        return len(self._selectors)

    def __contains__(self, key: object) -> bool:
        return key in self._selectors

    def __iter__(self) -> Iterator[K]:
        return iter(self._selectors)
