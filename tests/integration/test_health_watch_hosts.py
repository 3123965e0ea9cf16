"""`portcullis watch hosts` probed and scraped over real HTTP."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from portcullis.brokers import Broker, free_port
from portcullis.topics_admin import check_topics

sys.path.insert(0, os.path.dirname(__file__))
from observing import http, portcullis, probe, scrape, series, until


def published(text: str) -> dict[str, float]:
    return series(text, "portcullis_watch_published_records_total")


async def test_the_hosts_watcher_is_ready_after_its_directory_and_counts_what_it_publishes(
    tansu_broker: Broker, topic_prefix: str, tmp_path: Path
) -> None:
    report = await check_topics({"bootstrap_servers": tansu_broker.bootstrap}, topic_prefix, 2,
                                create=True)
    assert report.ok, report.lines()
    inventory = tmp_path / "hosts"
    inventory.mkdir()
    (inventory / "vm1.yaml").write_text(
        "name: vm1\ninterfaces:\n  - name: eth0\n    ips: [10.30.0.1]\nlabels: {app: db}\n")
    port = free_port()
    log = tmp_path / "hosts.log"
    async with portcullis(log, "watch", "hosts", str(inventory), "--bootstrap",
                          tansu_broker.bootstrap, "--topic-prefix", topic_prefix,
                          "--partitions", "2", "--health-port", str(port),
                          "--metrics-port", str(port), "--health-max-age", "2"):
        status, body = await until(lambda: probe(port, "/readyz"),
                                   lambda r: r and r[0] == 200, log)
        assert "1 host file(s) published" in body["conditions"]["listed"]["detail"]
        text = await until(lambda: scrape(port), lambda t: published(t).get(
            '{topic="endpoints"}') == 1, log)
        assert published(text)['{topic="endpoints.history"}'] == 1
        (inventory / "vm2.yaml").write_text(
            "name: vm2\ninterfaces:\n  - name: eth0\n    ips: [10.30.0.2]\n")
        await until(lambda: scrape(port), lambda t: published(t).get(
            '{topic="endpoints"}') == 2, log)
        assert (await http(port, "/debug/stall?loop=main", "POST") or (0,))[0] == 200
        status, body = await until(lambda: probe(port, "/healthz"),
                                   lambda r: r and r[0] == 503, log)
        assert status == 503 and "main loop silent" in body["why"]
