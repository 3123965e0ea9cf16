"""A rule the kernel refuses never stalls the node: it is enforced fail-closed, the rest of
the node's policy is programmed, and the kernel's own verdict is read back.

The renderer never emits such a rule (``test_render_kernel`` proves it for every rule
shape), so the refused rule here is made by hand: a protocol iptables does not know.
"""

from __future__ import annotations

import dataclasses

from enforcers.engine import Programmer
from enforcers.ipsets import NetlinkIpsets, set_name
from enforcers.iptables import Iptables
from enforcers.render import policy_chain
from enforcers.state import CompiledPolicy, EnforcerState, LocalEndpoint, compile_policy
from policy.load import load
from tests.dataplane.conftest import Netns

NETNS_PREFIX = "pc-rr-"

POLICIES = """
apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata: {name: bad}
spec:
  selector: app == 'a'
  types: [Egress]
  egress:
    - {action: Deny, protocol: TCP, destination: {ports: [443]}}
    - {action: Allow, protocol: TCP, destination: {ports: [80]}}
    - {action: Allow}
---
apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata: {name: good}
spec:
  selector: app == 'b'
  types: [Egress]
  egress:
    - {action: Allow, protocol: TCP, destination: {nets: [10.0.0.0/8], notNets: [10.1.0.0/16]}}
"""


def _with_unknown_protocol(policy: CompiledPolicy, *numbers: int) -> CompiledPolicy:
    rules = list(policy.rules)
    for n in numbers:
        spec = dataclasses.replace(rules[n].spec, protocol="no-such-protocol")
        rules[n] = dataclasses.replace(rules[n], spec=spec)
    return dataclasses.replace(policy, rules=tuple(rules))


def _policy_rules(ns: Netns, key: str) -> list[str]:
    chain = policy_chain(key)
    return [line for line in ns.run("iptables-save", "-t", "filter").stdout.splitlines()
            if line.startswith(f"-A {chain} ")]


def test_a_refused_rule_fails_closed_and_the_rest_is_programmed(netns: Netns) -> None:
    bad, good = (compile_policy(p) for p in load(POLICIES))
    state = EnforcerState("n1", set_name)
    state.upsert_policy(_with_unknown_protocol(bad, 0, 1))  # a Deny and an Allow refused
    state.upsert_policy(good)
    state.upsert_membership(bad.applies_uid, "pod/ns/a", ["10.65.0.2"])
    state.upsert_membership(good.applies_uid, "pod/ns/b", ["10.65.0.3"])
    state.upsert_endpoint(LocalEndpoint("pod/ns/a", "workload", "cali-a", ("10.65.0.2",),
                                        labels={"app": "a"}))
    state.upsert_endpoint(LocalEndpoint("pod/ns/b", "workload", "cali-b", ("10.65.0.3",),
                                        labels={"app": "b"}))
    heard: list[str] = []
    with NetlinkIpsets(netns=netns.name) as ipsets:
        programmer = Programmer(ipsets, Iptables(netns.name))
        result, _observed = programmer.transaction(state, initial=True, on_refused=heard.append)
        assert result.applied
        assert [h.split(":")[0] for h in heard] == [
            "policy GlobalNetworkPolicy//bad, egress rule 0 (IPv4)",
            "policy GlobalNetworkPolicy//bad, egress rule 1 (IPv4)",
        ]
        assert "Deny rule is enforced as a Deny of everything" in heard[0]
        assert "Allow rule never matches" in heard[1]
        # the Deny became a Deny of everything, the refused Allow is gone, and the kernel has
        # the other policy too
        rules = _policy_rules(netns, "GlobalNetworkPolicy//bad")
        assert rules[0].endswith("-j DROP") and " -p " not in rules[0]
        assert not any("--dports" in r for r in rules)  # the Allow to port 80 is gone
        good_rules = _policy_rules(netns, "GlobalNetworkPolicy//good")
        assert any("-d 10.0.0.0/8" in r for r in good_rules)
        assert any("! -d 10.1.0.0/16" in r or "-d 10.1.0.0/16" in r for r in good_rules)

        # later transactions go on as usual
        state.upsert_endpoint(LocalEndpoint("pod/ns/c", "workload", "cali-c", ("10.65.0.4",),
                                            labels={"app": "b"}))
        state.upsert_membership(good.applies_uid, "pod/ns/c", ["10.65.0.4"])
        result, _ = programmer.transaction(state)
        assert result.applied
        assert "cali-c" in netns.run("iptables-save", "-t", "filter").stdout

        # a new version of the policy is tried again: it loads, and is programmed exactly
        state.upsert_policy(bad)
        heard.clear()
        programmer.transaction(state, on_refused=heard.append)
        assert heard == []
        rules = _policy_rules(netns, "GlobalNetworkPolicy//bad")
        assert any("--dports 443" in r and r.endswith("-j DROP") for r in rules)
        assert programmer.iptables.save().chains == {
            name: chain.hashes for name, chain in state.desired().chains.items()}
