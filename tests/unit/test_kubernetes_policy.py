"""Kubernetes NetworkPolicy → Calico model, following libcalico-go's conversion (and tests)."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from policy import Policy, PolicyError, Port, dump, load
from policy.compile import arrange, policy_selectors
from policy.kubernetes import simplify_ports, translate
from policy.labels import endpoint_labels
from policy.verdict import Endpoint, Packet, Peer, verdict

ORCH = "projectcalico.org/orchestrator == 'k8s'"


def _np(spec: dict[str, Any], name: str = "test.policy", namespace: str = "default") -> Policy:
    return translate(
        {
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": {"name": name, "namespace": namespace},
            "spec": spec,
        }
    )


def test_empty_pod_selector() -> None:
    policy = _np({"podSelector": {}, "policyTypes": ["Ingress"]})
    assert policy.name == "knp.default.test.policy"
    assert (policy.kind, policy.namespace, policy.tier, policy.order) == (
        "NetworkPolicy",
        "default",
        "default",
        1000.0,
    )
    assert policy.selector == ORCH
    assert policy.ingress == () and policy.egress == ()
    assert policy.types == ("Ingress",)


def test_namespace_selector_labels_sorted_without_orchestrator() -> None:
    policy = _np(
        {
            "podSelector": {"matchLabels": {"label": "value"}},
            "ingress": [
                {
                    "from": [
                        {
                            "namespaceSelector": {
                                "matchLabels": {"namespaceRole": "dev", "namespaceFoo": "bar"}
                            }
                        }
                    ]
                }
            ],
            "policyTypes": ["Ingress"],
        }
    )
    assert policy.selector == f"{ORCH} && label == 'value'"
    (rule,) = policy.ingress
    assert rule.action == "Allow" and rule.protocol is None
    assert rule.source.selector == ORCH
    assert rule.source.namespace_selector == "namespaceFoo == 'bar' && namespaceRole == 'dev'"


def test_nil_and_empty_namespace_selectors() -> None:
    nil_ns = _np({"podSelector": {}, "ingress": [{"from": [{"podSelector": {}}]}]})
    assert nil_ns.ingress[0].source.namespace_selector is None
    assert nil_ns.ingress[0].source.selector == ORCH
    empty_ns = _np({"podSelector": {}, "ingress": [{"from": [{"namespaceSelector": {}}]}]})
    assert empty_ns.ingress[0].source.namespace_selector == "all()"


def test_pod_and_namespace_selectors_together() -> None:
    policy = _np(
        {
            "podSelector": {"matchLabels": {"label": "value"}},
            "ingress": [
                {
                    "from": [
                        {
                            "namespaceSelector": {"matchLabels": {"namespaceRole": "dev"}},
                            "podSelector": {"matchLabels": {"podC": "D", "podA": "B"}},
                        }
                    ]
                }
            ],
        }
    )
    (rule,) = policy.ingress
    assert rule.source.selector == f"{ORCH} && podA == 'B' && podC == 'D'"
    assert rule.source.namespace_selector == "namespaceRole == 'dev'"


def test_match_expressions() -> None:
    policy = _np(
        {
            "podSelector": {
                "matchExpressions": [
                    {"key": "k", "operator": "In", "values": ["v1", "v2"]},
                    {"key": "k2", "operator": "NotIn", "values": ["x"]},
                    {"key": "k3", "operator": "Exists"},
                    {"key": "k4", "operator": "DoesNotExist"},
                ]
            }
        }
    )
    assert policy.selector == (
        f"{ORCH} && k in {{ 'v1', 'v2' }} && k2 not in {{ 'x' }} && has(k3) && ! has(k4)"
    )


def test_ports_default_to_tcp_and_ranges() -> None:
    policy = _np(
        {
            "podSelector": {},
            "ingress": [{"ports": [{"port": 80}]}, {"ports": [{"port": 32000, "endPort": 32768}]}],
        }
    )
    first, second = policy.ingress
    assert first.protocol == "TCP" and first.destination.ports == (Port(80, 80),)
    assert second.destination.ports == (Port(32000, 32768),)
    assert [p.to_document() for p in second.destination.ports] == ["32000:32768"]


def test_ports_grouped_per_protocol_one_rule_per_peer() -> None:
    policy = _np(
        {
            "podSelector": {},
            "egress": [
                {
                    "to": [
                        {"podSelector": {"matchLabels": {"k": "v"}}},
                        {"podSelector": {"matchLabels": {"k2": "v2"}}},
                    ],
                    "ports": [
                        {"port": 82},
                        {"protocol": "UDP", "port": 53},
                        {"port": 80},
                        {"port": 81},
                        {"port": "http"},
                        {"protocol": "SCTP"},
                    ],
                }
            ],
            "policyTypes": ["Egress"],
        }
    )
    assert policy.types == ("Egress",)
    summary = [(r.protocol, r.destination.selector, r.destination.ports) for r in policy.egress]
    assert summary == [
        ("SCTP", f"{ORCH} && k == 'v'", ()),
        ("SCTP", f"{ORCH} && k2 == 'v2'", ()),
        ("TCP", f"{ORCH} && k == 'v'", (Port.named("http"), Port(80, 82))),
        ("TCP", f"{ORCH} && k2 == 'v2'", (Port.named("http"), Port(80, 82))),
        ("UDP", f"{ORCH} && k == 'v'", (Port(53, 53),)),
        ("UDP", f"{ORCH} && k2 == 'v2'", (Port(53, 53),)),
    ]


def test_a_port_entry_without_port_means_all_ports_of_that_protocol() -> None:
    policy = _np({"podSelector": {}, "ingress": [{"ports": [{"port": 80}, {"protocol": "TCP"}]}]})
    (rule,) = policy.ingress
    assert rule.protocol == "TCP" and rule.destination.ports == ()


def test_ip_block_with_except() -> None:
    policy = _np(
        {
            "podSelector": {},
            "egress": [
                {
                    "to": [
                        {
                            "ipBlock": {
                                "cidr": "192.168.0.0/16",
                                "except": ["192.168.3.0/24", "192.168.4.1/32"],
                            }
                        }
                    ]
                }
            ],
        }
    )
    (rule,) = policy.egress
    assert rule.destination.nets == ("192.168.0.0/16",)
    assert rule.destination.not_nets == ("192.168.3.0/24", "192.168.4.1/32")
    assert rule.destination.selector is None and rule.protocol is None


@pytest.mark.parametrize(
    ("spec", "types"),
    [
        ({"podSelector": {}}, ("Ingress",)),
        ({"podSelector": {}, "egress": []}, ("Ingress",)),
        ({"podSelector": {}, "policyTypes": [], "egress": [{}]}, ("Ingress", "Egress")),
        ({"podSelector": {}, "egress": [{}]}, ("Ingress", "Egress")),
        ({"podSelector": {}, "policyTypes": ["Egress"]}, ("Egress",)),
        ({"podSelector": {}, "policyTypes": ["Egress", "Ingress"]}, ("Ingress", "Egress")),
    ],
)
def test_policy_types_defaults(spec: dict[str, Any], types: tuple[str, ...]) -> None:
    assert _np(spec).types == types


def test_empty_egress_rule_allows_everything() -> None:
    policy = _np({"podSelector": {}, "egress": [{}]})
    (rule,) = policy.egress
    assert rule.action == "Allow" and rule.protocol is None and rule.destination.is_empty


@pytest.mark.parametrize(
    ("spec", "path", "fragment"),
    [
        ({}, "spec.podSelector", "required"),
        (
            {"podSelector": {}, "ingress": [{"ports": [{"port": "http", "endPort": 90}]}]},
            "spec.ingress[0].ports[0].endPort",
            "named port",
        ),
        (
            {"podSelector": {}, "ingress": [{"ports": [{"port": 90, "endPort": 80}]}]},
            "spec.ingress[0].ports[0].endPort",
            "at least port 90",
        ),
        (
            {"podSelector": {}, "ingress": [{"ports": [{"port": 0}]}]},
            "spec.ingress[0].ports[0].port",
            "between 1 and 65535",
        ),
        (
            {"podSelector": {}, "ingress": [{"ports": [{"protocol": "ICMP"}]}]},
            "spec.ingress[0].ports[0].protocol",
            "must be one of TCP, UDP, SCTP",
        ),
        ({"podSelector": {}, "egress": [{"to": [{}]}]}, "spec.egress[0].to[0]", "a peer needs"),
        (
            {
                "podSelector": {},
                "egress": [{"to": [{"ipBlock": {"cidr": "10.0.0.0/8"}, "podSelector": {}}]}],
            },
            "spec.egress[0].to[0]",
            "ipBlock cannot be combined",
        ),
        (
            {
                "podSelector": {},
                "egress": [
                    {"to": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": ["11.0.0.0/24"]}}]}
                ],
            },
            "spec.egress[0].to[0].ipBlock.except[0]",
            "must be inside",
        ),
        (
            {"podSelector": {}, "egress": [{"to": [{"ipBlock": {"cidr": "bogus"}}]}]},
            "spec.egress[0].to[0].ipBlock.cidr",
            "invalid CIDR",
        ),
        (
            {"podSelector": {"matchExpressions": [{"key": "k", "operator": "In"}]}},
            "spec.podSelector.matchExpressions[0].values",
            "must not be empty",
        ),
        (
            {"podSelector": {"matchExpressions": [{"key": "k", "operator": "Maybe"}]}},
            "spec.podSelector.matchExpressions[0].operator",
            "must be one of",
        ),
        (
            {"podSelector": {}, "policyTypes": ["Sideways"]},
            "spec.policyTypes[0]",
            "must be Ingress or Egress",
        ),
        ({"podSelector": {}, "egres": []}, "spec.egres", "unknown field"),
    ],
)
def test_rejections(spec: dict[str, Any], path: str, fragment: str) -> None:
    with pytest.raises(PolicyError) as caught:
        _np(spec)
    assert any(p.path == path and fragment in p.message for p in caught.value.problems), (
        caught.value.problems
    )


def test_loaded_from_yaml_alongside_calico_and_round_trips() -> None:
    text = """
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: allow-web
  namespace: prod
  uid: 1234
  resourceVersion: "99"
