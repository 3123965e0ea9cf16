"""`portcullis apply / delete / get`: policy documents in, policy records out, kubectl-style.

All documents are validated before anything is published: one bad document
anywhere means nothing is published and every problem is reported (file,
document, field path). Then the compacted policies topic is read to its end,
so each object is reported as created, configured, unchanged or deleted, and
only what changes is published (with the actor and a timestamp).

Network sets and host endpoints are also published to the endpoints topic
(they are members that selectors match); see `watchers.translate`.
"""

from __future__ import annotations

import io
import json
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import yaml

import policy
from topics.records import PolicyRecord
from watchers.mirror import Publication
from watchers.translate import policy_keys, policy_publications

DOCUMENT_SUFFIXES = (".yaml", ".yml", ".json")


class ApplyError(ValueError):
    """Nothing was published; the message lists every problem, one per line."""


@dataclass(frozen=True, slots=True)
class Outcome:
    kind: str
    namespace: str | None
    name: str
    verb: str  # created | configured | unchanged | deleted | not found

    @property
    def key(self) -> str:
        return f"{self.kind}/{self.namespace or ''}/{self.name}"

    def line(self) -> str:
        where = f"{self.namespace}/" if self.namespace else ""
        return f"{self.kind.lower()}/{where}{self.name} {self.verb}"


# -- reading ---------------------------------------------------------------------------------


def read_sources(
    paths: Sequence[str], *, recursive: bool = False, stdin: TextIO | None = None
) -> list[tuple[str, str]]:
    """(source name, text) for every file, directory (its YAML/JSON files) or ``-`` (stdin)."""
    out: list[tuple[str, str]] = []
    problems: list[str] = []
    for raw in paths:
        if raw == "-":
            out.append(("<stdin>", (stdin or sys.stdin).read()))
            continue
        path = Path(raw)
        if path.is_dir():
            pattern = "**/*" if recursive else "*"
            files = sorted(
                p for p in path.glob(pattern) if p.is_file() and p.suffix in DOCUMENT_SUFFIXES
            )
            if not files:
                problems.append(f"{raw}: no .yaml, .yml or .json files in this directory")
        elif path.exists():
            files = [path]
        else:
            problems.append(f"{raw}: no such file or directory")
            continue
        for file in files:
            try:
                out.append((str(file), file.read_text()))
            except (OSError, UnicodeDecodeError) as exc:
                problems.append(f"{file}: cannot read: {exc}")
    if problems:
        raise ApplyError("\n".join(problems))
    return out


def load_all(
    sources: Iterable[tuple[str, str]], *, default_namespace: str | None = None
) -> list[Any]:
    """Every object from every source, or ApplyError listing every problem in all of them."""
    objects: list[Any] = []
    problems: list[str] = []
    seen: dict[str, str] = {}
    for source, text in sources:
        try:
            loaded = policy.load(text, source, default_namespace=default_namespace)
        except policy.PolicyError as exc:
            problems.extend(str(p) for p in exc.problems)
            continue
        for obj in loaded:
            if obj.key in seen and seen[obj.key] != source:
                problems.append(f"{source}: {obj.key} is also defined in {seen[obj.key]}")
                continue
            seen[obj.key] = source
            objects.append(obj)
    if problems:
        raise ApplyError("\n".join(problems))
    if not objects:
        raise ApplyError("no objects found in " + ", ".join(s for s, _ in sources))
    return objects


# -- planning (pure) -------------------------------------------------------------------------


def plan_apply(
    objects: Sequence[Any], current: Mapping[str, PolicyRecord], *, actor: str, now: float
) -> tuple[list[Outcome], list[Publication]]:
    """What each object does to the current state, and the records that make it so."""
    outcomes: list[Outcome] = []
    pubs: list[Publication] = []
    for obj in objects:
        existing = current.get(obj.key)
        document = obj.to_document()
        if existing is not None and _same(existing.document, document):
            outcomes.append(Outcome(obj.kind, obj.namespace, obj.name, "unchanged"))
            continue
        verb = "created" if existing is None else "configured"
        outcomes.append(Outcome(obj.kind, obj.namespace, obj.name, verb))
        pubs.extend(policy_publications(
            obj, actor=actor, applied_at=now, observed_at=now, source="apply"
        ))
    return outcomes, pubs


def plan_delete(
    objects: Sequence[Any], current: Mapping[str, PolicyRecord]
) -> tuple[list[Outcome], list[Publication]]:
    outcomes: list[Outcome] = []
    pubs: list[Publication] = []
    for obj in objects:
        if obj.key not in current:
            outcomes.append(Outcome(obj.kind, obj.namespace, obj.name, "not found"))
            continue
        outcomes.append(Outcome(obj.kind, obj.namespace, obj.name, "deleted"))
        pubs.extend(policy_keys(obj.kind, obj.namespace, obj.name))
    return outcomes, pubs


