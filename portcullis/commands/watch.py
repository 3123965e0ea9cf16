"""`portcullis watch`: Watch Kubernetes or a host inventory and publish endpoints."""

from __future__ import annotations

import argparse
import asyncio
import logging
from pathlib import Path
from typing import Any

from portcullis.cli import CommandError, command, run_async
from portcullis.settings import Settings

log = logging.getLogger("portcullis.watch")


async def _check_topics(settings: Settings, suffixes: tuple[str, ...]) -> None:
    """Refuse to start on missing or drifted topics (a broker may auto-create them wrongly)."""
    from portcullis.topics_admin import check_topics

    report = await check_topics(
        settings.kafka.aiokafka_kwargs(), settings.topic_prefix, settings.partitions,
        settings.replication_factor, create=False,
    )
    names = {settings.topic_prefix + s for s in suffixes}
    bad = [t for t in report.failures() if t.name in names]
    if bad:
        detail = "; ".join(f"{t.name}: {t.state}" for t in bad)
        raise CommandError(f"{detail}; run `portcullis topics create` first")


async def _state(settings: Settings, suffixes: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    from topics.specs import spec_for, topic_name
    from watchers.topicstate import read_state

    kwargs = settings.kafka.aiokafka_kwargs()
    return {
        s: await read_state(kwargs, topic_name(settings.topic_prefix, s), spec_for(s).record)
        for s in suffixes
    }


async def _kubernetes(args: argparse.Namespace, settings: Settings) -> None:
    from watchers import cluster
    from watchers import kubernetes as kw
    from watchers.mirror import Mirror
    from watchers.publisher import KafkaPublisher, producer_for

    suffixes = ("endpoints", "endpoints.history", "profiles", "profiles.history", "policies",
                "policies.history")
    await _check_topics(settings, suffixes)
    selection = cluster.Selection(
        auto_host_endpoints=args.auto_host_endpoints,
        policy_resources=not args.no_policy_resources,
        network_policies=not args.no_network_policies,
    )
    mirror = Mirror()
    watched = {r.name for r, _t in cluster.resources(selection)}
    adopted = cluster.seed(mirror, await _state(settings, ("endpoints", "profiles", "policies")),
                           watched)
    log.info("adopted %d record(s) already on the topics", adopted)
    options = kw.WatchOptions(timeout_seconds=args.watch_timeout, page_size=args.page_size)
    api = await cluster.api_client(args.kubeconfig, args.context)
    producer = producer_for(settings.kafka.aiokafka_kwargs(), "portcullis-watch-kubernetes")
    await producer.start()
    try:
        publisher = KafkaPublisher(producer, settings.topic_prefix)
        await cluster.watch(api, publisher, selection, options, mirror)
    finally:
        await producer.stop()
        await api.close()


async def _hosts(args: argparse.Namespace, settings: Settings) -> None:
    from watchers.inventory import InventoryWatcher, seed_from_topic
    from watchers.mirror import Mirror
    from watchers.publisher import KafkaPublisher, producer_for

    directory = Path(args.directory)
    if not directory.is_dir():
        raise CommandError(f"{directory}: not a directory")
    await _check_topics(settings, ("endpoints", "endpoints.history"))
    mirror = Mirror()
    adopted = seed_from_topic(mirror, (await _state(settings, ("endpoints",)))["endpoints"])
    log.info("adopted %d inventory host(s) already on the endpoints topic", adopted)
    producer = producer_for(settings.kafka.aiokafka_kwargs(), "portcullis-watch-hosts")
    await producer.start()
    try:
        publisher = KafkaPublisher(producer, settings.topic_prefix, actor=f"inventory:{directory}",
                                   source="inventory")
        watcher = InventoryWatcher(directory, publisher, mirror)
        task = asyncio.create_task(watcher.run())
        await watcher.ready.wait()
        log.info("watching %s (%d host file(s), %d invalid)", directory,
                 len(watcher.inventory.hosts), len(watcher.inventory.errors))
        await task
    finally:
        await producer.stop()


@command("watch", "Watch Kubernetes or a host inventory and publish endpoints.")
class Command:
    @staticmethod
    def configure(parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "source", choices=["kubernetes", "hosts"],
            help="kubernetes: list then watch the API (pods, namespaces, service accounts, "
            "nodes, policy resources); hosts: a directory of host/VM YAML files (one per host: "
            "name, interfaces with IPs, labels)",
        )
        parser.add_argument("directory", metavar="DIR", nargs="?",
                            help="the host inventory directory (hosts only)")
        kube = parser.add_argument_group("kubernetes")
        kube.add_argument("--kubeconfig", help="kubeconfig file (default: in-cluster "
                          "credentials in a pod, else ~/.kube/config)")
        kube.add_argument("--context", help="kubeconfig context")
        kube.add_argument("--auto-host-endpoints", action="store_true",
                          help="publish <node>-auto-hep host endpoints for every node")
        kube.add_argument("--no-policy-resources", action="store_true",
                          help="do not watch the policy.portcullis.io custom resources")
        kube.add_argument("--no-network-policies", action="store_true",
                          help="do not watch Kubernetes NetworkPolicy")
        kube.add_argument("--watch-timeout", type=int, default=300, metavar="SECONDS",
                          help="server-side watch timeout (default 300, below the API "
                          "server's 30-60 min)")
        kube.add_argument("--page-size", type=int, default=500,
                          help="objects per list page (default 500)")

    @staticmethod
    def run(args: argparse.Namespace, settings: Settings) -> int:
        if settings.log_level != "DEBUG":
            logging.getLogger("aiokafka").setLevel(logging.WARNING)
        if args.source == "kubernetes":
            if args.watch_timeout < 1 or args.page_size < 1:
                raise CommandError("--watch-timeout and --page-size must be positive")
            run_async(_kubernetes(args, settings))
        else:
            if not args.directory:
                raise CommandError("watch hosts needs the inventory directory: "
                                   "portcullis watch hosts DIR")
            run_async(_hosts(args, settings))
        return 0
