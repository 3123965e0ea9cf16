"""Writes the CustomResourceDefinitions of policy.portcullis.io/v1 (one YAML file per kind).

The schemas follow Calico's projectcalico.org/v3 kinds field for field, so a
user's Calico YAML needs only its apiVersion changed. The API server checks
structure (types, enums); `portcullis watch kubernetes` validates the meaning
(selectors, CIDRs, ports) with the same loader `portcullis apply` uses, and
reports objects it cannot use without publishing them.

Run ``python deploy/crds/generate.py`` after changing this file; a unit test
checks the YAML files are up to date.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import yaml

GROUP = "policy.portcullis.io"
VERSION = "v1"
HERE = Path(__file__).resolve().parent


def string(description: str = "") -> dict[str, Any]:
    return {"type": "string", **({"description": description} if description else {})}


def strings(description: str = "") -> dict[str, Any]:
    return {"type": "array", "items": {"type": "string"},
            **({"description": description} if description else {})}


INT_OR_STRING = {"anyOf": [{"type": "integer"}, {"type": "string"}],
                 "x-kubernetes-int-or-string": True}

ENTITY_RULE: dict[str, Any] = {
    "type": "object",
    "description": "Source or destination match; every field given must match.",
    "properties": {
        "nets": strings("CIDRs (or bare IPs) to match"),
        "notNets": strings("CIDRs not to match"),
        "selector": string("Calico selector of endpoints and network sets"),
        "notSelector": string("Calico selector of endpoints not to match"),
        "namespaceSelector": string("selector of namespaces; global() for global objects"),
        "ports": {"type": "array", "items": INT_OR_STRING,
                  "description": "ports, port ranges (\"8000:8080\") or named ports"},
        "notPorts": {"type": "array", "items": INT_OR_STRING},
        "serviceAccounts": {"type": "object", "properties": {
            "names": strings(), "selector": string()}},
        "services": {"type": "object", "properties": {
            "name": string(), "namespace": string()}},
        "domains": strings("domain names (egress Allow destinations only); '*' is one or more "
                           "whole labels, never the apex"),
    },
}

ICMP = {"type": "object", "properties": {
    "type": {"type": "integer", "minimum": 0, "maximum": 254},
    "code": {"type": "integer", "minimum": 0, "maximum": 255},
}}

RULE: dict[str, Any] = {
    "type": "object",
    "required": ["action"],
    "properties": {
        "action": {"type": "string", "enum": ["Allow", "Deny", "Log", "Pass"]},
        "ipVersion": {"type": "integer", "enum": [4, 6]},
        "protocol": INT_OR_STRING,
        "notProtocol": INT_OR_STRING,
        "icmp": ICMP,
        "notICMP": ICMP,
        "source": ENTITY_RULE,
        "destination": ENTITY_RULE,
        "http": {"type": "object", "description": "not supported by Portcullis (rejected)",
                 "properties": {"methods": strings(), "paths": {
                     "type": "array", "items": {"type": "object", "properties": {
                         "exact": string(), "prefix": string()}}}}},
        "metadata": {"type": "object", "properties": {"annotations": {
            "type": "object", "additionalProperties": {"type": "string"}}}},
    },
}

POLICY_COMMON: dict[str, Any] = {
    "tier": string("the tier this policy belongs to (default: default)"),
    "order": {"type": "number", "description": "lower orders apply first"},
    "selector": string("the endpoints this policy applies to"),
    "serviceAccountSelector": string(),
    "types": {"type": "array", "items": {"type": "string", "enum": ["Ingress", "Egress"]}},
    "ingress": {"type": "array", "items": RULE},
    "egress": {"type": "array", "items": RULE},
    "performanceHints": strings(),
}

NETWORK_SET = {"nets": strings("CIDRs in the set"),
               "allowedEgressDomains": strings("domain names in the set")}

STAGED_ACTION = {"stagedAction": {
    "type": "string", "enum": ["Set", "Delete"],
    "description": "what enforcing this would do to the policy of the same name (default Set); "
                   "staged policies are never enforced"}}
KUBERNETES_RULES = {"type": "array", "items": {"type": "object",
                                               "x-kubernetes-preserve-unknown-fields": True}}
STAGED_COLUMNS = [("Action", ".spec.stagedAction"), ("Selector", ".spec.selector")]

KINDS: dict[str, dict[str, Any]] = {
    "GlobalNetworkPolicy": {
        "plural": "globalnetworkpolicies", "scope": "Cluster", "short": ["gnp"],
        "spec": {**POLICY_COMMON,
                 "namespaceSelector": string("namespaces whose endpoints this applies to"),
                 "applyOnForward": {"type": "boolean"},
                 "doNotTrack": {"type": "boolean", "description": "not supported (rejected)"},
                 "preDNAT": {"type": "boolean", "description": "not supported (rejected)"}},
        "columns": [("Tier", ".spec.tier"), ("Order", ".spec.order"),
                    ("Selector", ".spec.selector")],
    },
    "NetworkPolicy": {
        "plural": "networkpolicies", "scope": "Namespaced", "short": ["pnp"],
        "spec": POLICY_COMMON,
        "columns": [("Tier", ".spec.tier"), ("Order", ".spec.order"),
                    ("Selector", ".spec.selector")],
    },
    "GlobalNetworkSet": {
        "plural": "globalnetworksets", "scope": "Cluster", "short": ["gns"],
        "spec": NETWORK_SET, "columns": [],
    },
    "NetworkSet": {
        "plural": "networksets", "scope": "Namespaced", "short": ["pns"],
        "spec": NETWORK_SET, "columns": [],
    },
    "HostEndpoint": {
        "plural": "hostendpoints", "scope": "Cluster", "short": ["hep"],
        "spec": {
            "node": string("the node this interface is on"),
            "interfaceName": string("the interface, or * for all of the node's interfaces"),
            "expectedIPs": strings("the interface's IPs"),
            "profiles": strings(),
            "ports": {"type": "array", "items": {
                "type": "object", "required": ["name", "port", "protocol"], "properties": {
                    "name": string(), "port": {"type": "integer", "minimum": 1,
                                               "maximum": 65535},
                    "protocol": INT_OR_STRING}}},
        },
        "columns": [("Node", ".spec.node"), ("Interface", ".spec.interfaceName")],
    },
    "StagedGlobalNetworkPolicy": {
        "plural": "stagedglobalnetworkpolicies", "scope": "Cluster", "short": ["sgnp"],
        "spec": {**POLICY_COMMON, **STAGED_ACTION,
                 "namespaceSelector": string("namespaces whose endpoints this applies to"),
                 "applyOnForward": {"type": "boolean"}},
        "columns": STAGED_COLUMNS,
    },
    "StagedNetworkPolicy": {
        "plural": "stagednetworkpolicies", "scope": "Namespaced", "short": ["snp"],
        "spec": {**POLICY_COMMON, **STAGED_ACTION},
        "columns": STAGED_COLUMNS,
    },
    "StagedKubernetesNetworkPolicy": {
        "plural": "stagedkubernetesnetworkpolicies", "scope": "Namespaced", "short": ["sknp"],
        "spec": {**STAGED_ACTION,
                 "podSelector": {"type": "object",
                                 "x-kubernetes-preserve-unknown-fields": True},
                 "policyTypes": {"type": "array", "items": {
                     "type": "string", "enum": ["Ingress", "Egress"]}},
                 "ingress": KUBERNETES_RULES, "egress": KUBERNETES_RULES},
        "columns": [("Action", ".spec.stagedAction")],
    },
    "Tier": {
        "plural": "tiers", "scope": "Cluster", "short": [],
        "spec": {"order": {"type": "number"},
                 "defaultAction": {"type": "string", "enum": ["Deny", "Pass"]}},
        "columns": [("Order", ".spec.order"), ("Default", ".spec.defaultAction")],
    },
}


def crd(kind: str, info: dict[str, Any]) -> dict[str, Any]:
    plural = info["plural"]
    columns = [{"name": name, "type": "number" if name == "Order" else "string",
                "jsonPath": path} for name, path in info["columns"]]
    columns.append({"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"})
    names: dict[str, Any] = {"kind": kind, "listKind": kind + "List", "plural": plural,
                             "singular": kind.lower(), "categories": ["portcullis"]}
    if info["short"]:
        names["shortNames"] = info["short"]
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{GROUP}",
                     "labels": {"app.kubernetes.io/part-of": "portcullis"}},
        "spec": {
            "group": GROUP,
            "scope": info["scope"],
            "names": names,
            "versions": [{
                "name": VERSION, "served": True, "storage": True,
                "additionalPrinterColumns": columns,
                "schema": {"openAPIV3Schema": {
                    "type": "object",
                    "description": f"Calico's projectcalico.org/v3 {kind}, served as "
                                   f"{GROUP}/{VERSION}.",
                    "properties": {
                        "apiVersion": {"type": "string"},
                        "kind": {"type": "string"},
                        "metadata": {"type": "object"},
                        "spec": {"type": "object", "properties": info["spec"]},
                    },
                    **({"required": ["spec"]} if kind != "Tier" else {}),
                }},
            }],
        },
    }


class _NoAliases(yaml.SafeDumper):
    """Shared schema pieces are written out in full: no YAML anchors in manifests."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def render(kind: str) -> str:
    header = (f"# Generated by deploy/crds/generate.py: {KINDS[kind]['plural']}.{GROUP}\n"
              "# (edit the generator, not this file)\n")
    return header + yaml.dump(crd(kind, KINDS[kind]), Dumper=_NoAliases, sort_keys=False,
                              width=100)


def files() -> dict[Path, str]:
    return {HERE / f"{KINDS[k]['plural']}.yaml": render(k) for k in KINDS}


def main() -> int:
    for path, text in files().items():
        path.write_text(text)
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
