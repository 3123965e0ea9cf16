"""Reading and validating policy documents: YAML/JSON text in, model objects out.

Everything is checked before anything is returned: ``load`` either returns every
object or raises ``PolicyError`` listing every problem found (file, document,
field path, column, what was wrong), so nothing partial is ever applied.

Field paths use the document's own spelling with 0-based list indices, as
kubectl does (``spec.egress[1].destination.selector``); documents are numbered
from 1 as a person counts them.

Choices where Calico leaves room (documented so operators are not surprised):

- ``apiVersion`` ``projectcalico.org/v3`` and our alias ``policy.portcullis.io/v1``
  share the same schemas; ``networking.k8s.io/v1`` NetworkPolicy is translated
  (``policy.kubernetes``).
- Policy names follow Calico v3.32+: a DNS-1123 label, optionally with one dot
  (``tier.name`` is accepted but no tier prefix is required); namespaced names
  may also be ``knp.default.<name>`` (translated Kubernetes policies).
- Namespaced kinds need ``metadata.namespace`` unless the caller passes a
  ``default_namespace`` (as ``kubectl -n`` does); global kinds must not have one.
- Rule ``nets`` must be correctly masked (as Calico's validator insists);
  network-set ``nets`` are canonicalised (host bits cleared). Bare IPs become /32 or /128.
- Protocol names are accepted in any case and stored in Calico's spelling.
- ``domains`` may only appear in an egress Allow rule's destination, and not
  together with nets, selectors, services or service accounts (what would the
  intersection of a name and a selector mean?).
- Features Portcullis cannot enforce (``http`` matches, ``doNotTrack``,
  ``preDNAT``) are rejected with a clear message rather than silently ignored.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, cast

import yaml

from policy.domains import DomainError
from policy.domains import validate as validate_domain
from policy.model import (
    API_VERSION,
    DEFAULT_ALLOW_PROFILE,
    DEFAULT_TIER_NAME,
    DEFAULT_TIER_ORDER,
    STAGED_TARGET_KIND,
    EndpointPort,
    EntityRule,
    HostEndpoint,
    ICMPMatch,
    Labels,
    NetworkSet,
    Policy,
    PolicyObject,
    PolicyType,
    Port,
    Rule,
    ServiceAccountMatch,
    ServiceMatch,
    StagedPolicy,
    Tier,
)
from policy.selectors import SelectorError, parse

CALICO_API_VERSIONS = frozenset({"projectcalico.org/v3", "policy.portcullis.io/v1"})
KUBERNETES_NETWORKING = "networking.k8s.io/v1"

NAMESPACED_KINDS = frozenset({
    "NetworkPolicy", "NetworkSet", "StagedNetworkPolicy", "StagedKubernetesNetworkPolicy",
})
GLOBAL_KINDS = frozenset({
    "GlobalNetworkPolicy", "GlobalNetworkSet", "HostEndpoint", "Tier", "StagedGlobalNetworkPolicy",
})

# Kubernetes ObjectMeta fields that may appear (for instance in objects read from the API
# server) and carry nothing Portcullis needs.
IGNORED_METADATA = frozenset(
    {
        "uid",
        "resourceVersion",
        "generation",
        "creationTimestamp",
        "deletionTimestamp",
        "deletionGracePeriodSeconds",
        "managedFields",
        "ownerReferences",
        "finalizers",
        "generateName",
        "selfLink",
    }
)

_LABEL = "[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_SUBDOMAIN = f"{_LABEL}(\\.{_LABEL})*"
NAME_RE = re.compile(f"^{_SUBDOMAIN}$")
LABEL_NAME_RE = re.compile(f"^{_LABEL}$")
NETWORK_POLICY_NAME_RE = re.compile(
    f"^(({_LABEL})(\\.{_LABEL})?|(knp|ossg)\\.default\\.{_SUBDOMAIN})$"
)
GLOBAL_POLICY_NAME_RE = re.compile(f"^({_LABEL}\\.)?{_LABEL}$")
INTERFACE_RE = re.compile(r"^[a-zA-Z0-9_.-]{1,15}$")
_QUALIFIED_PART = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
PORT_NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$")

PROTOCOL_NAMES = {
    name.lower(): name for name in ("TCP", "UDP", "ICMP", "ICMPv6", "SCTP", "UDPLite")
}
_INT_TAG = "tag:yaml.org,2002:int"
_FLOAT_TAG = "tag:yaml.org,2002:float"
PORT_PROTOCOLS = frozenset({"TCP", "UDP", "SCTP", "UDPLite", 6, 17, 132, 136})
"""Protocols that have ports (Calico's ``Protocol.SupportsPorts``)."""


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong with the input, located as precisely as we can."""

    source: str
    document: int | None
    path: str
    message: str
    column: int | None = None
    line: int | None = None

    def __str__(self) -> str:
        parts = [self.source]
        if self.document is not None:
            parts.append(f"doc {self.document}")
        if self.line is not None:
            parts.append(f"line {self.line}")
        if self.path:
            parts.append(self.path)
        if self.column is not None:
            parts.append(f"column {self.column}")
        parts.append(self.message)
        return ": ".join(parts)


class PolicyError(ValueError):
    """Input rejected; ``problems`` lists every problem found, str() one per line."""

    def __init__(self, problems: Iterable[Problem]) -> None:
        self.problems: list[Problem] = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


class Checker:
    """Collects problems for one document while reading it field by field.

    Readers return a usable value even after reporting a problem so that one
    pass finds every problem; the caller raises if anything was reported.
    """

    def __init__(self, source: str, index: int | None) -> None:
        self.source = source
        self.index = index
        self.problems: list[Problem] = []

    def report(self, path: str, message: str, column: int | None = None) -> None:
        self.problems.append(Problem(self.source, self.index, path, message, column))

    def raise_if_problems(self) -> None:
        if self.problems:
            raise PolicyError(self.problems)

    # -- structure ---------------------------------------------------------------------------

    def mapping(self, value: object, path: str, allowed: Iterable[str]) -> dict[str, Any]:
        """A mapping whose keys are all in ``allowed``; unknown fields are reported and
        fields set to null are left out (the Kubernetes API writes ``"ipBlock": null``)."""
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            self.report(path, f"expected a mapping, got {_type_name(value)}")
            return {}
        allowed_set = set(allowed)
        result: dict[str, Any] = {}
        for key, item in value.items():
            if not isinstance(key, str):
                self.report(path, f"field names must be strings, got {key!r}")
            elif key not in allowed_set:
                hint = _closest(key, allowed_set)
                where = _join(path, key)
                self.report(where, "unknown field" + (f" (did you mean {hint!r}?)" if hint else ""))
            elif item is not None:  # null is absent, as when Go decodes JSON
                result[key] = item
        return result

    def sequence(self, value: object, path: str) -> list[Any]:
        if value is None:
            return []
        if not isinstance(value, list):
            self.report(path, f"expected a list, got {_type_name(value)}")
            return []
        return value

    def string(self, value: object, path: str, *, required: bool = False) -> str:
        if value is None:
            if required:
                self.report(path, "required")
            return ""
        if not isinstance(value, str):
            self.report(path, f"expected a string, got {_type_name(value)}")
            return ""
        if required and not value:
            self.report(path, "must not be empty")
        return value

    def strings(self, value: object, path: str) -> list[tuple[str, str]]:
        """A list of strings, with each item's path."""
        out: list[tuple[str, str]] = []
        for i, item in enumerate(self.sequence(value, path)):
            item_path = f"{path}[{i}]"
            text = self.string(item, item_path, required=True)
            if text:
                out.append((item_path, text))
        return out

    def boolean(self, value: object, path: str) -> bool:
        if value is None:
            return False
        if not isinstance(value, bool):
            self.report(path, f"expected true or false, got {_type_name(value)}")
            return False
        return value

    def integer(self, value: object, path: str, low: int, high: int) -> int | None:
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            self.report(path, f"expected an integer, got {_type_name(value)}")
            return None
        if not low <= value <= high:
            self.report(path, f"must be between {low} and {high}, got {value}")
            return None
        return value

    def number(self, value: object, path: str) -> float | None:
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float):
            self.report(path, f"expected a number, got {_type_name(value)}")
            return None
        number = float(value)
        if not math.isfinite(number):
            self.report(path, "must be a finite number")
            return None
        return number

    def choice(self, value: object, path: str, choices: Iterable[str]) -> str | None:
        options = list(choices)
        if value is None:
            return None
        if not isinstance(value, str) or value not in options:
            self.report(path, f"must be one of {', '.join(options)}, got {value!r}")
            return None
        return value

    # -- values ------------------------------------------------------------------------------

    def selector(self, value: object, path: str, *, allow_global: bool = False) -> str | None:
        """Validate a selector; returns the text as written, or None if absent or invalid."""
        if value is None:
            return None
        text = self.string(value, path)
        if not isinstance(value, str):
            return None
        try:
            parsed = parse(text)
        except SelectorError as error:
            self.report(path, error.message, error.column)
            return None
        if "global(" in text and not (allow_global and parsed.canonical == "global()"):
            if allow_global:
                self.report(path, "global() cannot be combined with other selectors")
            else:
                self.report(path, "global() can only be used in a rule's namespaceSelector")
            return None
        return text

    def labels(self, value: object, path: str) -> Labels:
        if value is None:
            return ()
        if not isinstance(value, Mapping):
            self.report(
                path, f"expected a mapping of label names to values, got {_type_name(value)}"
            )
            return ()
        good: dict[str, str] = {}
        for key, item in value.items():
            where = _join(path, str(key))
            if not isinstance(key, str) or not _valid_label_key(key):
                self.report(where, f"invalid label name {key!r}")
                continue
            if not isinstance(item, str):
                self.report(where, f"label values must be strings, got {_type_name(item)}")
                continue
            if item and (len(item) > 63 or not _QUALIFIED_PART.match(item)):
                self.report(where, f"invalid label value {item!r}")
                continue
            good[key] = item
        return tuple(sorted(good.items()))

    def annotations(self, value: object, path: str) -> Labels:
        if value is None:
            return ()
        if not isinstance(value, Mapping):
            self.report(path, f"expected a mapping, got {_type_name(value)}")
            return ()
        good: dict[str, str] = {}
        for key, item in value.items():
            if not isinstance(key, str) or not isinstance(item, str):
                self.report(_join(path, str(key)), "annotation names and values must be strings")
            else:
                good[key] = item
        return tuple(sorted(good.items()))

    def cidr(self, value: str, path: str, *, strict: bool) -> str | None:
        """Canonical CIDR text; ``strict`` rejects host bits set (as Calico does for rules)."""
        try:
            network = ipaddress.ip_network(value, strict=False)
        except ValueError:
            self.report(path, f"invalid CIDR {value!r}")
            return None
        if strict and "/" in value:
            try:
                ipaddress.ip_network(value, strict=True)
            except ValueError:
                self.report(path, f"{value!r} has host bits set (did you mean {network}?)")
                return None
        return network.with_prefixlen

    def cidrs(self, value: object, path: str, *, strict: bool) -> tuple[str, ...]:
        out: list[str] = []
        for item_path, text in self.strings(value, path):
            cidr = self.cidr(text, item_path, strict=strict)
            if cidr is not None:
                out.append(cidr)
        return tuple(out)

    def protocol(self, value: object, path: str) -> str | int | None:
        if value is None:
            return None
        if isinstance(value, bool):
            self.report(path, "expected a protocol name or number, got a boolean")
            return None
        if isinstance(value, int):
            if not 1 <= value <= 255:
                self.report(path, f"protocol numbers must be between 1 and 255, got {value}")
                return None
            return value
        if isinstance(value, str):
            name = PROTOCOL_NAMES.get(value.lower())
            if name is None:
                self.report(
                    path,
                    f"unknown protocol {value!r} (expected TCP, UDP, ICMP, ICMPv6, SCTP, "
                    "UDPLite or a number 1-255)",
                )
            return name
        self.report(path, f"expected a protocol name or number, got {_type_name(value)}")
        return None

    def port(self, value: object, path: str) -> Port | None:
        """Calico port syntax: 80, "80", "6000:6010" or a named port."""
        if isinstance(value, bool) or value is None:
            self.report(path, "expected a port number, range or name")
            return None
        if isinstance(value, int):
            if not 0 <= value <= 65535:
                self.report(path, f"ports must be between 0 and 65535, got {value}")
                return None
            return Port.single(value)
        if not isinstance(value, str):
            self.report(path, f"expected a port number, range or name, got {_type_name(value)}")
            return None
        if re.fullmatch(r"[0-9]+(:[0-9]+)?", value):
            first_text, _, last_text = value.partition(":")
            first = int(first_text)
            last = int(last_text) if last_text else first
            if not (0 <= first <= 65535 and 0 <= last <= 65535):
                self.report(path, f"ports must be between 0 and 65535, got {value!r}")
                return None
            if first > last:
                self.report(path, f"port range {value!r} starts after it ends")
                return None
            return Port(first, last)
        if not valid_port_name(value):
            self.report(
                path,
                f"invalid port {value!r} (expected a number, a range like 8000:8080, or a "
                "port name of up to 15 lowercase letters, digits and '-')",
            )
            return None
        return Port.named(value)

    def ports(self, value: object, path: str) -> tuple[Port, ...]:
        out: list[Port] = []
        for i, item in enumerate(self.sequence(value, path)):
            port = self.port(item, f"{path}[{i}]")
            if port is not None:
                out.append(port)
        return tuple(out)

    def name(self, value: object, path: str, pattern: re.Pattern[str], what: str) -> str:
        text = self.string(value, path, required=True)
        if text and (len(text) > 253 or not pattern.match(text)):
            self.report(path, f"invalid {what} {text!r}")
        return text


