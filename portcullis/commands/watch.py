"""`portcullis watch`: Watch Kubernetes or a host inventory and publish endpoints."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from portcullis import observe
from portcullis.cli import CommandError, command, run_async
from portcullis.settings import Settings

if TYPE_CHECKING:
    from topics.health import Health
    from watchers.metrics import WatchMetrics

log = logging.getLogger("portcullis.watch")
#: How often the main loop beats (s).
HEARTBEAT_INTERVAL = 0.5
#: How long a stopping leader tries to release its lease (s).
RELEASE_TIMEOUT = 2.0


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


async def _heartbeat(health: Health, refresh: Callable[[], None] | None = None) -> None:
    """Beat the ``main`` loop (the event loop is responsive) and refresh readiness."""
    while True:
        health.beat("main")
        if refresh is not None:
            refresh()
        await asyncio.sleep(HEARTBEAT_INTERVAL)


async def _synced(health: Health, chosen: list[Any]) -> None:
    for done, watcher in enumerate(chosen):
        health.set("listed", False, f"initial lists published for {done} of {len(chosen)} "
                   f"resources; waiting for {watcher.resource.name}")
        await watcher.synced.wait()
    health.set("listed", True, f"initial lists published for {len(chosen)} resources")


async def _term(args: argparse.Namespace, settings: Settings, api: Any, publisher: Any,
                metrics: WatchMetrics, health: Health) -> None:
    """Publish as the leader: adopt what the topics hold, relist everything, then watch."""
    from watchers import cluster
    from watchers import kubernetes as kw
    from watchers.mirror import Mirror

    selection = _selection(args)
    mirror = Mirror()
    watched = {r.name for r, _t in cluster.resources(selection)}
    adopted = cluster.seed(mirror, await _state(settings, ("endpoints", "profiles", "policies")),
                           watched)
    log.info("adopted %d record(s) already on the topics", adopted)
    options = kw.WatchOptions(timeout_seconds=args.watch_timeout, page_size=args.page_size)
    chosen = cluster.watchers(api, publisher, selection, options, mirror, metrics)
    log.info("watching %s", ", ".join(w.resource.name for w in chosen))
    async with asyncio.TaskGroup() as group:
        group.create_task(_synced(health, chosen))
        group.create_task(kw.run_all(chosen))


def _selection(args: argparse.Namespace) -> Any:
    from watchers import cluster

    return cluster.Selection(
        auto_host_endpoints=args.auto_host_endpoints,
        policy_resources=not args.no_policy_resources,
        network_policies=not args.no_network_policies,
    )


async def _campaign(args: argparse.Namespace, settings: Settings, api: Any, publisher: Any,
                    metrics: WatchMetrics, health: Health) -> None:
    """Stand by until leading; publish while leading; on losing, stop at once and stand by.

    A lost term cancels its watchers before the lease can be taken over (the renew
    deadline is shorter than the lease duration); the next term relists from scratch.
    """
    from watchers.lease import LeaderElector, default_identity

    timing = _timing(args)
    elector = LeaderElector(api, args.leader_elect_namespace, args.leader_elect_lease_name,
                            default_identity(), timing,
                            on_beat=lambda: health.beat("election"))
    health.loop("election", max(args.health_max_age,
                                timing.renew_deadline + 2 * timing.retry_period))
    log.info("leader election on lease %s/%s as %s", elector.namespace, elector.name,
             elector.identity)

    def refresh() -> None:
        health.set("leader", elector.state != "candidate", elector.describe())
        if elector.state == "standby":
            health.set("listed", True, "standby: not publishing")
        health.note("election", elector.describe())

    beating = asyncio.create_task(_heartbeat(health, refresh))
    campaign = asyncio.create_task(elector.run(), name="leader election")
    term: asyncio.Task[None] | None = None
    try:
        while True:
            leading = asyncio.create_task(elector.leading.wait())
            await asyncio.wait({leading, campaign}, return_when=asyncio.FIRST_COMPLETED)
            if campaign.done():
                leading.cancel()
                campaign.result()  # raises what ended the campaign
                raise RuntimeError("the leader election stopped")
            metrics.leader.set(1)
            metrics.terms.inc()
            health.set("listed", False, "leading: listing")
            term = asyncio.create_task(_term(args, settings, api, publisher, metrics, health))

            def lost(term: asyncio.Task[None] = term) -> None:
                term.cancel()  # no more publishing from this term, before any await
                metrics.leader.set(0)
                health.set("listed", True, "standby: leadership lost, not publishing")

            elector.on_lost = lost
            await asyncio.wait({term, campaign}, return_when=asyncio.FIRST_COMPLETED)
            if not term.done():  # the campaign failed: stop publishing too
                lost()
            with contextlib.suppress(asyncio.CancelledError):
                await term  # a term that failed by itself raises here
            elector.on_lost = None
    finally:
        beating.cancel()
        campaign.cancel()
        if term is not None and not term.done():
            term.cancel()  # stop publishing first, then give the lease up
            await asyncio.gather(term, return_exceptions=True)
        if elector.state == "leader":
            with contextlib.suppress(Exception):
                await asyncio.wait_for(elector.release(), RELEASE_TIMEOUT)


def _timing(args: argparse.Namespace) -> Any:
    from watchers.leader import Timing

    try:
        return Timing(args.leader_elect_lease_duration, args.leader_elect_renew_deadline,
                      args.leader_elect_retry_period)
    except ValueError as exc:
        raise CommandError(f"--leader-elect-*: {exc}") from None


async def _kubernetes(args: argparse.Namespace, settings: Settings) -> None:
    from topics.health import Health
    from watchers import cluster
    from watchers.metrics import WatchMetrics
    from watchers.publisher import KafkaPublisher, producer_for

    metrics = WatchMetrics()
    health = Health("watch-kubernetes")
    health.loop("main", args.health_max_age)
    health.set("listed", False, "starting")
    if args.leader_elect:
        health.set("leader", False, "candidate: the lease is not read yet")
    servers = _serve(args, metrics.expose, health)
    main = asyncio.current_task()
    if main is not None:  # SIGTERM (a pod's stop) ends the term cleanly, as SIGINT does
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main.cancel)
    try:
        suffixes = ("endpoints", "endpoints.history", "profiles", "profiles.history",
                    "policies", "policies.history")
        await _check_topics(settings, suffixes)
        api = await cluster.api_client(args.kubeconfig, args.context)
        producer = producer_for(settings.kafka.aiokafka_kwargs(), "portcullis-watch-kubernetes")
        await producer.start()
        try:
            publisher = KafkaPublisher(producer, settings.topic_prefix, metrics=metrics)
            if args.leader_elect:
                await _campaign(args, settings, api, publisher, metrics, health)
            else:
                metrics.leader.set(1)
                metrics.terms.inc()
                beating = asyncio.create_task(_heartbeat(health))
                try:
                    await _term(args, settings, api, publisher, metrics, health)
                finally:
                    beating.cancel()
        finally:
            await producer.stop()
            await api.close()
    finally:
        observe.stop(servers)


def _serve(args: argparse.Namespace, expose: Callable[[], str], health: Health) -> list[Any]:
    try:
        return observe.start(args, expose, health)
    except OSError as exc:
        raise CommandError(str(exc)) from None


async def _hosts(args: argparse.Namespace, settings: Settings) -> None:
    from topics.health import Health
    from watchers.inventory import InventoryWatcher, seed_from_topic
    from watchers.metrics import WatchMetrics
    from watchers.mirror import Mirror
    from watchers.publisher import KafkaPublisher, producer_for

    directory = Path(args.directory)
    if not directory.is_dir():
        raise CommandError(f"{directory}: not a directory")
    metrics = WatchMetrics()
    health = Health("watch-hosts")
    health.loop("main", args.health_max_age)
    health.set("listed", False, "starting")
    servers = _serve(args, metrics.expose, health)
    try:
        await _check_topics(settings, ("endpoints", "endpoints.history"))
        mirror = Mirror()
        adopted = seed_from_topic(mirror, (await _state(settings, ("endpoints",)))["endpoints"])
        log.info("adopted %d inventory host(s) already on the endpoints topic", adopted)
        producer = producer_for(settings.kafka.aiokafka_kwargs(), "portcullis-watch-hosts")
        await producer.start()
        beating = asyncio.create_task(_heartbeat(health))
        try:
            watcher = InventoryWatcher(
                directory, KafkaPublisher(producer, settings.topic_prefix, metrics=metrics,
                                          actor=f"inventory:{directory}", source="inventory"),
                mirror)
            task = asyncio.create_task(watcher.run())
            await watcher.ready.wait()
            metrics.leader.set(1)
            health.set("listed", True, f"{len(watcher.inventory.hosts)} host file(s) published")
            log.info("watching %s (%d host file(s), %d invalid)", directory,
                     len(watcher.inventory.hosts), len(watcher.inventory.errors))
            await task
        finally:
            beating.cancel()
            await producer.stop()
    finally:
        observe.stop(servers)


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
        elect = parser.add_argument_group(
            "leader election (kubernetes; for a Deployment with several replicas)")
        elect.add_argument(
            "--leader-elect", action="store_true",
            help="publish only while holding a coordination.k8s.io/v1 Lease; the others stand "
            "by (ready, not publishing). A leader that cannot renew in time stops publishing "
            "at once and stands by; a new term relists everything")
        elect.add_argument("--leader-elect-lease-name", default="portcullis-watch-kubernetes",
                           metavar="NAME", help="the Lease (default portcullis-watch-kubernetes)")
        elect.add_argument(
            "--leader-elect-namespace", default=None, metavar="NS",
            help="the Lease's namespace (default: the pod's, from its service account "
            "mount, else portcullis)")
        elect.add_argument("--leader-elect-lease-duration", type=float, default=15.0,
                           metavar="SECONDS", help="how long standbys wait for a silent "
                           "leader before taking over (default 15)")
        elect.add_argument("--leader-elect-renew-deadline", type=float, default=10.0,
                           metavar="SECONDS", help="a leader that has not renewed for this "
                           "long stops publishing (default 10; below the lease duration)")
        elect.add_argument("--leader-elect-retry-period", type=float, default=2.0,
                           metavar="SECONDS", help="how often candidates try the lease "
                           "(default 2)")
        observe.add_arguments(parser, max_age=30.0)

    @staticmethod
    def run(args: argparse.Namespace, settings: Settings) -> int:
        if settings.log_level != "DEBUG":
            logging.getLogger("aiokafka").setLevel(logging.WARNING)
        error = observe.check_arguments(args)
        if error:
            raise CommandError(error)
        if args.source == "kubernetes":
            if args.leader_elect:
                from watchers.lease import default_namespace

                _timing(args)  # refuse bad timings before connecting anywhere
                args.leader_elect_namespace = (args.leader_elect_namespace
                                               or default_namespace())
            if args.watch_timeout < 1 or args.page_size < 1:
                raise CommandError("--watch-timeout and --page-size must be positive")
            try:
                run_async(_kubernetes(args, settings))
            except asyncio.CancelledError:  # SIGTERM
                log.info("stopped")
        else:
            if not args.directory:
                raise CommandError("watch hosts needs the inventory directory: "
                                   "portcullis watch hosts DIR")
            run_async(_hosts(args, settings))
        return 0
