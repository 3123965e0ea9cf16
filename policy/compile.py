"""Effective selectors and evaluation order: what streams, enforcers and verdicts share.

Calico never evaluates the selectors a user wrote as they stand: libcalico-go's update
processors rewrite them before Felix sees them. This module does the same rewriting, text
for text, so our selector uids equal Felix's:

- applies-to (``networkpolicyprocessor.go``): a namespaced policy's selector becomes
  ``(<selector>) && projectcalico.org/namespace == '<ns>'`` (just the namespace term when
  the selector is empty); a global policy's ``namespaceSelector`` is ``pcns.``-prefixed and
  ANDed on, with ``all()`` meaning "has a namespace"; a ``serviceAccountSelector`` is
  ``pcsa.``-prefixed and ANDed on (in a global policy, ``all()`` then means "has a service
  account").
- rule peers (``rules.go``, ``GetEntityRuleSelector``): ``namespaceSelector`` is
  ``pcns.``-prefixed with ``all()`` → ``has(projectcalico.org/namespace)`` and
  ``global()`` → ``!has(projectcalico.org/namespace)``; without one, a namespaced policy's
  peers are limited to its own namespace. ``serviceAccounts`` names become
  ``projectcalico.org/serviceaccount in {…}`` and its selector is ``pcsa.``-prefixed. The
  namespace term is added as soon as any of selector, notSelector or namespaceSelector is
  used. ``notSelector`` itself is used as written (Calico does not scope it).
- order (``felix/calc/policy_sorter.go``): tiers by order (none last), then name; tiers
  that have policies but no Tier object after every defined tier (current Felix still
  applies them, with the zero default action, which drops). Policies by order (none =
  +inf), then by ``"<name>/<namespace>/<kind>"`` as current Felix breaks ties.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from policy.labels import NAMESPACE_LABEL, NAMESPACE_PREFIX, SERVICE_ACCOUNT_LABEL
from policy.labels import SERVICE_ACCOUNT_PREFIX as SA_PREFIX
from policy.model import DEFAULT_TIER, EntityRule, Policy, PolicyType, Rule, Tier
from policy.selectors import (
    AllNode,
    And,
    GlobalNode,
    Has,
    Node,
    Not,
    Or,
    Selector,
    from_node,
    parse,
)


@dataclass(frozen=True, slots=True)
class CompiledEntity:
    """A rule side's effective selectors (None: the side does not match on selectors)."""

    selector: Selector | None
    not_selector: Selector | None


@dataclass(frozen=True, slots=True)
class CompiledRule:
    """One rule with its effective peer selectors; ``index`` counts from 0 in its direction."""

    direction: PolicyType
    index: int
    rule: Rule
    source: CompiledEntity
    destination: CompiledEntity


@dataclass(frozen=True, slots=True)
class CompiledPolicy:
    """A policy with every selector in the form Felix evaluates."""

    policy: Policy
    applies_to: Selector
    ingress: tuple[CompiledRule, ...]
    egress: tuple[CompiledRule, ...]

    def rules(self, direction: PolicyType) -> tuple[CompiledRule, ...]:
        """The direction's rules, empty when the policy's types exclude it."""
        if direction not in self.policy.types:
            return ()
        return self.ingress if direction == "Ingress" else self.egress

    def applies_in(self, direction: PolicyType) -> bool:
        return direction in self.policy.types


# -- selector rewriting -----------------------------------------------------------------------


def prefixed(selector: Selector, prefix: str) -> Selector:
    """Every label key prefixed (Calico's ``PrefixVisitor``): ``a == 'b'`` → ``pcns.a == 'b'``."""
    return from_node(_prefix_node(selector.root, prefix))


def _prefix_node(node: Node, prefix: str) -> Node:
    if isinstance(node, Not):
        return Not(_prefix_node(node.operand, prefix))
    if isinstance(node, And):
        return And(tuple(_prefix_node(n, prefix) for n in node.operands))
    if isinstance(node, Or):
        return Or(tuple(_prefix_node(n, prefix) for n in node.operands))
    if isinstance(node, AllNode | GlobalNode):
        return node
    return dataclasses.replace(node, key=prefix + node.key)


