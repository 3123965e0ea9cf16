"""The consistency checker: what every node should have programmed, from the inputs alone. Pure.

Given the final state of the input topics (endpoints, profiles, policies), the expected
memberships come from the streams oracle (`streams.oracle.oracle_memberships`: every
selector against every endpoint, no index, no increments). From those, per node, the
expected ipsets follow the enforcer's contract (issue 5): one ``hash:net`` set per selector
uid that an enforceable egress rule of a policy applying to one of the node's endpoints
refers to, holding the canonical members of every IP or CIDR its members contribute.

`check` compares that with what each (dry-run or real) enforcer programmed and returns
every difference, readably; a benchmark run fails when there is any.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from enforcers.ipsets import set_name as default_set_name
from enforcers.state import CompiledPolicy, compile_policy, set_members
from policy.load import PolicyError, load_document
from policy.model import Policy
from streams.oracle import Payload, oracle_memberships
from topics.records import (
    EndpointRecord,
    PolicyRecord,
    ProfileRecord,
    RecordError,
    split_membership_key,
)

__all__ = ["CheckResult", "Expected", "check", "check_memberships", "expected_state"]

LOCAL_KINDS = frozenset({"pod", "vm", "hostendpoint"})
MAX_SHOWN = 8


@dataclass
class Expected:
    """What the inputs say: memberships, and per node the set contents to program."""

    memberships: dict[str, Payload]
    sets: dict[str, dict[str, set[str]]]  # node -> set name -> members
    members_of: dict[str, set[str]] = field(default_factory=dict)  # uid -> endpoint keys


@dataclass
class CheckResult:
    ok: bool
    nodes: int = 0
    sets: int = 0
    members: int = 0
    differences: list[str] = field(default_factory=list)

    def report(self) -> str:
        if self.ok:
            return (f"consistency: OK ({self.nodes} nodes, {self.sets} sets, "
                    f"{self.members} members equal the oracle)")
        shown = "\n".join("  " + d for d in self.differences[:40])
        more = len(self.differences) - 40
        tail = f"\n  ... and {more} more" if more > 0 else ""
        return (f"consistency: FAILED ({len(self.differences)} differences over "
                f"{self.nodes} nodes)\n{shown}{tail}")


def _compiled_policies(policies: Iterable[PolicyRecord], family: int) -> list[CompiledPolicy]:
    out = []
    for record in policies:
        try:
            obj = load_document(record.document, source=record.key)
        except (PolicyError, RecordError):
            continue
        if isinstance(obj, Policy):
            out.append(compile_policy(obj, family))
    return out


def expected_state(
    endpoints: Iterable[EndpointRecord],
    profiles: Iterable[ProfileRecord],
    policies: Iterable[PolicyRecord],
    nodes: Iterable[str],
    *,
    set_name: Callable[[str], str] = default_set_name,
    family: int = 4,
) -> Expected:
    """Expected memberships and, for each of `nodes`, its ipsets, from the final inputs."""
    endpoints = list(endpoints)
    policies = list(policies)
    memberships = oracle_memberships(endpoints, profiles, policies)
    namer = set_name
    members_of: dict[str, set[str]] = defaultdict(set)
    ips_of: dict[str, tuple[str, ...]] = {}
    for key, (_ns, _node, _iface, ips) in memberships.items():
        uid, ep = split_membership_key(key)
        members_of[uid].add(ep)
        ips_of[ep] = ips
    compiled = [c for c in _compiled_policies(policies, family) if c.egress]
    by_applies: dict[str, list[CompiledPolicy]] = defaultdict(list)
    for c in compiled:
        by_applies[c.applies_uid].append(c)
    local: dict[str, list[str]] = defaultdict(list)
    for record in endpoints:
        if record.node is not None and record.interface and record.kind in LOCAL_KINDS:
            local[record.node].append(record.key)
    uids_of_endpoint: dict[str, set[str]] = defaultdict(set)
    for uid, eps in members_of.items():
        if uid in by_applies:
            for ep in eps:
                uids_of_endpoint[ep].add(uid)
    sets: dict[str, dict[str, set[str]]] = {}
    for node in nodes:
        used: set[str] = set()
        for ep in local.get(node, ()):
            for uid in uids_of_endpoint.get(ep, ()):
                for pol in by_applies[uid]:
                    for rule in pol.rules:
                        if rule.spec.never is None:
                            used |= rule.uids()
        node_sets: dict[str, set[str]] = {}
        for uid in used:
            contents: set[str] = set()
            for ep in members_of.get(uid, ()):
                contents |= set_members(ips_of[ep], family)
            node_sets[namer(uid)] = contents
        sets[node] = node_sets
    return Expected(memberships, sets, dict(members_of))


def _diff_sets(node: str, want: Mapping[str, set[str]], have: Mapping[str, set[str]],
               out: list[str]) -> int:
    members = 0
    for name in sorted(set(want) - set(have)):
        out.append(f"{node}: set {name} missing (should hold {len(want[name])} members)")
    for name in sorted(set(have) - set(want)):
        out.append(f"{node}: set {name} programmed but no rule needs it "
                   f"({len(have[name])} members)")
    for name in sorted(set(want) & set(have)):
        w, h = want[name], have[name]
        members += len(w)
        if w != h:
            missing = sorted(w - h)
            extra = sorted(h - w)
            parts = []
            if missing:
                parts.append(f"missing {len(missing)}: {', '.join(missing[:MAX_SHOWN])}"
                             + (" ..." if len(missing) > MAX_SHOWN else ""))
            if extra:
                parts.append(f"extra {len(extra)}: {', '.join(extra[:MAX_SHOWN])}"
                             + (" ..." if len(extra) > MAX_SHOWN else ""))
            out.append(f"{node}: set {name}: " + "; ".join(parts))
    return members


def check(expected: Expected, programmed: Mapping[str, Mapping[str, set[str]]],
          set_prefix: str = "pc-") -> CheckResult:
    """Compare each node's programmed sets (name -> members) with the expected ones.

    Only sets whose names start with `set_prefix` are ours; temporary twins left behind
    count as differences.
    """
    differences: list[str] = []
    members = 0
    sets = 0
    for node in sorted(expected.sets):
        if node not in programmed:
            differences.append(f"{node}: no enforcer state to compare (node not simulated?)")
            continue
        have = {n: set(m) for n, m in programmed[node].items() if n.startswith(set_prefix)}
        leftovers = [n for n in programmed[node] if n.startswith("pt-")]
        for name in leftovers:
            differences.append(f"{node}: temporary set {name} left behind")
        members += _diff_sets(node, expected.sets[node], have, differences)
        sets += len(expected.sets[node])
    return CheckResult(not differences, len(expected.sets), sets, members, differences)


def check_memberships(expected: Expected, compacted: Mapping[str, Payload]) -> list[str]:
    """Differences between the compacted memberships topic and the oracle."""
    out: list[str] = []
    want, have = expected.memberships, compacted
    missing = sorted(set(want) - set(have))
    extra = sorted(set(have) - set(want))
    wrong = sorted(k for k in set(want) & set(have) if want[k] != have[k])
    for k in missing[:MAX_SHOWN]:
        out.append(f"memberships: missing {k}")
    for k in extra[:MAX_SHOWN]:
        out.append(f"memberships: should not exist {k}")
    for k in wrong[:MAX_SHOWN]:
        out.append(f"memberships: {k} is {have[k]}, expected {want[k]}")
    hidden = len(missing) + len(extra) + len(wrong) - len(out)
    if hidden > 0:
        out.append(f"memberships: ... and {hidden} more differences "
                   f"({len(missing)} missing, {len(extra)} extra, {len(wrong)} wrong)")
    return out
