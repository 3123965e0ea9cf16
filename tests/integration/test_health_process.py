"""`portcullis process` probed and scraped over real HTTP, on both brokers: not ready while
it recovers and catches up, ready after; its series are there and move; a stalled loop
is unhealthy."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from portcullis.brokers import Broker, free_port

sys.path.insert(0, os.path.dirname(__file__))
from observing import http, portcullis, probe, scrape, series, until
from test_streams_membership import PARTITIONS, create_topics, namespace, pod, policy, publish

PODS = 300


def membership_upserts(text: str) -> float:
    return series(text, "portcullis_streams_published_total").get(
        '{topic="memberships",op="upsert"}', 0)


async def test_processor_is_ready_once_caught_up_and_its_metrics_move(
    broker: Broker, topic_prefix: str, tmp_path: Path
) -> None:
    await create_topics(broker.bootstrap, topic_prefix)
    backlog = [("profiles", "kns.shop", namespace("shop", {"team": "a"})),
               ("policies", "GlobalNetworkPolicy//to-web",
                policy("to-web", None, "all()", "app == 'web'"))]
    backlog += [("endpoints", f"pod/shop/p{i}", pod("shop", f"p{i}", f"10.2.{i // 250}.{i % 250}",
                                                    {"app": "web"})) for i in range(PODS)]
    await publish(broker.bootstrap, topic_prefix, backlog)
    port = free_port()
    log = tmp_path / "process.log"
    argv = ("process", "--store", "memory", "--data-dir", str(tmp_path / "data"),
            "--bootstrap", broker.bootstrap, "--topic-prefix", topic_prefix,
            "--partitions", str(PARTITIONS), "--session-timeout", "2",
            "--health-port", str(port), "--metrics-port", str(port), "--health-max-age", "3")
    async with portcullis(log, *argv):
        status, body = await until(lambda: probe(port, "/readyz"), bool, log)
        assert status == 503 and body["status"] == "not ready", body
        status, body = await until(lambda: probe(port, "/readyz"),
                                   lambda r: r is not None and r[0] == 200, log, timeout=120)
        assert body["conditions"]["recovered"]["ok"] and body["conditions"]["caught_up"]["ok"]
        status, body = await until(lambda: probe(port, "/healthz"), bool, log)
        assert status == 200, body

        # caught up means the whole backlog was processed, and the series say so
        text = await scrape(port)
        records = series(text, "portcullis_streams_records_total")
        assert records.get('{topic="endpoints"}', 0) >= PODS, records
        assert records.get('{topic="policies"}', 0) >= 1, records
        assert series(text, "portcullis_streams_assigned_partitions")[""] > 0
        assert series(text, "portcullis_streams_loop_lag_seconds")[""] >= 0  # measured
        lags = series(text, "portcullis_streams_consumer_lag")
        assert any(f'topic="{topic_prefix}endpoints"' in k for k in lags), text
        text = await until(lambda: scrape(port), lambda t: membership_upserts(t) >= PODS, log)
        before = membership_upserts(text)
        await until(lambda: scrape(port), lambda t: series(
            t, "portcullis_streams_last_commit_timestamp_seconds").get("", 0) > 0, log)

        await publish(broker.bootstrap, topic_prefix, [
            ("endpoints", "pod/shop/late", pod("shop", "late", "10.3.0.1", {"app": "web"}))])
        await until(lambda: scrape(port), lambda t: membership_upserts(t) > before, log)

        answer = await http(port, "/debug/stall?loop=main", "POST")
        assert answer is not None and answer[0] == 200, answer
        status, body = await until(lambda: probe(port, "/healthz"),
                                   lambda r: r is not None and r[0] == 503, log)
        assert "main loop silent" in body["why"], body
