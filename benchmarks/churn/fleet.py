"""Many dry-run node enforcers in one process, timed as if each ran on its own machine.

Each simulated node is the enforcer's own pure core and programmer (`enforcers.state`
`EnforcerState`, `enforcers.engine.RecordSink` and `Programmer` over `DryRunIpsets` and
`DryRunIptables`); only the Kafka consumer is shared: one consumer reads the topics and
hands each node the records it would read itself.

What a node receives: every policy record; its own endpoints; every membership of one of
its own endpoints; and every membership of a selector some egress rule refers to (a
superset of what its rules need; the node's state keeps set contents only for the
selectors its local rules need, the rest as a compact record, as the real enforcer does).
With ``read_all`` (the surge scenarios) every node instead reads every endpoint and
membership record itself, as raw bytes through the engine's `RecordSink.message`, as a
real enforcer reads the whole topics: its CPU then includes decoding and filtering the
whole cluster's churn (only the Kafka fetch is shared).
When a new policy refers to a new peer selector, the members already known are replayed to
every node (the simulation's re-read), so nothing is missed whatever order the topics are
read in.

Timing. The nodes share this process and two cores, so wall-clock time would charge each
node for the work of all the others. Each node therefore keeps a simulated clock: a batch
starts when its last record reached us (or when the node finished its previous batch) and
takes the CPU time this node's own work took. ``observed_at`` → that simulated completion
is the node's programming latency; the wall-clock latency is recorded too.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Container, Iterable, Mapping
from dataclasses import dataclass, field

from enforcers.engine import DryRunIptables, Programmer, ProgramResult, RecordSink
from enforcers.ipsets import DryRunIpsets, replace_contents, set_name
from enforcers.metrics import EnforcerMetrics
from enforcers.state import EnforcerState, compile_policy, ips_of, set_members
from policy.load import PolicyError, load_document
from policy.model import Policy
from topics import codec
from topics.records import (
    EndpointRecord,
    MembershipRecord,
    PolicyRecord,
    ProfileRecord,
    RecordError,
    split_membership_key,
)
from topics.specs import ENDPOINTS, MEMBERSHIPS

__all__ = ["Fleet", "NodeSim", "Sample"]

#: (observed_at, node, simulated latency, wall latency, programmed at (simulated epoch))
Sample = tuple[float, str, float, float, float]
#: a record as read from the topic: (key, value) bytes
Raw = tuple[bytes | None, bytes | None]


@dataclass
class NodeSim:
    """One simulated node: the enforcer's state and programmer, with its own clock."""

    name: str
    state: EnforcerState
    programmer: Programmer
    sink: RecordSink
    ipsets: DryRunIpsets
    started: bool = False
    dirty: bool = False
    busy_until: float = 0.0
    cpu: float = 0.0
    batches: int = 0
    member_ops: int = 0
    pending: list[tuple[float, Callable[..., object], tuple[object, ...]]] = field(
        default_factory=list)

    @classmethod
    def create(cls, name: str) -> NodeSim:
        state = EnforcerState(name, set_name)
        ipsets = DryRunIpsets()
        return cls(name, state, Programmer(ipsets, DryRunIptables()),
                   RecordSink(state, EnforcerMetrics(), prune=True), ipsets)

    def restart(self) -> None:
        """A crashed enforcer: its memory is gone, the kernel (dry-run sets) keeps its state."""
        self.state = EnforcerState(self.name, set_name)
        self.sink = RecordSink(self.state, EnforcerMetrics(), prune=True)
        self.programmer = Programmer(self.ipsets, DryRunIptables())
        self.started = False
        self.dirty = False


