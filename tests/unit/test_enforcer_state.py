"""Enforcer desired state: refcounted sets, applying policies, and incremental == from scratch."""

from __future__ import annotations

import logging

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from enforcers import render
from enforcers.dnscache import domain_uid
from enforcers.render import PeerSpec, PortRange, RuleSpec
from enforcers.state import (
    CompiledPolicy,
    CompiledRule,
    CompiledTier,
    Dataplane,
    EnforcerState,
    LocalEndpoint,
    compile_object,
    set_members,
)
from policy import compile as pcompile
from policy.load import load
from policy.selectors import Selector, parse


def namer(uid: str) -> str:
    return "pc-" + uid.replace(":", "")[:20]


# what policies apply to: evaluated by the state against local endpoints' labels
APPLY = [parse("app == 'web'"), parse("all()"), parse("app == 'db'")]
APPLY_UIDS = [s.uid for s in APPLY]
PEERS = ["s:peer-a", "s:peer-b", "s:peer-c"]
WEB, DB = {"app": "web"}, {"app": "db"}


def policy(key: str, applies: Selector, tier: str = "default", order: float = 10.0,
           peers: tuple[str, ...] = (), not_peer: str | None = None,
           action: str = "Allow") -> CompiledPolicy:
    rules = [
        CompiledRule(RuleSpec(action, "tcp", destination=PeerSpec(ports=(PortRange(80, 80),))),
                     dst_uid=p)
        for p in peers
    ]
    if not_peer:
        rules.append(CompiledRule(RuleSpec("Deny"), dst_not_uid=not_peer))
    return CompiledPolicy(key, tier, (order, key), applies, True, tuple(rules))


POLICIES = [
    policy("p1", APPLY[0], peers=(PEERS[0],)),
    policy("p2", APPLY[1], order=5, peers=(PEERS[1], PEERS[0])),
    policy("p3", APPLY[2], tier="sec", peers=(PEERS[2],), not_peer=PEERS[1], action="Pass"),
    policy("p1", APPLY[1], order=1, peers=(PEERS[2],)),  # p1 changed
]
TIERS = [CompiledTier("sec", (False, False, 10.0, "sec"), "Deny"),
         CompiledTier("sec", (False, False, 10.0, "sec"), "Pass")]
ENDPOINTS = [
    LocalEndpoint("pod/ns/a", "workload", "vetha", ("10.0.0.1",), labels=WEB),
    LocalEndpoint("pod/ns/b", "workload", "vethb", ("10.0.0.2",), labels=DB),
    LocalEndpoint("hostendpoint//n1", "host", "eth0", ("192.168.1.1",)),
    LocalEndpoint("pod/ns/a", "workload", "vethc", ("10.0.0.3",), labels=WEB),  # moved iface
    LocalEndpoint("pod/ns/a", "workload", "vetha", ("10.0.0.1",), labels=DB),  # relabelled
]
MEMBER_KEYS = ["pod/ns/a", "pod/ns/b", "hostendpoint//n1", "pod/other/x", "networkset/ns/s"]
IPS = ["10.0.0.1", "10.0.0.2", "10.0.0.9", "10.9.0.0/16", "0.0.0.0/0", "fd00::1"]

ops = st.one_of(
    st.tuples(st.just("policy"), st.sampled_from(POLICIES)),
    st.tuples(st.just("unpolicy"), st.sampled_from(["p1", "p2", "p3"])),
    st.tuples(st.just("tier"), st.sampled_from(TIERS)),
    st.tuples(st.just("untier"), st.just("sec")),
    st.tuples(st.just("endpoint"), st.sampled_from(ENDPOINTS)),
    st.tuples(st.just("unendpoint"), st.sampled_from(["pod/ns/a", "pod/ns/b"])),
    st.tuples(st.just("member"), st.tuples(
        st.sampled_from(APPLY_UIDS + PEERS), st.sampled_from(MEMBER_KEYS),
        st.lists(st.sampled_from(IPS), max_size=3))),
    st.tuples(st.just("unmember"), st.tuples(
        st.sampled_from(APPLY_UIDS + PEERS), st.sampled_from(MEMBER_KEYS))),
    st.tuples(st.just("plan"), st.none()),
)