# -- documents --------------------------------------------------------------------------------


def load(text: str, source: str = "<stdin>", *, default_namespace: str | None = None) -> list[Any]:
    """Every object in multi-document YAML (or JSON) text, or PolicyError listing all problems.

    Objects are returned in document order; the same object twice is an error. A ``List``
    document (as ``kubectl get -o yaml`` writes) contributes its ``items``; their problems
    are located as ``items[i].<path>`` within that document.
    """
    documents = _parse_documents(text, source)
    objects: list[Any] = []
    problems: list[Problem] = []
    seen: dict[str, str] = {}
    for index, document in enumerate(documents, start=1):
        if document is None:
            continue
        for prefix, item in _expand_lists(document):
            where = f"doc {index}" + (f" {prefix.rstrip('.')}" if prefix else "")
            try:
                obj = load_document(item, source, index, default_namespace=default_namespace)
            except PolicyError as error:
                problems.extend(
                    dataclasses.replace(p, path=prefix + p.path if p.path else prefix.rstrip("."))
                    for p in error.problems
                )
                continue
            key = obj.key
            if key in seen:
                problems.append(
                    Problem(
                        source,
                        index,
                        prefix + "metadata.name",
                        f"{key} is already defined in {seen[key]}",
                    )
                )
                continue
            seen[key] = where
            objects.append(obj)
    if problems:
        raise PolicyError(problems)
    return objects


