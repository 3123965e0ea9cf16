"""policy.load: what is accepted, what is rejected, and exactly where the problem is reported."""

from __future__ import annotations

import json
import textwrap

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from policy import HostEndpoint, NetworkSet, Policy, PolicyError, Port, Tier, dump, load
from policy.load import load_document


def _policy(spec: str, *, kind: str = "GlobalNetworkPolicy", meta: str = "name: p") -> str:
    namespace = "\n  namespace: prod" if kind == "NetworkPolicy" and "namespace" not in meta else ""
    return (
        f"apiVersion: projectcalico.org/v3\nkind: {kind}\nmetadata:\n  {meta}{namespace}\n"
        f"spec:\n{textwrap.indent(textwrap.dedent(spec), '  ')}"
    )


def _problems(text: str) -> list[tuple[str, str, int | None]]:
    with pytest.raises(PolicyError) as caught:
        load(text, "policies.yaml")
    return [(p.path, p.message, p.column) for p in caught.value.problems]


# (description, YAML spec, expected path, expected message fragment)
REJECTED = [
    ("unknown spec field", "selector: all()\nsellector: x\n", "spec.sellector", "unknown field"),
    (
        "misspelt rule field, with hint",
        "egress:\n- action: Allow\n  Protocol: TCP\n",
        "spec.egress[0].Protocol",
        "did you mean 'protocol'",
    ),
    ("wrong type", "order: high\n", "spec.order", "expected a number"),
    ("boolean order", "order: true\n", "spec.order", "expected a number"),
    ("missing action", "egress:\n- protocol: TCP\n", "spec.egress[0].action", "required"),
    ("invalid action", "egress:\n- action: Accept\n", "spec.egress[0].action", "must be one of"),
    (
        "invalid CIDR",
        "egress:\n- action: Allow\n  destination:\n    nets: [10.0.0.0/33]\n",
        "spec.egress[0].destination.nets[0]",
        "invalid CIDR",
    ),
    (
        "host bits set in a rule CIDR",
        "egress:\n- action: Allow\n  destination:\n    notNets: [10.0.0.1/8]\n",
        "spec.egress[0].destination.notNets[0]",
        "did you mean 10.0.0.0/8",
    ),
    (
        "mixed IP versions",
        "egress:\n- action: Allow\n  destination:\n    nets: [10.0.0.0/8, '2001:db8::/32']\n",
        "spec.egress[0].destination.nets",
        "mix IPv4 and IPv6",
    ),
    (
        "ipVersion mismatch",
        "egress:\n- action: Allow\n  ipVersion: 6\n  destination:\n    nets: [10.0.0.0/8]\n",
        "spec.egress[0].destination.nets",
        "does not match ipVersion",
    ),
    (
        "invalid applies-to selector",
        "selector: app == \n",
        "spec.selector",
        "",
    ),
    (
        "invalid peer selector",
        "egress:\n- action: Allow\n  destination:\n    selector: \"a == 'b' &&\"\n",
        "spec.egress[0].destination.selector",
        "",
    ),
    (
        "global() outside a namespaceSelector",
        "egress:\n- action: Allow\n  destination:\n    selector: global()\n",
        "spec.egress[0].destination.selector",
        "namespaceSelector",
    ),
    (
        "global() combined with another term",
        "egress:\n- action: Allow\n  destination:\n    namespaceSelector: global() && a == 'b'\n",
        "spec.egress[0].destination.namespaceSelector",
        "cannot be combined",
    ),
    (
        "ports without protocol",
        "egress:\n- action: Allow\n  destination:\n    ports: [443]\n",
        "spec.egress[0].destination.ports",
        "must set protocol to TCP, UDP or SCTP",
    ),
    (
        "ports with ICMP",
        "ingress:\n- action: Allow\n  protocol: ICMP\n  source:\n    notPorts: [1]\n",
        "spec.ingress[0].source.notPorts",
        "must set protocol",
    ),
    (
        "port out of range",
        "egress:\n- action: Allow\n  protocol: TCP\n  destination:\n    ports: [70000]\n",
        "spec.egress[0].destination.ports[0]",
        "between 0 and 65535",
    ),
    (
        "backwards range",
        "egress:\n- action: Allow\n  protocol: TCP\n  destination:\n    ports: ['90:80']\n",
        "spec.egress[0].destination.ports[0]",
        "starts after it ends",
    ),
    (
        "invalid named port",
        "egress:\n- action: Allow\n  protocol: TCP\n  destination:\n    ports: [Not_A_Port]\n",
        "spec.egress[0].destination.ports[0]",
        "invalid port",
    ),
    (
        "unknown protocol",
        "egress:\n- action: Allow\n  protocol: QUIC\n",
        "spec.egress[0].protocol",
        "unknown protocol",
    ),
    (
        "protocol number out of range",
        "egress:\n- action: Allow\n  protocol: 256\n",
        "spec.egress[0].protocol",
        "between 1 and 255",
    ),
    (
        "icmp without ICMP protocol",
        "egress:\n- action: Allow\n  protocol: TCP\n  icmp: {type: 8}\n",
        "spec.egress[0].icmp",
        "must set protocol to ICMP",
    ),
    (
        "icmp code without type",
        "egress:\n- action: Allow\n  protocol: ICMP\n  icmp: {code: 0}\n",
        "spec.egress[0].icmp.code",
        "needs an ICMP type",
    ),
    (
        "domains in an ingress rule",
        "ingress:\n- action: Allow\n  destination:\n    domains: [example.com]\n",
        "spec.ingress[0].destination.domains",
        "only allowed in egress rules",
    ),
    (
        "domains in a Deny rule",
        "egress:\n- action: Deny\n  destination:\n    domains: [example.com]\n",
        "spec.egress[0].destination.domains",
        "only allowed in Allow rules",
    ),
    (
        "domains in a source",
        "egress:\n- action: Allow\n  source:\n    domains: [example.com]\n",
        "spec.egress[0].source.domains",
        "only allowed in a destination",
    ),
    (
        "domains with a selector",
        "egress:\n- action: Allow\n  destination:\n    domains: [example.com]\n"
        "    selector: a == 'b'\n",
        "spec.egress[0].destination.domains",
        "cannot be combined with selectors",
    ),
    (
        "invalid domain pattern",
        "egress:\n- action: Allow\n  destination:\n    domains: ['*']\n",
        "spec.egress[0].destination.domains[0]",
        "",
    ),
    (
        "services in an egress source",
        "egress:\n- action: Allow\n  source:\n    services: {name: s, namespace: n}\n",
        "spec.egress[0].source.services",
        "not allowed in an egress rule's source",
    ),
    (
        "services without namespace in a global policy",
        "egress:\n- action: Allow\n  destination:\n    services: {name: s}\n",
        "spec.egress[0].destination.services.namespace",
        "required in a global policy",
    ),
    (
        "services with ports",
        "egress:\n- action: Allow\n  protocol: TCP\n  destination:\n"
        "    services: {name: s, namespace: n}\n    ports: [80]\n",
        "spec.egress[0].destination.ports",
        "cannot be combined with services",
    ),
    ("types typo", "types: [Egres]\n", "spec.types[0]", "must be Ingress or Egress"),
    ("types repeated", "types: [Egress, Egress]\n", "spec.types[1]", "more than once"),
    (
        "http matches",
        "ingress:\n- action: Allow\n  http: {methods: [GET]}\n",
        "spec.ingress[0].http",
        "application-layer",
    ),
    ("doNotTrack", "doNotTrack: true\napplyOnForward: true\n", "spec.doNotTrack", "not supported"),
    ("invalid tier name", "tier: Platform.Tier\n", "spec.tier", "invalid tier name"),
    ("rule is not a mapping", "egress:\n- Allow\n", "spec.egress[0]", "expected a mapping"),
    ("egress is not a list", "egress: {action: Allow}\n", "spec.egress", "expected a list"),
]


