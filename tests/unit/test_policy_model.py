"""policy.model and policy.labels: immutable values, Calico documents, Calico's label sets."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from policy import (
    DEFAULT_TIER,
    EntityRule,
    HostEndpoint,
    NetworkSet,
    Policy,
    Port,
    Rule,
    Tier,
    dump,
    load,
)
from policy.labels import (
    endpoint_labels,
    host_endpoint_labels,
    namespace_profile_labels,
    network_set_labels,
    service_account_profile_labels,
)
from policy.model import labels_from


def test_objects_are_frozen_and_hashable() -> None:
    policy = Policy("NetworkPolicy", "p", "ns", egress=(Rule("Allow"),), types=("Egress",))
    with pytest.raises(dataclasses.FrozenInstanceError):
        policy.name = "q"  # type: ignore[misc]
    assert {policy: 1}[
        Policy("NetworkPolicy", "p", "ns", egress=(Rule("Allow"),), types=("Egress",))
    ] == 1
    assert not hasattr(policy, "__dict__")  # slots


def test_keys() -> None:
    assert Policy("NetworkPolicy", "p", "ns").key == "NetworkPolicy/ns/p"
    assert Policy("GlobalNetworkPolicy", "g").key == "GlobalNetworkPolicy//g"
    assert NetworkSet("GlobalNetworkSet", "s").key == "GlobalNetworkSet//s"
    assert HostEndpoint("h", "node1").key == "HostEndpoint//h"
    assert Tier("t").key == "Tier//t"


def test_rules_respect_types() -> None:
    policy = Policy(
        "GlobalNetworkPolicy",
        "g",
        types=("Egress",),
        ingress=(Rule("Deny"),),
        egress=(Rule("Allow"),),
    )
    assert policy.rules("Egress") == (Rule("Allow"),)
    assert policy.rules("Ingress") == ()


def test_ports() -> None:
    assert Port.single(80).to_document() == 80
    assert Port.range(80, 90).to_document() == "80:90"
    assert Port.named("http").to_document() == "http"
    assert Port.range(80, 90).contains(85) and not Port.range(80, 90).contains(91)
    assert not Port.named("http").contains(0)


def test_to_document_shape() -> None:
    policy = Policy(
        "NetworkPolicy",
        "p",
        "ns",
        order=10.0,
        selector="app == 'a'",
        types=("Egress",),
        egress=(
            Rule(
                "Allow",
                protocol="TCP",
                destination=EntityRule(nets=("10.0.0.0/8",), ports=(Port.single(443),)),
            ),
        ),
    )
    assert policy.to_document() == {
        "apiVersion": "projectcalico.org/v3",
        "kind": "NetworkPolicy",
        "metadata": {"name": "p", "namespace": "ns"},
        "spec": {
            "tier": "default",
            "order": 10,
            "selector": "app == 'a'",
            "types": ["Egress"],
            "egress": [
                {
                    "action": "Allow",
                    "protocol": "TCP",
                    "destination": {"nets": ["10.0.0.0/8"], "ports": [443]},
                }
            ],
        },
    }
    assert Tier("t", 1.5, "Pass").to_document()["spec"] == {"order": 1.5, "defaultAction": "Pass"}
    assert DEFAULT_TIER.order == 1_000_000.0 and DEFAULT_TIER.default_action == "Deny"


def test_labels_from_is_order_independent() -> None:
    assert labels_from({"b": "2", "a": "1"}) == labels_from({"a": "1", "b": "2"})
    assert labels_from(None) == ()


_name = st.from_regex(r"[a-z][a-z0-9]{0,6}", fullmatch=True)
_label_values = st.from_regex(r"[a-z0-9]{0,5}", fullmatch=True)
_rules = st.lists(
    st.builds(
        lambda action, port, net: Rule(
            action,
            protocol="TCP" if port else None,
            destination=EntityRule(
                ports=(Port.single(port),) if port else (), nets=(net,) if net else ()
            ),
        ),
        st.sampled_from(["Allow", "Deny", "Pass", "Log"]),
        st.sampled_from([None, 1, 443, 65535]),
        st.sampled_from([None, "10.0.0.0/8", "2001:db8::/32", "192.0.2.7/32"]),
    ),
    max_size=3,
)


@settings(max_examples=60, deadline=None)
@given(
    name=_name,
    namespace=st.one_of(st.none(), _name),
    order=st.one_of(st.none(), st.integers(-5, 5).map(float), st.just(2.5)),
    labels=st.dictionaries(_name, _label_values, max_size=2),
    ingress=_rules,
    egress=_rules,
)
def test_round_trip_property(
    name: str,
    namespace: str | None,
    order: float | None,
    labels: dict[str, str],
    ingress: list[Rule],
    egress: list[Rule],
) -> None:
    kind = "NetworkPolicy" if namespace else "GlobalNetworkPolicy"
    types = ("Ingress", "Egress") if egress else ("Ingress",)
    policy = Policy(
        kind,
        name,
        namespace,
        order=order,
        types=types,  # type: ignore[arg-type]
        ingress=tuple(ingress),
        egress=tuple(egress),
        labels=labels_from(labels),
    )
    netset = NetworkSet("GlobalNetworkSet", name, labels=labels_from(labels), nets=("10.0.0.0/8",))
    assert load(dump([policy, netset])) == [policy, netset]


# -- labels ------------------------------------------------------------------------------------


def test_pod_labels_as_calico_builds_them() -> None:
    labels = endpoint_labels(
        {"app": "web", "pcns.team": "forged", "pcsa.role": "forged", "env": "own"},
        namespace="prod",
        service_account="api",
        namespace_labels={"team": "a", "env": "ns"},
        service_account_labels={"role": "reader"},
    )
    assert labels == {
        "app": "web",
        "env": "own",
        "projectcalico.org/namespace": "prod",
        "projectcalico.org/orchestrator": "k8s",
        "projectcalico.org/serviceaccount": "api",
        "pcns.team": "a",
        "pcns.env": "ns",
        "pcns.projectcalico.org/name": "prod",
        "pcsa.role": "reader",
        "pcsa.projectcalico.org/name": "api",
    }


def test_calico_labels_override_what_a_pod_sets() -> None:
    labels = endpoint_labels({"projectcalico.org/namespace": "kube-system"}, namespace="prod")
    assert labels["projectcalico.org/namespace"] == "prod"


def test_long_service_account_name_gets_no_label() -> None:
    long_name = "s" * 63
    labels = endpoint_labels(
        {}, namespace="prod", service_account=long_name, service_account_labels={}
    )
    assert "projectcalico.org/serviceaccount" not in labels
    assert labels["pcsa.projectcalico.org/name"] == long_name


def test_unknown_namespace_labels_inherit_nothing() -> None:
    assert endpoint_labels({"a": "b"}, namespace="prod") == {
        "a": "b",
        "projectcalico.org/namespace": "prod",
        "projectcalico.org/orchestrator": "k8s",
    }


def test_global_and_network_set_labels() -> None:
    assert host_endpoint_labels({"role": "node", "pcns.x": "y"}) == {"role": "node"}
    assert network_set_labels({"role": "saas"}, None) == {"role": "saas"}
    assert network_set_labels({"role": "db"}, "prod", {"team": "a"}) == {
        "role": "db",
        "projectcalico.org/namespace": "prod",
        "pcns.team": "a",
        "pcns.projectcalico.org/name": "prod",
    }


def test_profile_labels() -> None:
    assert namespace_profile_labels("ns", {"a": "b"}) == {
        "pcns.a": "b",
        "pcns.projectcalico.org/name": "ns",
    }
    assert service_account_profile_labels("sa", {}) == {"pcsa.projectcalico.org/name": "sa"}
