"""Rule rendering: an endpoint's ordered tiers and policies become iptables chains.

Pure. The output is a structured rule list (``Chain`` of ``IptRule``) that two
consumers read: ``restore_text`` writes it for ``iptables-restore --noflush``,
and ``simulate`` interprets it in Python so tests can prove that the rules give
the same verdict as ``policy.verdict`` without a kernel.

Layout (Calico's, egress only):

* ``FORWARD -j pc-fwd``: traffic from a local workload (a pod, or a VM on this
  hypervisor) arrives on the host end of its interface, so ``pc-fwd`` dispatches
  ``-i <iface> -g pc-tw-<h>`` (one rule per interface of the workload); ``INPUT -j pc-in``
  does the same for workload traffic to the host's own addresses. Both then drop what
  comes from any other workload interface (``-i cali+``, Calico's "unknown interface":
  a new pod is denied until its policy is programmed).
* ``OUTPUT -j pc-out``: traffic the host itself sends, ``-o <iface> -g pc-th-<h>``
  per host endpoint (``*`` last, skipping workload interfaces and ``lo``).
* A *guest* endpoint is a VM whose enforcer runs inside it: its traffic leaves through
  its own interfaces, sent by itself (``pc-out``) or forwarded by it (``pc-fwd``), so
  both dispatch ``-o <iface> -g pc-th-<h>`` for each of them.
* An endpoint chain accepts established flows, then for each tier in order
  jumps to its applying policies' chains (``pc-pi-<h>``, shared by every endpoint
  the policy applies to) while the tier has not passed; a policy chain marks
  Allow with the ACCEPT bit and Pass with the PASS bit and returns; Deny drops.
  The end of a tier drops unless its default is Pass.
* Rules that need OR over several nets or port groups, or several negated
  ones, use scratch mark bits (set when an alternative matches, then one final
  rule checks the bits), so one Calico rule's action happens at most once.

Every rule carries ``-m comment --comment "pc:<hash>"``, the hash chaining the
previous rule's: equal hash lists mean equal chains, so unchanged chains are
never rewritten.
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, TypeAlias

# --------------------------------------------------------------------------- names

CHAIN_PREFIX = "pc-"
FORWARD_CHAIN = "pc-fwd"
INPUT_CHAIN = "pc-in"
OUTPUT_CHAIN = "pc-out"
DNS_CHAIN = "pc-dns"
DISPATCH_CHAINS = (FORWARD_CHAIN, INPUT_CHAIN, OUTPUT_CHAIN)
HOOKS: tuple[tuple[str, str], ...] = (
    ("FORWARD", FORWARD_CHAIN), ("INPUT", INPUT_CHAIN), ("OUTPUT", OUTPUT_CHAIN),
)
HOOK_COMMENT = "pc:hook"
MAX_CHAIN_NAME = 28

# Mark bits (Calico uses the same region of the mark for the same purposes).
MARK_ACCEPT = 0x10000
MARK_PASS = 0x20000
MARK_NEG = 0x40000
MARK_OR_BITS = (0x80000, 0x100000, 0x200000, 0x400000, 0x800000)
MARK_ALL = MARK_ACCEPT | MARK_PASS | MARK_NEG | sum(MARK_OR_BITS)

# Calico's default failsafeOutboundHostPorts: a host endpoint never loses these.
FAILSAFE_OUTBOUND: tuple[tuple[str, int], ...] = (
    ("udp", 53), ("udp", 67), ("tcp", 179), ("tcp", 2379), ("tcp", 2380),
    ("tcp", 5473), ("tcp", 6443), ("tcp", 6666), ("tcp", 6667),
)


def _digest(text: str, length: int) -> str:
    return hashlib.sha224(text.encode()).hexdigest()[:length]


@functools.lru_cache(maxsize=65536)
def workload_chain(interface: str) -> str:
    """The egress chain of a local workload interface."""
    return f"pc-tw-{_digest('wl:' + interface, 20)}"


@functools.lru_cache(maxsize=65536)
def host_chain(endpoint_key: str) -> str:
    """The egress chain of a host endpoint."""
    return f"pc-th-{_digest('hep:' + endpoint_key, 20)}"


@functools.lru_cache(maxsize=65536)
def policy_chain(policy_key: str) -> str:
    """The egress chain of one policy, shared by every endpoint it applies to."""
    return f"pc-pi-{_digest('pol:' + policy_key, 20)}"


# --------------------------------------------------------------------------- input specs

ActionName: TypeAlias = Literal["Allow", "Deny", "Pass", "Log"]
#: workload: traffic arrives from it on the node's interface (pods, VMs on a hypervisor);
#: host: the node's own interface (a host endpoint); guest: a VM enforcing itself.
EndpointKind: TypeAlias = Literal["workload", "host", "guest"]
#: Calico's workload interface prefix (the host ends of pods' veths).
WORKLOAD_PREFIXES: tuple[str, ...] = ("cali",)


def interface_names(interface: str) -> tuple[str, ...]:
    """The interface names of an endpoint: one name, or several separated by commas."""
    return tuple(name for name in interface.split(",") if name)


@dataclass(frozen=True, slots=True)
class PortRange:
    first: int
    last: int


@dataclass(frozen=True, slots=True)
class PeerSpec:
    """One side of a rule, already resolved: selectors are ipset names (or None)."""

    nets: tuple[str, ...] = ()
    not_nets: tuple[str, ...] = ()
    set_name: str | None = None
    not_set_name: str | None = None
    ports: tuple[PortRange, ...] = ()
    not_ports: tuple[PortRange, ...] = ()
    #: a second set the address may be in instead of ``set_name`` (the IPs of the domains
    #: of network sets the selector selects: they count for egress Allow rules only)
    or_set_name: str | None = None


@dataclass(frozen=True, slots=True)
class RuleSpec:
    """A rule ready to render; ``never`` says why it can never match (so it is left out)."""

    action: ActionName
    protocol: str | None = None
    not_protocol: str | None = None
    source: PeerSpec = PeerSpec()
    destination: PeerSpec = PeerSpec()
    icmp_type: int | None = None
    icmp_code: int | None = None
    never: str | None = None
    #: the kernel refused this rule: it is enforced fail-closed (flow logs say so)
    refused: bool = False


@dataclass(frozen=True, slots=True)
class PolicySpec:
    key: str
    rules: tuple[RuleSpec, ...]


@dataclass(frozen=True, slots=True)
class TierSpec:
    name: str
    default_action: Literal["Deny", "Pass"]
    policies: tuple[PolicySpec, ...]


@dataclass(frozen=True, slots=True)
class EndpointSpec:
    """A local endpoint: ``tiers`` hold only tiers with at least one applying egress policy.

    ``interface``: one name, several separated by commas, or ``*`` (a host endpoint: every
    interface). ``allow``: what happens after the last tier (the profile); None is the
    default for the kind: workloads and guests allow, host endpoints deny."""

    key: str
    kind: EndpointKind
    interface: str
    tiers: tuple[TierSpec, ...] = ()
    allow: bool | None = None

    @property
    def allows_by_default(self) -> bool:
        return self.kind != "host" if self.allow is None else self.allow


# --------------------------------------------------------------------------- flow logs


@dataclass(frozen=True, slots=True)
class FlowLog:
    """Flow logging: the first packet of every connection attempt (endpoint chains accept
    established flows before anything logs) goes to NFLOG ``group`` before each rule that
    drops it, and with ``allowed`` before each rule that allows it too, with a prefix that
    says what decided (``flow_prefix``). ``blocked``: this family is dropped, not enforced
    (``enforce --no-ipv6``), which its endpoints' final drop says."""

    group: int
    allowed: bool = False
    blocked: bool = False