@dataclass
class Fleet:
    """Routes topic records to simulated nodes and programs the nodes that changed."""

    nodes: dict[str, NodeSim]
    #: endpoint key -> time of the churn event that last changed it (for tombstones,
    #: which carry no observed_at of their own)
    cause: dict[str, float] = field(default_factory=dict)
    samples: list[Sample] = field(default_factory=list)
    on_sample: Callable[[Sample], None] | None = None
    policies: dict[str, PolicyRecord] = field(default_factory=dict)
    profiles: dict[str, ProfileRecord] = field(default_factory=dict)
    endpoints: dict[str, EndpointRecord] = field(default_factory=dict)
    memberships: dict[str, MembershipRecord] = field(default_factory=dict)
    by_uid: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    peer_uids: dict[str, set[str]] = field(default_factory=dict)  # policy key -> rule uids
    peer_count: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    records: int = 0
    rejected: int = 0
    #: how long a node waits for more records before a transaction (the engine's default)
    batch_window: float = 0.003
    #: the baseline: every transaction renders everything from scratch and rewrites every
    #: set in full (a temporary set filled and swapped in, as `ipset restore` scripts do)
    naive: bool = False
    #: every node reads every endpoint and membership record itself, as raw bytes through
    #: the engine's `RecordSink.message` (decoding, filtering), as a real enforcer reads
    #: the whole topics; otherwise only what concerns it is routed to it, decoded once
    read_all: bool = False
    #: the horizon of the latest `program` call (diagnostics)
    horizon: float = 0.0

    @classmethod
    def of(cls, names: Iterable[str]) -> Fleet:
        return cls({n: NodeSim.create(n) for n in names})

    # ------------------------------------------------------------------ routing

    def _enqueue(self, node: NodeSim, arrival: float, fn: Callable[..., object],
                 *args: object) -> None:
        node.pending.append((arrival, fn, args))
        node.dirty = True

    def policy(self, key: str, rec: PolicyRecord | None, arrival: float) -> None:
        self.records += 1
        if rec is None:
            self.policies.pop(key, None)
        else:
            self.policies[key] = rec
        new_uids = self._update_peers(key, rec)
        replay = [(uid, ep, self.memberships[f"{uid}|{ep}"].ips)
                  for uid in new_uids for ep in self.by_uid.get(uid, ())]
        for node in self.nodes.values():
            self._enqueue(node, arrival, self._apply_policy, node, key, rec, replay)

    def profile(self, key: str, rec: ProfileRecord | None, arrival: float) -> None:
        """Namespace and service-account labels: every node reads them (its endpoints
        inherit them, and they decide which policies apply)."""
        self.records += 1
        if rec is None:
            self.profiles.pop(key, None)
        else:
            self.profiles[key] = rec
        for node in self.nodes.values():
            self._enqueue(node, arrival, node.sink.profile, key, rec)

    def _apply_policy(self, node: NodeSim, key: str, rec: PolicyRecord | None,
                      replay: list[tuple[str, str, tuple[str, ...]]]) -> None:
        try:
            node.sink.policy(key, rec)
        except (PolicyError, RecordError):
            self.rejected += 1
        for uid, ep, ips in replay:  # what the node filtered out before it needed it
            node.state.upsert_membership(uid, ep, ips, None)
        if node.state.needs_reread:  # the replay is this simulation's re-read
            node.state.reread_done()

    def _update_peers(self, key: str, rec: PolicyRecord | None) -> set[str]:
        old = self.peer_uids.pop(key, set())
        new: set[str] = set()
        if rec is not None:
            try:
                obj = load_document(rec.document, source=key)
            except (PolicyError, RecordError):
                obj = None
            if isinstance(obj, Policy):
                for rule in compile_policy(obj).rules:
                    new |= rule.uids()
        self.peer_uids[key] = new
        for uid in old:
            self.peer_count[uid] -= 1
        appeared = set()
        for uid in new:
            if self.peer_count[uid] == 0:
                appeared.add(uid)
            self.peer_count[uid] += 1
        return appeared

    def endpoint(self, key: str, rec: EndpointRecord | None, arrival: float,
                 raw: Raw | None = None) -> None:
        self.records += 1
        old = self.endpoints.pop(key, None)
        if rec is not None:
            self.endpoints[key] = rec
        at = rec.observed_at if rec is not None else self.cause.get(key)
        names = {r.node for r in (old, rec) if r is not None and r.node}
        for name in names:
            node = self.nodes.get(name)
            if node is not None:
                self._enqueue(node, arrival, self._apply_endpoint, node, key, rec, at)
        if self.read_all and raw is not None:  # every other node reads it, and skips it
            for node in self.nodes.values():
                if node.name not in names:
                    self._enqueue(node, arrival, node.sink.message, ENDPOINTS.suffix, *raw)

    @staticmethod
    def _apply_endpoint(node: NodeSim, key: str, rec: EndpointRecord | None,
                        at: float | None) -> None:
        if rec is None or rec.node != node.name:
            was_local = key in node.state.endpoints
            node.sink.endpoint(key, None)  # the sink forgets it too (profiles re-apply)
            if was_local:
                node.state.note(at)
        else:
            node.sink.endpoint(key, rec)

    def membership(self, key: str, rec: MembershipRecord | None, arrival: float,
                   raw: Raw | None = None) -> None:
        self.records += 1
        uid, ep = split_membership_key(key)
        old = self.memberships.pop(key, None)
        if rec is None:
            self.by_uid.get(uid, set()).discard(ep)
            at = self.cause.get(ep)
            for node in self.nodes.values():
                if self.read_all and raw is not None:
                    self._enqueue(node, arrival, self._read_tombstone, node, raw[0], at)
                else:
                    self._enqueue(node, arrival, self._drop_membership, node, uid, ep, at)
            return
        self.memberships[key] = rec
        self.by_uid[uid].add(ep)
        if self.read_all and raw is not None:
            for node in self.nodes.values():
                self._enqueue(node, arrival, node.sink.message, MEMBERSHIPS.suffix, *raw)
            return
        targets: Iterable[NodeSim]
        if self.peer_count.get(uid, 0) > 0:
            targets = self.nodes.values()
        else:
            names = {r.node for r in (old, rec) if r is not None and r.node}
            targets = [self.nodes[n] for n in names if n in self.nodes]
        for node in targets:
            self._enqueue(node, arrival, self._set_membership, node, uid, ep, rec)

    @staticmethod
    def _read_tombstone(node: NodeSim, key_raw: bytes | None, at: float | None) -> None:
        """A membership tombstone as the engine reads it (`RecordSink.message`), with the
        deleting event's time (a tombstone carries none) for the latency clock."""
        uid, ep = split_membership_key(codec.decode_key(key_raw))
        node.state.delete_membership(uid, ep, at)

    @staticmethod
    def _drop_membership(node: NodeSim, uid: str, ep: str, at: float | None) -> None:
        node.state.delete_membership(uid, ep, at)

    @staticmethod
    def _set_membership(node: NodeSim, uid: str, ep: str, rec: MembershipRecord) -> None:
        node.state.upsert_membership(uid, ep, rec.ips, rec.observed_at)

    # ------------------------------------------------------------------ programming

    def program(self, events: Container[float] | None = None, horizon: float = float("inf")) -> int:
        """Run every node with pending records; return how many transactions that took.

        Each node is simulated as its own machine: a transaction starts when the node is
        free and something has arrived, takes every record that arrived by then, and lasts
        the CPU time this node's work took. Latency samples are kept for the
        `observed_at` values in `events` (None: every real epoch time, not the initial
        load's). A transaction that would start after `horizon` (the time up to which every
        partition has been read) waits: records that arrive before it starts may not have
        been read yet.
        """
        count = 0
        self.horizon = horizon
        for node in self.nodes.values():
            if not node.dirty:
                continue
            node.dirty = False
            pending = sorted(node.pending, key=lambda item: item[0])
            node.pending = []
            i = 0
            if not node.started and pending:
                # a cold start reads the topics to the end, then programs once
                t0 = time.thread_time()
                for _arrival, fn, args in pending:
                    fn(*args)
                start = max(node.busy_until, pending[-1][0])
                count += self._transaction(node, t0, start, events)
                continue
            while i < len(pending):
                start = max(node.busy_until, pending[i][0] + self.batch_window)
                if start > horizon:
                    node.pending = pending[i:]
                    node.dirty = True
                    break
                t0 = time.thread_time()
                while i < len(pending) and pending[i][0] <= start:
                    _arrival, fn, args = pending[i]
                    fn(*args)
                    i += 1
                count += self._transaction(node, t0, start, events)
        return count

    def _transaction(self, node: NodeSim, t0: float, start: float,
                     events: Container[float] | None) -> int:
        if self.naive:
            result = _naive_transaction(node)
            observed = node.state.take_observed()
        elif not node.started:
            result = node.programmer.start(node.state)
            observed = node.state.take_observed()
            node.started = True
        else:
            plan = node.state.plan()
            observed = plan.observed_at
            result = node.programmer.apply(plan)
        cpu = time.thread_time() - t0
        node.cpu += cpu
        node.batches += 1
        node.member_ops += result.member_ops
        wall_done = time.time()
        done = start + cpu
        node.busy_until = done
        for at in set(observed):
            if at < 1e9 or (events is not None and at not in events):
                continue
            sample = (at, node.name, max(0.0, done - at), max(0.0, wall_done - at), done)
            self.samples.append(sample)
            if self.on_sample is not None:
                self.on_sample(sample)
        return 1

    def pending(self) -> int:
        """Records read but not yet in a transaction, over every node."""
        return sum(len(node.pending) for node in self.nodes.values())

    def programmed_sets(self) -> dict[str, dict[str, set[str]]]:
        return {name: node.ipsets.list_sets() for name, node in self.nodes.items()}

    def explain(self, node_name: str, uid: str, want: Mapping[str, tuple[str, ...]],
                programmed: set[str]) -> str:
        """Why one node's set for `uid` differs: which layer first disagrees with the oracle
        (`want`: endpoint key -> IPs). Records the fleet read, what the node still has
        pending, the node's membership record, its refcounted contents, the set."""
        node = self.nodes[node_name]
        read = {ep: self.memberships[f"{uid}|{ep}"].ips for ep in self.by_uid.get(uid, ())
                if f"{uid}|{ep}" in self.memberships}
        held = {ep: ips_of(v) for ep, v in node.state.members.get(uid, {}).items()}
        counted = node.state.contents.get(uid)
        parts = [f"pending {len(node.pending)}"]
        if node.pending:
            arrivals = [item[0] for item in node.pending]
            parts.append(f"pending arrivals {min(arrivals):.3f}..{max(arrivals):.3f}, node "
                         f"busy until {node.busy_until:.3f}, last horizon {self.horizon:.3f},"
                         f" now {time.time():.3f}, dirty {node.dirty}")
        parts.append(_compare("read by the fleet", want, read))
        parts.append(_compare("node's membership record", want, held))
        wanted_ips = {ip for ips in want.values() for ip in set_members(ips, 4)}
        if counted is None:
            parts.append("not needed on the node (no refcounted contents)")
        else:
            parts.append(_compare_ips("node's refcounted contents", wanted_ips,
                                      set(set_members(counted, 4))))
        parts.append(_compare_ips("programmed set", wanted_ips, programmed))
        return "; ".join(parts)

    def restart_node(self, name: str, arrival: float) -> None:
        """Kill and restart one enforcer: it re-reads the (compacted) topics and resyncs."""
        node = self.nodes[name]
        node.pending = []
        node.restart()
        for key, prof in self.profiles.items():
            node.sink.profile(key, prof)
        for key, pol in self.policies.items():
            node.sink.policy(key, pol)
        for key, ep in self.endpoints.items():
            if ep.node == name:
                node.sink.endpoint(key, ep)
        for key, m in self.memberships.items():
            uid, _ep = split_membership_key(key)
            if m.node == name or self.peer_count.get(uid, 0) > 0:
                node.state.upsert_membership(uid, m.endpoint_key, m.ips, None)
        node.state.take_observed()  # history, not latency
        node.busy_until = max(node.busy_until, arrival)
        self._enqueue(node, arrival, _nothing)


