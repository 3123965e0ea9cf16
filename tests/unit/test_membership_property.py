"""Incremental memberships equal the from-scratch oracle after any sequence of events.

Events are random endpoint, profile and policy changes (IP reuse across namespaces,
network sets, host endpoints, service accounts, namespaced and global policies); the
topics' partitions are processed in random interleavings, some events are delivered
twice (at-least-once), and some match partitions "crash" and are rebuilt from their
persisted state (restore + resync).
"""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streams.local import LocalProcessor
from streams.membership import PartitionState
from streams.oracle import compacted_payloads, oracle_memberships
from topics.records import EndpointRecord, MembershipRecord, PolicyRecord, ProfileRecord

NAMESPACES = ["a", "b", "c"]
ACCOUNTS = ["sa1", "sa2"]
IPS = ["10.0.0.1", "10.0.0.2", "10.0.0.3", "fd00::1"]
SELECTORS = [
    "",
    "all()",
    "app == 'x'",
    "app in {'x', 'y'}",
    "has(tier)",
    "!has(app)",
    "app != 'y' && has(env)",
    "env == 'x' || tier == 'y'",
    "pcns.team == 'x'",
    "pcsa.role == 'x'",
    "projectcalico.org/namespace == 'b'",
]
NS_SELECTORS = ["", "all()", "team == 'x'", "team != 'x'", "global()"]

labels_st = st.dictionaries(
    st.sampled_from(["app", "env", "tier"]), st.sampled_from(["x", "y"]), max_size=3
)
time_st = st.floats(min_value=1, max_value=2e9, allow_nan=False)


@st.composite
def endpoint_st(draw: st.DrawFn) -> tuple[str, EndpointRecord | None]:
    kind = draw(st.sampled_from(["pod", "pod", "pod", "networkset", "globalnetworkset",
                                 "hostendpoint", "vm"]))
    namespace = draw(st.sampled_from(NAMESPACES)) if kind in ("pod", "networkset") else None
    name = draw(st.sampled_from(["e1", "e2", "e3"]))
    key = f"{kind}/{namespace or ''}/{name}"
    if draw(st.integers(0, 5)) == 0:
        return key, None
    if kind in ("networkset", "globalnetworkset"):
        ips = draw(st.lists(st.sampled_from(["10.1.0.0/16", "192.168.0.0/24", "10.0.0.1"]),
                            max_size=2))
        node = interface = None
    else:
        ips = draw(st.lists(st.sampled_from(IPS), min_size=0, max_size=2))
        node = draw(st.sampled_from(["n1", "n2"]))
        interface = draw(st.sampled_from(["eth0", "cali1"]))
    return key, EndpointRecord(
        kind=kind,  # type: ignore[arg-type]
        namespace=namespace,
        name=name,
        node=node,
        interface=interface,
        ips=tuple(ips),
        labels=draw(labels_st),
        service_account=draw(st.sampled_from([None, *ACCOUNTS])) if kind == "pod" else None,
        source="kubernetes",
        observed_at=draw(time_st),
    )


@st.composite
def profile_st(draw: st.DrawFn) -> tuple[str, ProfileRecord | None]:
    namespace = draw(st.sampled_from(NAMESPACES))
    account = draw(st.sampled_from([None, *ACCOUNTS]))
    key = f"kns.{namespace}" if account is None else f"ksa.{namespace}.{account}"
    if draw(st.integers(0, 4)) == 0:
        return key, None
    label = "team" if account is None else "role"
    labels = draw(st.dictionaries(st.just(label), st.sampled_from(["x", "y"])))
    return key, ProfileRecord(
        kind="namespace" if account is None else "serviceaccount",
        namespace=namespace,
        name=account,
        labels=labels,
        observed_at=draw(time_st),
    )


@st.composite
def rule_st(draw: st.DrawFn) -> dict[str, Any]:
    destination: dict[str, Any] = {}
    if draw(st.booleans()):
        destination["selector"] = draw(st.sampled_from(SELECTORS[1:]))
    if draw(st.booleans()):
        destination["namespaceSelector"] = draw(st.sampled_from(NS_SELECTORS[1:]))
    if draw(st.integers(0, 3)) == 0:
        destination["notSelector"] = draw(st.sampled_from(SELECTORS[1:]))
    return {"action": "Allow", "destination": destination}


@st.composite
def policy_st(draw: st.DrawFn) -> tuple[str, PolicyRecord | None]:
    is_global = draw(st.booleans())
    name = draw(st.sampled_from(["p1", "p2", "p3"]))
    namespace = None if is_global else draw(st.sampled_from(NAMESPACES))
    kind = "GlobalNetworkPolicy" if is_global else "NetworkPolicy"
    key = f"{kind}/{namespace or ''}/{name}"
    if draw(st.integers(0, 4)) == 0:
        return key, None
    metadata: dict[str, Any] = {"name": name}
    spec: dict[str, Any] = {"selector": draw(st.sampled_from(SELECTORS)), "types": ["Egress"]}
    if namespace is not None:
        metadata["namespace"] = namespace
    elif draw(st.booleans()):
        spec["namespaceSelector"] = draw(st.sampled_from(NS_SELECTORS[1:4]))
    spec["egress"] = draw(st.lists(rule_st(), max_size=2))
    document = {"apiVersion": "projectcalico.org/v3", "kind": kind,
                "metadata": metadata, "spec": spec}
    return key, PolicyRecord(
        kind=kind, namespace=namespace, name=name, document=document,
        actor="test", applied_at=1.0, observed_at=draw(time_st),
    )


