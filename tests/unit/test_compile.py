"""policy.compile: effective selectors exactly as Calico's update processors write them,
and Felix's ordering of tiers and policies."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from policy import EntityRule, Policy, Rule, ServiceAccountMatch, Tier, load
from policy.compile import (
    all_selectors,
    applies_to,
    arrange,
    entity_selector,
    policy_selectors,
    sort_policies,
    sort_tiers,
)
from policy.labels import endpoint_labels
from policy.model import DEFAULT_TIER
from policy.selectors import parse


def _same(selector: object, calico_text: str) -> None:
    """Equal to what Felix parses from Calico's text: same canonical form, same uid."""
    expected = parse(calico_text)
    assert selector == expected, f"{selector} != {expected}"
    assert getattr(selector, "uid", None) == expected.uid


def _np(namespace: str | None = "prod", **fields: object) -> Policy:
    kind = "NetworkPolicy" if namespace is not None else "GlobalNetworkPolicy"
    return Policy(kind=kind, name="p", namespace=namespace, **fields)  # type: ignore[arg-type]


# -- applies-to --------------------------------------------------------------------------------


def test_namespaced_applies_to() -> None:
    _same(
        applies_to(_np(selector="app == 'web'")),
        "(app == 'web') && projectcalico.org/namespace == 'prod'",
    )
    _same(applies_to(_np(selector="")), "projectcalico.org/namespace == 'prod'")
    _same(
        applies_to(_np(selector="app == 'web'", service_account_selector="role == 'x'")),
        "((app == 'web') && projectcalico.org/namespace == 'prod') && pcsa.role == \"x\"",
    )


def test_global_applies_to() -> None:
    _same(applies_to(_np(None, selector="role == 'db'")), "role == 'db'")
    _same(applies_to(_np(None, selector="")), "all()")
    _same(
        applies_to(_np(None, selector="role == 'db'", namespace_selector="team == 'a'")),
        "(role == 'db') && pcns.team == \"a\"",
    )
    _same(
        applies_to(_np(None, selector="", namespace_selector="all()")),
        "has(projectcalico.org/namespace)",
    )
    _same(
        applies_to(_np(None, selector="", service_account_selector="all()")),
        "has(projectcalico.org/serviceaccount)",
    )
    _same(
        applies_to(
            _np(
                None,
                selector="a == 'b'",
                namespace_selector="c == 'd'",
                service_account_selector="e == 'f'",
            )
        ),
        '((a == \'b\') && pcns.c == "d") && pcsa.e == "f"',
    )


# -- rule peers (cases from libcalico-go rules_test.go) ----------------------------------------


def test_rule_selector_scoped_to_the_policy_namespace() -> None:
    _same(
        entity_selector(EntityRule(selector="has(foo)"), "namespace2"),
        "(projectcalico.org/namespace == 'namespace2') && (has(foo))",
    )
    _same(entity_selector(EntityRule(selector="has(foo)"), None), "has(foo)")


def test_not_selector_alone_scopes_the_positive_selector_only() -> None:
    entity = EntityRule(not_selector="has(label2)")
    _same(entity_selector(entity, "namespace2"), "projectcalico.org/namespace == 'namespace2'")
    compiled = policy_selectors(_np(egress=(Rule("Allow", destination=entity),), types=("Egress",)))
    assert compiled.egress[0].destination.not_selector == parse("has(label2)")


def test_no_selector_fields_means_no_selector() -> None:
    assert entity_selector(EntityRule(nets=("10.0.0.0/8",)), "ns") is None
    assert entity_selector(EntityRule(), None) is None


def test_namespace_selector_is_prefixed() -> None:
    _same(
        entity_selector(EntityRule(namespace_selector="namespacelabel1 == 'value1'"), None),
        'pcns.namespacelabel1 == "value1"',
    )
    _same(
        entity_selector(
            EntityRule(
                selector="projectcalico.org/orchestrator == 'k8s'",
                namespace_selector="key == 'value'",
            ),
            "namespace",
        ),
        "(pcns.key == \"value\") && (projectcalico.org/orchestrator == 'k8s')",
    )
    _same(
        entity_selector(
            EntityRule(namespace_selector="!has(key) || (has(key) && !key in {'value'})"),
            "namespace",
        ),
        '(!has(pcns.key) || (has(pcns.key) && !pcns.key in {"value"}))',
    )