#: NFLOG prefixes: "pc:<A|D>:<what>[:<tag>[:<rule>]]"; the kernel keeps at most 63 bytes.
FLOW_PREFIX = "pc"
MAX_FLOW_PREFIX = 63
FLOW_RULE = "r"  # a policy's rule: tag = policy_tag(key), then the rule index
FLOW_REFUSED = "f"  # a rule the kernel refused, enforced fail-closed: as FLOW_RULE
FLOW_TIER_END = "t"  # the end of a tier (its default Deny): tag = tier_tag(name)
FLOW_PROFILE = "p"  # no tier decided: the endpoint's profile (allow, or deny)
FLOW_HOST_DEFAULT = "h"  # no tier decided: a host endpoint's default deny
FLOW_BLOCKED = "b"  # the family is dropped (--no-ipv6)
FLOW_UNKNOWN_INTERFACE = "u"  # traffic from a workload interface no endpoint has


def policy_tag(policy_key: str) -> str:
    """The policy's tag in flow-log prefixes: its chain's digest."""
    return policy_chain(policy_key)[len("pc-pi-"):]


@functools.lru_cache(maxsize=4096)
def tier_tag(tier: str) -> str:
    """The tier's tag in flow-log prefixes."""
    return _digest("tier:" + tier, 20)


def flow_prefix(action: Literal["A", "D"], what: str, *parts: str) -> str:
    """An NFLOG prefix (``enforcers.flowlog.decode_prefix`` reads it back)."""
    prefix = ":".join((FLOW_PREFIX, action, what, *parts))
    if len(prefix.encode()) > MAX_FLOW_PREFIX:
        raise ValueError(f"NFLOG prefix over {MAX_FLOW_PREFIX} bytes: {prefix!r}")
    return prefix


def _flow_rule(flows: FlowLog, conds: tuple[Cond, ...], action: Literal["A", "D"],
               what: str, *parts: str) -> IptRule:
    return IptRule(conds, Nflog(flows.group, flow_prefix(action, what, *parts)))


