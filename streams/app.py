"""The Faust application: thin adapters around the pure compile and match cores.

Two consumers of the inputs, both one batch at a time (faust-streaming can commit past an
in-flight message with ``concurrency > 1``):

* the *compile* agent reads ``policies``; per partition a `CompileState` (restored from the
  ``policy-refs`` table) turns a policy change into selector registrations, sent with an
  explicit partition to ``selectors`` and acknowledged by the broker *before* the table is
  updated, so a crash can only make it redo work, never forget a withdrawal.
* *match* reads ``endpoints``, ``profiles`` and ``selectors`` (co-partitioned: one consumer
  of the three topics, so one worker owns a namespace's whole stream). It is not a Faust
  agent but a bulk sink of the consumer (`streams.consumer`): each fetch's records come in
  one call, without Faust's per-record stream, and are acknowledged in bulk. Per partition a
  `PartitionState` is restored from the ``endpoints``, ``profiles`` and ``selectors``
  tables plus the ``members`` table, then resynced. The ``members`` table's changelog
  IS the ``memberships`` topic: writing a member is publishing it, and recovering the
  table is reading what was published.

Partition states are rebuilt lazily, on the first event of a partition after every
rebalance; rebuilding resyncs desired members (from the inputs) against the published
ones, which repairs anything a crash left half-done. A local (rocksdb) table can be
ahead of its changelog after a SIGKILL; `streams.localstate` names the member keys that
may be, and the rebuild republishes them. Table writes go straight to the store and the
producer; a write that fails after the producer's retries stops the next offset commit.
Malformed records go to the dead-letter topic and processing continues.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import ssl
import time
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Protocol, cast

import faust
import orjson
from aiokafka.errors import KafkaError
from faust.exceptions import ProducerSendError
from faust.stores.base import Store as StoreBase
from faust.streams import _current_event
from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.types import TP

from policy.load import PolicyError
from policy.selectors import SelectorError
from streams.batch import (
    ENDPOINTS_TABLE,
    MEMBERS_TABLE,
    PROFILES_TABLE,
    SELECTORS_TABLE,
    BatchWrites,
    MatchBatch,
    Row,
    partition_of_endpoint_key,
    partition_of_profile_key,
)
from streams.compile import (
    CompileState,
    SelectorRef,
    split_selector_message_key,
)
from streams.consumer import BulkSink
from streams.consumer import Consumer as StreamsConsumer
from streams.localstate import LocalState
from streams.membership import Delta, PartitionState
from streams.metrics import LoopWatch, StreamsMetrics, behind
from topics.codec import dead_letter, decode_as, decode_key, encode
from topics.health import Health
from topics.records import (
    EndpointRecord,
    MembershipRecord,
    PolicyRecord,
    ProfileRecord,
    RecordError,
    split_membership_key,
)
from topics.specs import DEADLETTER, ENDPOINTS, MEMBERSHIPS, POLICIES, PROFILES, SELECTORS

__all__ = ["Processor", "StreamsConfig", "Transport", "create_app", "prepare_changelogs"]

log = logging.getLogger("portcullis.streams")
#: How often the processor beats, measures its lag and re-checks its readiness (s).
OBSERVE_INTERVAL = 1.0
#: How often the event loop's lag is measured, and the lag logged as a stall (s).
LOOP_TICK, LOOP_STALL = 0.25, 0.5


@dataclass(frozen=True)
class StreamsConfig:
    """What the processor needs to know; built from `portcullis.settings` by the CLI."""

    bootstrap: str = "127.0.0.1:9092"
    topic_prefix: str = "portcullis."
    partitions: int = 8
    replication_factor: int = 1
    store: str = "rocksdb://"  # memory:// in tests
    data_dir: str = "/var/lib/portcullis/streams"
    security_protocol: str = "PLAINTEXT"
    ssl_context: ssl.SSLContext | None = None
    sasl_mechanism: str | None = None
    sasl_username: str | None = None
    sasl_password: str | None = None
    app_id: str | None = None  # consumer group; default <prefix>streams
    #: Group session timeout (s). Faust's 60 s default also makes joins slow on Tansu, which
    #: completes a JoinGroup only after about half of it; tests use 2 s.
    session_timeout: float = 60.0
    #: How long the producer waits to batch messages (s). Measured on Kafka with 20,000
    #: endpoints: 5 ms gives ~2,150 events per worker CPU-second, 10 ms ~2,250, 20 ms
    #: ~2,750 (50 ms no better); it adds about its own length to the latency at low rates.
    producer_linger: float = 0.02
    #: Table writes that may wait to be produced before the agents pause (Faust: 100).
    producer_buffer: int = 10_000
    #: Longest time (s) the broker may hold a fetch open waiting for new records. Faust
    #: hard-codes 1.5 s: Apache Kafka answers as soon as a record arrives, but Tansu holds
    #: every fetch for the full wait, which then is the latency of a quiet partition.
    fetch_max_wait: float = 0.02
    #: Most match events processed as one batch (of what one fetch brought): decoded and
    #: applied in order, their table writes coalesced and sent as one record batch per
    #: table and partition. 1 processes one event at a time.
    batch_size: int = 1000
    #: Evaluate every selector for every endpoint (no label index): the benchmark baseline.
    brute_force: bool = False

    def broker_credentials(self) -> Any:
        """Faust credentials for the configured security protocol (None: plaintext)."""
        if self.security_protocol == "PLAINTEXT":
            return None
        if self.security_protocol == "SSL":
            return faust.SSLCredentials(self.ssl_context or ssl.create_default_context())
        if self.security_protocol in ("SASL_PLAINTEXT", "SASL_SSL"):
            context = None
            if self.security_protocol == "SASL_SSL":
                context = self.ssl_context or ssl.create_default_context()
            return faust.SASLCredentials(
                username=self.sasl_username,
                password=self.sasl_password,
                ssl_context=context,
                mechanism=self.sasl_mechanism or "PLAIN",
            )
        raise ValueError(f"unsupported security protocol {self.security_protocol!r}")


class FlushHook(Protocol):
    """Told when a producer flush starts and when it has completed (see `LocalState`)."""

    def begin_flush(self) -> Any: ...

    def end_flush(self, token: Any) -> None: ...


class BatchProducer(Protocol):
    """What the processor sends its table writes with (`_Producer`; fakes in tests)."""

    async def send_batches(
        self, topic: str, partition: int, records: list[tuple[bytes, bytes | None]]
    ) -> list[tuple[asyncio.Future[Any], int]]: ...


class _Producer(faust_aiokafka.Producer):
    """Faust's producer, telling the transport's flush hooks when a flush starts and ends,
    and sending a group of records as whole record batches.

    Faust flushes before it commits offsets and before it gives partitions away, so a
    completed flush is the moment every write queued before it began is in the
    changelogs. A write still waiting for room in the producer's buffer is not: the
    processor tells its `LocalState` when a write is queued.
    """

    async def send_batches(
        self, topic: str, partition: int, records: list[tuple[bytes, bytes | None]]
    ) -> list[tuple[asyncio.Future[Any], int]]:
        """Queue `records` for one partition, in order, as few record batches as fit.

        One future per batch instead of one per record: aiokafka's per-message `send`
        (a future, a metadata lookup and a loop lookup each) was a fifth of the worker's
        time. Returns (future of the batch's first offset, records in it) per batch; the
        batches are closed, so the sender takes them at once (no linger).
        """
        producer = self._ensure_producer()
        sent: list[tuple[asyncio.Future[Any], int]] = []
        batch, count = producer.create_batch(), 0
        for key, value in records:
            if batch.append(timestamp=None, key=key, value=value) is None:
                if count == 0:
                    raise _too_large(topic, value)
                sent.append((await self._queue(producer, batch, topic, partition), count))
                batch, count = producer.create_batch(), 0  # full: the next starts with it
                if batch.append(timestamp=None, key=key, value=value) is None:
                    raise _too_large(topic, value)
            count += 1
        if count:
            sent.append((await self._queue(producer, batch, topic, partition), count))
        return sent

    @staticmethod
    async def _queue(producer: Any, batch: Any, topic: str, partition: int) -> Any:
        batch.close()
        try:
            return await producer.send_batch(batch, topic, partition=partition)
        except KafkaError as exc:
            raise ProducerSendError(f"Error while sending: {exc!r}") from exc

    async def flush(self) -> None:
        hooks = list(getattr(self.transport, "flush_hooks", ()))
        tokens = [hook.begin_flush() for hook in hooks]
        await super().flush()
        await asyncio.sleep(0)  # let the done-callbacks of the last sends run
        failed = getattr(self.transport, "failed_write", None)
        if failed is not None:
            # Faust commits offsets right after a flush: a lost table write must stop that,
            # so the worker crashes and the events are processed again after a restart.
            raise ChangelogWriteFailed(
                f"a table write never reached its changelog: {failed!r}"
            ) from failed
        for hook, token in zip(hooks, tokens, strict=True):
            hook.end_flush(token)


class RawSchema(faust.Schema[bytes, bytes]):
    """Keys and values as the bytes on the wire, without Faust's codec chain per record.

    The inputs are our own JSON, decoded and validated by the processor (`topics.codec`),
    so Faust's raw codecs only copied bytes to bytes: on the match agent's hot path their
    lookups cost about 5% of the worker's CPU.
    """

    def __init__(self) -> None:
        super().__init__(key_type=bytes, value_type=bytes, key_serializer="raw",
                         value_serializer="raw")

    def compile(self, app: Any, **_options: Any) -> Any:
        create_event = app.create_event

        async def decode(message: Any, *, propagate: bool = False) -> Any:
            return create_event(message.key, message.value, message.headers, message)

        return decode


class ChangelogWriteFailed(RuntimeError):
    """A changelog record failed after the producer's retries; offsets must not be committed."""


class Transport(faust_aiokafka.Transport):
    """Faust's aiokafka transport with `streams.consumer`'s consumer (waits at most
    `fetch_max_wait` s, recovers to true end offsets, never drops a fetched record) and a
    producer that tells the flush hooks.

    Installed per app (``app.transport = Transport(...)``), not registered as a URL scheme,
    so nothing global changes.
    """

    Consumer = StreamsConsumer
    Producer = _Producer

    def __init__(self, *args: Any, fetch_max_wait: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if fetch_max_wait < 0:
            raise ValueError(f"fetch_max_wait must not be negative, got {fetch_max_wait:g}")
        self.fetch_max_wait_ms = round(fetch_max_wait * 1000)
        self.flush_hooks: list[FlushHook] = []
        #: Called after every successful offset commit.
        self.commit_hooks: list[Callable[[], None]] = []
        #: The first changelog write that failed after the producer's retries, if any.
        self.failed_write: BaseException | None = None
        #: Topic name -> the sink its records go to in bulk (see `streams.consumer`).
        self.bulk_sinks: dict[str, BulkSink] = {}


@dataclass
class _Rows:
    """One match partition's raw table rows, waiting for the partition's first event."""

    endpoints: list[bytes] = field(default_factory=list)
    profiles: list[bytes] = field(default_factory=list)
    selectors: list[tuple[str, int, str]] = field(default_factory=list)
    members: list[tuple[str, bytes]] = field(default_factory=list)


def _own_members(rows: Iterable[tuple[str, bytes]]) -> tuple[list[MembershipRecord], list[str]]:
    """Decode the members table's rows (ours: not validated again); keys of unreadable ones."""
    members: list[MembershipRecord] = []
    unreadable: list[str] = []
    for key, value in rows:
        try:
            members.append(MembershipRecord.from_own_json(value))
        except RecordError as exc:
            log.error("members table row %s is unreadable (%s): republishing it", key, exc)
            unreadable.append(key)
    return members, unreadable


class Processor:
    """Owns the Faust app, its topics and tables, and the per-partition pure states.

    ``health``: beaten every second by a timer of the app (if it registered a ``main``
    loop) and told whether the worker is ready: its tables recovered and its assigned
    input partitions processed up to the end offsets seen when they were assigned.
    """

    def __init__(self, config: StreamsConfig, health: Health | None = None) -> None:
        self.config = config
        self.metrics = StreamsMetrics()
        self.health = health or Health("processor")
        self.health.set("recovered", False, "starting")
        self.health.set("caught_up", False, "starting")
        #: (topic, partition) -> the offset after the last input record processed
        self._processed: dict[tuple[str, int], int] = {}
        self._assigned: frozenset[TP] | None = None
        self._targets: dict[tuple[str, int], int] = {}
        self._starts: dict[tuple[str, int], int] = {}
        self._caught_up = False
        prefix = config.topic_prefix
        self.partitions = config.partitions
        self.app = faust.App(
            config.app_id or f"{prefix}streams",
            broker=[f"kafka://{host.strip()}" for host in config.bootstrap.split(",")],
            broker_credentials=config.broker_credentials(),
            store=config.store,
            datadir=config.data_dir,
            topic_partitions=config.partitions,
            topic_replication_factor=config.replication_factor,
            key_serializer="raw",
            value_serializer="raw",
            web_enabled=False,
            consumer_auto_offset_reset="earliest",
            table_standby_replicas=0,
            topic_allow_declare=True,
            producer_acks=-1,
            producer_linger=config.producer_linger,
            producer_max_batch_size=512 * 1024,
            # A deeper stream buffer with bounded polls: 7 interleaved runs on Kafka, 20,000
            # endpoints, median 2,750 -> 3,050 events per worker CPU-second (4,096 / None).
            stream_buffer_maxsize=16_384,
            broker_max_poll_records=2_000,
            broker_session_timeout=config.session_timeout,
            broker_heartbeat_interval=max(0.3, min(3.0, config.session_timeout / 5)),
        )
        app = self.app
        # Our transport, set before anything (topics, tables) makes Faust create its own.
        app.transport = Transport(
            app.conf.broker_consumer, app, fetch_max_wait=config.fetch_max_wait
        )
        # Faust stalls the agent whenever more than 100 table writes wait to be produced,
        # then drains them 100 at a time: with several writes per event that caps
        # throughput. A larger buffer lets the producer batch instead.
        app.producer.buffer.max_messages = config.producer_buffer

        def topic(name: str, compact: bool = False) -> Any:
            return app.topic(
                name,
                schema=RawSchema(),
                partitions=config.partitions,
                compacting=compact or None,
                internal=False,
            )

        self.policies_name = POLICIES.name(prefix)
        self.endpoints_name = ENDPOINTS.name(prefix)
        self.profiles_name = PROFILES.name(prefix)
        self.selectors_name = SELECTORS.name(prefix)
        self.memberships_name = MEMBERSHIPS.name(prefix)
        self.policies_topic = topic(self.policies_name)
        self.selectors_topic = topic(self.selectors_name)
        self.match_topic = app.topic(
            self.endpoints_name, self.profiles_name, self.selectors_name, schema=RawSchema()
        )
        self.deadletter_topic = app.topic(
            DEADLETTER.name(prefix), key_type=bytes, value_type=bytes, partitions=1
        )

        def table(name: str, **kwargs: Any) -> Any:
            return app.Table(
                name,
                key_type=bytes,
                value_type=bytes,
                partitions=config.partitions,
                **kwargs,
            )

        self.policy_refs = table("policy-refs")
        self.endpoints = table("endpoints")
        self.profiles = table("profiles")
        self.selectors = table("selectors")
        self.members = table(
            "members",
            changelog_topic=app.topic(
                self.memberships_name,
                key_type=bytes,
                value_type=bytes,
                partitions=config.partitions,
                compacting=True,
                internal=False,
            ),
        )
        self._compile_states: dict[int, CompileState] = {}
        self._match_states: dict[int, PartitionState] = {}
        self._unbuilt: dict[int, _Rows] | None = None  # rows of partitions not built yet
        self.processed = 0
        #: Crash bookkeeping of the local (rocksdb) tables, and the member keys a crashed
        #: run may have left wrong on the topic (see `attach_local_state`).
        self.local_state: LocalState | None = None
        self.suspects: set[str] = set()

        app.agent(self.policies_topic, name="compile")(self._compile_agent)
        app.topics.add(self.match_topic)  # subscribed; its records go to the bulk sink
        app.transport.bulk_sinks.update(
            dict.fromkeys(self.match_topic.topics, self._match_records))
        app.timer(OBSERVE_INTERVAL, name="observe")(self._observe)
        self.loop_watch = LoopWatch(LOOP_TICK, LOOP_STALL)
        app.timer(LOOP_TICK, name="loop-watch")(self._watch_loop)
        self.inputs = {self.policies_name: "policies", self.endpoints_name: "endpoints",
                       self.profiles_name: "profiles", self.selectors_name: "selectors"}
        app.transport.commit_hooks.append(
            lambda: self.metrics.last_commit.set(time.time()))

        @app.on_partitions_revoked.connect  # type: ignore[arg-type]
        async def _revoked(sender: Any, revoked: set[TP], **kwargs: Any) -> None:
            self._forget(revoked)

        @app.on_partitions_assigned.connect  # type: ignore[arg-type]
        async def _assigned(sender: Any, assigned: set[TP], **kwargs: Any) -> None:
            self._forget(assigned)

    def attach_local_state(self, local_state: LocalState) -> None:
        """Keep crash bookkeeping for local tables that survive restarts (rocksdb).

        Every members write is noted in its intent log first; every producer flush
        rotates the log; the opened state's suspects (keys a crashed run may have left
        wrong on the topic) are republished from the inputs when their partition is
        rebuilt, once: our copy loses a key when it is republished, the bookkeeping's
        only when that has been flushed.
        """
        self.local_state = local_state
        self.suspects = set(local_state.suspects)
        cast(Transport, self.app.transport).flush_hooks.append(local_state)

    def changelog_topics(self) -> list[str]:
        """The changelog topics Faust names for our own tables (memberships excluded).

        Create them before the worker starts (`prepare_changelogs`): when Faust creates
        them itself, Kafka answers CreateTopics before its metadata lists the topic, and
        Faust then crashes the agent with a partition-count mismatch.
        """
        tables = (self.policy_refs, self.endpoints, self.profiles, self.selectors)
        return [table.changelog_topic.get_topic_name() for table in tables]

    def _forget(self, tps: Iterable[TP]) -> None:
        """Drop cached states of these partitions: they are rebuilt from the tables."""
        self._unbuilt = None  # the tables change in a rebalance: group their rows again
        for tp in tps:
            if tp.topic == self.policies_name:
                self._compile_states.pop(tp.partition, None)
            elif tp.topic in (self.endpoints_name, self.profiles_name, self.selectors_name):
                self._match_states.pop(tp.partition, None)

    # ------------------------------------------------------------------ dead letters

    async def _reject(self, msg: Any, error: BaseException, agent: str) -> None:
        log.warning("%s[%d]@%d rejected: %s", msg.topic, msg.partition, msg.offset, error)
        record = dead_letter(
            msg.topic, msg.partition, msg.offset, msg.key, msg.value, error, f"streams.{agent}"
        )
        await self.deadletter_topic.send(key=msg.key, value=encode(record), partition=0)
        self.metrics.dead_letters.inc()
        self._done(msg)

    def _done(self, msg: Any) -> None:
        """An input record is processed (or rejected): count it, note how far we are."""
        self._done_all((msg,))

    def _done_all(self, msgs: Iterable[Any]) -> None:
        """`_done` for a batch: the counters are added to once per topic."""
        processed, counts = self._processed, collections.Counter[str]()
        for msg in msgs:
            processed[(msg.topic, msg.partition)] = msg.offset + 1
            counts[msg.topic] += 1
        for topic, count in counts.items():
            self.metrics.records.inc(count, topic=self.inputs.get(topic, topic))
        self.metrics.last_record.set(time.time())

    # ------------------------------------------------------------------ health

    async def _watch_loop(self) -> None:
        """Measure how late this tick ran; log a stall (see `LoopWatch`)."""
        late, stalled = self.loop_watch.tick(time.monotonic())
        self.metrics.loop_lag.set(late)
        if stalled:
            self.metrics.loop_stalls.inc()
            log.warning("the event loop was blocked for %.2f s (CPU work, a garbage "
                        "collection, or a starved or paused machine)", late)

    async def _observe(self) -> None:
        """Beat, measure the lag per partition, and say whether this worker is ready."""
        if "main" in self.health.beats:
            self.health.beat("main")
        app = self.app
        if not cast(Any, app.tables).recovery.completed.is_set():
            self.health.set("recovered", False, "recovering the tables from their changelogs")
            self.health.set("caught_up", False, "waiting for the recovery")
            return
        self.health.set("recovered", True, "tables recovered")
        assigned = frozenset(tp for tp in app.consumer.assignment() if tp.topic in self.inputs)
        self.metrics.assigned.set(len(assigned))
        if assigned != self._assigned:
            try:
                await self._assignment_changed(assigned)
            except Exception as exc:  # a rebalance under way: measure again next time
                log.info("end offsets of the new assignment not read yet: %r", exc)
                self.health.set("caught_up", False, "reading the end offsets of the assignment")
                return
        for tp in assigned:
            highwater = app.consumer.highwater(tp)
            if highwater is not None:
                key = (tp.topic, tp.partition)
                at = max(self._processed.get(key, 0), self._starts.get(key, 0))
                self.metrics.lag.set(max(0, highwater - at), topic=tp.topic,
                                     partition=tp.partition)
        left = behind(self._targets, self._starts, self._processed)
        remaining = sum(left.values())
        self._caught_up = self._caught_up or remaining == 0
        if self._caught_up:
            self.health.set("caught_up", True, f"processed to the end offsets seen at "
                            f"assignment on {len(assigned)} input partition(s)")
        else:
            partitions = sum(1 for n in left.values() if n)
            self.health.set("caught_up", False, f"{remaining} record(s) to process before the "
                            f"end offsets seen at assignment, on {partitions} partition(s)")

    async def _assignment_changed(self, assigned: frozenset[TP]) -> None:
        for key in list(self.metrics.lag.values):
            self.metrics.lag.values.pop(key)
        ends = await self.app.consumer.highwaters(*assigned) if assigned else {}
        committed = dict(getattr(self.app.consumer, "committed_at_seek", {}))
        self._targets = {(tp.topic, tp.partition): end for tp, end in ends.items()}
        self._starts = {(tp.topic, tp.partition): offset or 0 for tp, offset in committed.items()
                        if (tp.topic, tp.partition) in self._targets}
        self._assigned = assigned
        self._caught_up = False

    # ------------------------------------------------------------------ compile

    def _compile_state(self, partition: int) -> CompileState:
        state = self._compile_states.get(partition)
        if state is None:
            state = CompileState(partition, self.partitions)
            refs: dict[str, list[SelectorRef]] = {}
            for raw_key, raw in self.policy_refs.items():
                key = raw_key.decode()
                if partition_of_endpoint_key(key, self.partitions) == partition:
                    refs[key] = [SelectorRef.from_json(item) for item in orjson.loads(raw)]
            state.restore(refs)
            self._compile_states[partition] = state
            log.info("compile partition %d: restored %d policies", partition, len(refs))
        return state

    async def _compile_agent(self, stream: Any) -> None:
        async for event in stream.events():
            msg = event.message
            try:
                key = decode_key(msg.key)
                record = decode_as(PolicyRecord, msg.value)
                state = self._compile_state(msg.partition)
                observed_at = record.observed_at if record is not None else time.time()
                regs = state.apply_policy(key, record, observed_at)
            except (RecordError, PolicyError, SelectorError) as exc:
                await self._reject(msg, exc, "compile")
                continue
            pending = []
            for reg in regs:
                value = encode(reg.record) if reg.record is not None else None
                pending.append(
                    await self.selectors_topic.send(
                        key=reg.key.encode(), value=value, partition=reg.partition, force=True
                    )
                )
            for fut in pending:
                await fut  # acknowledged before the table says it was done
            for reg in regs:
                self.metrics.published.inc(
                    topic="selectors", op="tombstone" if reg.record is None else "upsert")
            # as every table write here (see `_write`); a tombstone even if the row is gone:
            # a crash may have lost the last one
            refs = state.refs.get(key)
            value = orjson.dumps([ref.to_json() for ref in refs]) if refs is not None else None
            await self._write(self.policy_refs, key.encode(), value, msg.partition, force=True)
            self.processed += 1
            self._done(msg)

    # ------------------------------------------------------------------ match

    def _match_state(self, partition: int) -> tuple[PartitionState, list[Delta], list[Delta]]:
        """The partition's state, rebuilt from the tables on its first event after a rebalance.

        Returns the state, the resync deltas, and the republished suspects (to be written
        even where the table agrees, see `attach_local_state`).
        """
        state = self._match_states.get(partition)
        if state is not None:
            return state, [], []
        if self._unbuilt is None:
            self._unbuilt = self._rows_by_partition()
        rows = self._unbuilt.pop(partition, None) or _Rows()
        state = PartitionState(brute_force=self.config.brute_force)
        endpoints = [e for v in rows.endpoints if (e := decode_as(EndpointRecord, v)) is not None]
        profiles = [p for v in rows.profiles if (p := decode_as(ProfileRecord, v)) is not None]
        members, unreadable = _own_members(rows.members)
        state.restore(endpoints, profiles, rows.selectors, members)
        now = time.time()
        deltas = state.resync(now)
        suspects = [k for k in self.suspects if self._partition_of_member(k) == partition]
        suspects += unreadable  # whatever they hold, state the truth again
        republished = state.republish(suspects, now) if suspects else []
        self._match_states[partition] = state
        log.info(
            "match partition %d: restored %d endpoints, %d profiles, %d selectors, %d members;"
            " resync changed %d, republished %d",
            partition, len(endpoints), len(profiles), len(rows.selectors), len(members),
            len(deltas), len(republished),
        )
        return state, deltas, republished

    def _rows_by_partition(self) -> dict[int, _Rows]:
        """Every table row, grouped by match partition, in one pass over each table.

        Rebuilding partition by partition would read every table once per partition; at
        20,000 endpoints and 120,000 members that took over a second per partition.
        """
        n = self.partitions
        rows: dict[int, _Rows] = {p: _Rows() for p in range(n)}
        for k, v in self.endpoints.items():
            rows[partition_of_endpoint_key(k.decode(), n)].endpoints.append(v)
        for k, v in self.profiles.items():
            rows[partition_of_profile_key(k.decode(), n)].profiles.append(v)
        for k, v in self.selectors.items():
            target, _, selector_key = k.decode().partition("/")
            uid, source = split_selector_message_key(selector_key)
            if int(target) in rows:
                rows[int(target)].selectors.append((uid, source, v.decode()))
        for k, v in self.members.items():
            key = k.decode()
            rows[self._partition_of_member(key)].members.append((key, v))
        return rows

    def _partition_of_member(self, key: str) -> int:
        _uid, endpoint_key = split_membership_key(key)
        return partition_of_endpoint_key(endpoint_key, self.partitions)

    async def _match_records(self, batches: list[tuple[TP, list[Any]]]) -> None:
        """The match topics' bulk sink: one fetch's records, in batches of `batch_size`.

        Each batch's offsets are acknowledged once it is processed; Faust commits them only
        after a producer flush, so every output is on its changelog before its input's
        offset is committed (at least once, as one event at a time was). The consumer
        hands records on only while their assignment is current, and a rebalance waits for
        this call to return.
        """
        records = [record for _tp, batch in batches for record in batch]
        size = self.config.batch_size
        consumer = cast(StreamsConsumer, self.app.consumer)
        for start in range(0, len(records), size):
            chunk = records[start:start + size]
            await self._match_batch(chunk)
            offsets: dict[tuple[str, int], list[int]] = collections.defaultdict(list)
            for record in chunk:
                offsets[(record.topic, record.partition)].append(record.offset)
            for (topic, partition), done in offsets.items():
                consumer.ack_offsets(TP(topic, partition), done)

    async def _match_batch(self, records: Iterable[Any]) -> None:
        """Apply a batch of match records in order, then write what they changed, coalesced."""
        batch = MatchBatch(self.partitions)
        rejected: list[tuple[Any, BaseException]] = []
        republished: list[Delta] = []
        applied: list[Any] = []
        for msg in records:
            try:
                self._match_event(batch, msg, republished)
            except (RecordError, SelectorError) as exc:
                rejected.append((msg, exc))
                continue
            applied.append(msg)
            self.processed += 1
        await self._write_batch(batch.writes)
        self._settle(republished)  # once queued: see LocalState.settle
        self._done_all(applied)
        for bad, error in rejected:
            await self._reject(bad, error, "match")

    def _match_event(self, batch: MatchBatch, msg: Any, republished: list[Delta]) -> None:
        """Apply one event to its partition's state (rebuilt first if need be), collecting
        the writes in `batch` and the republished suspects in `republished`."""
        partition = msg.partition
        key = decode_key(msg.key)
        state, deltas, suspects = self._match_state(partition)
        batch.writes.put_members(partition, deltas)
        batch.writes.put_members(partition, suspects, force=True)
        republished += suspects
        if msg.topic == self.endpoints_name:
            batch.endpoint(state, partition, key, msg.value)
        elif msg.topic == self.profiles_name:
            batch.profile(state, partition, key, msg.value)
        else:
            batch.selector(state, partition, key, msg.value)

    async def _write_batch(self, writes: BatchWrites) -> None:
        """Store each group of rows and send it to its changelog (see `_write`).

        Faust's rocksdb store takes the partition of a write from the task's current
        event, which Faust sets only while a stream hands out one event at a time: a
        stand-in naming the partition is set around each group's store writes.
        """
        tables = {ENDPOINTS_TABLE: self.endpoints, PROFILES_TABLE: self.profiles,
                  SELECTORS_TABLE: self.selectors, MEMBERS_TABLE: self.members}
        for name, partition, rows in writes.groups():
            table = tables[name]
            at = _PartitionEvent(partition)
            token = _current_event.set(weakref.ref(cast(Any, at)))
            try:
                records = self._store_rows(table, rows)
            finally:
                _current_event.reset(token)
            await self._send_records(table, partition, records)

    async def _write(
        self, table: Any, key: bytes, value: bytes | None, partition: int, force: bool = False
    ) -> None:
        """Write a table row and send it to the table's changelog, as a Faust table write does.

        Faust's own path (``table[key] = value``) costs about ten times more per write:
        it wraps every write in a future message, queues it in a buffer that a task
        drains one message per loop iteration, and makes the consumer wait on that buffer.
        Here the store is written at once and the record goes straight to the app's
        producer (same topic, same partition: the event's, as Faust's table would choose),
        in one record batch with the other rows of its group when `_write_batch` writes it.
        The guarantees are Faust's: the producer is flushed before any offset is
        committed, and a table recovers from the changelog it always did.

        A tombstone for a row that is not in the store is skipped, unless `force`:
        input tables and policy refs always send it, because a crashed run may have
        deleted the row locally without producing its tombstone (the event that did it
        is processed again, and must finish the job).
        """
        records = self._store_rows(table, {key: Row(value, force)})
        await self._send_records(table, partition, records)

    def _store_rows(self, table: Any, rows: dict[bytes, Row]) -> list[tuple[bytes, bytes | None]]:
        """Write rows to the table's store; return the records to send (see `_write`)."""
        store = table.data
        local_state = self.local_state if table is self.members else None
        records: list[tuple[bytes, bytes | None]] = []
        for key, row in rows.items():
            value = row.value
            present = value is None and key in store  # only a tombstone needs to know
            if value is None and not (present or row.force):
                continue
            if local_state is not None:
                local_state.note(key)  # before the store: see streams.localstate
            if value is not None:
                store[key] = value
            elif present:
                del store[key]
            records.append((key, value))
        return records

    async def _send_records(
        self, table: Any, partition: int, records: list[tuple[bytes, bytes | None]]
    ) -> None:
        if not records:
            return
        topic = table.changelog_topic.get_topic_name()
        producer = cast(BatchProducer, self.app.producer)
        sent = await producer.send_batches(topic, partition, records)
        if table is self.members and self.local_state is not None:
            self.local_state.queued(key for key, _value in records)  # see LocalState.note
        for fut, _count in sent:
            fut.add_done_callback(self._check_sent)
        last, count = sent[-1]
        self._persist_on_ack(table, last, count - 1)
        if table is self.members:
            tombstones = sum(1 for _key, value in records if value is None)
            published = self.metrics.published
            published.inc(len(records) - tombstones, topic="memberships", op="upsert")
            published.inc(tombstones, topic="memberships", op="tombstone")
        self.metrics.last_publish.set(time.time())

    def _check_sent(self, sent: asyncio.Future[Any]) -> None:
        """Remember a changelog write that failed: the next flush refuses to let Faust commit."""
        if sent.cancelled():
            error: BaseException | None = asyncio.CancelledError("changelog write cancelled")
        else:
            error = sent.exception()
        transport = cast(Transport, self.app.transport)
        if error is not None:
            self.metrics.errors.inc()
        if error is not None and transport.failed_write is None:
            log.error("changelog write failed after the producer's retries: %r", error)
            transport.failed_write = error

    def _persist_on_ack(self, table: Any, sent: asyncio.Future[Any], later: int = 0) -> None:
        """Once acknowledged, a persistent store records the changelog offset it holds.

        Offsets grow within a partition, so the last write of an event (or a batch)
        covers the ones before it; `later` is how many records the acknowledged one
        comes before (a record batch's future gives its first offset). The memory store
        keeps no offsets, so it needs no callback at all.
        """
        store = table.data
        if type(store).set_persisted_offset is not StoreBase.set_persisted_offset:
            sent.add_done_callback(partial(_record_persisted_offset, store, later))

    def _settle(self, republished: Iterable[Delta]) -> None:
        keys = {delta.key for delta in republished}
        self.suspects -= keys
        if self.local_state is not None:
            self.local_state.settle(keys)


class _PartitionEvent:
    """What Faust's rocksdb store reads of the current event: ``event.message.partition``."""

    __slots__ = ("__weakref__", "message", "partition")

    def __init__(self, partition: int) -> None:
        self.partition = partition
        self.message = self


def _too_large(topic: str, value: bytes | None) -> ValueError:
    return ValueError(f"a {topic} record of {len(value or b'')} bytes is larger than a "
                      "record batch")


def _record_persisted_offset(store: Any, later: int, sent: asyncio.Future[Any]) -> None:
    """What Faust's table does once a changelog record is acknowledged (rocksdb keeps it)."""
    if sent.cancelled():
        return
    if sent.exception() is not None:
        return  # Processor._check_sent stops the next commit
    metadata = sent.result()
    store.set_persisted_offset(TP(metadata.topic, metadata.partition), metadata.offset + later)


async def prepare_changelogs(
    processor: Processor, kafka_kwargs: dict[str, Any], timeout: float = 30.0
) -> None:
    """Create the tables' compacted changelog topics and wait until metadata lists them."""
    import contextlib

    from aiokafka.admin import AIOKafkaAdminClient, NewTopic
    from aiokafka.errors import TopicAlreadyExistsError

    names = processor.changelog_topics()
    partitions = processor.partitions
    admin = AIOKafkaAdminClient(**kafka_kwargs)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        wanted = [
            NewTopic(
                name,
                partitions,
                processor.config.replication_factor,
                topic_configs={"cleanup.policy": "compact"},
            )
            for name in names
            if name not in existing
        ]
        if wanted:
            with contextlib.suppress(TopicAlreadyExistsError):  # another worker was first
                await admin.create_topics(wanted)
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            described = await admin.describe_topics(names)
            counts = {d["topic"]: len(d.get("partitions") or ()) for d in described}
            if all(counts.get(name) == partitions for name in names):
                return
            if asyncio.get_running_loop().time() > deadline:
                raise RuntimeError(
                    f"changelog topics not ready after {timeout:g}s: "
                    + ", ".join(f"{n}: {counts.get(n, 0)} partitions" for n in names)
                    + f" (expected {partitions})"
                )
            await asyncio.sleep(0.2)
    finally:
        await admin.close()


def create_app(config: StreamsConfig) -> faust.App:
    """The Faust app for `config` (call ``.main()`` or run a worker on it)."""
    return Processor(config).app