def test_all_and_global_namespace_selectors() -> None:
    _same(
        entity_selector(EntityRule(namespace_selector="all()"), "ns"),
        "has(projectcalico.org/namespace)",
    )
    _same(
        entity_selector(EntityRule(namespace_selector="global()", selector="a == 'b'"), "ns"),
        "(!has(projectcalico.org/namespace)) && (a == 'b')",
    )


def test_service_accounts() -> None:
    source = EntityRule(service_accounts=ServiceAccountMatch(("sa1", "sa2"), "key == 'value1'"))
    _same(
        entity_selector(source, "namespace"),
        "(projectcalico.org/namespace == 'namespace') && ((pcsa.key == \"value1\") && "
        '(projectcalico.org/serviceaccount in {"sa1", "sa2"}))',
    )
    destination = EntityRule(
        namespace_selector="nskey == 'nsvalue'",
        service_accounts=ServiceAccountMatch(("sa3",), "key == 'value2'"),
    )
    _same(
        entity_selector(destination, "namespace"),
        '(pcns.nskey == "nsvalue") && ((pcsa.key == "value2") && '
        '(projectcalico.org/serviceaccount in {"sa3"}))',
    )
    names_only = EntityRule(service_accounts=ServiceAccountMatch(("b", "a")), selector="x == 'y'")
    _same(
        entity_selector(names_only, None),
        "(projectcalico.org/serviceaccount in {'a', 'b'}) && (x == 'y')",
    )


def test_all_selectors_follows_types_and_directions() -> None:
    policy = _np(
        selector="app == 'web'",
        types=("Egress",),
        ingress=(Rule("Allow", source=EntityRule(selector="in == 'x'")),),
        egress=(
            Rule("Allow", destination=EntityRule(selector="db == 'y'", not_selector="bad == 'z'")),
            Rule("Deny", destination=EntityRule(nets=("10.0.0.0/8",))),
        ),
    )
    selectors = all_selectors(policy)
    assert {s.canonical for s in selectors} == {
        parse("(app == 'web') && projectcalico.org/namespace == 'prod'").canonical,
        parse("(projectcalico.org/namespace == 'prod') && (db == 'y')").canonical,
        parse("bad == 'z'").canonical,
    }
    both = _np(
        selector="", types=("Ingress", "Egress"), ingress=policy.ingress, egress=policy.egress
    )
    assert len(all_selectors(both)) == 4
    assert len(all_selectors(both, directions=("Egress",))) == 3


# -- semantics against an oracle ---------------------------------------------------------------

_KEYS = ["app", "team", "tier"]
_VALUES = ["a", "b"]
_SELECTORS = [
    "",
    "all()",
    "app == 'a'",
    "app != 'a'",
    "has(team)",
    "!has(tier)",
    "team in {'a', 'b'}",
    "app == 'a' || team == 'b'",
    "app == 'a' && !has(team)",
]
_labels = st.dictionaries(st.sampled_from(_KEYS), st.sampled_from(_VALUES), max_size=3)


@settings(max_examples=150, deadline=None)
@given(
    own=_labels,
    ns_labels=_labels,
    endpoint_ns=st.sampled_from(["prod", "dev"]),
    selector=st.sampled_from(_SELECTORS),
    ns_selector=st.sampled_from([*_SELECTORS, None]),
)
def test_rule_peer_selector_matches_like_the_oracle(
    own: dict[str, str],
    ns_labels: dict[str, str],
    endpoint_ns: str,
    selector: str,
    ns_selector: str | None,
) -> None:
    """A namespaced policy's peer matches iff the namespace matches (namespaceSelector over
    the namespace's labels, or the policy's own namespace) and the selector matches the pod."""
    labels = endpoint_labels(own, namespace=endpoint_ns, namespace_labels=ns_labels)
    entity = EntityRule(selector=selector or None, namespace_selector=ns_selector)
    compiled = entity_selector(entity, "prod")
    if ns_selector:
        ns_view = {**ns_labels, "projectcalico.org/name": endpoint_ns}
        ns_ok = parse(ns_selector).matches(ns_view)
    else:
        ns_ok = endpoint_ns == "prod"
    pod_ok = parse(selector).matches(labels)
    if compiled is None:
        assert not selector and not ns_selector
    else:
        assert compiled.matches(labels) == (ns_ok and pod_ok)