def _replace_functions(node: Node, all_: Node | None, global_: Node | None) -> Node:
    """Calico's textual ``all()``/``global()`` replacement, done on the tree."""
    if isinstance(node, AllNode) and all_ is not None:
        return all_
    if isinstance(node, GlobalNode) and global_ is not None:
        return global_
    if isinstance(node, Not):
        return Not(_replace_functions(node.operand, all_, global_))
    if isinstance(node, And):
        return And(tuple(_replace_functions(n, all_, global_) for n in node.operands))
    if isinstance(node, Or):
        return Or(tuple(_replace_functions(n, all_, global_) for n in node.operands))
    return node


def _text(selector: Selector) -> str:
    return selector.canonical


def _quote(value: str) -> str:
    return f"'{value}'" if "'" not in value else f'"{value}"'


def _namespace_term(namespace: str) -> str:
    return f"{NAMESPACE_LABEL} == {_quote(namespace)}"


def _prefix_and_append(current: str, new: str, prefix: str) -> str:
    """Calico's ``prefixAndAppendSelector``."""
    if not new:
        return current
    extra = _text(prefixed(parse(new), prefix))
    return f"({current}) && {extra}" if current else extra


def applies_to(policy: Policy) -> Selector:
    """The selector of endpoints a policy applies to, as Felix evaluates it."""
    text = policy.selector
    if policy.namespace is not None:
        term = _namespace_term(policy.namespace)
        text = f"({text}) && {term}" if text else term
        text = _prefix_and_append(text, policy.service_account_selector, SA_PREFIX)
        return parse(text)
    if policy.namespace_selector:
        text = _prefix_and_append(text, policy.namespace_selector, NAMESPACE_PREFIX)
        text = _text(_replaced(parse(text), Has(NAMESPACE_LABEL), None))
    if policy.service_account_selector:
        text = _prefix_and_append(text, policy.service_account_selector, SA_PREFIX)
        text = _text(_replaced(parse(text), Has(SERVICE_ACCOUNT_LABEL), None))
    return parse(text)


def _replaced(selector: Selector, all_: Node | None, global_: Node | None) -> Selector:
    return from_node(_replace_functions(selector.root, all_, global_))


def _service_account_text(entity: EntityRule) -> str:
    """Calico's ``parseServiceAccounts``."""
    match = entity.service_accounts
    if match is None:
        return ""
    updated = _text(prefixed(parse(match.selector), SA_PREFIX)) if match.selector else ""
    if not match.names:
        return updated
    names = "', '".join(match.names)
    text = _text(parse(f"{SERVICE_ACCOUNT_LABEL} in {{ '{names}' }}"))
    return f"({updated}) && ({text})" if updated else text


def entity_selector(entity: EntityRule, namespace: str | None) -> Selector | None:
    """Calico's ``GetEntityRuleSelector``: the positive selector for one rule side."""
    ns_text = ""
    if entity.namespace_selector:
        ns_sel = prefixed(parse(entity.namespace_selector), NAMESPACE_PREFIX)
        ns_sel = _replaced(ns_sel, Has(NAMESPACE_LABEL), Not(Has(NAMESPACE_LABEL)))
        ns_text = _text(ns_sel)
    elif namespace is not None:
        ns_text = _namespace_term(namespace)
    parts = [p for p in (_service_account_text(entity), entity.selector or "") if p]
    if len(parts) == 1:
        selector = parts[0]
    elif parts:
        selector = "(" + ") && (".join(parts) + ")"
    else:
        selector = ""
    if ns_text and (selector or entity.not_selector or entity.namespace_selector):
        selector = f"({ns_text}) && ({selector})" if selector else ns_text
    return parse(selector) if selector else None


def compile_entity(entity: EntityRule, namespace: str | None) -> CompiledEntity:
    return CompiledEntity(
        selector=entity_selector(entity, namespace),
        not_selector=parse(entity.not_selector) if entity.not_selector else None,
    )


