"""Flow logs, the pure parts, against simple oracles: header decoding against packets built
by hand, prefixes against what the renderer writes and what ``policy.verdict`` decides,
NFLOG messages built byte by byte, and aggregation against a recomputation."""

from __future__ import annotations

import ipaddress
import socket
import struct
from collections import defaultdict
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from enforcers import render
from enforcers.flowlog import (
    Decision,
    FlowAggregator,
    FlowEvent,
    FlowLogError,
    NameTable,
    decode_headers,
    decode_prefix,
)
from enforcers.nflog import (
    NFULA_IFINDEX_INDEV,
    NFULA_PAYLOAD,
    NFULA_PREFIX,
    NFULA_SEQ,
    NfLog,
    attribute,
    parse_packet,
)
from enforcers.state import LocalEndpoint
from policy import compile as pcompile
from policy import verdict as pverdict
from tests.unit.test_render import (
    DST_IPS,
    LOCAL_IP,
    LOCAL_KINDS,
    PEERS,
    _contains,
    programmed,
    scenarios,
)

# --------------------------------------------------------------------------- headers


def _ipv4(proto: int, src: str, dst: str, l4: bytes, fragment: int = 0) -> bytes:
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(l4), 1, fragment, 64, proto, 0,
                         socket.inet_pton(socket.AF_INET, src),
                         socket.inet_pton(socket.AF_INET, dst))
    return header + l4


def _ipv6(proto: int, src: str, dst: str, l4: bytes, extensions: int = 0) -> bytes:
    chain = b""
    first = proto
    for _ in range(extensions):  # destination-options headers, 8 bytes each
        chain = struct.pack("!BB6x", first, 0) + chain
        first = 60
    return struct.pack("!IHBB16s16s", 6 << 28, len(chain) + len(l4), first, 64,
                       socket.inet_pton(socket.AF_INET6, src),
                       socket.inet_pton(socket.AF_INET6, dst)) + chain + l4


v4 = st.ip_addresses(v=4).map(str)
v6 = st.ip_addresses(v=6).map(str)
ports = st.integers(0, 65535)


@settings(max_examples=300)
@given(st.sampled_from([4, 6]), st.data(), st.sampled_from([6, 17, 132, 136]), ports, ports,
       st.integers(0, 3), st.integers(0, 40))
def test_transport_ports_decode_from_hand_built_packets(
    family: int, data: st.DataObject, proto: int, sport: int, dport: int, extensions: int,
    padding: int,
) -> None:
    src, dst = data.draw(v4 if family == 4 else v6), data.draw(v4 if family == 4 else v6)
    l4 = struct.pack("!HH", sport, dport) + b"\0" * padding
    packet = (_ipv4(proto, src, dst, l4) if family == 4
              else _ipv6(proto, src, dst, l4, extensions))
    headers = decode_headers(packet)
    assert (headers.family, headers.source, headers.destination, headers.protocol) == (
        family, str(ipaddress.ip_address(src)), str(ipaddress.ip_address(dst)), proto)
    assert (headers.source_port, headers.dest_port, headers.attempt) == (sport, dport, sport)
    # cut anywhere inside the ports: the addresses survive, the ports are unknown
    cut = decode_headers(packet[: len(packet) - len(l4) + data.draw(st.integers(0, 3))])
    assert (cut.source, cut.destination, cut.source_port, cut.dest_port) == (
        headers.source, headers.destination, None, None)


@given(st.sampled_from([(4, 1, 8), (6, 58, 128)]), st.integers(0, 255), st.integers(0, 255),
       st.integers(0, 65535), st.data())
def test_icmp_echo_ids_tell_attempts_apart(kind: tuple[int, int, int], icmp_type: int,
                                           code: int, ident: int, data: st.DataObject) -> None:
    family, proto, echo = kind
    src, dst = data.draw(v4 if family == 4 else v6), data.draw(v4 if family == 4 else v6)
    l4 = struct.pack("!BBHHH", icmp_type, code, 0, ident, 1)
    packet = _ipv4(proto, src, dst, l4) if family == 4 else _ipv6(proto, src, dst, l4)
    headers = decode_headers(packet)
    assert (headers.icmp_type, headers.icmp_code, headers.dest_port) == (icmp_type, code, None)
    assert headers.attempt == (ident if icmp_type == echo else None)
    assert headers.protocol_name == ("ICMP" if family == 4 else "ICMPv6")


