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
* **Bulk delivery**: the records of a topic with a *bulk sink* (the transport's
  ``bulk_sinks``) skip Faust's per-record path (a message, a conductor callback, an event,
  a queue, a stream and an ack per record: about a third of the worker's CPU). Every fetch
  hands each sink all its partitions' records in one call, with Faust's read offsets and
  compaction gaps kept as its drain loop keeps them; the sink acknowledges offsets in
  bulk (`ack_offsets`), so Faust's commits go on as before. A delivery in progress counts
  as an unacknowledged message, so a rebalance or a shutdown waits for it, as it waits
  for a stream's events; it is shielded from the fetcher's cancellation for that reason.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any, cast

import aiokafka
from aiokafka.errors import IllegalStateError
from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.types import TP, Message
from faust.types.tuples import ack_lock
from mode.services import WaitResults
from mode.utils.futures import notify

from streams.stepping import resume, step
from topics.endoffsets import true_end_offsets

log = logging.getLogger("portcullis.streams")

#: Takes every deliverable (partition, records) of one fetch for the sink's topics, in
#: offset order per partition (aiokafka's ``ConsumerRecord``: topic, partition, offset,
#: key, value, headers), and acknowledges what it has processed with `Consumer.ack_offsets`.
BulkSink = Callable[[list[tuple[TP, list[Any]]]], Awaitable[None]]


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
        hand on is not dropped: its partition is rewound to it; and that the records of
        topics with a bulk sink go to their sink, all at once (see the module's notes)."""
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
        sinks: Mapping[str, BulkSink] = getattr(self.transport, "bulk_sinks", {})
        if sinks:
            bulk = {tp: batch for tp, batch in records.items() if tp.topic in sinks and batch}
            if bulk:
                records = {tp: batch for tp, batch in records.items() if tp not in bulk}
                await self._hand_on_bulk(bulk, sinks, active_partitions, generation_id)
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

    async def _hand_on_bulk(self, bulk: Mapping[TP, list[Any]], sinks: Mapping[str, BulkSink],
                            active: set[TP] | None, generation_id: int) -> None:
        """Give each sink its partitions' records of this fetch; rewind the others."""
        undelivered: dict[TP, int] = {}
        by_sink: dict[BulkSink, list[tuple[TP, list[Any]]]] = {}
        flow_control_active = self.app.flow_control.is_active()
        for tp, batch in bulk.items():
            if not (flow_control_active and self._may_hand_on(tp, active, generation_id)):
                undelivered[tp] = batch[0].offset
                continue
            fresh = self._read_on(tp, batch)
            if fresh:
                self.app.monitor.track_tp_end_offset(tp, self.highwater(tp))
                by_sink.setdefault(sinks[tp.topic], []).append((tp, fresh))
        await self._rewind(undelivered)
        commit_every = self._commit_every
        if by_sink and commit_every is not None and self._n_acked >= commit_every:
            self._n_acked = 0  # as Faust's drain loop does
            await self.commit()
        for sink, batches in by_sink.items():
            await self._deliver(sink, batches)

    def _read_on(self, tp: TP, batch: Sequence[Any]) -> list[Any]:
        """Faust's drain loop's bookkeeping for one partition's records, all at once.

        Records before the read offset are dropped (already handed on: Faust drops them
        too), offset gaps (compaction) are recorded so commits can pass over them, and
        the read offset moves to the last record now, before the delivery: a seek while
        the sink works (a rebalance) must win, or the records it re-reads would be
        dropped as read.
        """
        read_offset = self._read_offset[tp]
        fresh = list(batch) if read_offset is None else [
            record for record in batch if record.offset >= read_offset]
        if not fresh:
            return fresh
        if self.app.topics.acks_enabled_for(tp.topic):
            gaps: list[tuple[int, int]] = []
            previous = read_offset
            for record in fresh:
                offset = record.offset
                if previous and offset - previous > 1:
                    gaps.append((previous + 1, offset))
                previous = offset
            if gaps:
                self._add_gaps(tp, gaps)
        self._read_offset[tp] = fresh[-1].offset
        return fresh

    def _add_gaps(self, tp: TP, gaps: Iterable[tuple[int, int]]) -> None:
        """Faust's `_add_gap` for several gaps, merged once."""
        committed = self._committed_offset[tp]
        tree = self._gap[tp]
        for offset_from, offset_to in gaps:
            if committed is not None:
                offset_from = max(offset_from, committed + 1)
            if offset_from <= offset_to:  # intervaltree intervals exclude the end
                tree.addi(offset_from, offset_to + 1)
        tree.merge_overlaps()

    async def _deliver(self, sink: BulkSink, batches: list[tuple[TP, list[Any]]]) -> None:
        """Run the sink to its end, as an unacknowledged message, shielded from cancellation."""
        in_flight = _InFlight(sum(len(records) for _tp, records in batches))
        self._unacked_messages.add(cast(Message, in_flight))
        task = asyncio.ensure_future(sink(batches))

        def delivered(_task: asyncio.Future[None]) -> None:
            in_flight.acked = True
            self._unacked_messages.discard(cast(Message, in_flight))
            notify(self._waiting_for_ack)

        task.add_done_callback(delivered)
        await asyncio.shield(task)

    def ack_offsets(self, tp: TP, offsets: Iterable[int]) -> None:
        """Faust's `ack` for records a bulk sink has processed (or dead-lettered)."""
        with ack_lock:
            committed = self._committed_offset[tp]
            index = self._acked_index[tp]
            new = [offset for offset in offsets
                   if (committed is None or offset >= committed) and offset not in index]
            index.update(new)
            self._acked[tp].extend(new)
            self._n_acked += len(new)
            notify(self._waiting_for_ack)

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


class _InFlight:
    """A bulk delivery under way, where Faust's shutdown and rebalance look for unacked
    messages (they wait until it is acked, and log its ``refcount``: its records)."""

    __slots__ = ("__weakref__", "acked", "refcount")

    def __init__(self, records: int) -> None:
        self.acked = False
        self.refcount = records


def _close(coros: tuple[Any, ...]) -> None:
    """Close coroutines that will not run (no "never awaited" warning)."""
    for coro in coros:
        if inspect.iscoroutine(coro):
            coro.close()