def _same(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


# -- get (pure rendering) --------------------------------------------------------------------

KIND_ALIASES: dict[str, str] = {}
for _kind, _aliases in {
    "GlobalNetworkPolicy": ("globalnetworkpolicy", "globalnetworkpolicies", "gnp"),
    "NetworkPolicy": ("networkpolicy", "networkpolicies", "netpol", "np", "policy", "policies"),
    "GlobalNetworkSet": ("globalnetworkset", "globalnetworksets", "gns"),
    "NetworkSet": ("networkset", "networksets", "netset", "netsets"),
    "HostEndpoint": ("hostendpoint", "hostendpoints", "hep", "heps"),
    "Tier": ("tier", "tiers"),
    "StagedNetworkPolicy": ("stagednetworkpolicy", "stagednetworkpolicies", "snp"),
    "StagedGlobalNetworkPolicy": ("stagedglobalnetworkpolicy", "stagedglobalnetworkpolicies",
                                  "sgnp"),
    "StagedKubernetesNetworkPolicy": ("stagedkubernetesnetworkpolicy",
                                      "stagedkubernetesnetworkpolicies", "sknp"),
}.items():
    for _alias in _aliases:
        KIND_ALIASES[_alias] = _kind
NAMESPACED = {"NetworkPolicy", "NetworkSet", "StagedNetworkPolicy",
              "StagedKubernetesNetworkPolicy"}


def resolve_kind(text: str) -> str:
    kind = KIND_ALIASES.get(text.lower().split(".")[0])
    if kind is None:
        known = ", ".join(sorted({k.lower() for k in KIND_ALIASES.values()}))
        raise ApplyError(f"unknown kind {text!r} (known: {known})")
    return kind


def select(
    state: Mapping[str, PolicyRecord], kind: str, name: str | None, namespace: str | None
) -> list[PolicyRecord]:
    out = [
        r for r in state.values()
        if r.kind == kind and (name is None or r.name == name)
        and (namespace is None or kind not in NAMESPACED or r.namespace == namespace)
    ]
    return sorted(out, key=lambda r: (r.namespace or "", r.name))


def _age(seconds: float) -> str:
    seconds = max(0, int(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _columns(record: PolicyRecord) -> dict[str, str]:
    spec = record.document.get("spec") or {}
    if record.kind in ("NetworkPolicy", "GlobalNetworkPolicy"):
        return {"TIER": str(spec.get("tier", "default")), "ORDER": str(spec.get("order", "")),
                "SELECTOR": str(spec.get("selector", "")) or "all()"}
    if record.kind in ("NetworkSet", "GlobalNetworkSet"):
        return {"NETS": str(len(spec.get("nets") or [])),
                "DOMAINS": str(len(spec.get("allowedEgressDomains") or []))}
    if record.kind == "HostEndpoint":
        return {"NODE": str(spec.get("node", "")), "INTERFACE": str(spec.get("interfaceName", ""))}
    if record.kind.startswith("Staged"):
        return {"STAGED-ACTION": str(spec.get("stagedAction", "Set")),
                "SELECTOR": str(spec.get("selector", spec.get("podSelector", "")))}
    if record.kind == "Tier":
        return {"ORDER": str(spec.get("order", "")),
                "DEFAULT-ACTION": str(spec.get("defaultAction", "Deny"))}
    return {}


def render(records: Sequence[PolicyRecord], kind: str, output: str, *, now: float | None = None,
           single: bool = False) -> str:
    """A table (like kubectl get), YAML documents or JSON."""
    documents = [dict(r.document) for r in records]
    if output == "json":
        if single and len(documents) == 1:
            return json.dumps(documents[0], indent=2) + "\n"
        return json.dumps({"apiVersion": "v1", "kind": "List", "items": documents}, indent=2) + "\n"
    if output == "yaml":
        buf = io.StringIO()
        yaml.safe_dump_all(documents, buf, sort_keys=False, default_flow_style=False)
        return buf.getvalue()
    if not records:
        return ""
    now = time.time() if now is None else now
    rows = []
    for r in records:
        row = {"NAMESPACE": r.namespace or ""} if kind in NAMESPACED else {}
        row["NAME"] = r.name
        row.update(_columns(r))
        row["ACTOR"] = r.actor
        row["AGE"] = _age(now - r.applied_at)
        rows.append(row)
    headers = list(rows[0])
    widths = {h: max(len(h), *(len(row[h]) for row in rows)) for h in headers}
    lines = ["   ".join(h.ljust(widths[h]) for h in headers).rstrip()]
    for row in rows:
        lines.append("   ".join(row[h].ljust(widths[h]) for h in headers).rstrip())
    return "\n".join(lines) + "\n"


# -- I/O -------------------------------------------------------------------------------------


async def policies_state(
    kafka_kwargs: dict[str, Any], prefix: str, *, timeout: float = 30.0
) -> dict[str, PolicyRecord]:
    from topics.specs import topic_name
    from watchers.topicstate import read_state

    return await read_state(
        kafka_kwargs, topic_name(prefix, "policies"), PolicyRecord, timeout=timeout
    )


async def publish_objects(
    kafka_kwargs: dict[str, Any],
    prefix: str,
    objects: Sequence[Any],
    *,
    actor: str,
    delete: bool = False,
    dry_run: bool = False,
    now: float | None = None,
) -> list[Outcome]:
    """Compare with the policies topic, publish what changes, and say what happened to each."""
    from watchers.publisher import KafkaPublisher, producer_for

    current = await policies_state(kafka_kwargs, prefix)
    if delete:
        outcomes, pubs = plan_delete(objects, current)
    else:
        stamp = time.time() if now is None else now
        outcomes, pubs = plan_apply(objects, current, actor=actor, now=stamp)
    if pubs and not dry_run:
        producer = producer_for(kafka_kwargs, "portcullis-apply")
        await producer.start()
        try:
            await KafkaPublisher(producer, prefix, actor=actor, source="apply").publish(pubs)
        finally:
            await producer.stop()
    return outcomes
