"""Kubernetes ``networking.k8s.io/v1`` NetworkPolicy, translated into the Calico model.

The translation follows libcalico-go's ``K8sNetworkPolicyToCalico`` (backend/k8s/conversion):

- name ``knp.default.<name>``, same namespace, tier ``default``, order 1000;
- ``podSelector`` becomes ``projectcalico.org/orchestrator == 'k8s'`` ANDed with its
  ``matchLabels`` (sorted by key) and ``matchExpressions`` (in order);
- a peer's ``namespaceSelector`` becomes a rule ``namespaceSelector`` (``{}`` means
  ``all()``), its ``podSelector`` a rule ``selector`` (with the orchestrator term); a peer
  with only ``podSelector`` stays in the policy's namespace;
- ``ipBlock`` becomes ``nets`` and its ``except`` becomes ``notNets``;
- ports are grouped by protocol (TCP when unset), one rule per protocol and peer, numeric
  ports merged into ranges as Calico's ``SimplifyPorts`` does; ``endPort`` makes a range;
- ``policyTypes`` absent or empty: Ingress, plus Egress when ``egress`` has rules (the
  Kubernetes API server's defaulting, since files loaded here never passed through it).

Where Calico logs and drops a rule it cannot convert, we reject the whole policy with the
field path: a policy that silently allows less (or more) than written is worse than an error.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from typing import Any

from policy.load import (
    KUBERNETES_NETWORKING,
    NAME_RE,
    Checker,
    PolicyError,
    read_metadata,
    valid_port_name,
)
from policy.model import (
    DEFAULT_TIER_NAME,
    KUBERNETES_POLICY_ORDER,
    EntityRule,
    Policy,
    PolicyType,
    Port,
    Rule,
)
from policy.selectors import SelectorError, parse

NAME_PREFIX = "knp.default."
ORCHESTRATOR_LABEL = "projectcalico.org/orchestrator"
_PROTOCOLS = ("TCP", "UDP", "SCTP")


def translate(document: Mapping[str, Any], source: str = "<kubernetes>") -> Policy:
    """A Kubernetes NetworkPolicy document (as the API returns it) as a Calico-model Policy."""
    check = Checker(source, None)
    policy = policy_from_document(document, check, None)
    check.raise_if_problems()
    return policy


def policy_from_document(
    doc: Mapping[str, Any], check: Checker, default_namespace: str | None
) -> Policy:
    """Translate, reporting every problem to ``check`` (the caller raises)."""
    if doc.get("apiVersion") != KUBERNETES_NETWORKING or doc.get("kind") != "NetworkPolicy":
        check.report("kind", f"expected {KUBERNETES_NETWORKING} NetworkPolicy")
        raise PolicyError(check.problems)
    check.mapping(doc, "", {"apiVersion", "kind", "metadata", "spec", "status"})
    name, namespace, labels = read_metadata(
        doc,
        check,
        namespaced=True,
        name_pattern=NAME_RE,
        what="name",
        default_namespace=default_namespace,
    )
    spec = check.mapping(
        doc.get("spec"), "spec", {"podSelector", "ingress", "egress", "policyTypes"}
    )
    if "podSelector" not in spec:
        check.report("spec.podSelector", "required (use {} to select every pod in the namespace)")
    selector = label_selector(spec.get("podSelector"), "spec.podSelector", check, pod=True)

    ingress: list[Rule] = []
    for i, item in enumerate(check.sequence(spec.get("ingress"), "spec.ingress")):
        path = f"spec.ingress[{i}]"
        fields = check.mapping(item, path, {"from", "ports"})
        ingress += _rules(fields.get("from"), fields.get("ports"), path, "from", check, True)
    egress: list[Rule] = []
    for i, item in enumerate(check.sequence(spec.get("egress"), "spec.egress")):
        path = f"spec.egress[{i}]"
        fields = check.mapping(item, path, {"to", "ports"})
        egress += _rules(fields.get("to"), fields.get("ports"), path, "to", check, False)

    types: list[PolicyType] = []
    if not spec.get("policyTypes"):
        # The API server's SetDefaults_NetworkPolicy: Ingress, plus Egress with egress rules.
        types = ["Ingress", "Egress"] if spec.get("egress") else ["Ingress"]
    else:
        for item_path, text in check.strings(spec.get("policyTypes"), "spec.policyTypes"):
            if text == "Ingress" or text == "Egress":
                if text not in types:
                    types.append("Ingress" if text == "Ingress" else "Egress")
            else:
                check.report(item_path, f"must be Ingress or Egress, got {text!r}")
        types.sort(key=("Ingress", "Egress").index)
        if not types:
            types = ["Ingress"]
    return Policy(
        kind="NetworkPolicy",
        name=NAME_PREFIX + name,
        namespace=namespace,
        tier=DEFAULT_TIER_NAME,
        order=KUBERNETES_POLICY_ORDER,
        selector=selector,
        types=tuple(types),
        ingress=tuple(ingress),
        egress=tuple(egress),
        labels=labels,
    )


def label_selector(value: object, path: str, check: Checker, *, pod: bool) -> str:
    """Calico's ``k8sSelectorToCalico``: a Kubernetes LabelSelector as Calico selector text.

    ``pod`` selectors always carry the orchestrator term; an empty namespace selector means
    every namespace (``all()``).
    """
    terms: list[str] = [f"{ORCHESTRATOR_LABEL} == 'k8s'"] if pod else []
    if value is None:
        return " && ".join(terms)
    fields = check.mapping(value, path, {"matchLabels", "matchExpressions"})
    match_labels = fields.get("matchLabels") or {}
    expressions = check.sequence(fields.get("matchExpressions"), f"{path}.matchExpressions")
    if not pod and not match_labels and not expressions:
        return "all()"
    labels = check.labels(match_labels, f"{path}.matchLabels")
    for key, label_value in labels:
        terms.append(f"{key} == '{label_value}'")
    for i, item in enumerate(expressions):
        where = f"{path}.matchExpressions[{i}]"
        expr = check.mapping(item, where, {"key", "operator", "values"})
        key = check.string(expr.get("key"), f"{where}.key", required=True)
        if key and not check.labels({key: ""}, f"{where}.key"):
            continue
        operator = check.choice(
            expr.get("operator"), f"{where}.operator", ("In", "NotIn", "Exists", "DoesNotExist")
        )
        if expr.get("operator") is None:
            check.report(f"{where}.operator", "required")
        values = [text for _, text in check.strings(expr.get("values"), f"{where}.values")]
        for value_text in values:
            if "'" in value_text:
                check.report(f"{where}.values", f"invalid label value {value_text!r}")
        if operator in ("In", "NotIn") and not values:
            check.report(f"{where}.values", f"must not be empty for operator {operator}")
        if operator in ("Exists", "DoesNotExist") and values:
            check.report(f"{where}.values", f"must be empty for operator {operator}")
        listed = "', '".join(values)
        if operator == "In":
            terms.append(f"{key} in {{ '{listed}' }}")
        elif operator == "NotIn":
            terms.append(f"{key} not in {{ '{listed}' }}")
        elif operator == "Exists":
            terms.append(f"has({key})")
        elif operator == "DoesNotExist":
            terms.append(f"! has({key})")
    text = " && ".join(terms)
    try:
        parse(text)
    except SelectorError as error:  # only reachable through label values we did not foresee
        check.report(path, f"cannot be expressed as a Calico selector: {error.message}")
    return text


def _rules(
    raw_peers: object,
    raw_ports: object,
    path: str,
    peer_field: str,
    check: Checker,
    ingress: bool,
) -> list[Rule]:
    """Calico's ``k8sRuleToCalico``: one rule per (protocol, peer)."""
    peers: list[tuple[str | None, str | None, tuple[str, ...], tuple[str, ...]]] = []
    for i, item in enumerate(check.sequence(raw_peers, f"{path}.{peer_field}")):
        peers.append(_peer(item, f"{path}.{peer_field}[{i}]", check))
    if not peers:
        peers = [(None, None, (), ())]

    # Protocol -> ports; None for "all ports of this protocol". "" is "any protocol".
    by_protocol: dict[str, list[Port] | None] = {}
    port_items = check.sequence(raw_ports, f"{path}.ports")
    if not port_items:
        by_protocol = {"": None}
    for i, item in enumerate(port_items):
        where = f"{path}.ports[{i}]"
        fields = check.mapping(item, where, {"protocol", "port", "endPort"})
        protocol = check.choice(fields.get("protocol") or "TCP", f"{where}.protocol", _PROTOCOLS)
        port = _port(fields, where, check)
        if protocol is None:
            continue
        if port is None:
            by_protocol[protocol] = None
        elif protocol not in by_protocol or by_protocol[protocol] is not None:
            existing = by_protocol.get(protocol) or []
            by_protocol[protocol] = [*existing, port]

    rules: list[Rule] = []
    for protocol in sorted(by_protocol):
        ports = tuple(simplify_ports(by_protocol[protocol] or []))
        for selector, ns_selector, nets, not_nets in peers:
            peer = EntityRule(
                nets=nets,
                not_nets=not_nets,
                selector=selector,
                namespace_selector=ns_selector,
            )
            if ingress:
                rule = Rule(
                    action="Allow",
                    protocol=protocol or None,
                    source=peer,
                    destination=EntityRule(ports=ports),
                )
            else:
                rule = Rule(
                    action="Allow",
                    protocol=protocol or None,
                    destination=EntityRule(
                        nets=nets,
                        not_nets=not_nets,
                        selector=selector,
                        namespace_selector=ns_selector,
                        ports=ports,
                    ),
                )
            rules.append(rule)
    return rules