def _expand_lists(document: object) -> list[tuple[str, object]]:
    """(path prefix, object) pairs: a ``kind: List`` document yields its items."""
    if (
        isinstance(document, Mapping)
        and isinstance(document.get("kind"), str)
        and document["kind"].endswith("List")
        and isinstance(document.get("items"), list)
    ):
        return [(f"items[{i}].", item) for i, item in enumerate(document["items"])]
    return [("", document)]


def dump(objects: Iterable[PolicyObject]) -> str:
    """Multi-document YAML for objects, such that ``load(dump(objs)) == objs``."""
    return yaml.safe_dump_all(
        [obj.to_document() for obj in objects], sort_keys=False, default_flow_style=False
    )


def load_document(
    document: object,
    source: str = "<stdin>",
    index: int | None = None,
    *,
    default_namespace: str | None = None,
) -> PolicyObject:
    """One already-parsed document (for instance from the Kubernetes API) as a model object."""
    check = Checker(source, index)
    if not isinstance(document, Mapping):
        check.report(
            "",
            f"expected a mapping (an object with apiVersion and kind), got {_type_name(document)}",
        )
        check.raise_if_problems()
    doc = cast(Mapping[str, Any], document)
    api_version = doc.get("apiVersion")
    kind = doc.get("kind")
    if api_version is None:
        check.report("apiVersion", "required")
    if kind is None:
        check.report("kind", "required")
    check.raise_if_problems()
    if api_version == KUBERNETES_NETWORKING and kind == "NetworkPolicy":
        from policy.kubernetes import policy_from_document

        result: PolicyObject = policy_from_document(doc, check, default_namespace)
    elif isinstance(api_version, str) and api_version in CALICO_API_VERSIONS:
        reader = _CALICO_READERS.get(kind) if isinstance(kind, str) else None
        if reader is None:
            check.report(
                "kind",
                f"unsupported kind {kind!r} (expected one of {', '.join(sorted(_CALICO_READERS))})",
            )
            check.raise_if_problems()
        result = cast(_Reader, reader)(doc, check, default_namespace)
    else:
        check.report(
            "apiVersion",
            f"unsupported apiVersion {api_version!r} for kind {kind!r} (expected "
            f"projectcalico.org/v3, policy.portcullis.io/v1 or {KUBERNETES_NETWORKING} "
            "NetworkPolicy)",
        )
    check.raise_if_problems()
    return result