event_st = st.one_of(
    st.tuples(st.just("endpoint"), endpoint_st()),
    st.tuples(st.just("profile"), profile_st()),
    st.tuples(st.just("policy"), policy_st()),
)


def rebuilt(state: PartitionState) -> PartitionState:
    """A crashed-and-restarted partition: state restored from its tables, then resynced."""
    fresh = PartitionState()
    fresh.restore(
        endpoints=state.endpoints.values(),
        profiles=state.profiles.values(),
        selectors=[
            (uid, source, selector.canonical)
            for uid, (selector, sources) in state.selectors.items()
            for source in sources
        ],
        members=state.members.values(),
    )
    return fresh


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    events=st.lists(event_st, min_size=8, max_size=50),
    partitions=st.sampled_from([1, 2, 3]),
    data=st.data(),
)
def test_incremental_equals_oracle(
    events: list[tuple[str, tuple[str, Any]]], partitions: int, data: st.DataObject
) -> None:
    proc = LocalProcessor(partitions)
    endpoints: dict[str, EndpointRecord] = {}
    profiles: dict[str, ProfileRecord] = {}
    policies: dict[str, PolicyRecord] = {}
    for topic, (key, record) in events:
        final = {"endpoint": endpoints, "profile": profiles, "policy": policies}[topic]
        if record is None:
            final.pop(key, None)
        else:
            final[key] = record
        times = 2 if data.draw(st.integers(0, 9)) == 0 else 1  # at-least-once duplicates
        for _ in range(times):
            getattr(proc, f"publish_{topic}")(key, record)
        # process a random number of queue heads, in a random order
        for _ in range(data.draw(st.integers(0, 3))):
            pending = proc.pending()
            if not pending:
                break
            proc.step(data.draw(st.sampled_from(pending)))
        if data.draw(st.integers(0, 14)) == 0:
            p = data.draw(st.integers(0, partitions - 1))
            proc.match[p] = rebuilt(proc.match[p])
            proc.emit(proc.match[p].resync(0.0))
    proc.drain()
    expected = oracle_memberships(endpoints.values(), profiles.values(), policies.values())
    assert compacted_payloads(proc.memberships) == expected
    # the members each partition believes it emitted are exactly what the topic holds
    believed = {k: v for state in proc.match for k, v in state.members.items()}
    assert believed == proc.memberships
    assert proc.rejected == []


@settings(max_examples=40, deadline=None)
@given(events=st.lists(event_st, min_size=8, max_size=30))
def test_replay_gives_identical_memberships(events: list[tuple[str, tuple[str, Any]]]) -> None:
    """Processing the same inputs twice from scratch emits the same records (observed_at too)."""
    results = []
    for _ in range(2):
        proc = LocalProcessor(2)
        for topic, (key, record) in events:
            getattr(proc, f"publish_{topic}")(key, record)
        proc.drain()
        results.append(proc.memberships)
    assert results[0] == results[1]


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    events=st.lists(event_st, min_size=8, max_size=40),
    data=st.data(),
)
def test_republishing_suspects_repairs_a_topic_behind_the_local_table(
    events: list[tuple[str, tuple[str, Any]]], data: st.DataObject
) -> None:
    """A worker killed after writing members locally but before producing them: the
    topic holds older values (or none, or keys the table already deleted) for some keys.
    Rebuilding from the table and republishing those suspect keys makes the topic exact."""
    proc = LocalProcessor(1)
    for topic, (key, record) in events:
        getattr(proc, f"publish_{topic}")(key, record)
    proc.drain()
    expected = compacted_payloads(proc.memberships)
    state = proc.match[0]
    endpoint_keys = sorted(state.endpoints) or ["pod/a/e1"]
    uids = sorted(state.selectors) or ["s:none"]
    candidates = sorted(set(proc.memberships) | {f"{u}|{e}" for u in uids for e in endpoint_keys})
    suspects = data.draw(st.lists(st.sampled_from(candidates), max_size=6, unique=True))
    for key in suspects:  # what the topic holds instead of the table's last write
        table = state.members.get(key)
        choice = data.draw(st.sampled_from(["absent", "stale", "kept"]))
        if choice == "absent":
            proc.memberships.pop(key, None)
        elif choice == "stale":
            uid, endpoint_key = key.split("|", 1)
            namespace = endpoint_key.split("/")[1] or None
            proc.memberships[key] = MembershipRecord(
                selector_uid=uid, endpoint_key=endpoint_key, namespace=namespace,
                node="old-node", interface=None, ips=("10.9.9.9",), observed_at=1.0,
            )
        elif table is not None:
            proc.memberships[key] = table
    fresh = rebuilt(state)
    proc.match[0] = fresh
    proc.emit(fresh.resync(0.0))
    proc.emit(fresh.republish(suspects, 0.0))
    assert compacted_payloads(proc.memberships) == expected
    assert fresh.members == proc.memberships