# --------------------------------------------------------------------------- rule AST

Side: TypeAlias = Literal["src", "dst"]


@dataclass(frozen=True, slots=True)
class Proto:
    name: str
    negate: bool = False


@dataclass(frozen=True, slots=True)
class Addr:
    side: Side
    cidr: str
    negate: bool = False


@dataclass(frozen=True, slots=True)
class InSet:
    side: Side
    name: str
    negate: bool = False


@dataclass(frozen=True, slots=True)
class Ports:
    side: Side
    ranges: tuple[PortRange, ...]
    negate: bool = False


@dataclass(frozen=True, slots=True)
class Icmp:
    type: int
    code: int | None = None
    v6: bool = False


@dataclass(frozen=True, slots=True)
class Mark:
    value: int
    mask: int


@dataclass(frozen=True, slots=True)
class CtState:
    states: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Iface:
    direction: Literal["in", "out"]
    name: str
    negate: bool = False


@dataclass(frozen=True, slots=True)
class CtDir:
    """The packet's direction in its conntrack flow: ORIGINAL or REPLY."""

    direction: Literal["ORIGINAL", "REPLY"]


Cond: TypeAlias = Proto | Addr | InSet | Ports | Icmp | Mark | CtState | Iface | CtDir


@dataclass(frozen=True, slots=True)
class Verdict:
    kind: Literal["ACCEPT", "DROP", "RETURN"]


@dataclass(frozen=True, slots=True)
class Jump:
    chain: str
    goto: bool = False


@dataclass(frozen=True, slots=True)
class SetMark:
    value: int
    mask: int


@dataclass(frozen=True, slots=True)
class Log:
    prefix: str


@dataclass(frozen=True, slots=True)
class Nflog:
    """Copy the packet to the program bound to NFLOG ``group`` (non-terminating); ``prefix``
    says what decides it (``enforcers.flowlog.decode_prefix`` reads it back)."""

    group: int
    prefix: str


@dataclass(frozen=True, slots=True)
class Queue:
    """Hand the packet to the program bound to NFQUEUE ``number`` (accept it if none is)."""

    number: int


Target: TypeAlias = Verdict | Jump | SetMark | Log | Queue | Nflog

ACCEPT = Verdict("ACCEPT")
DROP = Verdict("DROP")
RETURN = Verdict("RETURN")


@dataclass(frozen=True, slots=True)
class IptRule:
    conds: tuple[Cond, ...]
    target: Target


@dataclass(frozen=True, slots=True)
class Chain:
    name: str
    rules: tuple[IptRule, ...]
    hashes: tuple[str, ...] = field(default=())

    @staticmethod
    def build(name: str, rules: Iterable[IptRule], reuse: Chain | None = None) -> Chain:
        """A chain with its rule hashes; the hashes of the rules it shares from the start
        with ``reuse`` (an earlier version) are taken over (each hash covers only the rules
        up to its own), so a rule inserted into a long chain rehashes only what follows."""
        rules = tuple(rules)
        hashes: list[str] = []
        previous = name
        if reuse is not None and reuse.name == name:
            for old, new in zip(reuse.rules, rules, strict=False):
                if old is not new and old != new:
                    break
                hashes.append(reuse.hashes[len(hashes)])
            if hashes:
                previous = hashes[-1]
        for rule in rules[len(hashes):]:
            previous = _digest(previous + "\0" + rule_body(rule), 16)
            hashes.append(previous)
        return Chain(name, rules, tuple(hashes))


Ruleset: TypeAlias = dict[str, Chain]


# --------------------------------------------------------------------------- text


def _port_text(ranges: Sequence[PortRange]) -> str:
    return ",".join(str(r.first) if r.first == r.last else f"{r.first}:{r.last}" for r in ranges)


def _cond_text(cond: Cond) -> str:
    bang = "! " if getattr(cond, "negate", False) else ""
    if isinstance(cond, Proto):
        return f"{bang}-p {cond.name}"
    if isinstance(cond, Addr):
        flag = "-s" if cond.side == "src" else "-d"
        return f"{bang}{flag} {cond.cidr}"
    if isinstance(cond, InSet):
        return f"-m set {bang}--match-set {cond.name} {cond.side}"
    if isinstance(cond, Ports):
        flag = "--sports" if cond.side == "src" else "--dports"
        return f"-m multiport {bang}{flag} {_port_text(cond.ranges)}"
    if isinstance(cond, Icmp):
        code = "" if cond.code is None else f"/{cond.code}"
        if cond.v6:
            return f"-m icmp6 --icmpv6-type {cond.type}{code}"
        return f"-m icmp --icmp-type {cond.type}{code}"
    if isinstance(cond, Mark):
        return f"-m mark --mark {cond.value:#x}/{cond.mask:#x}"
    if isinstance(cond, CtState):
        return f"-m conntrack --ctstate {','.join(cond.states)}"
    if isinstance(cond, CtDir):
        return f"-m conntrack --ctdir {cond.direction}"
    flag = "-i" if cond.direction == "in" else "-o"
    return f"{bang}{flag} {cond.name}"