def apply_op(state: EnforcerState, op: tuple[str, object]) -> None:
    kind, arg = op
    if kind == "policy":
        state.upsert_policy(arg)  # type: ignore[arg-type]
    elif kind == "unpolicy":
        state.delete_policy(arg)  # type: ignore[arg-type]
    elif kind == "tier":
        state.upsert_tier(arg)  # type: ignore[arg-type]
    elif kind == "untier":
        state.delete_tier(arg)  # type: ignore[arg-type]
    elif kind == "endpoint":
        state.upsert_endpoint(arg)  # type: ignore[arg-type]
    elif kind == "unendpoint":
        state.delete_endpoint(arg)  # type: ignore[arg-type]
    elif kind == "member":
        uid, key, ips = arg  # type: ignore[misc]
        state.upsert_membership(uid, key, ips)
    elif kind == "unmember":
        uid, key = arg  # type: ignore[misc]
        state.delete_membership(uid, key)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(ops, max_size=40))
def test_incremental_plans_equal_recomputation_from_scratch(sequence: list) -> None:
    state = EnforcerState("n1", namer)
    dp = Dataplane()
    for op in sequence:
        apply_op(state, op)
        if op[0] == "plan":
            plan = state.plan()
            # safe order: every set the new chains use exists once sets were created/added
            after_create = set(dp.sets) | set(plan.create_sets)
            assert render.sets_referenced(plan.chains.values()) <= after_create
            assert not (plan.destroy_sets & render.sets_referenced(plan.chains.values()))
            plan.apply_to(dp)
    state.plan().apply_to(dp)
    fresh = EnforcerState("n1", namer)
    for op in sequence:
        apply_op(fresh, op)
    want = fresh.desired()
    assert dp.sets == want.sets
    assert dp.chains == want.chains
    assert state.desired().sets == want.sets


def test_an_ip_stays_while_any_member_contributes_it() -> None:
    state = EnforcerState("n1", namer)
    state.upsert_endpoint(ENDPOINTS[0])
    state.upsert_policy(POLICIES[0])
    state.upsert_membership(APPLY_UIDS[0], "pod/ns/a", ["10.0.0.1"])
    state.upsert_membership(PEERS[0], "pod/x/old", ["10.1.1.1"])
    state.upsert_membership(PEERS[0], "pod/y/new", ["10.1.1.1"])  # IP reused
    plan = state.plan()
    name = namer(PEERS[0])
    assert plan.create_sets == {name: {"10.1.1.1"}}
    state.delete_membership(PEERS[0], "pod/x/old")
    plan = state.plan()
    assert not plan.remove and not plan.add
    state.delete_membership(PEERS[0], "pod/y/new")
    plan = state.plan()
    assert plan.remove == {name: {"10.1.1.1"}}


def test_set_is_destroyed_only_when_no_chain_refers_to_it() -> None:
    state = EnforcerState("n1", namer)
    state.upsert_endpoint(ENDPOINTS[0])
    state.upsert_policy(POLICIES[0])
    state.upsert_membership(APPLY_UIDS[0], "pod/ns/a", ["10.0.0.1"])
    first = state.plan()
    name = namer(PEERS[0])
    assert name in first.create_sets
    assert name in render.sets_referenced(first.chains.values())
    state.delete_policy("p1")
    second = state.plan()
    assert second.destroy_sets == {name}
    assert name not in render.sets_referenced(second.chains.values())


def test_sets_are_only_programmed_for_policies_applying_here() -> None:
    state = EnforcerState("n1", namer)
    state.upsert_policy(POLICIES[0])
    state.upsert_membership(PEERS[0], "pod/x/y", ["10.1.1.1"])
    state.upsert_membership(APPLY_UIDS[0], "pod/elsewhere/z", ["10.2.2.2"])
    assert state.plan().create_sets == {}