def read_metadata(
    doc: Mapping[str, Any],
    check: Checker,
    *,
    namespaced: bool,
    name_pattern: re.Pattern[str],
    what: str,
    default_namespace: str | None,
) -> tuple[str, str | None, Labels]:
    """Name, namespace and labels, with the checks every kind shares."""
    allowed = {"name", "namespace", "labels", "annotations", *IGNORED_METADATA}
    meta = check.mapping(doc.get("metadata"), "metadata", allowed)
    if doc.get("metadata") is None:
        check.report("metadata", "required")
    name = check.name(meta.get("name"), "metadata.name", name_pattern, what)
    namespace: str | None = None
    if namespaced:
        raw = meta.get("namespace", default_namespace)
        if raw is None:
            check.report("metadata.namespace", f"required for a namespaced {doc.get('kind')}")
        else:
            namespace = check.name(raw, "metadata.namespace", LABEL_NAME_RE, "namespace")
            if namespace and len(namespace) > 63:
                check.report("metadata.namespace", "must be at most 63 characters")
    elif meta.get("namespace") is not None:
        check.report(
            "metadata.namespace", f"{doc.get('kind')} is cluster-wide and has no namespace"
        )
    labels = check.labels(meta.get("labels"), "metadata.labels")
    check.annotations(meta.get("annotations"), "metadata.annotations")
    return name, namespace, labels


def _calico_top(doc: Mapping[str, Any], check: Checker) -> dict[str, Any]:
    check.mapping(doc, "", {"apiVersion", "kind", "metadata", "spec"})
    return dict(doc)


# -- policies ---------------------------------------------------------------------------------

_RULE_FIELDS = {
    "action",
    "protocol",
    "notProtocol",
    "icmp",
    "notICMP",
    "ipVersion",
    "source",
    "destination",
    "metadata",
    "http",
}
_ENTITY_FIELDS = {
    "nets",
    "notNets",
    "selector",
    "notSelector",
    "namespaceSelector",
    "ports",
    "notPorts",
    "serviceAccounts",
    "services",
    "domains",
}


def _read_policy(doc: Mapping[str, Any], check: Checker, default_namespace: str | None) -> Policy:
    _calico_top(doc, check)
    kind = doc["kind"]
    is_global = kind == "GlobalNetworkPolicy"
    name, namespace, labels = read_metadata(
        doc,
        check,
        namespaced=not is_global,
        name_pattern=GLOBAL_POLICY_NAME_RE if is_global else NETWORK_POLICY_NAME_RE,
        what="policy name (lowercase letters, digits and '-', at most one '.')",
        default_namespace=default_namespace,
    )
    allowed = {
        "tier",
        "order",
        "selector",
        "types",
        "ingress",
        "egress",
        "serviceAccountSelector",
        "performanceHints",
    }
    if is_global:
        allowed |= {"namespaceSelector", "applyOnForward", "doNotTrack", "preDNAT"}
    spec = check.mapping(doc.get("spec"), "spec", allowed)
    tier = check.string(spec.get("tier"), "spec.tier") or DEFAULT_TIER_NAME
    if not LABEL_NAME_RE.match(tier) or len(tier) > 63:
        check.report("spec.tier", f"invalid tier name {tier!r}")
    order = check.number(spec.get("order"), "spec.order")
    selector = check.selector(spec.get("selector"), "spec.selector") or ""
    namespace_selector = ""
    if is_global:
        namespace_selector = (
            check.selector(spec.get("namespaceSelector"), "spec.namespaceSelector") or ""
        )
    sa_selector = (
        check.selector(spec.get("serviceAccountSelector"), "spec.serviceAccountSelector") or ""
    )
    for flag in ("doNotTrack", "preDNAT"):
        if check.boolean(spec.get(flag), f"spec.{flag}"):
            check.report(f"spec.{flag}", "not supported by Portcullis (egress policy only)")
    apply_on_forward = check.boolean(spec.get("applyOnForward"), "spec.applyOnForward")
    # performanceHints are accepted for compatibility; a hint changes nothing we enforce.
    check.strings(spec.get("performanceHints"), "spec.performanceHints")

    ingress = _read_rules(spec.get("ingress"), "spec.ingress", "Ingress", check, is_global)
    egress = _read_rules(spec.get("egress"), "spec.egress", "Egress", check, is_global)
    types = _read_types(spec.get("types"), "spec.types", check, bool(ingress), bool(egress))
    return Policy(
        kind="GlobalNetworkPolicy" if is_global else "NetworkPolicy",
        name=name,
        namespace=namespace,
        tier=tier,
        order=order,
        selector=selector,
        namespace_selector=namespace_selector,
        service_account_selector=sa_selector,
        types=types,
        ingress=ingress,
        egress=egress,
        apply_on_forward=apply_on_forward,
        labels=labels,
    )


