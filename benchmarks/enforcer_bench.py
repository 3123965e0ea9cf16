"""Enforcer cold start and change latency, on a real broker and a real node namespace.

Run as root: ``.venv/bin/python -m benchmarks.enforcer_bench [--broker tansu|kafka]``.

Scenario: 100 local pods on the node, 10 policies (each applying to 10 of them) allowing
egress to a peer selector of 10,000 remote members each: 100,000 set members. Plus 10,000
remote endpoint records on the endpoints topic (the enforcer reads and skips them).

Figures, each beside a baseline measured in the same run:

- ``cold_start``: ``portcullis enforce`` process start to fully programmed (``in_sync``
  metric), into an empty namespace; and ``restart`` over an already programmed one (sets
  refilled through temporary twins and swapped in). Baselines: a bare aiokafka consumer
  reading the same topics to the end (no decoding, no state), and the kernel floor:
  ``ipset restore`` + ``iptables-restore`` of the same dataplane from prepared text.
- ``join_latency``: a remote pod joins a selector with 10,000 members already
  programmed: ``observed_at`` (set when published) to its IP being in the kernel set,
  p50/p99, at ~100 joins/s. Baseline: a bare consumer's publish-to-receive latency for the
  same records (the broker's floor), with the same ``fetch_max_wait_ms``. Also a local pod
  joining an applies-to selector (its chain is rewritten with iptables-restore). Run once
  per ``--fetch-waits`` value (the enforcer's ``fetch_max_wait_ms``, default 50 and 10):
  Tansu answers a held fetch only when its wait runs out, never when a record arrives,
  so on Tansu the wait is part of the latency; Apache Kafka answers at once. What a
  shorter wait costs: the CPU an idle consumer of the same partitions uses (it fetches
  once per wait, on every node).

Results: ``benchmarks/results/enforcer_bench.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import secrets
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from enforcers import netns
from enforcers.engine import Enforcer, Programmer
from enforcers.ipsets import NetlinkIpsets, set_name
from enforcers.iptables import Iptables
from enforcers.state import EnforcerState
from policy import compile as pcompile
from policy.load import load
from portcullis.brokers import BROKERS, Broker, free_port
from portcullis.topics_admin import check_topics
from topics import codec
from topics.partitioner import partition_for
from topics.records import EndpointRecord, MembershipRecord, PolicyRecord

RESULTS = Path(__file__).parent / "results" / "enforcer_bench.json"
NODE = "bench-node"
PARTITIONS = 3
GOAL_COLD_START_S = 3.0
GOAL_JOIN_P99_MS = 20.0


def policies_yaml(n_policies: int) -> str:
    docs = []
    for k in range(n_policies):
        docs.append(f"""
apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata: {{name: web-{k}}}
spec:
  order: {10 + k}
  selector: app == 'web-{k}'
  types: [Egress]
  egress:
  - action: Allow
    protocol: TCP
    destination: {{selector: role == 'r{k}', ports: [443]}}
