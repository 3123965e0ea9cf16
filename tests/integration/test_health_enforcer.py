"""`portcullis enforce` (dry run) probed and scraped over real HTTP, on both brokers."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from aiokafka import AIOKafkaProducer

from portcullis.brokers import Broker, free_port
from portcullis.topics_admin import check_topics
from watchers import translate
from watchers.publisher import KafkaPublisher

sys.path.insert(0, os.path.dirname(__file__))
from observing import http, portcullis, probe, scrape, series, until

PARTITIONS = 2


def pod(name: str, ip: str) -> dict[str, object]:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": "shop", "labels": {"app": "web"}},
            "spec": {"nodeName": "node-1", "serviceAccountName": "default", "containers": []},
            "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}}


async def publish_pods(bootstrap: str, prefix: str, *pods: dict[str, object]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        await KafkaPublisher(producer, prefix).publish(
            [translate.pod_endpoint(p, time.time()) for p in pods])
    finally:
        await producer.stop()


async def test_enforcer_is_ready_once_synced_and_unhealthy_when_its_loop_is_wedged(
    broker: Broker, topic_prefix: str, tmp_path: Path
) -> None:
    port = free_port()
    log = tmp_path / "enforce.log"
    argv = ("enforce", "--dry-run", "--node", "node-1", "--bootstrap", broker.bootstrap,
            "--topic-prefix", topic_prefix, "--partitions", str(PARTITIONS),
            "--health-port", str(port), "--metrics-port", str(port), "--health-max-age", "2")
    async with portcullis(log, *argv):
        # no topics yet: alive (retrying), not ready, and the body says why
        status, body = await until(lambda: probe(port, "/readyz"), bool, log)
        assert status == 503 and "synced" in body["why"], body
        status, body = await until(lambda: probe(port, "/healthz"), bool, log)
        assert status == 200 and body["loops"]["main"]["ok"], body

        report = await check_topics({"bootstrap_servers": broker.bootstrap}, topic_prefix,
                                    PARTITIONS, create=True)
        assert report.ok, report.lines()
        status, body = await until(lambda: probe(port, "/readyz"),
                                   lambda a: a is not None and a[0] == 200, log)
        assert body["status"] == "ready"
        assert all(c["ok"] for c in body["conditions"].values()), body

        # records consumed and the lag per partition are scraped, and they move
        text = await scrape(port)
        before = series(text, "portcullis_enforcer_records_total").get('{topic="endpoints"}', 0)
        assert series(text, "portcullis_enforcer_consumer_lag"), text
        assert series(text, "portcullis_enforcer_last_program_timestamp_seconds")[""] > 0
        await publish_pods(broker.bootstrap, topic_prefix, pod("a", "10.1.0.1"),
                           pod("b", "10.1.0.2"))
        text = await until(lambda: scrape(port), lambda t: series(
            t, "portcullis_enforcer_records_total").get('{topic="endpoints"}', 0) >= before + 2,
            log)
        lags = series(text, "portcullis_enforcer_consumer_lag")
        assert any(f'topic="{topic_prefix}endpoints"' in k for k in lags), lags

        # a wedged main loop (test hook: its heartbeat freezes) turns /healthz to 503
        answer = await http(port, "/debug/stall?loop=main", "POST")
        assert answer is not None and answer[0] == 200, answer
        status, body = await until(lambda: probe(port, "/healthz"),
                                   lambda a: a is not None and a[0] == 503, log)
        assert "main loop silent" in body["why"], body
        assert body["loops"]["main"]["ok"] is False
