"""DNS learning: the latency it adds to a lookup, and its cost at 1,000 answers/s.

Real parts: a node namespace between a pod namespace and an "outside" one; a DNS server
(dnspython, its own process) outside; a resolver in the pod (its own process) timing each
lookup; the enforcer core in this process with its NFQUEUE learner, ipsets and iptables
in the node namespace (as ``portcullis enforce`` programs them).

Scenarios, one after the other in the same run:

* ``baseline``: no domain policy, nothing queued: what a lookup costs here;
* ``new-ips``: a domain Allow (``*.bench.test``) and every answer a name never seen, so
  each one is held while its IP is programmed (the worst case);
* ``known``: the same names again (nothing to program: the answer is released at once);
* ``load``: 10,000 names learned, then 1,000 answers/s for ``--seconds``, each answer a
  new IP for its name (a CDN rotating addresses: every answer changes the sets, and
  names reach the per-name cap): the enforcer's CPU and memory.

Prints and saves ``benchmarks/results/dns_bench.json``. Needs root.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import select
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results" / "dns_bench.json"
DNS_IP = "10.72.0.53"
POD_IP = "10.71.0.2"
QUEUE = 61

POLICY = """
apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata: {name: bench}
spec:
  selector: app == 'bench'
  types: [Egress]
  egress:
  - {action: Allow, protocol: UDP, destination: {ports: [53]}}
  - {action: Allow, protocol: TCP, destination: {domains: ["*.bench.test"], ports: [443]}}
