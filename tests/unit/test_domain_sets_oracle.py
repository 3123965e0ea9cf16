"""Domain sets: the membership changes DomainSets emits, applied in order, always equal the
members computed from scratch (every set in use, every learned name its patterns cover,
with the IPs still valid), whatever the sequence of lookups, expiries and policy changes."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from enforcers.dnscache import DnsLearner, DomainSets, Learned, chains_of, domain_uid, member_key
from enforcers.dnswire import TYPE_A, TYPE_CNAME, Answer, Record
from policy.domains import matches

NAMES = ["a.example.com", "b.example.com", "x.a.example.com", "example.com", "api.test",
         "API.Test.", "cdn.net"]
PATTERNS = [("*.example.com",), ("example.com",), ("api.test", "cdn.net"), ("*.a.example.com",),
            ("a.*.com",)]
IPS = ["10.0.0.1", "10.0.0.2", "10.0.0.3", "fd00::1"]

ops = st.lists(st.one_of(
    st.tuples(st.just("learn"), st.sampled_from(NAMES), st.lists(st.sampled_from(IPS),
                                                              min_size=1, max_size=3),
              st.integers(0, 30)),
    st.tuples(st.just("tick"), st.floats(0, 20)),
    st.tuples(st.just("use"), st.sampled_from(range(len(PATTERNS)))),
    st.tuples(st.just("release"), st.sampled_from(range(len(PATTERNS)))),
), max_size=40)


def _from_scratch(sets: DomainSets, used: dict[int, int], now: float,
                  valid: dict[str, dict[str, float]]) -> dict[tuple[str, str], tuple[str, ...]]:
    out = {}
    for index, count in used.items():
        if count <= 0:
            continue
        patterns = PATTERNS[index]
        uid = domain_uid(patterns)
        for name, ips in valid.items():
            live = tuple(sorted(ip for ip, expires in ips.items()))
            if live and any(matches(p, name) for p in patterns):
                out[(uid, member_key(name))] = live
    return out


@settings(max_examples=300, deadline=None)
@given(ops, st.floats(0, 5))
def test_incremental_members_equal_a_recomputation(steps: list[Any], grace: float) -> None:
    sets = DomainSets(DnsLearner(grace=grace, max_ips=100))
    model: dict[tuple[str, str], tuple[str, ...]] = {}
    used: dict[int, int] = {}
    # the oracle's own record of what is valid: name -> ip -> expiry, forgotten at ticks
    valid: dict[str, dict[str, float]] = {}
    now = 1000.0

    def take(changes: list[Any]) -> None:
        for uid, key, ips in changes:
            if ips is None:
                model.pop((uid, key), None)
            else:
                model[(uid, key)] = ips

    for step in steps:
        if step[0] == "learn":
            _, name, ips, ttl = step
            name = name.lower().rstrip(".")
            take(sets.learn_items([Learned(name, tuple(sorted(set(ips))), ttl)], now))
            known = valid.setdefault(name, {})
            for ip in ips:
                known[ip] = max(known.get(ip, 0.0), now + ttl + grace)
        elif step[0] == "tick":
            now += step[1]
            take(sets.expire(now))
            for name in list(valid):
                valid[name] = {ip: e for ip, e in valid[name].items() if e > now}
                if not valid[name]:
                    del valid[name]
        elif step[0] == "use":
            used[step[1]] = used.get(step[1], 0) + 1
            take(sets.use(domain_uid(PATTERNS[step[1]]), PATTERNS[step[1]]))
        elif used.get(step[1], 0) > 0:
            used[step[1]] -= 1
            take(sets.release(domain_uid(PATTERNS[step[1]])))
        assert model == _from_scratch(sets, used, now, valid)


def test_a_name_keeps_at_most_max_ips_the_latest_to_expire() -> None:
    learner = DnsLearner(grace=0, max_ips=2)
    learner.learn([Learned("a.test", ("10.0.0.1",), 10)], 0)
    learner.learn([Learned("a.test", ("10.0.0.2",), 30)], 0)
    learner.learn([Learned("a.test", ("10.0.0.3",), 20)], 0)
    assert learner.ips("a.test") == ("10.0.0.2", "10.0.0.3")
    assert learner.stats.evictions == 1


def test_cname_chains_teach_every_name_on_the_chain_with_the_smallest_ttl() -> None:
    answer = Answer(1, "www.shop.test", 0, False, (
        Record("www.shop.test", TYPE_CNAME, 300, "edge.cdn.test"),
        Record("edge.cdn.test", TYPE_CNAME, 60, "pop.cdn.test"),
        Record("pop.cdn.test", TYPE_A, 120, "10.0.0.7"),
        Record("pop.cdn.test", TYPE_A, 90, "10.0.0.8"),
        Record("unrelated.test", TYPE_A, 999, "10.6.6.6"),  # not on the chain: ignored
    ))
    learned = {item.name: (item.ips, item.ttl) for item in chains_of(answer)}
    assert learned == {
        "www.shop.test": (("10.0.0.7", "10.0.0.8"), 60),
        "edge.cdn.test": (("10.0.0.7", "10.0.0.8"), 60),
        "pop.cdn.test": (("10.0.0.7", "10.0.0.8"), 90),
    }
    loop = Answer(2, "a.test", 0, False, (Record("a.test", TYPE_CNAME, 5, "b.test"),
                                          Record("b.test", TYPE_CNAME, 5, "a.test")))
    assert chains_of(loop) == []
    nxdomain = Answer(3, "a.test", 3, False, (Record("a.test", TYPE_A, 5, "10.0.0.1"),))
    assert chains_of(nxdomain) == []


def test_a_restored_snapshot_keeps_only_what_is_still_valid() -> None:
    learner = DnsLearner(grace=0)
    learner.learn([Learned("a.test", ("10.0.0.1",), 10), Learned("b.test", ("10.0.0.2",), 100)],
                  0)
    fresh = DnsLearner()
    assert fresh.restore(learner.snapshot(), now=50) == {"b.test"}
    assert fresh.ips("a.test") == () and fresh.ips("b.test") == ("10.0.0.2",)
    for bad in ([], {"a.test": ["10.0.0.1"]}, {"a.test": {"10.0.0.1": "soon"}}):
        try:
            DnsLearner().restore(bad, 0)
        except ValueError:
            continue
        raise AssertionError(f"accepted {bad!r}")


def test_domain_uids_ignore_order_case_repeats_and_trailing_dots() -> None:
    assert domain_uid(["b.test", "A.test."]) == domain_uid(["a.test", "b.test", "a.test"])
    assert domain_uid(["a.test"]) != domain_uid(["*.a.test"])
