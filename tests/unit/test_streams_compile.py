"""Compile: routing of selectors to partitions, reference counts, idempotent statuses."""

from __future__ import annotations

from typing import Any

import pytest

from policy.load import PolicyError
from policy.selectors import parse
from streams.compile import (
    CompileState,
    selector_message_key,
    selector_partitions,
    split_selector_message_key,
)
from streams.membership import PartitionState
from topics.partitioner import partition_for_key
from topics.records import EndpointRecord, PolicyRecord, RecordError, split_profile_key

P = 8


def gnp(name: str, selector: str, peer: str | None = None) -> PolicyRecord:
    spec: dict[str, Any] = {"selector": selector, "types": ["Egress"]}
    if peer is not None:
        spec["egress"] = [{"action": "Allow", "destination": {"selector": peer}}]
    doc = {"apiVersion": "projectcalico.org/v3", "kind": "GlobalNetworkPolicy",
           "metadata": {"name": name}, "spec": spec}
    return PolicyRecord(kind="GlobalNetworkPolicy", namespace=None, name=name, document=doc,
                        actor="t", applied_at=1.0, observed_at=5.0)


def np(ns: str, name: str, selector: str) -> PolicyRecord:
    doc = {"apiVersion": "projectcalico.org/v3", "kind": "NetworkPolicy",
           "metadata": {"name": name, "namespace": ns},
           "spec": {"selector": selector, "types": ["Egress"]}}
    return PolicyRecord(kind="NetworkPolicy", namespace=ns, name=name, document=doc,
                        actor="t", applied_at=1.0, observed_at=5.0)


def test_namespaced_selector_goes_to_its_namespace_partition_only() -> None:
    sel = parse("app == 'x' && projectcalico.org/namespace == 'shop'")
    assert selector_partitions(sel, P) == ("shop", (partition_for_key("shop", P),))
    two = parse("projectcalico.org/namespace in {'a', 'b'}")
    assert selector_partitions(two, P) == (
        None, tuple(sorted({partition_for_key("a", P), partition_for_key("b", P)}))
    )
    assert selector_partitions(parse("app == 'x'"), P) == (None, tuple(range(P)))


def test_namespaced_policy_registers_only_in_its_partition() -> None:
    state = CompileState(source=3, partitions=P)
    regs = state.apply_policy("NetworkPolicy/shop/p", np("shop", "p", "app == 'x'"), 5.0)
    assert [r.partition for r in regs] == [partition_for_key("shop", P)]
    (reg,) = regs
    assert reg.record is not None and reg.record.active and reg.record.namespace == "shop"
    assert reg.key == selector_message_key(reg.uid, 3)
    assert reg.record.observed_at == 5.0


def test_reference_counts_keep_shared_selectors_until_the_last_policy_goes() -> None:
    state = CompileState(source=0, partitions=2)
    first = state.apply_policy("GlobalNetworkPolicy//a", gnp("a", "app == 'x'"), 1.0)
    assert {(r.partition, r.record is not None) for r in first} == {(0, True), (1, True)}
    again = state.apply_policy("GlobalNetworkPolicy//b", gnp("b", "app == 'x'"), 2.0)
    assert all(r.record is not None for r in again)
    still = state.apply_policy("GlobalNetworkPolicy//a", None, 3.0)
    assert still and all(r.record is not None for r in still)  # b still holds it
    gone = state.apply_policy("GlobalNetworkPolicy//b", None, 4.0)
    assert gone and all(r.record is None for r in gone)
    assert state.registrations(5.0) == []


def test_changing_a_policy_withdraws_its_old_selectors() -> None:
    state = CompileState(source=0, partitions=1)
    state.apply_policy("GlobalNetworkPolicy//a", gnp("a", "app == 'x'", "role == 'db'"), 1.0)
    regs = state.apply_policy("GlobalNetworkPolicy//a", gnp("a", "app == 'y'"), 2.0)
    status = {r.uid: r.record is not None for r in regs}
    assert status == {
        parse("app == 'x'").uid: False,
        parse("role == 'db'").uid: False,
        parse("app == 'y'").uid: True,
    }


def test_invalid_policy_changes_nothing() -> None:
    state = CompileState(source=0, partitions=1)
    state.apply_policy("GlobalNetworkPolicy//a", gnp("a", "app == 'x'"), 1.0)
    before = state.registrations(1.0)
    with pytest.raises(PolicyError):
        state.apply_policy("GlobalNetworkPolicy//a", gnp("a", "app === 'x'"), 2.0)
    assert state.registrations(1.0) == before
    with pytest.raises(RecordError):
        state.apply_policy("GlobalNetworkPolicy//zzz", gnp("a", "app == 'x'"), 2.0)


def test_selector_registered_by_two_compile_partitions_stays_until_both_withdraw() -> None:
    state = PartitionState()
    sel = parse("app == 'x'")
    ep = EndpointRecord(kind="hostendpoint", namespace=None, name="h", node="n", interface="eth0",
                        ips=("10.0.0.1",), labels={"app": "x"}, service_account=None,
                        source="inventory", observed_at=1.0)
    state.apply_endpoint(ep.key, ep)
    from topics.records import SelectorRecord

    rec = SelectorRecord(sel.uid, sel.canonical, None, True, 2.0)
    assert len(state.apply_selector(sel.uid, 0, rec)) == 1
    assert state.apply_selector(sel.uid, 1, rec) == []
    assert state.apply_selector(sel.uid, 0, None) == []
    (tomb,) = state.apply_selector(sel.uid, 1, None)
    assert tomb.record is None and tomb.key == f"{sel.uid}|hostendpoint//h"


def test_selector_uid_must_match_its_text() -> None:
    from topics.records import SelectorRecord

    state = PartitionState()
    sel = parse("app == 'x'")
    other = parse("app == 'y'")
    with pytest.raises(RecordError):
        state.apply_selector(other.uid, 0, SelectorRecord(other.uid, sel.canonical, None, True, 1))


def test_keys_round_trip() -> None:
    assert split_selector_message_key(selector_message_key("s:abc-_", 12)) == ("s:abc-_", 12)
    with pytest.raises(RecordError):
        split_selector_message_key("s:abc")
    assert split_profile_key("kns.shop") == ("shop", None)
    assert split_profile_key("ksa.shop.build.bot") == ("shop", "build.bot")
    with pytest.raises(RecordError):
        split_profile_key("ksa.shop")


def test_a_doubly_negated_selector_crosses_to_the_match_partition_with_felix_uid() -> None:
    """Calico keeps "!(!has(role))" as Not(Not(...)) (canonical "!!has(role)", Felix's uid),
    and "!!has(role)" would parse back to has(role): the registration carries text that
    parses back to the very selector, which the match partition accepts and matches."""
    state = CompileState(source=0, partitions=1)
    (reg,) = state.apply_policy("GlobalNetworkPolicy//a", gnp("a", "!(!has(role))"), 1.0)
    selector = parse("!(!has(role))")
    assert selector.canonical == "!!has(role)" and reg.uid == selector.uid
    assert reg.uid != parse("has(role)").uid
    assert reg.record is not None and parse(reg.record.selector) == selector
    members = PartitionState()
    ep = EndpointRecord(kind="hostendpoint", namespace=None, name="h", node="n", interface="eth0",
                        ips=("10.0.0.1",), labels={"role": "db"}, service_account=None,
                        source="inventory", observed_at=1.0)
    members.apply_endpoint(ep.key, ep)
    (added,) = members.apply_selector(reg.uid, 0, reg.record)
    assert added.key == f"{reg.uid}|hostendpoint//h" and added.record is not None
