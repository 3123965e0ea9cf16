"""The selector index must answer exactly what brute-force evaluation answers, while filing
selectors so that lookups evaluate only a few candidates."""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_selector_properties import label_sets, rendered, trees  # shared strategies

from policy import labelindex
from policy.labelindex import SelectorIndex
from policy.selectors import Selector, parse

NS = "projectcalico.org/namespace"


def brute_force(registered: dict[str, Selector], labels: dict[str, str]) -> set[str]:
    return {key for key, selector in registered.items() if selector.matches(labels)}


def test_lookup_by_value_presence_and_unindexed() -> None:
    index: SelectorIndex[str] = SelectorIndex()
    index.add("web", parse("app == 'web'"))
    index.add("web-or-api", parse("app in {'web', 'api'} && tier != 'db'"))
    index.add("has-team", parse("has(team)"))
    index.add("not-dev", parse("env != 'dev'"))
    index.add("everything", parse("all()"))
    index.add("never", parse("app == 'a' && app == 'b'"))
    index.add("ns1", parse(f"{NS} == 'ns1' && team starts with 'pay'"))

    assert index.matching({"app": "web"}) == {"web", "web-or-api", "not-dev", "everything"}
    assert index.matching({"app": "api", "tier": "db", "env": "dev"}) == {"everything"}
    assert index.matching({"team": "payments", NS: "ns1", "env": "dev"}) == {
        "has-team", "ns1", "everything",
    }
    assert index.matching({"team": "payments", NS: "ns2"}) == {"has-team", "not-dev", "everything"}
    stats = index.stats()
    assert (stats.by_value, stats.by_presence, stats.unindexed, stats.never) == (3, 1, 2, 1)
    assert len(index) == 7
    assert "never" in index
    assert index.get("web") == parse("app == 'web'")


def test_add_replaces_and_remove_forgets() -> None:
    index: SelectorIndex[int] = SelectorIndex()
    index.add(1, parse("app == 'web'"))
    index.add(1, parse("app == 'api'"))
    assert index.matching({"app": "web"}) == set()
    assert index.matching({"app": "api"}) == {1}
    assert len(index) == 1
    index.remove(1)
    index.remove(1)  # no-op
    index.remove(99)  # no-op
    assert index.matching({"app": "api"}) == set()
    assert len(index) == 0
    assert 1 not in index
    # Internal buckets are cleaned up, so an index that had everything removed is empty.
    assert index.stats() == SelectorIndex[int]().stats()
    assert not index._buckets and not index._unindexed and not index._placements


def test_or_branches_are_filed_separately_and_removed_cleanly() -> None:
    index: SelectorIndex[str] = SelectorIndex()
    index.add("either", parse("app == 'a' || team == 't'"))
    index.add("overlap", parse("app == 'a' || (app in {'a', 'b'} && has(x))"))
    index.add("open", parse("app == 'a' || tier != 'db'"))
    assert index.placement("either") == (("app", frozenset({"a"})), ("team", frozenset({"t"})))
    assert index.placement("open") == ()
    assert index.stats().by_branches == 1
    assert index.matching({"app": "a", "team": "t", "tier": "db"}) == {"either", "overlap", "open"}
    assert index.matching({"team": "t", "tier": "db"}) == {"either"}
    assert index.matching({"app": "b", "x": ""}) == {"overlap", "open"}
    for key in ("either", "overlap", "open"):
        index.remove(key)
    assert not index._buckets and not index._unindexed


def test_selectors_are_filed_under_the_most_selective_restriction() -> None:
    index: SelectorIndex[str] = SelectorIndex()
    for env in ("prod", "dev", "staging"):
        index.add(env, parse(f"env == '{env}'"))
    for i in range(20):
        index.add(f"prod{i}", parse(f"env == 'prod' && app == 'app{i}'"))
    # env takes one of 3 values, app one of 20: each is filed under its own app value.
    for i in range(20):
        assert index.placement(f"prod{i}") == (("app", frozenset({f"app{i}"})),)
    assert index.candidate_count({"env": "prod", "app": "app3"}) == 2
    index.add("team", parse("has(team) && tier in {'a', 'b'}"))
    assert index.placement("team") == (("tier", frozenset({"a", "b"})),)
    index.add("canary", parse("has(canary) && tier != 'db'"))
    assert index.placement("canary") == (("canary", None),)
    index.add("broad", parse("tier != 'db'"))
    assert index.placement("broad") == ()
    index.add("none", parse("a == '1' && a in {'2', '3'}"))
    assert index.placement("none") is None
    assert index.matching({"a": "1", "tier": "db"}) == set()


