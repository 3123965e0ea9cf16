"""The iptables-restore adapter in a fresh namespace: only our chains, only what changed."""

from __future__ import annotations

import subprocess

from enforcers import render
from enforcers.iptables import Iptables, parse_save
from enforcers.render import EndpointSpec, PeerSpec, PolicySpec, RuleSpec, TierSpec
from tests.dataplane.conftest import Netns

NETNS_PREFIX = "pc-ipt-"


def endpoints(rule: RuleSpec) -> list[EndpointSpec]:
    pol = PolicySpec("GlobalNetworkPolicy//p", (rule,))
    tier = TierSpec("default", "Deny", (pol,))
    return [
        EndpointSpec("pod/ns/a", "workload", "veth-a", (tier,)),
        EndpointSpec("pod/ns/b", "workload", "veth-b", (tier,)),
        EndpointSpec("hostendpoint//n1", "host", "eth0"),
    ]


def host_rules() -> str:
    proc = subprocess.run(["iptables-save", "-t", "filter"], capture_output=True, text=True,
                          timeout=30)
    return "\n".join(line for line in proc.stdout.splitlines() if not line.startswith("#"))


def test_apply_writes_only_changed_chains_and_keeps_foreign_rules(netns: Netns) -> None:
    host_before = host_rules()
    netns.run("iptables", "-A", "FORWARD", "-s", "192.0.2.1", "-j", "DROP")  # someone else's
    ipt = Iptables(netns.name)
    first = render.render(endpoints(RuleSpec("Allow", "tcp", destination=PeerSpec(
        nets=("10.1.0.0/16", "10.2.0.0/16"), not_nets=("10.1.1.0/24", "10.1.2.0/24")))))
    result = ipt.apply(first)
    assert set(result.written) == set(first)
    assert len(result.hooks_added) == 3
    assert not ipt.apply(first).changed  # idempotent: nothing rewritten

    second = render.render(endpoints(RuleSpec("Deny")))
    result = ipt.apply(second)
    assert result.written == (render.policy_chain("GlobalNetworkPolicy//p"),)

    saved = netns.run("iptables-save", "-t", "filter").stdout
    assert "-A FORWARD -s 192.0.2.1/32 -j DROP" in saved
    assert saved.count("-j pc-fwd") == 1 and saved.count("-j pc-out") == 1
    assert saved.count("-j pc-in") == 1
    actual = parse_save(saved)
    assert actual.chains == {name: c.hashes for name, c in second.items()}
    assert host_rules() == host_before  # the host's own firewall is untouched


def test_a_rule_deleted_by_hand_is_noticed_and_restored(netns: Netns) -> None:
    ipt = Iptables(netns.name)
    chains = render.render(endpoints(RuleSpec("Allow")))
    ipt.apply(chains)
    netns.run("iptables", "-D", "pc-fwd", "2")
    netns.run("iptables", "-D", "FORWARD", "1")  # the hook too
    result = ipt.apply(chains)
    assert result.written == ("pc-fwd",)
    assert result.hooks_added == (("FORWARD", "pc-fwd"),)
    assert parse_save(netns.run("iptables-save").stdout).chains["pc-fwd"] == (
        chains["pc-fwd"].hashes)


def test_chains_no_longer_wanted_are_removed_and_remove_all_cleans_up(netns: Netns) -> None:
    ipt = Iptables(netns.name)
    ipt.apply(render.render(endpoints(RuleSpec("Allow"))))
    fewer = render.render([EndpointSpec("hostendpoint//n1", "host", "eth0")])
    result = ipt.apply(fewer)
    assert render.policy_chain("GlobalNetworkPolicy//p") in result.deleted
    assert render.workload_chain("veth-a") in result.deleted
    assert set(ipt.save().chains) == set(fewer)
    ipt.remove_all()
    saved = netns.run("iptables-save", "-t", "filter").stdout
    assert "pc-" not in saved


def test_rendered_sets_and_marks_load_into_the_kernel(netns: Netns) -> None:
    """Every construct the renderer emits is accepted by iptables-restore."""
    netns.run("ipset", "create", "pc-s:a", "hash:net")
    netns.run("ipset", "create", "pc-s:b", "hash:net")
    rules = (
        RuleSpec("Allow", "tcp", source=PeerSpec(set_name="pc-s:a"),
                 destination=PeerSpec(not_set_name="pc-s:b",
                                      ports=tuple(render.PortRange(p, p) for p in range(1, 40)),
                                      not_ports=(render.PortRange(22, 22),))),
        RuleSpec("Log", "icmp", icmp_type=8, icmp_code=0),
        RuleSpec("Pass", not_protocol="udp"),
        RuleSpec("Deny", "sctp", destination=PeerSpec(ports=(render.PortRange(1, 1000),))),
    )
    pol = PolicySpec("NetworkPolicy/ns/all", rules)
    chains = render.render([EndpointSpec("pod/ns/a", "workload", "veth-a",
                                         (TierSpec("t", "Pass", (pol,)),))])
    Iptables(netns.name).apply(chains)
    assert parse_save(netns.run("iptables-save").stdout).chains == {
        n: c.hashes for n, c in chains.items()}


def test_a_batch_with_changed_names_looks_only_at_those_chains(netns: Netns) -> None:
    """With ``changed``, only the named chains are compared, written or deleted: a chain
    changed by hand elsewhere waits for the next full comparison (the resync)."""
    ipt = Iptables(netns.name)
    chains = render.render(endpoints(RuleSpec("Allow")))
    unused = render.render_policy(PolicySpec("GlobalNetworkPolicy//q", (RuleSpec("Deny"),)))
    ipt.apply({**chains, unused.name: unused})
    actual = ipt.save()
    netns.run("iptables", "-D", "pc-fwd", "1")  # behind our back: not in this batch
    policy = render.policy_chain("GlobalNetworkPolicy//p")
    edited = dict(chains)
    edited[policy] = render.render(endpoints(RuleSpec("Deny")))[policy]
    result = ipt.apply(edited, actual, changed={policy, unused.name})
    assert result.written == (policy,) and result.deleted == (unused.name,)
    saved = parse_save(netns.run("iptables-save", "-t", "filter").stdout)
    assert saved.chains[policy] == edited[policy].hashes and unused.name not in saved.chains
    assert saved.chains["pc-fwd"] != chains["pc-fwd"].hashes  # not looked at
    assert ipt.apply(edited).written == ("pc-fwd",)  # a full comparison repairs it
