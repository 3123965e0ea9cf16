"""Batched netlink ipset programming, checked against the real ``ipset`` CLI as oracle.

Every kernel test runs in a fresh network namespace (``pc-ips-*``); the host's own
sets must be unchanged afterwards.
"""

from __future__ import annotations

import ipaddress
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from enforcers import netns as netns_mod
from enforcers.ipsets import (
    DryRunIpsets,
    InvalidMember,
    IpsetError,
    NetlinkIpsets,
    NoSuchSet,
    SetInfo,
    canonical_member,
    hash_net_members,
    replace_contents,
    set_name,
    temp_name,
)

if TYPE_CHECKING:
    from tests.dataplane.conftest import Netns

NETNS_PREFIX = "pc-ips-"


# --- oracle ----------------------------------------------------------------------------


def oracle(ns: Netns) -> dict[str, set[str]]:
    """Set name -> members, as ``ipset save`` inside the namespace prints them."""
    sets: dict[str, set[str]] = {}
    for line in ns.run("ipset", "save").stdout.splitlines():
        parts = line.split()
        if parts[:1] == ["create"]:
            sets[parts[1]] = set()
        elif parts[:1] == ["add"]:
            sets[parts[1]].add(canonical_member(parts[2]))  # only ::ffff:a.b.c.d differs
    return sets


def oracle_headers(ns: Netns) -> dict[str, tuple[str, str]]:
    out = ns.run("ipset", "save").stdout.splitlines()
    return {p[1]: (p[2], p[4]) for p in (line.split() for line in out) if p[0] == "create"}


def host_set_names() -> list[str]:
    proc = subprocess.run(["ipset", "list", "-n"], capture_output=True, text=True, timeout=30)
    return sorted(proc.stdout.split())


@pytest.fixture(autouse=True)
def host_sets_unchanged(request: pytest.FixtureRequest) -> Iterator[None]:
    """Every kernel test must leave the host namespace's ipsets exactly as they were."""
    if request.node.get_closest_marker("dataplane") is None:
        yield
        return
    before = host_set_names()
    yield
    assert host_set_names() == before, "ipsets leaked into the host namespace"


@pytest.fixture
def ipsets(netns: Netns) -> Iterator[NetlinkIpsets]:
    """A netlink backend inside the test's namespace."""
    with NetlinkIpsets(netns.name) as backend:
        yield backend


# --- pure helpers (no kernel) ----------------------------------------------------------


def test_set_name_is_deterministic_short_and_distinct() -> None:
    uid_a = "s:" + "A" * 10 + "b" * 28
    uid_b = "s:" + "A" * 10 + "c" * 28
    assert set_name(uid_a) == set_name(uid_a) == "pc-s:" + "A" * 10 + "b" * 10
    assert set_name(uid_a) != set_name(uid_b)
    odd = set_name("not a selector uid / with spaces")
    assert len(odd) <= 31 and odd.startswith("pc-s:") and " " not in odd
    assert all(len(set_name(u, prefix="pcx")) <= 31 for u in (uid_a, "x", "s:" + "z" * 60))
    assert temp_name(set_name(uid_a)) != set_name(uid_a)
    assert len(temp_name("n" * 31)) == 31 and temp_name("n" * 31) != "n" * 31


@pytest.mark.parametrize(("text", "canon"), [
    ("10.0.0.1", "10.0.0.1"),
    ("10.0.0.1/32", "10.0.0.1"),
    ("10.1.2.3/8", "10.0.0.0/8"),
    ("fd00::1/128", "fd00::1"),
    ("fd00:0:0::5/64", "fd00::/64"),
])
def test_canonical_member(text: str, canon: str) -> None:
    assert canonical_member(text) == canon


@pytest.mark.parametrize("bad", ["10.0.0", "10.0.0.1/33", "10.0.0.0/0", "fd00::/129",
                                 "10.0.0.1/-1", "10.0.0.1/ 8", " 10.0.0.1", "example.com", ""])
def test_invalid_members_are_named(bad: str) -> None:
    with pytest.raises(InvalidMember) as exc:
        canonical_member(bad)
    assert repr(bad) in str(exc.value)


def test_zero_prefix_is_split_for_hash_net() -> None:
    assert hash_net_members("0.0.0.0/0") == ["0.0.0.0/1", "128.0.0.0/1"]
    assert hash_net_members("::/0") == ["::/1", "8000::/1"]
    assert hash_net_members("10.1.2.3/8") == ["10.0.0.0/8"]