def _target_text(target: Target) -> str:
    if isinstance(target, Verdict):
        return f"-j {target.kind}"
    if isinstance(target, Jump):
        return f"{'-g' if target.goto else '-j'} {target.chain}"
    if isinstance(target, SetMark):
        return f"-j MARK --set-xmark {target.value:#x}/{target.mask:#x}"
    if isinstance(target, Queue):
        return f"-j NFQUEUE --queue-num {target.number} --queue-bypass"
    if isinstance(target, Nflog):
        return f'-j NFLOG --nflog-group {target.group} --nflog-prefix "{target.prefix}"'
    return f'-j LOG --log-prefix "{target.prefix}"'


@functools.lru_cache(maxsize=65536)
def rule_body(rule: IptRule) -> str:
    """The rule's matches and target, without chain and comment."""
    parts = [_cond_text(c) for c in rule.conds]
    parts.append(_target_text(rule.target))
    return " ".join(parts)


def chain_lines(chain: Chain) -> list[str]:
    """``-A`` lines for a chain, each with its hash comment."""
    return [
        f'-A {chain.name} {" ".join(_cond_text(c) for c in rule.conds)}'.rstrip()
        + f' -m comment --comment "pc:{h}" {_target_text(rule.target)}'
        for rule, h in zip(chain.rules, chain.hashes, strict=True)
    ]


def restore_text(
    write: Iterable[Chain],
    delete: Iterable[str] = (),
    hooks: Iterable[tuple[str, str]] = (),
) -> str:
    """An ``iptables-restore --noflush`` input that touches only our chains.

    Declaring a chain flushes it, so each written chain is replaced whole; chains
    in ``delete`` are flushed and removed after every rewrite dropped references;
    ``hooks`` are (builtin, our chain) jumps to insert at the top.
    """
    write = list(write)
    delete = sorted(delete)
    lines = ["*filter"]
    lines += [f":{c.name} - [0:0]" for c in write]
    lines += [f":{name} - [0:0]" for name in delete]
    for chain in write:
        lines += chain_lines(chain)
    for builtin, ours in hooks:
        lines.append(f'-I {builtin} 1 -m comment --comment "{HOOK_COMMENT}" -j {ours}')
    lines += [f"-X {name}" for name in delete]
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- rendering

_PROTO_NAMES = {
    "TCP": "tcp", "UDP": "udp", "ICMP": "icmp", "SCTP": "sctp", "UDPLITE": "udplite",
    "ICMPV6": "ipv6-icmp",
}
_PROTO_BY_NUMBER = {6: "tcp", 17: "udp", 1: "icmp", 132: "sctp", 136: "udplite", 58: "ipv6-icmp"}


def protocol_name(protocol: str | int) -> str:
    """Calico's protocol spelling to iptables' (known numbers become their names)."""
    if isinstance(protocol, int):
        return _PROTO_BY_NUMBER.get(protocol, str(protocol))
    return _PROTO_NAMES.get(protocol.upper(), protocol.lower())


def _port_groups(ranges: Sequence[PortRange]) -> list[tuple[PortRange, ...]]:
    """Split ranges into multiport-sized groups (15 slots, a range takes two)."""
    groups: list[tuple[PortRange, ...]] = []
    current: list[PortRange] = []
    used = 0
    for r in ranges:
        cost = 1 if r.first == r.last else 2
        if used + cost > 15:
            groups.append(tuple(current))
            current, used = [], 0
        current.append(r)
        used += cost
    if current:
        groups.append(tuple(current))
    return groups


def _family_nets(nets: Iterable[str], family: int) -> list[str]:
    return [n for n in nets if ipaddress.ip_network(n, strict=False).version == family]


def _is_everything(net: str) -> bool:
    return ipaddress.ip_network(net, strict=False).prefixlen == 0


#: Protocols of one family only: a rule naming one never matches in the other family.
_FAMILY_PROTOCOLS = {"icmp": 4, "ipv6-icmp": 6}


