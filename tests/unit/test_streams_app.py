"""The Faust adapter without a broker: its configuration reaches the clients it builds, its
table writes reach store and changelog, and batched processing gives exactly the
memberships of the one-at-a-time path."""

from __future__ import annotations

import asyncio
import itertools
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streams.app import ChangelogWriteFailed, Processor, StreamsConfig, Transport
from streams.batch import BatchWrites
from streams.local import LocalProcessor, QueueName
from streams.localstate import LocalState
from streams.membership import Delta
from tests.unit.test_membership_property import event_st
from topics.codec import decode_as, encode
from topics.records import MembershipRecord


def _processor(tmp_path: Path, **kwargs: object) -> Processor:
    config = StreamsConfig(
        store="memory://", data_dir=str(tmp_path), topic_prefix="t.", **kwargs  # type: ignore[arg-type]
    )
    return Processor(config)


@pytest.mark.parametrize("wait", [0.0, 0.02, 1.5])
async def test_worker_consumer_uses_the_configured_fetch_wait(tmp_path: Path, wait: float) -> None:
    processor = _processor(tmp_path, fetch_max_wait=wait)
    app = processor.app
    assert isinstance(app.transport, Transport)
    thread = app.consumer._thread
    consumer = thread._create_worker_consumer(app.transport)
    try:
        # start() builds the fetcher from this attribute; Faust alone would pass 1500
        assert consumer._fetch_max_wait_ms == round(wait * 1000)
    finally:
        await consumer._client.close()


def test_negative_fetch_wait_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="fetch_max_wait"):
        _processor(tmp_path, fetch_max_wait=-1.0)


@dataclass(frozen=True)
class _Metadata:
    topic: str
    partition: int
    offset: int