def _read_types(
    value: object, path: str, check: Checker, has_ingress: bool, has_egress: bool
) -> tuple[PolicyType, ...]:
    """Calico's default: Ingress, or Egress when there are only egress rules, or both."""
    if value is None:
        return default_types(has_ingress=has_ingress, has_egress=has_egress)
    types: list[PolicyType] = []
    for item_path, text in check.strings(value, path):
        if text not in ("Ingress", "Egress"):
            check.report(item_path, f"must be Ingress or Egress, got {text!r}")
        elif text in types:
            check.report(item_path, f"{text!r} is listed more than once")
        else:
            types.append(cast(PolicyType, text))
    return tuple(sorted(types, key=("Ingress", "Egress").index))


def default_types(*, has_ingress: bool, has_egress: bool) -> tuple[PolicyType, ...]:
    """Calico's ``types`` default when the field is absent.

    Ingress when there are no egress rules (including no rules at all); Egress when there
    are egress rules but no ingress rules; both when there are both.
    """
    if not has_egress:
        return ("Ingress",)
    if not has_ingress:
        return ("Egress",)
    return ("Ingress", "Egress")


def _read_rules(
    value: object, path: str, direction: PolicyType, check: Checker, is_global: bool
) -> tuple[Rule, ...]:
    rules: list[Rule] = []
    for i, item in enumerate(check.sequence(value, path)):
        rule = _read_rule(item, f"{path}[{i}]", direction, check, is_global)
        if rule is not None:
            rules.append(rule)
    return tuple(rules)


def _read_rule(
    value: object, path: str, direction: PolicyType, check: Checker, is_global: bool
) -> Rule | None:
    before = len(check.problems)
    fields = check.mapping(value, path, _RULE_FIELDS)
    if value is None:
        check.report(path, "expected a rule, got nothing")
    raw_action = fields.get("action")
    if raw_action is None:
        check.report(_join(path, "action"), "required (Allow, Deny, Pass or Log)")
    action = check.choice(raw_action, _join(path, "action"), ("Allow", "Deny", "Pass", "Log"))
    if "http" in fields:
        check.report(
            _join(path, "http"),
            "HTTP matches need application-layer policy, which Portcullis does not enforce",
        )
    annotations: Labels = ()
    if "metadata" in fields:
        meta = check.mapping(fields["metadata"], _join(path, "metadata"), {"annotations"})
        annotations = check.annotations(
            meta.get("annotations"), _join(path, "metadata.annotations")
        )
    protocol = check.protocol(fields.get("protocol"), _join(path, "protocol"))
    not_protocol = check.protocol(fields.get("notProtocol"), _join(path, "notProtocol"))
    icmp = _read_icmp(fields.get("icmp"), _join(path, "icmp"), check)
    not_icmp = _read_icmp(fields.get("notICMP"), _join(path, "notICMP"), check)
    ip_version = check.integer(fields.get("ipVersion"), _join(path, "ipVersion"), 4, 6)
    if ip_version == 5:
        check.report(_join(path, "ipVersion"), "must be 4 or 6")
        ip_version = None
    source = _read_entity(fields.get("source"), _join(path, "source"), check)
    destination = _read_entity(fields.get("destination"), _join(path, "destination"), check)

    # Cross-field rules, as Calico's validator has them.
    if protocol not in PORT_PROTOCOLS:
        for side_name, side in (("source", source), ("destination", destination)):
            for field, ports in (("ports", side.ports), ("notPorts", side.not_ports)):
                if ports:
                    check.report(
                        _join(path, f"{side_name}.{field}"),
                        "rules that specify ports must set protocol to TCP, UDP or SCTP",
                    )
    if icmp is not None and protocol not in ("ICMP", "ICMPv6", 1, 58):
        check.report(
            _join(path, "icmp"), "rules that specify ICMP fields must set protocol to ICMP"
        )
    for proto, want in (("ICMP", 4), ("ICMPv6", 6)):
        if proto in (protocol, not_protocol) and ip_version is not None and ip_version != want:
            check.report(_join(path, "ipVersion"), f"must be {want} with protocol {proto}")
    _check_net_versions(path, ip_version, source, destination, check)
    if direction == "Egress" and source.services is not None:
        check.report(_join(path, "source.services"), "not allowed in an egress rule's source")
    if direction == "Ingress" and destination.services is not None:
        check.report(
            _join(path, "destination.services"), "not allowed in an ingress rule's destination"
        )
    for side_name, side in (("source", source), ("destination", destination)):
        services = side.services
        if services is None:
            continue
        where = _join(path, f"{side_name}.services")
        if is_global and services.namespace is None:
            check.report(_join(where, "namespace"), "required in a global policy")
        if side_name == "destination" and (side.ports or side.not_ports):
            check.report(
                _join(path, "destination.ports" if side.ports else "destination.notPorts"),
                "cannot be combined with services (service rules use the service's ports)",
            )
        for present, what in (
            (side.namespace_selector is not None, "namespaceSelector"),
            (side.selector is not None or side.not_selector is not None, "selector/notSelector"),
            (side.service_accounts is not None, "serviceAccounts"),
            (bool(side.nets or side.not_nets), "nets/notNets"),
        ):
            if present:
                check.report(where, f"cannot be combined with {what} in the same rule")
    if source.domains:
        check.report(_join(path, "source.domains"), "domains are only allowed in a destination")
    if destination.domains:
        where = _join(path, "destination.domains")
        if direction != "Egress":
            check.report(where, "domains are only allowed in egress rules")
        elif action != "Allow":
            check.report(where, "domains are only allowed in Allow rules")
        for present, what in (
            (bool(destination.nets or destination.not_nets), "nets/notNets"),
            (
                destination.selector is not None
                or destination.not_selector is not None
                or destination.namespace_selector is not None,
                "selectors",
            ),
            (destination.services is not None, "services"),
            (destination.service_accounts is not None, "serviceAccounts"),
        ):
            if present:
                check.report(where, f"cannot be combined with {what} in the same destination")
    if action is None or len(check.problems) > before:
        return None
    return Rule(
        action=cast(Any, action),
        protocol=protocol,
        not_protocol=not_protocol,
        icmp=icmp,
        not_icmp=not_icmp,
        ip_version=cast(Any, ip_version),
        source=source,
        destination=destination,
        annotations=annotations,
    )


