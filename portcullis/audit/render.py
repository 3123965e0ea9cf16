"""`audit log`, `audit state` and `explain` as text: tables like kubectl, YAML, JSON. Pure."""

from __future__ import annotations

import io
import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import yaml

from portcullis.audit.explain import Explanation
from portcullis.audit.history import AuditState, LogEntry, kind_of, meaning
from portcullis.tables import table
from portcullis.timespec import format_time

POLICY_KIND_ORDER = (
    "Tier", "GlobalNetworkPolicy", "NetworkPolicy", "StagedGlobalNetworkPolicy",
    "StagedNetworkPolicy", "StagedKubernetesNetworkPolicy", "GlobalNetworkSet", "NetworkSet",
    "HostEndpoint",
)


def _where(namespace: str | None, name: str) -> str:
    return f"{namespace}/{name}" if namespace else name


# -- audit log ---------------------------------------------------------------------------------


def log_item(entry: LogEntry) -> dict[str, Any]:
    c = entry.change
    return {
        "at": format_time(c.at), "kind": c.kind, "namespace": c.namespace, "name": c.name,
        "change": entry.verb, "actor": c.history.actor, "source": c.history.source,
        "topic": c.history.topic, "key": c.history.key, "diff": list(entry.diff),
    }


def render_log(entries: Iterable[LogEntry], output: str, *, diffs: bool = True) -> str:
    items = list(entries)
    if output == "json":
        return json.dumps([log_item(e) for e in items], indent=2) + "\n"
    if output == "yaml":
        return _yaml_all([log_item(e) for e in items])
    out = []
    for e in items:
        c = e.change
        out.append(f"{format_time(c.at)}  {e.verb:<9} {c.kind} {_where(c.namespace, c.name)}"
                   f"  by {c.history.actor} (via {c.history.source})\n")
        if diffs:
            out.extend(f"    {line}\n" for line in e.diff)
    return "".join(out)


# -- audit state -------------------------------------------------------------------------------


def state_items(state: AuditState, kinds: frozenset[str] = frozenset()) -> list[dict[str, Any]]:
    """Policy documents, then endpoint and profile records, as plain data."""
    out: list[dict[str, Any]] = []
    for _key, rec in sorted(state.policies.items(), key=lambda kv: _policy_order(kv[1].kind,
                                                                               kv[0])):
        if not kinds or rec.kind in kinds:
            out.append(dict(rec.document))
    for topic in ("endpoints", "profiles"):
        for key, record in sorted(state.table(topic).items()):
            kind = kind_of(topic, key)
            if topic == "endpoints" and kind in ("NetworkSet", "GlobalNetworkSet") and (
                not kinds or kind not in kinds
            ):
                continue  # shown as their policy documents
            if not kinds or kind in kinds:
                out.append({"kind": kind, "key": key, **meaning(record)})
    return out


def _policy_order(kind: str, key: str) -> tuple[int, str]:
    rank = POLICY_KIND_ORDER.index(kind) if kind in POLICY_KIND_ORDER else len(POLICY_KIND_ORDER)
    return rank, key


def render_state(state: AuditState, output: str, *, at: float,
                 kinds: frozenset[str] = frozenset()) -> str:
    if output == "json":
        return json.dumps({"apiVersion": "v1", "kind": "List", "at": format_time(at),
                           "items": state_items(state, kinds)}, indent=2) + "\n"
    if output == "yaml":
        return _yaml_all(state_items(state, kinds))
    rows = []
    for _key, rec in sorted(state.policies.items(), key=lambda kv: _policy_order(kv[1].kind,
                                                                               kv[0])):
        if kinds and rec.kind not in kinds:
            continue
        rows.append({"KIND": rec.kind, "NAMESPACE": rec.namespace or "", "NAME": rec.name,
                     "DETAIL": _policy_detail(rec.document), "ACTOR": rec.actor,
                     "SINCE": format_time(rec.applied_at)})
    for key, ep in sorted(state.endpoints.items()):
        kind = kind_of("endpoints", key)
        if kind in ("NetworkSet", "GlobalNetworkSet") or (kinds and kind not in kinds):
            continue
        rows.append({"KIND": kind, "NAMESPACE": ep.namespace or "", "NAME": ep.name,
                     "DETAIL": f"node={ep.node or '-'} ips={','.join(ep.ips) or '-'} labels="
                     + ",".join(f"{k}={v}" for k, v in sorted(ep.labels.items())),
                     "ACTOR": ep.source, "SINCE": format_time(ep.observed_at)})
    for key, prof in sorted(state.profiles.items()):
        kind = kind_of("profiles", key)
        if kinds and kind not in kinds:
            continue
        rows.append({"KIND": kind, "NAMESPACE": prof.namespace if prof.name else "",
                     "NAME": prof.name or prof.namespace,
                     "DETAIL": "labels=" + ",".join(f"{k}={v}"
                                                    for k, v in sorted(prof.labels.items())),
                     "ACTOR": "kubernetes", "SINCE": format_time(prof.observed_at)})
    return table(rows)


def _policy_detail(document: Mapping[str, Any]) -> str:
    spec = document.get("spec") or {}
    kind = document.get("kind", "")
    if kind.startswith("Staged"):
        return f"stagedAction={spec.get('stagedAction', 'Set')}"
    if kind in ("NetworkPolicy", "GlobalNetworkPolicy"):
        return (f"tier={spec.get('tier', 'default')} order={spec.get('order', '-')} "
                f"selector={spec.get('selector') or 'all()'}")
    if kind in ("NetworkSet", "GlobalNetworkSet"):
        return (f"nets={len(spec.get('nets') or [])} "
                f"domains={len(spec.get('allowedEgressDomains') or [])}")
    if kind == "HostEndpoint":
        return f"node={spec.get('node', '')} interface={spec.get('interfaceName', '-')}"
    if kind == "Tier":
        return f"order={spec.get('order', '-')} defaultAction={spec.get('defaultAction', 'Deny')}"
    return ""


# -- explain -----------------------------------------------------------------------------------


def explanation_item(e: Explanation, at: float | None) -> dict[str, Any]:
    v = e.verdict
    return {
        "at": format_time(at) if at is not None else "now",
        "source": e.source.key, "destination": e.destination.text,
        "destination_ip": e.destination.ip, "domain": e.destination.domain,
        "port": e.destination.port, "protocol": e.destination.protocol,
        "verdict": v.action, "tier": v.tier, "policy": v.policy, "rule": v.rule_index,
        "reason": v.reason, "decided_by": e.decided_by, "staged": e.staged,
    }


def render_explanation(e: Explanation, output: str, at: float | None) -> str:
    item = explanation_item(e, at)
    if output == "json":
        return json.dumps(item, indent=2) + "\n"
    if output == "yaml":
        return _yaml_all([item])
    d = e.destination
    port = f":{d.port}/{d.protocol}" if d.port is not None else f" ({d.protocol})"
    target = d.ip or d.domain or d.text
    staged = " with staged policies applied" if e.staged else ""
    when = f" at {item['at']}" if at is not None else ""
    return (f"{e.verdict.action.upper()}: {e.source.key} -> {target}{port}{when}{staged}\n"
            f"  decided by: {e.decided_by}\n")


def _yaml_all(items: Sequence[Any]) -> str:
    buf = io.StringIO()
    yaml.safe_dump_all(json.loads(json.dumps(list(items))), buf, sort_keys=False,
                       default_flow_style=False)
    return buf.getvalue()