@given(st.integers(0, 2**32 - 1), st.integers(0, 32), st.booleans())
def test_fast_member_parsing_equals_ipaddress(value: int, prefix: int, bare: bool) -> None:
    import ipaddress

    addr = str(ipaddress.IPv4Address(value))
    text = addr if bare else f"{addr}/{prefix}"
    net = ipaddress.ip_network(text, strict=False)
    if net.prefixlen == 0:
        want = {"0.0.0.0/1", "128.0.0.0/1"}
    elif net.prefixlen == 32:
        want = {str(net.network_address)}
    else:
        want = {str(net)}
    assert set_members([text]) == want


def test_members_of_one_family_with_zero_prefix_split() -> None:
    assert set_members(["0.0.0.0/0", "fd00::/8", "10.0.0.1/32", "10.1.2.3/16"]) == {
        "0.0.0.0/1", "128.0.0.0/1", "10.0.0.1", "10.1.0.0/16"}
    assert set_members(["fd00::1", "10.0.0.1"], family=6) == {"fd00::1"}


POLICY_YAML = """
apiVersion: projectcalico.org/v3
kind: Tier
metadata: {name: security}
spec: {order: 100, defaultAction: Pass}
---
apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata: {name: security.guard}
spec:
  tier: security
  order: 1
  selector: all()
  types: [Egress]
  egress:
  - action: Deny
    protocol: TCP
    destination: {nets: [10.99.0.0/16]}
---
apiVersion: projectcalico.org/v3
kind: NetworkPolicy
metadata: {name: web, namespace: shop}
spec:
  order: 10
  selector: app == 'web'
  types: [Egress]
  egress:
  - action: Allow
    protocol: TCP
    destination: {selector: role == 'api', ports: [443, "8000:8100"]}
  - action: Allow
    destination: {domains: [api.example.com]}
"""


def test_compiled_model_policies_order_across_tiers_and_use_compile_uids() -> None:
    objects = load(POLICY_YAML)
    compiled = [compile_object(o) for o in objects]
    tier, guard, web = compiled
    assert isinstance(tier, CompiledTier) and tier.default_action == "Pass"
    assert isinstance(web, CompiledPolicy) and isinstance(guard, CompiledPolicy)
    expected = pcompile.policy_selectors(objects[2])
    assert web.applies_uid == expected.applies_to.uid
    assert web.rules[0].dst_uid == expected.egress[0].destination.selector.uid  # type: ignore[union-attr]
    assert web.rules[0].spec.destination.ports == (PortRange(443, 443), PortRange(8000, 8100))
    # domains: the rule matches the domain set that DNS answers fill
    assert web.rules[1].spec.never is None and web.rules[1].domains == ("api.example.com",)
    assert web.rules[1].dst_uid == domain_uid(["API.example.com."])
    state = EnforcerState("n1", namer)
    state.upsert_tier(tier)
    state.upsert_policy(guard)
    state.upsert_policy(web)
    labels = {"app": "web", "projectcalico.org/namespace": "shop"}
    state.upsert_endpoint(LocalEndpoint("pod/shop/a", "workload", "vetha", ("10.0.0.1",),
                                        labels=labels))
    assert [p.key for p in state.applying("pod/shop/a")] == [guard.key, web.key]
    # the namespace scoping is part of what a policy applies to: not in shop, not applying
    state.upsert_endpoint(LocalEndpoint("pod/shop/a", "workload", "vetha", ("10.0.0.1",),
                                        labels={**labels, "projectcalico.org/namespace": "x"}))
    assert [p.key for p in state.applying("pod/shop/a")] == [guard.key]
    state.upsert_endpoint(LocalEndpoint("pod/shop/a", "workload", "vetha", ("10.0.0.1",),
                                        labels=labels))
    (spec,) = state.endpoint_specs()
    assert [t.name for t in spec.tiers] == ["security", "default"]
    assert spec.tiers[0].default_action == "Pass"


