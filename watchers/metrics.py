"""The watchers' Prometheus metrics (the machinery is `topics.metrics`, shared by every
process; `portcullis.observe` serves them)."""

from __future__ import annotations

import time

from topics.metrics import Counter, Family, Gauge, exposition


class WatchMetrics:
    """Every metric `portcullis watch` exposes."""

    def __init__(self) -> None:
        self.published = Family(
            "portcullis_watch_published_records_total",
            "Records the brokers acknowledged, by topic (history copies included).", ("topic",))
        self.publish_failures = Counter(
            "portcullis_watch_publish_failures_total",
            "Batches the brokers did not take (retried by a relist).")
        self.last_publish = Gauge(
            "portcullis_watch_last_publish_timestamp_seconds",
            "When the brokers last acknowledged a batch (Unix time).")
        self.events = Family(
            "portcullis_watch_events_total",
            "Objects seen, by resource and type (LISTED for each object of a list).",
            ("resource", "type"))
        self.lists = Family("portcullis_watch_lists_total", "Lists completed, by resource.",
                            ("resource",))
        self.errors = Family(
            "portcullis_watch_errors_total",
            "List and watch failures (retried with backoff), by resource.", ("resource",))
        self.last_list = Family(
            "portcullis_watch_last_list_timestamp_seconds",
            "When a list of the resource last succeeded (Unix time).", ("resource",),
            kind="gauge")
        self.last_event = Family(
            "portcullis_watch_last_event_timestamp_seconds",
            "When a watch of the resource last delivered an event or bookmark (Unix time).",
            ("resource",), kind="gauge")
        self.rejected = Counter(
            "portcullis_watch_rejected_objects_total",
            "Objects that failed validation: not published, the last valid state kept.")
        self.leader = Gauge(
            "portcullis_watch_leader",
            "1 while this watcher holds the lease (or runs without leader election).")
        self.terms = Counter(
            "portcullis_watch_leader_terms_total", "Terms this watcher started as the leader.")

    def listed(self, resource: str, objects: int) -> None:
        self.lists.inc(resource=resource)
        self.events.inc(objects, resource=resource, type="LISTED")
        self.last_list.set(time.time(), resource=resource)

    def watched(self, resource: str, kind: str) -> None:
        if kind != "BOOKMARK":
            self.events.inc(resource=resource, type=kind)
        self.last_event.set(time.time(), resource=resource)

    def expose(self) -> str:
        return exposition([
            self.published, self.publish_failures, self.last_publish, self.events, self.lists,
            self.errors, self.last_list, self.last_event, self.rejected, self.leader,
            self.terms])
