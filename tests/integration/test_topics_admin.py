"""`portcullis topics create|check|list` against both real brokers: idempotent creation,
every topic reported in order, drift reported with a non-zero exit, one-line errors."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from portcullis import cli
from portcullis.brokers import Broker, free_port
from portcullis.topics_admin import TopicFacts, drift
from topics import specs
from topics.specs import SPECS

ORDER = [spec.suffix for spec in specs.SPECS]


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, list[str], str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out.splitlines(), err


def states(lines: list[str], prefix: str) -> list[tuple[str, str]]:
    """(topic suffix, state text) per reported topic line, in printed order."""
    rows = []
    for line in lines:
        if not line.startswith(prefix):
            continue
        name, _partitions, _cleanup, state = line.split(None, 3)
        rows.append((name[len(prefix):], state))
    return rows


async def _admin(bootstrap: str, action: str, *args: object) -> Any:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        return await getattr(admin, action)(*args)
    finally:
        await admin.close()


def list_topics(bootstrap: str) -> set[str]:
    topics: list[str] = asyncio.run(_admin(bootstrap, "list_topics"))
    return set(topics)


def precreate(bootstrap: str, name: str, partitions: int, configs: dict[str, str]) -> None:
    response = asyncio.run(
        _admin(bootstrap, "create_topics", [NewTopic(name, partitions, 1, topic_configs=configs)])
    )
    assert [e[1] for e in response.topic_errors] == [0], response


def test_create_twice_creates_then_reports_every_topic_ok_in_order(
    broker: Broker, topic_prefix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    flags = ["--bootstrap", broker.bootstrap, "--topic-prefix", topic_prefix, "--partitions", "3"]
    code, lines, err = run_cli(capsys, "topics", "create", *flags)
    assert code == 0, err
    assert states(lines, topic_prefix) == [(suffix, "created") for suffix in ORDER]
    expected_names = {topic_prefix + suffix for suffix in ORDER}
    assert expected_names <= list_topics(broker.bootstrap)

    code, lines, err = run_cli(capsys, "topics", "create", *flags)
    assert code == 0, err
    assert states(lines, topic_prefix) == [(suffix, "ok") for suffix in ORDER]

    code, lines, err = run_cli(capsys, "topics", "check", *flags)
    assert code == 0, err
    assert states(lines, topic_prefix) == [(suffix, "ok") for suffix in ORDER]


def test_wrong_partition_count_is_drift_and_fails(
    broker: Broker, topic_prefix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    precreate(broker.bootstrap, topic_prefix + "endpoints", 2, {"cleanup.policy": "compact"})
    flags = ["--bootstrap", broker.bootstrap, "--topic-prefix", topic_prefix, "--partitions", "3"]
    code, lines, err = run_cli(capsys, "topics", "create", *flags)
    assert code == 1
    rows = dict(states(lines, topic_prefix))
    assert list(rows) == ORDER  # still reports every topic, in order
    assert rows["endpoints"] == "DRIFT: 2 partitions, expected 3"
    assert all(rows[s] == "created" for s in ORDER if s != "endpoints")
    assert err.count("\n") == 1
    assert f"1 of {len(SPECS)} topics do not match the contract (drift)" in err

    # The drift is not "fixed" by running again: it stays reported and keeps failing.
    code, lines, _err = run_cli(capsys, "topics", "create", *flags)
    assert code == 1
    assert dict(states(lines, topic_prefix))["endpoints"] == "DRIFT: 2 partitions, expected 3"


def test_wrong_cleanup_policy_is_drift(
    broker: Broker, topic_prefix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # Both brokers answer DescribeConfigs (Tansu 0.6 reports the configs set at creation;
    # a broker without it would get "configs not checked: ..." and no config drift).
    precreate(broker.bootstrap, topic_prefix + "memberships", 3, {})
    precreate(broker.bootstrap, topic_prefix + "policies.history", 3, {"cleanup.policy": "compact"})
    flags = ["--bootstrap", broker.bootstrap, "--topic-prefix", topic_prefix, "--partitions", "3"]
    code, lines, _err = run_cli(capsys, "topics", "create", *flags)
    assert code == 1
    rows = dict(states(lines, topic_prefix))
    assert rows["memberships"] == "DRIFT: cleanup.policy=delete, expected compact"
    assert rows["policies.history"] == "DRIFT: cleanup.policy=compact, expected delete"
    assert not [line for line in lines if line.startswith("configs not checked")]


def test_check_reports_missing_topics_without_creating_them(
    broker: Broker, topic_prefix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    flags = ["--bootstrap", broker.bootstrap, "--topic-prefix", topic_prefix]
    code, lines, err = run_cli(capsys, "topics", "check", *flags)
    assert code == 1
    assert states(lines, topic_prefix) == [(s, "MISSING: does not exist") for s in ORDER]
    assert "(missing)" in err
    # Asking about a topic must not auto-create it (Tansu creates topics on metadata requests).
    assert not {t for t in list_topics(broker.bootstrap) if t.startswith(topic_prefix)}


def test_unreachable_broker_is_a_one_line_error(capsys: pytest.CaptureFixture[str]) -> None:
    port = free_port()
    code, lines, err = run_cli(
        capsys, "topics", "create", "--bootstrap", f"127.0.0.1:{port}", "--timeout", "5"
    )
    assert code == 1
    assert lines == []
    assert err.count("\n") == 1
    assert err.startswith("portcullis topics: error: cannot reach the Kafka brokers")


def test_list_prints_the_contract_without_a_broker(capsys: pytest.CaptureFixture[str]) -> None:
    code, lines, _err = run_cli(
        capsys, "topics", "list", "--topic-prefix", "pc.", "--partitions", "12"
    )
    assert code == 0
    assert [line.split()[0] for line in lines] == ["pc." + s for s in ORDER]
    assert lines[0].split()[1:3] == ["12", "compact"]
    assert lines[-1].split()[1:3] == ["1", "delete"]


def test_drift_compares_partitions_replication_and_configs() -> None:
    spec = specs.ENDPOINTS_HISTORY  # delete + retention.ms
    good = TopicFacts(8, 1, {"cleanup.policy": "delete", "retention.ms": "604800000"})
    assert drift(spec, 8, 1, good) == []
    # A broker that reports no value means Kafka's default (delete, 7 days): no drift.
    assert drift(spec, 8, 1, TopicFacts(8, 1, {})) == []
    # Configs unknown (no DescribeConfigs): only the shape is compared.
    assert drift(specs.ENDPOINTS, 8, 1, TopicFacts(8, 1, None)) == []
    assert drift(spec, 8, 3, TopicFacts(4, 1, {"retention.ms": "1000"})) == [
        "4 partitions, expected 8",
        "replication factor 1, expected 3",
        "retention.ms=1000, expected 604800000",
    ]


class _NoDescribeConfigsAdmin:
    """An admin client for a broker that lacks DescribeConfigs (as older Tansu builds did)."""

    def __init__(self, partitions: int) -> None:
        self.partitions = partitions
        self.topics: set[str] = set()

    async def list_topics(self) -> list[str]:
        return sorted(self.topics)

    async def create_topics(self, new_topics: list[NewTopic]) -> object:
        self.topics |= {t.name for t in new_topics}

        class Response:
            topic_errors = [(t.name, 0, None) for t in new_topics]

        return Response()

    async def describe_topics(self, names: list[str]) -> list[dict[str, object]]:
        parts = [{"partition": p, "replicas": [1]} for p in range(self.partitions)]
        return [{"error_code": 0, "topic": name, "partitions": parts} for name in names]

    async def describe_configs(self, resources: list[object]) -> list[object]:
        from aiokafka.errors import IncompatibleBrokerVersion

        raise IncompatibleBrokerVersion("DescribeConfigs is not supported by this broker")


async def test_a_broker_without_describe_configs_is_checked_on_shape_and_says_so() -> None:
    from portcullis.topics_admin import NO_DESCRIBE_CONFIGS, _check

    admin = _NoDescribeConfigsAdmin(partitions=4)
    report = await _check(admin, "pc.", 4, 1, True, 5.0)
    # the deadletter topic, last, has 1 partition
    assert [t.state for t in report.topics] == ["created"] * (len(SPECS) - 1) + ["drift"]
    assert report.topics[-1].problems == ("4 partitions, expected 1",)
    assert report.notes == [NO_DESCRIBE_CONFIGS]
    assert report.lines()[-1] == (
        "configs not checked: broker does not support DescribeConfigs"
    )