def test_record_sink_fast_paths_agree_with_full_decoding_and_reject_bad_records() -> None:
    import orjson

    from enforcers.engine import RecordSink
    from enforcers.metrics import EnforcerMetrics
    from topics import codec
    from topics.records import EndpointRecord, MembershipRecord

    rec = MembershipRecord("s:abc", "pod/ns/a", "ns", "n1", "vetha", ("10.0.0.1",), 5.0)
    fast = EnforcerState("n1", namer)
    slow = EnforcerState("n1", namer)
    fast_sink = RecordSink(fast, EnforcerMetrics())
    fast_sink.message("memberships", rec.key.encode(), codec.encode(rec))
    RecordSink(slow, EnforcerMetrics()).membership(rec.key, rec)
    assert fast.members == slow.members and fast.observed == slow.observed
    fast_sink.message("memberships", rec.key.encode(), None)  # tombstone
    assert fast.members == {}

    bad = dict(rec.to_dict(), ips=["10.0.0.300"])
    fast_sink.message("memberships", rec.key.encode(), orjson.dumps(bad))
    assert fast_sink.metrics.rejected.value == 1 and fast.members == {}
    fast_sink.message("memberships", rec.key.encode(), orjson.dumps({"v": 99}))
    assert fast_sink.metrics.rejected.value == 2

    here = EndpointRecord("pod", "ns", "a", "n1", "vetha", ("10.0.0.1",), {}, None,
                          "kubernetes", 1.0)
    there = EndpointRecord("pod", "ns", "b", "n2", "vethb", ("10.0.0.2",), {}, None,
                           "kubernetes", 1.0)
    for ep in (here, there):
        fast_sink.message("endpoints", ep.key.encode(), codec.encode(ep))
    assert set(fast.endpoints) == {"pod/ns/a"}
    moved = EndpointRecord("pod", "ns", "a", "n2", "vetha", ("10.0.0.1",), {}, None,
                           "kubernetes", 2.0)
    fast_sink.message("endpoints", moved.key.encode(), codec.encode(moved))
    assert fast.endpoints == {}


def test_restart_swaps_changed_sets_in_and_never_empties_one() -> None:
    from enforcers.engine import DryRunIptables, Programmer
    from enforcers.ipsets import DryRunIpsets

    def build(peer_ips: list[str]) -> EnforcerState:
        state = EnforcerState("n1", namer)
        state.upsert_endpoint(ENDPOINTS[0])
        state.upsert_policy(POLICIES[0])
        state.upsert_policy(policy("p9", APPLY[0], order=20, peers=(PEERS[1],)))
        state.upsert_membership(APPLY_UIDS[0], "pod/ns/a", ["10.0.0.1"])
        state.upsert_membership(PEERS[0], "pod/x/y", peer_ips)
        state.upsert_membership(PEERS[1], "pod/x/z", ["10.7.7.7"])
        return state

    ipsets, iptables = DryRunIpsets(), DryRunIptables()
    Programmer(ipsets, iptables).apply(build(["10.1.1.1"]).plan())
    ipsets.create("pc-stale", "inet", "hash:net")  # left by an older run
    before = len(ipsets.operations)
    restarted = Programmer(ipsets, iptables)
    result = restarted.start(build(["10.1.1.1", "10.2.2.2"]))
    ops = ipsets.operations[before:]
    changed, same = namer(PEERS[0]), namer(PEERS[1])
    assert ("swap", "pt-" + changed[3:], changed) in ops or any(
        op[0] == "swap" and changed in (op[1], op[2]) for op in ops)
    assert not any(op[0] in ("flush", "del") for op in ops)
    assert not any(same in (op[1], op[2]) for op in ops if op[0] != "destroy")
    assert ("destroy", "pc-stale", None) in ops
    assert ipsets.list_sets()[changed] == {"10.1.1.1", "10.2.2.2"}
    assert result.chains_written == 0  # same rules: nothing rewritten


LOCAL_KEYS = {"pod/ns/a", "pod/ns/b", "hostendpoint//n1"}


def upsert_pruned(state: EnforcerState, arg: object) -> None:
    """A membership as the engine takes it on node n1: pruning what no local rule uses."""
    uid, key, ips = arg  # type: ignore[misc]
    node = "n1" if key in LOCAL_KEYS else "n2"
    state.upsert_membership(uid, key, ips, node=node, prune=True)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(ops, max_size=40))