def render_rule(rule: RuleSpec, policy_key: str, family: int = 4,
                flows: FlowLog | None = None, index: int = 0) -> list[IptRule]:
    """The iptables rules of one Calico rule (the policy's ``index``-th) inside a policy
    chain; with ``flows``, a Deny (and an Allow, if those are logged) logs first."""
    if rule.never is not None:
        return []
    proto = rule.protocol
    if _FAMILY_PROTOCOLS.get(proto or "", family) != family:
        return []  # ICMP in the IPv6 chains, or ICMPv6 in the IPv4 ones: matches nothing
    inline: list[Cond] = []
    if proto is not None:
        if rule.not_protocol is not None and rule.not_protocol == proto:
            return []
        inline.append(Proto(proto))
    elif rule.not_protocol is not None:
        inline.append(Proto(rule.not_protocol, negate=True))
    if rule.icmp_type is not None:
        inline.append(Icmp(rule.icmp_type, rule.icmp_code, v6=family == 6))
    # (flag-setting rules, final conds) built up per side
    or_rules: list[IptRule] = []
    neg_rules: list[IptRule] = []
    required = 0
    bits = iter(MARK_OR_BITS)
    for side, peer in (("src", rule.source), ("dst", rule.destination)):
        sd: Side = "src" if side == "src" else "dst"
        nets = _family_nets(peer.nets, family)
        if peer.nets and not nets:
            return []  # only nets of the other family: matches nothing here
        not_nets = _family_nets(peer.not_nets, family)
        if any(_is_everything(n) for n in not_nets):
            return []  # every address is excluded (and the kernel refuses ``! -d 0.0.0.0/0``)
        if any(_is_everything(n) for n in nets):
            nets = []  # every address matches: no condition
        # iptables takes one ``-s``/``-d`` per side: any further address goes to a mark rule
        if len(nets) == 1:
            inline.append(Addr(sd, nets[0]))
        elif nets:
            bit = next(bits)
            required |= bit
            or_rules += [IptRule((Addr(sd, n),), SetMark(bit, bit)) for n in nets]
        if len(not_nets) == 1 and len(nets) != 1:
            inline.append(Addr(sd, not_nets[0], negate=True))
        else:
            neg_rules += [IptRule((Addr(sd, n),), SetMark(MARK_NEG, MARK_NEG)) for n in not_nets]
        if peer.set_name is not None and peer.or_set_name is not None:
            bit = next(bits)
            required |= bit
            or_rules += [IptRule((InSet(sd, name),), SetMark(bit, bit))
                         for name in (peer.set_name, peer.or_set_name)]
        elif peer.set_name is not None:
            inline.append(InSet(sd, peer.set_name))
        if peer.not_set_name is not None:
            inline.append(InSet(sd, peer.not_set_name, negate=True))
        if (peer.ports or peer.not_ports) and proto is None:
            return []  # validation forbids this; without a protocol nothing can match
        groups = _port_groups(peer.ports)
        if len(groups) == 1:
            inline.append(Ports(sd, groups[0]))
        elif groups:
            bit = next(bits)
            required |= bit
            assert proto is not None
            or_rules += [IptRule((Proto(proto), Ports(sd, g)), SetMark(bit, bit)) for g in groups]
        not_groups = _port_groups(peer.not_ports)
        if len(not_groups) == 1:
            inline.append(Ports(sd, not_groups[0], negate=True))
        else:
            assert proto is not None or not not_groups
            neg_rules += [
                IptRule((Proto(proto or ""), Ports(sd, g)), SetMark(MARK_NEG, MARK_NEG))
                for g in not_groups
            ]
    out: list[IptRule] = []
    used_mask = required | (MARK_NEG if neg_rules else 0)
    if used_mask:
        out.append(IptRule((), SetMark(0, used_mask)))
        out += or_rules + neg_rules
        inline.insert(0, Mark(required, used_mask))
    conds = tuple(inline)
    if flows is not None and (rule.action == "Deny" or (rule.action == "Allow"
                                                        and flows.allowed)):
        what = FLOW_REFUSED if rule.refused else FLOW_RULE
        out.append(_flow_rule(flows, conds, "A" if rule.action == "Allow" else "D", what,
                              policy_tag(policy_key), str(index)))
    if rule.action == "Allow":
        out.append(IptRule(conds, SetMark(MARK_ACCEPT, MARK_ACCEPT)))
        out.append(IptRule((Mark(MARK_ACCEPT, MARK_ACCEPT),), RETURN))
    elif rule.action == "Pass":
        out.append(IptRule(conds, SetMark(MARK_PASS, MARK_PASS)))
        out.append(IptRule((Mark(MARK_PASS, MARK_PASS),), RETURN))
    elif rule.action == "Deny":
        out.append(IptRule(conds, DROP))
    else:
        out.append(IptRule(conds, Log(f"pc-{_digest(policy_key, 8)} ")))
    return out


def rule_rendering(policy: PolicySpec, family: int, index: int,
                   flows: FlowLog | None = None) -> int | None:
    """Which of the policy's rules the `index`-th iptables rule of its chain renders
    (None: the chain has no such rule)."""
    first = 0
    for number, rule in enumerate(policy.rules):
        first += len(render_rule(rule, policy.key, family, flows, number))
        if index < first:
            return number
    return None