spec:
  podSelector: {matchLabels: {app: web}}
  egress:
  - to: [{podSelector: {matchLabels: {app: db}}}]
    ports: [{port: 5432}]
status: {}
"""
    objects = load(text, "k8s.yaml")
    (policy,) = objects
    assert isinstance(policy, Policy) and policy.key == "NetworkPolicy/prod/knp.default.allow-web"
    assert load(dump(objects)) == objects


def test_missing_namespace_is_an_error() -> None:
    text = (
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: x}\n"
        "spec: {podSelector: {}}\n"
    )
    with pytest.raises(PolicyError) as caught:
        load(text, "k.yaml")
    assert caught.value.problems[0].path == "metadata.namespace"


def test_peers_without_namespace_selector_stay_in_the_policy_namespace() -> None:
    policy = _np(
        {
            "podSelector": {"matchLabels": {"app": "web"}},
            "egress": [{"to": [{"podSelector": {"matchLabels": {"app": "db"}}}]}],
            "policyTypes": ["Egress"],
        },
        name="web",
        namespace="prod",
    )
    compiled = policy_selectors(policy)
    assert compiled.egress[0].destination.selector is not None
    assert compiled.egress[0].destination.selector.required_values(
        "projectcalico.org/namespace"
    ) == frozenset({"prod"})
    tiers = arrange([], [policy])
    web = Endpoint("workload", endpoint_labels({"app": "web"}, namespace="prod"))
    db_here = Peer("10.0.0.5", (endpoint_labels({"app": "db"}, namespace="prod"),))
    db_there = Peer("10.0.0.6", (endpoint_labels({"app": "db"}, namespace="dev"),))
    assert verdict(web, tiers, Packet("TCP", db_here, port=5432)).allowed
    assert not verdict(web, tiers, Packet("TCP", db_there, port=5432)).allowed


def test_simplify_ports_like_calico() -> None:
    assert simplify_ports([Port(80, 80)]) == [Port(80, 80)]
    assert simplify_ports([Port(90, 90), Port.named("x")]) == [Port(90, 90), Port.named("x")]
    assert simplify_ports(
        [Port(82, 82), Port(80, 80), Port(81, 81), Port(9090, 9090), Port.named("foo")]
    ) == [Port.named("foo"), Port(80, 82), Port(9090, 9090)]
    assert simplify_ports([Port(10, 20), Port(15, 30), Port(31, 31)]) == [Port(10, 31)]


def test_api_server_nulls_are_absent_fields() -> None:
    """Objects read from the API server spell unset fields as null."""
    policy = _np(
        {
            "podSelector": {"matchLabels": None, "matchExpressions": None},
            "ingress": None,
            "egress": [
                {
                    "to": [
                        {
                            "ipBlock": None,
                            "namespaceSelector": None,
                            "podSelector": {"matchLabels": {"app": "db"}},
                        }
                    ],
                    "ports": [{"protocol": None, "port": 5432, "endPort": None}],
                }
            ],
            "policyTypes": ["Egress"],
        }
    )
    (rule,) = policy.egress
    assert rule.protocol == "TCP" and rule.destination.ports == (Port(5432, 5432),)
    assert rule.destination.selector == f"{ORCH} && app == 'db'"
    assert rule.destination.namespace_selector is None and rule.destination.nets == ()


def test_odd_port_strings_are_problems_not_crashes() -> None:
    for port in ("²", "٨٠", "80:90"):
        with pytest.raises(PolicyError):
            _np({"podSelector": {}, "ingress": [{"ports": [{"port": port}]}]})


_K8S_FIELDS = [
    "podSelector",
    "ingress",
    "egress",
    "policyTypes",
    "from",
    "to",
    "ports",
    "ipBlock",
    "cidr",
    "except",
    "port",
    "endPort",
    "protocol",
    "namespaceSelector",
    "matchLabels",
    "matchExpressions",
    "key",
    "operator",
    "values",
    "app",
]
_K8S_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-2, 70000),
    st.sampled_from(
        [
            "",
            "TCP",
            "UDP",
            "In",
            "NotIn",
            "Exists",
            "Egress",
            "Ingress",
            "10.0.0.0/8",
            "10.1.0.0/16",
            "http",
            "80",
            "a",
            "²",
        ]
    ),
    st.text(max_size=4),
)
_K8S_VALUES = st.recursive(
    _K8S_SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(st.sampled_from(_K8S_FIELDS), inner, max_size=4),
    ),
    max_leaves=30,
)


@settings(max_examples=300, deadline=None)
@given(spec=_K8S_VALUES)
def test_translation_raises_only_policy_error(spec: object) -> None:
    try:
        policy = _np(spec)  # type: ignore[arg-type]
    except PolicyError:
        return
    assert policy.name.startswith("knp.default.")
    assert load(dump([policy])) == [policy]