@example([  # a peer's memberships arrive before the policy that uses them
    ("member", (PEERS[0], "pod/other/x", ["10.0.0.9"])), ("policy", POLICIES[0]),
    ("endpoint", ENDPOINTS[0]), ("member", (APPLY_UIDS[0], "pod/ns/a", ["10.0.0.1"])),
])
@example([  # ... and again after the only policy using them was deleted and came back
    ("policy", POLICIES[0]), ("endpoint", ENDPOINTS[0]),
    ("member", (APPLY_UIDS[0], "pod/ns/a", ["10.0.0.1"])), ("unpolicy", "p1"),
    ("member", (PEERS[0], "pod/other/x", ["10.0.0.9"])), ("plan", None),
    ("policy", POLICIES[0]),
])
def test_pruning_with_rereads_equals_keeping_everything(sequence: list) -> None:
    """Dropping what no rule uses, and re-reading when that changes, loses nothing."""
    state = EnforcerState("n1", namer)
    dp = Dataplane()
    history: list[tuple[str, object]] = []

    def apply_pruned(op: tuple[str, object]) -> None:
        kind, arg = op
        if kind == "member":
            upsert_pruned(state, arg)
        else:
            apply_op(state, op)

    for op in sequence:
        apply_pruned(op)
        if op[0] in ("member", "unmember"):
            history.append(op)
        if state.needs_reread:  # what the engine does: read the memberships topic again
            for old in history:
                apply_pruned(old)
            state.reread_done()
        if op[0] == "plan":
            state.plan().apply_to(dp)
    state.plan().apply_to(dp)
    full = EnforcerState("n1", namer)
    for op in sequence:
        apply_op(full, op)
    want = full.desired()
    assert dp.sets == want.sets
    assert dp.chains == want.chains
    assert state.membership_count() <= full.membership_count()


# Incremental rendering: after every plan, the chains equal a full render from scratch.
MORE_POLICIES = [
    *POLICIES,
    policy("p2", APPLY[1], tier="sec", order=5, peers=(PEERS[1],)),  # p2 moves tier
    policy("p3", APPLY[2], tier="sec", peers=(PEERS[0],), action="Deny"),  # p3: rules only
    CompiledPolicy("p3", "sec", (10.0, "p3"), APPLY[2], False, ()),  # p3: ingress only
    policy("p4", APPLY[0], tier="undefined", order=2, peers=(PEERS[2],)),
]
MORE_ENDPOINTS = [
    *ENDPOINTS,
    LocalEndpoint("pod/ns/b", "workload", "vetha", ("10.0.0.2",), labels=DB),  # a's interface
    LocalEndpoint("pod/ns/a", "workload", "vetha", ("10.0.0.7",), labels=WEB),  # new IP only
    LocalEndpoint("pod/ns/b", "workload", "vethb", ("10.0.0.2",)),  # no labels any more
    LocalEndpoint("hostendpoint//n1", "host", "*", ("192.168.1.1",)),
]
more_ops = st.one_of(
    ops,
    st.tuples(st.just("policy"), st.sampled_from(MORE_POLICIES)),
    st.tuples(st.just("unpolicy"), st.just("p4")),
    st.tuples(st.just("endpoint"), st.sampled_from(MORE_ENDPOINTS)),
    st.tuples(st.just("unendpoint"), st.just("hostendpoint//n1")),
    st.tuples(st.just("forget"), st.none()),
    st.tuples(st.just("plan"), st.none()),
)
# a node with endpoints that policies apply to, before the random changes start
SEED: list[tuple[str, object]] = [
    ("tier", TIERS[0]), *(("policy", p) for p in MORE_POLICIES[:3]),
    ("policy", MORE_POLICIES[-1]), *(("endpoint", e) for e in ENDPOINTS[:3]),
    *(("member", (uid, key, ["10.0.0.1"])) for uid in APPLY_UIDS for key in sorted(LOCAL_KEYS)),
    ("member", (PEERS[0], "pod/other/x", ["10.0.0.9"])), ("plan", None),
]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.booleans(), st.lists(more_ops, max_size=40))
@example(True, [("unmember", (APPLY_UIDS[0], "pod/ns/a")), ("plan", None),  # leaves a selector
                ("member", (APPLY_UIDS[0], "pod/ns/a", ["10.0.0.1"]))])  # and joins again
