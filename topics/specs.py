"""Every Portcullis topic in one place: name, partitions, cleanup policy, key, record type.

Names are a configurable prefix (default ``portcullis.``) plus the suffix here.
State topics are compacted (the latest record per key is the state; a
tombstone deletes); history topics are append-only (cleanup.policy=delete)
copies for audit and replay to a point in time.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal, TypeAlias

from topics.records import (
    DeadLetterRecord,
    DnsRecord,
    EndpointRecord,
    FlowRecord,
    HistoryRecord,
    MembershipRecord,
    PolicyRecord,
    ProfileRecord,
    Record,
    SelectorRecord,
)

__all__ = [
    "DEADLETTER",
    "DNS",
    "ENDPOINTS",
    "ENDPOINTS_HISTORY",
    "FLOWS",
    "MEMBERSHIPS",
    "POLICIES",
    "POLICIES_HISTORY",
    "PROFILES",
    "PROFILES_HISTORY",
    "SELECTORS",
    "SPECS",
    "TopicSpec",
    "all_specs",
    "spec_for",
    "topic_name",
    "topic_names",
]

CleanupPolicy: TypeAlias = Literal["compact", "delete"]

#: Seven days: how long history and dead letters are kept by default.
WEEK_MS = 7 * 24 * 3600 * 1000


@dataclass(frozen=True, slots=True)
class TopicSpec:
    """One topic: `partitions` is a number, or "settings" for the configured partition count."""

    suffix: str
    partitions: int | Literal["settings"]
    cleanup_policy: CleanupPolicy
    record: type[Record]
    key: str
    partitioned_by: str
    configs: Mapping[str, str] = field(default_factory=dict)

    def name(self, prefix: str) -> str:
        """The full topic name with `prefix`."""
        return prefix + self.suffix

    def partition_count(self, partitions: int) -> int:
        """Partitions of this topic when the configured count is `partitions`."""
        return partitions if self.partitions == "settings" else self.partitions

    def topic_configs(self) -> dict[str, str]:
        """Broker-side topic configs, cleanup.policy included."""
        return {"cleanup.policy": self.cleanup_policy, **self.configs}


ENDPOINTS = TopicSpec(
    "endpoints", "settings", "compact", EndpointRecord,
    key="kind/namespace/name (cluster-scoped: kind//name)",
    partitioned_by="namespace, else name",
)
ENDPOINTS_HISTORY = TopicSpec(
    "endpoints.history", "settings", "delete", HistoryRecord,
    key="kind/namespace/name (cluster-scoped: kind//name)",
    partitioned_by="namespace, else name",
    configs={"retention.ms": str(WEEK_MS)},
)
PROFILES = TopicSpec(
    "profiles", "settings", "compact", ProfileRecord,
    key="kns.<ns> / ksa.<ns>.<sa>",
    partitioned_by="namespace",
)
PROFILES_HISTORY = TopicSpec(
    "profiles.history", "settings", "delete", HistoryRecord,
    key="kns.<ns> / ksa.<ns>.<sa>",
    partitioned_by="namespace",
    configs={"retention.ms": str(WEEK_MS)},
)
POLICIES = TopicSpec(
    "policies", "settings", "compact", PolicyRecord,
    key="kind/namespace/name (cluster-scoped: kind//name)",
    partitioned_by="namespace, else name",
)
POLICIES_HISTORY = TopicSpec(
    "policies.history", "settings", "delete", HistoryRecord,
    key="kind/namespace/name (cluster-scoped: kind//name)",
    partitioned_by="namespace, else name",
    configs={"retention.ms": str(WEEK_MS)},
)
SELECTORS = TopicSpec(
    "selectors", "settings", "compact", SelectorRecord,
    key="<selector-uid>@<policies-partition> (one registration per compiling partition)",
    partitioned_by="namespace; global selectors fan out to every partition",
)
MEMBERSHIPS = TopicSpec(
    "memberships", "settings", "compact", MembershipRecord,
    key="selector-uid|endpoint-key",
    partitioned_by="namespace of the member, else its name",
)
DEADLETTER = TopicSpec(
    "deadletter", 1, "delete", DeadLetterRecord,
    key="the original key",
    partitioned_by="nothing (one partition, in order of rejection)",
    configs={"retention.ms": str(WEEK_MS)},
)
DNS = TopicSpec(
    "dns", "settings", "delete", DnsRecord,
    key="node|name",
    partitioned_by="node",
    configs={"retention.ms": str(WEEK_MS)},
)
FLOWS = TopicSpec(
    "flows", "settings", "delete", FlowRecord,
    key="node",
    partitioned_by="node",
    configs={"retention.ms": str(WEEK_MS)},
)

#: Every topic, in the order `portcullis topics` reports them.
SPECS: tuple[TopicSpec, ...] = (
    ENDPOINTS,
    ENDPOINTS_HISTORY,
    PROFILES,
    PROFILES_HISTORY,
    POLICIES,
    POLICIES_HISTORY,
    SELECTORS,
    MEMBERSHIPS,
    DNS,
    FLOWS,
    DEADLETTER,
)

_BY_SUFFIX: dict[str, TopicSpec] = {spec.suffix: spec for spec in SPECS}


def topic_name(prefix: str, suffix: str) -> str:
    """The full name of the topic `suffix` (which must be one of ours)."""
    return spec_for(suffix).name(prefix)


def topic_names(prefix: str) -> dict[str, str]:
    """Suffix -> full topic name, for every topic, in order."""
    return {spec.suffix: spec.name(prefix) for spec in SPECS}


def all_specs(prefix: str, partitions: int) -> list[tuple[str, TopicSpec, int]]:
    """(full name, spec, partition count) for every topic, in order."""
    if partitions < 1:
        raise ValueError(f"partitions must be at least 1, got {partitions}")
    return [(spec.name(prefix), spec, spec.partition_count(partitions)) for spec in SPECS]


@functools.lru_cache(maxsize=256)
def spec_for(topic: str) -> TopicSpec:
    """The spec of a topic given its suffix (``endpoints``) or its full name (``x.endpoints``).

    The longest matching suffix wins, so ``x.endpoints.history`` is the
    history topic, not ``endpoints``.
    """
    if topic in _BY_SUFFIX:
        return _BY_SUFFIX[topic]
    for suffix in sorted(_BY_SUFFIX, key=len, reverse=True):
        if topic.endswith(suffix):
            return _BY_SUFFIX[suffix]
    known = ", ".join(_BY_SUFFIX)
    raise ValueError(f"not a Portcullis topic: {topic!r} (known suffixes: {known})")
