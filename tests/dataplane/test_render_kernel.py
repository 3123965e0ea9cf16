"""Every rule shape the enforcer can render loads into the real kernel.

A property over the whole space of Calico egress rules (protocols and notProtocol, ICMP and
notICMP, ipVersion, nets and notNets of both families, selectors and notSelectors, ports
and notPorts beyond one multiport's 15 slots, on both sides, every action) and every kind
of local endpoint (pods, a VM's taps, a VM enforcing itself, host endpoints on one or
every interface, with and without the default-allow profile, an IPv6 plane that drops
instead of enforcing): each random policy set goes through the enforcer's own path
(``policy.load_document``, the enforcer state, ``desired()``) for IPv4 and IPv6, and the
chains are loaded with real ``iptables-restore`` / ``ip6tables-restore`` into a namespace
of the test's, with the ipsets the rules name. The kernel must take every transaction, and
``iptables-save`` must then show exactly the rules we wrote (their hash comments). A rule
the kernel refuses would stall the whole node, so one example of it is a failure.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from enforcers import netns as netns_mod
from enforcers import render
from enforcers.ipsets import NetlinkIpsets, set_name
from enforcers.iptables import Iptables, IptablesError, parse_save
from enforcers.state import EnforcerState, LocalEndpoint, compile_object
from policy import compile as pcompile
from policy.load import load_document
from tests.dataplane.conftest import Netns, _require_root

NETNS_PREFIX = "pc-rk-"

NETS = ["10.1.0.0/16", "10.1.2.3/32", "0.0.0.0/0", "192.168.0.0/24", "10.0.0.0/8",
        "fd00::/64", "fd00:1::1/128", "::/0", "2001:db8::/32"]
SELECTORS = ["role == 'api'", "has(kind)", "all()", "role in {'a', 'b'}", "!has(x)"]
PORTS: list[int | str] = [22, 53, 80, 443, 6443, 8080, "1000:2000", "30000:32767", 9, 11,
                          12, 13, 14, 15, 16, 17, 18, 19, 20, 21]
PORT_PROTOCOLS = ["TCP", "UDP", "SCTP", "UDPLite", 6, 17]
OTHER_PROTOCOLS = ["ICMP", "ICMPv6", 1, 58, 47, 132, 255]
ENDPOINTS = [
    LocalEndpoint("pod/shop/a", "workload", "cali0123456789a", ("10.65.0.2", "fd65::2")),
    LocalEndpoint("pod/shop/b", "workload", "veth-b", ("10.65.0.3",)),
    LocalEndpoint("hostendpoint//n1-eth0", "host", "eth0", ("10.0.0.11",)),
    LocalEndpoint("hostendpoint//n1-auto-hep", "host", "*", ("10.0.0.11",), allow=True),
    LocalEndpoint("vm//vm-2", "workload", "tap0,tap1", ("10.20.0.2", "10.20.1.2")),
    LocalEndpoint("vm//n1", "guest", "eth1,eth2", ("10.30.0.1", "fd30::1")),
]


@st.composite
def entities(draw: st.DrawFn, with_ports: bool) -> dict[str, Any]:
    side: dict[str, Any] = {}
    for field in ("nets", "notNets"):
        nets = draw(st.lists(st.sampled_from(NETS), max_size=3, unique=True))
        if nets:
            side[field] = nets
    for field in ("selector", "notSelector"):
        selector = draw(st.none() | st.sampled_from(SELECTORS))
        if selector is not None:
            side[field] = selector
    if with_ports:
        for field in ("ports", "notPorts"):
            ports = draw(st.lists(st.sampled_from(PORTS), max_size=18, unique=True))
            if ports:
                side[field] = ports
    return side


@st.composite
def icmp_fields(draw: st.DrawFn) -> dict[str, int]:
    fields = {"type": draw(st.integers(0, 254))}
    if draw(st.booleans()):
        fields["code"] = draw(st.integers(0, 255))
    return fields


@st.composite
def rules(draw: st.DrawFn) -> dict[str, Any]:
    rule: dict[str, Any] = {"action": draw(st.sampled_from(["Allow", "Deny", "Pass", "Log"]))}
    protocol = draw(st.none() | st.sampled_from(PORT_PROTOCOLS + OTHER_PROTOCOLS))
    if protocol is not None:
        rule["protocol"] = protocol
    not_protocol = draw(st.none() | st.sampled_from(["TCP", "UDP", "ICMP", 17, 58]))
    if not_protocol is not None:
        rule["notProtocol"] = not_protocol
    version = draw(st.sampled_from([None, 4, 6]))
    if protocol in ("ICMP", 1):
        version = draw(st.sampled_from([None, 4]))
    elif protocol in ("ICMPv6", 58):
        version = draw(st.sampled_from([None, 6]))
    if not_protocol == "ICMP" and version == 6:
        version = None
    if protocol in ("ICMP", "ICMPv6", 1, 58):
        for field in ("icmp", "notICMP"):
            if draw(st.booleans()):
                rule[field] = draw(icmp_fields())
    if version is not None:
        rule["ipVersion"] = version
    with_ports = protocol in PORT_PROTOCOLS
    # a rule's CIDRs are all of one family (Calico's validation): that of ipVersion if set
    v6 = version == 6 if version is not None else draw(st.booleans())
    for side in ("source", "destination"):
        entity = draw(entities(with_ports))
        for field in ("nets", "notNets"):
            kept = [n for n in entity.pop(field, ()) if (":" in n) == v6]
            if kept:
                entity[field] = kept
        if entity:
            rule[side] = entity
    return rule


@st.composite
def policy_documents(draw: st.DrawFn) -> list[dict[str, Any]]:
    docs = []
    for i in range(draw(st.integers(1, 3))):
        docs.append({
            "apiVersion": "projectcalico.org/v3", "kind": "GlobalNetworkPolicy",
            "metadata": {"name": f"p{i}"},
            "spec": {"selector": "all()", "order": i, "types": ["Egress"],
                     "egress": draw(st.lists(rules(), min_size=1, max_size=4))},
        })
    return docs


def desired_for(
    docs: list[dict[str, Any]], family: int, blocked: bool = False,
    flows: render.FlowLog | None = None,
) -> tuple[dict[str, render.Chain], dict[str, set[str]]]:
    prefix = "pc" if family == 4 else "pc6"
    state = EnforcerState("n1", lambda uid: set_name(uid, prefix), family=family,
                          workload_prefixes=("cali", "tap"), blocked=blocked, flows=flows)
    for doc in docs if not blocked else ():
        obj = load_document(doc, "test")
        compiled = compile_object(obj, family)
        state.upsert_policy(compiled)  # type: ignore[arg-type]
        for selector in pcompile.all_selectors(obj):  # type: ignore[arg-type]
            for ep in ENDPOINTS:
                state.upsert_membership(selector.uid, ep.key, ep.ips)
    for ep in ENDPOINTS:
        state.upsert_endpoint(ep)
    desired = state.desired()
    return desired.chains, desired.sets


@pytest.fixture(scope="module")
def kernel_netns() -> Iterator[Netns]:
    _require_root()
    ns = Netns(f"{NETNS_PREFIX}{secrets.token_hex(4)}")
    netns_mod.create(ns.name)
    try:
        yield ns
    finally:
        ns.remove()


def _load(ns: Netns, family: int, chains: dict[str, render.Chain],
          sets: dict[str, set[str]]) -> None:
    ipt = Iptables(ns.name, family=family)
    with NetlinkIpsets(netns=ns.name) as ipsets:
        for name, members in sets.items():
            ipsets.create(name, "inet" if family == 4 else "inet6", "hash:net")
            ipsets.add(name, members)
        try:
            try:
                ipt.apply(chains)
            except IptablesError as exc:
                pytest.fail(f"the kernel refused IPv{family} rules we rendered: {exc}")
            assert ipt.save().chains == {name: c.hashes for name, c in chains.items()}
        finally:
            ipt.remove_all()
            for name in sets:
                ipsets.destroy(name)
    assert parse_save(ns.run("iptables-save" if family == 4 else "ip6tables-save").stdout
                      ).chains == {}


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(policy_documents(), st.booleans(),
       st.sampled_from([None, render.FlowLog(20), render.FlowLog(65535, allowed=True)]))
def test_every_rendered_rule_shape_loads_into_the_kernel(
    kernel_netns: Netns, docs: list[dict[str, Any]], blocked6: bool,
    flows: render.FlowLog | None,
) -> None:
    """With flow-log rules too (NFLOG before every drop, and every allow)."""
    for family in (4, 6):
        chains, sets = desired_for(docs, family, blocked=family == 6 and blocked6,
                                   flows=flows)
        _load(kernel_netns, family, chains, sets)


def test_one_net_and_one_not_net_on_a_side_load(kernel_netns: Netns) -> None:
    """The shape a Kubernetes ipBlock with one ``except`` gives (iptables refuses ``-d A
    ! -d B`` in one rule: "multiple -d flags not allowed")."""
    doc = {"apiVersion": "projectcalico.org/v3", "kind": "GlobalNetworkPolicy",
           "metadata": {"name": "ipblock"},
           "spec": {"selector": "all()", "types": ["Egress"], "egress": [
               {"action": "Allow", "destination": {"nets": ["10.0.0.0/8"],
                                                   "notNets": ["10.1.0.0/16"]}},
               {"action": "Deny", "source": {"nets": ["10.65.0.0/16"],
                                             "notNets": ["10.65.0.3/32"]}}]}}
    for family in (4, 6):
        chains, sets = desired_for([doc], family)
        _load(kernel_netns, family, chains, sets)
