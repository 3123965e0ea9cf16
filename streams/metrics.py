"""The processor's Prometheus metrics and readiness (the machinery is `topics.metrics` and
`topics.health`, shared by every process; `portcullis.observe` serves them)."""

from __future__ import annotations

from collections.abc import Mapping

from topics.metrics import Counter, Family, Gauge, exposition


class StreamsMetrics:
    """Every metric `portcullis process` exposes."""

    def __init__(self) -> None:
        self.records = Family(
            "portcullis_streams_records_total", "Input records processed, by topic.", ("topic",))
        self.published = Family(
            "portcullis_streams_published_total",
            "Records published, by topic and op (upsert, tombstone).", ("topic", "op"))
        self.dead_letters = Counter(
            "portcullis_streams_dead_letters_total",
            "Malformed input records sent to the dead-letter topic.")
        self.errors = Counter(
            "portcullis_streams_errors_total",
            "Changelog writes that failed after the producer's retries (the worker stops "
            "committing and crashes; its events are processed again).")
        self.lag = Family(
            "portcullis_streams_consumer_lag",
            "Input records on an assigned partition not processed yet.",
            ("topic", "partition"), kind="gauge")
        self.assigned = Gauge(
            "portcullis_streams_assigned_partitions", "Input partitions assigned to this worker.")
        self.last_commit = Gauge(
            "portcullis_streams_last_commit_timestamp_seconds",
            "When offsets were last committed (Unix time).")
        self.last_publish = Gauge(
            "portcullis_streams_last_publish_timestamp_seconds",
            "When a record was last handed to the producer (Unix time).")
        self.last_record = Gauge(
            "portcullis_streams_last_record_timestamp_seconds",
            "When an input record was last processed (Unix time).")
        self.loop_lag = Gauge(
            "portcullis_streams_loop_lag_seconds",
            "How late the last event-loop tick ran: time the loop was blocked (CPU work, "
            "a garbage collection, a starved or paused machine; waits on the broker do not "
            "count).")
        self.loop_stalls = Counter(
            "portcullis_streams_loop_stalls_total",
            "Event-loop ticks late by at least the stall threshold (each one also logged).")

    def expose(self) -> str:
        return exposition([
            self.records, self.published, self.dead_letters, self.errors, self.lag,
            self.assigned, self.last_commit, self.last_publish, self.last_record,
            self.loop_lag, self.loop_stalls])


class LoopWatch:
    """How late a periodic tick runs: that long, the event loop could run nothing.

    A stall of the processor's output with no loop lag was a wait (the broker, a commit);
    with as much loop lag, the process itself was blocked or not running.
    """

    def __init__(self, interval: float, stall_after: float) -> None:
        if interval <= 0 or stall_after <= 0:
            raise ValueError(f"interval and stall_after must be positive, got {interval:g}, "
                             f"{stall_after:g}")
        self.interval = interval
        self.stall_after = stall_after
        self.last: float | None = None

    def tick(self, now: float) -> tuple[float, bool]:
        """A tick at `now` (a monotonic clock): how late it ran, and whether that is a stall."""
        late = 0.0 if self.last is None else max(0.0, now - self.last - self.interval)
        self.last = now
        return late, late >= self.stall_after


def behind(targets: Mapping[tuple[str, int], int], starts: Mapping[tuple[str, int], int],
           processed: Mapping[tuple[str, int], int]) -> dict[tuple[str, int], int]:
    """Per partition, how many records remain before the end offset seen at assignment:
    processing resumes at the committed offset (`starts`) and moves to `processed` (the
    offset after the last record processed)."""
    out = {}
    for tp, target in targets.items():
        at = max(processed.get(tp, 0), starts.get(tp, 0))
        out[tp] = max(0, target - at)
    return out
