"""`portcullis enforce`: Program this node's ipsets and iptables chains from the topics."""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import os
import re
import signal
from typing import TYPE_CHECKING

from enforcers import DEFAULT_FETCH_MIN_BYTES
from portcullis import observe
from portcullis.cli import CommandError, command, run_async
from portcullis.settings import Settings

if TYPE_CHECKING:
    from enforcers.dns import DnsSettings
    from enforcers.flowlogger import FlowSettings
    from policy.selectors import Selector

log = logging.getLogger("portcullis.enforce")
#: CoreDNS (and kube-dns) pods: ``k8s-app: kube-dns`` in kube-system.
DEFAULT_DNS_SERVER_PODS = "k8s-app == 'kube-dns' && projectcalico.org/namespace == 'kube-system'"
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
        dns = parser.add_argument_group("domain rules (DNS learning)")
        dns.add_argument(
            "--dns-server", action="append", metavar="IP",
            help="a trusted DNS server: its answers to local endpoints teach which IPs a "
                 "domain rule allows. Repeat for several. Default: $KUBE_DNS_SERVICE_HOST "
                 "(the kube-dns service, in a pod), else the nameservers of resolv.conf "
                 "(/etc/netns/NAME/resolv.conf with --netns, if there is one)",
        )
        dns.add_argument(
            "--dns-server-pods", metavar="SELECTOR", default=DEFAULT_DNS_SERVER_PODS,
            help="local pods whose answers are trusted though they come from a pod "
                 "interface: the DNS server pods (default: CoreDNS's, "
                 f"\"{DEFAULT_DNS_SERVER_PODS}\"; '' for none)",
        )
        dns.add_argument(
            "--no-dns-learning", action="store_true",
            help="learn nothing from DNS: domain rules then match nothing (fail closed)",
        )
        dns.add_argument("--dns-queue", type=int, default=100, metavar="N",
                         help="the NFQUEUE queue DNS answers are held on (default 100)")
        dns.add_argument("--dns-grace", type=float, default=2.0, metavar="SECONDS",
                         help="added to every answer's TTL before its IPs leave the domain "
                              "sets (default 2)")
        dns.add_argument("--dns-max-ips-per-name", type=int, default=64, metavar="N",
                         help="IPs kept per name; beyond, the soonest to expire are evicted "
                              "(default 64)")
        dns.add_argument("--dns-max-hold", type=float, default=0.5, metavar="SECONDS",
                         help="holds longer than this are counted as slow (default 0.5)")
        dns.add_argument(
            "--dns-state-file", metavar="PATH",
            help="keep learned answers in this file across restarts (written every 5 s "
                 "and at stop; e.g. /var/lib/portcullis/dns.json). Without it a restart "
                 "forgets them: pods that cached an answer are denied until they look the "
                 "name up again",
        )
        flows = parser.add_argument_group("flow logs")
        flows.add_argument(
            "--flow-logs", action=argparse.BooleanOptionalAction, default=True,
            help="log denied connection attempts (the first packet of each, via NFLOG), "
                 "aggregated per source, destination, port and what decided, to the flows "
                 "topic (default on; best effort: enforcement never waits for it)",
        )
        flows.add_argument("--flow-log-allowed", action="store_true",
                           help="log allowed connection attempts too")
        flows.add_argument("--flow-log-group", type=int, default=20, metavar="N",
                           help="the NFLOG group flow logs use (default 20)")
        flows.add_argument("--flow-interval", type=float, default=10.0, metavar="SECONDS",
                           help="how long attempts are aggregated before they are "
                                "published (default 10)")
        flows.add_argument(
            "--flow-max-per-interval", type=int, default=10_000, metavar="N",
            help="distinct flows kept per interval; beyond, attempts are summed per "
                 "decision only (reason \"overflow\") and counted (default 10000)",
        )
        parser.add_argument(
            "--dead-letter-unowned", action="store_true",
            help="also dead-letter malformed memberships no node owns (network-set members, "
                 "bad keys); enable on ONE enforcer per cluster, e.g. a --dry-run auditor",
        )
        observe.add_arguments(parser, max_age=30.0)
        parser.add_argument(
            "--ready-max-lag", type=int, default=1000, metavar="RECORDS",
            help="/readyz says ready (after the first sync and programming) while at most "
                 "this many records are not consumed yet (default 1000)",
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
        parser.add_argument(
            "--fetch-min-bytes", type=int, default=DEFAULT_FETCH_MIN_BYTES, metavar="BYTES",
            help="the broker holds a fetch until this much is there or --fetch-max-wait "
                 f"passed (default {DEFAULT_FETCH_MIN_BYTES}). Every node reads the whole "
                 "cluster's churn: at 6,000 pods/min, 1 (every record fetched at once) "
                 f"took 18%% of a core, {DEFAULT_FETCH_MIN_BYTES} 3.3%%, for up to "
                 "--fetch-max-wait more latency",
        )

    @staticmethod
    def run(args: argparse.Namespace, settings: Settings) -> int:
        from enforcers import netns as netns_mod

        error = observe.check_arguments(args)
        if error:
            raise CommandError(error)
        if args.ready_max_lag < 0:
            raise CommandError(f"--ready-max-lag must not be negative, got {args.ready_max_lag}")
        if args.resync_interval <= 0:
            raise CommandError(f"--resync-interval must be positive, got {args.resync_interval}")
        if args.batch_window < 0:
            raise CommandError(f"--batch-window must not be negative, got {args.batch_window}")
        if not 0 <= args.fetch_max_wait <= 10:
            raise CommandError(
                f"--fetch-max-wait must be between 0 and 10 seconds, got {args.fetch_max_wait}"
            )
        if args.fetch_min_bytes < 1:
            raise CommandError(f"--fetch-min-bytes must be at least 1, got {args.fetch_min_bytes}")
        if args.netns and not netns_mod.exists(args.netns):
            raise CommandError(f"network namespace {args.netns!r} does not exist")
        for prefix in args.workload_interface_prefix or ():
            if not WORKLOAD_PREFIX_RE.match(prefix):
                raise CommandError(
                    f"--workload-interface-prefix {prefix!r}: expected the start of an "
                    "interface name (1-14 letters, digits, '_', '.', '@', ':' or '-')")
        if not 0 <= args.dns_queue <= 65535:
            raise CommandError(f"--dns-queue must be 0-65535, got {args.dns_queue}")
        if args.dns_grace < 0 or args.dns_max_hold <= 0 or args.dns_max_ips_per_name < 1:
            raise CommandError("--dns-grace must not be negative, --dns-max-hold and "
                               "--dns-max-ips-per-name must be positive")
        args.dns = None if args.no_dns_learning else dns_settings(args)
        args.flows = flow_settings(args)
        args.dns_pods = dns_server_pods(args.dns_server_pods)
        run_async(_main(args, settings))
        return 0


def _resolv_conf_servers(path: str) -> list[str]:
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    return [parts[1] for parts in (line.split() for line in lines)
            if len(parts) >= 2 and parts[0] == "nameserver"]


def trusted_dns_servers(args: argparse.Namespace) -> tuple[str, ...]:
    """The servers given, else kube-dns's service address, else resolv.conf's nameservers."""
    given = list(args.dns_server or ())
    if not given and os.environ.get("KUBE_DNS_SERVICE_HOST"):
        given = [os.environ["KUBE_DNS_SERVICE_HOST"]]
    if not given:
        paths = ([f"/etc/netns/{args.netns}/resolv.conf"] if args.netns else []) + [
            "/etc/resolv.conf"]
        for path in paths:
            given = _resolv_conf_servers(path)
            if given:
                break
    servers = []
    for text in given:
        try:
            servers.append(str(ipaddress.ip_address(text.split("%")[0])))
        except ValueError:
            raise CommandError(f"--dns-server {text!r}: not an IP address") from None
    return tuple(dict.fromkeys(servers))


def dns_server_pods(text: str) -> Selector | None:
    from policy.selectors import SelectorError, parse

    if not text.strip():
        return None
    try:
        return parse(text)
    except SelectorError as exc:
        raise CommandError(f"--dns-server-pods {text!r}: {exc}") from None


def flow_settings(args: argparse.Namespace) -> FlowSettings | None:
    """What flow logging the flags ask for (None: none; never with --dry-run)."""
    from enforcers.flowlogger import FlowSettings

    if not args.flow_logs or args.dry_run:
        return None
    try:
        return FlowSettings(args.flow_log_group, args.flow_log_allowed, args.flow_interval,
                            args.flow_max_per_interval, args.netns)
    except ValueError as exc:
        raise CommandError(f"--flow-*: {exc}") from None


def dns_settings(args: argparse.Namespace) -> DnsSettings | None:
    from enforcers.dns import DnsSettings

    servers = trusted_dns_servers(args)
    if not servers:
        log.warning("no trusted DNS server (none given, none in resolv.conf): domain rules "
                    "match nothing (fail closed)")
        return None
    return DnsSettings(servers, args.dns_queue, args.netns, args.dns_grace,
                       args.dns_max_ips_per_name, args.dns_max_hold,
                       args.dns_state_file or None)


async def _main(args: argparse.Namespace, settings: Settings) -> None:
    from enforcers.engine import DryRunIptables, Enforcer, Programmer
    from enforcers.interfaces import read_addresses
    from enforcers.ipsets import DryRunIpsets, NetlinkIpsets, set_name
    from enforcers.iptables import Iptables
    from enforcers.metrics import EnforcerMetrics
    from enforcers.render import WORKLOAD_PREFIXES
    from enforcers.state import EnforcerState
    from topics.health import Health

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
    capture = args.dns.capture() if args.dns is not None and not args.dry_run else None
    flow_rules = args.flows.rules() if args.flows is not None else None
    ipv6 = None
    if ipv6_available():
        state6 = EnforcerState(args.node, lambda uid: set_name(uid, "pc6"), family=6,
                               workload_prefixes=prefixes, blocked=args.no_ipv6,
                               dns=capture, dns_server_pods=args.dns_pods, flows=flow_rules)
        ipv6 = (state6, programmer6)
        if args.no_ipv6:
            log.info("--no-ipv6: IPv6 from local endpoints is dropped, not enforced")
    else:
        log.info("this kernel has no IPv6 (no /proc/net/if_inet6): enforcing IPv4 only")
    metrics = EnforcerMetrics()
    health = Health("enforcer")
    health.loop("main", args.health_max_age)
    enforcer = Enforcer(
        EnforcerState(args.node, set_name, workload_prefixes=prefixes, dns=capture,
                      dns_server_pods=args.dns_pods, flows=flow_rules),
        programmer,
        settings.kafka.aiokafka_kwargs(),
        settings.topic_prefix, metrics, batch_window=args.batch_window,
        resync_interval=args.resync_interval, ipv6=ipv6,
        dead_letter_unowned=args.dead_letter_unowned,
        fetch_max_wait_ms=round(args.fetch_max_wait * 1000),
        fetch_min_bytes=args.fetch_min_bytes,
        read_addresses=lambda: read_addresses(args.netns),
        dns=args.dns if capture is not None else None,
        flows=args.flows,
        health=health, ready_max_lag=args.ready_max_lag,
    )
    try:
        servers = observe.start(args, metrics.expose, health)
    except OSError as exc:
        raise CommandError(str(exc)) from None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info("enforcing node %s%s%s", args.node,
             f" in netns {args.netns}" if args.netns else "", " (dry run)" if args.dry_run else "")
    try:
        await enforcer.run(stop)
    finally:
        observe.stop(servers)
        # Fail static: what is programmed stays programmed when we stop.
        log.info("stopped; the programmed dataplane stays as it is")