@functools.lru_cache(maxsize=4096)
def render_policy(policy: PolicySpec, family: int = 4, flows: FlowLog | None = None) -> Chain:
    rules: list[IptRule] = []
    for number, rule in enumerate(policy.rules):
        rules += render_rule(rule, policy.key, family, flows, number)
    return Chain.build(policy_chain(policy.key), rules)


def _failsafe_rules() -> list[IptRule]:
    by_proto: dict[str, list[PortRange]] = {}
    for proto, port in FAILSAFE_OUTBOUND:
        by_proto.setdefault(proto, []).append(PortRange(port, port))
    return [
        IptRule((Proto(proto), Ports("dst", tuple(ports))), ACCEPT)
        for proto, ports in sorted(by_proto.items())
    ]


TierOutline: TypeAlias = tuple[tuple[str, str, tuple[str, ...]], ...]


def render_endpoint(endpoint: EndpointSpec, flows: FlowLog | None = None) -> Chain:
    """The endpoint's egress chain (it refers to policy chains by name, so only the tiers'
    names, default actions and policy keys matter: chains are cached on those)."""
    outline = tuple(
        (t.name, t.default_action, tuple(p.key for p in t.policies)) for t in endpoint.tiers
    )
    key = "" if endpoint.kind == "workload" else endpoint.key
    return endpoint_chain(endpoint.kind, endpoint.interface, key, outline,
                          endpoint.allows_by_default, flows)


def endpoint_chain_name(kind: EndpointKind, interface: str, key: str) -> str:
    """Workload chains are named by interface (as Calico's), the others by endpoint key."""
    return workload_chain(interface) if kind == "workload" else host_chain(key)


@functools.lru_cache(maxsize=16384)
def endpoint_chain(
    kind: EndpointKind, interface: str, key: str, tiers: TierOutline, allow: bool,
    flows: FlowLog | None = None,
) -> Chain:
    """An endpoint's chain from its outline: (tier, default action, policy keys) in order;
    ``key`` names a host or guest endpoint's chain ("" for workloads, named by interface);
    ``allow``: the verdict when no tier decided (the endpoint's profile); ``flows``: log
    what its tiers' ends and its profile drop (and allow, if those are logged)."""
    name = endpoint_chain_name(kind, interface, key)
    rules = [
        IptRule((CtState(("RELATED", "ESTABLISHED")),), ACCEPT),
        IptRule((CtState(("INVALID",)),), DROP),
        IptRule((), SetMark(0, MARK_ALL)),
    ]
    if kind == "host":
        rules += _failsafe_rules()
    for tier, default_action, policy_keys in tiers:
        rules.append(IptRule((), SetMark(0, MARK_PASS)))
        for policy_key in policy_keys:
            rules.append(IptRule((Mark(0, MARK_PASS),), Jump(policy_chain(policy_key))))
            rules.append(IptRule((Mark(MARK_ACCEPT, MARK_ACCEPT),), ACCEPT))
        if default_action == "Deny":
            if flows is not None:
                rules.append(_flow_rule(flows, (Mark(0, MARK_PASS),), "D", FLOW_TIER_END,
                                        tier_tag(tier)))
            rules.append(IptRule((Mark(0, MARK_PASS),), DROP))
    # No tier decided: the profile (pods: allow; host endpoints: deny unless default-allow)
    if flows is not None and allow and flows.allowed:
        rules.append(_flow_rule(flows, (), "A", FLOW_PROFILE))
    elif flows is not None and not allow:
        what = (FLOW_BLOCKED if flows.blocked else
                FLOW_HOST_DEFAULT if kind == "host" else FLOW_PROFILE)
        rules.append(_flow_rule(flows, (), "D", what))
    rules.append(IptRule((), ACCEPT if allow else DROP))
    return Chain.build(name, rules)


# ICMPv6 a link needs to work at all (MLD 130-132, router solicitation 133, neighbour
# solicitation and advertisement 135-136): accepted before policy, as Felix does.
ICMPV6_LINK_TYPES = (130, 131, 132, 133, 135, 136)


def _icmpv6_link_rules() -> list[IptRule]:
    return [IptRule((Proto("ipv6-icmp"), Icmp(t, None, v6=True)), ACCEPT)
            for t in ICMPV6_LINK_TYPES]


def _sends_to(endpoint: EndpointSpec, direction: Literal["in", "out"]) -> list[IptRule]:
    """``-i``/``-o`` each of the endpoint's interfaces ``-g`` its chain."""
    key = "" if endpoint.kind == "workload" else endpoint.key
    chain = endpoint_chain_name(endpoint.kind, endpoint.interface, key)
    return [IptRule((Iface(direction, name),), Jump(chain, goto=True))
            for name in interface_names(endpoint.interface)]


