"""`apply` planning without a broker: reading sources, all-or-nothing loading, outcomes, tables."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pytest
import yaml

from topics.records import PolicyRecord
from watchers.apply import (
    ApplyError,
    load_all,
    plan_apply,
    plan_delete,
    read_sources,
    render,
    resolve_kind,
    select,
)

GNP = """apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata: {name: deny-all}
spec: {selector: all(), types: [Egress]}
"""
NETSET = """apiVersion: projectcalico.org/v3
kind: NetworkSet
metadata: {name: corp}
spec: {nets: [10.0.0.0/8]}
"""


def test_sources_are_files_directories_and_stdin(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(GNP)
    (tmp_path / "notes.txt").write_text("not a policy")
    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "b.yml").write_text(NETSET)
    names = [s for s, _ in read_sources([str(tmp_path)])]
    assert names == [str(tmp_path / "a.yaml")]
    names = [s for s, _ in read_sources([str(tmp_path)], recursive=True)]
    assert names == [str(tmp_path / "a.yaml"), str(sub / "b.yml")]
    assert read_sources(["-"], stdin=io.StringIO(GNP)) == [("<stdin>", GNP)]
    with pytest.raises(ApplyError, match=re.escape("nope.yaml: no such file")):
        read_sources([str(tmp_path / "nope.yaml")])


def test_loading_is_all_or_nothing_and_reports_every_problem() -> None:
    objs = load_all([("a.yaml", GNP), ("b.yaml", NETSET)], default_namespace="prod")
    assert [o.key for o in objs] == ["GlobalNetworkPolicy//deny-all", "NetworkSet/prod/corp"]
    broken = NETSET.replace("10.0.0.0/8", "10.0.0.0/99")
    with pytest.raises(ApplyError) as exc:
        load_all([("a.yaml", GNP.replace("all()", "all(")), ("b.yaml", broken)],
                 default_namespace="prod")
    lines = str(exc.value).splitlines()
    assert lines[0].startswith("a.yaml: doc 1: spec.selector")
    assert lines[1].startswith("b.yaml: doc 1: spec.nets[0]")
    with pytest.raises(ApplyError, match=re.escape("b.yaml: GlobalNetworkPolicy//deny-all is")):
        load_all([("a.yaml", GNP), ("b.yaml", GNP)])


def _record(obj: object, document: dict[str, object] | None = None) -> PolicyRecord:
    return PolicyRecord(kind=obj.kind, namespace=obj.namespace, name=obj.name,  # type: ignore[attr-defined]
                        document=document or obj.to_document(),  # type: ignore[attr-defined]
                        actor="bob", applied_at=1.0, observed_at=1.0)


def test_outcomes_compare_with_the_current_state() -> None:
    gnp, netset = load_all([("a.yaml", GNP + "---\n" + NETSET)], default_namespace="prod")
    outcomes, pubs = plan_apply([gnp, netset], {}, actor="alice", now=5.0)
    assert [o.line() for o in outcomes] == [
        "globalnetworkpolicy/deny-all created", "networkset/prod/corp created"]
    assert [(p.topic, p.key) for p in pubs] == [
        ("policies", "GlobalNetworkPolicy//deny-all"), ("policies", "NetworkSet/prod/corp"),
        ("endpoints", "networkset/prod/corp")]
    assert all(p.value is not None and getattr(p.value, "observed_at", 5.0) == 5.0 for p in pubs)

    current = {gnp.key: _record(gnp), netset.key: _record(netset, {"spec": {}})}
    outcomes, pubs = plan_apply([gnp, netset], current, actor="alice", now=6.0)
    assert [o.verb for o in outcomes] == ["unchanged", "configured"]
    assert {p.key for p in pubs} == {"NetworkSet/prod/corp", "networkset/prod/corp"}

    outcomes, pubs = plan_delete([gnp, netset], {netset.key: current[netset.key]})
    assert [o.verb for o in outcomes] == ["not found", "deleted"]
    assert [(p.key, p.value) for p in pubs] == [
        ("NetworkSet/prod/corp", None), ("networkset/prod/corp", None)]


def test_get_selects_and_renders_tables_yaml_and_json() -> None:
    gnp, netset = load_all([("a.yaml", GNP + "---\n" + NETSET)], default_namespace="prod")
    state = {gnp.key: _record(gnp), netset.key: _record(netset)}
    assert resolve_kind("gnp") == "GlobalNetworkPolicy"
    assert resolve_kind("networksets.policy.portcullis.io") == "NetworkSet"
    with pytest.raises(ApplyError, match="unknown kind 'pods'"):
        resolve_kind("pods")
    records = select(state, "NetworkSet", None, "prod")
    assert [r.name for r in records] == ["corp"]
    assert select(state, "NetworkSet", None, "dev") == []
    table = render(records, "NetworkSet", "table", now=3601.0).splitlines()
    assert table[0].split() == ["NAMESPACE", "NAME", "NETS", "DOMAINS", "ACTOR", "AGE"]
    assert table[1].split() == ["prod", "corp", "1", "0", "bob", "1h"]
    assert yaml.safe_load(render(records, "NetworkSet", "yaml")) == netset.to_document()
    assert json.loads(render(records, "NetworkSet", "json", single=True)) == netset.to_document()
    assert json.loads(render(records, "NetworkSet", "json"))["kind"] == "List"