""")
    return "---".join(docs)


def ip_of(i: int) -> str:
    return f"10.{100 + (i >> 16)}.{(i >> 8) & 255}.{i & 255}"


class Data:
    """Every record of the scenario, in publishing order."""

    def __init__(self, pods: int, policies: int, members: int, remote_endpoints: int) -> None:
        now = time.time()
        self.policies = load(policies_yaml(policies))
        compiled = [pcompile.policy_selectors(p) for p in self.policies]
        self.applies = [c.applies_to.uid for c in compiled]
        self.peers = [c.egress[0].destination.selector.uid for c in compiled]  # type: ignore[union-attr]
        self.records: list[tuple[str, Any]] = []
        for p in self.policies:
            self.records.append(("policies", PolicyRecord(
                p.kind, p.namespace, p.name, p.to_document(), "bench", now, now)))
        for i in range(pods):
            ep = EndpointRecord("pod", "shop", f"local-{i}", NODE, f"veth{i}",
                                (f"10.64.{i >> 8}.{i & 255}",), {"app": f"web-{i % policies}"},
                                None, "kubernetes", now)
            self.records.append(("endpoints", ep))
            self.records.append(("memberships", MembershipRecord(
                self.applies[i % policies], ep.key, "shop", NODE, ep.interface, ep.ips, now)))
        for i in range(remote_endpoints):
            self.records.append(("endpoints", EndpointRecord(
                "pod", f"ns{i % 50}", f"remote-{i}", f"node-{i % 300}", f"veth{i}",
                (ip_of(i),), {"role": f"r{i % policies}"}, None, "kubernetes", now)))
        per = members // policies
        for k in range(policies):
            for j in range(per):
                i = k * per + j
                self.records.append(("memberships", MembershipRecord(
                    self.peers[k], f"pod/ns{i % 50}/remote-{i}", f"ns{i % 50}",
                    f"node-{i % 300}", f"veth{i}", (ip_of(i),), now)))
        self.members = per * policies


async def publish(bootstrap: str, prefix: str, records: list[tuple[str, Any]]) -> float:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=20,
                                max_batch_size=1 << 20, max_request_size=8 << 20)
    await producer.start()
    started = time.perf_counter()
    try:
        futures = []
        for suffix, rec in records:
            futures.append(await producer.send(
                prefix + suffix, codec.encode(rec), key=rec.key.encode(),
                partition=partition_for(rec, PARTITIONS)))
        await producer.flush()
        await asyncio.gather(*futures)
    finally:
        await producer.stop()
    return time.perf_counter() - started


def enforcer_partitions(prefix: str) -> list[TopicPartition]:
    """Every partition of the three topics an enforcer reads."""
    return [TopicPartition(prefix + t, p) for t in ("policies", "memberships", "endpoints")
            for p in range(PARTITIONS)]


async def bare_consume_to_end(bootstrap: str, prefix: str) -> tuple[float, int]:
    """Baseline: read the three topics to the end without decoding anything."""
    started = time.perf_counter()
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None,
                                enable_auto_commit=False, max_poll_records=10_000)
    await consumer.start()
    try:
        parts = enforcer_partitions(prefix)
        consumer.assign(parts)
        await consumer.seek_to_beginning(*parts)
        end = await consumer.end_offsets(parts)
        n = 0
        while any([await consumer.position(tp) < end[tp] for tp in parts]):
            batch = await consumer.getmany(timeout_ms=200)
            n += sum(len(v) for v in batch.values())
    finally:
        await consumer.stop()
    return time.perf_counter() - started, n


def metric(port: int, name: str) -> float | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=1) as resp:
            for line in resp.read().decode().splitlines():
                if line.startswith(name + " "):
                    return float(line.split()[1])
    except OSError:
        return None
    return None


def run_enforcer_until_synced(bootstrap: str, prefix: str, ns: str,
                              tree: Path | None = None) -> float:
    """``portcullis enforce`` from process start to in sync; ``tree``: run the code of that
    source tree instead (another version, e.g. ``git archive <commit> | tar -x -C DIR``)."""
    port = free_port()
    if tree is None:
        argv = [os.path.join(os.path.dirname(sys.executable), "portcullis")]
    else:
        argv = [sys.executable, "-c", f"import sys; sys.path.insert(0, {str(tree)!r}); "
                "from portcullis.cli import main; sys.exit(main())"]
    started = time.perf_counter()
    proc = subprocess.Popen(
        [*argv, "enforce", "--node", NODE, "--netns", ns, "--bootstrap", bootstrap,
         "--topic-prefix", prefix, "--metrics-port", str(port), "--log-level", "WARNING"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=tree)
    try:
        while metric(port, "portcullis_enforcer_in_sync") != 1:
            if proc.poll() is not None:
                raise RuntimeError(f"enforcer exited: {proc.stderr.read().decode()[-2000:]}")  # type: ignore[union-attr]
            if time.perf_counter() - started > 120:
                raise RuntimeError("enforcer did not sync in 120 s")
            time.sleep(0.01)
        return time.perf_counter() - started
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)


def count_members(ns: str) -> int:
    with NetlinkIpsets(netns=ns) as backend:
        return sum(len(m) for name, m in backend.list_sets().items() if name.startswith("pc-"))


def kernel_floor(ns: str, data: Data) -> float:
    """ipset restore + iptables-restore of the same dataplane, from prepared text."""
    state = EnforcerState(NODE, set_name)
    from enforcers.engine import RecordSink
    from enforcers.metrics import EnforcerMetrics
    from enforcers.render import HOOKS, restore_text

    sink = RecordSink(state, EnforcerMetrics())
    for suffix, rec in data.records:
        sink.message(suffix, rec.key.encode(), codec.encode(rec))
    desired = state.desired()
    ipset_text = []
    for name, members in desired.sets.items():
        ipset_text.append(f"create {name} hash:net family inet maxelem 1048576")
        ipset_text += [f"add {name} {m}" for m in members]
    ipt_text = restore_text(desired.chains.values(), (), HOOKS)
    started = time.perf_counter()
    subprocess.run(["ip", "netns", "exec", ns, "ipset", "restore"], input="\n".join(ipset_text)
                   + "\n", text=True, check=True)
    subprocess.run(["ip", "netns", "exec", ns, "iptables-restore", "--noflush"], input=ipt_text,
                   text=True, check=True)
    return time.perf_counter() - started


async def idle_fetch_cpu(bootstrap: str, prefix: str, fetch_wait: int, seconds: float = 3.0
                         ) -> float:
    """What a shorter fetch wait costs: the CPU share of a core a consumer of the enforcer's
    partitions uses while nothing is published (it fetches once per wait)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None,
                                enable_auto_commit=False, fetch_max_wait_ms=fetch_wait)
    await consumer.start()
    try:
        parts = enforcer_partitions(prefix)
        consumer.assign(parts)
        await consumer.seek_to_end(*parts)
        await consumer.getmany(timeout_ms=300)
        cpu, end = time.process_time(), time.monotonic() + seconds
        while time.monotonic() < end:
            await consumer.getmany(timeout_ms=200)
        return (time.process_time() - cpu) / seconds
    finally:
        await consumer.stop()