def _check_net_versions(
    path: str, ip_version: int | None, source: EntityRule, destination: EntityRule, check: Checker
) -> None:
    seen: set[int] = set()
    for field, nets in (
        ("source.nets", source.nets),
        ("source.notNets", source.not_nets),
        ("destination.nets", destination.nets),
        ("destination.notNets", destination.not_nets),
    ):
        versions = {ipaddress.ip_network(n).version for n in nets}
        if ip_version is not None and versions - {ip_version}:
            check.report(_join(path, field), f"CIDR version does not match ipVersion {ip_version}")
        elif len(versions | seen) > 1:
            check.report(_join(path, field), "a rule cannot mix IPv4 and IPv6 CIDRs")
        seen |= versions


def _read_icmp(value: object, path: str, check: Checker) -> ICMPMatch | None:
    if value is None:
        return None
    fields = check.mapping(value, path, {"type", "code"})
    icmp_type = check.integer(fields.get("type"), _join(path, "type"), 0, 254)
    code = check.integer(fields.get("code"), _join(path, "code"), 0, 255)
    if code is not None and icmp_type is None and "type" not in fields:
        check.report(_join(path, "code"), "an ICMP code needs an ICMP type")
    return ICMPMatch(icmp_type, code)


def _read_entity(value: object, path: str, check: Checker) -> EntityRule:
    fields = check.mapping(value, path, _ENTITY_FIELDS)
    service_accounts: ServiceAccountMatch | None = None
    if "serviceAccounts" in fields:
        where = _join(path, "serviceAccounts")
        sa = check.mapping(fields["serviceAccounts"], where, {"names", "selector"})
        names = tuple(text for _, text in check.strings(sa.get("names"), _join(where, "names")))
        sa_selector = check.selector(sa.get("selector"), _join(where, "selector")) or ""
        service_accounts = ServiceAccountMatch(names, sa_selector)
    services: ServiceMatch | None = None
    if "services" in fields:
        where = _join(path, "services")
        svc = check.mapping(fields["services"], where, {"name", "namespace"})
        svc_name = check.string(svc.get("name"), _join(where, "name"), required=True)
        svc_namespace = check.string(svc.get("namespace"), _join(where, "namespace")) or None
        services = ServiceMatch(svc_name, svc_namespace)
    domains: list[str] = []
    for item_path, pattern in check.strings(fields.get("domains"), _join(path, "domains")):
        try:
            validate_domain(pattern)
        except DomainError as error:
            check.report(item_path, str(error))
            continue
        domains.append(pattern)
    return EntityRule(
        nets=check.cidrs(fields.get("nets"), _join(path, "nets"), strict=True),
        not_nets=check.cidrs(fields.get("notNets"), _join(path, "notNets"), strict=True),
        selector=check.selector(fields.get("selector"), _join(path, "selector")),
        not_selector=check.selector(fields.get("notSelector"), _join(path, "notSelector")),
        namespace_selector=check.selector(
            fields.get("namespaceSelector"), _join(path, "namespaceSelector"), allow_global=True
        ),
        ports=check.ports(fields.get("ports"), _join(path, "ports")),
        not_ports=check.ports(fields.get("notPorts"), _join(path, "notPorts")),
        service_accounts=service_accounts,
        services=services,
        domains=tuple(domains),
    )


# -- other kinds ------------------------------------------------------------------------------


