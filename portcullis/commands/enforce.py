"""`portcullis enforce`: Program this node's ipsets and iptables chains from the topics."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal

from portcullis.cli import CommandError, command, run_async
from portcullis.settings import Settings

log = logging.getLogger("portcullis.enforce")


@command("enforce", "Program this node's ipsets and iptables chains from the topics.")
class Command:
    @staticmethod
    def configure(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--node", required=True, help="this node's name (as on endpoints)")
        parser.add_argument(
            "--netns", metavar="NAME",
            help="program the dataplane of this named network namespace instead of the host's",
        )
        parser.add_argument(
            "--dry-run", action="store_true",
            help="record ipset and iptables operations instead of touching the kernel",
        )
        parser.add_argument(
            "--ipv6", action="store_true",
            help="also enforce IPv6 (ip6tables and inet6 sets named pc6-…)",
        )
        parser.add_argument(
            "--dead-letter-unowned", action="store_true",
            help="also dead-letter malformed memberships no node owns (network-set members, "
                 "bad keys); enable on ONE enforcer per cluster, e.g. a --dry-run auditor",
        )
        parser.add_argument(
            "--metrics-port", type=int, metavar="PORT",
            help="serve Prometheus metrics on this port (GET /metrics)",
        )
        parser.add_argument(
            "--resync-interval", type=float, default=30.0, metavar="SECONDS",
            help="how often to compare the kernel with what we programmed (default 30)",
        )
        parser.add_argument(
            "--batch-window", type=float, default=0.003, metavar="SECONDS",
            help="minimum spacing between dataplane transactions; a change after a quiet "
                 "spell is applied at once, changes within the window go together "
                 "(default 0.003)",
        )
        parser.add_argument(
            "--fetch-max-wait", type=float, default=0.05, metavar="SECONDS",
            help="how long the broker may hold an empty fetch (default 0.05). Apache Kafka "
                 "answers as soon as a record arrives, so this only sets idle polling; the "
                 "embedded Tansu broker answers only when the wait ends, so there it adds "
                 "up to this much latency (0.01 keeps joins under 10 ms, at ~3%% of a core)",
        )

    @staticmethod
    def run(args: argparse.Namespace, settings: Settings) -> int:
        from enforcers import netns as netns_mod

        if args.resync_interval <= 0:
            raise CommandError(f"--resync-interval must be positive, got {args.resync_interval}")
        if args.batch_window < 0:
            raise CommandError(f"--batch-window must not be negative, got {args.batch_window}")
        if not 0 <= args.fetch_max_wait <= 10:
            raise CommandError(
                f"--fetch-max-wait must be between 0 and 10 seconds, got {args.fetch_max_wait}"
            )
        if args.netns and not netns_mod.exists(args.netns):
            raise CommandError(f"network namespace {args.netns!r} does not exist")
        run_async(_main(args, settings))
        return 0


async def _main(args: argparse.Namespace, settings: Settings) -> None:
    from enforcers.engine import DryRunIptables, Enforcer, Programmer
    from enforcers.ipsets import DryRunIpsets, NetlinkIpsets, set_name
    from enforcers.iptables import Iptables
    from enforcers.metrics import EnforcerMetrics, serve
    from enforcers.state import EnforcerState

    ipsets: DryRunIpsets | NetlinkIpsets
    if args.dry_run:
        ipsets = DryRunIpsets()
        programmer = Programmer(ipsets, DryRunIptables())
        programmer6 = Programmer(ipsets, DryRunIptables(), family=6)
    else:
        try:
            ipsets = NetlinkIpsets(netns=args.netns)
        except OSError as exc:
            raise CommandError(
                f"cannot open the ipset netlink socket (root needed?): {exc}"
            ) from None
        programmer = Programmer(ipsets, Iptables(args.netns))
        programmer6 = Programmer(ipsets, Iptables(args.netns, family=6), family=6)
    ipv6 = None
    if args.ipv6:
        state6 = EnforcerState(args.node, lambda uid: set_name(uid, "pc6"), family=6)
        ipv6 = (state6, programmer6)
    metrics = EnforcerMetrics()
    enforcer = Enforcer(
        EnforcerState(args.node, set_name), programmer, settings.kafka.aiokafka_kwargs(),
        settings.topic_prefix, metrics, batch_window=args.batch_window,
        resync_interval=args.resync_interval, ipv6=ipv6,
        dead_letter_unowned=args.dead_letter_unowned,
        fetch_max_wait_ms=round(args.fetch_max_wait * 1000),
    )
    server = await serve(metrics, args.metrics_port) if args.metrics_port else None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info("enforcing node %s%s%s", args.node,
             f" in netns {args.netns}" if args.netns else "", " (dry run)" if args.dry_run else "")
    try:
        await enforcer.run(stop)
    finally:
        if server is not None:
            server.close()
        # Fail static: what is programmed stays programmed when we stop.
        log.info("stopped; the programmed dataplane stays as it is")