def late_ip(run: int, i: int) -> str:
    return f"10.{200 + run}.{i >> 8}.{i & 255}"


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def join_latency(bootstrap: str, prefix: str, ns: str, data: Data, joins: int,
                       rate: float, fetch_wait: int, run: int) -> dict[str, Any]:
    """In-process enforcer over the programmed scenario; pods join one selector at ~rate/s.

    ``run`` keeps each call's joining pods and IPs distinct from earlier calls' (a
    membership already known changes nothing, so it would measure nothing)."""
    ipsets = NetlinkIpsets(netns=ns)
    enforcer = Enforcer(EnforcerState(NODE, set_name), Programmer(ipsets, Iptables(ns)),
                        {"bootstrap_servers": bootstrap}, prefix, resync_interval=3600,
                        fetch_max_wait_ms=fetch_wait)
    stop = asyncio.Event()
    task = asyncio.create_task(enforcer.run(stop))
    await asyncio.wait_for(enforcer.synced.wait(), 120)
    floor: list[float] = []

    async def bare() -> None:
        consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None,
                                    enable_auto_commit=False, fetch_max_wait_ms=fetch_wait)
        await consumer.start()
        parts = [TopicPartition(prefix + "memberships", p) for p in range(PARTITIONS)]
        consumer.assign(parts)
        await consumer.seek_to_end(*parts)
        try:
            while not stop.is_set():
                batch = await consumer.getmany(timeout_ms=100)
                now = time.time()
                for msgs in batch.values():
                    for m in msgs:  # only the joins are published after seek_to_end
                        rec = codec.decode_as(MembershipRecord, m.value)
                        if rec is not None:
                            floor.append(now - rec.observed_at)
        finally:
            await consumer.stop()

    bare_task = asyncio.create_task(bare())
    await asyncio.sleep(1.0)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks=1, linger_ms=0)
    await producer.start()
    results: dict[str, Any] = {}
    cases: tuple[tuple[str, Callable[[int], MembershipRecord]], ...] = (
        ("remote_join_10k_set", lambda i: MembershipRecord(
            data.peers[0], f"pod/late{run}/r{i}", f"late{run}", "node-x", "eth0",
            (late_ip(run, i),), time.time())),
        ("local_join_applies_to", lambda i: MembershipRecord(
            data.applies[1 + run], f"pod/shop/local-{i * 10 % 100}", "shop", NODE,
            f"veth{i * 10 % 100}", (f"10.64.0.{i * 10 % 100}",), time.time())),
    )
    try:
        for label, make in cases:
            enforcer.metrics.latency.samples.clear()
            floor.clear()
            n = joins if label.startswith("remote") else min(joins, 10)
            for i in range(n):
                rec = make(i)
                await producer.send_and_wait(prefix + "memberships", codec.encode(rec),
                                             key=rec.key.encode(),
                                             partition=partition_for(rec, PARTITIONS))
                await asyncio.sleep(1.0 / rate)
            await asyncio.sleep(1.0)
            lat = [s * 1000 for s in enforcer.metrics.latency.samples]
            fl = [s * 1000 for s in floor]
            results[label] = {
                "changes": n,
                "programmed": len(lat),
                "p50_ms": pct(lat, 0.5) if lat else None,
                "p99_ms": pct(lat, 0.99) if lat else None,
                "max_ms": max(lat) if lat else None,
                "baseline_broker_only_p50_ms": pct(fl, 0.5) if fl else None,
                "baseline_broker_only_p99_ms": pct(fl, 0.99) if fl else None,
            }
            print(f"  {label}: p50 {results[label]['p50_ms']:.1f} ms, p99 "
                  f"{results[label]['p99_ms']:.1f} ms over {len(lat)} changes; broker-only "
                  f"p50 {results[label]['baseline_broker_only_p50_ms'] or float('nan'):.1f} ms, "
                  f"p99 {results[label]['baseline_broker_only_p99_ms'] or float('nan'):.1f} ms")
        with NetlinkIpsets(netns=ns) as check:
            late = check.list_sets()[set_name(data.peers[0])]
            results["remote_join_10k_set"]["all_in_kernel_set"] = all(
                late_ip(run, i) in late for i in range(joins))
    finally:
        await producer.stop()
        stop.set()
        await asyncio.wait_for(task, 20)
        await asyncio.wait_for(bare_task, 20)
        ipsets.close()
    return results