def test_later_fragments_and_unknown_protocols_have_no_ports() -> None:
    l4 = struct.pack("!HH", 1234, 80)
    assert decode_headers(_ipv4(6, "10.0.0.1", "10.0.0.2", l4, fragment=0x2005)).dest_port is None
    assert decode_headers(_ipv4(6, "10.0.0.1", "10.0.0.2", l4, fragment=0x2000)).dest_port == 80
    gre = decode_headers(_ipv4(47, "10.0.0.1", "10.0.0.2", l4))
    assert (gre.protocol_name, gre.dest_port, gre.attempt) == ("47", None, None)
    frag6 = struct.pack("!BBHI", 6, 0, 8 << 3, 1) + l4  # offset 8: a later fragment
    assert decode_headers(_ipv6(44, "fd00::1", "fd00::2", frag6)).dest_port is None


@pytest.mark.parametrize(("data", "message"), [
    (b"", "no bytes"),
    (b"\x45" + b"\0" * 10, "IPv4 header: 11 bytes, need 20"),
    (b"\x44" + b"\0" * 19, "IPv4 header: length 16"),
    (b"\x60" + b"\0" * 20, "IPv6 header: 21 bytes, need 40"),
    (b"\x20" + b"\0" * 40, "IP version 2"),
])
def test_bad_packets_say_what_is_wrong(data: bytes, message: str) -> None:
    with pytest.raises(FlowLogError, match=message):
        decode_headers(data)


# --------------------------------------------------------------------------- prefixes

policy_keys = st.builds(lambda kind, ns, name: f"{kind}/{ns}/{name}",
                        st.sampled_from(["NetworkPolicy", "GlobalNetworkPolicy"]),
                        st.sampled_from(["", "shop", "a" * 63]),
                        st.text("abcdefghijklmnopqrstuvwxyz0123456789-.", min_size=1,
                                max_size=253))


@given(policy_keys, st.text(min_size=1, max_size=63), st.integers(0, 9999),
       st.sampled_from(["A", "D"]), st.booleans())
def test_a_rule_prefix_fits_the_kernel_and_names_its_policy_and_rule(
    key: str, tier: str, index: int, action: str, refused: bool,
) -> None:
    what = render.FLOW_REFUSED if refused else render.FLOW_RULE
    prefix = render.flow_prefix(action, what, render.policy_tag(key), str(index))  # type: ignore[arg-type]
    assert len(prefix.encode()) <= render.MAX_FLOW_PREFIX
    names = NameTable.from_policies({key: tier})
    assert decode_prefix(prefix, names) == Decision(
        "allow" if action == "A" else "deny", "refused rule" if refused else "rule", tier, key,
        f"egress[{index}]")
    # a policy the names do not know any more keeps its tag
    gone = decode_prefix(prefix, NameTable())
    assert gone.policy == "?" + render.policy_tag(key) and gone.tier is None


@given(st.text(min_size=1, max_size=100))
def test_a_tier_end_prefix_names_its_tier(tier: str) -> None:
    prefix = render.flow_prefix("D", render.FLOW_TIER_END, render.tier_tag(tier))
    assert decode_prefix(prefix, NameTable.from_policies({"GlobalNetworkPolicy//p": tier})) == (
        Decision("deny", "end of tier", tier))


@pytest.mark.parametrize("prefix", ["", "pc", "pc:X:r", "xx:D:u", "pc:D:r:abc", "pc:D:r:abc:x",
                                    "pc:D:t", "pc:D:u:extra", "pc:D:z"])
def test_prefixes_that_are_not_ours_are_refused(prefix: str) -> None:
    with pytest.raises(FlowLogError):
        decode_prefix(prefix, NameTable())


def _decide(desired: Any, start: str, pkt: render.Packet) -> tuple[str, list[str]]:
    logged: list[str] = []
    got = render.simulate(desired.chains, start, pkt, desired.sets, flow_log=logged.append)
    return got, logged


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios(), st.booleans(), st.lists(st.tuples(
    st.sampled_from(DST_IPS), st.sampled_from(["tcp", "udp"]),
    st.sampled_from([80, 443, 53, 8050, 6443, 22])), min_size=1, max_size=6))