def test_every_incremental_plan_renders_exactly_what_a_full_render_does(
    seeded: bool, sequence: list
) -> None:
    state = EnforcerState("n1", namer)
    dp = Dataplane()
    for op in [*(SEED if seeded else []), *sequence, ("plan", None)]:
        if op[0] == "forget":  # a restart: the programmer's start() programs it anew
            state.forget_programmed()
            dp = Dataplane()
            continue
        apply_op(state, op)
        if op[0] != "plan":
            continue
        plan = state.plan()
        plan.apply_to(dp)
        render.render_policy.cache_clear()  # the oracle shares no rendered piece
        render.endpoint_chain.cache_clear()
        want = state.desired()
        assert plan.chains == want.chains
        assert {n: c.hashes for n, c in plan.chains.items()} == {
            n: c.hashes for n, c in want.chains.items()}
        assert set(dp.sets) == set(want.sets)
        again = state.plan()
        assert again.chains is plan.chains  # nothing changed: the very same ruleset


# Membership pruning: a selector no local rule needs leaves the desired state and the
# kernel, and comes back complete when it is needed again.


def oracle_sets(sequence: list) -> dict[str, set[str]]:
    """The sets a node must have, from scratch over the final inputs (no EnforcerState)."""
    policies: dict[str, CompiledPolicy] = {}
    endpoints: dict[str, LocalEndpoint] = {}
    members: dict[tuple[str, str], list[str]] = {}
    for kind, arg in sequence:
        if kind == "policy":
            policies[arg.key] = arg
        elif kind == "unpolicy":
            policies.pop(arg, None)
        elif kind == "endpoint":
            endpoints[arg.key] = arg
        elif kind == "unendpoint":
            endpoints.pop(arg, None)
        elif kind == "member":
            uid, key, ips = arg
            members[(uid, key)] = ips
        elif kind == "unmember":
            members.pop(arg, None)
    needed = {
        uid
        for p in policies.values() if p.egress
        if any(p.applies.matches(ep.labels) for ep in endpoints.values())
        for rule in p.rules if rule.spec.never is None
        for uid in rule.uids()
    }
    return {
        namer(uid): set_members(ip for (u, _k), ips in members.items() if u == uid for ip in ips)
        for uid in needed
    }


prune_ops = st.one_of(ops, st.tuples(st.just("restart"), st.none()))


