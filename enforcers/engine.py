"""The node enforcer: follow the topics, keep desired state, program the dataplane.

Two layers:

* ``Programmer`` applies ``state.Plan``s to an ipset backend and iptables, in
  the safe order (sets exist before rules use them and go only after no rule
  does), does the start-up sync (temporary sets swapped in, so enforcement
  never drops) and the periodic resync that repairs what changed behind our
  back.
* ``Enforcer`` reads the policies, memberships and endpoints topics (all
  partitions, no consumer group: every node needs everything), reads them to
  the end before touching the dataplane, then follows them, coalescing records
  that arrive together into one transaction. If the brokers go away it keeps
  what is programmed (fail static) and aiokafka reconnects with backoff.

Dead letters. A record the enforcer cannot use (undecodable key or value, unknown
version, a policy document ``policy.load_document`` rejects, a membership key that
does not parse) is counted, logged and skipped; processing continues. Every node reads
the same topics, so if every enforcer dead-lettered every such record, one bad record
would become hundreds of copies. An enforcer therefore publishes a dead letter
(``rejected_by="enforcer/<node>"``, keyed with the original key) only for records it is
the natural owner of:

* **endpoints** whose value names this node (``"node"``) or whose key is one of this
  node's local endpoints (a local endpoint whose update turned malformed);
* **memberships** of a member local to this node (the key's endpoint part is a local
  endpoint, or the value's ``"node"`` is this node): that node's enforcement is what the
  bad record breaks;
* **policies: never.** The processor's compile agent (``streams.compile``) reads every
  policy record first, with the same decoder and the same ``load_document``, and
  dead-letters the same records; the processor's match agent likewise dead-letters every
  malformed endpoint, so an owned endpoint may have two dead letters (processor and owning
  node), never N.

Memberships no node owns (a network set's members, an unparseable key without a node) are
read by nobody else, so with ``dead_letter_unowned`` (``portcullis enforce
--dead-letter-unowned``, meant for ONE enforcer per cluster, e.g. a ``--dry-run`` auditor)
an enforcer dead-letters every malformed membership it does not own as well (one it
cannot tell is another node's may then have two dead letters, never N); without it those
are only counted and logged. Within
one process a record (topic, partition, offset) is dead-lettered once (a membership
re-read does not repeat it); a restart re-reads the topics and may repeat it, which is
why every dead letter carries topic, partition and offset for consumers to dedupe on.
Publishing runs in the background and never blocks or stops enforcement (fail static):
a failed publish is retried a few times (so a letter may repeat: at-least-once), then
logged and counted (``portcullis_enforcer_dead_letter_failures_total``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import orjson

from enforcers import DEFAULT_FETCH_MIN_BYTES, render
from enforcers import state as state_mod
from enforcers.dns import DnsSettings, DnsSnooper
from enforcers.dnscache import DnsLearner, DomainSets, Learned, MemberChange, domain_uid
from enforcers.dnswire import Segment
from enforcers.flowlog import NameTable
from enforcers.flowlogger import FlowLogger, FlowSettings
from enforcers.interfaces import Addresses, interfaces_holding
from enforcers.ipsets import IpsetBackend, replace_contents
from enforcers.iptables import (
    Actual,
    ApplyResult,
    Iptables,
    RulesRejected,
    chain_hashes,
    chains_to_write,
    copy_chains,
)
from enforcers.metrics import Counter, EnforcerMetrics
from enforcers.render import Chain, restore_text
from policy import enforcement
from policy.labels import effective_labels, network_set_labels
from policy.model import NetworkSet, PolicyObject
from topics import codec
from topics.health import Health
from topics.records import (
    DEFAULT_ALLOW_PROFILE,
    DnsRecord,
    EndpointRecord,
    FlowRecord,
    MembershipRecord,
    PolicyRecord,
    ProfileRecord,
    RecordError,
    profile_key,
    split_membership_key,
    split_profile_key,
)
from topics.specs import DEADLETTER, DNS, ENDPOINTS, FLOWS, MEMBERSHIPS, POLICIES, PROFILES

log = logging.getLogger(__name__)

_MEMBERSHIP_FIELDS = {"v", *MembershipRecord.__dataclass_fields_order__}  # type: ignore[attr-defined]

#: How many times one transaction may find more refused rules before it gives up.
MAX_REFUSAL_ROUNDS = 8
#: How often host endpoints given by IPs are bound to interfaces again (addresses move).
REBIND_INTERVAL = 1.0
#: A failed transaction is tried again from scratch this soon (not at the next resync),
#: then twice as late each time it fails again, up to the resync interval.
RETRY_AFTER_FAILURE = 1.0
#: How often the consumer lag is measured (s).
LAG_INTERVAL = 1.0
#: How often what DNS taught is written to the state file (and at every stop).
DNS_SAVE_INTERVAL = 5.0
SET_PREFIX = "pc-"
TEMP_PREFIX = "pt-"
SET_PREFIX_V6 = "pc6-"  # IPv6 sets (and their temporary twins, "pc6-…~t")

#: Where a record was read: (topic, partition, offset).
Where = tuple[str, int, int]
#: Called with a rejected record this node owns: where, key, value, and why.
RejectHook = Callable[[Where, bytes | None, bytes | None, BaseException], None]


class ChainBackend(Protocol):
    def save(self) -> Actual: ...

    def apply(
        self, desired: Mapping[str, Chain], actual: Actual | None = None,
        changed: Collection[str] | None = None,
    ) -> ApplyResult: ...


class DryRunIptables:
    """Records the restores it would run (for benchmarks with many simulated nodes)."""

    def __init__(self) -> None:
        self.actual = Actual()
        self.restores: list[str] = []

    def save(self) -> Actual:
        return Actual(dict(self.actual.chains), set(self.actual.hooks))

    def apply(
        self, desired: Mapping[str, Chain], actual: Actual | None = None,
        changed: Collection[str] | None = None,
    ) -> ApplyResult:
        """As ``Iptables.apply``: with ``changed``, only those chain names are looked at."""
        actual = actual or self.actual
        write, delete = chains_to_write(desired, actual, changed)
        if write or delete:
            self.restores.append(restore_text(write, delete))
        copy_chains(self.actual.chains, desired, changed, chain_hashes)
        return ApplyResult(tuple(c.name for c in write), delete, ())


@dataclass
class ProgramResult:
    member_ops: int = 0
    chains_written: int = 0
    repairs: int = 0
    applied: bool = False  # whether the dataplane was touched at all


class Programmer:
    """Applies plans to the kernel (or a dry run) and keeps what it believes is programmed."""

    def __init__(
        self, ipsets: IpsetBackend, iptables: ChainBackend | Iptables, family: int = 4
    ) -> None:
        self.ipsets = ipsets
        self.iptables = iptables
        self.family = "inet" if family == 4 else "inet6"
        # the set names this programmer owns (and may destroy when nothing uses them)
        self.owned = (SET_PREFIX, TEMP_PREFIX) if family == 4 else (SET_PREFIX_V6,)
        self.actual: Actual | None = None
        # the ruleset programmed (a copy: the state's own changes until it is applied)
        self.chains: dict[str, Chain] = {}

    def _apply_chains(
        self, chains: Mapping[str, Chain], changed: Collection[str] | None = None
    ) -> int:
        """Make the chains so; with ``changed`` (the names that changed since the last
        call), the cost is proportional to those, not to every chain."""
        if self.actual is None:
            self.actual = self.iptables.save()
            changed = None
        if changed is not None and not changed:
            return 0
        result = self.iptables.apply(chains, self.actual, changed)
        copy_chains(self.actual.chains, chains, changed, chain_hashes)
        copy_chains(self.chains, chains, changed, lambda chain: chain)
        self.actual.hooks |= set(result.hooks_added)
        return len(result.written) + len(result.deleted)

    def apply(self, plan: state_mod.Plan) -> ProgramResult:
        """One dataplane transaction, in the order that never lets a rule see a missing set."""
        for name, members in plan.create_sets.items():
            self.ipsets.create(name, self.family, "hash:net")
            if members:
                self.ipsets.add(name, members)
        for name, members in plan.add.items():
            self.ipsets.add(name, members)
        written = self._apply_chains(plan.chains, plan.changed_chains)
        for name, members in plan.remove.items():
            self.ipsets.delete(name, members)
        for name in plan.destroy_sets:
            self.ipsets.destroy(name)
        return ProgramResult(plan.member_ops, written, applied=True)

    def start(self, state: state_mod.EnforcerState) -> ProgramResult:
        """Program everything after a (re)start without dropping what is enforced now.

        Existing sets are refilled through a temporary twin and swapped in; chains are
        rewritten only where their hashes differ; our sets nothing refers to any more are
        destroyed last.
        """
        state.forget_programmed()
        plan = state.plan()
        existing = self.ipsets.list_sets()
        ops = 0
        for name, members in plan.create_sets.items():
            if name in existing:
                if existing[name] != members:
                    replace_contents(self.ipsets, name, members, self.family)
                    ops += len(members)
            else:
                self.ipsets.create(name, self.family, "hash:net")
                if members:
                    self.ipsets.add(name, members)
                ops += len(members)
        self.actual = self.iptables.save()
        written = self._apply_chains(plan.chains)
        for name in existing:
            if name.startswith(self.owned) and name not in plan.create_sets:
                self.ipsets.destroy(name)
        return ProgramResult(ops, written, applied=True)

    def transaction(
        self, state: state_mod.EnforcerState, initial: bool = False,
        on_refused: Callable[[str], None] | None = None,
    ) -> tuple[ProgramResult, list[float]]:
        """Program what changed in `state` since the last transaction (everything, from
        scratch, with `initial`), and the ``observed_at`` of the changes it covers.

        A rule the kernel refuses never stalls the node: the state enforces it fail-closed
        (`EnforcerState.reject_rule`; `on_refused` hears how) and everything is programmed
        again from scratch, so the rest of the node's policy is still programmed. Other
        failures propagate.
        """
        observed: list[float] | None = None
        for _round in range(MAX_REFUSAL_ROUNDS):
            if initial:
                taken = state.take_observed()
                observed = taken if observed is None else observed + taken
                try:
                    return self.start(state), observed
                except RulesRejected as exc:
                    self._refused(state, exc, on_refused)
                    continue
            plan = state.plan()
            observed = plan.observed_at
            if not plan.member_ops and not plan.destroy_sets and plan.chains_unchanged:
                return ProgramResult(), observed
            try:
                return self.apply(plan), observed
            except RulesRejected as exc:
                self._refused(state, exc, on_refused)
                initial = True  # the plan is half applied: start over, from scratch
        raise RuntimeError(f"the kernel kept refusing rules after {MAX_REFUSAL_ROUNDS} rounds")

    def _refused(
        self, state: state_mod.EnforcerState, exc: RulesRejected,
        on_refused: Callable[[str], None] | None,
    ) -> None:
        placed = [state.reject_rule(r.chain, r.index, r.error) for r in exc.rules]
        if not all(placed):  # not a policy rule: nothing can stand in for it
            raise exc
        for how in placed:
            assert how is not None
            log.error("%s", how)
            if on_refused is not None:
                on_refused(how)

    def resync(self, state: state_mod.EnforcerState) -> ProgramResult:
        """Compare the kernel with what we programmed; repair and count the differences."""
        repairs = 0
        programmed = state.programmed_sets()
        existing = self.ipsets.list_sets()
        for name, members in programmed.items():
            have = existing.get(name)
            if have is None:
                self.ipsets.create(name, self.family, "hash:net")
                have = set()
            missing, extra = members - have, have - members
            if missing:
                self.ipsets.add(name, missing)
            if extra:
                self.ipsets.delete(name, extra)
            repairs += len(missing) + len(extra) + (name not in existing)
        self.actual = self.iptables.save()
        before = self.actual
        result = self.iptables.apply(self.chains, before)
        repairs += len(result.written) + len(result.deleted) + len(result.hooks_added)
        self.actual = Actual(
            {name: c.hashes for name, c in self.chains.items()},
            before.hooks | set(result.hooks_added),
        )
        for name in existing:
            if name.startswith(self.owned) and name not in programmed:
                self.ipsets.destroy(name)
                repairs += 1
        return ProgramResult(0, len(result.written), repairs)


# --------------------------------------------------------------------------- records


def _warn_unenforced(obj: PolicyObject, compiled: object) -> None:
    """Say what of `obj` is not enforced as written: egress rules enforced fail-closed (and
    how), ingress, a network set's domains."""
    if isinstance(compiled, state_mod.CompiledPolicy):
        for index, rule in enumerate(compiled.rules):
            if rule.unenforced is not None:
                log.warning("policy %s, egress rule %d: %s", obj.key, index, rule.unenforced)
    for note in enforcement.notes(obj):
        if not note.startswith("egress rule"):  # said just above, with how it is enforced
            log.warning("%s: %s", obj.key, note)