@pytest.mark.parametrize(
    ("spec", "path", "fragment"), [r[1:] for r in REJECTED], ids=[r[0] for r in REJECTED]
)
def test_rejected_with_path(spec: str, path: str, fragment: str) -> None:
    problems = _problems(_policy(spec))
    assert any(p == path and fragment in m for p, m, _ in problems), problems


def test_selector_problem_carries_the_selector_column() -> None:
    text = _policy(
        "egress:\n- action: Allow\n  destination:\n    selector: \"app == 'x' && = 'y'\"\n"
    )
    with pytest.raises(PolicyError) as caught:
        load(text, "policies.yaml")
    (problem,) = caught.value.problems
    assert problem.column == 15
    assert str(problem).startswith(
        "policies.yaml: doc 1: spec.egress[0].destination.selector: column 15: "
    )


def test_every_problem_is_reported_and_nothing_is_returned() -> None:
    good = _policy("selector: all()\n", meta="name: ok")
    bad1 = _policy("order: x\n", meta="name: bad1")
    bad2 = _policy("egress:\n- action: Nope\n", meta="name: bad2")
    with pytest.raises(PolicyError) as caught:
        load("---\n".join([good, bad1, bad2]), "f.yaml")
    located = [(p.document, p.path) for p in caught.value.problems]
    assert located == [(2, "spec.order"), (3, "spec.egress[0].action")]
    lines = str(caught.value).splitlines()
    assert lines[0].startswith("f.yaml: doc 2: spec.order: ")
    assert lines[1].startswith("f.yaml: doc 3: spec.egress[0].action: ")