# a node where policies apply and their peers have members, before the random changes
PRUNE_SEED: list[tuple[str, object]] = [
    *(("policy", p) for p in POLICIES[:3]), *(("endpoint", e) for e in ENDPOINTS[:3]),
    *(("member", (uid, key, ["10.0.0.1"])) for uid in APPLY_UIDS for key in sorted(LOCAL_KEYS)),
    *(("member", (uid, "pod/other/x", [ip])) for uid, ip in zip(PEERS, IPS[2:5], strict=True)),
    ("plan", None),
]


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.booleans(), st.lists(prune_ops, max_size=50))
@example(True, [("unpolicy", "p1"), ("unpolicy", "p2"), ("plan", None)])
@example(True, [("unendpoint", "pod/ns/a"), ("plan", None), ("unendpoint", "pod/ns/b")])
@example(False, [  # the only policy needing a set goes, members change meanwhile, it returns
    ("policy", POLICIES[0]), ("endpoint", ENDPOINTS[0]),
    ("member", (APPLY_UIDS[0], "pod/ns/a", ["10.0.0.1"])),
    ("member", (PEERS[0], "pod/other/x", ["10.0.0.9"])), ("plan", None),
    ("unpolicy", "p1"), ("plan", None),
    ("member", (PEERS[0], "pod/ns/b", ["10.9.0.0/16"])), ("unmember", (PEERS[0], "pod/other/x")),
    ("plan", None), ("policy", POLICIES[0]), ("plan", None),
])
@example(False, [  # the last local endpoint using a set leaves, then another one needs it
    ("policy", POLICIES[0]), ("endpoint", ENDPOINTS[0]),
    ("member", (APPLY_UIDS[0], "pod/ns/a", ["10.0.0.1"])),
    ("member", (PEERS[0], "pod/other/x", ["10.0.0.9"])), ("plan", None),
    ("unendpoint", "pod/ns/a"), ("plan", None), ("member", (PEERS[0], "pod/y/z", ["10.0.0.2"])),
    ("endpoint", ENDPOINTS[1]), ("member", (APPLY_UIDS[0], "pod/ns/b", ["10.0.0.2"])),
])
def test_programmed_sets_are_what_local_rules_need_after_any_changes(
    seeded: bool, sequence: list
) -> None:
    """Through the real programmer (dry run), with pruning and re-reads as the engine does:
    the kernel's sets equal a from-scratch computation over the final inputs, no set is
    kept that no programmed rule refers to, and only needed selectors keep contents."""
    from enforcers.engine import DryRunIptables, Programmer
    from enforcers.ipsets import DryRunIpsets

    state = EnforcerState("n1", namer)
    ipsets, iptables = DryRunIpsets(), DryRunIptables()
    programmer = Programmer(ipsets, iptables)
    history: list[tuple[str, object]] = []

    def take(op: tuple[str, object]) -> None:
        kind, arg = op
        if kind == "member":
            upsert_pruned(state, arg)
        elif kind == "restart":
            programmer.start(state)
        elif kind == "plan":
            plan = state.plan()
            programmer.apply(plan)
            assert render.sets_referenced(programmer.chains.values()) <= set(ipsets.sets)
        else:
            apply_op(state, op)

    sequence = [*(PRUNE_SEED if seeded else []), *sequence]
    for op in sequence:
        take(op)
        if op[0] in ("member", "unmember"):
            history.append(op)
        if state.needs_reread:
            for old in history:
                take(old)
            state.reread_done()
    programmer.apply(state.plan())
    want = oracle_sets(sequence)
    assert ipsets.list_sets() == want
    assert render.sets_referenced(programmer.chains.values()) == set(want)
    assert {namer(uid) for uid in state.contents} == set(want)
    assert iptables.actual.chains == {n: c.hashes for n, c in state.desired().chains.items()}


def test_a_plan_names_the_chains_it_changed_and_the_programmer_writes_only_those() -> None:
    from enforcers.engine import DryRunIptables, Programmer
    from enforcers.ipsets import DryRunIpsets

    state = EnforcerState("n1", namer)
    state.upsert_policy(POLICIES[0])
    for i in range(50):
        key = f"pod/ns/e{i}"
        state.upsert_endpoint(LocalEndpoint(key, "workload", f"veth{i}", (f"10.0.1.{i}",),
                                            labels=WEB))
        state.upsert_membership(APPLY_UIDS[0], key, [f"10.0.1.{i}"])
    iptables = DryRunIptables()
    programmer = Programmer(DryRunIpsets(), iptables)
    programmer.start(state)
    edited = policy("p1", APPLY[0], peers=(PEERS[0],), action="Deny")
    state.upsert_policy(edited)
    plan = state.plan()
    assert plan.changed_chains == {render.policy_chain("p1")}
    assert programmer.apply(plan).chains_written == 1
    assert iptables.restores[-1].count(":pc-") == 1
    assert state.plan().chains_unchanged
    state.delete_endpoint("pod/ns/e7")  # its chain goes, and the dispatch chains change
    plan = state.plan()
    assert render.workload_chain("veth7") in plan.changed_chains  # type: ignore[operator]
    programmer.apply(plan)
    assert iptables.actual.chains == {n: c.hashes for n, c in state.desired().chains.items()}


