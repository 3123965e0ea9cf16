"""enforcers.dnscache: what answers teach, and the domain sets' membership changes.

The property: for any sequence of learns (hand-made items and whole answers), expiries,
uses and releases at random non-decreasing times, the changes `DomainSets` returns,
applied in order to a plain dict {(uid, member key): IPs}, always equal the members an
oracle computes from the whole history alone: for every uid in use, every learned name one
of its patterns matches (`policy.domains.matches`), with the IPs still valid for it; an
IP's expiry is the latest learn time + TTL + grace over its learns, it is gone once an
expiry run at or after that time followed its last learn, and a name keeps at most
``max_ips`` of them, the latest to expire.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import dns.message
import dns.rrset
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from enforcers.dnscache import (
    MAX_TTL,
    DnsLearner,
    DomainSets,
    Learned,
    MemberChange,
    chains_of,
    domain_uid,
    member_key,
)
from enforcers.dnswire import TYPE_A, TYPE_AAAA, TYPE_CNAME, Answer, Record, parse_message
from policy.domains import DomainError, matches

NAMES = ["example.com", "a.example.com", "b.a.example.com", "www.sun.com", "www.com",
         "api.x.net", "x.net", "other.org"]
PATTERN_LISTS = [
    ("example.com",),
    ("*.example.com",),
    ("*.example.com", "example.com"),
    ("Example.COM.", "*.EXAMPLE.com", "example.com"),  # the same set as the one above
    ("www.*.com",),
    ("*.com",),
    ("api.*", "other.org"),
    ("x.net", "*.x.net"),
    ("nomatch.io",),
]
IPS = ["10.0.0.1", "10.0.0.2", "10.0.0.3", "192.0.2.7", "fd00::1", "fd00::2"]

# --------------------------------------------------------------------------- chains_of


def answer(question: str | None, *records: tuple[str, int, int, str], rcode: int = 0,
           truncated: bool = False) -> Answer:
    return Answer(1, question, rcode, truncated, tuple(Record(*r) for r in records))


def test_a_cname_chain_teaches_every_name_on_it() -> None:
    got = chains_of(answer(
        "q.example.com",
        ("q.example.com", TYPE_CNAME, 300, "a.cdn.net"),
        ("a.cdn.net", TYPE_CNAME, 60, "b.cdn.net"),
        ("b.cdn.net", TYPE_A, 120, "192.0.2.2"),
        ("b.cdn.net", TYPE_A, 200, "192.0.2.1"),
        ("b.cdn.net", TYPE_AAAA, 500, "2001:db8::1"),
    ))
    ips = ("192.0.2.1", "192.0.2.2", "2001:db8::1")
    # each name is valid as long as every record from it down to the addresses is
    assert got == [Learned("q.example.com", ips, 60), Learned("a.cdn.net", ips, 60),
                   Learned("b.cdn.net", ips, 120)]


def test_a_chain_ttl_is_the_smallest_from_each_name_down() -> None:
    got = chains_of(answer(
        "q", ("q", TYPE_CNAME, 10, "a"), ("a", TYPE_CNAME, 400, "b"),
        ("b", TYPE_A, 100, "192.0.2.1"), ("b", TYPE_A, 90, "192.0.2.1")))
    assert got == [Learned("q", ("192.0.2.1",), 10), Learned("a", ("192.0.2.1",), 90),
                   Learned("b", ("192.0.2.1",), 90)]


def test_records_off_the_chain_teach_nothing() -> None:
    got = chains_of(answer(
        "q.example.com",
        ("other.example.com", TYPE_A, 60, "203.0.113.9"),  # not the question
        ("evil.example.com", TYPE_CNAME, 60, "a.cdn.net"),  # points into the chain
        ("q.example.com", TYPE_CNAME, 60, "a.cdn.net"),
        ("a.cdn.net", TYPE_A, 60, "192.0.2.1"),
        ("unrelated.net", TYPE_CNAME, 60, "q.example.com"),
    ))
    assert {item.name for item in got} == {"q.example.com", "a.cdn.net"}
    assert all(item.ips == ("192.0.2.1",) for item in got)
    # addresses only for a name the chain does not reach: nothing at all
    assert chains_of(answer("q", ("x", TYPE_A, 60, "192.0.2.1"))) == []
    # a chain that ends without addresses: nothing
    assert chains_of(answer("q", ("q", TYPE_CNAME, 60, "a"), ("q", TYPE_A, 60, "1.2.3.4"),
                            ("b", TYPE_A, 60, "192.0.2.1"))) == []


@pytest.mark.parametrize("rcode", [1, 2, 3, 5, 15])
def test_an_error_rcode_teaches_nothing(rcode: int) -> None:
    assert chains_of(answer("q", ("q", TYPE_A, 60, "192.0.2.1"), rcode=rcode)) == []


def test_no_question_teaches_nothing() -> None:
    assert chains_of(answer(None, ("q", TYPE_A, 60, "192.0.2.1"))) == []


def test_a_truncated_answer_teaches_what_it_holds() -> None:
    got = chains_of(answer("q", ("q", TYPE_A, 60, "192.0.2.1"), truncated=True))
    assert got == [Learned("q", ("192.0.2.1",), 60)]


@pytest.mark.parametrize(
    "records",
    [
        [("q", TYPE_CNAME, 60, "q")],
        [("q", TYPE_CNAME, 60, "a"), ("a", TYPE_CNAME, 60, "q")],
        [("q", TYPE_CNAME, 60, "a"), ("a", TYPE_CNAME, 60, "b"), ("b", TYPE_CNAME, 60, "a"),
         ("a", TYPE_A, 60, "192.0.2.1"), ("b", TYPE_A, 60, "192.0.2.2"),
         ("q", TYPE_A, 60, "192.0.2.3")],
    ],
)
def test_cname_loops_terminate_and_teach_nothing(records: list[tuple[str, int, int, str]],
                                                 ) -> None:
    assert chains_of(answer("q", *records)) == []


def test_ttls_with_the_top_bit_set_are_zero() -> None:
    got = chains_of(answer("q", ("q", TYPE_CNAME, 2**31, "a"), ("a", TYPE_A, 50, "1.2.3.4")))
    assert [item.ttl for item in got] == [0, 50]
    got = chains_of(answer("q", ("q", TYPE_A, MAX_TTL, "1.2.3.4")))
    assert got == [Learned("q", ("1.2.3.4",), MAX_TTL)]


def oracle_chains(ans: Answer) -> list[Learned]:
    """chains_of, by a plain walk: the first CNAME of a name is its alias; a loop or a
    chain without addresses at its end teaches nothing."""
    if ans.question is None or ans.rcode:
        return []

    def ttl(record: Record) -> int:
        return record.ttl if record.ttl < 2**31 else 0

    path = [ans.question]
    while True:
        alias = next((r for r in ans.records if r.rtype == TYPE_CNAME and r.name == path[-1]),
                     None)
        if alias is None:
            break
        if alias.data in path:
            return []
        path.append(alias.data)
    ends = [r for r in ans.records if r.rtype != TYPE_CNAME and r.name == path[-1]]
    if not ends:
        return []
    ips = tuple(sorted({r.data for r in ends}))
    out = []
    for index, name in enumerate(path):
        links = [ttl(next(r for r in ans.records if r.rtype == TYPE_CNAME and r.name == n))
                 for n in path[index:-1]]
        out.append(Learned(name, ips, min([*links, *(ttl(r) for r in ends)])))
    return out


chain_names = st.sampled_from(["q", "a", "b", "c", "d"])
answer_st = st.builds(
    lambda question, rcode, records: Answer(7, question, rcode, False, tuple(records)),
    st.one_of(st.just("q"), st.just("q"), st.none()),
    st.sampled_from([0, 0, 0, 0, 3]),
    st.lists(st.one_of(
        st.builds(Record, chain_names, st.just(TYPE_CNAME),
                  st.sampled_from([0, 5, 60, 300, 2**31 - 1, 2**31, 2**32 - 1]), chain_names),
        st.builds(Record, chain_names, st.sampled_from([TYPE_A, TYPE_AAAA]),
                  st.sampled_from([0, 5, 60, 300, 2**31 - 1, 2**31]), st.sampled_from(IPS)),
    ), max_size=8),
)


@settings(max_examples=400, deadline=None)
@given(answer_st)
def test_chains_of_matches_a_plain_walk(ans: Answer) -> None:
    got = chains_of(ans)
    assert got == oracle_chains(ans)
    assert len({item.name for item in got}) == len(got)
    assert all(item.ips and 0 <= item.ttl <= MAX_TTL for item in got)


def test_an_answer_from_the_wire() -> None:
    msg = dns.message.make_response(dns.message.make_query("API.Example.com", "A"))
    msg.answer.append(dns.rrset.from_text("api.example.com.", 300, "IN", "CNAME",
                                          "edge.cdn.net."))
    msg.answer.append(dns.rrset.from_text("edge.cdn.net.", 20, "IN", "A", "192.0.2.5"))
    msg.answer.append(dns.rrset.from_text("edge.cdn.net.", 20, "IN", "TXT", '"x"'))
    sets = DomainSets(DnsLearner(grace=2.0))
    uid = domain_uid(["*.example.com"])
    assert sets.use(uid, ("*.example.com",)) == []
    assert sets.learn(parse_message(msg.to_wire()), 100.0) == [
        (uid, "dns:api.example.com", ("192.0.2.5",))]
    assert sets.learner.names["api.example.com"] == {"192.0.2.5": 122.0}
    assert sets.expire(121.9) == []
    assert sets.expire(122.0) == [(uid, "dns:api.example.com", None)]


# --------------------------------------------------------------------------- domain_uid


@settings(max_examples=100, deadline=None)
@given(st.lists(st.sampled_from(["example.com", "*.example.com", "www.*.com", "api.x.net",
                                 "other.org"]), min_size=1, max_size=5, unique=True),
       st.randoms(use_true_random=False), st.data())
def test_domain_uid_ignores_order_case_trailing_dots_and_repeats(
        patterns: list[str], rng: Any, data: st.DataObject) -> None:
    variant = [p.upper() if rng.random() < 0.5 else p for p in patterns]
    variant = [p + "." if rng.random() < 0.5 else p for p in variant]
    variant += data.draw(st.lists(st.sampled_from(variant), max_size=3), label="repeats")
    rng.shuffle(variant)
    uid = domain_uid(patterns)
    assert domain_uid(variant) == uid
    assert uid.startswith("d:") and "=" not in uid
    # a different set has a different uid
    other = data.draw(st.sampled_from(["nomatch.io", "*.other.org"]), label="other")
    assert domain_uid([*patterns, other]) != uid
    if len(patterns) > 1:
        assert domain_uid(patterns[1:]) != uid


def test_domain_uid_rejects_bad_patterns() -> None:
    for bad in ("*", "a..b", "www*.example.com", ""):
        with pytest.raises(DomainError):
            domain_uid([bad])


# --------------------------------------------------------------------------- learner units


def test_max_ips_keeps_the_latest_to_expire() -> None:
    learner = DnsLearner(grace=0.0, max_ips=2)
    assert learner.learn([Learned("n", ("10.0.0.1",), 100)], 0.0) == {"n"}
    assert learner.learn([Learned("n", ("10.0.0.2", "10.0.0.3"), 10)], 0.0) == {"n"}
    assert learner.ips("n") == ("10.0.0.1", "10.0.0.3")  # ties: the larger IP stays
    assert learner.stats.evictions == 1
    # longer validity for a known IP: the IPs are unchanged, so no change is reported
    assert learner.learn([Learned("n", ("10.0.0.3",), 500)], 1.0) == set()
    assert learner.names["n"]["10.0.0.3"] == 501.0
    # a shorter one never shortens it
    assert learner.learn([Learned("n", ("10.0.0.3",), 1)], 2.0) == set()
    assert learner.names["n"]["10.0.0.3"] == 501.0
    # a newcomer that expires sooner than both is evicted at once: nothing changes
    assert learner.learn([Learned("n", ("10.0.0.9",), 5)], 3.0) == set()
    assert learner.ips("n") == ("10.0.0.1", "10.0.0.3")
    assert learner.expire(100.0) == {"n"} and learner.ips("n") == ("10.0.0.3",)
    assert learner.stats.expired == 1
    assert learner.expire(501.0) == {"n"} and "n" not in learner.names
    assert learner.next_expiry() is None and learner.ip_count() == 0


def test_a_restored_snapshot_respects_max_ips() -> None:
    big = DnsLearner(grace=0.0, max_ips=10)
    big.learn([Learned("n", tuple(f"10.0.0.{i}" for i in range(1, 6)), 100)], 0.0)
    big.learn([Learned("n", ("10.0.0.9",), 300)], 0.0)
    small = DnsLearner(grace=0.0, max_ips=2)
    small.learn([Learned("n", ("10.0.1.1",), 200)], 0.0)
    assert small.restore(big.snapshot(), 50.0) == {"n"}
    assert small.ips("n") == ("10.0.0.9", "10.0.1.1")
    assert small.stats.evictions == 5


def test_restore_refuses_what_is_not_a_snapshot() -> None:
    learner = DnsLearner()
    for bad in ([], {"n": []}, {"n": {"1.2.3.4": "x"}}, {1: {}}):
        with pytest.raises(ValueError):
            learner.restore(bad, 0.0)
    assert learner.names == {}


def test_release_without_use_and_repeated_use() -> None:
    sets = DomainSets(DnsLearner(grace=0.0))
    uid = domain_uid(["example.com"])
    assert sets.release(uid) == []
    sets.learn_items([Learned("example.com", ("10.0.0.1",), 10)], 0.0)
    assert sets.use(uid, ("example.com",)) == [(uid, "dns:example.com", ("10.0.0.1",))]
    assert sets.use(uid, ("example.com",)) == []
    assert sets.release(uid) == []
    assert sets.release(uid) == [(uid, "dns:example.com", None)]
    assert sets.release(uid) == []
    assert sets.learn_items([Learned("example.com", ("10.0.0.2",), 10)], 1.0) == []


# --------------------------------------------------------------------------- the property


@dataclass
class History:
    """Everything that happened, for the oracle to recompute members from scratch."""

    grace: float
    max_ips: int
    # (step, name, ip, expiry) per learned IP, and (step, time) per expiry run
    learns: list[tuple[int, str, str, float]] = field(default_factory=list)
    expiries: list[tuple[int, float]] = field(default_factory=list)
    refs: Counter[str] = field(default_factory=Counter)
    patterns: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def valid(self) -> dict[str, tuple[str, ...]]:
        """name -> the IPs still valid for it."""
        latest: dict[tuple[str, str], tuple[int, float]] = {}  # -> (last step, max expiry)
        for step, name, ip, expires in self.learns:
            _, best = latest.get((name, ip), (0, 0.0))
            latest[name, ip] = (step, max(best, expires))
        by_name: dict[str, list[tuple[float, str]]] = {}
        for (name, ip), (step, expires) in latest.items():
            if any(s > step and t >= expires for s, t in self.expiries):
                continue  # an expiry run after its last learn found it expired
            by_name.setdefault(name, []).append((expires, ip))
        return {name: tuple(sorted(ip for _, ip in sorted(found)[-self.max_ips:]))
                for name, found in by_name.items()}

    def members(self) -> dict[tuple[str, str], tuple[str, ...]]:
        valid = self.valid()
        return {(uid, member_key(name)): ips
                for uid, count in self.refs.items() if count > 0
                for name, ips in valid.items()
                if any(matches(p, name) for p in self.patterns[uid])}


learned_st = st.builds(Learned, st.sampled_from(NAMES),
                       st.lists(st.sampled_from(IPS), min_size=1, max_size=4, unique=True)
                       .map(lambda ips: tuple(sorted(ips))),
                       st.integers(0, 20))


def answer_for(name: str, alias: str | None, ips: tuple[str, ...], ttl: int) -> Answer:
    records = [Record(name, TYPE_CNAME, ttl + 3, alias)] if alias else []
    records += [Record(alias or name, TYPE_AAAA if ":" in ip else TYPE_A, ttl, ip)
                for ip in ips]
    return Answer(1, name, 0, False, tuple(records))


step_st = st.tuples(
    st.sampled_from([0, 0, 0.5, 1, 2, 3, 5, 10, 25]),  # time passing before the step
    st.one_of(
        st.tuples(st.just("learn"), st.lists(learned_st, min_size=1, max_size=3)),
        st.tuples(st.just("answer"), st.builds(
            answer_for, st.sampled_from(NAMES), st.none() | st.sampled_from(NAMES),
            learned_st.map(lambda item: item.ips), st.integers(0, 20))),
        st.tuples(st.just("expire")),
        st.tuples(st.just("use"), st.sampled_from(PATTERN_LISTS)),
        # release a set in use (the k-th), or (k = 0) any set, in use or not
        st.tuples(st.just("release"), st.sampled_from(PATTERN_LISTS), st.integers(0, 3)),
    ),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(step_st, max_size=40), st.sampled_from([0.0, 0.5, 2.0]), st.integers(1, 4))
def test_membership_changes_equal_a_recomputation(
        steps: list[tuple[float, tuple[Any, ...]]], grace: float, max_ips: int) -> None:
    sets = DomainSets(DnsLearner(grace=grace, max_ips=max_ips))
    history = History(grace, max_ips)
    model: dict[tuple[str, str], tuple[str, ...]] = {}

    def apply(changes: list[MemberChange], to: dict[tuple[str, str], tuple[str, ...]]) -> None:
        for uid, key, ips in changes:
            if ips is None:
                to.pop((uid, key), None)
            else:
                assert ips and ips == tuple(sorted(set(ips))), ips  # never an empty member
                to[uid, key] = ips

    now = 1000.0
    for index, (elapsed, op) in enumerate(steps, start=1):
        now += elapsed
        if op[0] in ("learn", "answer"):
            items = op[1] if op[0] == "learn" else chains_of(op[1])
            for item in items:
                history.learns += [(index, item.name, ip, now + item.ttl + grace)
                                   for ip in item.ips]
            apply(sets.learn_items(items, now) if op[0] == "learn" else sets.learn(op[1], now),
                  model)
        elif op[0] == "expire":
            history.expiries.append((index, now))
            apply(sets.expire(now), model)
        elif op[0] == "use":
            uid = domain_uid(op[1])
            history.refs[uid] += 1
            history.patterns.setdefault(uid, op[1])
            apply(sets.use(uid, op[1]), model)
        else:
            in_use = sorted(u for u, count in history.refs.items() if count > 0)
            uid = in_use[op[2] % len(in_use)] if op[2] and in_use else domain_uid(op[1])
            if history.refs[uid] > 0:
                history.refs[uid] -= 1
            apply(sets.release(uid), model)
        assert model == history.members(), (index, op)
        assert all(len(ips) <= max_ips for ips in sets.learner.names.values())
        assert all(sets.learner.names.values())  # no name is kept without IPs

    # what is persisted, restored on a fresh node with the same sets, gives the same members
    now += 1
    apply(sets.expire(now), model)
    fresh = DomainSets(DnsLearner(grace=grace, max_ips=max_ips))
    restored: dict[tuple[str, str], tuple[str, ...]] = {}
    for uid, patterns in sets.patterns.items():
        for _ in range(sets.refs[uid]):
            apply(fresh.use(uid, patterns), restored)
    apply(fresh.restore(sets.learner.snapshot(), now), restored)
    assert restored == model