@pytest.mark.parametrize(
    ("text", "path", "fragment"),
    [
        ("apiVersion: v1\nkind: Pod\nmetadata: {name: x}\n", "apiVersion", "unsupported"),
        (
            "apiVersion: projectcalico.org/v3\nkind: Profile\nmetadata: {name: x}\n",
            "kind",
            "unsupported kind",
        ),
        ("kind: Tier\nmetadata: {name: x}\n", "apiVersion", "required"),
        ("apiVersion: projectcalico.org/v3\nkind: Tier\n", "metadata", "required"),
        (
            "apiVersion: projectcalico.org/v3\nkind: Tier\nmetadata: {name: a.b}\n",
            "metadata.name",
            "invalid tier name",
        ),
        (
            "apiVersion: projectcalico.org/v3\nkind: NetworkPolicy\nmetadata: {name: x}\n",
            "metadata.namespace",
            "required",
        ),
        (
            "apiVersion: projectcalico.org/v3\nkind: GlobalNetworkSet\nmetadata: {name: x, "
            "namespace: y}\n",
            "metadata.namespace",
            "cluster-wide",
        ),
        (
            "apiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\n"
            "metadata: {name: a.b.c}\n",
            "metadata.name",
            "invalid policy name",
        ),
        (
            "apiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata: {name: Caps}\n",
            "metadata.name",
            "invalid policy name",
        ),
        (
            "apiVersion: projectcalico.org/v3\nkind: GlobalNetworkSet\nmetadata:\n  name: x\n"
            "  labels: {'bad key!': v}\n",
            "metadata.labels.bad key!",
            "invalid label name",
        ),
        (
            "apiVersion: projectcalico.org/v3\nkind: GlobalNetworkSet\nmetadata: {name: x}\n"
            "spec: {nets: [nope]}\n",
            "spec.nets[0]",
            "invalid CIDR",
        ),
        (
            "apiVersion: projectcalico.org/v3\nkind: GlobalNetworkSet\nmetadata: {name: x}\n"
            "spec: {allowedEgressDomains: ['a.*.*.com']}\n",
            "spec.allowedEgressDomains[0]",
            "",
        ),
        (
            "apiVersion: projectcalico.org/v3\nkind: NetworkSet\nmetadata: {name: x, namespace: n, "
            "labels: {projectcalico.org/namespace: m}}\n",
            "metadata.labels.projectcalico.org/namespace",
            "reserved",
        ),
        (
            "apiVersion: projectcalico.org/v3\nkind: HostEndpoint\nmetadata: {name: h}\n"
            "spec: {node: n1}\n",
            "spec.interfaceName",
            "needs interfaceName or expectedIPs",
        ),
        (
            "apiVersion: projectcalico.org/v3\nkind: HostEndpoint\nmetadata: {name: h}\n"
            "spec: {node: n1, interfaceName: 'this-name-is-too-long'}\n",
            "spec.interfaceName",
            "invalid interface name",
        ),
        (
            "apiVersion: projectcalico.org/v3\nkind: HostEndpoint\nmetadata: {name: h}\n"
            "spec: {node: n1, interfaceName: eth0, profiles: [projectcalico-default-allow, "
            "kns.web]}\n",
            "spec.profiles[1]",
            "unknown profile 'kns.web'",
        ),
        (
            "apiVersion: projectcalico.org/v3\nkind: HostEndpoint\nmetadata: {name: h}\n"
            "spec: {node: n1, expectedIPs: [10.0.0.0/24]}\n",
            "spec.expectedIPs[0]",
            "invalid IP address",
        ),
        (
            "apiVersion: projectcalico.org/v3\nkind: HostEndpoint\nmetadata: {name: h}\n"
            "spec: {node: n1, interfaceName: eth0,"
            " ports: [{name: web, protocol: ICMP, port: 80}]}\n",
            "spec.ports[0].protocol",
            "TCP, UDP or SCTP",
        ),
        (
            "apiVersion: projectcalico.org/v3\nkind: Tier\nmetadata: {name: t}\n"
            "spec: {defaultAction: Allow}\n",
            "spec.defaultAction",
            "must be one of Deny, Pass",
        ),
        (
            "apiVersion: projectcalico.org/v3\nkind: Tier\nmetadata: {name: default}\n"
            "spec: {order: 5}\n",
            "spec.order",
            "1000000",
        ),
    ],
)
def test_document_level_rejections(text: str, path: str, fragment: str) -> None:
    problems = _problems(text)
    assert any(p == path and fragment in m for p, m, _ in problems), problems


