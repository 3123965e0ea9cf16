"""Prometheus metrics without a dependency: counters, gauges, a histogram, a tiny HTTP server.

The text exposition format is simple enough that a hundred lines beat another
package on every node; ``/metrics`` is the only path served.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import math
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)


@dataclass
class Counter:
    name: str
    help: str
    value: float = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount

    def expose(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} counter",
                f"{self.name} {_num(self.value)}"]


@dataclass
class Gauge:
    name: str
    help: str
    value: float = 0.0

    def set(self, value: float) -> None:
        self.value = value

    def expose(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} gauge",
                f"{self.name} {_num(self.value)}"]


@dataclass
class Histogram:
    name: str
    help: str
    buckets: tuple[float, ...] = LATENCY_BUCKETS
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    n: int = 0
    samples: list[float] = field(default_factory=list)
    keep_samples: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * len(self.buckets)

    def observe(self, value: float) -> None:
        index = bisect.bisect_left(self.buckets, value)
        if index < len(self.counts):
            self.counts[index] += 1
        self.total += value
        self.n += 1
        if self.keep_samples and len(self.samples) < self.keep_samples:
            self.samples.append(value)

    def expose(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        running = 0
        for bound, count in zip(self.buckets, self.counts, strict=True):
            running += count
            lines.append(f'{self.name}_bucket{{le="{_num(bound)}"}} {running}')
        lines.append(f'{self.name}_bucket{{le="+Inf"}} {self.n}')
        lines.append(f"{self.name}_sum {_num(self.total)}")
        lines.append(f"{self.name}_count {self.n}")
        return lines


def _num(value: float) -> str:
    if math.isinf(value):
        return "+Inf"
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


class EnforcerMetrics:
    """Every metric the enforcer exposes."""

    def __init__(self) -> None:
        self.latency = Histogram(
            "portcullis_enforcer_programming_latency_seconds",
            "Time from a change's observed_at to its dataplane programming.",
            keep_samples=100_000,
        )
        self.batches = Counter("portcullis_enforcer_batches_total", "Dataplane transactions.")
        self.member_ops = Counter(
            "portcullis_enforcer_ipset_member_ops_total", "Ipset members added or removed."
        )
        self.chains_written = Counter(
            "portcullis_enforcer_chains_written_total", "iptables chains (re)written."
        )
        self.resyncs = Counter("portcullis_enforcer_resyncs_total", "Resyncs run.")
        self.repairs = Counter(
            "portcullis_enforcer_resync_repairs_total",
            "Set members and chains the resync found changed behind our back and repaired.",
        )
        self.rereads = Counter(
            "portcullis_enforcer_membership_rereads_total",
            "Times the memberships were read again because a pruned selector became a peer.",
        )
        self.rejected = Counter(
            "portcullis_enforcer_rejected_records_total", "Records that could not be used."
        )
        self.dead_letters = Counter(
            "portcullis_enforcer_dead_letters_total",
            "Rejected records this node owns, published to the dead-letter topic.",
        )
        self.dead_letter_failures = Counter(
            "portcullis_enforcer_dead_letter_failures_total",
            "Dead letters that could not be published (logged; enforcement went on).",
        )
        self.refused_rules = Counter(
            "portcullis_enforcer_refused_rules_total",
            "Policy rules the kernel refused, enforced fail-closed instead (logged).",
        )
        self.errors = Counter(
            "portcullis_enforcer_dataplane_errors_total", "Failed dataplane transactions."
        )
        self.connected = Gauge(
            "portcullis_enforcer_broker_connected", "1 while the brokers answer, else 0."
        )
        self.in_sync = Gauge(
            "portcullis_enforcer_in_sync", "1 once the topics were read to the end and programmed."
        )

        self.dns_answers = Counter(
            "portcullis_enforcer_dns_answers_total", "DNS answers of trusted servers learned.")
        self.dns_ips_programmed = Counter(
            "portcullis_enforcer_dns_ips_programmed_total",
            "Domain-set members added or changed from DNS answers (name and set each).")
        self.dns_hold = Histogram(
            "portcullis_enforcer_dns_hold_seconds",
            "How long a DNS answer was held for learning and programming.",
            buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.1, 0.5),
            keep_samples=100_000,
        )
        self.dns_slow_holds = Counter(
            "portcullis_enforcer_dns_slow_holds_total",
            "DNS answers held longer than the maximum hold (released all the same).")
        self.dns_evictions = Gauge(
            "portcullis_enforcer_dns_evicted_ips",
            "IPs evicted because a name had more than the maximum IPs per name.")
        self.dns_expired = Gauge(
            "portcullis_enforcer_dns_expired_ips", "Learned IPs whose TTL (and grace) ran out.")
        self.dns_names = Gauge(
            "portcullis_enforcer_dns_names", "Names with at least one valid learned IP.")
        self.dns_untrusted = Counter(
            "portcullis_enforcer_dns_untrusted_total",
            "Queued packets not from a trusted server's port 53 (learned nothing).")
        self.dns_malformed = Counter(
            "portcullis_enforcer_dns_malformed_total",
            "Queued packets or DNS messages that could not be decoded (released).")
        self.dns_published = Counter(
            "portcullis_enforcer_dns_published_total", "Learned answers published (dns topic).")
        self.dns_publish_failures = Counter(
            "portcullis_enforcer_dns_publish_failures_total",
            "Learned answers that could not be published (logged; enforcement went on).")
        self.dns_errors = Counter(
            "portcullis_enforcer_dns_errors_total",
            "DNS answers whose learning or programming failed (released, logged).")
        self.flow_events = Counter(
            "portcullis_enforcer_flow_events_total",
            "Logged first packets of connection attempts read from NFLOG.")
        self.flow_kernel_dropped = Counter(
            "portcullis_enforcer_flow_kernel_dropped_total",
            "Flow-log messages the kernel dropped because we were behind (never packets).")
        self.flow_records = Counter(
            "portcullis_enforcer_flow_records_published_total",
            "Flow records published (flows topic).")
        self.flow_publish_failures = Counter(
            "portcullis_enforcer_flow_publish_failures_total",
            "Flow records that could not be published (logged; enforcement went on).")
        self.flow_overflow = Counter(
            "portcullis_enforcer_flow_overflow_total",
            "Flow events past the per-interval cap of distinct flows, summed per decision "
            "only (reason \"overflow\") or, past that cap too, counted here alone.")
        self.flow_malformed = Counter(
            "portcullis_enforcer_flow_malformed_total",
            "NFLOG messages whose prefix or headers could not be read (skipped).")
        self.flow_errors = Counter(
            "portcullis_enforcer_flow_errors_total",
            "Flow-log failures: the NFLOG group could not be bound or read (enforcement "
            "went on; logged).")

    def all(self) -> list[Counter | Gauge | Histogram]:
        return [self.latency, self.batches, self.member_ops, self.chains_written,
                self.resyncs, self.repairs, self.rereads, self.rejected, self.dead_letters,
                self.dead_letter_failures, self.refused_rules, self.errors,
                self.connected, self.in_sync, self.dns_answers, self.dns_ips_programmed,
                self.dns_hold, self.dns_slow_holds, self.dns_evictions, self.dns_expired,
                self.dns_names, self.dns_untrusted, self.dns_malformed, self.dns_errors,
                self.dns_published, self.dns_publish_failures, self.flow_events,
                self.flow_kernel_dropped, self.flow_records, self.flow_publish_failures,
                self.flow_overflow, self.flow_malformed, self.flow_errors]

    def expose(self) -> str:
        lines: list[str] = []
        for metric in self.all():
            lines += metric.expose()
        return "\n".join(lines) + "\n"


async def serve(metrics: EnforcerMetrics, port: int, host: str = "0.0.0.0") -> asyncio.Server:
    """Serve ``GET /metrics`` on ``host:port`` until the returned server is closed."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readline(), 5)
            while (await asyncio.wait_for(reader.readline(), 5)).strip():
                pass
            path = request.split()[1].decode() if len(request.split()) > 1 else "/"
            if path.split("?")[0] == "/metrics":
                body = metrics.expose().encode()
                status = "200 OK"
            else:
                body, status = b"not found; try /metrics\n", "404 Not Found"
            writer.write(
                f"HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body
            )
            await writer.drain()
        except (TimeoutError, ConnectionError, IndexError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, host, port)
    log.info("metrics on http://%s:%d/metrics", host, port)
    return server