def test_or_of_pinned_values_is_indexed() -> None:
    index: SelectorIndex[str] = SelectorIndex()
    index.add("s", parse(f"({NS} == 'a' && app == 'x') || {NS} == 'b'"))
    assert index.stats().unindexed == 0
    assert index.matching({NS: "a", "app": "x"}) == {"s"}
    assert index.matching({NS: "b"}) == {"s"}
    assert index.matching({NS: "a"}) == set()


def test_lookup_evaluates_only_candidates() -> None:
    calls: list[str] = []

    class Counting(dict[str, str]):
        def get(self, key: Any, default: Any = None) -> Any:
            calls.append(key)
            return super().get(key, default)

    index: SelectorIndex[int] = SelectorIndex()
    for i in range(500):
        index.add(i, parse(f"app == 'app{i}' && tier == 't'"))
    assert index.matching(Counting(app="app7", tier="t")) == {7}
    assert len(calls) <= 4  # one candidate evaluated, not 500


# ----------------------------------------------------------------------------- properties

operations = st.lists(
    st.one_of(
        st.tuples(st.sampled_from(["add", "add", "remove"]), st.integers(0, 15), trees),
        st.tuples(st.just("lookup"), st.integers(0, 0), label_sets),
    ),
    max_size=50,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    operations,
    st.lists(label_sets, min_size=1, max_size=10),
    st.sampled_from([1, 2, 1000]),
    st.data(),
)
def test_index_equals_brute_force_under_add_remove_and_lookup(
    ops: list[tuple[str, int, Any]],
    labelsets: list[dict[str, str]],
    compile_after: int,
    data: st.DataObject,
) -> None:
    """Interleaved changes and lookups, with buckets compiled eagerly, soon, or never."""
    saved = labelindex.COMPILE_AFTER_LOOKUPS
    labelindex.COMPILE_AFTER_LOOKUPS = compile_after
    try:
        index: SelectorIndex[str] = SelectorIndex()
        registered: dict[str, Selector] = {}
        for op, number, arg in ops:
            key = f"k{number}"
            if op == "add":
                selector = parse(data.draw(rendered(arg)))
                index.add(key, selector)
                registered[key] = selector
            elif op == "remove":
                index.remove(key)
                registered.pop(key, None)
            else:
                assert index.matching(arg) == brute_force(registered, arg)
            assert len(index) == len(registered)
        for _ in range(2):  # the second pass runs compiled buckets when compile_after <= 2
            for labels in labelsets:
                assert index.matching(labels) == brute_force(registered, labels)
        for key in list(registered):
            index.remove(key)
        assert len(index) == 0
        for labels in labelsets:
            assert index.matching(labels) == set()
    finally:
        labelindex.COMPILE_AFTER_LOOKUPS = saved


def test_buckets_compile_after_settling_and_recompile_after_changes() -> None:
    index: SelectorIndex[int] = SelectorIndex()
    for i in range(10):
        index.add(i, parse(f"app == 'web' && version != 'v{i}'"))
    bucket = index._buckets["app"][0]["web"]
    assert len(bucket) == 10
    labels = {"app": "web", "version": "v3"}
    everyone_but_3 = set(range(10)) - {3}
    for _ in range(labelindex.COMPILE_AFTER_LOOKUPS):
        assert bucket.fn is None
        assert index.matching(labels) == everyone_but_3
    assert bucket.fn is not None
    assert index.matching(labels) == everyone_but_3
    index.add(99, parse("app == 'web' && has(version)"))
    assert bucket.fn is None
    assert index.matching(labels) == everyone_but_3 | {99}
    index.remove(4)
    for _ in range(labelindex.COMPILE_AFTER_LOOKUPS + 1):
        assert index.matching(labels) == everyone_but_3 - {4} | {99}
    assert bucket.fn is not None
