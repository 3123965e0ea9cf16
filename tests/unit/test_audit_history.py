"""Replaying history to a time, against an oracle that applied each change as it happened;
`audit log` verbs, actors and diffs; explain and staged previews over a small world."""

from __future__ import annotations

import random
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

import policy
from enforcers.state import compile_object
from portcullis.audit.explain import World
from portcullis.audit.history import AuditState, Change, LogFilter, log_entries, state_at
from portcullis.audit.preview import Flow, preview
from streams.compile import policy_selector_refs
from topics.records import EndpointRecord, HistoryRecord, PolicyRecord, ProfileRecord

PARTITIONS = 3
KEYS = {
    "endpoints": ["pod/a/x", "pod/a/y", "hostendpoint//h"],
    "profiles": ["kns.a", "ksa.a.default"],
    "policies": ["Tier//t", "GlobalNetworkPolicy//g"],
}


def _record(topic: str, key: str, n: int) -> Any:
    if topic == "endpoints":
        kind, ns, name = key.split("/")
        return EndpointRecord(kind, ns or None, name, "node-1", "eth0",  # type: ignore[arg-type]
                              (f"10.0.0.{n % 250 + 1}",), {"n": str(n)}, None, "kubernetes",
                              float(n))
    if topic == "profiles":
        if key.startswith("ksa."):
            return ProfileRecord("serviceaccount", "a", "default", {"n": str(n)}, float(n))
        return ProfileRecord("namespace", "a", None, {"n": str(n)}, float(n))
    kind, _ns, name = key.split("/")
    doc = ({"apiVersion": "projectcalico.org/v3", "kind": "Tier", "metadata": {"name": name},
            "spec": {"order": n}} if kind == "Tier" else
           {"apiVersion": "projectcalico.org/v3", "kind": kind, "metadata": {"name": name},
            "spec": {"order": n, "selector": "all()", "types": ["Egress"]}})
    return PolicyRecord(kind, None, name, doc, f"user{n % 3}", float(n), float(n))


steps = st.lists(
    st.tuples(st.sampled_from(sorted(KEYS)), st.integers(0, 2), st.booleans(),
              st.sampled_from(["alice", "bob", "kubernetes"]), st.integers(0, 3)),
    min_size=1, max_size=40,
)


def _script(ops: list[tuple[str, int, bool, str, int]]) -> tuple[
    list[Change], list[float], list[dict[tuple[str, str], Any]]
]:
    """Changes as they would sit on the topics, instants after each step, and the oracle."""
    offsets = [0] * PARTITIONS
    changes: list[Change] = []
    instants: list[float] = []
    states: list[dict[tuple[str, str], Any]] = []
    current: dict[tuple[str, str], Any] = {}
    at = 1000.0
    for n, (topic, index, delete, actor, gap) in enumerate(ops):
        key = KEYS[topic][index % len(KEYS[topic])]
        at += gap  # several changes may share an instant (one published batch)
        record = None if delete else _record(topic, key, n)
        history = HistoryRecord(topic, key, "delete" if delete else "upsert", actor, "test", at,
                                None if record is None else record.to_dict())
        partition = hash(history.partition_key) % PARTITIONS
        changes.append(Change(history, partition, offsets[partition]))
        offsets[partition] += 1
        if record is None:
            current.pop((topic, key), None)
        else:
            current[(topic, key)] = record
        instants.append(at)
        states.append(dict(current))
    return changes, instants, states


def _flat(state: AuditState) -> dict[tuple[str, str], Any]:
    return {(t, k): r for t in KEYS for k, r in state.table(t).items()}


@settings(max_examples=150)
@given(steps, st.randoms(use_true_random=False))
def test_state_at_any_instant_equals_the_state_as_it_happened(
    ops: list[tuple[str, int, bool, str, int]], rnd: random.Random
) -> None:
    changes, instants, states = _script(ops)
    shuffled = list(changes)
    rnd.shuffle(shuffled)  # topics and partitions are read in any order
    for i, at in enumerate(instants):
        last_at_this_instant = i + 1 == len(instants) or instants[i + 1] != at
        if last_at_this_instant:
            assert _flat(state_at(shuffled, at)) == states[i]
    assert _flat(state_at(shuffled, instants[0] - 1)) == {}
    assert _flat(state_at(shuffled)) == states[-1]


@settings(max_examples=100)
@given(steps)
def test_the_log_has_every_change_with_its_actor_verb_and_a_diff(
    ops: list[tuple[str, int, bool, str, int]],
) -> None:
    changes, _instants, _states = _script(ops)
    entries = list(log_entries(changes))
    assert sorted((e.change.partition, e.change.offset, e.change.slot) for e in entries) == \
        sorted((c.partition, c.offset, c.slot) for c in changes)
    seen: dict[tuple[str, str], Change] = {}
    for entry in entries:
        before = seen.get(entry.change.slot)
        seen[entry.change.slot] = entry.change
        expected = ("deleted" if entry.change.history.change == "delete" else
                    "created" if before is None else
                    "recreated" if before.history.change == "delete" else "changed")
        assert entry.verb == expected
        assert entry.previous == (before.record if before else None)
        changed = (before.record if before else None) != entry.change.record
        assert bool(entry.diff) == (changed and not (
            before is None and entry.change.record is None))
    for actor in ("alice", "bob"):
        mine = list(log_entries(changes, LogFilter(actor=actor)))
        assert [e.change for e in mine] == [e.change for e in entries
                                            if e.change.history.actor == actor]