class _FakeProducer:
    """Records what the processor sends; every batch is acknowledged at once."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes, bytes | None, int]] = []
        self.batches = 0

    async def send_batches(
        self, topic: str, partition: int, records: list[tuple[bytes, bytes | None]]
    ) -> list[tuple[asyncio.Future[object], int]]:
        first = len(self.sent)
        self.sent += [(topic, key, value, partition) for key, value in records]
        self.batches += 1
        return [(self._done(_Metadata(topic, partition, first)), len(records))]

    def _done(self, result: object) -> asyncio.Future[object]:
        fut: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        fut.set_result(result)
        return fut


async def test_table_writes_go_to_store_and_changelog(tmp_path: Path) -> None:
    processor = _processor(tmp_path)
    producer = _FakeProducer()
    processor.app._producer = producer  # what app.producer returns once started
    members = processor.members
    await processor._write(members, b"s:x|pod/a/b", b"v1", 3)
    await processor._write(members, b"s:x|pod/a/b", b"v2", 3)
    await processor._write(members, b"s:x|pod/a/c", None, 3)  # never there: nothing sent
    await processor._write(members, b"s:x|pod/a/b", None, 3)
    await processor._write(processor.endpoints, b"pod/a/b", b"e", 5)
    assert producer.sent == [
        ("t.memberships", b"s:x|pod/a/b", b"v1", 3),
        ("t.memberships", b"s:x|pod/a/b", b"v2", 3),
        ("t.memberships", b"s:x|pod/a/b", None, 3),
        (processor.endpoints.changelog_topic.get_topic_name(), b"pod/a/b", b"e", 5),
    ]
    assert b"s:x|pod/a/b" not in members.data
    assert processor.endpoints.data[b"pod/a/b"] == b"e"


async def test_forced_tombstones_are_sent_and_member_writes_noted(tmp_path: Path) -> None:
    """After a crash a row may be gone locally but not on its changelog: forced tombstones
    are sent anyway, and every members write is named in the intent log first."""
    processor = _processor(tmp_path)
    producer = _FakeProducer()
    processor.app._producer = producer
    local = LocalState(tmp_path / "state")
    local.open()
    processor.attach_local_state(local)
    endpoints_log = processor.endpoints.changelog_topic.get_topic_name()
    await processor._write(processor.endpoints, b"pod/a/gone", None, 1, force=True)
    writes = BatchWrites()
    writes.put_members(1, [Delta("s:x|pod/a/b", None)], force=True)
    await processor._write_batch(writes)
    await processor._write(processor.endpoints, b"pod/a/other", None, 1)  # not forced
    assert producer.sent == [
        (endpoints_log, b"pod/a/gone", None, 1),
        ("t.memberships", b"s:x|pod/a/b", None, 1),
    ]
    # killed now: the members write is a suspect for the next start, the input is not
    assert LocalState(tmp_path / "state").open() == {"s:x|pod/a/b"}


class _FailingProducer(_FakeProducer):
    """Every send fails after the (pretended) retries."""

    async def send_batches(
        self, topic: str, partition: int, records: list[tuple[bytes, bytes | None]]
    ) -> list[tuple[asyncio.Future[object], int]]:
        self.sent += [(topic, key, value, partition) for key, value in records]
        fut: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        fut.set_exception(ConnectionError("broker gone"))
        return [(fut, len(records))]


async def test_a_failed_changelog_write_stops_the_next_commit(tmp_path: Path) -> None:
    """Faust commits offsets right after a flush: a flush after a lost write must raise."""
    processor = _processor(tmp_path)
    producer = processor.app.producer  # ours: raises from flush when a write was lost
    await producer.flush()  # nothing lost yet: no error
    processor.app._producer = _FailingProducer()
    await processor._write(processor.members, b"s:x|pod/a/b", b"v1", 0)
    await asyncio.sleep(0)  # the send's done-callbacks run
    processor.app._producer = producer
    with pytest.raises(ChangelogWriteFailed, match="broker gone"):
        await producer.flush()


# ---------------------------------------------------------------------------- batches


@dataclass(frozen=True)
class _Message:
    topic: str
    partition: int
    key: bytes
    value: bytes | None
    offset: int = 0


class _Recording(LocalProcessor):
    """The one-at-a-time path, recording every match-topic message in the order it ran."""

    def __init__(self, partitions: int, prefix: str) -> None:
        super().__init__(partitions)
        self.prefix = prefix
        self.messages: list[_Message] = []

    def step(self, queue: QueueName, observed_at: float = 0.0) -> None:
        topic, p = queue
        record: Any
        if topic == "selectors":
            reg = self._q.selectors[p][0]
            key, record = reg.key, reg.record
        elif topic != "policies":
            key, record = getattr(self._q, topic)[p][0]
        if topic != "policies":
            value = encode(record) if record is not None else None
            self.messages.append(_Message(self.prefix + topic, p, key.encode(), value))
        super().step(queue, observed_at)


def _compacted(sent: list[tuple[str, bytes, bytes | None, int]],
               topic: str) -> dict[str, MembershipRecord]:
    out: dict[str, MembershipRecord] = {}
    for name, key, value, _partition in sent:
        if name != topic:
            continue
        record = decode_as(MembershipRecord, value)
        if record is None:
            out.pop(key.decode(), None)
        else:
            out[key.decode()] = record
    return out


async def _run_batches(messages: list[_Message], cuts: list[int], partitions: int,
                       data_dir: str) -> tuple[dict[str, MembershipRecord], Processor]:
    processor = Processor(StreamsConfig(store="memory://", data_dir=data_dir,
                                        topic_prefix="t.", partitions=partitions))
    producer = _FakeProducer()
    processor.app._producer = producer
    bounds = [0, *sorted(set(cuts)), len(messages)]
    for start, end in itertools.pairwise(bounds):
        await processor._match_batch(messages[start:end])
    return _compacted(producer.sent, "t.memberships"), processor


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(events=st.lists(event_st, min_size=8, max_size=50),
       partitions=st.sampled_from([1, 3]), data=st.data())
def test_batches_give_the_memberships_of_one_event_at_a_time(
    events: list[tuple[str, tuple[str, Any]]], partitions: int, data: st.DataObject
) -> None:
    """The same match messages, cut into random batches and processed by the adapter,
    leave exactly the one-at-a-time path's memberships (`observed_at` included) on the
    topic and in the members table, and each row of a batch is sent at most once."""
    reference = _Recording(partitions, "t.")
    for topic, (key, record) in events:
        getattr(reference, f"publish_{topic}")(key, record)
        for _ in range(data.draw(st.integers(0, 2))):
            if pending := reference.pending():
                reference.step(data.draw(st.sampled_from(pending)))
    reference.drain()
    messages = reference.messages
    cuts = data.draw(st.lists(st.integers(0, len(messages)), max_size=6))
    with tempfile.TemporaryDirectory() as tmp:
        got, processor = asyncio.run(_run_batches(messages, cuts, partitions, tmp))
    assert got == reference.memberships
    table = {k.decode(): decode_as(MembershipRecord, v) for k, v in processor.members.data.items()}
    assert table == reference.memberships
    assert processor.processed == len(messages)


async def test_a_batch_sends_each_row_once_per_table_and_partition(tmp_path: Path) -> None:
    """An endpoint changed three times in one batch: one endpoints row, one record batch
    per table, and only the last membership value."""
    reference = _Recording(1, "t.")
    for topic, (key, record) in _relabelled_three_times():
        getattr(reference, f"publish_{topic}")(key, record)
    reference.drain()
    processor = Processor(StreamsConfig(store="memory://", data_dir=str(tmp_path),
                                        topic_prefix="t.", partitions=1))
    producer = _FakeProducer()
    processor.app._producer = producer
    await processor._match_batch(reference.messages)
    endpoints_log = processor.endpoints.changelog_topic.get_topic_name()
    assert [key for topic, key, _v, _p in producer.sent if topic == endpoints_log] == [
        b"pod/a/e1"
    ]
    assert _compacted(producer.sent, "t.memberships") == reference.memberships
    member_keys = [key for topic, key, _v, _p in producer.sent if topic == "t.memberships"]
    assert len(member_keys) == len(set(member_keys))
    assert producer.batches == 3  # selectors, endpoints, members


def _relabelled_three_times() -> list[tuple[str, tuple[str, Any]]]:
    from topics.records import EndpointRecord, PolicyRecord

    def pod(app: str, at: float) -> EndpointRecord:
        return EndpointRecord(kind="pod", namespace="a", name="e1", node="n1",
                              interface="cali1", ips=("10.0.0.1",), labels={"app": app},
                              service_account=None, source="kubernetes", observed_at=at)

    doc = {"apiVersion": "projectcalico.org/v3", "kind": "GlobalNetworkPolicy",
           "metadata": {"name": "p"},
           "spec": {"selector": "app == 'x'", "types": ["Egress"],
                    "egress": [{"action": "Allow", "destination": {"selector": "app == 'y'"}}]}}
    policy = PolicyRecord(kind="GlobalNetworkPolicy", namespace=None, name="p", document=doc,
                          actor="t", applied_at=1.0, observed_at=1.0)
    return [("policy", ("GlobalNetworkPolicy//p", policy)),
            ("endpoint", ("pod/a/e1", pod("x", 2.0))),
            ("endpoint", ("pod/a/e1", pod("y", 3.0))),
            ("endpoint", ("pod/a/e1", pod("x", 4.0)))]
