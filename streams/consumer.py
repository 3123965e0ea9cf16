"""Faust's aiokafka consumer, with the fixes the processor's correctness depends on.

* **Fetch wait**: Faust hard-codes a 1.5 s fetch wait; the transport's `fetch_max_wait_ms`
  is used instead.
* **End offsets**: table recovery reads each changelog up to an end offset that is true on
  every broker (`topics.endoffsets`; Tansu lists one short of its last batch).
* **No dropped records**: Faust's `Consumer.getmany` takes a batch from aiokafka (which
  then counts it as consumed) and silently drops the records of a partition that stopped
  being active meanwhile, or all of them when the flow stops or a rebalance begins
  mid-batch. Its only repair is a seek back to the committed offsets, which does nothing
  for a partition never committed, and a later record makes Faust commit across the hole
  as if it were a compaction gap. Measured on Tansu: a worker surviving a rebalance lost
  some ``policies`` records in about one run in five. Here every record not handed on is
  rewound to (the partition re-reads from its first undelivered record), so nothing is
  lost, and the rewind hands on nothing twice (Faust's own seeks back to the committed
  offsets still may: processing is at least once, as before).
* **Seek to committed offsets** asks the broker once for every partition, then seeks them
  all without yielding, instead of aiokafka's one round trip per partition while fetches
  go on (on Tansu about 5 ms each: 36 partitions took 180 ms).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import AsyncIterator, Mapping
from typing import Any, cast

import aiokafka
from aiokafka.errors import IllegalStateError
from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.types import TP, Message
from mode.services import WaitResults

from streams.stepping import resume, step
from topics.endoffsets import true_end_offsets

log = logging.getLogger("portcullis.streams")


class ConsumerThread(faust_aiokafka.AIOKafkaConsumerThread):
    """Faust's aiokafka consumer thread: the transport's fetch wait, true end offsets, and
    an all-at-once seek to the committed offsets."""

    def _create_worker_consumer(self, transport: Any) -> aiokafka.AIOKafkaConsumer:
        consumer = super()._create_worker_consumer(transport)
        # aiokafka takes the wait only as a constructor argument, kept until start() builds
        # the fetcher; Faust passes a constant, so we replace it before the start.
        if not isinstance(getattr(consumer, "_fetch_max_wait_ms", None), int):
            raise RuntimeError(
                f"aiokafka {aiokafka.__version__} has no AIOKafkaConsumer._fetch_max_wait_ms: "
                "cannot set the fetch wait; update streams.consumer.ConsumerThread"
            )
        consumer._fetch_max_wait_ms = transport.fetch_max_wait_ms
        return consumer

    async def _highwaters(self, partitions: list[TP]) -> Mapping[TP, int]:
        listed = await super()._highwaters(partitions)
        if self.consumer.in_transaction:
            return listed
        return await true_end_offsets(self._ensure_consumer()._client, listed)

    async def seek_to_committed(self) -> Mapping[TP, int]:
        offsets: Mapping[TP, int] = await self.call_thread(self._seek_to_committed)
        return offsets

    async def _seek_to_committed(self) -> dict[Any, int | None]:
        """aiokafka's `seek_to_committed`, with one OffsetFetch for all partitions."""
        consumer = self._ensure_consumer()
        assigned = list(consumer.assignment())
        committed = await consumer._coordinator.fetch_committed_offsets(assigned)
        offsets: dict[Any, int | None] = {}
        for tp in assigned:
            meta = committed.get(tp)
            offsets[tp] = meta.offset if meta is not None and meta.offset >= 0 else None
        for tp, offset in offsets.items():  # no await in between: one consistent moment
            if offset:
                consumer._fetcher.seek_to(tp, offset)
        # where processing resumes after this assignment (the processor's readiness)
        cast(Any, self.consumer).committed_at_seek = dict(offsets)
        return offsets