WORLD = """
apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata: {name: deny-prod}
spec:
  order: 2000
  selector: projectcalico.org/namespace == 'prod'
  types: [Egress]
---
apiVersion: projectcalico.org/v3
kind: NetworkPolicy
metadata: {name: web-out, namespace: prod}
spec:
  order: 10
  selector: app == 'web'
  types: [Egress]
  egress: [{action: Allow, protocol: TCP, destination: {ports: [443]}}]
---
apiVersion: projectcalico.org/v3
kind: StagedNetworkPolicy
metadata: {name: web-out, namespace: prod}
spec:
  stagedAction: Set
  order: 10
  selector: app == 'web'
  types: [Egress]
  egress: [{action: Allow, protocol: TCP, destination: {nets: [192.0.2.0/24], ports: [443]}}]
---
apiVersion: projectcalico.org/v3
kind: StagedGlobalNetworkPolicy
metadata: {name: deny-prod}
spec: {stagedAction: Delete}
"""


def _world() -> World:
    state = AuditState()
    for obj in policy.load(WORLD, "world.yaml"):
        state.policies[obj.key] = PolicyRecord(obj.kind, obj.namespace, obj.name,
                                               obj.to_document(), "alice", 1.0, 1.0)
    for name, ip, app in (("web", "10.0.0.1", "web"), ("db", "10.0.0.2", "db")):
        rec = EndpointRecord("pod", "prod", name, "n1", f"cali{name}", (ip,), {"app": app},
                             "default", "kubernetes", 1.0)
        state.endpoints[rec.key] = rec
    return World.of(state)


def test_staged_policies_are_never_enforced_but_explain_can_preview_them() -> None:
    world = _world()
    for obj in world.staged():
        assert compile_object(obj) is None
        record = world.state.policies[obj.key]
        assert policy_selector_refs(record, 3) == ()
    assert world.explain("prod/web", "198.51.100.7:443").verdict.action == "allow"
    staged = world.explain("prod/web", "198.51.100.7:443", staged=True)
    # the staged web-out only allows 192.0.2.0/24: it applies, no rule matches, and its tier
    # ends in Deny (deny-prod's deletion does not matter for web)
    assert (staged.verdict.action, staged.verdict.tier, staged.verdict.policy) == (
        "deny", "default", None)
    assert staged.applied == ("NetworkPolicy/prod/web-out",)
    assert world.explain("prod/db", "198.51.100.7:443").verdict.action == "deny"
    assert world.explain("prod/db", "198.51.100.7:443", staged=True).verdict.action == "allow"


def test_a_preview_names_the_endpoints_selected_and_the_flows_that_would_flip() -> None:
    world = _world()
    flows = [Flow("pod/prod/db", "198.51.100.7", 443, "TCP", 4),
             Flow("pod/prod/web", "192.0.2.9", 443, "TCP", 2),
             Flow("pod/prod/web", "198.51.100.7", 443, "TCP", 1)]
    by_key = {p.staged.key: p for p in preview(world, flows)}
    web = by_key["StagedNetworkPolicy/prod/web-out"]
    assert web.selected == ("pod/prod/web",)
    assert [(c.flow.dest_ip, c.now.action, c.staged.action) for c in web.changes] == [
        ("198.51.100.7", "allow", "deny")]  # 192.0.2.9 is allowed both ways
    drop = by_key["StagedGlobalNetworkPolicy//deny-prod"]
    assert drop.selected == ("pod/prod/db", "pod/prod/web")
    assert [(c.flow.source_endpoint, c.now.action, c.staged.action) for c in drop.changes] == [
        ("pod/prod/db", "deny", "allow"), ("pod/prod/web", "allow", "deny")]


@settings(max_examples=100)
@given(steps, st.randoms(use_true_random=False))
def test_reading_only_the_survivors_gives_the_same_state(
    ops: list[tuple[str, int, bool, str, int]], rnd: random.Random
) -> None:
    import orjson

    from portcullis.audit.read import Skipped, fast_at, latest_until

    changes, instants, _states = _script(ops)
    messages = []
    for c in sorted(changes, key=lambda c: (c.partition, c.offset)):
        data = c.history.to_dict()
        if rnd.random() < 0.3:  # another writer's field order: decoded the slow way
            data = dict(reversed(list(data.items())))
        value = orjson.dumps(data)
        assert fast_at(value) in (None, c.at)
        messages.append((f"{c.topic}.history", c.partition, c.offset, c.key.encode(), value))
    messages.insert(rnd.randrange(len(messages) + 1),
                    ("policies.history", 0, 999, b"Tier//t", b'{"v":1,"topic":"pol'))
    for at in [instants[0] - 1, *instants]:
        skipped = Skipped()
        got = state_at(latest_until(messages, at, skipped))
        assert _flat(got) == _flat(state_at(changes, at))
        assert len(skipped.lines) <= 1  # the malformed one, when it is the latest