# --- kernel round trips ----------------------------------------------------------------


@pytest.mark.dataplane
def test_round_trip_against_ipset_cli(ipsets: NetlinkIpsets, netns: Netns) -> None:
    ipsets.create("pc-a")
    ipsets.create("pc-b")
    ipsets.add("pc-a", ["10.0.0.1", "10.0.1.0/24", "10.2.3.4/16", "192.168.1.1/32"])
    ipsets.add("pc-b", ["172.16.0.0/12"])
    want_a = {"10.0.0.1", "10.0.1.0/24", "10.2.0.0/16", "192.168.1.1"}
    assert oracle(netns) == ipsets.list_sets() == {"pc-a": want_a, "pc-b": {"172.16.0.0/12"}}
    assert oracle_headers(netns)["pc-a"] == ("hash:net", "inet")
    assert ipsets.info("pc-a") == SetInfo("inet", "hash:net")
    assert ipsets.info("pc-missing") is None

    ipsets.delete("pc-a", ["10.0.0.1", "10.2.0.0/16"])
    assert oracle(netns)["pc-a"] == {"10.0.1.0/24", "192.168.1.1"}

    ipsets.swap("pc-a", "pc-b")
    assert oracle(netns) == {"pc-a": {"172.16.0.0/12"}, "pc-b": {"10.0.1.0/24", "192.168.1.1"}}

    ipsets.flush("pc-b")
    assert oracle(netns)["pc-b"] == set()
    ipsets.destroy("pc-b")
    assert set(oracle(netns)) == {"pc-a"} == set(ipsets.list_sets())


@pytest.mark.dataplane
def test_repeated_operations_are_idempotent(ipsets: NetlinkIpsets, netns: Netns) -> None:
    ipsets.create("pc-i", "inet6")
    ipsets.create("pc-i", "inet6")
    ipsets.add("pc-i", ["fd00::1", "fd00:1::/48"])
    ipsets.add("pc-i", ["fd00::1", "fd00:1::/48", "fd00::1"])
    ipsets.delete("pc-i", ["fd00::1"])
    ipsets.delete("pc-i", ["fd00::1", "fd00:9::9"])
    ipsets.destroy("pc-gone")
    ipsets.destroy("pc-gone")
    assert oracle(netns) == {"pc-i": {"fd00:1::/48"}}


@pytest.mark.dataplane
def test_create_refuses_a_different_set_of_the_same_name(ipsets: NetlinkIpsets) -> None:
    ipsets.create("pc-c", "inet")
    for family, kind in (("inet6", "hash:net"), ("inet", "hash:ip")):
        with pytest.raises(IpsetError, match="exists as inet hash:net"):
            ipsets.create("pc-c", family, kind)


@pytest.mark.dataplane
def test_twenty_thousand_members_in_few_messages(ipsets: NetlinkIpsets, netns: Netns) -> None:
    hosts = [f"10.{i >> 16}.{(i >> 8) & 255}.{i & 255}" for i in range(15_000)]
    nets = [f"100.{i >> 8}.{i & 255}.0/24" for i in range(5_000)]
    ipsets.create("pc-big")
    ipsets.add("pc-big", hosts + nets)
    assert 2 <= ipsets.messages_sent <= 20  # batched, and chunked under the size limit
    assert oracle(netns)["pc-big"] == set(hosts) | set(nets) == ipsets.list_sets()["pc-big"]
    ipsets.delete("pc-big", hosts[::2])
    assert oracle(netns)["pc-big"] == set(hosts[1::2]) | set(nets)


@pytest.mark.dataplane
def test_ipv6_hosts_and_prefixes(ipsets: NetlinkIpsets, netns: Netns) -> None:
    members = [f"2001:db8::{i:x}" for i in range(1, 3000)]
    members += [f"2001:db8:{i:x}::/48" for i in range(1, 1000)] + ["fd00::/8", "::1"]
    ipsets.create("pc-v6", "inet6")
    ipsets.add("pc-v6", members)
    assert oracle_headers(netns)["pc-v6"] == ("hash:net", "inet6")
    assert oracle(netns)["pc-v6"] == {canonical_member(m) for m in members}
    assert ipsets.list_sets()["pc-v6"] == oracle(netns)["pc-v6"]


