"""Memberships recomputed from scratch: the reference the incremental processor must equal.

No index, no partitions, no reference counts: every selector of every valid policy is
evaluated against every endpoint's full label set. Slow and obviously right, which is
what tests and the benchmark baseline need.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from policy.compile import all_selectors
from policy.load import PolicyError, load_document
from policy.model import Policy
from policy.selectors import Selector
from streams.membership import effective_labels
from topics.records import (
    EndpointRecord,
    MembershipRecord,
    PolicyRecord,
    ProfileRecord,
    RecordError,
    membership_key,
)

__all__ = ["Payload", "compacted_payloads", "oracle_memberships", "payload", "policy_selectors"]

#: What an enforcer uses from a membership: (namespace, node, interface, ips).
Payload = tuple[str | None, str | None, str | None, tuple[str, ...]]


def payload(record: MembershipRecord) -> Payload:
    """A membership without its `observed_at` (which only measures latency)."""
    return (record.namespace, record.node, record.interface, record.ips)


def policy_selectors(policies: Iterable[PolicyRecord]) -> set[Selector]:
    """Every effective selector of the valid policies (invalid ones are skipped)."""
    selectors: set[Selector] = set()
    for record in policies:
        try:
            obj = load_document(record.document, source=record.key)
        except (PolicyError, RecordError):
            continue
        if isinstance(obj, Policy):
            selectors |= all_selectors(obj)
    return selectors


def oracle_memberships(
    endpoints: Iterable[EndpointRecord],
    profiles: Iterable[ProfileRecord],
    policies: Iterable[PolicyRecord],
) -> dict[str, Payload]:
    """``selector-uid|endpoint-key`` → payload for every member, given the final inputs."""
    by_key = {p.key: p for p in profiles}
    selectors = policy_selectors(policies)
    result: dict[str, Payload] = {}
    for endpoint in endpoints:
        ns_labels = sa_labels = None
        if endpoint.namespace is not None:
            ns_profile = by_key.get(f"kns.{endpoint.namespace}")
            ns_labels = ns_profile.labels if ns_profile else None
            if endpoint.service_account:
                sa_profile = by_key.get(f"ksa.{endpoint.namespace}.{endpoint.service_account}")
                sa_labels = sa_profile.labels if sa_profile else None
        labels = effective_labels(endpoint, ns_labels, sa_labels)
        for selector in selectors:
            if selector.matches(labels):
                result[membership_key(selector.uid, endpoint.key)] = (
                    endpoint.namespace,
                    endpoint.node,
                    endpoint.interface,
                    endpoint.ips,
                )
    return result


def compacted_payloads(records: Mapping[str, MembershipRecord]) -> dict[str, Payload]:
    """The payloads of a compacted memberships map (last value per key, tombstones gone)."""
    return {key: payload(record) for key, record in records.items()}