def test_duplicate_objects_in_one_load() -> None:
    doc = _policy("selector: all()\n")
    with pytest.raises(PolicyError) as caught:
        load(doc + "---\n" + doc, "dup.yaml")
    (problem,) = caught.value.problems
    assert (problem.document, problem.path) == (2, "metadata.name")
    assert "already defined in doc 1" in problem.message


def test_yaml_syntax_error_has_line_and_column() -> None:
    with pytest.raises(PolicyError) as caught:
        load("apiVersion: projectcalico.org/v3\nkind: [Tier\n", "bad.yaml")
    (problem,) = caught.value.problems
    assert problem.line is not None and problem.column is not None
    assert str(problem).startswith(f"bad.yaml: line {problem.line}: ")


def test_json_documents_and_lists() -> None:
    doc = {
        "apiVersion": "projectcalico.org/v3",
        "kind": "Tier",
        "metadata": {"name": "t"},
        "spec": {"order": 10},
    }
    assert load(json.dumps(doc)) == [Tier("t", 10.0)]
    second = {**doc, "metadata": {"name": "u"}}
    assert load(json.dumps([doc, second])) == [Tier("t", 10.0), Tier("u", 10.0)]
    listed = {"apiVersion": "v1", "kind": "List", "items": [doc]}
    assert load(json.dumps(listed)) == [Tier("t", 10.0)]
    with pytest.raises(PolicyError) as caught:
        load('{"kind": ', "x.json")
    assert caught.value.problems[0].line == 1


@pytest.mark.parametrize(
    ("spec", "types"),
    [
        ("selector: all()\n", ("Ingress",)),
        ("ingress:\n- action: Allow\n", ("Ingress",)),
        ("egress:\n- action: Allow\n", ("Egress",)),
        ("ingress:\n- action: Allow\negress:\n- action: Allow\n", ("Ingress", "Egress")),
        ("types: [Egress, Ingress]\n", ("Ingress", "Egress")),
        ("types: []\n", ()),
    ],
)
def test_types_default_as_calico(spec: str, types: tuple[str, ...]) -> None:
    (policy,) = load(_policy(spec))
    assert isinstance(policy, Policy)
    assert policy.types == types


