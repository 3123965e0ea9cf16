"""The Faust adapter's configuration reaches the clients it builds (no broker needed)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from streams.app import ChangelogWriteFailed, Processor, StreamsConfig, Transport
from streams.localstate import LocalState
from streams.membership import Delta


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


class _FakeProducer:
    """Records what the processor sends; every send is acknowledged at once."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes, bytes | None, int]] = []

    async def send(
        self, topic: str, key: bytes, value: bytes | None, partition: int, *_: object
    ) -> asyncio.Future[object]:
        self.sent.append((topic, key, value, partition))
        fut: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        fut.set_result(None)
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
    await processor._write_members([Delta("s:x|pod/a/b", None)], 1, force=True)
    await processor._write(processor.endpoints, b"pod/a/other", None, 1)  # not forced
    assert producer.sent == [
        (endpoints_log, b"pod/a/gone", None, 1),
        ("t.memberships", b"s:x|pod/a/b", None, 1),
    ]
    # killed now: the members write is a suspect for the next start, the input is not
    assert LocalState(tmp_path / "state").open() == {"s:x|pod/a/b"}


class _FailingProducer(_FakeProducer):
    """Every send fails after the (pretended) retries."""

    async def send(
        self, topic: str, key: bytes, value: bytes | None, partition: int, *_: object
    ) -> asyncio.Future[object]:
        self.sent.append((topic, key, value, partition))
        fut: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        fut.set_exception(ConnectionError("broker gone"))
        return fut


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