def _by_ip(rec: EndpointRecord, node: str) -> bool:
    """A local host endpoint that names no interface, only its IPs."""
    return rec.kind == "hostendpoint" and rec.node == node and not rec.interface and bool(
        rec.ips)


def local_endpoint(
    key: str, rec: EndpointRecord, node: str, bound: str | None = None,
    labels: Mapping[str, str] | None = None,
) -> state_mod.LocalEndpoint | None:
    """What `node` enforces for the endpoint record at `key` (None: nothing, not local);
    `bound`: the interfaces a host endpoint given by IPs is on now; `labels`: its effective
    labels (they decide which policies apply to it).

    A pod is a workload: its traffic arrives on its interface. A VM is a workload of the
    hypervisor it runs on (``node`` names the hypervisor; its interfaces are the taps
    there), or, when its enforcer runs inside it (``node`` is the VM's own name, the
    inventory's default), a guest: its traffic leaves through its own interfaces. A host
    endpoint denies after the last tier unless it has Calico's default-allow profile.
    """
    interface = rec.interface or bound
    if rec.node != node or not interface:
        return None
    labels = dict(labels or {})
    if rec.kind == "pod":
        return state_mod.LocalEndpoint(key, "workload", interface, rec.ips, labels=labels)
    if rec.kind == "vm":
        kind: render.EndpointKind = "guest" if rec.name == rec.node else "workload"
        return state_mod.LocalEndpoint(key, kind, interface, rec.ips, labels=labels)
    if rec.kind == "hostendpoint":
        allow = DEFAULT_ALLOW_PROFILE in rec.profiles
        return state_mod.LocalEndpoint(key, "host", interface, rec.ips, allow=allow,
                                       labels=labels)
    return None


