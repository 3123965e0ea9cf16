"""`portcullis enforce`: Program this node's ipsets and iptables chains from the topics."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import re
import signal

from portcullis.cli import CommandError, command, run_async
from portcullis.settings import Settings

log = logging.getLogger("portcullis.enforce")
WORKLOAD_PREFIX_RE = re.compile(r"^[A-Za-z0-9_.@:-]{1,14}$")


def ipv6_available() -> bool:
    """Whether this kernel has IPv6 at all (booted with ipv6.disable=1, it has none, and
    no IPv6 can flow to enforce)."""
    return os.path.exists("/proc/net/if_inet6")


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
        family = parser.add_mutually_exclusive_group()
        family.add_argument(
            "--ipv6", action="store_true",
            help="enforce IPv6 as well as IPv4, with ip6tables and inet6 sets named pc6-… "
                 "(the default; kept for scripts that ask for it)",
        )
        family.add_argument(
            "--no-ipv6", action="store_true",
            help="this node's workloads and hosts have no IPv6: drop every IPv6 packet local "
                 "endpoints send (neighbour discovery, established flows and a host "
                 "endpoint's failsafe ports aside) instead of enforcing IPv6 policy",
        )
        parser.add_argument(
            "--workload-interface-prefix", action="append", metavar="PREFIX",
            help="host-side interfaces of workloads start with this (default: cali, as "
                 "Calico's CNI names them); traffic from such an interface that is no known "
                 "workload's is dropped. Repeat for several prefixes.",
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
        for prefix in args.workload_interface_prefix or ():
            if not WORKLOAD_PREFIX_RE.match(prefix):
                raise CommandError(
                    f"--workload-interface-prefix {prefix!r}: expected the start of an "
                    "interface name (1-14 letters, digits, '_', '.', '@', ':' or '-')")
        run_async(_main(args, settings))
        return 0


async def _main(args: argparse.Namespace, settings: Settings) -> None:
    from enforcers.engine import DryRunIptables, Enforcer, Programmer
    from enforcers.interfaces import read_addresses
    from enforcers.ipsets import DryRunIpsets, NetlinkIpsets, set_name
    from enforcers.iptables import Iptables
    from enforcers.metrics import EnforcerMetrics, serve
    from enforcers.render import WORKLOAD_PREFIXES
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
    prefixes = tuple(args.workload_interface_prefix or WORKLOAD_PREFIXES)
    ipv6 = None
    if ipv6_available():
        state6 = EnforcerState(args.node, lambda uid: set_name(uid, "pc6"), family=6,
                               workload_prefixes=prefixes, blocked=args.no_ipv6)
        ipv6 = (state6, programmer6)
        if args.no_ipv6:
            log.info("--no-ipv6: IPv6 from local endpoints is dropped, not enforced")
    else:
        log.info("this kernel has no IPv6 (no /proc/net/if_inet6): enforcing IPv4 only")
    metrics = EnforcerMetrics()
    enforcer = Enforcer(
        EnforcerState(args.node, set_name, workload_prefixes=prefixes), programmer,
        settings.kafka.aiokafka_kwargs(),
        settings.topic_prefix, metrics, batch_window=args.batch_window,
        resync_interval=args.resync_interval, ipv6=ipv6,
        dead_letter_unowned=args.dead_letter_unowned,
        fetch_max_wait_ms=round(args.fetch_max_wait * 1000),
        read_addresses=lambda: read_addresses(args.netns),
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