def _peer(
    value: object, path: str, check: Checker
) -> tuple[str | None, str | None, tuple[str, ...], tuple[str, ...]]:
    """(selector, namespaceSelector, nets, notNets) for one NetworkPolicyPeer."""
    fields = check.mapping(value, path, {"podSelector", "namespaceSelector", "ipBlock"})
    if not fields:
        check.report(path, "a peer needs podSelector, namespaceSelector or ipBlock")
        return None, None, (), ()
    if "ipBlock" in fields:
        if "podSelector" in fields or "namespaceSelector" in fields:
            check.report(path, "ipBlock cannot be combined with podSelector or namespaceSelector")
        where = f"{path}.ipBlock"
        block = check.mapping(fields["ipBlock"], where, {"cidr", "except"})
        cidr_text = check.string(block.get("cidr"), f"{where}.cidr", required=True)
        cidr = check.cidr(cidr_text, f"{where}.cidr", strict=False) if cidr_text else None
        excepts: list[str] = []
        for item_path, text in check.strings(block.get("except"), f"{where}.except"):
            excluded = check.cidr(text, item_path, strict=False)
            if excluded is None or cidr is None:
                continue
            outer, inner = ipaddress.ip_network(cidr), ipaddress.ip_network(excluded)
            if inner.version != outer.version or not inner.subnet_of(outer):  # type: ignore[arg-type]
                check.report(item_path, f"{text!r} must be inside {cidr_text!r}")
                continue
            excepts.append(excluded)
        return None, None, (cidr,) if cidr else (), tuple(excepts)
    selector = label_selector(fields.get("podSelector"), f"{path}.podSelector", check, pod=True)
    ns_selector: str | None = None
    if "namespaceSelector" in fields:
        ns_selector = label_selector(
            fields.get("namespaceSelector") or {}, f"{path}.namespaceSelector", check, pod=False
        )
    return selector, ns_selector, (), ()