class RecordSink:
    """Turns topic records into state updates; bad records are counted and skipped.

    Feeds one state per address family (IPv4, and IPv6 when enabled): the same records,
    each family keeping its own addresses and rules.
    """

    def __init__(
        self,
        state: state_mod.EnforcerState,
        metrics: EnforcerMetrics,
        more: Sequence[state_mod.EnforcerState] = (),
        prune: bool = False,
        on_reject: RejectHook | None = None,
        dead_letter_unowned: bool = False,
        read_addresses: Callable[[], Addresses] | None = None,
        domains: DomainSets | None = None,
    ) -> None:
        """``read_addresses``: the node's interface addresses, to bind host endpoints given
        by ``expectedIPs`` only (None: such endpoints are not enforced, and said so).
        ``domains``: the domain sets policies use and what DNS taught them."""
        self.state = state
        self.domains = domains if domains is not None else DomainSets()
        # policy-topic key -> the domain sets (uid -> patterns) of that policy's rules
        self.domain_uses: dict[str, dict[str, tuple[str, ...]]] = {}
        # network sets with allowedEgressDomains: policy-topic key -> (namespace, own
        # labels, patterns); and, from them, the selectors that select some: selector uid
        # -> (domain set uid, patterns)
        self.domain_network_sets: dict[str, tuple[str | None, dict[str, str],
                                                  tuple[str, ...]]] = {}
        self.selector_domain_use: dict[str, tuple[str, tuple[str, ...]]] = {}
        self.read_addresses = read_addresses
        self.addresses: Addresses | None = None  # the last reading
        # this node's endpoint records (their labels follow profile changes)
        self.local: dict[str, EndpointRecord] = {}
        # the namespace and service-account labels endpoints inherit, by profile key
        self.profiles: dict[str, ProfileRecord] = {}
        # local host endpoints given by their IPs: key -> record, bound again by `rebind`
        self.by_ip: dict[str, EndpointRecord] = {}
        # rejected records this node owns go here (the dead-letter publisher)
        self.on_reject = on_reject
        self.dead_letter_unowned = dead_letter_unowned
        # while reading to the end at start-up, local endpoints are not all known yet: the
        # ownership of rejected records is decided in `settle`, once they are
        self.deferred: list[tuple[str, Where, bytes | None, bytes | None, BaseException]] = []
        self.deferring = False
        self.states = [state, *more]
        # the states that enforce policy (a blocked family needs only the endpoints)
        self.enforcing = [st for st in self.states if not st.blocked]
        # drop remote memberships of selectors no policy uses as a rule peer; only for a
        # reader that re-reads the memberships when ``needs_reread`` says so (the engine)
        self.prune = prune
        self.metrics = metrics
        self.policy_kinds: dict[str, tuple[str, str]] = {}  # kafka key -> (what, state key)

    def endpoint(self, key: str, rec: EndpointRecord | None, observed: bool = True) -> None:
        """Apply an endpoint record (`observed`: count its observed_at as a change's)."""
        bound = None
        if rec is not None and rec.node == self.state.node:
            self.local[key] = rec
        else:
            self.local.pop(key, None)
        if rec is not None and _by_ip(rec, self.state.node):
            self.by_ip[key] = rec
            bound = self._bind(rec)
        else:
            self.by_ip.pop(key, None)
        at = rec.observed_at if rec is not None and observed else None
        labels = self._labels(rec) if rec is not None and key in self.local else {}
        for st in self.states:
            ep = local_endpoint(key, rec, st.node, bound, labels) if rec is not None else None
            if ep is None:
                if key in st.endpoints:
                    st.delete_endpoint(key, at)
                continue
            st.upsert_endpoint(ep, at)

    def _labels(self, rec: EndpointRecord) -> dict[str, str]:
        """An endpoint's effective labels, with what it inherits from its profiles."""
        ns = sa = None
        if rec.namespace is not None:
            ns = self.profiles.get(profile_key(rec.namespace))
            if rec.service_account:
                sa = self.profiles.get(profile_key(rec.namespace, rec.service_account))
        return effective_labels(
            rec.kind, rec.labels, namespace=rec.namespace, service_account=rec.service_account,
            namespace_labels=ns.labels if ns is not None else None,
            service_account_labels=sa.labels if sa is not None else None,
        )

    def profile(self, key: str, rec: ProfileRecord | None) -> None:
        """A namespace's or service account's labels changed: so did its local endpoints'."""
        if rec is None:
            self.profiles.pop(key, None)
        else:
            self.profiles[key] = rec
        namespace, account = split_profile_key(key)
        inheriting = [(k, ep) for k, ep in self.local.items() if ep.namespace == namespace
                      and (account is None or ep.service_account == account)]
        for ep_key, ep in inheriting:
            self.endpoint(ep_key, ep, observed=False)
        if inheriting and rec is not None:
            for st in self.states:
                st.note(rec.observed_at)
        if account is None and any(ns == namespace for ns, _l, _p
                                   in self.domain_network_sets.values()):
            self._refresh_selector_domains()  # its network sets inherit its labels

    def _bind(self, rec: EndpointRecord) -> str | None:
        """The interfaces holding a by-IP host endpoint's addresses, from the last reading."""
        if self.read_addresses is None:
            log.warning("host endpoint %s names no interface and this enforcer cannot read "
                        "the node's addresses: not enforced", rec.key)
            return None
        if self.addresses is None:
            self.addresses = self.read_addresses()
        return interfaces_holding(self.addresses, rec.ips)

    def rebind(self) -> bool:
        """Read the node's addresses again and bind every by-IP host endpoint anew; True if
        any moved (a plan is due). Cheap when there are none."""
        if not self.by_ip or self.read_addresses is None:
            return False
        self.addresses = self.read_addresses()
        before = {key: self.state.endpoints.get(key) for key in self.by_ip}
        for key, rec in list(self.by_ip.items()):
            self.endpoint(key, rec, observed=False)
        moved = [key for key, ep in before.items() if self.state.endpoints.get(key) != ep]
        for key in moved:
            ep = self.state.endpoints.get(key)
            log.info("host endpoint %s is now on %s", key, ep.interface if ep else "no interface")
        return bool(moved)

    def membership(self, key: str, rec: MembershipRecord | None) -> None:
        for st in self.enforcing:
            if rec is None:
                uid, endpoint = split_membership_key(key)
                st.delete_membership(uid, endpoint)
            else:
                st.upsert_membership(rec.selector_uid, rec.endpoint_key, rec.ips, rec.observed_at,
                                     node=rec.node, prune=self.prune)

    def _fast_membership(self, value: bytes) -> bool:
        """Apply a well-formed membership without building the record (the cold-start path).

        Anything unusual returns False, and the full decoder judges it (and names the
        problem); IPs are validated when they become set members.
        """
        try:
            data = orjson.loads(value)
        except orjson.JSONDecodeError:
            return False
        # exact type checks (orjson makes no subclasses; a bool is no timestamp): this runs
        # for every membership read at start-up
        if type(data) is not dict or data.keys() != _MEMBERSHIP_FIELDS or (
            data["v"] != MembershipRecord.VERSION
        ):
            return False
        uid, endpoint, ips, at, node = (
            data["selector_uid"], data["endpoint_key"], data["ips"], data["observed_at"],
            data["node"],
        )
        if (
            type(uid) is not str or not uid or type(endpoint) is not str
            or endpoint.count("/") != 2 or type(ips) is not list
            or (type(at) is not float and type(at) is not int)
            or (node is not None and type(node) is not str)
        ):
            return False
        for ip in ips:
            if type(ip) is not str:
                return False
        for st in self.enforcing:
            st.upsert_membership(uid, endpoint, ips, float(at), node=node, prune=self.prune)
        return True

    def memberships(self, topic: str, partition: int, messages: Iterable[Any]) -> int:
        """A fetched run of membership records (aiokafka ``ConsumerRecord``s): well-formed
        upserts go straight to the fast path, anything else through ``message``. The
        start-up read is mostly this."""
        fast = self._fast_membership
        n = 0
        for msg in messages:
            n += 1
            key, value = msg.key, msg.value
            # an ASCII key is valid UTF-8: what ``message`` would check before the fast path
            try:
                if value is not None and key is not None and key.isascii() and fast(value):
                    continue
            except ValueError:
                pass  # a bad address: ``message`` rejects it and names the problem
            self.message(MEMBERSHIPS.suffix, key, value, (topic, partition, msg.offset))
        return n

    def _elsewhere(self, value: bytes) -> bool:
        """True for a well-formed record of an endpoint on another node (or none)."""
        try:
            data = orjson.loads(value)
        except orjson.JSONDecodeError:
            return False
        return (
            isinstance(data, dict) and data.get("v") == EndpointRecord.VERSION
            and "node" in data and data["node"] != self.state.node
        )

    def policy(self, key: str, rec: PolicyRecord | None) -> None:
        from policy.load import load_document

        obj = None
        if rec is not None:  # load first: a bad document changes nothing
            obj = load_document(rec.document, f"policies topic, key {key}")
        old = self.policy_kinds.pop(key, None)
        observed = rec.observed_at if rec else None
        first: object = None
        for st in self.enforcing:
            if old is not None:
                what, skey = old
                if what == "tier":
                    st.delete_tier(skey, observed)
                else:
                    st.delete_policy(skey, observed)
            if obj is None:
                continue
            compiled = state_mod.compile_object(obj, st.family)
            if isinstance(compiled, state_mod.CompiledTier):
                st.upsert_tier(compiled, observed)
                self.policy_kinds[key] = ("tier", compiled.name)
            elif isinstance(compiled, state_mod.CompiledPolicy):
                st.upsert_policy(compiled, observed)
                self.policy_kinds[key] = ("policy", compiled.key)
            if st is self.enforcing[0]:
                first = compiled
                _warn_unenforced(obj, compiled)
        self._use_domains(key, first if isinstance(first, state_mod.CompiledPolicy) else None)
        had_set = self.domain_network_sets.pop(key, None) is not None
        if isinstance(obj, NetworkSet) and obj.allowed_egress_domains:
            self.domain_network_sets[key] = (obj.namespace, dict(obj.labels),
                                             obj.allowed_egress_domains)
        if had_set or key in self.domain_network_sets or isinstance(
                first, state_mod.CompiledPolicy) or old is not None:
            self._refresh_selector_domains()

    def _refresh_selector_domains(self) -> None:
        """Which selectors of egress Allow rules select network sets with
        allowedEgressDomains: those rules match the IPs of those domains too (Calico)."""
        if not self.domain_network_sets and not self.selector_domain_use:
            return
        sets = []
        for namespace, own, patterns in self.domain_network_sets.values():
            profile = self.profiles.get(profile_key(namespace, None)) if namespace else None
            inherited = profile.labels if profile is not None else None
            sets.append((network_set_labels(own, namespace, inherited), patterns))
        mapping: dict[str, tuple[str, tuple[str, ...]]] = {}
        for pol in self.enforcing[0].policies.values() if self.enforcing else ():
            for rule in pol.rules:
                if rule.dst_selector is None or rule.dst_uid in mapping:
                    continue
                selector = rule.dst_selector
                found = sorted({p for labels, patterns in sets if selector.matches(labels)
                                for p in patterns})
                if found:
                    mapping[rule.dst_selector.uid] = (domain_uid(found), tuple(found))
        old = self.selector_domain_use
        changes: list[MemberChange] = []
        for uid, (domain, patterns) in mapping.items():
            if old.get(uid, ("",))[0] != domain:
                changes += self.domains.use(domain, patterns)
        for uid, (domain, _patterns) in old.items():
            if mapping.get(uid, ("",))[0] != domain:
                changes += self.domains.release(domain)
        self.selector_domain_use = mapping
        self.apply_domain_changes(changes)
        for st in self.enforcing:
            st.set_selector_domains({uid: domain for uid, (domain, _) in mapping.items()})

    def _use_domains(self, key: str, policy: state_mod.CompiledPolicy | None) -> None:
        """Follow which domain sets a policy's rules use (a set in use is filled with what
        DNS taught already; one no policy uses is emptied)."""
        new = {r.dst_uid: r.domains for r in policy.rules
               if r.domains and r.dst_uid} if policy is not None else {}
        old = self.domain_uses.pop(key, {})
        changes: list[MemberChange] = []
        for uid, patterns in new.items():
            if uid not in old:
                changes += self.domains.use(uid, patterns)
        for uid in old:
            if uid not in new:
                changes += self.domains.release(uid)
        if new:
            self.domain_uses[key] = new
        self.apply_domain_changes(changes)

    def apply_domain_changes(
        self, changes: Iterable[MemberChange], observed_at: float | None = None
    ) -> None:
        """Put what DNS taught (or forgot) into every enforcing state's domain sets."""
        for uid, member, ips in changes:
            for st in self.enforcing:
                if ips is None:
                    st.delete_membership(uid, member, observed_at)
                else:
                    st.upsert_membership(uid, member, ips, observed_at)

    def owns(self, suffix: str, key_raw: bytes | None, value: bytes | None) -> bool:
        """Whether a rejected record is this node's to dead-letter (see the module docstring)."""
        if suffix == POLICIES.suffix:
            return False  # the processor's compile agent dead-letters bad policies
        key = key_raw.decode("utf-8", "replace") if key_raw is not None else ""
        local = self.state.endpoints
        if suffix == ENDPOINTS.suffix and key in local:
            return True
        if suffix == MEMBERSHIPS.suffix:
            with contextlib.suppress(RecordError):
                if split_membership_key(key)[1] in local:
                    return True
        if _names_node(value, self.state.node):
            return True
        return suffix == MEMBERSHIPS.suffix and self.dead_letter_unowned

    def message(
        self, suffix: str, key_raw: bytes | None, value: bytes | None, where: Where | None = None
    ) -> None:
        """Apply one record; a bad one is counted, logged, and (if this node owns it and
        `where` it was read is known) handed to `on_reject` for the dead-letter topic."""
        try:
            key = codec.decode_key(key_raw)
            if suffix == MEMBERSHIPS.suffix:
                if value is not None and self._fast_membership(value):
                    return
                self.membership(key, codec.decode_as(MembershipRecord, value))
            elif suffix == ENDPOINTS.suffix:
                if value is not None and key not in self.local and self._elsewhere(value):
                    return  # another node's endpoint: nothing to enforce here
                self.endpoint(key, codec.decode_as(EndpointRecord, value))
            elif suffix == POLICIES.suffix:
                self.policy(key, codec.decode_as(PolicyRecord, value))
            elif suffix == PROFILES.suffix:
                self.profile(key, codec.decode_as(ProfileRecord, value))
        except (RecordError, ValueError) as exc:
            self.metrics.rejected.inc()
            at = f"[{where[1]}]@{where[2]}" if where else ""
            log.warning("skipping a record on %s%s: %s", suffix, at, exc)
            if where is None or self.on_reject is None:
                return
            if self.owns(suffix, key_raw, value):
                self.on_reject(where, key_raw, value, exc)
            elif self.deferring:
                self.deferred.append((suffix, where, key_raw, value, exc))

    def settle(self) -> None:
        """Decide the rejected records held back during start-up, now every local endpoint is
        known (a membership of a local pod may be read before the pod's endpoint record)."""
        deferred, self.deferred, self.deferring = self.deferred, [], False
        for suffix, where, key_raw, value, exc in deferred:
            if self.on_reject is not None and self.owns(suffix, key_raw, value):
                self.on_reject(where, key_raw, value, exc)