@pytest.mark.dataplane
def test_listed_members_are_written_as_python_ipaddress_writes_them(
        ipsets: NetlinkIpsets) -> None:
    """The enforcer canonicalises with ``ipaddress``; a resync must compare equal."""
    members = ["::ffff:10.0.0.1", "::1:2", "1:0:2:3:4:5:6:7", "fd00:0:0:0:0:0:0:1",
               "2001:db8::/32", "::ffff:0:0/96"]
    ipsets.create("pc-fmt", "inet6")
    ipsets.add("pc-fmt", members)
    want = set()
    for m in members:
        net = ipaddress.ip_network(m, strict=False)
        want.add(str(net.network_address) if net.prefixlen == 128 else str(net))
    assert ipsets.list_sets()["pc-fmt"] == want == {canonical_member(m) for m in members}


@pytest.mark.dataplane
@pytest.mark.parametrize(("bad", "why"), [
    ("10.0.0.300", "not an IPv4/IPv6 address"),
    ("fd00::1", "IPv4 members only"),
    ("0.0.0.0/0", "/0"),
    ("10.0.0.0/33", "at most 32"),
])
def test_invalid_member_is_named_and_nothing_is_applied(
        ipsets: NetlinkIpsets, netns: Netns, bad: str, why: str) -> None:
    ipsets.create("pc-v")
    ipsets.add("pc-v", ["10.9.9.9"])
    batch = [f"10.1.{i >> 8}.{i & 255}" for i in range(5000)]
    batch.insert(4000, bad)  # in the second netlink message's range
    with pytest.raises(InvalidMember, match=why) as exc:
        ipsets.add("pc-v", batch)
    assert exc.value.member == bad
    with pytest.raises(InvalidMember):
        ipsets.delete("pc-v", ["10.9.9.9", bad])
    assert oracle(netns) == {"pc-v": {"10.9.9.9"}}


@pytest.mark.dataplane
def test_hash_ip_holds_hosts_only(ipsets: NetlinkIpsets, netns: Netns) -> None:
    ipsets.create("pc-h", "inet", "hash:ip")
    ipsets.add("pc-h", ["10.0.0.1", "10.0.0.2/32"])
    with pytest.raises(InvalidMember, match="hosts only"):
        ipsets.add("pc-h", ["10.0.0.3", "10.0.1.0/24"])
    assert oracle(netns) == {"pc-h": {"10.0.0.1", "10.0.0.2"}}


@pytest.mark.dataplane
def test_kernel_error_names_the_entry_and_applies_exactly_the_ones_before(netns: Netns) -> None:
    """A full set: the error names the first entry that did not fit; the prefix is in."""
    with NetlinkIpsets(netns.name, maxelem=100, max_message_bytes=1000) as small:
        small.create("pc-full")
        members = [f"10.0.{i >> 8}.{i & 255}" for i in range(250)]
        with pytest.raises(IpsetError) as exc:
            small.add("pc-full", members)
        assert exc.value.member == members[100]
        assert "pc-full" in str(exc.value) and members[100] in str(exc.value)
        assert oracle(netns)["pc-full"] == set(members[:100])
    dry = DryRunIpsets(maxelem=100)
    dry.create("pc-full")
    with pytest.raises(IpsetError) as dry_exc:
        dry.add("pc-full", members)
    assert dry_exc.value.member == members[100]
    assert dry.list_sets() == {"pc-full": set(members[:100])}


def test_dry_run_mirrors_the_kernel_checks() -> None:
    dry = DryRunIpsets()
    dry.create("pc-d")
    dry.create("pc-d6", "inet6")
    with pytest.raises(IpsetError, match="exists as inet hash:net"):
        dry.create("pc-d", "inet6")
    with pytest.raises(InvalidMember, match="IPv4 members only"):
        dry.add("pc-d", ["10.0.0.1", "fd00::1"])
    with pytest.raises(NoSuchSet):
        dry.add("pc-none", ["10.0.0.1"])
    with pytest.raises(IpsetError, match="different types or families"):
        dry.swap("pc-d", "pc-d6")
    replace_contents(dry, "pc-d", ["10.0.0.1/8"])
    dry.destroy("pc-none")
    assert dry.list_sets() == {"pc-d": {"10.0.0.0/8"}, "pc-d6": set()}
    assert [op for op, _name, _detail in dry.operations].count("swap") == 1
    assert dry.member_ops == 1


