"""`portcullis apply / delete / get` through the CLI, against real brokers."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
import yaml
from aiokafka import AIOKafkaConsumer, TopicPartition

import policy
from portcullis import cli
from portcullis.brokers import Broker
from portcullis.topics_admin import check_topics
from topics.records import EndpointRecord, PolicyRecord
from topics.specs import topic_name
from watchers.topicstate import read_state

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
PARTITIONS = 3


def example_objects() -> list[object]:
    objects: list[object] = []
    for path in sorted(EXAMPLES.glob("*.yaml")):
        objects.extend(policy.load(path.read_text(), str(path)))
    return objects


@pytest.fixture
def prefix(broker: Broker, topic_prefix: str) -> str:
    report = asyncio.run(check_topics(
        {"bootstrap_servers": broker.bootstrap}, topic_prefix, PARTITIONS, create=True
    ))
    assert report.ok, report.lines()
    return topic_prefix


def run(broker: Broker, prefix: str, *argv: str) -> int:
    return cli.main([*argv, "--bootstrap", broker.bootstrap, "--topic-prefix", prefix,
                     "--partitions", str(PARTITIONS), "--actor", "alice"])


def state(broker: Broker, prefix: str) -> dict[str, PolicyRecord]:
    return asyncio.run(read_state(
        {"bootstrap_servers": broker.bootstrap}, topic_name(prefix, "policies"), PolicyRecord
    ))


def message_count(broker: Broker, topic: str) -> int:
    async def count() -> int:
        consumer = AIOKafkaConsumer(bootstrap_servers=broker.bootstrap)
        await consumer.start()
        try:
            tps = [TopicPartition(topic, p) for p in range(PARTITIONS)]
            ends = await consumer.end_offsets(tps)
            return sum(ends.values())
        finally:
            await consumer.stop()
    return asyncio.run(count())


def test_apply_examples_publishes_them_all_then_reports_unchanged(
    broker: Broker, prefix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    objects = example_objects()
    assert objects, "examples/ has no documents"
    assert run(broker, prefix, "apply", "-f", str(EXAMPLES)) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == len(objects)
    assert all(line.endswith(" created") for line in out), out

    on_topic = state(broker, prefix)
    assert set(on_topic) == {o.key for o in objects}  # type: ignore[attr-defined]
    for obj in objects:
        record = on_topic[obj.key]  # type: ignore[attr-defined]
        assert record.document == obj.to_document()  # type: ignore[attr-defined]
        assert record.actor == "alice"
        assert record.applied_at > 0
    # network sets and host endpoints are also members on the endpoints topic
    endpoints = asyncio.run(read_state(
        {"bootstrap_servers": broker.bootstrap}, topic_name(prefix, "endpoints"), EndpointRecord
    ))
    members = {o for o in objects if o.kind in  # type: ignore[attr-defined]
               ("GlobalNetworkSet", "NetworkSet", "HostEndpoint")}
    assert len(endpoints) == len(members)
    assert all(e.source == "apply" for e in endpoints.values())

    before = message_count(broker, topic_name(prefix, "policies"))
    assert run(broker, prefix, "apply", "-f", str(EXAMPLES)) == 0
    out = capsys.readouterr().out.splitlines()
    assert all(line.endswith(" unchanged") for line in out), out
    assert message_count(broker, topic_name(prefix, "policies")) == before


def test_changed_document_is_configured_and_delete_tombstones_it(
    broker: Broker, prefix: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    doc = {
        "apiVersion": "projectcalico.org/v3", "kind": "GlobalNetworkSet",
        "metadata": {"name": "corp", "labels": {"role": "corp"}},
        "spec": {"nets": ["10.1.0.0/16"]},
    }
    path = tmp_path / "corp.yaml"
    path.write_text(yaml.safe_dump(doc))
    assert run(broker, prefix, "apply", "-f", str(path)) == 0
    doc["spec"]["nets"] = ["10.1.0.0/16", "10.2.0.0/16"]  # type: ignore[index]
    path.write_text(yaml.safe_dump(doc))
    assert run(broker, prefix, "apply", "-f", str(path)) == 0
    assert capsys.readouterr().out.splitlines() == [
        "globalnetworkset/corp created", "globalnetworkset/corp configured"]
    assert state(broker, prefix)["GlobalNetworkSet//corp"].document["spec"]["nets"] == [
        "10.1.0.0/16", "10.2.0.0/16"]

    assert run(broker, prefix, "get", "gns", "-o", "json") == 0
    listed = json.loads(capsys.readouterr().out)
    assert [i["metadata"]["name"] for i in listed["items"]] == ["corp"]
    assert run(broker, prefix, "get", "globalnetworksets") == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["NAME", "NETS", "DOMAINS", "ACTOR", "AGE"]
    assert table[1].split()[:4] == ["corp", "2", "0", "alice"]

    assert run(broker, prefix, "delete", "-f", str(path)) == 0
    assert capsys.readouterr().out.splitlines() == ["globalnetworkset/corp deleted"]
    assert "GlobalNetworkSet//corp" not in state(broker, prefix)
    endpoints = asyncio.run(read_state(
        {"bootstrap_servers": broker.bootstrap}, topic_name(prefix, "endpoints"), EndpointRecord
    ))
    assert "globalnetworkset//corp" not in endpoints
    assert run(broker, prefix, "delete", "-f", str(path)) == 1
    captured = capsys.readouterr()
    assert "globalnetworkset/corp not found" in captured.out
    assert run(broker, prefix, "get", "gns", "corp") == 1


def test_one_broken_document_publishes_nothing_and_names_every_field(
    broker: Broker, prefix: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = tmp_path / "a-good.yaml"
    good.write_text(yaml.safe_dump({
        "apiVersion": "projectcalico.org/v3", "kind": "GlobalNetworkPolicy",
        "metadata": {"name": "ok"}, "spec": {"selector": "all()", "types": ["Egress"]},
    }))
    bad = tmp_path / "b-bad.yaml"
    bad.write_text(
        "apiVersion: projectcalico.org/v3\nkind: GlobalNetworkSet\nmetadata:\n  name: s\n"
        "spec:\n  nets: [10.0.0.0/8, 300.1.1.1/32]\n---\n"
        "apiVersion: projectcalico.org/v3\nkind: NetworkPolicy\nmetadata:\n  name: p\n"
        "  namespace: prod\nspec:\n  selector: app = 'x'\n"
    )
    assert run(broker, prefix, "apply", "-f", str(tmp_path)) == 1
    err = capsys.readouterr().err
    assert f"{bad}: doc 1: spec.nets[1]" in err
    assert f"{bad}: doc 2: spec.selector" in err
    assert "nothing was published" in err
    assert message_count(broker, topic_name(prefix, "policies")) == 0

    broken = sorted((EXAMPLES / "broken").glob("*.yaml"))
    if broken:
        assert run(broker, prefix, "apply", "-f", str(EXAMPLES / "broken")) == 1
        err = capsys.readouterr().err
        for path in broken:
            assert str(path) in err
        assert message_count(broker, topic_name(prefix, "policies")) == 0


def test_apply_refuses_missing_topics(
    tansu_broker: Broker, topic_prefix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(tansu_broker, topic_prefix, "apply", "-f", str(EXAMPLES)) == 1
    assert "portcullis topics create" in capsys.readouterr().err


def test_apply_warns_per_object_about_what_is_not_enforced_as_written(
    broker: Broker, prefix: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Calico YAML with ingress rules is accepted, and the operator is told it has no
    effect."""
    docs = [
        {"apiVersion": "projectcalico.org/v3", "kind": "NetworkPolicy",
         "metadata": {"name": "web", "namespace": "shop"},
         "spec": {"selector": "app == 'web'", "types": ["Ingress", "Egress"],
                  "ingress": [{"action": "Allow"}], "egress": [{"action": "Allow"}]}},
        {"apiVersion": "projectcalico.org/v3", "kind": "GlobalNetworkSet",
         "metadata": {"name": "saas"},
         "spec": {"nets": ["192.0.2.0/24"], "allowedEgressDomains": ["*.slack.com"]}},
    ]
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump_all(docs))
    assert run(broker, prefix, "apply", "-f", str(path)) == 0
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [
        "warning: NetworkPolicy/shop/web: ingress is not enforced (Portcullis enforces egress "
        "only): its 1 ingress rule(s) have no effect",
    ]  # the network set's allowedEgressDomains are enforced: no warning
    assert captured.out.splitlines() == ["networkpolicy/shop/web created",
                                         "globalnetworkset/saas created"]