async def amain(args: argparse.Namespace) -> dict[str, Any]:
    broker: Broker = BROKERS[args.broker]()
    broker.start()
    namespaces: list[str] = []

    def new_ns() -> str:
        name = f"pc-enb-{secrets.token_hex(4)}"
        netns.create(name)
        namespaces.append(name)
        return name

    try:
        prefix = f"bench{secrets.token_hex(3)}."
        report = await check_topics({"bootstrap_servers": broker.bootstrap}, prefix,
                                    PARTITIONS, create=True)
        assert not report.failures(), report.lines()
        data = Data(args.pods, args.policies, args.members, args.remote_endpoints)
        print(f"publishing {len(data.records):,} records to {args.broker} ...", flush=True)
        publish_s = await publish(broker.bootstrap, prefix, data.records)
        print(f"  published in {publish_s:.1f} s")

        cold, restart, bare, floor, other = [], [], [], [], []
        for _ in range(args.reps):
            if args.baseline_tree is not None:  # the other version first, into its own ns
                ns = new_ns()
                other.append(run_enforcer_until_synced(broker.bootstrap, prefix, ns,
                                                       args.baseline_tree))
                assert count_members(ns) == data.members
                print(f"  cold {other[-1]:.2f} s with {args.baseline_tree}", flush=True)
            ns = new_ns()
            cold.append(run_enforcer_until_synced(broker.bootstrap, prefix, ns))
            programmed = count_members(ns)
            assert programmed == data.members, (programmed, data.members)
            restart.append(run_enforcer_until_synced(broker.bootstrap, prefix, ns))
            assert count_members(ns) == data.members
            bare.append((await bare_consume_to_end(broker.bootstrap, prefix))[0])
            floor.append(kernel_floor(new_ns(), data))
            print(f"  cold {cold[-1]:.2f} s, restart {restart[-1]:.2f} s, bare consume "
                  f"{bare[-1]:.2f} s, kernel floor {floor[-1]:.2f} s", flush=True)
        cold_start = {
            "records": len(data.records),
            "set_members": data.members,
            "local_endpoints": args.pods,
            "median_cold_start_s": statistics.median(cold),
            "median_restart_s": statistics.median(restart),
            "baseline_bare_consume_s": statistics.median(bare),
            "baseline_kernel_floor_restore_s": statistics.median(floor),
            "runs": {"cold": cold, "restart": restart, "bare": bare, "floor": floor},
        }
        if other:
            cold_start["baseline_tree"] = str(args.baseline_tree)
            cold_start["baseline_tree_median_cold_start_s"] = statistics.median(other)
            cold_start["runs"]["baseline_tree_cold"] = other
        latency = {}
        for run, wait in enumerate(args.fetch_waits):
            print(f"join latency (observed_at -> programmed), fetch_max_wait_ms={wait}:")
            latency[f"fetch_max_wait_{wait}ms"] = await join_latency(
                broker.bootstrap, prefix, namespaces[0], data, args.joins, args.rate, wait, run)
            idle = await idle_fetch_cpu(broker.bootstrap, prefix, wait)
            latency[f"fetch_max_wait_{wait}ms"]["idle_consumer_cpu_share"] = idle
            print(f"  an idle consumer of the enforcer's {3 * PARTITIONS} partitions: "
                  f"{idle:.1%} of a core")
        return {"cold_start": cold_start, "join_latency": latency}
    finally:
        for name in namespaces:
            netns.remove(name)
        broker.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--broker", choices=sorted(BROKERS), default="tansu")
    parser.add_argument("--pods", type=int, default=100)
    parser.add_argument("--policies", type=int, default=10)
    parser.add_argument("--members", type=int, default=100_000)
    parser.add_argument("--remote-endpoints", type=int, default=10_000)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--joins", type=int, default=300)
    parser.add_argument("--rate", type=float, default=100.0)
    parser.add_argument("--fetch-waits", type=int, nargs="+", default=[50, 10],
                        help="the enforcer's fetch_max_wait_ms values to measure joins with "
                             "(the first is the default the CLI runs with)")
    parser.add_argument("--baseline-tree", type=Path, metavar="DIR",
                        help="also time the cold start of the code in this source tree (e.g. "
                             "`git archive <commit> | tar -x -C DIR`), alternating, same data")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("enforcer_bench needs root (network namespaces)", file=sys.stderr)
        return 2
    load_before = os.getloadavg()
    figures = asyncio.run(amain(args))
    cold = figures["cold_start"]["median_cold_start_s"]
    goals: dict[str, Any] = {
        "cold_start_s": {"goal_at_most": GOAL_COLD_START_S, "value": cold,
                         "met": cold <= GOAL_COLD_START_S},
    }
    print(f"cold start {cold:.2f} s (goal <= {GOAL_COLD_START_S})")
    if "baseline_tree_median_cold_start_s" in figures["cold_start"]:
        print(f"  with {args.baseline_tree}: "
              f"{figures['cold_start']['baseline_tree_median_cold_start_s']:.2f} s")
    for label, runs in figures["join_latency"].items():
        p99 = runs["remote_join_10k_set"]["p99_ms"]
        goals[f"join_p99_ms_{label}"] = {
            "goal_at_most": GOAL_JOIN_P99_MS, "value": p99,
            "met": p99 is not None and p99 <= GOAL_JOIN_P99_MS}
        print(f"join p99 {p99:.1f} ms with {label} (goal <= {GOAL_JOIN_P99_MS})")
    result = {
        "benchmark": "enforcer_bench",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "broker": args.broker,
        "environment": {"kernel": platform.release(), "python": platform.python_version(),
                        "cpus": os.cpu_count(), "load_average_before": load_before,
                        "load_average_after": os.getloadavg()},
        "parameters": {k: str(v) if isinstance(v, Path) else v
                       for k, v in vars(args).items() if k != "output"},
        **figures,
        "goals": goals,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"saved {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