def _names_node(value: bytes | None, node: str) -> bool:
    """True if `value` is a JSON object whose ``"node"`` is `node` (however bad the rest)."""
    if value is None:
        return False
    try:
        data = orjson.loads(value)
    except orjson.JSONDecodeError:
        return False
    return isinstance(data, dict) and data.get("node") == node


# --------------------------------------------------------------------------- dead letters


class BackgroundPublisher:
    """Publishes records in the background (dead letters, what DNS taught, flow records),
    so a slow or absent broker never holds up enforcement; each dead letter's (topic,
    partition, offset) is queued once per process (a retry after a send timed out may
    still repeat it: records are at-least-once)."""

    def __init__(
        self,
        kafka_kwargs: Mapping[str, Any],
        topic: str,
        rejected_by: str,
        metrics: EnforcerMetrics,
        max_pending: int = 10_000,
        attempts: int = 3,
        send_timeout: float = 10.0,
        partition: int | None = 0,
        counters: tuple[Counter, Counter] | None = None,
    ) -> None:
        """``partition``: where every record goes (None: by key); ``counters``: (sent,
        failed) for records other than dead letters (``put``)."""
        self.kafka_kwargs = dict(kafka_kwargs)
        self.topic = topic
        self.rejected_by = rejected_by
        self.metrics = metrics
        self.attempts = attempts
        self.send_timeout = send_timeout
        self.partition = partition
        self.sent, self.failed = counters or (metrics.dead_letters, metrics.dead_letter_failures)
        self.queue: asyncio.Queue[tuple[str, bytes | None, bytes]] = asyncio.Queue(max_pending)
        self.seen: set[Where] = set()

    def put(self, key: bytes, payload: bytes, what: str) -> None:
        """Queue any record for this topic (``what`` names it in logs); never raises."""
        try:
            self.queue.put_nowait((what, key, payload))
        except asyncio.QueueFull:
            self.failed.inc()
            log.error("cannot queue %s: %d records wait already", what, self.queue.qsize())

    def reject(
        self, where: Where, key: bytes | None, value: bytes | None, error: BaseException
    ) -> None:
        """Queue the dead letter of a rejected record (a `RejectHook`); never raises."""
        if where in self.seen:
            return
        self.seen.add(where)
        try:
            letter = codec.dead_letter(*where, key, value, error, rejected_by=self.rejected_by)
            what = "the dead letter for {}[{}]@{}".format(*where)
            self.queue.put_nowait((what, key, codec.encode(letter)))
        except (RecordError, asyncio.QueueFull) as exc:
            self.metrics.dead_letter_failures.inc()
            log.error("cannot queue the dead letter for %s[%d]@%d: %s", *where,
                      exc if str(exc) else type(exc).__name__)

    async def run(self) -> None:
        """Send queued dead letters until cancelled; failures are retried, then logged."""
        from aiokafka import AIOKafkaProducer

        producer: Any = None
        try:
            while True:
                what, key, payload = await self.queue.get()
                try:
                    for attempt in range(1, self.attempts + 1):
                        try:
                            if producer is None:
                                producer = AIOKafkaProducer(**self.kafka_kwargs, acks="all")
                                await producer.start()
                            await asyncio.wait_for(
                                producer.send_and_wait(self.topic, payload, key=key,
                                                       partition=self.partition),
                                self.send_timeout,
                            )
                            self.sent.inc()
                            break
                        except Exception as exc:
                            if producer is not None:
                                await _close(producer)
                            producer = None
                            if attempt == self.attempts:
                                self.failed.inc()
                                log.error("giving up on %s after %d attempts (enforcement "
                                          "goes on): %r", what, attempt, exc)
                            else:
                                log.warning("publishing %s failed (%r); retrying", what, exc)
                                await asyncio.sleep(0.2 * 2**attempt)
                finally:
                    self.queue.task_done()
        finally:
            if producer is not None:
                await _close(producer)

    async def stop(self, task: asyncio.Task[None], drain: float = 2.0) -> None:
        """Give what is queued up to `drain` seconds to go out, then stop the task."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.queue.join(), drain)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


#: The name it had while it published dead letters only.
DeadLetterPublisher = BackgroundPublisher


# --------------------------------------------------------------------------- the loop


class Enforcer:
    """Follows the topics and keeps this node's dataplane equal to policy."""

    def __init__(
        self,
        state: state_mod.EnforcerState,
        programmer: Programmer,
        kafka_kwargs: Mapping[str, Any],
        topic_prefix: str,
        metrics: EnforcerMetrics | None = None,
        batch_window: float = 0.003,
        resync_interval: float = 30.0,
        ipv6: tuple[state_mod.EnforcerState, Programmer] | None = None,
        prune_memberships: bool = True,
        dead_letter_unowned: bool = False,
        fetch_max_wait_ms: int = 50,
        fetch_min_bytes: int = DEFAULT_FETCH_MIN_BYTES,
        read_addresses: Callable[[], Addresses] | None = None,
        dns: DnsSettings | None = None,
        flows: FlowSettings | None = None,
        health: Health | None = None,
        ready_max_lag: int = 1000,
    ) -> None:
        """``flows``: log connection attempts and publish them on the flows topic (the
        states must render the rules: ``EnforcerState(flows=settings.rules())``).

        ``health``: beaten by the main loop (if it registered a ``main`` loop) and told
        whether the node is ready: the topics read to the end once, the dataplane
        programmed, and at most ``ready_max_lag`` records not consumed yet. Brokers out of
        reach are a note, not a failure: the enforcer fails static by design.

        ``read_addresses``: the node's interface addresses (see ``RecordSink``); read
        again every ``REBIND_INTERVAL`` while host endpoints given by IPs exist.

        ``dns``: learn domain-rule IPs from the DNS answers of these trusted servers (the
        states must capture them: ``EnforcerState(dns=settings.capture())``); None: domain
        rules match nothing (fail closed).

        ``batch_window``: transactions start at most this often; a change arriving after
        a quiet spell is applied at once, one arriving within the window of the previous
        transaction waits for the window's end, with whatever else arrives meanwhile.

        ``fetch_max_wait_ms``: how long the broker may hold a fetch that has no records.
        Apache Kafka answers a held fetch as soon as a record arrives, so this only bounds
        idle fetching (one request per wait per node). Tansu does not: a record produced
        while a fetch is held waits for that fetch to time out, so on Tansu this bounds
        the change latency too (measured in ``benchmarks/enforcer_bench.py``).

        ``fetch_min_bytes``: the broker holds a fetch until this much is there (or
        ``fetch_max_wait_ms`` passed). 1: every record is fetched as soon as it arrives;
        more: fewer fetches, each worth up to ``fetch_max_wait_ms`` of records, so less
        CPU per record at the price of up to that wait in latency (see
        `enforcers.DEFAULT_FETCH_MIN_BYTES`).
        """
        if fetch_max_wait_ms < 0:
            raise ValueError(f"fetch_max_wait_ms must not be negative, got {fetch_max_wait_ms}")
        if fetch_min_bytes < 1:
            raise ValueError(f"fetch_min_bytes must be at least 1, got {fetch_min_bytes}")
        self.fetch_max_wait_ms = fetch_max_wait_ms
        self.fetch_min_bytes = fetch_min_bytes
        self.state = state
        self.programmer = programmer
        # one (state, programmer) plane per address family; IPv4 first
        self.planes = [(state, programmer)] + ([ipv6] if ipv6 else [])
        self.kafka_kwargs = dict(kafka_kwargs)
        self.prefix = topic_prefix
        self.metrics = metrics or EnforcerMetrics()
        self.dead_letters = BackgroundPublisher(
            kafka_kwargs, DEADLETTER.name(topic_prefix), f"enforcer/{state.node}", self.metrics
        )
        learner = DnsLearner(dns.grace, dns.max_ips) if dns else DnsLearner()
        self.sink = RecordSink(
            state, self.metrics, [p[0] for p in self.planes[1:]], prune=prune_memberships,
            on_reject=self.dead_letters.reject, dead_letter_unowned=dead_letter_unowned,
            read_addresses=read_addresses, domains=DomainSets(learner),
        )
        self.dns_settings = dns
        self.dns_events = None if dns is None or not dns.publish else BackgroundPublisher(
            kafka_kwargs, DNS.name(topic_prefix), f"enforcer/{state.node}", self.metrics,
            partition=None, counters=(self.metrics.dns_published,
                                      self.metrics.dns_publish_failures))
        self.dns = None if dns is None else DnsSnooper(
            dns, self.sink.domains, self._apply_dns, self.metrics,
            self._publish_dns if self.dns_events is not None else None)
        # name -> (IPs, when) of its last publication: an unchanged answer is published
        # again only once half its TTL has passed (a busy name costs no record per lookup)
        self._dns_published: dict[str, tuple[tuple[str, ...], float]] = {}
        self._dns_saved_at = time.monotonic()
        self.flow_events = None if flows is None else BackgroundPublisher(
            kafka_kwargs, FLOWS.name(topic_prefix), f"enforcer/{state.node}", self.metrics,
            partition=None, counters=(self.metrics.flow_records,
                                      self.metrics.flow_publish_failures))
        self.flows = None if flows is None else FlowLogger(
            state.node, flows, self.metrics, self._flow_names, self._local_ips,
            self._publish_flow)
        # bumped by every transaction that changed something: the flow logger's names and
        # local IPs are built again only then
        self._generation = 0
        self._names: tuple[int, NameTable] | None = None
        self._ips: tuple[int, dict[str, str]] | None = None
        self.batch_window = batch_window
        self._last_transaction = float("-inf")  # when the last one finished (monotonic)
        self.resync_interval = resync_interval
        self.synced = asyncio.Event()
        self._need_restart = False
        self.topics = {s.name(topic_prefix): s.suffix
                       for s in (POLICIES, PROFILES, MEMBERSHIPS, ENDPOINTS)}
        self.health = health or Health("enforcer")
        self.ready_max_lag = ready_max_lag
        self.health.set("synced", False, "reading the topics to their end")
        self.health.set("programmed", False, "not programmed yet")
        self.health.set("lag", False, "not consuming yet")
        self._lag_checked = float("-inf")

    def _beat(self) -> None:
        if "main" in self.health.beats:
            self.health.beat("main")

    def _connected(self, up: bool) -> None:
        self.metrics.connected.set(1 if up else 0)
        self.health.note("brokers", None if up else
                         "unreachable: keeping the programmed dataplane (fail static)")

    async def _update_lag(self, consumer: Any) -> None:
        """Lag per partition (gauges) and the readiness condition, at most once a second."""
        if time.monotonic() - self._lag_checked < LAG_INTERVAL:
            return
        self._lag_checked = time.monotonic()
        total = 0
        for tp in consumer.assignment():
            highwater = consumer.highwater(tp)
            if highwater is None:
                continue
            lag = max(0, highwater - await consumer.position(tp))
            self.metrics.lag.set(lag, topic=tp.topic, partition=tp.partition)
            total += lag
        ok = total <= self.ready_max_lag
        self.health.set("lag", ok, f"{total} record(s) behind (ready at most "
                        f"{self.ready_max_lag})")

    async def _consumer(self, stop: asyncio.Event) -> Any:
        """A started consumer assigned every partition, or None if stopped while retrying."""
        from aiokafka import AIOKafkaConsumer, TopicPartition

        backoff = 0.2
        while not stop.is_set():
            consumer = AIOKafkaConsumer(
                **self.kafka_kwargs, group_id=None, enable_auto_commit=False,
                auto_offset_reset="earliest", max_poll_records=10_000,
                fetch_max_wait_ms=self.fetch_max_wait_ms, fetch_min_bytes=self.fetch_min_bytes,
            )
            try:
                await consumer.start()
                # the consumer's own cluster view only tracks subscribed topics: ask for all
                cluster = await consumer._client.fetch_all_metadata()
                missing = sorted(t for t in self.topics if not cluster.partitions_for_topic(t))
                if missing:
                    raise RuntimeError(
                        f"topics {', '.join(missing)} do not exist (yet); "
                        "run `portcullis topics create`"
                    )
                parts = [
                    TopicPartition(t, p)
                    for t in self.topics
                    for p in sorted(cluster.partitions_for_topic(t) or ())
                ]
                consumer.assign(parts)
                await consumer.seek_to_beginning(*parts)
                self._connected(True)
                return consumer
            except Exception as exc:
                self._connected(False)
                self._beat()
                await _close(consumer)
                log.warning("brokers not usable yet (%s); retrying in %.1fs", exc, backoff)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), backoff)
                backoff = min(backoff * 2, 10.0)
        return None

    def _take(self, batch: Mapping[Any, Iterable[Any]]) -> int:
        """Hand records to the states, policies first (so fewer memberships are pruned)."""
        n = 0
        order = sorted(batch.items(), key=lambda item: self.topics[item[0].topic] != "policies")
        for tp, messages in order:
            suffix = self.topics[tp.topic]
            before = n
            if suffix == MEMBERSHIPS.suffix:
                n += self.sink.memberships(tp.topic, tp.partition, messages)
            else:
                for msg in messages:
                    self.sink.message(
                        suffix, msg.key, msg.value, (tp.topic, tp.partition, msg.offset))
                    n += 1
            self.metrics.records.inc(n - before, topic=suffix)
        if n:
            self.metrics.last_record.set(time.time())
        return n

    async def _read_to_end(self, consumer: Any) -> int:
        """Read every topic to its current end: policies first, so rule peers are known
        before their memberships arrive and nothing needed is pruned."""
        assigned = list(consumer.assignment())
        end = await consumer.end_offsets(assigned)
        self.sink.deferring = True
        n = 0
        policies = [tp for tp in assigned if self.topics[tp.topic] == POLICIES.suffix]
        for parts in (policies, assigned):
            while True:
                self._beat()
                pending = [tp for tp in parts if await consumer.position(tp) < end[tp]]
                if not pending:
                    break
                batch = await consumer.getmany(*pending, timeout_ms=200)
                n += self._take(batch)
        # what was fetched already goes into the first transaction too (Tansu reports the
        # end offset as its last batch's base + 1: the rest of that batch is buffered here)
        for _ in range(10):  # bounded: a busy cluster never holds the first program back
            batch = await consumer.getmany(timeout_ms=0)
            if not batch:
                break
            n += self._take(batch)
        self.sink.settle()
        if any(st.needs_reread for st in self.sink.states):
            await self._reread_memberships(consumer)
        return n

    async def _reread_memberships(self, consumer: Any) -> None:
        """Read the memberships again up to where we are: a selector whose memberships were
        pruned is now used by a rule. Rare (a new rule peer whose memberships came first)."""
        from aiokafka import AIOKafkaConsumer

        started = time.monotonic()
        parts = [tp for tp in consumer.assignment()
                 if self.topics[tp.topic] == MEMBERSHIPS.suffix]
        until = {tp: await consumer.position(tp) for tp in parts}
        marks = [len(st.observed) for st in self.sink.states]  # history is not latency
        reader = AIOKafkaConsumer(**self.kafka_kwargs, group_id=None, enable_auto_commit=False,
                                  max_poll_records=10_000)
        await reader.start()
        n = 0
        try:
            reader.assign(parts)
            await reader.seek_to_beginning(*parts)
            while True:
                pending = [tp for tp in parts if await reader.position(tp) < until[tp]]
                if not pending:
                    break
                batch = await reader.getmany(*pending, timeout_ms=200)
                for tp, messages in batch.items():
                    for msg in messages:
                        if msg.offset < until[tp]:
                            self.sink.message(MEMBERSHIPS.suffix, msg.key, msg.value,
                                              (tp.topic, tp.partition, msg.offset))
                            n += 1
        finally:
            await _close(reader)
        for st, mark in zip(self.sink.states, marks, strict=True):
            st.reread_done()
            del st.observed[mark:]
        self.metrics.rereads.inc()
        log.info("re-read %d memberships for selectors that became rule peers in %.0f ms",
                 n, (time.monotonic() - started) * 1000)

    def _program(self, initial: bool = False) -> None:
        """One dataplane transaction per family for everything taken since the last one."""
        started = time.monotonic()
        observed: list[float] = []
        ops = chains = 0
        changed = False
        for index, (st, programmer) in enumerate(self.planes):
            try:
                result, plane_observed = programmer.transaction(
                    st, initial, lambda _how: self.metrics.refused_rules.inc())
            except Exception:
                self.metrics.errors.inc()
                log.exception("dataplane transaction failed; it starts over from scratch soon")
                st.forget_programmed()
                self._need_restart = True
                continue
            changed = changed or result.applied
            if index == 0:  # the same records reach every family: count them once
                observed = plane_observed
            ops += result.member_ops
            chains += result.chains_written
        if initial:
            self.metrics.in_sync.set(0 if self._need_restart else 1)
        if self._need_restart:
            self.health.set("programmed", False, "a dataplane transaction failed; retrying")
        else:
            self.metrics.last_program.set(time.time())
            self.health.set("programmed", True, "dataplane programmed")
        if initial or changed:
            self._generation += 1
            self.metrics.batches.inc()
        self.metrics.member_ops.inc(ops)
        self.metrics.chains_written.inc(chains)
        self._observe(observed, initial)
        self._last_transaction = time.monotonic()
        if initial or changed:
            log.debug("programmed %d member ops, %d chains in %.1f ms",
                      ops, chains, (self._last_transaction - started) * 1000)

    def _apply_dns(self, changes: list[MemberChange], _learned_at: float) -> None:
        """What a DNS answer taught, programmed now (its answer waits for this)."""
        self.sink.apply_domain_changes(changes)
        if self.synced.is_set():  # before, the initial programming takes them
            self._program()
        self._dns_gauges()

    def _publish_dns(self, learned: Learned, segment: Segment, now: float) -> None:
        if self.dns_events is None:
            return
        last = self._dns_published.get(learned.name)
        if last is not None and last[0] == learned.ips and now - last[1] < learned.ttl / 2:
            return
        if len(self._dns_published) > 2 * max(1024, len(self.sink.domains.learner.names)):
            self._dns_published = {n: v for n, v in self._dns_published.items()
                                   if n in self.sink.domains.learner.names}
        self._dns_published[learned.name] = (learned.ips, now)
        endpoint = next((ep.key for st in self.sink.enforcing for ep in st.endpoints.values()
                         if segment.destination in ep.ips), None)
        try:
            record = DnsRecord(self.state.node, endpoint, segment.destination, segment.source,
                               learned.name, learned.ips, learned.ttl, now)
        except RecordError as exc:
            log.warning("not publishing what DNS taught about %r: %s", learned.name, exc)
            return
        self.dns_events.put(codec.encode_key(record), codec.encode(record),
                            f"the DNS answer for {learned.name}")

    def _flow_names(self) -> NameTable:
        """The policies and tiers behind flow-log tags now (built again after changes)."""
        if self._names is None or self._names[0] != self._generation:
            policies = {key: pol.tier for st in self.sink.enforcing
                        for key, pol in st.policies.items()}
            self._names = (self._generation, NameTable.from_policies(policies))
        return self._names[1]

    def _local_ips(self) -> dict[str, str]:
        """Local endpoints' keys by IP now (built again after changes)."""
        if self._ips is None or self._ips[0] != self._generation:
            ips = {ip: ep.key for st in self.sink.states for ep in st.endpoints.values()
                   for ip in ep.ips}
            self._ips = (self._generation, ips)
        return self._ips[1]

    def _publish_flow(self, record: FlowRecord) -> None:
        if self.flow_events is not None:
            self.flow_events.put(codec.encode_key(record), codec.encode(record),
                                 f"a flow record of {record.source_ip} -> {record.dest_ip}")

    def _start_flows(self) -> None:
        if self.flows is not None and not self.flows.start(asyncio.get_running_loop()):
            for st in self.sink.states:
                st.drop_flow_logs()  # nobody reads the group: no rules for it

    def _restore_dns(self) -> None:
        """Take back what DNS taught before a restart (the state file), minus what expired."""
        path = self.dns_settings.state_file if self.dns_settings else None
        if not path or not os.path.exists(path):
            return
        try:
            with open(path, "rb") as f:
                changes = self.sink.domains.restore(orjson.loads(f.read()), time.time())
        except (OSError, ValueError) as exc:
            log.warning("ignoring the DNS state file %s: %s", path, exc)
            return
        self.sink.apply_domain_changes(changes)
        log.info("restored %d learned names from %s", len(self.sink.domains.learner.names), path)

    def _save_dns(self) -> None:
        """Write what DNS taught to the state file (atomically: a crash leaves the old one)."""
        path = self.dns_settings.state_file if self.dns_settings else None
        self._dns_saved_at = time.monotonic()
        if not path:
            return
        try:
            directory = os.path.dirname(os.path.abspath(path))
            os.makedirs(directory, exist_ok=True)
            temporary = f"{path}.{os.getpid()}.tmp"
            with open(temporary, "wb") as f:
                f.write(orjson.dumps(self.sink.domains.learner.snapshot()))
            os.replace(temporary, path)
        except OSError as exc:
            log.warning("cannot save the DNS state to %s: %s", path, exc)

    def _dns_gauges(self) -> None:
        stats = self.sink.domains.learner.stats
        self.metrics.dns_evictions.set(stats.evictions)
        self.metrics.dns_expired.set(stats.expired)
        self.metrics.dns_names.set(len(self.sink.domains.learner.names))

    def _start_dns(self) -> None:
        if self.dns is None:
            return
        try:
            self.dns.start(asyncio.get_running_loop())
        except OSError as exc:
            self.metrics.dns_errors.inc()
            log.error("cannot bind NFQUEUE %d for DNS learning (%s): domain rules match "
                      "nothing (fail closed) until the enforcer is restarted with it",
                      self.dns.settings.queue, exc)
            for st in self.sink.states:
                st.drop_dns_capture()  # nobody would read the queue: answers pass unheld

    def _observe(self, observed: list[float], initial: bool = False) -> None:
        if initial:
            return  # history, not latency
        now = time.time()
        for at in observed:
            self.metrics.latency.observe(max(0.0, now - at))
        if observed and log.isEnabledFor(logging.DEBUG):
            log.debug("latency observed_at -> programmed: max %.1f ms over %d changes",
                      (now - min(observed)) * 1000, len(observed))

    def resync(self) -> int:
        repairs = 0
        for st, programmer in self.planes:
            repairs += programmer.resync(st).repairs
        self.metrics.resyncs.inc()
        self.metrics.repairs.inc(repairs)
        if repairs:
            log.warning("resync repaired %d differences", repairs)
        return repairs

    async def run(self, stop: asyncio.Event | None = None) -> None:
        stop = stop or asyncio.Event()
        self._need_restart = False
        consumer = await self._consumer(stop)
        if consumer is None:
            return
        publishing = asyncio.create_task(self.dead_letters.run())
        dns_publishing = (asyncio.create_task(self.dns_events.run())
                          if self.dns_events is not None else None)
        flow_publishing = (asyncio.create_task(self.flow_events.run())
                           if self.flow_events is not None else None)
        try:
            n = await self._read_to_end(consumer)
            log.info("read %d records to the end of the topics; programming", n)
            if self.dns is not None:
                self._restore_dns()
            self._start_dns()  # before the rules that queue answers exist
            self._start_flows()
            self._program(initial=True)
            self.synced.set()
            self.health.set("synced", True, f"read {n} record(s) to the end of the topics")
            next_resync = time.monotonic() + self.resync_interval
            retry_after, retry_at = RETRY_AFTER_FAILURE, None
            next_rebind = time.monotonic() + REBIND_INTERVAL
            dirty = False
            while not stop.is_set():
                self._beat()
                await self._update_lag(consumer)
                timeout = max(0.0, min(0.5, next_resync - time.monotonic()))
                batch = await consumer.getmany(timeout_ms=int(timeout * 1000))
                if self._take(batch):
                    # a transaction ran within the window: gather until it has passed
                    deadline = self._last_transaction + self.batch_window
                    while (left := deadline - time.monotonic()) > 0:
                        more = await consumer.getmany(timeout_ms=max(1, round(left * 1000)))
                        if not more:
                            break
                        self._take(more)
                    dirty = True
                if self.dns is not None:
                    expired = self.dns.expire(time.time())
                    if expired:
                        self.sink.apply_domain_changes(expired)
                        self._dns_gauges()
                        dirty = True
                    if time.monotonic() - self._dns_saved_at >= DNS_SAVE_INTERVAL:
                        self._save_dns()
                if self.flows is not None:
                    self.flows.tick(time.time())
                if self.sink.by_ip and time.monotonic() >= next_rebind:
                    next_rebind = time.monotonic() + REBIND_INTERVAL
                    try:
                        dirty = self.sink.rebind() or dirty
                    except Exception as exc:  # keep what is bound; try again next time
                        log.warning("reading the node's addresses failed: %s", exc)
                if dirty and any(st.needs_reread for st in self.sink.states):
                    try:
                        await self._reread_memberships(consumer)
                    except Exception as exc:  # keep what is programmed; retry shortly
                        log.warning("re-reading the memberships failed (%s); will retry", exc)
                        await asyncio.sleep(0.5)
                        continue
                if dirty:
                    dirty = False
                    initial, self._need_restart = self._need_restart, False
                    self._program(initial=initial)
                if self._need_restart and retry_at is None:  # a failure: retry, backing off
                    retry_at = time.monotonic() + retry_after
                    next_resync = min(next_resync, retry_at)
                    retry_after = min(retry_after * 2, self.resync_interval)
                elif not self._need_restart:
                    retry_after = RETRY_AFTER_FAILURE
                if time.monotonic() >= next_resync:
                    next_resync = time.monotonic() + self.resync_interval
                    retry_at = None
                    await self._check_brokers(consumer)
                    try:
                        if self._need_restart:
                            self._need_restart = False
                            self._program(initial=True)
                        else:
                            self.resync()
                    except Exception:
                        self.metrics.errors.inc()
                        log.exception("resync failed; will retry")
        finally:
            if self.dns is not None:
                self.dns.stop(asyncio.get_running_loop())
                self._save_dns()
            if self.dns_events is not None and dns_publishing is not None:
                await self.dns_events.stop(dns_publishing)
            if self.flows is not None:
                self.flows.stop(asyncio.get_running_loop())
                self.flows.flush(time.time())  # the last interval's attempts too
            if self.flow_events is not None and flow_publishing is not None:
                await self.flow_events.stop(flow_publishing)
            await self.dead_letters.stop(publishing)
            await _close(consumer)

    async def _check_brokers(self, consumer: Any) -> None:
        try:
            await asyncio.wait_for(consumer.topics(), 2.0)
            self._connected(True)
        except Exception:
            if self.metrics.connected.value:
                log.warning("brokers unreachable; keeping the programmed dataplane (fail static)")
            self._connected(False)


async def _close(consumer: Any) -> None:
    """Stop a consumer (or producer); with the brokers gone aiokafka may raise while closing."""
    try:
        await asyncio.wait_for(consumer.stop(), 5)
    except (Exception, asyncio.CancelledError) as exc:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise
        log.debug("consumer did not close cleanly: %r", exc)