def _read_network_set(
    doc: Mapping[str, Any], check: Checker, default_namespace: str | None
) -> NetworkSet:
    _calico_top(doc, check)
    is_global = doc["kind"] == "GlobalNetworkSet"
    name, namespace, labels = read_metadata(
        doc,
        check,
        namespaced=not is_global,
        name_pattern=NAME_RE,
        what="name",
        default_namespace=default_namespace,
    )
    if any(key == "projectcalico.org/namespace" for key, _ in labels):
        check.report(
            "metadata.labels.projectcalico.org/namespace",
            "reserved: Calico sets this label itself",
        )
    spec = check.mapping(doc.get("spec"), "spec", {"nets", "allowedEgressDomains"})
    domains: list[str] = []
    for item_path, pattern in check.strings(
        spec.get("allowedEgressDomains"), "spec.allowedEgressDomains"
    ):
        try:
            validate_domain(pattern)
        except DomainError as error:
            check.report(item_path, str(error))
            continue
        domains.append(pattern)
    return NetworkSet(
        kind="GlobalNetworkSet" if is_global else "NetworkSet",
        name=name,
        namespace=namespace,
        labels=labels,
        nets=check.cidrs(spec.get("nets"), "spec.nets", strict=False),
        allowed_egress_domains=tuple(domains),
    )


def _read_host_endpoint(
    doc: Mapping[str, Any], check: Checker, default_namespace: str | None
) -> HostEndpoint:
    _calico_top(doc, check)
    name, _, labels = read_metadata(
        doc, check, namespaced=False, name_pattern=NAME_RE, what="name", default_namespace=None
    )
    spec = check.mapping(
        doc.get("spec"), "spec", {"node", "interfaceName", "expectedIPs", "profiles", "ports"}
    )
    node = check.string(spec.get("node"), "spec.node", required=True)
    interface = check.string(spec.get("interfaceName"), "spec.interfaceName")
    if interface and interface != "*" and not INTERFACE_RE.match(interface):
        check.report("spec.interfaceName", f"invalid interface name {interface!r}")
    expected: list[str] = []
    for item_path, text in check.strings(spec.get("expectedIPs"), "spec.expectedIPs"):
        try:
            expected.append(str(ipaddress.ip_address(text)))
        except ValueError:
            check.report(item_path, f"invalid IP address {text!r}")
    if not interface and "expectedIPs" not in spec:
        check.report("spec.interfaceName", "a host endpoint needs interfaceName or expectedIPs")
    profiles = []
    for item_path, text in check.strings(spec.get("profiles"), "spec.profiles"):
        if text != DEFAULT_ALLOW_PROFILE:
            check.report(item_path, f"unknown profile {text!r} (Portcullis has one: "
                         f"{DEFAULT_ALLOW_PROFILE}, which allows what no policy decides)")
        elif text not in profiles:
            profiles.append(text)
    ports: list[EndpointPort] = []
    for i, item in enumerate(check.sequence(spec.get("ports"), "spec.ports")):
        where = f"spec.ports[{i}]"
        fields = check.mapping(item, where, {"name", "protocol", "port"})
        port_name = check.string(fields.get("name"), _join(where, "name"), required=True)
        if port_name and not valid_port_name(port_name):
            check.report(_join(where, "name"), f"invalid port name {port_name!r}")
        protocol = check.protocol(fields.get("protocol"), _join(where, "protocol"))
        if fields.get("protocol") is None:
            check.report(_join(where, "protocol"), "required")
        elif protocol is not None and protocol not in ("TCP", "UDP", "SCTP"):
            check.report(_join(where, "protocol"), "must be TCP, UDP or SCTP")
        if fields.get("port") is None:
            check.report(_join(where, "port"), "required")
        number = check.integer(fields.get("port"), _join(where, "port"), 1, 65535)
        if port_name and isinstance(protocol, str) and number is not None:
            ports.append(EndpointPort(port_name, protocol, number))
    return HostEndpoint(
        name=name,
        node=node,
        interface_name=interface,
        expected_ips=tuple(expected),
        profiles=tuple(profiles),
        labels=labels,
        ports=tuple(ports),
    )


def _read_tier(doc: Mapping[str, Any], check: Checker, default_namespace: str | None) -> Tier:
    _calico_top(doc, check)
    name, _, labels = read_metadata(
        doc,
        check,
        namespaced=False,
        name_pattern=LABEL_NAME_RE,
        what="tier name (lowercase letters, digits and '-', no dots)",
        default_namespace=None,
    )
    if len(name) > 63:
        check.report("metadata.name", "tier names must be at most 63 characters")
    spec = check.mapping(doc.get("spec"), "spec", {"order", "defaultAction"})
    order = check.number(spec.get("order"), "spec.order")
    if name == DEFAULT_TIER_NAME and order != DEFAULT_TIER_ORDER:
        check.report("spec.order", f"the default tier's order must be {DEFAULT_TIER_ORDER:.0f}")
    action = check.choice(spec.get("defaultAction"), "spec.defaultAction", ("Deny", "Pass"))
    return Tier(
        name=name,
        order=order,
        default_action=cast(Any, action or "Deny"),
        labels=labels,
    )