def test_values_are_canonicalised() -> None:
    (policy,) = load(
        _policy(
            "order: 10\negress:\n- action: Allow\n  protocol: tcp\n  destination:\n"
            "    nets: [10.1.2.3]\n    ports: [80, '8080', '9000:9010', http]\n"
        )
    )
    assert isinstance(policy, Policy)
    rule = policy.egress[0]
    assert rule.protocol == "TCP"
    assert rule.destination.nets == ("10.1.2.3/32",)
    assert rule.destination.ports == (
        Port(80, 80),
        Port(8080, 8080),
        Port(9000, 9010),
        Port.named("http"),
    )
    assert policy.order == 10.0 and policy.tier == "default"
    (netset,) = load(
        "apiVersion: projectcalico.org/v3\nkind: GlobalNetworkSet\nmetadata: {name: s}\n"
        "spec: {nets: [10.1.2.3/8, '2001:DB8::1']}\n"
    )
    assert isinstance(netset, NetworkSet)
    assert netset.nets == ("10.0.0.0/8", "2001:db8::1/128")


def test_portcullis_api_group_is_an_alias() -> None:
    calico = load(_policy("selector: all()\n"))
    ours = load(
        _policy("selector: all()\n").replace("projectcalico.org/v3", "policy.portcullis.io/v1")
    )
    assert calico == ours


def test_default_namespace_fills_in_like_kubectl() -> None:
    text = "apiVersion: projectcalico.org/v3\nkind: NetworkPolicy\nmetadata: {name: x}\n"
    (policy,) = load(text, default_namespace="team-a")
    assert isinstance(policy, Policy) and policy.namespace == "team-a"


def test_kubernetes_object_metadata_is_tolerated() -> None:
    doc = {
        "apiVersion": "projectcalico.org/v3",
        "kind": "GlobalNetworkSet",
        "metadata": {"name": "s", "uid": "1", "resourceVersion": "7", "managedFields": []},
        "spec": {"nets": ["10.0.0.0/8"]},
    }
    obj = load_document(doc, "k8s", 1)
    assert isinstance(obj, NetworkSet) and obj.nets == ("10.0.0.0/8",)


def test_everything_round_trips() -> None:
    text = """
apiVersion: projectcalico.org/v3
kind: NetworkPolicy
metadata: {name: tier1.p, namespace: prod, labels: {team: a}}
spec:
  tier: tier1
  order: 1.5
  selector: app == 'web'
  serviceAccountSelector: role == 'x'
  types: [Ingress, Egress]
  ingress:
  - action: Allow
    metadata: {annotations: {why: because}}
    protocol: ICMP
    icmp: {type: 8, code: 0}
    ipVersion: 4
    source: {nets: [10.0.0.0/8], notNets: [10.1.0.0/16], notSelector: a == 'b'}
  egress:
  - action: Pass
    protocol: 6
    notProtocol: 17
    notICMP: {type: 3}
    destination:
      namespaceSelector: global()
      selector: x == 'y'
      notPorts: [1]
      serviceAccounts: {names: [a, b], selector: c == 'd'}
  - action: Log
  - action: Allow
    destination:
      services: {name: svc}
  - action: Allow
    protocol: UDPLite
    destination: {domains: [example.com, '*.example.org'], ports: ['1:2']}
---
apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata: {name: g}
spec:
  namespaceSelector: all()
  applyOnForward: true
  ingress: [{action: Deny}]
---
apiVersion: projectcalico.org/v3
kind: HostEndpoint
metadata: {name: h, labels: {role: w}}
spec:
  node: n1
  interfaceName: '*'
  expectedIPs: [10.0.0.1, 'fd00::1']
  profiles: [projectcalico-default-allow]
  ports: [{name: ssh, protocol: TCP, port: 22}]
---
apiVersion: projectcalico.org/v3
kind: NetworkSet
metadata: {name: ns, namespace: prod, labels: {a: b}}
spec: {nets: [192.0.2.0/24], allowedEgressDomains: [a.example.com]}
---
apiVersion: projectcalico.org/v3
kind: Tier
metadata: {name: tier1}
spec: {order: 100, defaultAction: Pass}
"""
    objects = load(text)
    assert [type(o) for o in objects] == [Policy, Policy, HostEndpoint, NetworkSet, Tier]
    assert load(dump(objects)) == objects
    for obj in objects:
        assert load_document(obj.to_document()) == obj


def test_unquoted_port_ranges_are_not_base_60_numbers() -> None:
    (policy,) = load(
        _policy("egress:\n- action: Allow\n  protocol: TCP\n  destination:\n    ports: [53:55]\n")
    )
    assert isinstance(policy, Policy)
    assert policy.egress[0].destination.ports == (Port(53, 55),)


