"""An inverted index from labels to selectors: which registered selectors match a label set?

The match stage of the streams asks this for every endpoint change, against thousands of
selectors; evaluating them all would cost milliseconds per endpoint. Like Calico's label
index, each selector is filed under a label restriction that every match must satisfy:

* ``label in {v1, v2, …}`` (from a top-level ``==`` / ``in`` term, or an ``||`` group
  whose branches all pin ``label``): filed under each ``(label, v)``;
* ``label`` must be present (``has(label)``, ``contains``, ``starts with``,
  ``ends with``): filed under ``label``;
* a top-level ``||`` whose every branch has such a restriction (``app == "a" ||
  team == "t"``): filed under one restriction per branch (a small step beyond Calico);
* nothing (only ``!=``, ``not in``, ``!…``, ``all()``, ``global()``): kept in an unindexed
  list that is evaluated for every lookup.

A lookup gathers the candidates filed under the label set's own labels and values and
evaluates only those (each with its compiled matcher), so the result always equals
brute-force evaluation.

Choosing the restriction: we estimate the chance that an endpoint satisfies it. Without
endpoint statistics, the number of distinct values the registered selectors name for a
label stands in for how many values endpoints carry: ``tier == "web"`` (one of six tiers)
is a far worse filter than ``app == "checkout"`` (one of hundreds of apps), and mere
presence is worst of all. Ties go to the emptier bucket, then to the label name. The first
selectors are placed on thin statistics, so every time the index doubles in size all
placements are re-chosen (amortised O(1) per add; lookups never see a partial state).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Hashable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeAlias, TypeVar, cast

from policy.selectors import Or, Selector, label_restrictions, python_expression

__all__ = ["IndexStats", "SelectorIndex"]

K = TypeVar("K", bound=Hashable)

# Any finite value set, even one naming every value seen, beats mere presence: endpoints
# may carry values no selector names.
_PRESENCE_CHANCE = 1.01

# (label, values): the values the label must take, or None for "must be present".
Restriction: TypeAlias = tuple[str, frozenset[str] | None]


@dataclass(frozen=True)
class IndexStats:
    """How the registered selectors are filed (for benchmarks and diagnostics)."""

    by_value: int
    by_presence: int
    by_branches: int
    unindexed: int
    never: int


@dataclass(frozen=True, slots=True)
class _Placement:
    filed: tuple[Restriction, ...]  # empty: unindexed (or never)
    never: bool = False  # contradictory restrictions: the selector matches nothing


_UNINDEXED = _Placement(())
_NEVER = _Placement((), never=True)

# A bucket unchanged for this many lookups is compiled into one generated function.
COMPILE_AFTER_LOOKUPS = 8
_NEVER_COMPILE = -(2**62)

_BucketFn: TypeAlias = Callable[[Mapping[str, str]], list[Any]]


class _Bucket(Generic[K]):
    """Selectors filed under one restriction, evaluated together.

    Until it settles, a bucket calls each member's compiled matcher. Once it has gone
    ``COMPILE_AFTER_LOOKUPS`` lookups without a change, its members are compiled into ONE
    function (one ``if`` per selector, sharing ``L.get``), which saves a Python call per
    candidate; any change drops that function again, so churn never waits on compile().
    """

    __slots__ = ("fn", "hits", "members")

    def __init__(self) -> None:
        self.members: dict[K, Selector] = {}
        self.fn: _BucketFn | None = None
        self.hits = 0

    def put(self, key: K, selector: Selector) -> None:
        self.members[key] = selector
        self._changed()

    def drop(self, key: K) -> None:
        if self.members.pop(key, None) is not None:
            self._changed()

    def _changed(self) -> None:
        self.fn = None
        if self.hits > 0:
            self.hits = 0

    def matching(self, labels: Mapping[str, str]) -> list[K]:
        fn = self.fn
        if fn is not None:
            return fn(labels)
        self.hits += 1
        if self.hits >= COMPILE_AFTER_LOOKUPS and len(self.members) > 1:
            fn = self.fn = self._compile()
            if fn is not None:
                return fn(labels)
            self.hits = _NEVER_COMPILE
        return [key for key, selector in self.members.items() if selector.matcher(labels)]

    def _compile(self) -> _BucketFn | None:
        consts: dict[str, object] = {}
        lines = ["def _bucket(L):", "    g = L.get", "    r = []", "    a = r.append"]
        for number, (key, selector) in enumerate(self.members.items()):
            consts[f"_k{number}"] = key
            lines.append(f"    if {python_expression(selector.root, consts)}: a(_k{number})")
        lines.append("    return r")
        namespace: dict[str, object] = {"__builtins__": {}, **consts}
        try:
            exec(compile("\n".join(lines) + "\n", "<selector bucket>", "exec"), namespace)
        except (SyntaxError, RecursionError, MemoryError, ValueError):  # pragma: no cover
            return None
        return cast(_BucketFn, namespace["_bucket"])

    def __len__(self) -> int:
        return len(self.members)


class SelectorIndex(Generic[K]):
    """Selectors registered under keys of type ``K``; answers "which match these labels?"."""

    def __init__(self) -> None:
        self._selectors: dict[K, Selector] = {}
        self._placements: dict[K, _Placement] = {}
        # label -> (value -> bucket, bucket filed under the label's presence): one dict
        # lookup per label of the looked-up set finds both kinds of candidates.
        self._buckets: dict[str, tuple[dict[str, _Bucket[K]], _Bucket[K]]] = {}
        self._unindexed: _Bucket[K] = _Bucket()
        # label -> how many registered selectors require each value (the selectivity model)
        self._named: dict[str, Counter[str]] = {}
        self._rebalance_at = 1

    # ------------------------------------------------------------------ registration

    def add(self, key: K, selector: Selector) -> None:
        """Register ``selector`` under ``key``, replacing whatever ``key`` had."""
        if key in self._selectors:
            self.remove(key)
        for label, values in selector.required_keys().items():
            if values:
                self._named.setdefault(label, Counter()).update(values)
        self._selectors[key] = selector
        self._file(key, selector)
        if len(self._selectors) >= self._rebalance_at:
            self._rebalance_at = 2 * len(self._selectors)
            self._rebalance()

    def _rebalance(self) -> None:
        """Re-choose every placement with the statistics of the whole registered set."""
        self._buckets.clear()
        self._unindexed = _Bucket()
        self._placements.clear()
        for key, selector in self._selectors.items():
            self._file(key, selector)

    def _file(self, key: K, selector: Selector) -> None:
        placement = self._choose(selector)
        self._placements[key] = placement
        if not placement.filed:
            if not placement.never:
                self._unindexed.put(key, selector)
            return
        for label, values in placement.filed:
            by_value, present = self._buckets.setdefault(label, ({}, _Bucket()))
            if values is None:
                present.put(key, selector)
            else:
                for value in values:
                    bucket = by_value.get(value)
                    if bucket is None:
                        bucket = by_value[value] = _Bucket()
                    bucket.put(key, selector)

    def remove(self, key: K) -> None:
        """Forget ``key``; a no-op when it is not registered."""
        selector = self._selectors.pop(key, None)
        if selector is None:
            return
        for label, values in selector.required_keys().items():
            if values:
                named = self._named[label]
                named.subtract(values)
                for value in values:
                    if named[value] <= 0:
                        del named[value]
                if not named:
                    del self._named[label]
        placement = self._placements.pop(key)
        if not placement.filed:
            self._unindexed.drop(key)
            return
        for label, values in placement.filed:
            entry = self._buckets.get(label)
            if entry is None:  # an earlier branch's restriction emptied this label already
                continue
            by_value, present = entry
            if values is None:
                present.drop(key)
            else:
                for value in values:
                    bucket = by_value.get(value)
                    if bucket is not None:
                        bucket.drop(key)
                        if not bucket:
                            del by_value[value]
            if not by_value and not present:
                del self._buckets[label]

    def _choose(self, selector: Selector) -> _Placement:
        required = selector.required_keys()
        if any(values is not None and not values for values in required.values()):
            return _NEVER
        best = self._best(required)
        if best is not None:
            return _Placement((best,))
        root = selector.root
        if isinstance(root, Or):
            filed: list[Restriction] = []
            for branch in root.operands:
                restrictions = label_restrictions(branch)
                choice = self._best(
                    {k: v for k, v in restrictions.items() if v is None or v}
                )
                if choice is None:
                    return _UNINDEXED  # one unrestricted branch can match anything
                filed.append(choice)
            return _Placement(tuple(dict.fromkeys(filed)))
        return _UNINDEXED

    def _best(self, required: Mapping[str, frozenset[str] | None]) -> Restriction | None:
        best: Restriction | None = None
        best_rank: tuple[float, int, str] | None = None
        for label, values in required.items():
            by_value, present = self._buckets.get(label, ({}, {}))
            if values is None:
                chance, crowd = _PRESENCE_CHANCE, len(present)
            else:
                chance = len(values) / max(len(values), len(self._named.get(label, ())))
                crowd = sum(len(by_value.get(v, ())) for v in values)
            rank = (chance, crowd, label)
            if best_rank is None or rank < best_rank:
                best, best_rank = (label, values), rank
        return best

    # ------------------------------------------------------------------ queries

    def matching(self, labels: Mapping[str, str]) -> set[K]:
        """Keys of every registered selector that matches ``labels``."""
        result = self._unindexed.matching(labels) if self._unindexed.members else []
        extend = result.extend
        buckets = self._buckets
        for label, value in labels.items():
            entry = buckets.get(label)
            if entry is None:
                continue
            bucket = entry[0].get(value)
            if bucket is not None:
                extend(bucket.matching(labels))
            if entry[1].members:
                extend(entry[1].matching(labels))
        return set(result)

    def candidate_count(self, labels: Mapping[str, str]) -> int:
        """How many selectors :meth:`matching` tests for ``labels`` (for diagnostics)."""
        total = len(self._unindexed)
        for label, value in labels.items():
            entry = self._buckets.get(label)
            if entry is not None:
                total += len(entry[0].get(value, ())) + len(entry[1])
        return total

    def placement(self, key: K) -> tuple[Restriction, ...] | None:
        """The restrictions ``key`` is filed under; ``()`` when unindexed, ``None`` when it
        can never match. KeyError when ``key`` is not registered."""
        placement = self._placements[key]
        return None if placement.never else placement.filed

    def get(self, key: K) -> Selector | None:
        """The selector registered under ``key``, if any."""
        return self._selectors.get(key)

    def stats(self) -> IndexStats:
        counts = {"value": 0, "presence": 0, "branches": 0, "unindexed": 0, "never": 0}
        for placement in self._placements.values():
            if placement.never:
                counts["never"] += 1
            elif not placement.filed:
                counts["unindexed"] += 1
            elif len(placement.filed) > 1:
                counts["branches"] += 1
            elif placement.filed[0][1] is None:
                counts["presence"] += 1
            else:
                counts["value"] += 1
        return IndexStats(
            counts["value"], counts["presence"], counts["branches"], counts["unindexed"],
            counts["never"],
        )

    def __len__(self) -> int:
        return len(self._selectors)

    def __contains__(self, key: object) -> bool:
        return key in self._selectors

    def __iter__(self) -> Iterator[K]:
        return iter(self._selectors)
