"""Flow logs, the pure part: what an NFLOG prefix says decided, what a logged packet's
headers say, and the aggregation of connection attempts into `FlowRecord`s.

The enforcer's chains log the first packet of every connection attempt to NFLOG before
each rule that drops it (and, with ``--flow-log-allowed``, before each that allows it),
with a prefix naming what decided (``render.flow_prefix``): a policy rule by its
policy's tag and rule index, a tier's end by the tier's tag, or a fixed reason.
`decode_prefix` maps it back through the names the enforcer knows (`Names`);
`decode_headers` reads the IPv4/IPv6 and TCP/UDP/SCTP/ICMP headers of the copied bytes;
`FlowAggregator` sums attempts per (direction, source, destination, port, protocol,
decision) over an interval, with bounded memory: past ``max_flows`` distinct flows an
interval's further flows are summed per decision only (``reason="overflow"``).
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal, Protocol, TypeAlias

from enforcers import render
from topics.records import FlowRecord

Action: TypeAlias = Literal["allow", "deny"]


class FlowLogError(ValueError):
    """An NFLOG prefix or packet that cannot be read (the message says what and where)."""


# --------------------------------------------------------------------------- decisions


@dataclass(frozen=True, slots=True)
class Decision:
    """What decided a packet: the action, in words why, and the tier, policy (its key on
    the policies topic) and rule (``egress[2]``) when those decided."""

    action: Action
    reason: str
    tier: str | None = None
    policy: str | None = None
    rule: str | None = None


class Names(Protocol):
    """What the enforcer knows now: policy tag -> (policy key, tier); tier tag -> tier."""

    def policy(self, tag: str) -> tuple[str, str] | None: ...

    def tier(self, tag: str) -> str | None: ...


@dataclass
class NameTable:
    """`Names` from tables of tags (``from_policies`` builds them)."""

    policies: dict[str, tuple[str, str]] = field(default_factory=dict)
    tiers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_policies(cls, policies: Mapping[str, str]) -> NameTable:
        """From policy key -> tier name."""
        return cls({render.policy_tag(key): (key, tier) for key, tier in policies.items()},
                   {render.tier_tag(tier): tier for tier in set(policies.values())})

    def policy(self, tag: str) -> tuple[str, str] | None:
        return self.policies.get(tag)

    def tier(self, tag: str) -> str | None:
        return self.tiers.get(tag)


_FIXED_REASONS: dict[str, str] = {
    render.FLOW_PROFILE: "no policy (profile)",
    render.FLOW_HOST_DEFAULT: "host endpoint default deny",
    render.FLOW_BLOCKED: "IPv6 disabled",
    render.FLOW_UNKNOWN_INTERFACE: "unknown workload interface",
}
_RULE_REASONS = {render.FLOW_RULE: "rule", render.FLOW_REFUSED: "refused rule"}


def decode_prefix(prefix: str, names: Names) -> Decision:
    """The decision an NFLOG prefix of ours names; a policy or tier no longer known keeps
    its tag (``policy "?<tag>"``) so the record still says which rule it was."""
    parts = prefix.split(":")
    if len(parts) < 3 or parts[0] != render.FLOW_PREFIX or parts[1] not in ("A", "D"):
        raise FlowLogError(f"not a Portcullis flow-log prefix: {prefix!r}")
    action: Action = "allow" if parts[1] == "A" else "deny"
    what, rest = parts[2], parts[3:]
    if what in _FIXED_REASONS and not rest:
        return Decision(action, _FIXED_REASONS[what])
    if what == render.FLOW_TIER_END and len(rest) == 1:
        return Decision(action, "end of tier", tier=names.tier(rest[0]) or f"?{rest[0]}")
    if what in _RULE_REASONS and len(rest) == 2 and rest[1].isdigit():
        known = names.policy(rest[0])
        policy, tier = known if known is not None else (f"?{rest[0]}", None)
        return Decision(action, _RULE_REASONS[what], tier, policy, f"egress[{int(rest[1])}]")
    raise FlowLogError(f"flow-log prefix {prefix!r}: unknown kind {what!r} or wrong parts")


# --------------------------------------------------------------------------- headers

PROTOCOL_NAMES: dict[int, str] = {
    1: "ICMP", 6: "TCP", 17: "UDP", 58: "ICMPv6", 132: "SCTP", 136: "UDPLite",
}
PORT_PROTOCOLS = frozenset({6, 17, 132, 136})
ECHO_REQUESTS = {1: 8, 58: 128}  # ICMP / ICMPv6 echo request types
_IPV6_EXTENSIONS = frozenset({0, 43, 60})  # hop-by-hop, routing, destination options
_IPV6_FRAGMENT = 44
_IPV6_AUTH = 51


@dataclass(frozen=True, slots=True)
class Headers:
    """What a logged packet's headers say. ``source_port``/``dest_port``: for TCP, UDP,
    SCTP and UDP-Lite; ``icmp_id``: an echo request's identifier. Any of them None when
    the copied bytes end first (or the packet is a later fragment)."""

    family: int
    source: str
    destination: str
    protocol: int
    source_port: int | None = None
    dest_port: int | None = None
    icmp_type: int | None = None
    icmp_code: int | None = None
    icmp_id: int | None = None

    @property
    def protocol_name(self) -> str:
        return PROTOCOL_NAMES.get(self.protocol, str(self.protocol))

    @property
    def attempt(self) -> int | None:
        """What tells connection attempts apart (a retransmission has the same): the source
        port, or an echo request's identifier (None: every packet is an attempt)."""
        return self.source_port if self.protocol in PORT_PROTOCOLS else self.icmp_id


