"""What staged policies would change if they were enforced: the endpoints they select and the
observed flows whose verdict would flip. Pure: the caller hands in the state and the flows."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from policy import verdict as pverdict
from policy.model import Policy, StagedPolicy
from portcullis.audit.explain import ENFORCED_KINDS, Destination, World


@dataclass(frozen=True, slots=True)
class Flow:
    """An observed connection attempt (from the flows topic), as a question for policy."""

    source_endpoint: str
    dest_ip: str
    dest_port: int | None
    protocol: str
    attempts: int = 1


@dataclass(frozen=True, slots=True)
class FlowChange:
    flow: Flow
    now: pverdict.Verdict
    staged: pverdict.Verdict

    @property
    def line(self) -> str:
        f = self.flow
        port = f":{f.dest_port}" if f.dest_port is not None else ""
        return (f"would {self.staged.action} {f.source_endpoint} -> {f.dest_ip}{port}/"
                f"{f.protocol} ({f.attempts} attempt(s); now {self.now.action}: "
                f"{self.now.reason})")


@dataclass(frozen=True, slots=True)
class StagedPreview:
    staged: StagedPolicy
    selected: tuple[str, ...]  # endpoint keys the staged (or, for Delete, the target) selects
    changes: tuple[FlowChange, ...]


def selected_by(world: World, policy: Policy) -> tuple[str, ...]:
    """Endpoints (pods, host endpoints, VMs) the policy's applies-to selector matches."""
    applies = pverdict.compiled(policy).applies_to
    return tuple(sorted(
        rec.key for rec in world.state.endpoints.values()
        if rec.kind in ENFORCED_KINDS and applies.matches(world.labels_of(rec))
    ))


def judge(world: World, flow: Flow) -> tuple[pverdict.Verdict, pverdict.Verdict] | None:
    """The verdicts for `flow` now and with every staged policy applied (None: its source
    is not a known endpoint)."""
    src = world.state.endpoints.get(flow.source_endpoint)
    if src is None:
        return None
    dest = Destination(flow.dest_ip, flow.dest_ip, None, None, flow.dest_port, flow.protocol)
    return (world.explain_records(src, dest).verdict,
            world.explain_records(src, dest, staged=True).verdict)


def flow_changes(world: World, flows: Iterable[Flow]) -> tuple[FlowChange, ...]:
    """Flows whose verdict differs between the enforced and the staged policy sets."""
    out = []
    for flow in flows:
        judged = judge(world, flow)
        if judged is not None and judged[0].action != judged[1].action:
            out.append(FlowChange(flow, *judged))
    return tuple(out)


def preview(world: World, flows: Iterable[Flow] = ()) -> list[StagedPreview]:
    """Per staged policy, what it selects; flows are judged with every staged policy applied."""
    changes = flow_changes(world, flows)
    out = []
    enforced = world.enforced()
    for staged in sorted(world.staged(), key=lambda s: s.key):
        target = staged.policy if staged.action == "Set" else enforced.get(staged.target_key)
        selected = selected_by(world, target) if isinstance(target, Policy) else ()
        mine = tuple(c for c in changes if c.flow.source_endpoint in selected)
        out.append(StagedPreview(staged, selected, mine))
    return out


def lines(previews: Iterable[StagedPreview]) -> list[str]:
    out = []
    for p in previews:
        s = p.staged
        verb = "set" if s.action == "Set" else "delete"
        out.append(f"{s.key}: staged, not enforced: would {verb} {s.target_key}; it selects "
                   f"{len(p.selected)} endpoint(s)"
                   + (": " + ", ".join(p.selected[:10]) if p.selected else "")
                   + (" ..." if len(p.selected) > 10 else ""))
        out.extend(f"  {c.line}" for c in p.changes)
    return out