def compile_rule(
    rule: Rule, direction: PolicyType, index: int, namespace: str | None
) -> CompiledRule:
    return CompiledRule(
        direction=direction,
        index=index,
        rule=rule,
        source=compile_entity(rule.source, namespace),
        destination=compile_entity(rule.destination, namespace),
    )


def policy_selectors(policy: Policy) -> CompiledPolicy:
    """Every effective selector of a policy (all rules, whatever the policy's types)."""
    return CompiledPolicy(
        policy=policy,
        applies_to=applies_to(policy),
        ingress=tuple(
            compile_rule(r, "Ingress", i, policy.namespace) for i, r in enumerate(policy.ingress)
        ),
        egress=tuple(
            compile_rule(r, "Egress", i, policy.namespace) for i, r in enumerate(policy.egress)
        ),
    )


def all_selectors(
    policy: Policy | CompiledPolicy, directions: Iterable[PolicyType] | None = None
) -> set[Selector]:
    """Every selector whose membership is needed to enforce a policy.

    The applies-to selector and each rule's selector and not-selector, for the directions
    the policy's types include (narrowed further by ``directions`` when given: Portcullis
    enforces egress only, so ``directions=("Egress",)`` skips ingress peers).
    """
    compiled = policy if isinstance(policy, CompiledPolicy) else policy_selectors(policy)
    wanted = set(directions) if directions is not None else {"Ingress", "Egress"}
    selectors: set[Selector] = {compiled.applies_to}
    for direction in ("Ingress", "Egress"):
        if direction not in wanted:
            continue
        for rule in compiled.rules(direction):
            for side in (rule.source, rule.destination):
                if side.selector is not None:
                    selectors.add(side.selector)
                if side.not_selector is not None:
                    selectors.add(side.not_selector)
    return selectors


# -- ordering ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TierPolicies:
    """A tier and its policies in evaluation order; ``defined`` is False for a tier that
    policies name but no Tier object defines (sorted last, default action Deny)."""

    tier: Tier
    policies: tuple[Policy, ...]
    defined: bool = True


def policy_sort_name(policy: Policy) -> str:
    """The tie-break between policies of equal order: current Felix compares
    ``"<name>/<namespace>/<kind>"`` (``PolKVLess``), most specific part first."""
    return f"{policy.name}/{policy.namespace or ''}/{policy.kind}"


def _policy_key(policy: Policy) -> tuple[float, str]:
    return (math.inf if policy.order is None else policy.order, policy_sort_name(policy))


def sort_policies(policies: Iterable[Policy]) -> list[Policy]:
    """Policies in evaluation order: by order (none = +inf), then Felix's key name."""
    return sorted(policies, key=_policy_key)


def _tier_key(tier: Tier, defined: bool = True) -> tuple[bool, bool, float, str]:
    return (not defined, tier.order is None, tier.order or 0.0, tier.name)


def sort_tiers(tiers: Iterable[Tier]) -> list[Tier]:
    """Tiers in evaluation order: by order (none last), then name."""
    return sorted(tiers, key=_tier_key)


def arrange(tiers: Iterable[Tier], policies: Iterable[Policy]) -> list[TierPolicies]:
    """Tiers that hold at least one of ``policies``, in order, each with its policies sorted.

    The ``default`` tier exists even when not given (Calico creates it).
    """
    known = {DEFAULT_TIER.name: DEFAULT_TIER}
    known.update({t.name: t for t in tiers})
    grouped: dict[str, list[Policy]] = {}
    for policy in policies:
        grouped.setdefault(policy.tier, []).append(policy)
    arranged = [
        TierPolicies(
            tier=known.get(name, Tier(name=name)),
            policies=tuple(sort_policies(members)),
            defined=name in known,
        )
        for name, members in grouped.items()
    ]
    arranged.sort(key=lambda tp: _tier_key(tp.tier, tp.defined))
    return arranged


def applicable(
    compiled: Sequence[CompiledPolicy], labels: dict[str, str] | None = None
) -> list[CompiledPolicy]:
    """The compiled policies whose applies-to selector matches an endpoint's labels."""
    if labels is None:
        return list(compiled)
    return [c for c in compiled if c.applies_to.matches(labels)]