def decode_headers(data: bytes) -> Headers:
    """The IP and transport headers at the start of `data` (a packet as NFLOG copied it)."""
    if not data:
        raise FlowLogError("packet: no bytes")
    version = data[0] >> 4
    if version == 4:
        return _ipv4(data)
    if version == 6:
        return _ipv6(data)
    raise FlowLogError(f"packet: IP version {version}, expected 4 or 6")


def _ipv4(data: bytes) -> Headers:
    if len(data) < 20:
        raise FlowLogError(f"IPv4 header: {len(data)} bytes, need 20")
    length = (data[0] & 0x0F) * 4
    if length < 20:
        raise FlowLogError(f"IPv4 header: length {length}, need at least 20")
    protocol = data[9]
    source = str(ipaddress.IPv4Address(data[12:16]))
    destination = str(ipaddress.IPv4Address(data[16:20]))
    later_fragment = struct.unpack_from("!H", data, 6)[0] & 0x1FFF
    if later_fragment or len(data) < length:
        return Headers(4, source, destination, protocol)
    return _transport(4, source, destination, protocol, data[length:])


def _ipv6(data: bytes) -> Headers:
    if len(data) < 40:
        raise FlowLogError(f"IPv6 header: {len(data)} bytes, need 40")
    source = str(ipaddress.IPv6Address(data[8:24]))
    destination = str(ipaddress.IPv6Address(data[24:40]))
    protocol, pos = data[6], 40
    while protocol in _IPV6_EXTENSIONS or protocol in (_IPV6_FRAGMENT, _IPV6_AUTH):
        if pos + 8 > len(data):
            return Headers(6, source, destination, protocol)
        following = data[pos]
        if protocol == _IPV6_FRAGMENT:
            if struct.unpack_from("!H", data, pos + 2)[0] >> 3:
                return Headers(6, source, destination, following)  # a later fragment
            size = 8
        elif protocol == _IPV6_AUTH:
            size = (data[pos + 1] + 2) * 4
        else:
            size = (data[pos + 1] + 1) * 8
        protocol, pos = following, pos + size
    if pos > len(data):
        return Headers(6, source, destination, protocol)
    return _transport(6, source, destination, protocol, data[pos:])


def _transport(family: int, source: str, destination: str, protocol: int,
               l4: bytes) -> Headers:
    if protocol in PORT_PROTOCOLS and len(l4) >= 4:
        sport, dport = struct.unpack_from("!HH", l4, 0)
        return Headers(family, source, destination, protocol, sport, dport)
    if protocol in ECHO_REQUESTS and len(l4) >= 2:
        icmp_id = None
        if l4[0] == ECHO_REQUESTS[protocol] and len(l4) >= 6:
            icmp_id = struct.unpack_from("!H", l4, 4)[0]
        return Headers(family, source, destination, protocol, icmp_type=l4[0],
                       icmp_code=l4[1], icmp_id=icmp_id)
    return Headers(family, source, destination, protocol)


# --------------------------------------------------------------------------- aggregation