def test_flow_logs_name_what_policy_verdict_says_decided(
    scenario: tuple, allowed: bool, packets: list,
) -> None:
    """Each new connection is logged once if denied (and once if allowed, when those are
    logged), naming the tier, policy and rule ``policy.verdict`` says decided; the verdicts
    are those of the chains without flow logs."""
    tiers, pols, kind, labels = scenario
    local_key, ep_kind, iface, allow, paths = LOCAL_KINDS[kind]
    universe = [(local_key, LOCAL_IP, labels), *PEERS]
    local = LocalEndpoint(local_key, ep_kind, iface, (LOCAL_IP,), allow=allow)
    plain = programmed(tiers, pols, universe, local)
    logged_dp = programmed(tiers, pols, universe, local, flows=render.FlowLog(5, allowed))
    names = NameTable.from_policies({p.key: p.tier for p in pols})
    arranged = pcompile.arrange(tiers, pols)
    endpoint = pverdict.Endpoint("host" if ep_kind == "host" else "workload", labels, LOCAL_IP)
    for dst, proto, port in packets:
        label_sets = tuple(lab for _k, ip, lab in universe if _contains(ip, dst))
        expected = pverdict.verdict(
            endpoint, arranged,
            pverdict.Packet(proto.upper(), pverdict.Peer(dst, label_sets), port=port),
            default_action="allow" if allow else None)
        for start, direction, name in paths:
            pkt = render.Packet(LOCAL_IP, dst, proto, dport=port,
                                in_iface=name if direction == "in" else "",
                                out_iface=name if direction == "out" else "")
            got, logged = _decide(logged_dp, start, pkt)
            assert got == render.simulate(plain.chains, start, pkt, plain.sets)
            if got != "DROP" and (not allowed or expected.reason.startswith("failsafe")):
                assert logged == []
                continue
            assert len(logged) == 1, (logged, expected)
            decision = decode_prefix(logged[0], names)
            assert decision.action == ("deny" if got == "DROP" else "allow")
            assert (decision.tier, decision.policy) == (expected.tier, expected.policy)
            rule = None if expected.rule_index is None else f"egress[{expected.rule_index}]"
            assert decision.rule == rule
            if expected.policy is None and expected.tier is None:
                assert decision.reason == ("host endpoint default deny"
                                           if got == "DROP" and ep_kind == "host"
                                           else "no policy (profile)")


def test_unknown_interfaces_log_new_connections_and_a_blocked_family_says_so() -> None:
    flows = render.FlowLog(5)
    pod = render.EndpointSpec("pod/shop/a", "workload", "cali1")
    chains = render.render([pod], flows=flows)
    unknown = render.Packet("10.0.0.9", "10.1.0.1", "tcp", dport=80, in_iface="cali9")
    got, logged = _decide(_Dp(chains), render.FORWARD_CHAIN, unknown)
    assert (got, [decode_prefix(p, NameTable()).reason for p in logged]) == (
        "DROP", ["unknown workload interface"])
    established = render.Packet("10.0.0.9", "10.1.0.1", "tcp", dport=80, in_iface="cali9",
                                ct_state="ESTABLISHED")
    assert _decide(_Dp(chains), render.FORWARD_CHAIN, established) == ("DROP", [])
    denying = render.EndpointSpec("pod/shop/a", "workload", "cali1", allow=False)
    blocked = render.render([denying], flows=render.FlowLog(5, blocked=True))
    pkt = render.Packet("10.0.0.1", "10.1.0.1", "tcp", dport=80, in_iface="cali1")
    got, logged = _decide(_Dp(blocked), render.FORWARD_CHAIN, pkt)
    assert (got, [decode_prefix(p, NameTable()).reason for p in logged]) == (
        "DROP", ["IPv6 disabled"])


class _Dp:
    def __init__(self, chains: dict[str, render.Chain]) -> None:
        self.chains = chains
        self.sets: dict[str, set[str]] = {}


# --------------------------------------------------------------------------- NFLOG messages


def _message(prefix: bytes, payload: bytes, seq: int | None, indev: int = 3) -> bytes:
    body = struct.pack("=BBH", socket.AF_INET, 0, socket.htons(20))
    body += attribute(NFULA_PREFIX, prefix + b"\0") + attribute(NFULA_PAYLOAD, payload)
    body += attribute(NFULA_IFINDEX_INDEV, struct.pack("!I", indev))
    if seq is not None:
        body += attribute(NFULA_SEQ, struct.pack("!I", seq))
    return body


@given(st.binary(max_size=60).filter(lambda b: b"\0" not in b), st.binary(max_size=100),
       st.none() | st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1))
def test_nflog_packet_messages_parse(prefix: bytes, payload: bytes, seq: int | None,
                                     indev: int) -> None:
    packet = parse_packet(_message(prefix, payload, seq, indev))
    assert packet.prefix == prefix.decode("ascii", "replace")
    assert (packet.payload, packet.seq, packet.indev, packet.family) == (
        payload, seq, indev, socket.AF_INET)


@given(st.lists(st.integers(0, 5), max_size=30), st.integers(0, 2**32 - 1))
def test_gaps_in_the_sequence_count_what_the_kernel_dropped(gaps: list[int], first: int) -> None:
    counter = NfLog.__new__(NfLog)
    counter._next_seq = None
    counter.lost = 0
    seq = first
    for gap in gaps:
        seq = (seq + 1 + gap) % (1 << 32)
        counter._count(seq)
    assert counter.lost == sum(gaps[1:])