def _port(fields: Mapping[str, Any], path: str, check: Checker) -> Port | None:
    """A NetworkPolicyPort's port (with endPort), or None for every port of the protocol."""
    raw = fields.get("port")
    end = fields.get("endPort")
    if raw is None:
        if end is not None:
            check.report(f"{path}.endPort", "needs a numeric port")
        return None
    if isinstance(raw, str) and not (raw.isascii() and raw.isdigit()):
        if not valid_port_name(raw):
            check.report(
                f"{path}.port",
                f"invalid port {raw!r} (expected a number or a port name of up to 15 lowercase "
                "letters, digits and '-')",
            )
            return None
        if end is not None:
            check.report(f"{path}.endPort", "cannot be used with a named port")
        return Port.named(raw)
    number = check.integer(int(raw) if isinstance(raw, str) else raw, f"{path}.port", 1, 65535)
    if number is None:
        return None
    if end is None:
        return Port.single(number)
    last = check.integer(end, f"{path}.endPort", 1, 65535)
    if last is None:
        return Port.single(number)
    if last < number:
        check.report(f"{path}.endPort", f"must be at least port {number}, got {last}")
        return Port.single(number)
    return Port(number, last)


def simplify_ports(ports: list[Port]) -> list[Port]:
    """Calico's ``SimplifyPorts``: named ports first as given, then merged numeric ranges.

    Adjacent or overlapping numbers merge (80, 81, 82 -> 80:82); a list with at most one
    numeric port is returned unchanged, as Calico does.
    """
    numeric = sorted((p.first, p.last) for p in ports if not p.is_named)
    if len(ports) <= 1 or (len(numeric) == 1 and numeric[0][0] == numeric[0][1]) or not numeric:
        return ports
    out = [p for p in ports if p.is_named]
    start, last = numeric[0]
    for first, end in numeric[1:]:
        if first > last + 1:
            out.append(Port(start, last))
            start = first
        last = max(last, end)
    out.append(Port(start, last))
    return out
