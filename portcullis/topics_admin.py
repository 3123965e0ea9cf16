"""Create and check Portcullis topics against the contract in `topics.specs`.

Drift (a topic with the wrong partition count, replication or configs) is
reported, never silently accepted: the partitioner's promise that a
namespace maps to one partition only holds if every topic has the partition
count everybody computes with.

Careful with metadata: Tansu, and Kafka with auto.create.topics.enable,
create a topic when a client asks for metadata of an unknown topic name. So
this module lists all topics first and describes only the ones that exist.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from topics.specs import TopicSpec, all_specs

__all__ = [
    "KAFKA_DEFAULTS",
    "AdminReport",
    "TopicFacts",
    "TopicReport",
    "check_topics",
    "drift",
]

#: What Kafka assumes for a topic config that a broker does not report.
KAFKA_DEFAULTS: Mapping[str, str] = {
    "cleanup.policy": "delete",
    "retention.ms": str(7 * 24 * 3600 * 1000),
}

NO_DESCRIBE_CONFIGS = "configs not checked: broker does not support DescribeConfigs"

State = Literal["created", "ok", "drift", "missing", "error"]


@dataclass(frozen=True)
class TopicFacts:
    """What the broker says about one existing topic; `configs` None = not known."""

    partitions: int
    replication_factor: int
    configs: Mapping[str, str] | None


@dataclass(frozen=True)
class TopicReport:
    name: str
    spec: TopicSpec
    expected_partitions: int
    state: State
    problems: tuple[str, ...] = ()

    def line(self, width: int) -> str:
        head = (
            f"{self.name:<{width}}  {self.expected_partitions:>3} "
            f"{self.spec.cleanup_policy:<8}"
        )
        if self.state in ("created", "ok"):
            return f"{head} {self.state}"
        label = {"drift": "DRIFT", "missing": "MISSING", "error": "ERROR"}[self.state]
        detail = "; ".join(self.problems)
        return f"{head} {label}: {detail}" if detail else f"{head} {label}"


@dataclass
class AdminReport:
    topics: list[TopicReport]
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(t.state in ("created", "ok") for t in self.topics)

    def lines(self) -> list[str]:
        width = max((len(t.name) for t in self.topics), default=0)
        return [t.line(width) for t in self.topics] + list(self.notes)

    def failures(self) -> list[TopicReport]:
        return [t for t in self.topics if t.state not in ("created", "ok")]


def drift(
    spec: TopicSpec, expected_partitions: int, replication_factor: int, facts: TopicFacts
) -> list[str]:
    """How an existing topic differs from its spec (empty: it matches)."""
    problems: list[str] = []
    if facts.partitions != expected_partitions:
        problems.append(f"{facts.partitions} partitions, expected {expected_partitions}")
    if facts.replication_factor != replication_factor:
        problems.append(
            f"replication factor {facts.replication_factor}, expected {replication_factor}"
        )
    if facts.configs is not None:
        for name, wanted in spec.topic_configs().items():
            actual = facts.configs.get(name, KAFKA_DEFAULTS.get(name))
            if actual != wanted:
                problems.append(f"{name}={actual if actual is not None else '(unset)'}, "
                                f"expected {wanted}")
    return problems


async def check_topics(
    kafka_kwargs: Mapping[str, Any],
    prefix: str,
    partitions: int,
    replication_factor: int = 1,
    *,
    create: bool,
    timeout: float = 30.0,
) -> AdminReport:
    """Create the missing topics (if `create`) and check every topic against its spec."""
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(
        **kafka_kwargs, request_timeout_ms=int(timeout * 1000), client_id="portcullis-topics"
    )
    try:
        async with asyncio.timeout(timeout):
            await admin.start()
        async with asyncio.timeout(timeout * 2):
            return await _check(admin, prefix, partitions, replication_factor, create, timeout)
    except TimeoutError:
        from aiokafka.errors import KafkaTimeoutError

        raise KafkaTimeoutError(f"no answer from the brokers within {timeout:g}s") from None
    finally:
        await admin.close()


async def _check(
    admin: Any,
    prefix: str,
    partitions: int,
    replication_factor: int,
    create: bool,
    timeout: float,
) -> AdminReport:
    from aiokafka.admin import NewTopic
    from aiokafka.errors import for_code

    wanted = all_specs(prefix, partitions)
    existing = set(await admin.list_topics())
    created: set[str] = set()
    errors: dict[str, str] = {}
    missing = [(name, spec, count) for name, spec, count in wanted if name not in existing]
    if create and missing:
        response = await admin.create_topics(
            [
                NewTopic(name, count, replication_factor, topic_configs=spec.topic_configs())
                for name, spec, count in missing
            ]
        )
        for topic, code, message, *_rest in response.topic_errors:
            if code == 0:
                created.add(topic)
            elif code == 36:  # TOPIC_ALREADY_EXISTS: someone else just made it; check it
                existing.add(topic)
            else:
                errors[topic] = f"not created: {for_code(code).__name__}: {message or ''}".rstrip()
        await _wait_until_listed(admin, created, timeout)
        existing |= created

    present = [name for name, _spec, _count in wanted if name in existing]
    facts, notes = await _describe(admin, present)

    reports: list[TopicReport] = []
    for name, spec, count in wanted:
        if name in errors:
            reports.append(TopicReport(name, spec, count, "error", (errors[name],)))
        elif name not in existing:
            reports.append(TopicReport(name, spec, count, "missing", ("does not exist",)))
        elif name not in facts:
            reports.append(TopicReport(name, spec, count, "error", ("broker did not describe it",)))
        else:
            problems = drift(spec, count, replication_factor, facts[name])
            if problems:
                reports.append(TopicReport(name, spec, count, "drift", tuple(problems)))
            else:
                state: State = "created" if name in created else "ok"
                reports.append(TopicReport(name, spec, count, state))
    return AdminReport(reports, notes)


async def _wait_until_listed(admin: Any, names: set[str], timeout: float) -> None:
    """Metadata can lag a creation for a moment; wait until every new topic is listed."""
    deadline = time.monotonic() + timeout
    while names and time.monotonic() < deadline:
        if names <= set(await admin.list_topics()):
            return
        await asyncio.sleep(0.2)


async def _describe(admin: Any, names: Sequence[str]) -> tuple[dict[str, TopicFacts], list[str]]:
    """Partition counts and replication of `names` (all exist), plus their configs if we can."""
    from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
    from aiokafka.errors import IncompatibleBrokerVersion, KafkaError, UnsupportedVersionError

    if not names:
        return {}, []
    described = await admin.describe_topics(list(names))
    shapes: dict[str, tuple[int, int]] = {}
    for topic in described:
        if topic.get("error_code", 0) != 0:
            continue
        parts = topic.get("partitions") or []
        replication = max((len(p.get("replicas") or []) for p in parts), default=0)
        shapes[topic["topic"]] = (len(parts), replication)

    notes: list[str] = []
    described_configs: dict[str, dict[str, str]] = {}
    configs: dict[str, dict[str, str]] | None = described_configs
    try:
        responses = await admin.describe_configs(
            [ConfigResource(ConfigResourceType.TOPIC, name) for name in shapes]
        )
        for response in responses:
            for resource in response.to_object()["resources"]:
                code = resource["error_code"]
                if code == 35:
                    raise UnsupportedVersionError()
                if code != 0:
                    notes.append(
                        f"configs of {resource['resource_name']} not checked: "
                        f"{resource.get('error_message') or f'error code {code}'}"
                    )
                    continue
                described_configs[resource["resource_name"]] = {
                    entry["config_names"]: entry["config_value"]
                    for entry in resource["config_entries"]
                    if entry["config_value"] is not None
                }
    except (IncompatibleBrokerVersion, UnsupportedVersionError):
        configs = None
        notes.append(NO_DESCRIBE_CONFIGS)
    except KafkaError as exc:
        configs = None
        notes.append(f"configs not checked: DescribeConfigs failed: {exc}")

    facts = {
        name: TopicFacts(
            partitions=count,
            replication_factor=replication,
            configs=None if configs is None else configs.get(name),
        )
        for name, (count, replication) in shapes.items()
    }
    return facts, notes