def _naive_transaction(node: NodeSim) -> ProgramResult:
    """Everything from scratch: the desired dataplane rendered, every set rewritten in full."""
    desired = node.state.desired()
    node.state.plan()  # only to clear the state's change tracking; its plan is not used
    ops = 0
    for name, members in desired.sets.items():
        replace_contents(node.ipsets, name, members)
        ops += len(members)
    for name in list(node.ipsets.sets):
        if name not in desired.sets:
            node.ipsets.destroy(name)
    node.programmer.iptables.apply(desired.chains)
    return ProgramResult(ops, len(desired.chains))


def _compare(what: str, want: Mapping[str, tuple[str, ...]],
             have: Mapping[str, tuple[str, ...]]) -> str:
    missing = sorted(set(want) - set(have))
    extra = sorted(set(have) - set(want))
    wrong = sorted(ep for ep in set(want) & set(have) if set(want[ep]) != set(have[ep]))
    if not (missing or extra or wrong):
        return f"{what} agrees"
    return (f"{what}: missing {missing[:3]}, extra {extra[:3]}, "
            f"wrong {[(ep, have[ep], want[ep]) for ep in wrong[:3]]}")


def _compare_ips(what: str, want: set[str], have: set[str]) -> str:
    if want == have:
        return f"{what} agrees"
    return f"{what}: missing {sorted(want - have)[:3]}, extra {sorted(have - want)[:3]}"


def _nothing() -> None:
    """A no-op record: makes a restarted node run its start-up transaction."""