@dataclass(frozen=True, slots=True)
class DnsCapture:
    """DNS answers to hold for learning: those from ``servers`` (this family's addresses)
    to local endpoints go to NFQUEUE ``queue`` (see ``enforcers.dns``). ``interfaces``:
    workload interfaces of DNS server pods on this node (CoreDNS), trusted too."""

    queue: int
    servers: tuple[str, ...]
    interfaces: tuple[str, ...] = ()


def dns_chain(capture: DnsCapture, family: int,
              workload_prefixes: Sequence[str] = WORKLOAD_PREFIXES) -> Chain:
    """``pc-dns``: answers from a trusted server's port 53 that are replies of a tracked
    query, and arrive from outside the node's workloads (a pod cannot teach anything,
    whatever it sends), go to the queue; so do those arriving from the interface of a
    local DNS server pod (``capture.interfaces``). Everything else returns untouched."""
    servers = [s for s in capture.servers if (":" in s) == (family == 6)]

    def queued(extra: tuple[Cond, ...]) -> list[IptRule]:
        return [IptRule((*extra, Addr("src", server), Proto(proto),
                         Ports("src", (PortRange(53, 53),)), CtDir("REPLY")), Queue(capture.queue))
                for server in servers for proto in ("udp", "tcp")]

    rules = [r for name in capture.interfaces for r in queued((Iface("in", name),))]
    rules += [IptRule((Iface("in", prefix + "+"),), RETURN) for prefix in workload_prefixes]
    rules += queued(())
    return Chain.build(DNS_CHAIN, rules)


def render_dispatch(
    endpoints: Iterable[EndpointSpec], family: int = 4, reuse: Mapping[str, Chain] | None = None,
    workload_prefixes: Sequence[str] = WORKLOAD_PREFIXES, dns: DnsCapture | None = None,
    flows: FlowLog | None = None,
) -> tuple[Chain, ...]:
    """Dispatch chains: ``pc-fwd`` and ``pc-in`` (from workloads, forwarded or to the host
    itself: a workload's egress policy covers both, as in Calico) and ``pc-out`` (host
    egress). Traffic from an interface with one of ``workload_prefixes`` that is no known
    workload's is dropped. With IPv6, neighbour discovery to and from the host is accepted
    before any policy. ``reuse``: the previous dispatch chains by name, whose unchanged
    heads keep their hashes (the same result, less hashing). ``dns``: DNS answers to
    capture first, in ``pc-dns`` (see ``dns_chain``). ``flows``: log the new connections
    of unknown workload interfaces before they are dropped."""
    before = reuse or {}
    eps = sorted(endpoints, key=lambda e: (e.interface, e.key))
    link = _icmpv6_link_rules() if family == 6 else []
    from_workloads = [r for e in eps if e.kind == "workload" for r in _sends_to(e, "in")]
    unknown = [IptRule((Iface("in", prefix + "+"),), DROP) for prefix in workload_prefixes]
    if flows is not None:
        unknown = [r for prefix in workload_prefixes for r in (
            _flow_rule(flows, (Iface("in", prefix + "+"), CtState(("NEW",))), "D",
                       FLOW_UNKNOWN_INTERFACE),
            IptRule((Iface("in", prefix + "+"),), DROP))]
    guests = [r for e in eps if e.kind == "guest" for r in _sends_to(e, "out")]
    fwd = from_workloads + unknown + guests
    out: list[IptRule] = list(link) if any(e.kind != "workload" for e in eps) else []
    out += guests
    wildcard: list[EndpointSpec] = []
    for e in eps:
        if e.kind != "host":
            continue
        if e.interface in ("*", ""):
            wildcard.append(e)
        else:
            out += _sends_to(e, "out")
    if wildcard:
        out.append(IptRule((Iface("out", "lo"),), RETURN))
        out += [IptRule((Iface("out", prefix + "+"),), RETURN) for prefix in workload_prefixes]
        out += [IptRule((Iface("out", name),), RETURN) for e in eps if e.kind == "workload"
                for name in interface_names(e.interface)
                if not name.startswith(tuple(workload_prefixes))]
        out.append(IptRule((), Jump(host_chain(wildcard[0].key), goto=True)))
    to_host = link + from_workloads + unknown
    capture: list[Chain] = []
    if dns is not None:
        capture.append(dns_chain(dns, family, workload_prefixes))
        fwd = [IptRule((), Jump(DNS_CHAIN)), *fwd]
        to_host = [IptRule((), Jump(DNS_CHAIN)), *to_host]
    return (
        Chain.build(FORWARD_CHAIN, fwd, before.get(FORWARD_CHAIN)),
        Chain.build(INPUT_CHAIN, to_host, before.get(INPUT_CHAIN)),
        Chain.build(OUTPUT_CHAIN, out, before.get(OUTPUT_CHAIN)),
        *capture,
    )


