"""The CRDs in deploy/crds: generated, structural, and accepting every field of Calico's YAML.

The API server prunes fields a schema does not declare, silently, so a field
missing here would vanish from a user's policy: every field of every example
must be declared.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest
import yaml

import policy
from watchers.kubernetes import GROUP, GROUP_VERSION, POLICY_RESOURCES

ROOT = Path(__file__).resolve().parents[2]
CRDS = ROOT / "deploy" / "crds"


def _generator() -> Any:
    spec = importlib.util.spec_from_file_location("crd_generate", CRDS / "generate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def crds() -> dict[str, dict[str, Any]]:
    out = {}
    for path in sorted(CRDS.glob("*.yaml")):
        doc = yaml.safe_load(path.read_text())
        out[doc["spec"]["names"]["kind"]] = doc
    return out


def test_the_yaml_files_are_what_the_generator_writes() -> None:
    for path, text in _generator().files().items():
        assert path.read_text() == text, f"{path} is stale: run python deploy/crds/generate.py"


def test_one_crd_per_watched_resource_in_our_group() -> None:
    defs = crds()
    assert {r.kind for r in POLICY_RESOURCES} == set(defs)
    for res in POLICY_RESOURCES:
        spec = defs[res.kind]["spec"]
        assert spec["group"] == GROUP
        assert [v["name"] for v in spec["versions"]] == [GROUP_VERSION]
        assert res.list_kwargs["plural"] == spec["names"]["plural"]
        namespaced = res.kind in ("NetworkPolicy", "NetworkSet", "StagedNetworkPolicy",
                                  "StagedKubernetesNetworkPolicy")
        assert spec["scope"] == ("Namespaced" if namespaced else "Cluster")


def _walk(schema: dict[str, Any], path: str) -> None:
    """Structural: every node has a type (or is int-or-string), and no anchors are needed."""
    if schema.get("x-kubernetes-int-or-string"):
        return
    assert "type" in schema, f"{path}: no type"
    for name, sub in (schema.get("properties") or {}).items():
        _walk(sub, f"{path}.{name}")
    if "items" in schema:
        _walk(schema["items"], f"{path}[]")
    extra = schema.get("additionalProperties")
    if isinstance(extra, dict):
        _walk(extra, f"{path}{{}}")


@pytest.mark.parametrize("kind", sorted(crds()))
def test_schemas_are_structural(kind: str) -> None:
    _walk(crds()[kind]["spec"]["versions"][0]["schema"]["openAPIV3Schema"], kind)


def validate(value: Any, schema: dict[str, Any], path: str) -> list[str]:
    """The subset of OpenAPI the API server checks for these schemas (and pruning)."""
    if schema.get("x-kubernetes-int-or-string"):
        ok = isinstance(value, int | str) and not isinstance(value, bool)
        return [] if ok else [f"{path}: expected int or string"]
    kind = schema.get("type")
    checks = {"object": dict, "array": list, "string": str, "boolean": bool,
              "integer": int, "number": int | float}
    if kind in checks and not isinstance(value, checks[kind]):  # type: ignore[arg-type]
        return [f"{path}: expected {kind}, got {value!r}"]
    problems: list[str] = []
    if "enum" in schema and value not in schema["enum"]:
        problems.append(f"{path}: {value!r} not in {schema['enum']}")
    if kind == "object":
        props = schema.get("properties")
        for name in schema.get("required", []):
            if name not in value:
                problems.append(f"{path}.{name}: required")
        for name, sub in value.items():
            if props is not None and name in props:
                problems += validate(sub, props[name], f"{path}.{name}")
            elif isinstance(schema.get("additionalProperties"), dict):
                problems += validate(sub, schema["additionalProperties"], f"{path}.{name}")
            elif props is not None:
                problems.append(f"{path}.{name}: not in the schema (would be pruned)")
    if kind == "array":
        for i, item in enumerate(value):
            problems += validate(item, schema["items"], f"{path}[{i}]")
    return problems


def example_documents() -> list[dict[str, Any]]:
    docs = []
    for path in sorted((ROOT / "examples").glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


RICH = yaml.safe_load("""
apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata: {name: rich, labels: {a: b}}
spec:
  tier: default
  order: 10.5
  selector: role == 'db'
  namespaceSelector: has(env)
  serviceAccountSelector: all()
  types: [Ingress, Egress]
  applyOnForward: true
  ingress:
    - action: Allow
      protocol: TCP
      source: {selector: app == 'web', namespaceSelector: global(), nets: [10.0.0.0/8],
               notNets: [10.1.0.0/16], notSelector: x == 'y'}
      destination: {ports: [5432, "6000:6010"], notPorts: [22]}
  egress:
    - action: Allow
      ipVersion: 4
      protocol: ICMP
      icmp: {type: 8, code: 0}
      destination: {nets: [0.0.0.0/0]}
    - action: Allow
      protocol: UDP
      destination:
        serviceAccounts: {names: [api], selector: app == 'x'}
        ports: [53]
    - action: Allow
      protocol: TCP
      destination: {domains: [api.example.com]}
    - action: Pass
      notProtocol: UDP
      notICMP: {type: 3}
      metadata: {annotations: {why: because}}
""")


def test_every_example_and_a_rich_policy_fit_the_crds_and_load_alike() -> None:
    defs = crds()
    docs = [*example_documents(), RICH]
    assert len(docs) > 1
    for doc in docs:
        kind = doc["kind"]
        if doc["apiVersion"] != "projectcalico.org/v3":
            continue
        schema = defs[kind]["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
        cr = {**doc, "apiVersion": f"{GROUP}/{GROUP_VERSION}"}
        assert validate(cr, schema, "") == [], doc["metadata"]["name"]
        assert policy.load_document(cr) == policy.load_document(doc)


def test_the_schema_rejects_what_calico_rejects_structurally() -> None:
    schema = crds()["Tier"]["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    bad = {"apiVersion": "x", "kind": "Tier", "metadata": {"name": "t"},
           "spec": {"order": "first", "defaultAction": "Allow", "colour": "red"}}
    assert sorted(p.split(":")[0] for p in validate(bad, schema, "")) == [
        ".spec.colour", ".spec.defaultAction", ".spec.order"]