def test_list_documents_contribute_their_items() -> None:
    tier = "{apiVersion: projectcalico.org/v3, kind: Tier, metadata: {name: %s}}"
    text = f"apiVersion: v1\nkind: List\nitems:\n- {tier % 't'}\n- {tier % 'u'}\n"
    assert load(text) == [Tier("t"), Tier("u")]
    bad = f"apiVersion: v1\nkind: List\nitems:\n- {tier % 't'}\n- {tier % 'A_B'}\n"
    with pytest.raises(PolicyError) as caught:
        load(bad + "---\n" + tier % "t", "list.yaml")
    assert [(p.document, p.path) for p in caught.value.problems] == [
        (1, "items[1].metadata.name"),
        (2, "metadata.name"),
    ]
    assert "already defined in doc 1 items[0]" in caught.value.problems[1].message


# -- fuzz: only PolicyError escapes, whatever the document ------------------------------------

_FIELDS = [
    "apiVersion",
    "kind",
    "metadata",
    "spec",
    "name",
    "namespace",
    "labels",
    "selector",
    "namespaceSelector",
    "serviceAccountSelector",
    "types",
    "ingress",
    "egress",
    "action",
    "protocol",
    "notProtocol",
    "icmp",
    "notICMP",
    "type",
    "code",
    "ipVersion",
    "source",
    "destination",
    "nets",
    "notNets",
    "notSelector",
    "ports",
    "notPorts",
    "serviceAccounts",
    "names",
    "services",
    "domains",
    "order",
    "tier",
    "defaultAction",
    "node",
    "interfaceName",
    "expectedIPs",
    "profiles",
    "allowedEgressDomains",
    "podSelector",
    "policyTypes",
    "from",
    "to",
    "ipBlock",
    "cidr",
    "except",
    "port",
    "endPort",
    "matchLabels",
    "matchExpressions",
    "key",
    "operator",
    "values",
    "items",
    "metadata",
    "annotations",
]
_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-5, 70000),
    st.floats(allow_nan=True),
    st.sampled_from(
        [
            "",
            "TCP",
            "Allow",
            "Egress",
            "10.0.0.0/8",
            "a == 'b'",
            "*.x.com",
            "80:90",
            "projectcalico.org/v3",
            "networking.k8s.io/v1",
            "NetworkPolicy",
            "GlobalNetworkPolicy",
            "Tier",
            "HostEndpoint",
            "GlobalNetworkSet",
            "In",
            "global()",
            "x",
            "List",
        ]
    ),
    st.text(max_size=6),
)
_VALUES = st.recursive(
    _SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(
            st.one_of(st.sampled_from(_FIELDS), st.text(max_size=3)), inner, max_size=5
        ),
    ),
    max_leaves=25,
)
_DOCUMENTS = st.fixed_dictionaries(
    {
        "apiVersion": st.one_of(
            st.sampled_from(["projectcalico.org/v3", "networking.k8s.io/v1"]), _VALUES
        ),
        "kind": st.one_of(
            st.sampled_from(
                [
                    "NetworkPolicy",
                    "GlobalNetworkPolicy",
                    "NetworkSet",
                    "GlobalNetworkSet",
                    "HostEndpoint",
                    "Tier",
                ]
            ),
            _VALUES,
        ),
        "metadata": st.one_of(_VALUES, st.just({"name": "x", "namespace": "y"})),
        "spec": _VALUES,
    }
)


@settings(max_examples=300, deadline=None)
@given(document=st.one_of(_DOCUMENTS, _VALUES))
def test_only_policy_error_escapes(document: object) -> None:
    try:
        obj = load_document(document, "fuzz", 1)
    except PolicyError as error:
        assert error.problems and all(str(p).startswith("fuzz") for p in error.problems)
    else:
        assert load_document(obj.to_document()) == obj


def test_unhashable_api_version_is_a_problem_not_a_crash() -> None:
    with pytest.raises(PolicyError) as caught:
        load_document({"apiVersion": ["projectcalico.org/v3"], "kind": {"a": 1}})
    assert caught.value.problems[0].path == "apiVersion"