def render(
    endpoints: Iterable[EndpointSpec], family: int = 4,
    workload_prefixes: Sequence[str] = WORKLOAD_PREFIXES, dns: DnsCapture | None = None,
    flows: FlowLog | None = None,
) -> Ruleset:
    """Every chain we own for these local endpoints, by name."""
    endpoints = list(endpoints)
    chains: Ruleset = {}
    for ep in endpoints:
        chain = render_endpoint(ep, flows)
        chains[chain.name] = chain
        for tier in ep.tiers:
            for pol in tier.policies:
                name = policy_chain(pol.key)
                if name not in chains:
                    chains[name] = render_policy(pol, family, flows)
    for chain in render_dispatch(endpoints, family, workload_prefixes=workload_prefixes,
                                 dns=dns, flows=flows):
        chains[chain.name] = chain
    return chains


def sets_referenced(chains: Iterable[Chain]) -> set[str]:
    """Every ipset name some rule of these chains refers to."""
    return {c.name for ch in chains for r in ch.rules for c in r.conds if isinstance(c, InSet)}


# --------------------------------------------------------------------------- simulation


@dataclass(frozen=True, slots=True)
class Packet:
    """What the simulator needs of a packet (a new connection unless ``ct_state`` says)."""

    src: str
    dst: str
    protocol: str
    dport: int = 0
    sport: int = 40000
    in_iface: str = ""
    out_iface: str = ""
    ct_state: str = "NEW"
    ct_dir: str = "ORIGINAL"
    icmp_type: int | None = None
    icmp_code: int | None = None


def _in_any(ip: str, nets: Iterable[str]) -> bool:
    addr = ipaddress.ip_address(ip)
    return any(addr in ipaddress.ip_network(n, strict=False) for n in nets)


def _iface_matches(pattern: str, iface: str) -> bool:
    """iptables' interface match: a trailing ``+`` makes the name a prefix."""
    if pattern.endswith("+"):
        return iface.startswith(pattern[:-1])
    return iface == pattern


def _cond_holds(cond: Cond, pkt: Packet, mark: int, sets: Mapping[str, Iterable[str]]) -> bool:
    if isinstance(cond, Proto):
        result = pkt.protocol == cond.name
    elif isinstance(cond, Addr):
        ip = pkt.src if cond.side == "src" else pkt.dst
        result = _in_any(ip, [cond.cidr])
    elif isinstance(cond, InSet):
        ip = pkt.src if cond.side == "src" else pkt.dst
        if cond.name not in sets:
            raise KeyError(f"rule refers to ipset {cond.name!r} which does not exist")
        result = _in_any(ip, sets[cond.name])
    elif isinstance(cond, Ports):
        port = pkt.sport if cond.side == "src" else pkt.dport
        result = any(r.first <= port <= r.last for r in cond.ranges)
    elif isinstance(cond, Icmp):
        result = pkt.icmp_type == cond.type and (cond.code is None or pkt.icmp_code == cond.code)
    elif isinstance(cond, Mark):
        result = (mark & cond.mask) == cond.value
    elif isinstance(cond, CtState):
        result = pkt.ct_state in cond.states
    elif isinstance(cond, CtDir):
        result = pkt.ct_dir == cond.direction
    else:
        iface = pkt.in_iface if cond.direction == "in" else pkt.out_iface
        result = _iface_matches(cond.name, iface)
    return result != getattr(cond, "negate", False)


def simulate(
    chains: Mapping[str, Chain],
    start: str,
    pkt: Packet,
    sets: Mapping[str, Iterable[str]],
    log: Callable[[str], None] | None = None,
    flow_log: Callable[[str], None] | None = None,
) -> Literal["ACCEPT", "DROP", "RETURN"]:
    """Run a packet through our chains as netfilter would; RETURN means 'fell through'.
    ``log`` hears LOG prefixes, ``flow_log`` NFLOG prefixes."""
    mark = 0
    stack: list[tuple[str, int]] = []
    chain, index = start, 0
    steps = 0
    while True:
        steps += 1
        if steps > 100_000:
            raise RuntimeError("simulation did not terminate (a chain loop?)")
        rules = chains[chain].rules
        if index >= len(rules):
            if not stack:
                return "RETURN"
            chain, index = stack.pop()
            continue
        rule = rules[index]
        index += 1
        if not all(_cond_holds(c, pkt, mark, sets) for c in rule.conds):
            continue
        target = rule.target
        if isinstance(target, Verdict):
            if target.kind != "RETURN":
                return target.kind
            if not stack:
                return "RETURN"
            chain, index = stack.pop()
        elif isinstance(target, Jump):
            if not target.goto:
                stack.append((chain, index))
            chain, index = target.chain, 0
        elif isinstance(target, SetMark):
            mark = (mark & ~target.mask) ^ target.value
        elif isinstance(target, Queue):
            return "ACCEPT"  # the DNS learner accepts every answer it is handed
        elif isinstance(target, Nflog):
            if flow_log is not None:
                flow_log(target.prefix)
        elif log is not None:
            log(target.prefix)