@settings(max_examples=100, deadline=None)
@given(
    own=_labels, endpoint_ns=st.sampled_from(["prod", "dev"]), selector=st.sampled_from(_SELECTORS)
)
def test_applies_to_matches_like_the_oracle(
    own: dict[str, str], endpoint_ns: str, selector: str
) -> None:
    labels = endpoint_labels(own, namespace=endpoint_ns)
    expected = endpoint_ns == "prod" and parse(selector).matches(labels)
    assert applies_to(_np(selector=selector)).matches(labels) == expected


# -- ordering ----------------------------------------------------------------------------------


def test_sort_tiers_order_then_name_none_last() -> None:
    tiers = [Tier("z", None), Tier("b", 10.0), Tier("a", 10.0), Tier("c", 1.0), Tier("y", None)]
    assert [t.name for t in sort_tiers(tiers)] == ["c", "a", "b", "y", "z"]


def test_sort_policies_order_then_felix_tie_break() -> None:
    policies = [
        Policy("GlobalNetworkPolicy", "zeta", order=None),
        Policy("NetworkPolicy", "b", "ns1", order=5.0),
        Policy("GlobalNetworkPolicy", "b", order=5.0),
        Policy("NetworkPolicy", "b", "ns0", order=5.0),
        Policy("NetworkPolicy", "a", "ns2", order=5.0),
        Policy("GlobalNetworkPolicy", "alpha", order=None),
        Policy("GlobalNetworkPolicy", "first", order=-1.5),
    ]
    # Ties compare "name/namespace/kind": "a/ns2/…" < "b//Global…" < "b/ns0/…" < "b/ns1/…".
    assert [(p.namespace, p.name) for p in sort_policies(policies)] == [
        (None, "first"),
        ("ns2", "a"),
        (None, "b"),
        ("ns0", "b"),
        ("ns1", "b"),
        (None, "alpha"),
        (None, "zeta"),
    ]


def test_arrange_groups_by_tier_with_default_and_undefined_tiers() -> None:
    policies = [
        Policy("GlobalNetworkPolicy", "d1"),
        Policy("GlobalNetworkPolicy", "s1", tier="security", order=2.0),
        Policy("GlobalNetworkPolicy", "s0", tier="security", order=1.0),
        Policy("GlobalNetworkPolicy", "ghost1", tier="ghost"),
    ]
    arranged = arrange([Tier("security", 100.0, "Pass"), Tier("unused", 1.0)], policies)
    assert [(tp.tier.name, tp.defined) for tp in arranged] == [
        ("security", True),
        ("default", True),
        ("ghost", False),
    ]
    assert [p.name for p in arranged[0].policies] == ["s0", "s1"]
    assert arranged[1].tier == DEFAULT_TIER
    assert arranged[2].tier.default_action == "Deny"


def test_compile_examples_from_yaml() -> None:
    (policy,) = load(
        """
apiVersion: projectcalico.org/v3
kind: NetworkPolicy
metadata: {name: web, namespace: shop}
spec:
  selector: app == "web"
  egress:
  - action: Allow
    protocol: TCP
    destination:
      namespaceSelector: global()
      selector: role == "saas"
      ports: [443]
"""
    )
    compiled = policy_selectors(policy)  # type: ignore[arg-type]
    assert compiled.applies_to.required_values("projectcalico.org/namespace") == {"shop"}
    destination = compiled.egress[0].destination.selector
    assert destination is not None
    assert destination.matches({"role": "saas"})
    assert not destination.matches({"role": "saas", "projectcalico.org/namespace": "shop"})
