"""Desired dataplane state of one node, from topic records. Pure.

Holds what the enforcer knows (policies, tiers, memberships, this node's
endpoints) and answers two questions:

* ``desired()``: the complete dataplane (ipset contents by name, chains by
  name) computed from scratch, the oracle.
* ``plan()``: what changed since the previous ``plan()``, as a ``Plan`` the
  engine applies in a safe order: create and fill new sets, add members,
  write chains, remove members, and destroy sets only after no chain refers to
  them any more.

Which policies apply to a local endpoint is decided here, from the endpoint's effective
labels (its own and those it inherits from its namespace and service account) and each
policy's applies-to selector, as Felix decides it: never from the processor's
memberships, so a new pod is under its policies from its first programming and a label
change takes effect with the endpoint (or profile) record itself, whether the processor
is fast, slow or down. Memberships give the *contents* of the sets that rules refer to.

Set contents are refcounted: an IP (or a network set's CIDR) stays in a set
while any member endpoint contributes it, so shared and reused IPs never drop
early. Only sets that a rule of a policy applying to a local endpoint refers
to are programmed.

What is kept of the memberships topic, in three grades:

* **needed** (a rule of a policy applying to a local endpoint refers to the
  selector): refcounted set contents, diffed into every plan, programmed;
* **kept compactly** (some policy of the cluster uses the selector as a rule
  peer, or the member is a local endpoint): only ``members[uid][endpoint] =
  ips`` (interned strings, a single IP stored bare): about 85 bytes a
  membership, against about 140 while needed (20,000 endpoints in 5 selectors each;
  every kept membership cost about 240 when all were refcounted). When a
  selector becomes needed, its contents are rebuilt from this record in
  O(its members) (a 10,000-member selector in about 3 ms); when it stops
  being needed, its contents leave the desired state and its set is destroyed
  once no chain refers to it. The record itself goes when the processor
  tombstones the memberships (it does when no policy uses the selector any more);
* **dropped** (with ``prune``: a remote member of a selector no policy of the
  cluster uses as a rule peer): if a policy later uses it as one, the selector
  is in ``pruned`` and ``needs_reread`` asks the engine to read the memberships
  topic again (rare: a new peer's memberships normally follow its policy).

Why not re-read whenever a selector becomes needed: that happens on every node
whenever a pod of a new application lands there, and a re-read costs the whole
memberships topic while the loop waits; the compact record costs memory
proportional to the peer selectors' memberships instead (measured in
``benchmarks/enforcer_plan_bench.py``).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import socket
import sys
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal, TypeAlias

from enforcers import render
from enforcers.dnscache import domain_uid
from enforcers.render import ActionName, Chain, EndpointSpec, PolicySpec, RuleSpec, TierSpec
from policy import compile as pcompile
from policy import enforcement, model
from policy.domains import validate as validate_domain
from policy.selectors import Selector

SetNamer = Callable[[str], str]
#: The IPs one member contributes to a set: one IP bare (most members), else a tuple.
Ips: TypeAlias = str | tuple[str, ...]


def ips_of(value: Ips) -> tuple[str, ...]:
    """The IPs of a compactly stored membership, as a tuple."""
    return (value,) if isinstance(value, str) else value


@dataclass(frozen=True, slots=True)
class CompiledRule:
    """An egress rule with its peer selectors resolved to selector uids."""

    spec: RuleSpec  # set names still empty: filled per naming function
    dst_uid: str | None = None
    dst_not_uid: str | None = None
    src_uid: str | None = None
    src_not_uid: str | None = None
    unenforced: str | None = None  # how a part that cannot be programmed was made fail-closed
    # the destination's domain patterns (dst_uid is then their domain set's uid, whose
    # members the enforcer learns from DNS answers: ``enforcers.dnscache``)
    domains: tuple[str, ...] = ()
    # an egress Allow rule's destination selector: the network sets it selects may add
    # the IPs of their allowedEgressDomains (``EnforcerState.selector_domains``)
    dst_selector: Selector | None = None

    def uids(self) -> set[str]:
        return {
            u for u in (self.dst_uid, self.dst_not_uid, self.src_uid, self.src_not_uid)
            if u is not None
        }


@dataclass(frozen=True, slots=True)
class CompiledPolicy:
    """What the enforcer needs of a policy: how it sorts, what it applies to (the selector,
    namespace scoping included: evaluated here against local endpoints), its rules."""

    key: str
    tier: str
    sort_key: tuple[object, ...]
    applies: Selector
    egress: bool
    rules: tuple[CompiledRule, ...]

    @property
    def applies_uid(self) -> str:
        return self.applies.uid


@dataclass(frozen=True, slots=True)
class CompiledTier:
    name: str
    sort_key: tuple[object, ...]
    default_action: Literal["Deny", "Pass"]


@dataclass(frozen=True, slots=True)
class LocalEndpoint:
    """An endpoint this node enforces. ``interface``: one name, several separated by commas,
    or ``*`` (a host endpoint on every interface); ``allow``: its profile's verdict after
    the last tier (None: the kind's default, see ``render.EndpointSpec``); ``labels``: its
    effective labels (``policy.labels.effective_labels``), which decide the policies that
    apply to it."""

    key: str
    kind: render.EndpointKind
    interface: str
    ips: tuple[str, ...]
    allow: bool | None = None
    labels: Mapping[str, str] = field(default_factory=dict)

    def chain_key(self) -> str:
        """What names its chain besides the interface: "" for workloads, else the key."""
        return "" if self.kind == "workload" else self.key

    def allows_by_default(self) -> bool:
        return self.kind != "host" if self.allow is None else self.allow


@dataclass
class Dataplane:
    """A complete dataplane: ipset name -> members, chain name -> chain."""

    sets: dict[str, set[str]] = field(default_factory=dict)
    chains: dict[str, Chain] = field(default_factory=dict)


@dataclass
class Plan:
    """The changes from one dataplane to the next, in the order they must be applied."""

    create_sets: dict[str, set[str]] = field(default_factory=dict)  # new set -> full contents
    add: dict[str, set[str]] = field(default_factory=dict)
    # the full desired ruleset; from ``EnforcerState.plan`` the state's own live mapping,
    # valid until its next plan (copy what must outlive that)
    chains: Mapping[str, Chain] = field(default_factory=dict)
    remove: dict[str, set[str]] = field(default_factory=dict)
    destroy_sets: set[str] = field(default_factory=set)
    observed_at: list[float] = field(default_factory=list)
    # the chain names written or deleted since the previous plan; None: unknown, compare
    # every chain (the first plan, a hand-made one)
    changed_chains: set[str] | None = None

    @property
    def chains_unchanged(self) -> bool:
        return self.changed_chains is not None and not self.changed_chains

    @property
    def member_ops(self) -> int:
        return (
            sum(len(m) for m in self.create_sets.values())
            + sum(len(m) for m in self.add.values())
            + sum(len(m) for m in self.remove.values())
        )

    def apply_to(self, dp: Dataplane) -> None:
        """Apply to an in-memory dataplane (what the kernel would end up with)."""
        for name, members in self.create_sets.items():
            dp.sets[name] = set(members)
        for name, members in self.add.items():
            dp.sets[name] |= members
        dp.chains = dict(self.chains)
        for name, members in self.remove.items():
            dp.sets[name] -= members
        for name in self.destroy_sets:
            dp.sets.pop(name, None)


def _fast_v4(text: str) -> str | None:
    """Canonical member text for plain IPv4 input without ipaddress' cost (None: not sure).

    ``inet_pton`` accepts only canonical dotted quads (no leading zeros, no short forms).
    """
    addr, slash, plen = text.partition("/")
    try:
        raw = socket.inet_pton(socket.AF_INET, addr)
    except OSError:
        return None
    if not slash:
        return addr
    if not (plen.isascii() and plen.isdigit()) or not 1 <= int(plen) <= 32:
        return None  # /0 and nonsense take the slow path
    prefix = int(plen)
    if prefix == 32:
        return addr
    value = int.from_bytes(raw, "big") & (0xFFFFFFFF << (32 - prefix)) & 0xFFFFFFFF
    return f"{socket.inet_ntop(socket.AF_INET, value.to_bytes(4, 'big'))}/{prefix}"


def set_members(ips: Iterable[str], family: int = 4) -> set[str]:
    """Canonical ``hash:net`` members of one family: hosts bare, ``/0`` as two ``/1``."""
    out: set[str] = set()
    for text in ips:
        if family == 4:
            if ":" in text:
                continue
            fast = _fast_v4(text)
            if fast is not None:
                out.add(fast)
                continue
        net = ipaddress.ip_network(text, strict=False)
        if net.version != family:
            continue
        if net.prefixlen == 0:
            out.update(str(n) for n in net.subnets(prefixlen_diff=1))
        elif net.prefixlen == net.max_prefixlen:
            out.add(str(net.network_address))
        else:
            out.add(str(net))
    return out


DEFAULT_TIER = CompiledTier(
    model.DEFAULT_TIER.name,
    (False, False, model.DEFAULT_TIER.order or 0.0, model.DEFAULT_TIER.name),
    model.DEFAULT_TIER.default_action,
)


class EnforcerState:
    """Everything one node's enforcer knows, indexed for incremental planning."""

    def __init__(
        self, node: str, set_name: SetNamer, family: int = 4,
        workload_prefixes: tuple[str, ...] = render.WORKLOAD_PREFIXES,
        blocked: bool = False, dns: render.DnsCapture | None = None,
        dns_server_pods: Selector | None = None, flows: render.FlowLog | None = None,
    ) -> None:
        """``blocked``: this family is not enforced but dropped: every local endpoint's
        chain denies all it sends (after established flows, and a host endpoint's
        failsafe ports); policies and memberships are not kept (feed it endpoints only).
        ``flows``: log connection attempts to NFLOG (see ``render.FlowLog``)."""
        self.node = node
        self.set_name = set_name
        self.family = family
        # interfaces with these prefixes are workloads': unknown ones are dropped
        self.workload_prefixes = workload_prefixes
        self.blocked = blocked
        # DNS answers to capture for domain rules (None: domain sets stay empty)
        self.dns = None if blocked else dns
        # local workloads whose DNS answers are trusted though they come from a workload
        # interface (the cluster's DNS server pods on this node)
        self.dns_server_pods = dns_server_pods
        self.flows = None if flows is None else dataclasses.replace(flows, blocked=blocked)
        self.policies: dict[str, CompiledPolicy] = {}
        self.tiers: dict[str, CompiledTier] = {}
        self.endpoints: dict[str, LocalEndpoint] = {}
        # every membership kept (see the module docstring): uid -> endpoint key -> ips
        self.members: dict[str, dict[str, Ips]] = {}
        # the selectors of each local endpoint (small tuples: a handful each); remote
        # endpoints are not indexed (only ``members`` knows them: it is the compact record)
        # the policies whose applies-to selector matches each local endpoint, evaluated
        # here from its labels (as Felix does), never waiting for the processor: a new pod
        # is under its policies from its first programming, and a label change takes
        # effect with the endpoint record itself
        self.applies: dict[str, frozenset[str]] = {}
        # refcounted contents of the needed selectors only (those some policy in use refers
        # to); present, possibly empty, exactly while needed
        self.contents: dict[str, Counter[str]] = {}
        #: ``observed_at`` of every change taken since the last ``plan()`` (which hands them
        #: over as ``Plan.observed_at``); whoever programs without a plan (a start-up sync)
        #: takes them with ``take_observed()``. The latency clock.
        self.observed: list[float] = []
        # what the last plan() left programmed
        self._programmed_sets: dict[str, set[str]] = {}
        self._uid_of_set: dict[str, str] = {}
        self._dirty_members: dict[str, set[str]] = defaultdict(set)
        # Incremental rendering. Chains and sets in use only change with policies, tiers
        # and local endpoints (their interfaces and labels); a plan
        # re-renders only what such a change touched: the endpoint's chain (from its
        # outline: tiers and policy keys), the chains of policies that changed or came into
        # use, and the dispatch chains when the local interfaces changed. The ruleset is
        # one dict updated in place; a plan names the chains that changed.
        self._chains: dict[str, Chain] = {}
        self._in_use: dict[str, str] = {}
        self._reset_render_cache()
        # Memberships of other nodes' endpoints in selectors no known policy uses as a rule
        # peer are dropped (``prune=True``). A selector whose memberships were dropped and
        # that later becomes a rule peer asks for them to be read again (``needs_reread``).
        self.peer_refs: Counter[str] = Counter()
        self.pruned: set[str] = set()
        self.needs_reread = False
        self._names: dict[str, str] = {}
        # selector uid -> the domain set of the allowedEgressDomains of the network sets
        # it selects: an egress Allow rule to the selector matches those IPs too
        self.selector_domains: dict[str, str] = {}
        # rules the kernel refused: policy key -> rule index -> what it said; enforced
        # fail-closed until the policy changes (see ``reject_rule``)
        self.refused: dict[str, dict[int, str]] = {}

    def _capture(self) -> render.DnsCapture | None:
        """What DNS answers to capture, with the interfaces of local DNS server pods."""
        if self.dns is None or self.dns_server_pods is None:
            return self.dns
        interfaces = sorted(
            name for ep in self.endpoints.values()
            if ep.kind == "workload" and self.dns_server_pods.matches(ep.labels)
            for name in render.interface_names(ep.interface))
        return dataclasses.replace(self.dns, interfaces=tuple(interfaces))

    def drop_dns_capture(self) -> None:
        """Capture no DNS answers any more (the queue or its rule is not usable here)."""
        self.dns = None
        self._dispatch_dirty = True

    def drop_flow_logs(self) -> None:
        """Log no flows any more (NFLOG is not usable here): every chain renders again."""
        self.flows = None
        self._all_dirty = True
        self._dirty_pols |= set(self._pol_chain)
        self._dispatch_dirty = True

    def set_selector_domains(self, mapping: Mapping[str, str]) -> None:
        """Which selectors select network sets with allowedEgressDomains (selector uid ->
        their domain set's uid); the policies with Allow rules to a changed one re-render."""
        changed = {u for u in set(mapping) | set(self.selector_domains)
                   if mapping.get(u) != self.selector_domains.get(u)}
        if not changed:
            return
        self.selector_domains = dict(mapping)
        for key, pol in self.policies.items():
            if any(r.dst_selector is not None and r.dst_uid in changed for r in pol.rules):
                self._dirty_pols.add(key)

    def _rule_uids(self, rule: CompiledRule) -> set[str]:
        """The sets a rule refers to: its selectors' (and domains'), and the domain set of
        the network sets its Allow destination selects."""
        uids = rule.uids()
        if rule.dst_selector is not None and rule.dst_uid in self.selector_domains:
            uids.add(self.selector_domains[rule.dst_uid])
        return uids

    def _name(self, uid: str) -> str:
        """The ipset name of a selector uid (remembered: asked for on every render)."""
        name = self._names.get(uid)
        if name is None:
            name = self._names[uid] = self.set_name(uid)
        return name

    # ------------------------------------------------------------------ updates

    def note(self, observed_at: float | None) -> None:
        """Count a change seen at `observed_at` (the latency clock of the next plan)."""
        if observed_at is not None:
            self.observed.append(observed_at)

    def take_observed(self) -> list[float]:
        """The ``observed_at`` of the changes taken since the last plan, forgotten here."""
        observed, self.observed = self.observed, []
        return observed

    def _reset_render_cache(self) -> None:
        """Forget every rendered piece: the next plan renders everything again."""
        self._all_dirty = True
        self._dirty_eps: set[str] = set()
        self._dirty_pols: set[str] = set()
        self._dispatch_dirty = True
        self._ep_chain: dict[str, Chain] = {}  # local endpoint key -> its chain
        self._eps_by_chain: dict[str, set[str]] = {}  # chain name -> endpoints with it
        self._ep_policies: dict[str, tuple[str, ...]] = {}  # ... -> policy keys it jumps to
        self._pol_refs: Counter[str] = Counter()  # policy key -> endpoint chains using it
        self._pol_chain: dict[str, Chain] = {}  # policy key -> chain (policies in use)
        self._pol_of_chain: dict[str, str] = {}  # policy chain name -> policy key
        self._pol_uids: dict[str, frozenset[str]] = {}  # ... -> rule peers it counts in
        self._uid_refs: Counter[str] = Counter()  # uid -> policies in use referring to it
        self._dispatch: tuple[Chain, ...] = ()
        self._in_use = {}
        self._chains = {}
        self._touched: set[str] = set()  # chain names to look at again
        self._changed: set[str] | None = None  # chain names changed since the last plan
        self.contents = {}  # nothing is needed until the next render says so

    def _applying_keys(self, ep: LocalEndpoint) -> frozenset[str]:
        """The policies whose applies-to selector matches a local endpoint."""
        return frozenset(k for k, pol in self.policies.items() if pol.applies.matches(ep.labels))

    def _reapply(self, key: str, policy: CompiledPolicy | None) -> None:
        """Policy `key` changed what it applies to (`policy` None: it is gone): update the
        local endpoints' sets of applying policies, and mark those it applies to, or did."""
        for ep in self.endpoints.values():
            had = self.applies.get(ep.key, frozenset())
            if policy is not None and policy.applies.matches(ep.labels):
                self.applies[ep.key] = had | {key}
                self._dirty_eps.add(ep.key)
            elif key in had:
                self.applies[ep.key] = had - {key}
                self._dirty_eps.add(ep.key)

    def _unindex_policy(self, key: str) -> CompiledPolicy | None:
        old = self.policies.pop(key, None)
        if old is not None:
            for rule in old.rules:
                for uid in rule.uids():
                    _release(self.peer_refs, uid)
        return old

    def _policy_changed(self, old: CompiledPolicy | None, new: CompiledPolicy | None) -> None:
        """Mark what a policy change re-renders: its chain, and the chains of the local
        endpoints it applies to only if where it sorts or what it applies to changed."""
        if old == new:
            return
        key = (old or new).key  # type: ignore[union-attr]
        self._dirty_pols.add(key)
        if old is not None and new is not None and (
            old.applies, old.tier, old.sort_key, old.egress
        ) == (new.applies, new.tier, new.sort_key, new.egress):
            return
        self._reapply(key, new)

    def upsert_policy(self, policy: CompiledPolicy, observed_at: float | None = None) -> None:
        old = self._unindex_policy(policy.key)
        if old != policy:
            self.refused.pop(policy.key, None)  # a new version may load: try it
        self.policies[policy.key] = policy
        for rule in policy.rules:
            for uid in rule.uids():
                self.peer_refs[uid] += 1
                if uid in self.pruned:
                    self.needs_reread = True
        self._policy_changed(old, policy)
        self.note(observed_at)

    def delete_policy(self, key: str, observed_at: float | None = None) -> None:
        self.refused.pop(key, None)
        self._policy_changed(self._unindex_policy(key), None)
        self.note(observed_at)

    def reread_done(self) -> None:
        """The memberships were read again: what rules use now is complete."""
        self.pruned -= set(self.peer_refs)
        self.needs_reread = False

    def upsert_tier(self, tier: CompiledTier, observed_at: float | None = None) -> None:
        if self.tiers.get(tier.name) != tier:
            self.tiers[tier.name] = tier
            self._all_dirty = True  # rare: every endpoint chain is looked at again
        self.note(observed_at)

    def delete_tier(self, name: str, observed_at: float | None = None) -> None:
        if self.tiers.pop(name, None) is not None:
            self._all_dirty = True
        self.note(observed_at)

    def upsert_endpoint(self, ep: LocalEndpoint, observed_at: float | None = None) -> None:
        old = self.endpoints.get(ep.key)
        self.endpoints[ep.key] = ep
        if old is None or old.labels != ep.labels:
            applying = self._applying_keys(ep)
            if applying != self.applies.get(ep.key):
                self.applies[ep.key] = applying
                self._dirty_eps.add(ep.key)
        if old is None or (old.kind, old.interface, old.allow) != (ep.kind, ep.interface, ep.allow):
            self._dirty_eps.add(ep.key)  # its IPs alone change no chain
            self._dispatch_dirty = True
        elif (pods := self.dns_server_pods) is not None and old.labels != ep.labels and (
                pods.matches(old.labels) != pods.matches(ep.labels)):
            self._dispatch_dirty = True  # it became, or stopped being, a DNS server pod
        self.note(observed_at)

    def delete_endpoint(self, key: str, observed_at: float | None = None) -> None:
        if self.endpoints.pop(key, None) is not None:
            self.applies.pop(key, None)
            self._dirty_eps.add(key)
            self._dispatch_dirty = True
        self.note(observed_at)

    def membership(self, uid: str, endpoint_key: str) -> tuple[str, ...] | None:
        """The set members one endpoint contributes to a selector's set (None: not a member)."""
        value = self.members.get(uid, {}).get(endpoint_key)
        return None if value is None else ips_of(value)

    def membership_count(self) -> int:
        return sum(len(by_endpoint) for by_endpoint in self.members.values())

    def upsert_membership(
        self,
        uid: str,
        endpoint_key: str,
        ips: Iterable[str],
        observed_at: float | None = None,
        *,
        node: str | None = None,
        prune: bool = False,
    ) -> None:
        """Record a membership; with ``prune``, one nothing here may need is dropped instead."""
        # the common case first (one canonical IPv4 address): this runs for every record
        # read at start-up
        fast = None
        if self.family == 4 and type(ips) in (list, tuple) and len(ips) == 1:  # type: ignore[arg-type]
            fast = _fast_v4(ips[0])  # type: ignore[index]
        new = (fast,) if fast is not None else tuple(sorted(set_members(ips, self.family)))
        by_endpoint = self.members.get(uid)
        stored = by_endpoint.get(endpoint_key) if by_endpoint is not None else None
        old = None
        if stored is not None:
            old = (stored,) if type(stored) is str else stored
            if old == new:
                return
        elif prune and node != self.node and uid not in self.peer_refs:
            self.pruned.add(uid)
            return
        # every membership of a selector repeats its uid, and IPs repeat across selectors:
        # one shared string each keeps 100,000s of memberships affordable
        endpoint_key = sys.intern(endpoint_key)
        value: Ips
        if len(new) == 1:
            value = sys.intern(new[0])
            new = (value,)
        else:
            value = new = tuple(map(sys.intern, new))
        if by_endpoint is None:
            uid = sys.intern(uid)
            by_endpoint = self.members[uid] = {}
        by_endpoint[endpoint_key] = value
        counter = self.contents.get(uid)
        if counter is not None:
            self._recount(uid, counter, old or (), new)
        if observed_at is not None:
            self.observed.append(observed_at)

    def delete_membership(
        self, uid: str, endpoint_key: str, observed_at: float | None = None
    ) -> None:
        by_endpoint = self.members.get(uid)
        stored = by_endpoint.pop(endpoint_key, None) if by_endpoint is not None else None
        if stored is None:
            return
        if not by_endpoint:
            del self.members[uid]
        counter = self.contents.get(uid)
        if counter is not None:
            self._recount(uid, counter, ips_of(stored), ())
        self.note(observed_at)

    def _recount(
        self, uid: str, counter: Counter[str], old: Iterable[str], new: Iterable[str]
    ) -> None:
        dirty = self._dirty_members[uid]
        for ip in old:
            counter[ip] -= 1
            if counter[ip] <= 0:
                del counter[ip]
                dirty.add(ip)
        for ip in new:
            counter[ip] += 1
            if counter[ip] == 1:
                dirty.add(ip)

    def _member_counts(self, uid: str) -> Counter[str]:
        """How many members of a selector contribute each IP, from the compact record."""
        counter: Counter[str] = Counter()
        for value in self.members.get(uid, {}).values():
            if isinstance(value, str):
                counter[value] += 1
            else:
                counter.update(value)
        return counter

    def _need(self, uid: str) -> None:
        """A selector became needed: its contents, from the compact record."""
        counter = self.contents[uid] = self._member_counts(uid)
        # a set still programmed (needed again before the plan destroyed it) is diffed
        programmed = self._programmed_sets.get(self._name(uid))
        if programmed is not None:
            self._dirty_members[uid] = set(counter) | programmed

    def _unneed(self, uid: str) -> None:
        """A selector is needed no more: its contents leave the desired state."""
        self.contents.pop(uid, None)
        self._dirty_members.pop(uid, None)

    def set_contents(self, uid: str) -> set[str]:
        """Every IP the members of a selector contribute, from scratch."""
        return set(self._member_counts(uid))

    # ------------------------------------------------------------------ derivation

    def _tier(self, name: str) -> CompiledTier:
        if name in self.tiers:
            return self.tiers[name]
        if name == DEFAULT_TIER.name:
            return DEFAULT_TIER
        # a tier policies name but no Tier object defines: after every defined tier, Deny
        return CompiledTier(name, (True, False, 0.0, name), "Deny")

    def applying(self, endpoint_key: str) -> list[CompiledPolicy]:
        """Egress policies applying to an endpoint, in evaluation order."""
        found: list[CompiledPolicy] = []
        if self.blocked:
            return found
        for pkey in self.applies.get(endpoint_key, ()):
            pol = self.policies[pkey]
            if pol.egress:
                found.append(pol)
        # the key breaks ties: the order never depends on set iteration (which a cached
        # chain could not follow)
        found.sort(key=lambda p: (self._tier(p.tier).sort_key, p.sort_key, p.key))
        return found

    def reject_rule(self, chain: str, index: int, error: str) -> str | None:
        """The kernel refused rule `index` of `chain`: if it renders a policy's rule, that
        rule is enforced fail-closed from the next plan on (an Allow or Log never matches,
        a Deny or Pass denies everything), and the return value says so for the log. None
        when the chain is not a policy chain in use."""
        if chain == render.DNS_CHAIN and self.dns is not None:
            self.drop_dns_capture()
            return (f"the kernel refused the DNS capture rule ({error}): nothing is learned "
                    "from DNS on this node, domain rules match nothing (fail closed)")
        if self.flows is not None and self._is_flow_rule(chain, index):
            self.drop_flow_logs()
            return (f"the kernel refused an NFLOG rule ({error}): no flows are logged on "
                    f"this node for IPv{self.family}; enforcement is unchanged")
        key = self._pol_of_chain.get(chain)
        if key is None or key not in self.policies:
            return None
        number = render.rule_rendering(self._policy_spec(self.policies[key]), self.family,
                                       index, self.flows)
        if number is None:
            return None
        self.refused.setdefault(key, {})[number] = error
        self._dirty_pols.add(key)
        action = self.policies[key].rules[number].spec.action
        how = ("never matches" if action in ("Allow", "Log")
               else "is enforced as a Deny of everything")
        return (f"policy {key}, egress rule {number} (IPv{self.family}): the kernel refused it "
                f"({error}); this {action} rule {how} (fail closed) until the policy changes")

    def _is_flow_rule(self, chain: str, index: int) -> bool:
        rules = self._chains[chain].rules if chain in self._chains else ()
        return 0 <= index < len(rules) and isinstance(rules[index].target, render.Nflog)

    def _allows(self, ep: LocalEndpoint) -> bool:
        """What the endpoint's chain does when no tier decided."""
        return not self.blocked and ep.allows_by_default()

    def _policy_spec(self, pol: CompiledPolicy) -> PolicySpec:
        rules = []
        refused = self.refused.get(pol.key, {})
        for number, rule in enumerate(pol.rules):
            spec = rule.spec
            if number in refused:
                rules.append(_refused_rule(spec, refused[number]))
                continue
            dst = spec.destination
            src = spec.source
            if rule.dst_uid or rule.dst_not_uid:
                dst = _with_sets(dst, rule.dst_uid, rule.dst_not_uid, self._name)
                extra = self.selector_domains.get(rule.dst_uid or "")
                if rule.dst_selector is not None and extra is not None:
                    dst = dataclasses.replace(dst, or_set_name=self._name(extra))
            if rule.src_uid or rule.src_not_uid:
                src = _with_sets(src, rule.src_uid, rule.src_not_uid, self._name)
            rules.append(
                RuleSpec(
                    spec.action, spec.protocol, spec.not_protocol, src, dst,
                    spec.icmp_type, spec.icmp_code, spec.never,
                )
            )
        return PolicySpec(pol.key, tuple(rules))

    def endpoint_specs(self) -> list[EndpointSpec]:
        specs = []
        for ep in self.endpoints.values():
            tiers: list[TierSpec] = []
            for pol in self.applying(ep.key):
                tier = self._tier(pol.tier)
                if not tiers or tiers[-1].name != tier.name:
                    tiers.append(TierSpec(tier.name, tier.default_action, ()))
                last = tiers[-1]
                tiers[-1] = TierSpec(
                    last.name, last.default_action, (*last.policies, self._policy_spec(pol))
                )
            specs.append(EndpointSpec(ep.key, ep.kind, ep.interface, tuple(tiers),
                                      self._allows(ep)))
        return specs

    def uids_in_use(self) -> set[str]:
        """Selector uids some rule of a policy applying to a local endpoint refers to."""
        used: set[str] = set()
        seen: set[str] = set()
        for ep in self.endpoints.values():
            for pol in self.applying(ep.key):
                if pol.key in seen:
                    continue
                seen.add(pol.key)
                for rule in pol.rules:
                    if rule.spec.never is None:
                        used |= self._rule_uids(rule)
        return used

    def desired(self) -> Dataplane:
        """The whole dataplane from scratch (the oracle ``plan()`` must agree with)."""
        chains = render.render(self.endpoint_specs(), self.family, self.workload_prefixes,
                               self._capture(), self.flows)
        sets = {self._name(uid): self.set_contents(uid) for uid in self.uids_in_use()}
        return Dataplane(sets, chains)

    def _outline(self, ep: LocalEndpoint) -> render.TierOutline:
        """What an endpoint's chain depends on: its tiers in order, with their policy keys
        (the outline ``endpoint_specs`` gives ``render.render_endpoint``)."""
        tiers: list[tuple[str, str, tuple[str, ...]]] = []
        for pol in self.applying(ep.key):
            tier = self._tier(pol.tier)
            if not tiers or tiers[-1][0] != tier.name:
                tiers.append((tier.name, tier.default_action, ()))
            name, default, keys = tiers[-1]
            tiers[-1] = (name, default, (*keys, pol.key))
        return tuple(tiers)

    def _use_policy(self, key: str) -> None:
        """(Re-)render a policy chain in use and count the sets its rules refer to."""
        self._unuse_policy(key)
        pol = self.policies[key]
        chain = self._pol_chain[key] = render.render_policy(self._policy_spec(pol), self.family,
                                                            self.flows)
        self._pol_of_chain[chain.name] = key
        self._touched.add(chain.name)
        uids = frozenset(u for r in pol.rules if r.spec.never is None
                         for u in self._rule_uids(r))
        self._pol_uids[key] = uids
        for uid in uids:
            self._uid_refs[uid] += 1
            if self._uid_refs[uid] == 1:
                self._in_use[self._name(uid)] = uid
                self._need(uid)

    def _unuse_policy(self, key: str) -> None:
        chain = self._pol_chain.pop(key, None)
        if chain is not None:
            self._pol_of_chain.pop(chain.name, None)
            self._touched.add(chain.name)
        for uid in self._pol_uids.pop(key, ()):
            if _release(self._uid_refs, uid):
                self._unneed(uid)
                if self._in_use.get(self._name(uid)) == uid:
                    del self._in_use[self._name(uid)]

    def _chain_named(self, name: str) -> Chain | None:
        """Which chain a name stands for now: a dispatch chain, else an endpoint's (the last
        local endpoint's, when interfaces are shared, as ``render.render``), else a
        policy's."""
        for chain in self._dispatch:
            if chain.name == name:
                return chain
        keys = self._eps_by_chain.get(name)
        if keys:
            if len(keys) == 1:
                return self._ep_chain[next(iter(keys))]
            last = [k for k in self.endpoints if k in keys][-1]
            return self._ep_chain[last]
        pkey = self._pol_of_chain.get(name)
        return self._pol_chain[pkey] if pkey is not None else None

    def _rerender(self) -> None:
        """Bring the rendered chains up to date with what changed."""
        if self._all_dirty:
            self._dirty_eps |= set(self.endpoints) | set(self._ep_chain)
            self._all_dirty = False
        if not (self._dirty_eps or self._dirty_pols or self._dispatch_dirty):
            return
        fresh: set[str] = set()
        touched = self._touched
        for key in self._dirty_eps:
            old_keys = self._ep_policies.pop(key, ())
            old_chain = self._ep_chain.pop(key, None)
            if old_chain is not None:
                _discard(self._eps_by_chain, old_chain.name, key)
                touched.add(old_chain.name)
            ep = self.endpoints.get(key)
            new_keys: tuple[str, ...] = ()
            if ep is not None:
                outline = self._outline(ep)
                chain = self._ep_chain[key] = render.endpoint_chain(
                    ep.kind, ep.interface, ep.chain_key(), outline, self._allows(ep),
                    self.flows)
                self._eps_by_chain.setdefault(chain.name, set()).add(key)
                touched.add(chain.name)
                new_keys = tuple(k for _t, _d, keys in outline for k in keys)
                self._ep_policies[key] = new_keys
            for pkey in new_keys:
                self._pol_refs[pkey] += 1
                if self._pol_refs[pkey] == 1:
                    fresh.add(pkey)
            for pkey in old_keys:
                if _release(self._pol_refs, pkey):
                    self._unuse_policy(pkey)
                    fresh.discard(pkey)
        for pkey in fresh | self._dirty_pols:
            if pkey in self._pol_refs:
                self._use_policy(pkey)
        self._dirty_eps.clear()
        self._dirty_pols.clear()
        if self._dispatch_dirty:
            touched.update(chain.name for chain in self._dispatch)  # pc-dns may go
            self._dispatch = render.render_dispatch(
                (EndpointSpec(ep.key, ep.kind, ep.interface) for ep in self.endpoints.values()),
                self.family, {chain.name: chain for chain in self._dispatch},
                self.workload_prefixes, self._capture(), self.flows,
            )
            touched.update(chain.name for chain in self._dispatch)
            self._dispatch_dirty = False
        for name in touched:
            now = self._chain_named(name)
            if now is self._chains.get(name):
                continue
            if now is None:
                del self._chains[name]
            else:
                self._chains[name] = now
            if self._changed is not None:
                self._changed.add(name)
        touched.clear()

    def plan(self) -> Plan:
        """The changes since the previous plan (the first plan programs everything)."""
        self._rerender()
        in_use = self._in_use
        plan = Plan(chains=self._chains, observed_at=self.take_observed(),
                    changed_chains=self._changed)
        self._changed = set()
        for name, uid in in_use.items():
            if name not in self._programmed_sets:
                members = set(self.contents[uid])
                plan.create_sets[name] = members
                self._programmed_sets[name] = set(members)
                self._uid_of_set[name] = uid
        for name in list(self._programmed_sets):
            if name not in in_use:
                plan.destroy_sets.add(name)
                del self._programmed_sets[name]
                del self._uid_of_set[name]
        for uid, ips in self._dirty_members.items():
            name = self._name(uid)
            if name not in in_use or name in plan.create_sets:
                continue
            programmed = self._programmed_sets[name]
            counter = self.contents[uid]
            for ip in ips:
                want = counter.get(ip, 0) > 0
                if want and ip not in programmed:
                    plan.add.setdefault(name, set()).add(ip)
                    programmed.add(ip)
                elif not want and ip in programmed:
                    plan.remove.setdefault(name, set()).add(ip)
                    programmed.discard(ip)
        self._dirty_members = defaultdict(set)
        return plan

    def forget_programmed(self) -> None:
        """Make the next plan program every set from scratch (after a restart or a loss)."""
        self._reset_render_cache()
        self._programmed_sets.clear()
        self._uid_of_set.clear()
        self._dirty_members = defaultdict(set)

    def programmed_sets(self) -> Mapping[str, set[str]]:
        return self._programmed_sets


def _refused_rule(spec: RuleSpec, error: str) -> RuleSpec:
    """A rule the kernel refused, fail-closed: an Allow or Log that never matches, or a Deny
    with no condition (a Pass becomes one too: it could have skipped a later Deny)."""
    if spec.action in ("Allow", "Log"):
        return RuleSpec(spec.action, never=f"refused by the kernel: {error}")
    return RuleSpec("Deny", refused=True)


def _with_sets(
    peer: render.PeerSpec, uid: str | None, not_uid: str | None, namer: SetNamer
) -> render.PeerSpec:
    return render.PeerSpec(
        peer.nets, peer.not_nets,
        namer(uid) if uid else None,
        namer(not_uid) if not_uid else None,
        peer.ports, peer.not_ports,
    )


# --------------------------------------------------------------------------- compiling


def _discard(index: dict[str, set[str]], key: str, value: str) -> None:
    """Take `value` out of `index[key]`, and the key out once its set is empty."""
    values = index.get(key)
    if values is not None:
        values.discard(value)
        if not values:
            del index[key]


def _release(refs: Counter[str], key: str) -> bool:
    """Drop one reference to `key`; True (and the key gone) when none is left."""
    refs[key] -= 1
    if refs[key] > 0:
        return False
    del refs[key]
    return True


def _ports(ports: Iterable[model.Port]) -> tuple[render.PortRange, ...]:
    return tuple(render.PortRange(p.first, p.last) for p in ports if p.name is None)


# Some rule parts cannot be programmed yet (domain names, Services, named ports, notICMP).
# A rule that has one is enforced fail-closed, so it can only ever drop more than policy
# says, never let through what policy denies: an Allow or Log rule is narrowed (it matches
# less, or nothing), a Deny is widened (it matches at least what policy says), and a Pass,
# whose effect could go either way, becomes a widened Deny.


def _exact(entity: model.EntityRule) -> render.PeerSpec:
    return render.PeerSpec(
        nets=entity.nets, not_nets=entity.not_nets,
        ports=_ports(entity.ports), not_ports=_ports(entity.not_ports),
    )


def _narrowed(entity: model.EntityRule) -> render.PeerSpec | None:
    """The side matching no more than `entity` does; None when nothing certain is left."""
    if entity.domains or entity.services is not None:
        return None
    if any(p.name is not None for p in entity.not_ports):  # cannot leave those ports out
        return None
    peer = _exact(entity)
    if entity.ports and not peer.ports:  # only named ports
        return None
    return peer  # named ports left out of `ports`: fewer ports


def _widened(entity: model.EntityRule) -> render.PeerSpec:
    """The side matching at least what `entity` does: what cannot be programmed is dropped
    (any named port in `ports` drops the port condition; named `notPorts` are not left out)."""
    peer = _exact(entity)
    if any(p.name is not None for p in entity.ports):
        peer = render.PeerSpec(nets=peer.nets, not_nets=peer.not_nets, not_ports=peer.not_ports)
    return peer


def _fail_closed(
    r: model.Rule, gaps: list[str]
) -> tuple[ActionName, render.PeerSpec, render.PeerSpec, str | None, str]:
    """(action, source, destination, never, how) for a rule with parts not programmable."""
    missing = ", ".join(dict.fromkeys(gaps))
    if r.action in ("Allow", "Log"):
        src, dst = _narrowed(r.source), _narrowed(r.destination)
        if src is None or dst is None or r.not_icmp is not None:
            return r.action, render.PeerSpec(), render.PeerSpec(), f"{missing}: not enforced yet", (
                f"{missing} not enforced yet: this {r.action} rule never matches (fail closed)")
        return r.action, src, dst, None, (
            f"{missing} not enforced yet: this {r.action} rule matches only its other ports")
    return "Deny", _widened(r.source), _widened(r.destination), None, (
        f"{missing} not enforced yet: this {r.action} rule is enforced as a Deny of all that "
        "its other conditions match (fail closed)")


def compile_rule(rule: pcompile.CompiledRule, family: int = 4) -> CompiledRule:
    """A compiled egress rule as the renderer needs it (selectors as uids), made fail-closed
    where part of it cannot be programmed (`unenforced` then says how)."""
    r = rule.rule
    gaps = enforcement.rule_gaps(r)
    action: ActionName = r.action
    never: str | None = None
    unenforced: str | None = None
    if gaps:
        action, src, dst, never, unenforced = _fail_closed(r, gaps)
    else:
        src, dst = _exact(r.source), _exact(r.destination)
    if r.ip_version is not None and r.ip_version != family:
        never = f"an IPv{r.ip_version} rule"
    protocol = render.protocol_name(r.protocol) if r.protocol is not None else None
    not_protocol = render.protocol_name(r.not_protocol) if r.not_protocol is not None else None
    icmp_type = r.icmp.type if r.icmp is not None else None
    icmp_code = r.icmp.code if r.icmp is not None else None
    spec = RuleSpec(action, protocol, not_protocol, src, dst, icmp_type, icmp_code, never)
    domains = tuple(sorted({validate_domain(d) for d in r.destination.domains}))
    dst_uid = rule.destination.selector.uid if rule.destination.selector else None
    if domains and not gaps:  # load rejects domains with a destination selector
        dst_uid = domain_uid(domains)
    allow_selector = (rule.destination.selector if r.action == "Allow" and not domains
                      and never is None else None)
    return CompiledRule(
        spec,
        dst_selector=allow_selector,
        dst_uid=dst_uid,
        dst_not_uid=rule.destination.not_selector.uid if rule.destination.not_selector else None,
        src_uid=rule.source.selector.uid if rule.source.selector else None,
        src_not_uid=rule.source.not_selector.uid if rule.source.not_selector else None,
        unenforced=unenforced,
        domains=domains if dst_uid is not None and dst_uid.startswith("d:") else (),
    )


def compile_policy(policy: model.Policy, family: int = 4) -> CompiledPolicy:
    compiled = pcompile.policy_selectors(policy)
    order = float("inf") if policy.order is None else policy.order
    return CompiledPolicy(
        key=policy.key,
        tier=policy.tier,
        sort_key=(order, pcompile.policy_sort_name(policy)),
        applies=compiled.applies_to,
        egress=compiled.applies_in("Egress"),
        rules=tuple(compile_rule(r, family) for r in compiled.rules("Egress")),
    )


def compile_tier(tier: model.Tier) -> CompiledTier:
    return CompiledTier(
        tier.name, (False, tier.order is None, tier.order or 0.0, tier.name), tier.default_action
    )


def compile_object(
    obj: model.PolicyObject, family: int = 4
) -> CompiledPolicy | CompiledTier | None:
    """What the enforcer keeps of a policy-topic object (None: nothing, e.g. a network set)."""
    if isinstance(obj, model.Policy):
        return compile_policy(obj, family)
    if isinstance(obj, model.Tier):
        return compile_tier(obj)
    return None