class Consumer(faust_aiokafka.Consumer):
    """Faust's aiokafka consumer, whose `getmany` rewinds what it does not hand on, and
    which tells the transport's commit hooks of every successful commit."""

    #: The committed offsets the last assignment resumed from (None: none committed).
    committed_at_seek: dict[Any, int | None] = {}  # replaced at every seek, never mutated

    async def wait_first(self, *coros: Any, timeout: Any = None) -> Any:
        """Faust's `wait_first`, except that a record's delivery that does not wait is run
        at once, without the four tasks Faust starts per record (see `streams.stepping`):
        the processor's largest per-record cost after its own work.

        The delivery (the first coroutine) is stepped only while nothing it races could win:
        the flow not suspended, the consumer neither stopped nor crashed. If it has to wait,
        Faust's race goes on as before with the rest of it.
        """
        if timeout is not None or not coros or not inspect.iscoroutine(coros[0]) or (
            self.suspend_flow.is_set() or self._stopped.is_set() or self._crashed.is_set()
        ):
            return await super().wait_first(*coros, timeout=timeout)
        delivery, rivals = coros[0], coros[1:]
        try:
            stepped = step(delivery)
        except BaseException:
            _close(rivals)
            raise
        if stepped.done:
            _close(rivals)
            return WaitResults([delivery], [stepped.value], False)
        return await super().wait_first(resume(stepped), *rivals)

    async def commit(self, *args: Any, **kwargs: Any) -> bool:
        committed = bool(await super().commit(*args, **kwargs))
        if committed:
            for hook in getattr(self.transport, "commit_hooks", ()):
                hook()
        return committed

    def _new_consumer_thread(self) -> faust_aiokafka.AIOKafkaConsumerThread:
        return ConsumerThread(self, loop=self.loop, beacon=self.beacon)

    async def getmany(self, timeout: float) -> AsyncIterator[tuple[TP, Message]]:
        """Faust's `getmany` (round-robin over partitions), except that a record it may not
        hand on is not dropped: its partition is rewound to it."""
        records, active_partitions = await self._wait_next_records(timeout)
        generation_id = self.app.consumer_generation_id
        if records is None or self.should_stop:
            return
        if not self.flow_active:
            await self._rewind({tp: batch[0].offset for tp, batch in records.items() if batch})
            try:  # as Faust does: back to the committed offsets (nothing lost, see above)
                await self.perform_seek()
            except Exception as exc:  # Faust only logs it too
                log.warning("seek to committed offsets with the flow stopped failed: %r", exc)
            return
        undelivered: dict[TP, int] = {}
        for tp, record in self.scheduler.iterate(records):
            if tp in undelivered:
                continue
            if not self._may_hand_on(tp, active_partitions, generation_id):
                undelivered[tp] = record.offset
                continue
            self.app.monitor.track_tp_end_offset(tp, self.highwater(tp))
            yield tp, self._to_message(tp, record)
        await self._rewind(undelivered)

    def _may_hand_on(self, tp: TP, active: set[TP] | None, generation_id: int) -> bool:
        """Faust's conditions for handing a fetched record on to the streams."""
        return (
            self.flow_active
            and self.app.consumer_generation_id == generation_id
            and (active is None or tp in active or tp in self._buffered_partitions)
        )

    async def _rewind(self, first_undelivered: Mapping[TP, int]) -> None:
        """Seek each still-assigned partition back to its first record not handed on."""
        assigned = self.assignment()
        for tp, offset in first_undelivered.items():
            if tp not in assigned:
                continue
            log.info("%s[%d]: re-reading from %d (fetched while not consumable)",
                     tp.topic, tp.partition, offset)
            try:
                await self.seek(tp, offset)
            except IllegalStateError:  # revoked meanwhile: its next owner reads it
                log.info("%s[%d]: no longer assigned, not re-read here", tp.topic, tp.partition)


def _close(coros: tuple[Any, ...]) -> None:
    """Close coroutines that will not run (no "never awaited" warning)."""
    for coro in coros:
        if inspect.iscoroutine(coro):
            coro.close()
