"""The enforcer's Prometheus metrics (the machinery is `topics.metrics`, shared by every
process; `portcullis.observe` serves them)."""

from __future__ import annotations

from topics.metrics import (
    LATENCY_BUCKETS,
    Counter,
    Family,
    Gauge,
    Histogram,
    exposition,
)

__all__ = ["LATENCY_BUCKETS", "Counter", "EnforcerMetrics", "Family", "Gauge", "Histogram"]


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

        self.records = Family(
            "portcullis_enforcer_records_total", "Records consumed, by topic.", ("topic",))
        self.lag = Family(
            "portcullis_enforcer_consumer_lag", "Records on a partition not consumed yet.",
            ("topic", "partition"), kind="gauge")
        self.last_program = Gauge(
            "portcullis_enforcer_last_program_timestamp_seconds",
            "When the dataplane was last programmed successfully (Unix time).")
        self.last_record = Gauge(
            "portcullis_enforcer_last_record_timestamp_seconds",
            "When the last record was consumed (Unix time).")

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

    def all(self) -> list[Counter | Gauge | Histogram | Family]:
        return [self.latency, self.batches, self.member_ops, self.chains_written,
                self.resyncs, self.repairs, self.rereads, self.rejected, self.dead_letters,
                self.dead_letter_failures, self.refused_rules, self.errors,
                self.connected, self.in_sync, self.dns_answers, self.dns_ips_programmed,
                self.dns_hold, self.dns_slow_holds, self.dns_evictions, self.dns_expired,
                self.dns_names, self.dns_untrusted, self.dns_malformed, self.dns_errors,
                self.dns_published, self.dns_publish_failures, self.flow_events,
                self.flow_kernel_dropped, self.flow_records, self.flow_publish_failures,
                self.flow_overflow, self.flow_malformed, self.flow_errors, self.records,
                self.lag, self.last_program, self.last_record]

    def expose(self) -> str:
        return exposition(self.all())
