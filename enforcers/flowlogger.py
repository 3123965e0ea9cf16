"""Flow logs on a node: read what the flow-log rules copy to NFLOG, aggregate, publish.

Best effort, and never in the dataplane's way: NFLOG copies the first bytes of a
packet and lets it go at once, the socket is non-blocking and its reads are bounded
per wake-up, what the kernel could not deliver is counted
(``portcullis_enforcer_flow_kernel_dropped_total``), and if the group cannot be bound
the error is logged and counted and the enforcer goes on enforcing (without the rules).
Every ``interval`` seconds the aggregated attempts become `FlowRecord`s, handed to
``publish`` (the engine's background publisher: a slow broker never holds anything up).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from enforcers import render
from enforcers.flowlog import (
    FlowAggregator,
    FlowLogError,
    Names,
    decode_headers,
    decode_prefix,
    flow_event,
)
from enforcers.metrics import EnforcerMetrics
from enforcers.nflog import LoggedPacket, NfLog
from topics.records import FlowRecord, RecordError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FlowSettings:
    """Flow logging on a node: the NFLOG group, whether allowed attempts are logged too,
    the aggregation interval and its cap of distinct flows, the bytes copied per packet."""

    group: int = 20
    allowed: bool = False
    interval: float = 10.0
    max_per_interval: int = 10_000
    namespace: str | None = None
    copy_range: int = 80

    def __post_init__(self) -> None:
        if not 0 <= self.group <= 65535:
            raise ValueError(f"flow-log group must be 0-65535, got {self.group}")
        if self.interval <= 0:
            raise ValueError(f"flow interval must be positive, got {self.interval}")
        if self.max_per_interval < 1:
            raise ValueError(f"flows per interval must be at least 1, got "
                             f"{self.max_per_interval}")

    def rules(self) -> render.FlowLog:
        """What the states render (``EnforcerState(flows=...)``)."""
        return render.FlowLog(self.group, self.allowed)


class FlowLogger:
    """Reads one NFLOG group, aggregates per interval, hands records to ``publish``.

    ``names``: the policy and tier names behind the prefixes' tags now; ``local``: the
    local endpoints' keys by IP now (both asked for on every read, so keep them cheap)."""

    def __init__(
        self, node: str, settings: FlowSettings, metrics: EnforcerMetrics,
        names: Callable[[], Names], local: Callable[[], Mapping[str, str]],
        publish: Callable[[FlowRecord], None] | None = None,
    ) -> None:
        self.node = node
        self.settings = settings
        self.metrics = metrics
        self.names = names
        self.local = local
        self.publish = publish
        self.aggregator = FlowAggregator(settings.max_per_interval)
        self.nflog: NfLog | None = None
        self._lost = 0
        self._interval_started = time.time()

    def open(self) -> bool:
        """Bind the group; False (logged, counted) if it cannot be: flows are not logged."""
        try:
            self.nflog = NfLog(self.settings.group, self.settings.namespace,
                               self.settings.copy_range)
        except OSError as exc:
            self.metrics.flow_errors.inc()
            log.error("cannot bind NFLOG group %d for flow logs (%s): no flows are logged; "
                      "enforcement is unaffected", self.settings.group, exc)
            return False
        log.info("logging %s connection attempts on NFLOG group %d, every %.0f s",
                 "denied and allowed" if self.settings.allowed else "denied",
                 self.settings.group, self.settings.interval)
        return True

    def start(self, loop: asyncio.AbstractEventLoop) -> bool:
        if self.nflog is None and not self.open():
            return False
        assert self.nflog is not None
        loop.add_reader(self.nflog.fileno(), self.readable)
        return True

    def stop(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        if self.nflog is not None:
            if loop is not None:
                loop.remove_reader(self.nflog.fileno())
            self.nflog.close()
            self.nflog = None

    def readable(self) -> None:
        """Take what the socket holds (bounded per call: the loop is shared)."""
        if self.nflog is None:
            return
        try:
            packets = self.nflog.receive()
        except OSError as exc:
            self.metrics.flow_errors.inc()
            log.warning("reading NFLOG group %d failed: %s", self.settings.group, exc)
            return
        now = time.time()
        if packets:
            names, local = self.names(), self.local()
            for packet in packets:
                self.handle(packet, now, names, local)
        lost = self.nflog.lost
        if lost > self._lost:
            self.metrics.flow_kernel_dropped.inc(lost - self._lost)
            log.warning("the kernel dropped %d flow-log messages (we were behind)",
                        lost - self._lost)
            self._lost = lost

    def handle(self, packet: LoggedPacket, now: float, names: Names,
               local: Mapping[str, str]) -> None:
        """Aggregate one logged packet (one that is not ours is counted and skipped)."""
        self.metrics.flow_events.inc()
        try:
            decision = decode_prefix(packet.prefix, names)
            headers = decode_headers(packet.payload)
        except FlowLogError as exc:
            self.metrics.flow_malformed.inc()
            log.debug("skipped a flow-log message: %s", exc)
            return
        before = self.aggregator.overflowed + self.aggregator.lost
        self.aggregator.add(flow_event(headers, decision, now, local))
        if self.aggregator.overflowed + self.aggregator.lost > before:
            self.metrics.flow_overflow.inc()

    def tick(self, now: float) -> list[FlowRecord]:
        """End the interval if it is over: its records (published, if there is where)."""
        if now - self._interval_started < self.settings.interval:
            return []
        return self.flush(now)

    def flush(self, now: float) -> list[FlowRecord]:
        """End the interval now: its records (published, if there is where)."""
        self._interval_started = now
        try:
            records = self.aggregator.flush(self.node, now)
        except RecordError as exc:  # a bug, not bad input: never stop enforcing for it
            self.metrics.flow_errors.inc()
            log.error("flow records of this interval are lost: %s", exc)
            return []
        if self.publish is not None:
            for record in records:
                self.publish(record)
        return records
