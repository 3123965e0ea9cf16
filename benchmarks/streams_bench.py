"""Membership stream processor: throughput, policy storm and latency, index vs brute force.

Run: ``.venv/bin/python -m benchmarks.streams_bench [--broker tansu|kafka|none]``.

Workload (seeded): 20,000 pods in 200 namespaces and 500 policies (450 namespaced, 50
global; applies-to and egress peers, some with namespace selectors), 8 partitions.
Every figure is measured twice in the same run: with the label index (production) and
with a brute-force processor that evaluates every registered selector for every endpoint
event (``--brute-force``), same events, same machine.

1. Pure core (no broker): endpoint events/s through `LocalProcessor`; policy storm (a new
   global policy matching every endpoint) until its last membership is computed.
2. One worker (`portcullis process` subprocess, memory store) on a real broker on this
   machine: sustained endpoint events/s (publish as fast as possible until the worker has
   emitted the last event's memberships on every partition); policy storm from publish to
   the 20,000th membership on the topic; latency from each event's ``observed_at`` to its
   membership records on the topic at 100 events/s (p50, p99 over events, using the last
   record of each event); idle CPU of the worker with no input (the price of its fetch
   wait).
3. Optional, for two workers against one (``--modes index,two_workers``):
   ``--backlog-events N`` publishes N events while the workers are stopped (SIGSTOP),
   then resumes them: every worker busy from the first record to the last, with full
   fetches, the fair comparison of CPU per event; ``--paced-rate R`` measures CPU per
   event at a fixed rate; ``--rounds K`` runs the modes K times, alternating, and reports
   each round's CPU ratio and the median. The pure core is also timed in batches of 60
   with 10 ms between them: on this machine the same work then costs 1.2-1.9x the CPU
   (no I/O, nothing else running; most likely colder caches), which any worker that is
   not busy all the time pays.

``--modes index`` skips the baseline (for quick comparisons only; published figures keep
it); ``--py-spy --keep DIR`` samples every worker thread during the sustained phase.
Results are printed and saved to ``--out`` (default ``benchmarks/results/streams_bench.json``;
the committed file merges several runs per broker, see its ``note``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import platform
import random
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from streams.local import LocalProcessor
from topics.partitioner import partition_for_key
from topics.records import EndpointRecord, PolicyRecord, ProfileRecord

RESULTS = Path(__file__).parent / "results" / "streams_bench.json"
REPO = Path(__file__).resolve().parents[1]
PARTITIONS = 8
STORM_SELECTOR = "has(app) && env != 'storm'"

Event = tuple[str, str, Any]


# ---------------------------------------------------------------------------- workload


class Workload:
    """A seeded cluster: namespaces, pods and policies, plus generators of changes."""

    def __init__(self, endpoints: int, policies: int, seed: int = 7) -> None:
        self.rng = random.Random(seed)
        self.namespaces = [f"ns{i:03d}" for i in range(200)]
        self.apps = [f"app{i}" for i in range(50)]
        self.pods: dict[str, EndpointRecord] = {}
        for i in range(endpoints):
            ns = self.namespaces[i % len(self.namespaces)]
            self.pods[f"pod/{ns}/pod-{i}"] = self._pod(ns, f"pod-{i}", i, self.apps[i % 50],
                                                     1.0)
        self.profiles = [
            ProfileRecord(kind="namespace", namespace=ns, name=None,
                          labels={"team": f"t{i % 10}"}, observed_at=1.0)
            for i, ns in enumerate(self.namespaces)
        ]
        self.policies = [self._policy(j) for j in range(policies)]
        self._keys = list(self.pods)
        self._ip = 0

    def _pod(self, ns: str, name: str, i: int, app: str, at: float,
             ip: str | None = None) -> EndpointRecord:
        return EndpointRecord(
            kind="pod", namespace=ns, name=name, node=f"node-{i % 100}",
            interface=f"cali{i:08x}",
            ips=(ip or f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}",),
            labels={"app": app, "env": "dev" if i % 3 == 0 else "prod", "version": f"v{i % 4}"},
            service_account=f"sa{i % 5}", source="kubernetes", observed_at=at,
        )

    def _policy(self, j: int) -> PolicyRecord:
        rng = self.rng
        if j == 0:  # a default policy every endpoint falls under
            spec: dict[str, Any] = {"selector": "has(app)", "types": ["Egress"],
                                    "egress": [{"action": "Allow",
                                                "destination": {"nets": ["10.0.0.0/8"]}}]}
            return self._record(f"default-{j}", None, spec)
        app = rng.choice(self.apps)
        peer = rng.choice(self.apps)
        if j % 10 == 0:  # global
            spec = {"selector": f"env == 'prod' && app == '{app}'", "types": ["Egress"],
                    "egress": [{"action": "Allow", "destination": {
                        "selector": f"app == '{peer}'",
                        "namespaceSelector": f"team == 't{j % 10}'"}}]}
            return self._record(f"global-{j}", None, spec)
        ns = self.namespaces[j % len(self.namespaces)]
        destination: dict[str, Any] = {"selector": f"app in {{'{peer}', '{app}'}}"}
        if j % 3 == 0:
            destination["namespaceSelector"] = f"team == 't{rng.randrange(10)}'"
        spec = {"selector": f"app == '{app}'", "types": ["Egress"],
                "egress": [{"action": "Allow", "destination": destination}]}
        return self._record(f"np-{j}", ns, spec)

    @staticmethod
    def _record(name: str, ns: str | None, spec: dict[str, Any], at: float = 1.0) -> PolicyRecord:
        kind = "NetworkPolicy" if ns else "GlobalNetworkPolicy"
        metadata: dict[str, Any] = {"name": name}
        if ns:
            metadata["namespace"] = ns
        doc = {"apiVersion": "projectcalico.org/v3", "kind": kind, "metadata": metadata,
               "spec": spec}
        return PolicyRecord(kind=kind, namespace=ns, name=name, document=doc, actor="bench",
                            applied_at=at, observed_at=at)

    def preload(self) -> list[Event]:
        events: list[Event] = [("profiles", p.key, p) for p in self.profiles]
        events += [("policies", p.key, p) for p in self.policies]
        events += [("endpoints", k, v) for k, v in self.pods.items()]
        return events

    def update(self, at: float, key: str | None = None, relabel: bool = True) -> Event:
        """An endpoint changes app label (moving memberships) and gets a fresh IP."""
        if key is None:
            key = self.rng.choice(self._keys)
        old = self.pods[key]
        self._ip += 1
        i = int(old.name.rpartition("-")[2])
        ip = f"172.{16 + (self._ip >> 16) % 16}.{(self._ip >> 8) & 255}.{self._ip & 255}"
        app = self.rng.choice(self.apps) if relabel else old.labels["app"]
        new = self._pod(old.namespace or "", old.name, i, app, at, ip)
        self.pods[key] = new
        return ("endpoints", key, new)

    def updates(self, n: int, at: Callable[[], float]) -> list[Event]:
        return [self.update(at()) for _ in range(n)]

    def markers(self, at: float) -> dict[str, Event]:
        """One update per partition: once its membership shows up, the partition is done."""
        out: dict[str, Event] = {}
        for key in self.pods:
            p = partition_for_key(key.split("/")[1], PARTITIONS)
            if f"p{p}" not in out:
                out[f"p{p}"] = self.update(at, key, relabel=False)
            if len(out) == PARTITIONS:
                break
        return out

    def storm(self, at: float) -> PolicyRecord:
        return self._record("storm", None, {"selector": STORM_SELECTOR, "types": ["Egress"]}, at)


def partition_of(suffix: str, key: str) -> int:
    if suffix == "profiles":
        return partition_for_key(key[4:].partition(".")[0], PARTITIONS)
    _kind, ns, name = key.split("/")
    return partition_for_key(ns or name, PARTITIONS)


# ---------------------------------------------------------------------------- pure core


def publish_local(proc: LocalProcessor, events: list[Event]) -> None:
    for suffix, key, record in events:
        if suffix == "endpoints":
            proc.publish_endpoint(key, record)
        elif suffix == "profiles":
            proc.publish_profile(key, record)
        else:
            proc.publish_policy(key, record)


def bench_pure(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for mode in ("index", "brute_force"):
        wl = Workload(args.endpoints, args.policies)
        proc = LocalProcessor(PARTITIONS, brute_force=mode == "brute_force")
        t0 = time.perf_counter()
        publish_local(proc, wl.preload())
        proc.drain()
        preload = time.perf_counter() - t0
        members = len(proc.memberships)
        selectors = len({uid for st in proc.match for uid in st.selectors})
        n = args.pure_updates
        updates = wl.updates(n, lambda: 2.0)
        publish_local(proc, updates)
        t0 = time.perf_counter()
        proc.drain()
        rate = n / (time.perf_counter() - t0)
        publish_local(proc, [("policies", "GlobalNetworkPolicy//storm", wl.storm(3.0))])
        t0 = time.perf_counter()
        proc.drain()
        storm = time.perf_counter() - t0
        out[mode] = {"preload_s": preload, "members_after_preload": members,
                     "selectors": selectors, "endpoint_events_per_s": rate, "storm_s": storm}
        if mode == "index":
            out[mode]["spacing"] = _spacing(proc, wl)
        print(f"  pure {mode:11}: preload {preload:6.2f} s ({selectors} selectors, {members} "
              f"members); {rate:8.0f} endpoint events/s; storm {storm * 1000:7.1f} ms",
              flush=True)
    spacing = out["index"]["spacing"]
    print(f"  pure index in batches of {SPACING_BATCH}: {spacing['back_to_back_us']:.1f} CPU-µs "
          f"per event back to back, {spacing['spaced_us']:.1f} with {SPACING_GAP * 1000:.0f} ms "
          f"between batches ({spacing['spaced_us'] / spacing['back_to_back_us']:.2f}x for the "
          "same work)", flush=True)
    return out


#: `_spacing`: events per batch and the gap between batches (60 every 10 ms: 6,000/s)
SPACING_BATCH, SPACING_GAP = 60, 0.01


def _spacing(proc: LocalProcessor, wl: Workload, batches: int = 100) -> dict[str, float]:
    """The pure core's CPU per event in small batches, back to back and with a gap between
    them (nothing else running, no I/O): what a worker's batches cost when it is not busy
    all the time, on this machine, whatever the worker does between them."""
    out: dict[str, float] = {}
    for name, gap in (("back_to_back_us", 0.0), ("spaced_us", SPACING_GAP)):
        used = 0.0
        for _ in range(batches):
            publish_local(proc, wl.updates(SPACING_BATCH, lambda: 2.0))
            start = time.process_time()
            proc.drain()
            used += time.process_time() - start
            if gap:
                time.sleep(gap)
        out[name] = used / (batches * SPACING_BATCH) * 1e6
    return out


# ---------------------------------------------------------------------------- broker


class MembershipWatch:
    """Reads the memberships topic from its end onwards and answers "seen yet?"."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.bootstrap, self.topic = bootstrap, topic
        self.latest_ips: dict[str, tuple[str, ...]] = {}  # endpoint key -> last IPs seen
        self.live: set[bytes] = set()  # membership keys, compacted
        self.count_by_uid: dict[str, int] = {}
        self.last_arrival: dict[float, float] = {}  # observed_at -> last arrival time
        self.first_arrival: dict[float, float] = {}
        self.records = 0
        self.worker: subprocess.Popen[bytes] | None = None  # fail fast if it exits
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        from aiokafka import AIOKafkaConsumer, TopicPartition

        self.consumer = AIOKafkaConsumer(bootstrap_servers=self.bootstrap,
                                         enable_auto_commit=False, fetch_max_wait_ms=10)
        await self.consumer.start()
        tps = [TopicPartition(self.topic, p) for p in range(PARTITIONS)]
        self.consumer.assign(tps)
        await self.consumer.seek_to_end(*tps)
        for tp in tps:
            await self.consumer.position(tp)
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        import orjson

        while True:
            batch = await self.consumer.getmany(timeout_ms=50)
            now = time.time()
            for messages in batch.values():
                for msg in messages:
                    if msg.value is None:
                        self.live.discard(msg.key)
                        continue
                    self.live.add(msg.key)
                    self.records += 1
                    data = orjson.loads(msg.value)
                    self.latest_ips[data["endpoint_key"]] = tuple(data["ips"])
                    uid = data["selector_uid"]
                    self.count_by_uid[uid] = self.count_by_uid.get(uid, 0) + 1
                    at = data["observed_at"]
                    self.first_arrival.setdefault(at, now)
                    self.last_arrival[at] = now

    async def wait(self, done: Callable[[], bool], timeout: float) -> float:
        deadline = time.monotonic() + timeout
        while not done():
            if self.worker is not None and self.worker.poll() is not None:
                raise TimeoutError(f"the worker exited with status {self.worker.returncode}")
            if time.monotonic() > deadline:
                raise TimeoutError("the worker did not produce the expected memberships")
            await asyncio.sleep(0.005)
        return time.time()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.consumer.stop()