@pytest.mark.dataplane
def test_netns_helper_errors_are_clear(netns: Netns) -> None:
    with pytest.raises(netns_mod.NetnsError, match="does not exist"):
        NetlinkIpsets("pc-ips-no-such-namespace")
    inside = netns_mod.run_in(netns.name, Path("/proc/thread-self/net/dev").read_text)
    assert "lo:" in inside and len(inside.splitlines()) == 3  # only lo in a fresh netns


@pytest.mark.dataplane
def test_missing_sets(ipsets: NetlinkIpsets, netns: Netns) -> None:
    with pytest.raises(NoSuchSet, match="pc-nope"):
        ipsets.add("pc-nope", ["10.0.0.1"])
    with pytest.raises(NoSuchSet):
        ipsets.flush("pc-nope")
    ipsets.create("pc-x")
    ipsets.create("pc-x6", "inet6")
    with pytest.raises(IpsetError, match="different types or families"):
        ipsets.swap("pc-x", "pc-x6")
    with pytest.raises(IpsetError, match="swap"):
        ipsets.swap("pc-x", "pc-nope")
    netns.run("ipset", "destroy", "pc-x")  # behind the backend's back
    with pytest.raises(NoSuchSet):
        ipsets.add("pc-x", ["10.0.0.1"])


@pytest.mark.dataplane
def test_replace_contents_swaps_under_a_live_iptables_rule(
        ipsets: NetlinkIpsets, netns: Netns) -> None:
    name = set_name("s:" + "Q" * 38)
    replace_contents(ipsets, name, ["10.0.0.1", "10.0.1.0/24"])  # creates it
    assert oracle(netns) == {name: {"10.0.0.1", "10.0.1.0/24"}}
    # A rule references the set: swap must keep it working and the temp destroyable.
    netns.run("iptables", "-A", "OUTPUT", "-m", "set", "--match-set", name, "dst", "-j", "DROP")
    new = [f"10.2.{i >> 8}.{i & 255}" for i in range(3000)] + ["10.0.0.1"]
    replace_contents(ipsets, name, new)
    assert oracle(netns) == {name: set(new)}  # temp twin destroyed, contents replaced
    rules = netns.run("iptables", "-S", "OUTPUT").stdout
    assert f"--match-set {name} dst" in rules
    with pytest.raises(IpsetError, match="in use"):
        ipsets.destroy(name)


@pytest.mark.dataplane
def test_backend_in_a_netns_does_not_see_host_sets(netns: Netns) -> None:
    with NetlinkIpsets(netns.name) as backend:
        assert backend.list_sets() == {}
        backend.create("pc-only-here")
    assert "pc-only-here" not in host_set_names()
    assert os.path.exists(f"/var/run/netns/{netns.name}")


# --- property: batched add/delete == a Python set model == ipset save -------------------

POOL = (
    [f"10.0.0.{i}" for i in range(12)]
    + ["10.0.0.0/30", "10.0.1.0/24", "10.0.0.0/16", "10.0.0.9/32", "10.0.1.7/24"]
    + [f"10.5.{i}.{j}" for i in range(3) for j in range(3)]
)
POOL6 = [f"fd00::{i}" for i in range(10)] + ["fd00::/64", "fd00:1::/32", "fd00::3/128"]

ops = st.lists(
    st.tuples(st.sampled_from(["add", "delete", "flush"]),
              st.lists(st.sampled_from(POOL), max_size=25)),
    min_size=1, max_size=8,
)


@pytest.mark.dataplane
@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=ops, v6=st.lists(st.sampled_from(POOL6), max_size=10))
def test_batched_operations_match_a_set_model(
        ipsets: NetlinkIpsets, netns: Netns,
        ops: list[tuple[str, list[str]]], v6: list[str]) -> None:
    dry = DryRunIpsets()
    try:
        for backend in (ipsets, dry):
            backend.create("pc-p")
            backend.create("pc-p6", "inet6")
            backend.add("pc-p6", v6)
        model: set[str] = set()
        for op, members in ops:
            canon = {canonical_member(m) for m in members}
            if op == "add":
                model |= canon
            elif op == "delete":
                model -= canon
            else:
                model.clear()
            for backend in (ipsets, dry):
                if op == "flush":
                    backend.flush("pc-p")
                else:
                    getattr(backend, op)("pc-p", members)
        want = {"pc-p": model, "pc-p6": {canonical_member(m) for m in v6}}
        assert oracle(netns) == want
        assert ipsets.list_sets() == want
        assert dry.list_sets() == want
    finally:
        ipsets.destroy("pc-p")
        ipsets.destroy("pc-p6")