# --------------------------------------------------------------------------- aggregation

DECISIONS = [Decision("deny", "rule", "default", "NetworkPolicy/shop/p", "egress[0]"),
             Decision("deny", "end of tier", "default"), Decision("allow", "rule"),
             Decision("deny", "unknown workload interface")]
events = st.builds(
    FlowEvent, st.floats(0, 1000), st.sampled_from(["10.0.0.1", "10.0.0.2", "fd00::1"]),
    st.sampled_from([None, "pod/shop/a"]), st.sampled_from(["10.1.0.1", "10.1.0.2"]),
    st.sampled_from([None, 80, 443]), st.sampled_from(["TCP", "UDP", "ICMP"]),
    st.sampled_from(DECISIONS), st.none() | st.integers(1000, 1010))


def _oracle(evts: list[FlowEvent], max_flows: int, max_ids: int,
            max_overflow: int) -> list[tuple[Any, ...]]:
    """Group by flow in order of first sight; the first `max_flows` flows are kept."""
    order: list[tuple[object, ...]] = []
    for e in evts:
        if e.key not in order:
            order.append(e.key)
    kept = order[:max_flows]
    out = []
    for key in kept:
        mine = [e for e in evts if e.key == key]
        seen: list[int] = []
        attempts = 0
        for e in mine:
            if e.attempt is None or e.attempt not in seen:
                attempts += 1
                if e.attempt is not None and len(seen) < max_ids:
                    seen.append(e.attempt)
        out.append((mine[0].source_ip, mine[0].dest_ip, mine[0].dest_port,
                    mine[0].decision.reason, len(mine), attempts,
                    min(e.at for e in mine), max(e.at for e in mine)))
    rest = [e for e in evts if e.key not in kept]
    buckets: dict[tuple[object, ...], list[FlowEvent]] = defaultdict(list)
    for e in rest:
        if e.overflow_key in buckets or len(buckets) < max_overflow:
            buckets[e.overflow_key].append(e)
    for mine in buckets.values():
        anywhere = "::" if ":" in mine[0].source_ip else "0.0.0.0"
        out.append((anywhere, anywhere, None, "overflow", len(mine), len(mine),
                    min(e.at for e in mine), max(e.at for e in mine)))
    return out


@settings(max_examples=300)
@given(st.lists(events, max_size=60), st.integers(1, 12), st.integers(0, 4),
       st.integers(0, 3))
def test_aggregation_equals_a_recomputation(evts: list[FlowEvent], max_flows: int,
                                            max_ids: int, max_overflow: int) -> None:
    agg = FlowAggregator(max_flows, max_ids, max_overflow)
    for e in evts:
        agg.add(e)
    expected = _oracle(evts, max_flows, max_ids, max_overflow)
    assert agg.lost == len(evts) - sum(row[4] for row in expected)
    records = agg.flush("n1", 2000.0)
    assert [(r.source_ip, r.dest_ip, r.dest_port, r.reason, r.packets, r.attempts, r.start,
             r.end) for r in records] == expected
    assert all(r.node == "n1" and r.observed_at == 2000.0 for r in records)
    assert agg.flush("n1", 2001.0) == [] and len(agg) == 0  # the next interval starts empty


def test_a_refused_nflog_rule_stops_flow_logs_not_enforcement() -> None:
    from enforcers.state import EnforcerState, compile_object
    from policy.load import load

    state = EnforcerState("n1", lambda uid: "pc-" + uid[2:12], flows=render.FlowLog(5))
    for obj in load("""
apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata: {name: p}
spec:
  selector: all()
  types: [Egress]
  egress: [{action: Deny, protocol: TCP, destination: {ports: [22]}}, {action: Allow}]
"""):
        state.upsert_policy(compile_object(obj))  # type: ignore[arg-type]
    state.upsert_endpoint(LocalEndpoint("pod/shop/a", "workload", "cali1", ("10.0.0.1",)))
    chains = state.plan().chains
    name = render.policy_chain("GlobalNetworkPolicy//p")
    index = next(i for i, r in enumerate(chains[name].rules)
                 if isinstance(r.target, render.Nflog))
    how = state.reject_rule(name, index, "Couldn't load target `NFLOG'")
    assert how is not None and "no flows are logged" in how
    assert state.flows is None and state.refused == {}
    after = state.plan().chains
    assert not any(isinstance(r.target, render.Nflog) for c in after.values() for r in c.rules)
    assert after[name].rules == render.render_policy(
        state._policy_spec(state.policies["GlobalNetworkPolicy//p"])).rules
    assert render.DROP in [r.target for r in after[name].rules]  # the Deny is still there