def test_a_fetched_run_of_memberships_takes_the_good_and_rejects_the_bad_with_where() -> None:
    from types import SimpleNamespace

    import orjson

    from enforcers.engine import RecordSink
    from enforcers.metrics import EnforcerMetrics
    from topics import codec
    from topics.records import MembershipRecord

    good = MembershipRecord("s:abc", "pod/ns/a", "ns", "n1", "vetha", ("10.0.0.1",), 5.0)
    other = MembershipRecord("s:abc", "pod/ns/b", "ns", "n2", "vethb", ("10.0.0.2",), 6.0)
    rejected: list[tuple[str, int, int]] = []
    state = EnforcerState("n1", namer)
    sink = RecordSink(state, EnforcerMetrics(),
                      on_reject=lambda where, *_: rejected.append(where))
    run = [
        SimpleNamespace(key=good.key.encode(), value=codec.encode(good), offset=7),
        SimpleNamespace(key=good.key.encode(), value=orjson.dumps(  # owned: node n1
            dict(good.to_dict(), ips=["10.0.0.300"])), offset=8),
        SimpleNamespace(key="s:abc|pod/ns/é".encode(), value=None, offset=9),  # slow path
        SimpleNamespace(key=other.key.encode(), value=codec.encode(other), offset=10),
    ]
    assert sink.memberships("t.memberships", 2, run) == 4
    assert state.membership("s:abc", "pod/ns/a") == ("10.0.0.1",)
    assert state.membership("s:abc", "pod/ns/b") == ("10.0.0.2",)
    assert sink.metrics.rejected.value == 1 and rejected == [("t.memberships", 2, 8)]
    assert state.observed == [5.0, 6.0]


def test_a_policy_with_rules_enforced_fail_closed_is_logged_with_how(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from enforcers.engine import RecordSink
    from enforcers.metrics import EnforcerMetrics
    from topics.records import PolicyRecord

    doc = {
        "apiVersion": "projectcalico.org/v3", "kind": "NetworkPolicy",
        "metadata": {"name": "p", "namespace": "shop"},
        "spec": {"selector": "all()", "types": ["Egress"], "egress": [
            {"action": "Deny", "destination": {"services": {"name": "db"}}},
            {"action": "Allow", "protocol": "TCP", "destination": {"ports": ["http"]}},
            {"action": "Allow"},
        ]},
    }
    rec = PolicyRecord(kind="NetworkPolicy", namespace="shop", name="p", document=doc,
                       actor="test", applied_at=1.0, observed_at=1.0)
    sink = RecordSink(EnforcerState("n1", namer), EnforcerMetrics())
    with caplog.at_level(logging.WARNING, logger="enforcers.engine"):
        sink.policy(rec.key, rec)
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "policy NetworkPolicy/shop/p, egress rule 0: services not enforced yet: this Deny rule"
        " is enforced as a Deny of all that its other conditions match (fail closed)",
        "policy NetworkPolicy/shop/p, egress rule 1: named ports not enforced yet: this Allow"
        " rule never matches (fail closed)",
    ]


def test_a_refused_dns_capture_rule_drops_the_capture_not_the_node() -> None:
    """A kernel without the NFQUEUE target refuses pc-dns: the node is programmed all the
    same, without capture (domain rules then match nothing: fail closed)."""
    capture = render.DnsCapture(100, ("10.96.0.10", "fd00::10"))
    state = EnforcerState("n1", namer, dns=capture)
    state.upsert_endpoint(LocalEndpoint("pod/shop/a", "workload", "cali1", ("10.0.0.1",)))
    chains = state.plan().chains
    assert render.DNS_CHAIN in chains
    queued = [r for r in chains[render.DNS_CHAIN].rules if isinstance(r.target, render.Queue)]
    assert len(queued) == 2  # UDP and TCP from the IPv4 server only
    assert chains[render.FORWARD_CHAIN].rules[0].target == render.Jump(render.DNS_CHAIN)
    how = state.reject_rule(render.DNS_CHAIN, 1, "No chain/target/match by that name")
    assert how is not None and "fail closed" in how
    plan = state.plan()
    assert render.DNS_CHAIN not in plan.chains and plan.changed_chains is not None
    assert render.DNS_CHAIN in plan.changed_chains
    assert all(r.target != render.Jump(render.DNS_CHAIN)
               for r in plan.chains[render.FORWARD_CHAIN].rules)
    assert state.desired().chains == dict(plan.chains)