def _read_staged(
    doc: Mapping[str, Any], check: Checker, default_namespace: str | None
) -> StagedPolicy:
    """A staged policy: its spec read as the policy it stages (same field paths), minus
    ``stagedAction``. A Delete names its target only; the rest of its spec is not read."""
    _calico_top(doc, check)
    kind = str(doc["kind"])
    spec = doc.get("spec")
    if spec is not None and not isinstance(spec, Mapping):
        check.report("spec", f"expected a mapping, got {_type_name(spec)}")
        spec = {}
    spec = dict(spec or {})
    action = spec.pop("stagedAction", "Set")
    if action not in ("Set", "Delete"):
        check.report("spec.stagedAction", f"expected Set or Delete, got {action!r}")
        action = "Set"
    target_kind = STAGED_TARGET_KIND[kind]
    if kind == "StagedKubernetesNetworkPolicy":
        base: dict[str, Any] = {"apiVersion": KUBERNETES_NETWORKING, "kind": "NetworkPolicy"}
    else:
        base = {"apiVersion": API_VERSION, "kind": target_kind}
    base["metadata"] = doc.get("metadata")
    policy: Policy | None = None
    written: dict[str, Any] = {"stagedAction": action}
    if action == "Delete":
        name, namespace, labels = read_metadata(
            base, check, namespaced=target_kind == "NetworkPolicy",
            name_pattern=NAME_RE if kind == "StagedKubernetesNetworkPolicy" else (
                GLOBAL_POLICY_NAME_RE if target_kind == "GlobalNetworkPolicy"
                else NETWORK_POLICY_NAME_RE),
            what="policy name", default_namespace=default_namespace,
        )
    elif kind == "StagedKubernetesNetworkPolicy":
        from policy.kubernetes import NAME_PREFIX, policy_from_document

        base["spec"] = spec
        policy = policy_from_document(base, check, default_namespace)
        name, namespace, labels = policy.name[len(NAME_PREFIX):], policy.namespace, policy.labels
        written.update(spec)
    else:
        base["spec"] = spec
        policy = _read_policy(base, check, default_namespace)
        name, namespace, labels = policy.name, policy.namespace, policy.labels
        written.update(policy.to_document()["spec"])
    return StagedPolicy(
        kind=cast(Any, kind), name=name, namespace=namespace, action=cast(Any, action),
        policy=policy, spec=json.dumps(written, sort_keys=True), labels=labels,
    )


_Reader = Callable[[Mapping[str, Any], Checker, "str | None"], PolicyObject]
_CALICO_READERS: dict[str, _Reader] = {
    "StagedNetworkPolicy": _read_staged,
    "StagedGlobalNetworkPolicy": _read_staged,
    "StagedKubernetesNetworkPolicy": _read_staged,
    "GlobalNetworkPolicy": _read_policy,
    "NetworkPolicy": _read_policy,
    "GlobalNetworkSet": _read_network_set,
    "NetworkSet": _read_network_set,
    "HostEndpoint": _read_host_endpoint,
    "Tier": _read_tier,
}


# -- text -------------------------------------------------------------------------------------


class _Loader(yaml.SafeLoader):
    """SafeLoader without YAML 1.1 base-60 numbers: ``ports: [5000:5010]`` must stay the
    range the user wrote (PyYAML would read it as the integer 3235 for 53:55), as Kubernetes'
    YAML reader keeps it."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in (_INT_TAG, _FLOAT_TAG)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    _INT_TAG,
    re.compile(r"^(?:[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+)$"),
    list("-+0123456789"),
)
_Loader.add_implicit_resolver(
    _FLOAT_TAG,
    re.compile(
        r"^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+][0-9]+)?|\.[0-9][0-9_]*(?:[eE][-+][0-9]+)?"
        r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
    ),
    list("-+0123456789."),
)


def _parse_documents(text: str, source: str) -> list[object]:
    stripped = text.lstrip()
    if stripped.startswith(("{", "[")):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise PolicyError(
                [Problem(source, None, "", error.msg, column=error.colno, line=error.lineno)]
            ) from None
        if isinstance(data, list):
            return list(data)
        return [data]
    try:
        return list(yaml.load_all(text, Loader=_Loader))
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        problem = getattr(error, "problem", None) or str(error)
        context = getattr(error, "context", None)
        message = f"invalid YAML: {problem}" + (f" ({context})" if context else "")
        line = mark.line + 1 if mark is not None else None
        column = mark.column + 1 if mark is not None else None
        raise PolicyError([Problem(source, None, "", message, column=column, line=line)]) from None


# -- helpers ----------------------------------------------------------------------------------


def _join(path: str, field: str) -> str:
    return f"{path}.{field}" if path else field


def _type_name(value: object) -> str:
    if value is None:
        return "nothing"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return f"a number ({value!r})"
    if isinstance(value, str):
        return f"a string ({value!r})"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, Mapping):
        return "a mapping"
    return type(value).__name__


def _closest(key: str, options: set[str]) -> str | None:
    lowered = key.lower().replace("_", "").replace("-", "")
    for option in sorted(options):
        if option.lower() == lowered:
            return option
    return None


def _valid_label_key(key: str) -> bool:
    prefix, slash, name = key.rpartition("/")
    if slash and (not prefix or len(prefix) > 253 or not NAME_RE.match(prefix)):
        return False
    return 0 < len(name) <= 63 and bool(_QUALIFIED_PART.match(name))


def valid_port_name(name: str) -> bool:
    """IANA service name rules, as Kubernetes applies them to named ports."""
    return (
        0 < len(name) <= 15
        and bool(PORT_NAME_RE.match(name))
        and "--" not in name
        and any(c.isalpha() for c in name)
    )
