"""What the dataplane does not enforce (yet) of a policy object as written, in words.

Pure. ``portcullis apply`` prints these notes and the enforcer logs them, so an operator
who brings Calico YAML learns, per object, which parts have no effect or are enforced
more strictly than written. Nothing here ever makes the dataplane allow more than policy
says: a part that cannot be programmed is enforced fail-closed (see
``enforcers.state.compile_rule``), or, for ingress, not enforced at all, which Portcullis,
an egress product, says plainly.
"""

from __future__ import annotations

from policy.model import EntityRule, HostEndpoint, Policy, PolicyObject, Rule


def side_gaps(entity: EntityRule) -> list[str]:
    """The parts of one side of a rule that the dataplane cannot program yet."""
    gaps = []
    if entity.services is not None:
        gaps.append("services")
    if any(p.name is not None for p in (*entity.ports, *entity.not_ports)):
        gaps.append("named ports")
    return gaps


def rule_gaps(rule: Rule) -> list[str]:
    """The parts of a rule that the dataplane cannot program yet (each named once)."""
    gaps = side_gaps(rule.source) + side_gaps(rule.destination)
    if rule.not_icmp is not None:
        gaps.append("notICMP")
    return list(dict.fromkeys(gaps))


def notes(obj: PolicyObject) -> list[str]:
    """One line per part of `obj` that is not enforced as written (empty: all of it is)."""
    if isinstance(obj, Policy):
        return _policy_notes(obj)
    if isinstance(obj, HostEndpoint) and not obj.interface_name:
        return ["no interfaceName: the enforcer finds the interface that has one of the "
                "expectedIPs on its node, and enforces nothing while none has"]
    return []


def _policy_notes(policy: Policy) -> list[str]:
    out = []
    if "Ingress" in policy.types:
        what = (f"its {len(policy.ingress)} ingress rule(s) have" if policy.ingress
                else "its default deny of ingress has")
        out.append(f"ingress is not enforced (Portcullis enforces egress only): {what} "
                   "no effect")
    for index, rule in enumerate(policy.egress if "Egress" in policy.types else ()):
        gaps = rule_gaps(rule)
        if gaps:
            how = ("matches less, or nothing" if rule.action in ("Allow", "Log")
                   else "denies at least what it says")
            out.append(f"egress rule {index}: {', '.join(gaps)} not enforced yet: this "
                       f"{rule.action} rule {how} (fail closed)")
    return out