"""


# --------------------------------------------------------------------------- subprocesses


def serve(address: str) -> None:
    """The DNS server: ``n<N>.bench.test`` -> an address from N (and, for ``r<N>.``, a new
    address at every answer), TTL 300."""
    import dns.message
    import dns.rrset

    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((address, 53))
    rotation: dict[str, int] = {}
    while True:
        wire, peer = sock.recvfrom(4096)
        query = dns.message.from_wire(wire)
        response = dns.message.make_response(query)
        name = str(query.question[0].name)
        label = name.split(".")[0]
        number = int(label[1:]) if label[1:].isdigit() else 0
        if label.startswith("r"):
            rotation[name] = rotation.get(name, 0) + 1
            number = number * 97 + rotation[name]
        address_of = f"10.{80 + number // 65536 % 100}.{number // 256 % 256}.{number % 256}"
        response.answer.append(dns.rrset.from_text(name, 300, "IN", "A", address_of))
        sock.sendto(response.to_wire(), peer)


def query(server: str, names: list[str], rate: float) -> None:
    """Look each name up in turn (at most ``rate`` per second); print the times (ms)."""
    import dns.message

    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.settimeout(2)
    times: list[float] = []
    lost = 0
    interval = 1.0 / rate if rate > 0 else 0.0
    start = time.perf_counter()
    for index, name in enumerate(names):
        if interval:
            wait = start + index * interval - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
        wire = dns.message.make_query(name, "A").to_wire()
        sent = time.perf_counter()
        sock.sendto(wire, (server, 53))
        try:
            while sock.recvfrom(4096)[0][:2] != wire[:2]:
                pass
        except TimeoutError:
            lost += 1
            continue
        times.append((time.perf_counter() - sent) * 1000)
    print(json.dumps({"ms": times, "lost": lost, "seconds": time.perf_counter() - start}))


# --------------------------------------------------------------------------- the bench


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


class Bench:
    def __init__(self) -> None:
        from enforcers import netns

        suffix = f"{os.getpid() % 100000}"
        self.node, self.pod, self.outside = (f"pcdb-{r}-{suffix}" for r in ("n", "p", "o"))
        for ns in (self.node, self.pod, self.outside):
            netns.remove(ns)
            netns.create(ns)
        _ip("-n", self.node, "link", "add", "calib0", "type", "veth", "peer", "name", "eth0",
            "netns", self.pod)
        _ip("-n", self.node, "addr", "add", "10.71.0.1/24", "dev", "calib0")
        _ip("-n", self.node, "link", "set", "calib0", "up")
        _ip("-n", self.pod, "addr", "add", f"{POD_IP}/24", "dev", "eth0")
        _ip("-n", self.pod, "link", "set", "eth0", "up")
        _ip("-n", self.pod, "route", "add", "default", "via", "10.71.0.1")
        _ip("-n", self.node, "link", "add", "to-out", "type", "veth", "peer", "name", "eth0",
            "netns", self.outside)
        _ip("-n", self.node, "addr", "add", "10.72.0.1/24", "dev", "to-out")
        _ip("-n", self.node, "link", "set", "to-out", "up")
        _ip("-n", self.outside, "addr", "add", f"{DNS_IP}/24", "dev", "eth0")
        _ip("-n", self.outside, "link", "set", "eth0", "up")
        _ip("-n", self.outside, "route", "add", "default", "via", "10.72.0.1")
        subprocess.run(["ip", "netns", "exec", self.node, "sysctl", "-qw",
                        "net.ipv4.ip_forward=1"], check=True)
        self.server = subprocess.Popen(
            ["ip", "netns", "exec", self.outside, sys.executable, "-m", "benchmarks.dns_bench",
             "serve", DNS_IP])
        time.sleep(0.5)

    def lookups(self, names: list[str], rate: float = 0.0) -> dict[str, Any]:
        proc = subprocess.run(
            ["ip", "netns", "exec", self.pod, sys.executable, "-m", "benchmarks.dns_bench",
             "query", DNS_IP, str(rate)],
            input="\n".join(names), capture_output=True, text=True, check=True)
        result: dict[str, Any] = json.loads(proc.stdout)
        return result

    def close(self) -> None:
        from enforcers import netns

        self.server.kill()
        self.server.wait()
        for ns in (self.node, self.pod, self.outside):
            netns.remove(ns)


class Enforcing:
    """The enforcer core for the node, its learner on a thread (as in the dataplane tests)."""

    def __init__(self, bench: Bench, dns: bool) -> None:
        from enforcers.dns import DnsSettings, DnsSnooper
        from enforcers.engine import Programmer, RecordSink
        from enforcers.ipsets import NetlinkIpsets, set_name
        from enforcers.iptables import Iptables
        from enforcers.metrics import EnforcerMetrics
        from enforcers.state import EnforcerState
        from topics import codec
        from topics.records import EndpointRecord, PolicyRecord

        settings = DnsSettings(servers=(DNS_IP,), queue=QUEUE, namespace=bench.node)
        self.metrics = EnforcerMetrics()
        self.state = EnforcerState("bench-node", set_name,
                                   dns=settings.capture() if dns else None)
        self.ipsets = NetlinkIpsets(netns=bench.node)
        self.programmer = Programmer(self.ipsets, Iptables(bench.node))
        self.sink = RecordSink(self.state, self.metrics)
        endpoint = EndpointRecord(kind="pod", namespace="bench", name="client",
                                  node="bench-node", interface="calib0", ips=(POD_IP,),
                                  labels={"app": "bench"}, service_account=None,
                                  source="kubernetes", observed_at=time.time())
        self.sink.message("endpoints", endpoint.key.encode(), codec.encode(endpoint))
        if dns:
            import yaml

            rec = PolicyRecord(kind="GlobalNetworkPolicy", namespace=None, name="bench",
                               document=yaml.safe_load(POLICY), actor="bench",
                               applied_at=time.time(), observed_at=time.time())
            self.sink.message("policies", rec.key.encode(), codec.encode(rec))
        self.programmer.start(self.state)
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.snooper: DnsSnooper | None = None
        if dns:
            self.snooper = DnsSnooper(settings, self.sink.domains, self._apply, self.metrics)
            self.queue = self.snooper.open()
            threading.Thread(target=self._run, daemon=True).start()

    def _apply(self, changes: list[Any], _at: float) -> None:
        self.sink.apply_domain_changes(changes)
        self.programmer.apply(self.state.plan())

    def _run(self) -> None:
        assert self.snooper is not None
        while not self.stop.is_set():
            ready, _, _ = select.select([self.queue], [], [], 0.05)
            if ready:
                with self.lock:
                    self.snooper.readable()

    def close(self) -> None:
        self.stop.set()
        time.sleep(0.1)
        if self.snooper is not None:
            self.snooper.stop()
        self.ipsets.close()


def _percentiles(times: list[float]) -> dict[str, float]:
    ordered = sorted(times)
    return {"n": len(ordered), "p50_ms": round(statistics.median(ordered), 3),
            "p99_ms": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))], 3)}


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def run(count: int, learned: int, rate: float, seconds: float) -> dict[str, Any]:
    bench = Bench()
    results: dict[str, Any] = {}
    try:
        fresh = [f"n{i}.bench.test" for i in range(count)]
        plain = Enforcing(bench, dns=False)
        results["baseline"] = _percentiles(bench.lookups(fresh)["ms"])
        plain.close()
        enforcing = Enforcing(bench, dns=True)
        results["new-ips"] = _percentiles(bench.lookups(
            [f"n{i}.bench.test" for i in range(count, 2 * count)])["ms"])
        results["known"] = _percentiles(bench.lookups(fresh[: count // 2] * 2)["ms"])
        for name in ("new-ips", "known"):
            for q in ("p50_ms", "p99_ms"):
                results[name][f"added_{q}"] = round(results[name][q] - results["baseline"][q], 3)
        # load: `learned` names first, then `rate` answers/s, each a new IP for its name
        rotating = [f"r{i}.bench.test" for i in range(learned)]
        bench.lookups(rotating)
        names = len(enforcing.sink.domains.learner.names)
        holds_before = list(enforcing.metrics.dns_hold.samples)
        rss_before = _rss_mib()
        cpu_before, wall_before = time.process_time(), time.perf_counter()
        total = int(rate * seconds)
        got = bench.lookups([rotating[i % learned] for i in range(total)], rate)
        cpu = time.process_time() - cpu_before
        wall = time.perf_counter() - wall_before
        holds = enforcing.metrics.dns_hold.samples[len(holds_before):]
        stats = enforcing.sink.domains.learner.stats
        results["load"] = {
            "names_learned_before": names,
            "answers": total, "lost": got["lost"], "achieved_per_s": round(total / got["seconds"]),
            "enforcer_cpu_percent_of_a_core": round(100 * cpu / wall, 1),
            "rss_mib": round(_rss_mib(), 1), "rss_growth_mib": round(_rss_mib() - rss_before, 1),
            "learned_ips": enforcing.sink.domains.learner.ip_count(),
            "evictions": stats.evictions,
            "hold_p50_ms": round(1000 * statistics.median(holds), 3) if holds else None,
            "hold_p99_ms": round(1000 * sorted(holds)[int(len(holds) * 0.99)], 3)
            if holds else None,
            "lookup": _percentiles(got["ms"]),
        }
        enforcing.close()
    finally:
        bench.close()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="mode")
    s = sub.add_parser("serve")
    s.add_argument("address")
    q = sub.add_parser("query")
    q.add_argument("server")
    q.add_argument("rate", type=float)
    parser.add_argument("--count", type=int, default=2000, help="lookups per latency scenario")
    parser.add_argument("--learned", type=int, default=10_000)
    parser.add_argument("--rate", type=float, default=1000.0)
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    if args.mode == "serve":
        with contextlib.suppress(KeyboardInterrupt):
            serve(args.address)
        return
    if args.mode == "query":
        query(args.server, sys.stdin.read().split(), args.rate)
        return
    results = run(args.count, args.learned, args.rate, args.seconds)
    report = {
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                    "cpu": platform.processor() or platform.machine()},
        "settings": {"count": args.count, "learned": args.learned, "rate": args.rate,
                     "seconds": args.seconds},
        "results": results,
        "max_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