async def publish(producer: Any, prefix: str, events: list[Event]) -> None:
    from topics.codec import encode

    futures = []
    for suffix, key, record in events:
        futures.append(await producer.send(
            prefix + suffix, key=key.encode(),
            value=encode(record) if record is not None else None,
            partition=partition_of(suffix, key)))
    await asyncio.gather(*futures)


def cpu_seconds(pid: int, stat: str = "") -> float:
    """User + system CPU time of a process so far (Linux /proc), robust to a busy machine."""
    import os

    fields = Path(stat or f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main_thread_cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process's main thread (the rest: its other threads)."""
    return cpu_seconds(pid, f"/proc/{pid}/task/{pid}/stat")


def context_switches(pid: int) -> tuple[int, int]:
    """(voluntary, involuntary) context switches of a process's main thread so far."""
    fields = dict(line.split(":", 1) for line in
                  Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return (int(fields["voluntary_ctxt_switches"]), int(fields["nonvoluntary_ctxt_switches"]))


def _per_1k(voluntary: int, involuntary: int, events: int) -> dict[str, float]:
    return {"voluntary": voluntary / events * 1000, "involuntary": involuntary / events * 1000}


def markers_done(watch: MembershipWatch, markers: dict[str, Event]) -> Callable[[], bool]:
    wanted = {key: rec.ips for _s, key, rec in markers.values()}
    return lambda: all(watch.latest_ips.get(k) == ips for k, ips in wanted.items())


async def bench_worker(args: argparse.Namespace, bootstrap: str, mode: str,
                       log_dir: Path, members: int) -> dict[str, Any]:
    """One worker through every phase; `members` is what the preload must end with."""
    from aiokafka import AIOKafkaProducer

    from policy.selectors import parse
    from portcullis.topics_admin import check_topics

    prefix = f"bench{uuid.uuid4().hex[:6]}."
    report = await check_topics({"bootstrap_servers": bootstrap}, prefix, PARTITIONS, 1,
                                create=True, timeout=30)
    if report.failures():
        raise SystemExit("\n".join(report.lines()))
    wl = Workload(args.endpoints, args.policies)
    mode_args, count = MODES[mode]
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=2,
                                max_batch_size=256 * 1024)
    await producer.start()
    watch = MembershipWatch(bootstrap, prefix + "memberships")
    await watch.start()
    workers = [_start_worker(args, bootstrap, prefix, mode, mode_args, log_dir, i)
               for i in range(count)]
    worker = workers[0]
    watch.worker = worker

    def cpu() -> float:
        return sum(cpu_seconds(w.pid) for w in workers)

    def main_cpu() -> float:
        return sum(main_thread_cpu_seconds(w.pid) for w in workers)

    def switches() -> tuple[int, int]:
        counts = [context_switches(w.pid) for w in workers]
        return (sum(c[0] for c in counts), sum(c[1] for c in counts))

    result: dict[str, Any] = {}
    try:
        # preload: 20,000 endpoints and 500 policies, then markers to know it is all in
        t0 = time.time()
        await publish(producer, prefix, wl.preload())
        markers = wl.markers(1.5)
        await publish(producer, prefix, list(markers.values()))
        done = markers_done(watch, markers)
        await watch.wait(lambda: done() and len(watch.live) == members, timeout=args.timeout)
        result["preload_s"] = time.time() - t0
        print(f"  worker {mode:11}: preload done in {result['preload_s']:.1f} s "
              f"({watch.records} membership records)", flush=True)

        # sustained endpoint events: publish N as fast as possible, then markers
        n = args.updates
        events = wl.updates(n, lambda: 2.0)
        markers = wl.markers(2.5)
        spies = _start_py_spies(args, workers, log_dir, f"worker-{mode}")
        cpu0, main0, switches0 = cpu(), main_cpu(), switches()
        t0 = time.time()
        await publish(producer, prefix, events + list(markers.values()))
        published = time.time() - t0
        t1 = await watch.wait(markers_done(watch, markers), timeout=args.timeout)
        cpu_used, main_used = cpu() - cpu0, main_cpu() - main0
        voluntary, involuntary = (b - a for a, b in zip(switches0, switches(), strict=True))
        _stop_py_spies(spies)
        result["endpoint_events_per_s"] = (n + len(markers)) / (t1 - t0)
        result["endpoint_events_per_worker_cpu_s"] = (n + len(markers)) / cpu_used
        result["worker_cpu_s_per_event"] = cpu_used / (n + len(markers))
        # Faust's consumer (aiokafka) runs in a thread of its own: fetching vs processing
        result["worker_main_thread_cpu_share"] = main_used / cpu_used
        # the main thread's switches per 1,000 events: involuntary ones mean a busy machine
        result["worker_switches_per_1k_events"] = _per_1k(voluntary, involuntary,
                                                           n + len(markers))
        result["workers"] = count
        result["publish_s"] = published
        print(f"  worker {mode:11}: {result['endpoint_events_per_s']:.0f} endpoint events/s "
              f"({n} events; publishing alone took {published:.2f} s; "
              f"{result['endpoint_events_per_worker_cpu_s']:.0f} events per worker CPU-second, "
              f"{result['worker_main_thread_cpu_share']:.0%} in the main thread; per 1,000 "
              f"events {result['worker_switches_per_1k_events']['voluntary']:.0f} voluntary, "
              f"{result['worker_switches_per_1k_events']['involuntary']:.0f} involuntary "
              "context switches)",
              flush=True)

        # the same events at a fixed rate: the workers see small batches with gaps between
        # them, which cost more CPU per event on this machine (see `_spacing`)
        if args.paced_rate:
            spies = _start_py_spies(args, workers, log_dir, f"worker-{mode}-paced")
            result["paced"] = await _paced(producer, prefix, wl, watch, args, cpu, switches)
            _stop_py_spies(spies)
            paced = result["paced"]
            print(f"  worker {mode:11}: paced at {args.paced_rate}/s: "
                  f"{paced['worker_cpu_s_per_event'] * 1000:.3f} worker CPU-ms per event "
                  f"({paced['events']} events; per 1,000 events "
                  f"{paced['switches_per_1k_events']['involuntary']:.0f} involuntary "
                  "context switches)", flush=True)

        # a backlog: the workers stopped (SIGSTOP) while the events are published, then
        # let go: every worker busy from the first record to the last, with full fetches
        # (flat out above, two workers outrun the publisher and work in smaller batches
        # with gaps, which costs more CPU per event on this machine: see `_spacing`)
        if args.backlog_events:
            result["backlog"] = await _backlog(producer, prefix, wl, watch, args, workers,
                                               cpu, switches)
            backlog = result["backlog"]
            print(f"  worker {mode:11}: backlog of {backlog['events']}: "
                  f"{backlog['endpoint_events_per_s']:.0f} endpoint events/s, "
                  f"{backlog['worker_cpu_s_per_event'] * 1000:.3f} worker CPU-ms per event "
                  f"(per 1,000 events {backlog['switches_per_1k_events']['involuntary']:.0f} "
                  "involuntary context switches)", flush=True)

        # latency at a fixed rate; observed_at is the publish time of each event
        rate, seconds = args.rate, args.latency_seconds
        sent: list[float] = []
        start = time.time()
        for k in range(int(rate * seconds)):
            due = start + k / rate
            await asyncio.sleep(max(0.0, due - time.time()))
            at = time.time()
            sent.append(at)
            await publish(producer, prefix, [wl.update(at)])
        await asyncio.sleep(2.0)
        lat_last = [watch.last_arrival[a] - a for a in sent if a in watch.last_arrival]
        lat_first = [watch.first_arrival[a] - a for a in sent if a in watch.first_arrival]
        result["latency"] = {
            "rate_per_s": rate, "events": len(sent), "events_seen": len(lat_last),
            "p50_ms": _pct(lat_last, 50) * 1000, "p99_ms": _pct(lat_last, 99) * 1000,
            "first_record_p50_ms": _pct(lat_first, 50) * 1000,
            "first_record_p99_ms": _pct(lat_first, 99) * 1000,
        }
        print(f"  worker {mode:11}: latency at {rate}/s: p50 {result['latency']['p50_ms']:.1f}"
              f" ms, p99 {result['latency']['p99_ms']:.1f} ms "
              f"({len(lat_last)}/{len(sent)} events seen)", flush=True)

        # idle: what the worker burns with nothing to do (fetch polling, heartbeats)
        cpu0, t0 = cpu(), time.time()
        await asyncio.sleep(args.idle_seconds)
        result["idle_cpu_percent"] = (cpu() - cpu0) / (time.time() - t0) * 100
        print(f"  worker {mode:11}: idle CPU {result['idle_cpu_percent']:.1f}% of a core",
              flush=True)

        # policy storm: a new global policy whose selector matches every endpoint
        uid = parse(STORM_SELECTOR).uid
        target = len(wl.pods)
        cpu0 = cpu()
        t0 = time.time()
        await publish(producer, prefix,
                      [("policies", "GlobalNetworkPolicy//storm", wl.storm(t0))])
        t1 = await watch.wait(lambda: watch.count_by_uid.get(uid, 0) >= target,
                              timeout=args.timeout)
        result["storm_s"] = t1 - t0
        result["storm_worker_cpu_s"] = cpu() - cpu0
        print(f"  worker {mode:11}: policy storm: {target} memberships in "
              f"{result['storm_s']:.2f} s", flush=True)
    finally:
        for w in workers:
            w.send_signal(signal.SIGTERM)
        for w in workers:
            try:
                w.wait(30)
            except subprocess.TimeoutExpired:
                w.kill()
        await watch.stop()
        await producer.stop()
    return result


async def _backlog(producer: Any, prefix: str, wl: Workload, watch: MembershipWatch,
                   args: argparse.Namespace, workers: list[subprocess.Popen[bytes]],
                   cpu: Callable[[], float],
                   switches: Callable[[], tuple[int, int]]) -> dict[str, Any]:
    """Publish `--backlog-events` events and markers with every worker stopped, then resume
    them; their CPU per event and the events/s from the resume to the last membership."""
    n = args.backlog_events
    events = wl.updates(n, lambda: 2.8)  # after the paced phase's markers (2.7)
    markers = wl.markers(2.9)
    for w in workers:
        w.send_signal(signal.SIGSTOP)
    stopped = time.time()
    try:
        await publish(producer, prefix, events + list(markers.values()))
    finally:
        cpu0, switches0 = cpu(), switches()
        start = time.time()
        for w in workers:
            w.send_signal(signal.SIGCONT)
    end = await watch.wait(markers_done(watch, markers), timeout=args.timeout)
    used = cpu() - cpu0
    voluntary, involuntary = (b - a for a, b in zip(switches0, switches(), strict=True))
    total = n + len(markers)
    # stopped longer than the session timeout (3 s), a worker is out of the group and
    # rejoins: a rebalance within the figures
    return {"events": total, "endpoint_events_per_s": total / (end - start),
            "stopped_s": start - stopped, "worker_cpu_s_per_event": used / total,
            "switches_per_1k_events": _per_1k(voluntary, involuntary, total)}


async def _paced(producer: Any, prefix: str, wl: Workload, watch: MembershipWatch,
                 args: argparse.Namespace, cpu: Callable[[], float],
                 switches: Callable[[], tuple[int, int]]) -> dict[str, Any]:
    """Publish `--paced-rate` events/s for `--paced-seconds` (100 slices a second), then
    markers; the workers' CPU per event from the first publish to the last membership."""
    rate, seconds = args.paced_rate, args.paced_seconds
    n = int(rate * seconds)
    events = wl.updates(n, lambda: 2.6)  # after the sustained phase's markers (2.5)
    markers = wl.markers(2.7)
    per_slice = max(1, rate // 100)
    cpu0, switches0 = cpu(), switches()
    start = time.time()
    for k, first in enumerate(range(0, n, per_slice)):
        await asyncio.sleep(max(0.0, start + k / 100 - time.time()))
        await publish(producer, prefix, events[first:first + per_slice])
    await publish(producer, prefix, list(markers.values()))
    await watch.wait(markers_done(watch, markers), timeout=args.timeout)
    used = cpu() - cpu0
    voluntary, involuntary = (b - a for a, b in zip(switches0, switches(), strict=True))
    total = n + len(markers)
    return {"rate_per_s": rate, "events": total, "wall_s": time.time() - start,
            "worker_cpu_s_per_event": used / total,
            "switches_per_1k_events": _per_1k(voluntary, involuntary, total)}


#: Worker modes: extra `portcullis process` arguments, and how many workers share the group.
MODES: dict[str, tuple[list[str], int]] = {
    "index": ([], 1),
    "brute_force": (["--brute-force"], 1),
    "one_at_a_time": (["--batch-size=1"], 1),
    "two_workers": ([], 2),
}


def _start_worker(args: argparse.Namespace, bootstrap: str, prefix: str, mode: str,
                  mode_args: list[str], log_dir: Path, i: int) -> subprocess.Popen[bytes]:
    from portcullis.brokers import die_with_parent_fn

    name = mode if i == 0 else f"{mode}-{i}"
    launcher = "import sys; from portcullis.cli import main; sys.exit(main())"
    if args.profile:
        launcher = (f"import cProfile; from portcullis.cli import main; "
                    f"cProfile.run('main()', {str(log_dir / f'worker-{name}.prof')!r})")
    cmd = [sys.executable, "-c", launcher,
           "process", "--store", "memory", "--bootstrap", bootstrap, "--topic-prefix", prefix,
           "--partitions", str(PARTITIONS), "--session-timeout", "3", "--log-level", "WARNING",
           "--data-dir", str(log_dir / f"data-{name}"), *mode_args, *_worker_args(args)]
    with open(log_dir / f"worker-{name}.log", "wb") as log:
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                                preexec_fn=die_with_parent_fn())


def _worker_args(args: argparse.Namespace) -> list[str]:
    """The worker's settings: --worker-arg if given, else the broker's defaults.

    Tansu answers a held fetch only when its wait ends (deploy/README.md), so there the
    worker fetches with a 10 ms wait and batches its writes for 5 ms; on Kafka the
    defaults (20 ms, 20 ms) trade nothing in latency for more events per CPU-second.
    """
    if args.worker_arg:
        return list(args.worker_arg)
    return ["--fetch-max-wait=0.01", "--producer-linger=0.005"] if args.broker == "tansu" else []


def _start_py_spies(args: argparse.Namespace, workers: list[subprocess.Popen[bytes]],
                    log_dir: Path, stem: str) -> list[subprocess.Popen[bytes]]:
    """Sample every worker (`<stem>-<i>.spy.txt`) as collapsed stacks: the thread holding
    the GIL only, so the samples show where CPU time goes (not idle waits)."""
    if not args.py_spy:
        return []
    py_spy = str(Path(sys.executable).parent / "py-spy")
    if not Path(py_spy).exists():
        raise SystemExit(f"--py-spy: {py_spy} not found; install it with "
                         f"`{sys.executable} -m pip install py-spy`")
    spies = [subprocess.Popen([py_spy, "record", "--pid", str(w.pid), "--format", "raw",
                               "--rate", "200", "--threads", "--gil",
                               "--output", str(log_dir / f"{stem}-{i}.spy.txt")],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
             for i, w in enumerate(workers)]
    time.sleep(0.5)  # attached before the first event
    return spies


def _stop_py_spies(spies: list[subprocess.Popen[bytes]]) -> None:
    for spy in spies:
        spy.send_signal(signal.SIGINT)
    for spy in spies:
        spy.wait(30)


def _pct(values: list[float], pct: int) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(pct / 100 * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--broker", choices=["tansu", "kafka", "none"], default="tansu")
    parser.add_argument("--endpoints", type=int, default=20_000)
    parser.add_argument("--policies", type=int, default=500)
    parser.add_argument("--updates", type=int, default=10_000)
    parser.add_argument("--pure-updates", type=int, default=10_000)
    parser.add_argument("--rate", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=1,
                        help="run the worker modes this many times, alternating (medians of "
                        "the per-round CPU ratios are reported)")
    parser.add_argument("--backlog-events", type=int, default=0, metavar="N",
                        help="also measure the workers on a backlog of N events, published "
                        "while they are stopped (0: not)")
    parser.add_argument("--paced-rate", type=int, default=0, metavar="EVENTS_PER_S",
                        help="also measure worker CPU per event at this fixed rate (0: not)")
    parser.add_argument("--paced-seconds", type=float, default=6.0)
    parser.add_argument("--latency-seconds", type=float, default=10.0)
    parser.add_argument("--idle-seconds", type=float, default=5.0)
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--keep", type=Path, default=None, metavar="DIR",
                        help="keep worker logs (and profiles) in DIR instead of a temp dir")
    parser.add_argument("--modes", default="index,brute_force",
                        help="worker modes to run, comma-separated, of "
                        f"{', '.join(MODES)} (default index,brute_force: the brute-force "
                        "baseline belongs beside every published figure; one_at_a_time is "
                        "the unbatched worker, --batch-size=1; two_workers shares the "
                        "partitions between two workers)")
    parser.add_argument("--worker-arg", action="append", default=[], metavar="ARG",
                        help="pass ARG to `portcullis process` (repeatable), e.g. "
                        "--worker-arg=--fetch-max-wait=0.01")
    parser.add_argument("--py-spy", action="store_true",
                        help="sample every worker with py-spy during the sustained and paced "
                        "phases (worker-<mode>[-paced]-<i>.spy.txt, collapsed stacks, with "
                        "--keep)")
    parser.add_argument("--profile", action="store_true",
                        help="run workers under cProfile (worker-<mode>.prof, with --keep)")
    args = parser.parse_args()

    results: dict[str, Any] = {
        "machine": {"python": platform.python_version(), "platform": platform.platform(),
                    "cpus": __import__("os").cpu_count()},
        "workload": {"endpoints": args.endpoints, "policies": args.policies,
                     "partitions": PARTITIONS, "updates": args.updates, "rate": args.rate},
        "goals": {"endpoint_events_per_s": 2000, "storm_s": 2.0, "latency_p99_ms": 100},
    }
    print("pure core (no broker):", flush=True)
    results["pure"] = bench_pure(args)
    if args.broker != "none":
        from portcullis.brokers import BROKERS

        broker = BROKERS[args.broker]()
        broker.start()
        worker_args = _worker_args(args)
        print(f"one worker on {args.broker} ({broker.bootstrap}), "
              f"`portcullis process` {' '.join(worker_args) or 'defaults'}:", flush=True)
        try:
            with tempfile.TemporaryDirectory(prefix="pc-streams-bench-") as tmp:
                if args.keep:
                    args.keep.mkdir(parents=True, exist_ok=True)
                    tmp = str(args.keep)
                results["broker"] = args.broker
                results["worker_args"] = worker_args
                rounds = [run_modes(args, broker.bootstrap, Path(tmp), results["pure"], r)
                          for r in range(args.rounds)]
                results["worker"] = rounds[0]
                if args.rounds > 1:
                    results["worker_rounds"] = rounds
                results["cpu_per_event_ratios"] = cpu_ratios(rounds)
        finally:
            broker.stop()
    print_table(results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"saved {args.out}")


def run_modes(args: argparse.Namespace, bootstrap: str, log_dir: Path,
              pure: dict[str, Any], round_number: int) -> dict[str, Any]:
    """Every worker mode once, in order (one round)."""
    if args.rounds > 1:
        print(f" round {round_number + 1} of {args.rounds}:", flush=True)
    out: dict[str, Any] = {}
    for mode in args.modes.split(","):
        members = pure["brute_force" if mode == "brute_force" else "index"]
        try:
            out[mode] = asyncio.run(
                bench_worker(args, bootstrap, mode, log_dir, members["members_after_preload"]))
        except TimeoutError as exc:
            out[mode] = {"error": str(exc)}
            print(f"  worker {mode}: {exc}", flush=True)
            log = log_dir / f"worker-{mode}.log"
            print(log.read_text(errors="replace")[-3000:], flush=True)
    return out


def cpu_ratios(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Per mode, its worker CPU per event ÷ the index worker's in the same round (flat out,
    and paced and on a backlog where measured), each round's and the median; two workers'
    capacity is 2 ÷ the ratio times one worker's."""
    import statistics

    out: dict[str, Any] = {}
    for mode in rounds[0]:
        for phase in ("", "paced_", "backlog_"):
            pairs = [(_cpu_per_event(r.get("index", {}), phase),
                      _cpu_per_event(r.get(mode, {}), phase)) for r in rounds]
            ratios = [b / a for a, b in pairs if a and b]
            if mode == "index" or not ratios:
                continue
            median = statistics.median(ratios)
            entry: dict[str, Any] = {"per_round": [round(x, 3) for x in ratios],
                                     "median": median}
            if mode == "two_workers":
                entry["capacity_vs_one_worker"] = 2 / median
            out[f"{phase}{mode}"] = entry
    return out


def _cpu_per_event(result: dict[str, Any], phase: str) -> float | None:
    figures = result.get(phase.rstrip("_"), {}) if phase else result
    value: float | None = figures.get("worker_cpu_s_per_event")
    return value


def print_table(results: dict[str, Any]) -> None:
    def ratio(a: float, b: float) -> str:
        return f"{a / b:.1f}x" if b else "-"

    pure = results["pure"]
    rows = [("pure: endpoint events/s", pure["index"]["endpoint_events_per_s"],
             pure["brute_force"]["endpoint_events_per_s"], True),
            ("pure: policy storm (s)", pure["index"]["storm_s"],
             pure["brute_force"]["storm_s"], False)]
    worker = results.get("worker", {})
    idx, bf = worker.get("index", {}), worker.get("brute_force", {})
    if "endpoint_events_per_s" in idx and "endpoint_events_per_s" in bf:
        rows += [("worker: endpoint events/s", idx["endpoint_events_per_s"],
                  bf["endpoint_events_per_s"], True),
                 ("worker: events/worker CPU-s", idx["endpoint_events_per_worker_cpu_s"],
                  bf["endpoint_events_per_worker_cpu_s"], True),
                 ("worker: policy storm (s)", idx["storm_s"], bf["storm_s"], False),
                 ("worker: latency p50 (ms)", idx["latency"]["p50_ms"],
                  bf["latency"]["p50_ms"], False),
                 ("worker: latency p99 (ms)", idx["latency"]["p99_ms"],
                  bf["latency"]["p99_ms"], False)]
    print(f"\n{'figure':30} {'index':>12} {'brute force':>12} {'index gain':>11}")
    for name, a, b, higher_better in rows:
        gain = ratio(a, b) if higher_better else ratio(b, a)
        print(f"{name:30} {a:12.3f} {b:12.3f} {gain:>11}")
    print_batching(worker)
    for name, entry in results.get("cpu_per_event_ratios", {}).items():
        capacity = entry.get("capacity_vs_one_worker")
        print(f"{name}: worker CPU per event ÷ the index worker's, per round "
              f"{entry['per_round']}, median {entry['median']:.2f}x"
              + (f" (two workers: {capacity:.2f}x one worker's capacity)" if capacity else ""))


def print_batching(worker: dict[str, Any]) -> None:
    """Batched (index) against one event at a time, and two workers against one."""
    idx = worker.get("index", {})
    if "endpoint_events_per_s" not in idx:
        return
    for mode, label in (("one_at_a_time", "one at a time"), ("two_workers", "two workers")):
        other = worker.get(mode, {})
        if "endpoint_events_per_s" not in other:
            continue
        print(f"\n{'figure':30} {'batched':>12} {label:>14} {'its ÷ batched':>14}")
        for name, key in (("worker: endpoint events/s", "endpoint_events_per_s"),
                          ("worker CPU-ms per event", "worker_cpu_s_per_event"),
                          ("latency p99 (ms) at rate", "latency")):
            a, b = idx[key], other[key]
            if key == "latency":
                a, b = a["p99_ms"], b["p99_ms"]
            if key == "worker_cpu_s_per_event":
                a, b = a * 1000, b * 1000
            print(f"{name:30} {a:12.3f} {b:14.3f} {b / a if a else float('nan'):7.2f}x")


if __name__ == "__main__":
    main()