@dataclass(frozen=True, slots=True)
class FlowEvent:
    """One logged packet: when, its flow, what decided, and its attempt (see `Headers`)."""

    at: float
    source_ip: str
    source_endpoint: str | None
    dest_ip: str
    dest_port: int | None
    protocol: str
    decision: Decision
    attempt: int | None = None
    dest_endpoint: str | None = None
    direction: Literal["egress", "ingress"] = "egress"

    @property
    def key(self) -> tuple[object, ...]:
        return (self.direction, self.source_ip, self.source_endpoint, self.dest_ip,
                self.dest_port, self.protocol, self.decision)

    @property
    def overflow_key(self) -> tuple[object, ...]:
        """Past the cap of distinct flows, an interval's flows are summed per this."""
        return (self.direction, ":" in self.source_ip, self.protocol, self.decision)


def flow_event(headers: Headers, decision: Decision, at: float,
               local: Mapping[str, str]) -> FlowEvent:
    """The event of a logged packet; `local`: local endpoint keys by IP."""
    return FlowEvent(at, headers.source, local.get(headers.source), headers.destination,
                     headers.dest_port, headers.protocol_name, decision, headers.attempt,
                     local.get(headers.destination))


@dataclass
class _Flow:
    first: FlowEvent  # the first seen: what the record names (an overflow sum's first)
    start: float
    end: float
    packets: int = 0
    attempts: int = 0
    ids: set[int] = field(default_factory=set)


class FlowAggregator:
    """Sums flow events over an interval (`flush` ends it), in bounded memory: at most
    `max_flows` distinct flows, then per-decision overflow sums (at most `max_overflow`;
    past that events are only counted in `lost`); at most `max_attempt_ids` attempts
    told apart per flow (past that each new one counts, retransmissions included)."""

    def __init__(self, max_flows: int = 10_000, max_attempt_ids: int = 256,
                 max_overflow: int = 1024) -> None:
        if max_flows < 1 or max_attempt_ids < 0 or max_overflow < 0:
            raise ValueError("max_flows must be positive, the other caps not negative")
        self.max_flows = max_flows
        self.max_attempt_ids = max_attempt_ids
        self.max_overflow = max_overflow
        self.flows: dict[tuple[object, ...], _Flow] = {}
        self.overflow: dict[tuple[object, ...], _Flow] = {}
        self.overflowed = 0  # events of this interval summed per decision only
        self.lost = 0  # events of this interval counted nowhere else

    def add(self, event: FlowEvent) -> None:
        flow = self.flows.get(event.key)
        if flow is None and len(self.flows) < self.max_flows:
            flow = self.flows[event.key] = _Flow(event, event.at, event.at)
        if flow is not None:
            flow.packets += 1
            flow.start, flow.end = min(flow.start, event.at), max(flow.end, event.at)
            if event.attempt is None or event.attempt not in flow.ids:
                flow.attempts += 1
                if event.attempt is not None and len(flow.ids) < self.max_attempt_ids:
                    flow.ids.add(event.attempt)
            return
        self.overflowed += 1
        bucket = self.overflow.get(event.overflow_key)
        if bucket is None:
            if len(self.overflow) >= self.max_overflow:
                self.lost += 1
                return
            bucket = self.overflow[event.overflow_key] = _Flow(event, event.at, event.at)
        bucket.packets += 1
        bucket.attempts += 1  # attempts are not told apart here: an upper bound
        bucket.start, bucket.end = min(bucket.start, event.at), max(bucket.end, event.at)

    def __len__(self) -> int:
        return len(self.flows) + len(self.overflow)

    def flush(self, node: str, now: float) -> list[FlowRecord]:
        """The interval's records (flows in order of first sight, then overflow sums);
        the next interval starts empty."""
        records = [_record(node, flow, now) for flow in self.flows.values()]
        records += [_record(node, bucket, now, overflow=True)
                    for bucket in self.overflow.values()]
        self.flows, self.overflow = {}, {}
        self.overflowed = self.lost = 0
        return records


def _record(node: str, flow: _Flow, now: float, overflow: bool = False) -> FlowRecord:
    e, d = flow.first, flow.first.decision
    anywhere = ("::" if ":" in e.source_ip else "0.0.0.0") if overflow else None
    return FlowRecord(
        node=node, direction=e.direction, source_ip=anywhere or e.source_ip,
        source_endpoint=None if overflow else e.source_endpoint,
        dest_ip=anywhere or e.dest_ip, dest_port=None if overflow else e.dest_port,
        protocol=e.protocol, dest_endpoint=None if overflow else e.dest_endpoint,
        action=d.action, tier=d.tier, policy=d.policy, rule=d.rule,
        reason="overflow" if overflow else d.reason, packets=flow.packets,
        attempts=flow.attempts, start=flow.start, end=flow.end, observed_at=now,
    )
