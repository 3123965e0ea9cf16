"""Drive the real pipeline under churn on a real broker and measure it end to end.

What runs (one scenario of `benchmarks.churn.scenarios`):

1. a broker: the embedded Tansu (default), Apache Kafka in KRaft (`kafka`), or one given
   with ``--bootstrap`` (`external`); topics are created under a fresh prefix;
2. the synthetic cluster is published as the watchers publish it (`watchers.publisher`);
3. the processor, `portcullis process` (Faust, rocksdb store), as a subprocess;
4. dry-run enforcers for the simulated nodes (`benchmarks.churn.fleet`), and, as root, one
   real enforcer (`enforcers.engine.Enforcer`) programming ipsets and iptables in a network
   namespace this run creates and removes;
5. the churn phases (and the storm or the restarts), with a progress line on stderr;
6. the consistency checker on the final state, then the naive baseline on the same events.

Latency is from each event's ``observed_at`` (stamped when the event is published) to the
moment each affected node has programmed it; an event's latency is the largest over the
nodes it affected. Results: a JSON file, a PNG plot and a Markdown table.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import itertools
import json
import os
import platform
import random
import re
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import policy
from benchmarks.churn import checker, stages
from benchmarks.churn.cluster import (
    ChurnGenerator,
    Cluster,
    build_cluster,
    storm_documents,
    storm_records,
)
from benchmarks.churn.fleet import Fleet, Sample
from benchmarks.churn.pipeline import NaivePipeline, PurePipeline, initial_records
from benchmarks.churn.scenarios import Phase, Scenario
from enforcers import DEFAULT_FETCH_MIN_BYTES
from portcullis.brokers import die_with_parent_fn

__all__ = ["BenchError", "Options", "run"]

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "benchmarks" / "results"


WATCHER = "watcher (publisher)"
PROCESSOR = "processor (faust)"
REAL = "real enforcer (own process)"
FLEET = "fleet nodes (thread CPU)"
HARNESS = "harness (fleet, publisher)"


class BenchError(RuntimeError):
    """The benchmark could not run (a missing piece, a broker that did not start)."""


@dataclass
class Options:
    broker: str = "tansu"  # tansu | kafka | external
    bootstrap: str | None = None
    seed: int | None = None
    out: Path = RESULTS
    real_enforcer: bool | None = None  # None: when root
    baseline: bool = True
    sim_nodes: int | None = None
    progress: bool = True
    partitions: int | None = None
    write: bool = True
    real_fetch_min_bytes: int = DEFAULT_FETCH_MIN_BYTES  # the real enforcer's, as `enforce`


# --------------------------------------------------------------------------- measuring


def percentiles(values: Iterable[float]) -> dict[str, float | int | None]:
    data = sorted(values)
    if not data:
        return {"n": 0, "p50": None, "p90": None, "p99": None, "max": None}

    def at(q: float) -> float:
        return data[min(len(data) - 1, int(q * len(data)))]

    return {"n": len(data), "p50": at(0.50), "p90": at(0.90), "p99": at(0.99), "max": data[-1]}


def proc_cpu(pid: int | None = None) -> float:
    """CPU seconds (user + system) of a process, from /proc (children not included)."""
    path = f"/proc/{pid or 'self'}/stat"
    try:
        fields = Path(path).read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def proc_peak_rss(pid: int | None = None) -> float | None:
    """Peak resident memory in MiB (VmHWM), from /proc."""
    if pid is None:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def machine() -> dict[str, Any]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = None
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = round(int(line.split()[1]) / 1024 / 1024, 1)
    return {"nproc": os.cpu_count(), "memory_gib": mem, "kernel": platform.release(),
            "cpu": cpu, "python": platform.python_version()}


@dataclass
class Tracker:
    """Latency samples by event, for the report and the live progress line."""

    events: dict[float, str] = field(default_factory=dict)  # observed_at -> phase
    per_event: dict[float, float] = field(default_factory=lambda: defaultdict(float))
    per_event_wall: dict[float, float] = field(default_factory=lambda: defaultdict(float))
    nodes_hit: dict[float, set[str]] = field(default_factory=lambda: defaultdict(set))
    done_at: dict[float, float] = field(default_factory=dict)
    #: (wall time, latency) of the last seconds' samples (100 nodes at 1,000 events/s
    #: add 100,000 a second: a list popped from the front was quadratic)
    recent: deque[tuple[float, float]] = field(default_factory=deque)
    published: list[tuple[float, str]] = field(default_factory=list)
    real: list[tuple[float, float]] = field(default_factory=list)
    #: event -> when its first membership reached the topic (the processor stage)
    first_membership: dict[float, float] = field(default_factory=dict)
    #: event -> the node that programmed it last (its latency is that node's)
    slowest_node: dict[float, str] = field(default_factory=dict)

    def membership_seen(self, observed_at: float, arrival: float) -> None:
        if observed_at in self.events and observed_at not in self.first_membership:
            self.first_membership[observed_at] = max(0.0, arrival - observed_at)

    def stamp(self, phase: str) -> float:
        """A unique observed_at for a new event."""
        at = time.time()
        if self.published and at <= self.published[-1][0]:
            at = self.published[-1][0] + 1e-6
        self.events[at] = phase
        self.published.append((at, phase))
        return at

    def add_event(self, at: float, phase: str) -> None:
        self.events[at] = phase
        self.published.append((at, phase))

    def sample(self, s: Sample) -> None:
        at, node, sim, wall, done = s
        if at not in self.events:
            return
        if sim > self.per_event[at]:
            self.per_event[at] = sim
            self.done_at[at] = done
            self.slowest_node[at] = node
        self.per_event_wall[at] = max(self.per_event_wall[at], wall)
        self.nodes_hit[at].add(node)
        self.recent.append((time.time(), sim))

    def live_p99(self, window: float = 5.0) -> float | None:
        cut = time.time() - window
        recent = self.recent
        while recent and recent[0][0] < cut:
            recent.popleft()
        step = max(1, len(recent) // 20_000)  # a progress line: a sample of them will do
        vals = sorted(itertools.islice((v for _t, v in recent), 0, None, step))
        return vals[min(len(vals) - 1, int(0.99 * len(vals)))] if vals else None

    def phase_latencies(self, phase: str, wall: bool = False) -> list[float]:
        source = self.per_event_wall if wall else self.per_event
        return [v for at, v in source.items() if self.events.get(at) == phase]

    def tail(self, phase: str, since: float) -> dict[str, Any]:
        """The slowest 1% of a phase's events: when they were published (s after `since`),
        how much of their latency the processor stage took, and which nodes were last.

        Clustered in time and spread over many nodes: a stall of something they share
        (broker, processor, the harness's one consumer); one node: that node.
        """
        ranked = sorted(((v, at) for at, v in self.per_event.items()
                         if self.events.get(at) == phase), reverse=True)
        slow = ranked[:max(1, len(ranked) // 100)]
        if not slow:
            return {}
        published = [at - since for _v, at in slow]
        # an event that changed no membership (a node's own endpoint, say) has no
        # processor stage: the share is over the others
        shares = [self.first_membership[at] / v for v, at in slow
                  if v > 0 and at in self.first_membership]
        nodes = Counter(self.slowest_node.get(at, "?") for _v, at in slow)
        worst, worst_at = slow[0]
        return {"events": len(slow), "from_s": slow[-1][0], "published_from_s": min(published),
                "published_to_s": max(published),
                "without_membership": len(slow) - len(shares),
                "processor_stage_share_median": statistics.median(shares) if shares else None,
                "distinct_last_nodes": len(nodes), "last_nodes": nodes.most_common(3),
                "slowest": {"latency_s": worst, "published_s": worst_at - since,
                            "node": self.slowest_node.get(worst_at, "?"),
                            "processor_stage_s": self.first_membership.get(worst_at)}}

    def unprogrammed(self, phase: str) -> int:
        return sum(1 for at, p in self.events.items() if p == phase and at not in self.per_event)


# --------------------------------------------------------------------------- processes


_LOOP_STALL = re.compile(r"^(\S+ \S+) WARNING \S+: the event loop was blocked for ([0-9.]+) s",
                         re.MULTILINE)


def loop_stalls(log: str) -> list[tuple[str, float]]:
    """The processor's logged event-loop stalls (`streams.app.Processor._watch_loop`)."""
    return [(when, float(seconds)) for when, seconds in _LOOP_STALL.findall(log)]


class ProcessorProcess:
    """`portcullis process` (Faust) as a subprocess, logging to a file.

    With the production store (rocksdb) in the bench's work directory, on both brokers, so
    a restart after a SIGKILL recovers from local state plus the changelogs' tails, as in
    production (on Tansu thanks to `topics.endoffsets`, see deploy/README.md).
    """

    def __init__(self, bootstrap: str, prefix: str, partitions: int, workdir: Path) -> None:
        self.workdir = workdir
        self.log_path = workdir / "processor.log"
        self.args = [
            sys.executable, "-c", "import sys; from portcullis.cli import main; sys.exit(main())",
            "process", "--store", "rocksdb", "--bootstrap", bootstrap, "--topic-prefix", prefix,
            "--partitions", str(partitions), "--data-dir", str(workdir / "streams"),
            "--session-timeout", "3", "--log-level", "WARNING",
        ]
        self.proc: subprocess.Popen[bytes] | None = None
        self.cpu_before_restart = 0.0
        self.peak_rss: float | None = None

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.args, stdout=log, stderr=subprocess.STDOUT,
                                         cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                                         preexec_fn=die_with_parent_fn())

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def check(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise BenchError(f"the processor exited with code {self.proc.returncode}; "
                             f"log: {self.log_path}\n{self.tail()}")

    def tail(self, lines: int = 20) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def loop_stalls(self) -> list[tuple[str, float]]:
        """(log time, seconds) of every event-loop stall the processor logged."""
        with contextlib.suppress(OSError):
            return loop_stalls(self.log_path.read_text(errors="replace"))
        return []

    def cpu(self) -> float:
        return self.cpu_before_restart + (proc_cpu(self.pid) if self.pid else 0.0)

    def _note_usage(self) -> None:
        if self.pid:
            self.cpu_before_restart += proc_cpu(self.pid)
            rss = proc_peak_rss(self.pid)
            if rss is not None:
                self.peak_rss = max(self.peak_rss or 0.0, rss)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self._note_usage()
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self._note_usage()
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.send_signal(signal.SIGKILL)
                self.proc.wait(10)

    def usage(self) -> dict[str, Any]:
        rss = proc_peak_rss(self.pid) if self.pid and self.proc and self.proc.poll() is None \
            else None
        peak = max(x for x in (self.peak_rss, rss, 0.0) if x is not None)
        return {"cpu_s": round(self.cpu(), 2), "peak_rss_mib": round(peak, 1) or None}


def start_broker(kind: str) -> Any:
    from portcullis.brokers import BrokerError, KafkaBroker, TansuBroker

    cls = KafkaBroker if kind == "kafka" else TansuBroker
    try:
        return cls().start()
    except BrokerError as exc:
        raise BenchError(f"cannot start the {cls.kind} broker: {exc}") from None


# --------------------------------------------------------------------------- the run


class Run:
    """One scenario on one broker: set up, publish, measure, check, tear down."""

    def __init__(self, scn: Scenario, opts: Options, bootstrap: str, broker_pid: int | None):
        self.scn = scn
        self.opts = opts
        self.bootstrap = bootstrap
        self.broker_pid = broker_pid
        seed = opts.seed if opts.seed is not None else scn.spec.seed
        from dataclasses import replace

        self.spec = replace(scn.spec, seed=seed)
        self.prefix = f"bench-{scn.name}-{random.randrange(16**6):06x}."
        self.partitions = opts.partitions or scn.partitions
        self.workdir = Path(tempfile.mkdtemp(prefix=f"portcullis-bench-{scn.name}-"))
        self.tracker = Tracker()
        self.cluster: Cluster | None = None
        self.fleet: Fleet | None = None
        self.processor: ProcessorProcess | None = None
        self.phase = "load"
        self.progress_line = ""
        self.lag_samples: list[tuple[float, int]] = []
        self.next_offset: dict[Any, int] = {}  # partition -> next offset the fleet expects
        self.reread_records = 0
        self.caught_up_at = 0.0  # when the shared consumer last had nothing more to read
        self.timeline: list[dict[str, Any]] = []
        self.result: dict[str, Any] = {}
        self.stop = asyncio.Event()
        self.real: Any = None
        self.real_cpu = 0.0  # CPU s of real enforcer processes that have ended
        self.real_rss = 0.0
        self.real_consistency: Any = None
        self.watcher: subprocess.Popen[str] | None = None
        self.real_netns: str | None = None
        self.real_node: str | None = None
        self.events_published = 0
        self.marks: list[tuple[float, str]] = []
        self.loading = True
        self.tasks: list[asyncio.Task[Any]] = []
        self.actions: dict[str, Callable[[], Any]] = {}

    def log(self, text: str) -> None:
        if self.opts.progress:
            sys.stderr.write("\r\x1b[K" + text + "\n")
            sys.stderr.flush()

    # ---------------------------------------------------------------- set up

    async def setup(self) -> None:
        from portcullis.topics_admin import check_topics
        from watchers.publisher import KafkaPublisher, producer_for

        self.kafka = {"bootstrap_servers": self.bootstrap}
        report = await check_topics(self.kafka, self.prefix, self.partitions, 1, create=True)
        if not report.ok:
            raise BenchError("topics could not be created: " + "; ".join(report.lines()))
        self.producer = producer_for(self.kafka, "bench-watcher")
        await self.producer.start()
        self.publisher = KafkaPublisher(self.producer, self.prefix)

    async def publish(self, pubs: list[Any]) -> None:
        await self.publisher.publish(pubs)

    async def load(self) -> None:
        from watchers.mirror import Publication

        cluster = self.cluster
        assert cluster is not None
        profiles, policies, endpoints = initial_records(cluster)
        pubs = [Publication.upsert("profiles", p) for p in profiles]
        pubs += [Publication.upsert("policies", p) for p in policies]
        pubs += [Publication.upsert("endpoints", e) for e in endpoints]
        t0 = time.monotonic()
        for i in range(0, len(pubs), 2000):
            await self.publish(pubs[i:i + 2000])
        self.log(f"published the cluster: {len(pubs)} records in {time.monotonic() - t0:.1f}s")

    # ---------------------------------------------------------------- the fleet

    async def follow(self) -> None:
        """The shared consumer of the simulated nodes: policies, endpoints, memberships."""
        from aiokafka import AIOKafkaConsumer, TopicPartition

        from topics import codec
        from topics.records import EndpointRecord, MembershipRecord, PolicyRecord, ProfileRecord
        from topics.specs import ENDPOINTS, MEMBERSHIPS, POLICIES, PROFILES

        fleet = self.fleet
        assert fleet is not None
        names = {s.name(self.prefix): s.suffix
                 for s in (POLICIES, PROFILES, ENDPOINTS, MEMBERSHIPS)}
        consumer = AIOKafkaConsumer(**self.kafka, group_id=None, enable_auto_commit=False,
                                    auto_offset_reset="earliest", max_poll_records=20_000,
                                    fetch_max_wait_ms=10 if self.opts.broker == "tansu" else 20)
        await consumer.start()
        try:
            # the producer asks the brokers for each topic's metadata (a bare consumer's
            # view can be empty on Apache Kafka until it subscribes)
            parts = [TopicPartition(t, p) for t in names
                     for p in sorted(await self.producer.partitions_for(t))]
            consumer.assign(parts)
            await consumer.seek_to_beginning(*parts)
            self.consumer = consumer
            self.member_parts = [tp for tp in parts if names[tp.topic] == MEMBERSHIPS.suffix]
            self.read_parts = parts
            horizon = 0.0
            read_to: dict[Any, float] = {}  # partition -> timestamp of its last record read
            while not self.stop.is_set():
                batch = await consumer.getmany(timeout_ms=50)
                if hasattr(self, "watcher_lines"):
                    self.drain_watcher()
                for tp, messages in batch.items():
                    suffix = names[tp.topic]
                    for msg in messages:
                        arrival = msg.timestamp / 1000.0 if msg.timestamp else time.time()
                        try:
                            key = codec.decode_key(msg.key)
                            raw = (msg.key, msg.value)
                            if suffix == MEMBERSHIPS.suffix:
                                member = codec.decode_as(MembershipRecord, msg.value)
                                if member is not None:
                                    self.tracker.membership_seen(member.observed_at, arrival)
                                fleet.membership(key, member, arrival, raw)
                            elif suffix == ENDPOINTS.suffix:
                                fleet.endpoint(
                                    key, codec.decode_as(EndpointRecord, msg.value), arrival,
                                    raw)
                            elif suffix == PROFILES.suffix:
                                fleet.profile(
                                    key, codec.decode_as(ProfileRecord, msg.value), arrival)
                            else:
                                fleet.policy(
                                    key, codec.decode_as(PolicyRecord, msg.value), arrival)
                        except ValueError:
                            fleet.rejected += 1
                for tp, messages in batch.items():
                    if messages:
                        read_to[tp] = messages[-1].timestamp / 1000.0
                        self.note_offsets(tp, messages[0].offset, messages[-1].offset)
                if not self.loading:
                    if batch:
                        horizon = max(horizon, max(read_to[tp] for tp in batch))
                        bound = await self.read_horizon(consumer, parts, read_to, horizon)
                        fleet.program(self.tracker.events, bound - 0.05)
                    else:  # caught up: nothing else can arrive before now
                        fleet.program(self.tracker.events)
                        self.caught_up_at = time.time()
                await asyncio.sleep(0)
        finally:
            await consumer.stop()

    def note_offsets(self, tp: Any, first: int, last: int) -> None:
        """Count records the shared consumer was handed again (an offset it had read)."""
        before = self.next_offset.get(tp)
        if before is not None and first < before:
            self.reread_records += before - first
            self.marks.append((time.time(), f"re-read {tp.topic}[{tp.partition}] from "
                                             f"{first} (had read to {before - 1})"))
        self.next_offset[tp] = max(before or 0, last + 1)

    @staticmethod
    async def read_horizon(consumer: Any, parts: list[Any], read_to: dict[Any, float],
                           horizon: float) -> float:
        """The time up to which every record has been read: a partition still behind its
        end has been read only up to its last record's timestamp. A simulated node's
        transaction must not start later, or a record of a lagging partition would reach
        it after its clock had passed that record's arrival (the shared consumer's read
        lag, charged to the node as latency)."""
        bound = horizon
        for tp in parts:
            end = consumer.highwater(tp)
            if end is None or read_to.get(tp, float("-inf")) >= bound:
                continue
            if await consumer.position(tp) < end:
                bound = read_to.get(tp, float("-inf"))
        return bound

    async def member_lag(self, every_topic: bool = False) -> int:
        """Records of the memberships topic (`every_topic`: of every topic the fleet reads)
        not read yet by the shared consumer."""
        consumer = getattr(self, "consumer", None)
        if consumer is None:
            return 0
        parts = self.read_parts if every_topic else self.member_parts
        ends = await consumer.end_offsets(parts)
        lag = 0
        for tp in parts:
            lag += max(0, ends[tp] - await consumer.position(tp))
        return lag

    # ---------------------------------------------------------------- the real enforcer

    async def start_real_enforcer(self) -> None:
        """`benchmarks.churn.real_enforcer` in its own process, in a namespace we create."""
        from enforcers import netns
        from enforcers.ipsets import NetlinkIpsets

        assert self.cluster is not None
        if self.real_netns is None:
            self.real_netns = f"pc-bench-{random.randrange(16**6):06x}"
            netns.create(self.real_netns)
            self.real_node = self.cluster.nodes[0]
            self.real_ipsets = NetlinkIpsets(netns=self.real_netns)
            self.real_files: list[Path] = []
        assert self.real_node is not None
        samples = self.workdir / f"real-enforcer-{len(self.real_files)}.json"
        self.real_files.append(samples)
        log = open(self.workdir / "real-enforcer.log", "ab")  # noqa: SIM115
        self.real = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.churn.real_enforcer", "--node", self.real_node,
             "--netns", self.real_netns, "--bootstrap", self.bootstrap, "--prefix",
             self.prefix, "--samples", str(samples),
             # Tansu holds a fetch until its wait ends (see `portcullis enforce --help`)
             "--fetch-max-wait-ms", "10" if self.opts.broker == "tansu" else "50",
             "--fetch-min-bytes", str(self.opts.real_fetch_min_bytes)],
            stdout=log, stderr=subprocess.STDOUT, cwd=REPO, preexec_fn=die_with_parent_fn())
        log.close()

    async def stop_real_enforcer(self, kill: bool = False) -> None:
        proc = self.real
        if proc is None:
            return
        self.real = None
        if proc.poll() is None:
            self.real_cpu += proc_cpu(proc.pid)
            rss = proc_peak_rss(proc.pid) or 0.0
            self.real_rss = max(self.real_rss, rss)
            proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
            for _ in range(100):
                if proc.poll() is not None:
                    break
                await asyncio.sleep(0.1)
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)

    def real_samples(self) -> list[float]:
        out: list[float] = []
        for path in getattr(self, "real_files", []):
            with contextlib.suppress(OSError, ValueError):
                out += json.loads(path.read_text())["samples"]
        return out

    def remove_netns(self) -> None:
        if self.real_netns is not None:
            from enforcers import netns

            with contextlib.suppress(Exception):
                self.real_ipsets.close()
            with contextlib.suppress(Exception):
                netns.remove(self.real_netns)
            self.real_netns = None

    # ---------------------------------------------------------------- progress

    async def monitor(self) -> None:
        last = time.time()
        while not self.stop.is_set():
            await asyncio.sleep(0.5)
            now = time.time()
            lag = await self.member_lag()
            self.lag_samples.append((now, lag))
            if self.processor is not None and self.phase != "restart-processor":
                self.processor.check()
            if self.real is not None and self.real.poll() is not None:
                self.log(f"real enforcer exited ({self.real.returncode}); see "
                         f"{self.workdir / 'real-enforcer.log'}")
                self.real = None
            p99 = self.tracker.live_p99()
            done = sum(1 for at in self.tracker.per_event)
            self.progress_line = (
                f"[{self.scn.name} | {self.phase}] published {self.events_published} "
                f"programmed {done}  live p99 {'-' if p99 is None else f'{p99 * 1000:.0f} ms'}"
                f"  memberships lag {lag}")
            if self.opts.progress and sys.stderr.isatty():
                sys.stderr.write("\r\x1b[K" + self.progress_line)
                sys.stderr.flush()
            elif self.opts.progress and now - last > 5:
                sys.stderr.write(self.progress_line + "\n")
                last = now

    async def settle(self, what: str, quiet: float = 2.0, timeout: float = 300.0,
                     done: Callable[[], bool] | None = None) -> float:
        """Wait until the fleet has read every record, programmed every node with what it
        read, and nothing moved for `quiet`."""
        assert self.fleet is not None
        t0 = time.monotonic()
        last_count = -1
        still_since = time.monotonic()
        while time.monotonic() - t0 < timeout:
            await asyncio.sleep(0.25)
            for task in self.tasks:
                if task.done() and not task.cancelled() and task.exception() is not None:
                    raise BenchError(f"the harness's {task.get_name()} failed: "
                                     f"{task.exception()!r}")
            if self.processor is not None:
                self.processor.check()
            # the lag first: records read while it is asked for change the count after it
            lag = await self.member_lag(every_topic=True)
            count = self.fleet.records
            unprogrammed = 0 if self.loading else self.fleet.pending()
            if count != last_count or lag or unprogrammed:
                last_count = count
                still_since = time.monotonic()
            elif time.monotonic() - still_since >= quiet and (done is None or done()):
                return time.monotonic() - t0
        raise BenchError(f"{what}: the pipeline did not settle within {timeout:.0f}s "
                         f"(fleet has {self.fleet.records} records); processor log: "
                         f"{self.processor.log_path if self.processor else '-'}")

    # ---------------------------------------------------------------- phases

    # ---------------------------------------------------------------- the watcher process

    async def start_watcher(self) -> None:
        import queue
        import threading
        from dataclasses import asdict

        self.watcher = watcher = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.churn.watcher", "--bootstrap", self.bootstrap,
             "--prefix", self.prefix, "--spec", json.dumps(asdict(self.spec))],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=open(self.workdir / "watcher.log", "ab"),  # noqa: SIM115
            cwd=REPO, text=True, bufsize=1, preexec_fn=die_with_parent_fn())
        self.watcher_lines: queue.SimpleQueue[dict[str, Any] | None] = queue.SimpleQueue()
        self.watcher_done: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.watcher_actions: list[str] = []

        def pump() -> None:
            assert watcher.stdout is not None
            for line in watcher.stdout:
                self.watcher_lines.put(json.loads(line))
            self.watcher_lines.put(None)

        threading.Thread(target=pump, name="watcher-stdout", daemon=True).start()
        await self.wait_watcher("ready")

    def drain_watcher(self) -> None:
        """Take in every line the watcher wrote (events first: before their records)."""
        import queue

        assert self.fleet is not None
        while True:
            try:
                line = self.watcher_lines.get_nowait()
            except queue.Empty:
                return
            if line is None:
                self.watcher_done.put_nowait({"exited": True})
            elif "e" in line:
                at, key, phase = line["e"]
                self.tracker.add_event(at, phase)
                self.fleet.cause[key] = at
                self.events_published += 1
            elif "action" in line:
                self.watcher_actions.append(line["action"])
            else:
                self.watcher_done.put_nowait(line)

    async def wait_watcher(self, what: str, timeout: float = 3600.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.drain_watcher()
            while self.watcher_actions:
                await self.act(self.watcher_actions.pop(0))
            if not self.watcher_done.empty():
                line = self.watcher_done.get_nowait()
                if "exited" in line:
                    raise BenchError(f"the watcher process exited; log: "
                                     f"{self.workdir / 'watcher.log'}")
                if what in line:
                    return line
            await asyncio.sleep(0.02)
        raise BenchError(f"the watcher did not report {what!r} within {timeout:.0f}s")

    def tell_watcher(self, cmd: dict[str, Any]) -> None:
        assert self.watcher is not None and self.watcher.stdin is not None
        self.watcher.stdin.write(json.dumps(cmd) + "\n")
        self.watcher.stdin.flush()

    def stop_watcher(self) -> None:
        proc = self.watcher
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(Exception):
            self.tell_watcher({"quit": True})
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)

    async def act(self, name: str) -> None:
        handler = self.actions.get(name)
        if handler is None:
            raise BenchError(f"the watcher asked for an unknown action {name!r}")
        await handler()
        self.tell_watcher({"ok": True})

    # ---------------------------------------------------------------- phases

    async def churn(self, phase: Phase, actions: dict[int, str] | None = None) -> dict[str, Any]:
        assert self.fleet is not None
        self.phase = phase.name
        self.marks.append((time.time(), phase.name))
        n = phase.events
        start_wall = time.time()
        cpu0 = self.cpu_snapshot()
        nodes0 = self.node_cpu()
        self.tell_watcher({"run": [phase.name, phase.rate, n,
                                   {str(k): v for k, v in (actions or {}).items()}]})
        done = (await self.wait_watcher("done"))["done"]
        publish_s = done["publish_seconds"]
        # a phase offered faster than this machine can take drains for a while after
        settle_s = await self.settle(phase.name, quiet=2.0, timeout=max(300.0, n / 25))
        self.marks.append((time.time(), f"end {phase.name}"))
        cpu = self.cpu_delta(cpu0)
        node_cpu = {name: cpu_s - nodes0.get(name, 0.0)
                    for name, cpu_s in self.node_cpu().items()}
        lat = percentiles(self.tracker.phase_latencies(phase.name))
        lost = self.tracker.unprogrammed(phase.name)
        programmed_times = sorted(self.tracker.done_at[at] for at in self.tracker.events
                                  if self.tracker.events[at] == phase.name
                                  and at in self.tracker.done_at)
        span = (programmed_times[-1] - start_wall) if programmed_times else publish_s
        return {
            "phase": phase.name, "rate_per_min": phase.rate, "events": n,
            "publish_seconds": round(publish_s, 2),
            "watcher_max_behind_schedule_s": round(done["max_behind_schedule_s"], 3),
            "offered_per_s": round(n / publish_s, 1) if publish_s else None,
            "sustained_per_s": round(n / max(span, publish_s), 1),
            "drain_after_publish_s": round(settle_s, 2),
            "latency_s": lat,
            "latency_wall_s": percentiles(self.tracker.phase_latencies(phase.name, wall=True)),
            "processor_stage_s": percentiles(
                v for at, v in self.tracker.first_membership.items()
                if self.tracker.events.get(at) == phase.name),
            "events_without_dataplane_change": lost,
            "tail": self.tracker.tail(phase.name, start_wall),
            "cpu_s": cpu,
            **({"stages": stage_costs(cpu, node_cpu, n, phase.rate / 60.0)}
               if self.scn.stages else {}),
        }

    def node_cpu(self) -> dict[str, float]:
        """CPU seconds each simulated node has spent (its own thread time)."""
        assert self.fleet is not None
        return {name: node.cpu for name, node in self.fleet.nodes.items()}

    def cpu_snapshot(self) -> dict[str, float]:
        snap = {HARNESS: proc_cpu()}
        if self.processor is not None:
            snap[PROCESSOR] = self.processor.cpu()
        if self.broker_pid:
            snap["broker"] = proc_cpu(self.broker_pid)
        if self.watcher is not None:
            snap[WATCHER] = proc_cpu(self.watcher.pid)
        if self.real is not None:
            snap[REAL] = self.real_cpu + proc_cpu(self.real.pid)
        assert self.fleet is not None
        snap[FLEET] = sum(n.cpu for n in self.fleet.nodes.values())
        return snap

    def cpu_delta(self, before: dict[str, float]) -> dict[str, float]:
        now = self.cpu_snapshot()
        return {k: round(now[k] - before.get(k, 0.0), 2) for k in now}

    async def storm(self) -> list[dict[str, Any]]:
        """A global policy selecting every pod; then a network set grown by N CIDRs."""
        assert self.fleet is not None
        out = []
        self.tell_watcher({"storm": {"growth": self.scn.growth_cidrs}})
        for step in range(2):
            cpu0 = self.cpu_snapshot()
            done = (await self.wait_watcher("done"))["done"]
            name, at = done["phase"], done["at"]
            self.phase = name
            self.marks.append((at, name))
            await self.settle(name, quiet=3.0)
            nodes = len(self.tracker.nodes_hit.get(at, ()))
            total = self.tracker.per_event.get(at)
            out.append({
                "phase": name, "nodes_programmed": nodes,
                "nodes_simulated": len(self.fleet.nodes),
                "all_nodes_programmed_s": total,
                "all_nodes_programmed_wall_s": self.tracker.per_event_wall.get(at),
                "first_membership_s": self.tracker.first_membership.get(at),
                "goal_s": self.scn.storm_goal,
                "met": total is not None and total <= self.scn.storm_goal,
                "cpu_s": self.cpu_delta(cpu0),
            })
            self.log(f"storm: {name}: {nodes} nodes programmed, the last after "
                     f"{'-' if total is None else f'{total:.2f}s'}")
            if step == 0:
                self.tell_watcher({"ok": True})
        return out

    # ---------------------------------------------------------------- main

    async def main(self) -> dict[str, Any]:
        """Set up, run and tear down; SIGTERM or SIGINT cancel it and still clean up."""
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, task.cancel)
        return await self._main()

    async def _main(self) -> dict[str, Any]:
        scn = self.scn
        self.log(f"portcullis bench {scn.name}: seed {self.spec.seed} (reuse with --seed "
                 f"{self.spec.seed}); broker {self.opts.broker} {self.bootstrap}; "
                 f"topic prefix {self.prefix}")
        t0 = time.monotonic()
        self.cluster = build_cluster(self.spec)
        self.log(f"cluster: {self.cluster.summary()} (built in {time.monotonic() - t0:.1f}s)")
        sim = self.opts.sim_nodes if self.opts.sim_nodes is not None else scn.sim_nodes
        nodes = self.cluster.nodes if not sim else self.cluster.nodes[:sim]
        self.fleet = Fleet.of(nodes)
        self.fleet.read_all = scn.read_all
        self.fleet.on_sample = self.tracker.sample
        await self.setup()
        self.processor = ProcessorProcess(
            self.bootstrap, self.prefix, self.partitions, self.workdir
        )
        tasks = self.tasks
        want_real = self.opts.real_enforcer
        if want_real is None:
            want_real = os.geteuid() == 0
        try:
            await self.load()
            self.processor.start()
            tasks.append(asyncio.create_task(self.follow(), name="fleet consumer"))
            tasks.append(asyncio.create_task(self.monitor(), name="monitor"))
            if want_real:
                await self.start_real_enforcer()
            t_load = time.monotonic()
            await self.settle("initial load", quiet=4.0, timeout=900.0,
                              done=lambda: bool(self.fleet and self.fleet.memberships))
            # a cold start for every simulated node: everything read, then programmed once
            self.fleet.program(set())
            self.loading = False
            # Ten or a hundred nodes' state in one process would make every full garbage
            # collection scan all of them and charge it to one node's transaction; a real
            # enforcer holds one node's. Freeze what the load built.
            gc.collect()
            gc.freeze()
            if len(nodes) > 20:
                # with every node simulated, a collection of the young generations still
                # walks objects of all the nodes and lands on one node's clock (seconds
                # of simulated latency it did not cause): reference counting alone for
                # the churn, a full collection at the end
                gc.disable()
            load_s = time.monotonic() - t_load
            self.log(f"initial load programmed on {len(nodes)} simulated nodes in "
                     f"{load_s:.1f}s ({len(self.fleet.memberships)} memberships)")
            await self.start_watcher()
            phases = []
            for i, phase in enumerate(scn.phases):
                actions = self.restart_actions(phase, i) if scn.restart else None
                phases.append(await self.churn(phase, actions))
                self.log(self.phase_line(phases[-1]))
            storm = await self.storm() if scn.storm else []
            self.phase = "check"
            gc.enable()
            consistency = self.check()
            if self.real_netns is not None:
                consistency = await self.check_real(consistency)
            await self.stop_real_enforcer()
            real_samples = self.real_samples()
            self.log(consistency["report"])
        finally:
            self.stop_watcher()
            self.stop.set()
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(BaseException):
                    await task
            with contextlib.suppress(Exception):
                await self.stop_real_enforcer()
            self.remove_netns()
            with contextlib.suppress(Exception):
                await self.producer.stop()
            usage = self.processor.usage() if self.processor else {}
            if self.processor is not None:
                self.processor.stop()
        self.result = {
            "scenario": scn.name, "goal": scn.goal, "seed": self.spec.seed,
            "cluster": self.cluster.summary(), "simulated_nodes": len(nodes),
            "broker": self.opts.broker, "partitions": self.partitions,
            "initial_load_s": round(load_s, 2), "phases": phases, "storm": storm,
            "restarts": self.recovery(),
            "real_enforcer": self.real_report(real_samples, want_real),
            "consistency": consistency,
            "processes": {
                PROCESSOR: usage,
                "harness": {"cpu_s": round(proc_cpu(), 2),
                            "peak_rss_mib": round(proc_peak_rss() or 0, 1)},
                "broker": {"cpu_s": round(proc_cpu(self.broker_pid), 2) if self.broker_pid
                           else None,
                           "peak_rss_mib": proc_peak_rss(self.broker_pid)
                           if self.broker_pid else None},
            },
            "memberships_lag_max": max((lag for _t, lag in self.lag_samples), default=0),
            # a processor-stage stall with no loop stall was a wait (broker, commit)
            "processor_loop_stalls": (self.processor.loop_stalls()
                                      if self.processor is not None else []),
            "records_read_twice": self.reread_records,
            "simulated_node_stats": self.node_stats(),
            "timeline": self.series(),
            "marks": self.marks,
        }
        return self.result

    def recovery(self, window: float = 1.0) -> list[dict[str, Any]]:
        """For each restart: how long until p99 (per 1 s of events) was back under the goal.

        Also measured against the p99 of the 10 s before the restart, for runs whose steady
        p99 is above the goal anyway.
        """
        out = []
        lat = sorted(self.tracker.per_event.items())
        goal = self.scn.goal_p99
        for item in getattr(self, "restart_report", []):
            at = item["at"]
            done = self.tracker.done_at
            before = [v for t, v in lat if at - 10 <= t < at and done.get(t, at) < at]
            pre = percentiles(before)["p99"]
            windows: dict[int, list[float]] = defaultdict(list)
            for t, v in lat:
                if t >= at:
                    windows[int((t - at) / window)].append(v)
            # windows with too few events (the phase's tail) say nothing about recovery
            p99s = {k: percentiles(v)["p99"] for k, v in sorted(windows.items()) if len(v) >= 10}

            worst = max((v for v in p99s.values() if v is not None), default=None)
            out.append({**item, "p99_before_s": pre, "worst_p99_after_s": worst,
                        "back_under_goal_after_s": _settled(p99s, goal, window),
                        "back_to_pre_restart_p99_after_s": _settled(
                            p99s, None if pre is None else max(goal, pre * 1.2), window),
                        "recover_within_goal_s": self.scn.recover_within})
        return out

    def node_stats(self) -> dict[str, Any]:
        assert self.fleet is not None
        nodes = list(self.fleet.nodes.values())
        cpu = [n.cpu for n in nodes]
        return {"transactions_per_node": percentiles(n.batches for n in nodes),
                "cpu_s_per_node": percentiles(cpu),
                "cpu_ms_per_transaction": round(1000 * sum(cpu) / max(1, sum(
                    n.batches for n in nodes)), 2),
                "member_ops_total": sum(n.member_ops for n in nodes)}

    def real_report(self, samples: list[float], wanted: bool) -> dict[str, Any]:
        if not wanted:
            return {"ran": False, "why": "not root (needs CAP_NET_ADMIN for a network "
                                         "namespace)" if os.geteuid() else "disabled"}
        return {"ran": True, "node": self.real_node, "netns": "pc-bench-*, removed",
                "latency_s": percentiles(samples),
                "cpu_s": round(self.real_cpu, 2),
                "peak_rss_mib": round(self.real_rss, 1),
                "consistency": self.real_consistency}

    def phase_line(self, ph: dict[str, Any]) -> str:
        lat = ph["latency_s"]

        def ms(v: float | None) -> str:
            return "-" if v is None else f"{v * 1000:.0f} ms"

        stage = ph["processor_stage_s"]
        return (f"{ph['phase']}: {ph['events']} events, p50 {ms(lat['p50'])}, p99 "
                f"{ms(lat['p99'])}, max {ms(lat['max'])}, sustained {ph['sustained_per_s']}/s "
                f"(processor stage: p50 {ms(stage['p50'])}, p99 {ms(stage['p99'])})")

    def restart_actions(self, phase: Phase, index: int) -> dict[int, str]:
        """Phase 0: the processor is SIGKILLed at 20 %; phase 1: an enforcer, at 20 %."""
        n = phase.events
        if not hasattr(self, "restart_report"):
            self.restart_report: list[dict[str, Any]] = []

        async def kill_processor() -> None:
            assert self.processor is not None
            self.phase = "restart-processor"
            at = time.time()
            self.marks.append((at, "processor killed"))
            self.processor.kill()
            self.processor.start()
            self.phase = phase.name
            self.restart_report.append({"what": "processor (SIGKILL, restarted)", "at": at})
            self.log("restart: processor SIGKILLed and restarted")

        async def restart_enforcer() -> None:
            assert self.fleet is not None
            at = time.time()
            node = next(iter(self.fleet.nodes))
            self.marks.append((at, f"enforcer {node} restarted"))
            self.fleet.restart_node(node, at)
            if self.real is not None:
                await self.stop_real_enforcer(kill=True)
                await self.start_real_enforcer()
                self.marks.append((at, "real enforcer SIGKILLed, restarted"))
            self.restart_report.append({"what": f"enforcer {node} (simulated"
                                        + (", and the real one)" if self.real_netns else ")"),
                                        "at": at})
            self.log(f"restart: enforcer {node} restarted")

        self.actions = {"kill_processor": kill_processor, "restart_enforcer": restart_enforcer}
        return {n // 5: "kill_processor" if index == 0 else "restart_enforcer"}

    def series(self) -> list[dict[str, Any]]:
        """Per-second windows by event time: published, programmed, latency percentiles."""
        if not self.tracker.published:
            return []
        t0 = self.tracker.published[0][0]
        buckets: dict[int, list[float]] = defaultdict(list)
        published: dict[int, int] = defaultdict(int)
        programmed: dict[int, int] = defaultdict(int)
        for at, _phase in self.tracker.published:
            published[int(at - t0)] += 1
        for at, lat in self.tracker.per_event.items():
            buckets[int(at - t0)].append(lat)
            programmed[int(self.tracker.done_at.get(at, at) - t0)] += 1
        out = []
        for sec in range(0, max([*published, *programmed, 0]) + 1):
            p = percentiles(buckets.get(sec, []))
            out.append({"t": sec, "published": published.get(sec, 0),
                        "programmed": programmed.get(sec, 0),
                        "p50": p["p50"], "p99": p["p99"], "max": p["max"]})
        return out

    def check(self) -> dict[str, Any]:
        assert self.fleet is not None and self.cluster is not None
        t0 = time.monotonic()
        endpoints = list(self.fleet.endpoints.values())
        policies = list(self.fleet.policies.values())
        nodes = list(self.fleet.nodes)
        if self.real_node and self.real_node not in nodes:
            nodes.append(self.real_node)
        expected = checker.expected_state(endpoints, self.cluster.profiles, policies, nodes)
        programmed = self.fleet.programmed_sets()
        result = checker.check(expected, programmed)
        from streams.oracle import compacted_payloads

        member_diffs = checker.check_memberships(expected,
                                                 compacted_payloads(self.fleet.memberships))
        report = result.report()
        ok = result.ok and not member_diffs
        if member_diffs:
            report += "\n" + "\n".join("  " + d for d in member_diffs)
        diagnosis = [] if result.ok else [
            f"the shared consumer last caught up at {self.caught_up_at:.3f}; "
            f"{self.fleet.pending()} records read but not programmed",
            *self.diagnose(expected, programmed)]
        if diagnosis:
            report += "\nwhere the first differences come from:\n" + "\n".join(
                "  " + d for d in diagnosis)
        self.expected = expected
        return {"ok": ok, "nodes": result.nodes, "sets": result.sets, "members": result.members,
                "differences": result.differences[:200] + member_diffs,
                "diagnosis": diagnosis,
                "report": report, "seconds": round(time.monotonic() - t0, 1)}

    def diagnose(self, expected: checker.Expected,
                 programmed: dict[str, dict[str, set[str]]], nodes: int = 3,
                 per_node: int = 4) -> list[str]:
        """For a few differing sets, the first layer of the simulated node that disagrees."""
        from enforcers.ipsets import set_name

        assert self.fleet is not None
        uid_of = {set_name(uid): uid for uid in expected.members_of}
        out: list[str] = []
        for node in sorted(programmed)[:nodes]:
            shown = 0
            for name, want in sorted(expected.sets.get(node, {}).items()):
                have = programmed[node].get(name)
                uid = uid_of.get(name)
                if have is None or set(have) == want or uid is None or shown >= per_node:
                    continue
                shown += 1
                eps = {ep: expected.memberships[f"{uid}|{ep}"][3]
                       for ep in expected.members_of[uid]}
                out.append(f"{node} {name}: "
                           + self.fleet.explain(node, uid, eps, set(have)))
        return out

    async def check_real(self, consistency: dict[str, Any],
                         timeout: float = 60.0) -> dict[str, Any]:
        """The real enforcer's kernel ipsets against the oracle (it may need a moment more)."""
        assert self.real_node is not None
        expected = self.expected
        only = checker.Expected(expected.memberships, {self.real_node: expected.sets.get(
            self.real_node, {})}, expected.members_of)
        deadline = time.monotonic() + timeout
        while True:
            real = checker.check(only, {self.real_node: self.real_ipsets.list_sets()})
            if real.ok or time.monotonic() > deadline:
                break
            await asyncio.sleep(1.0)
        self.real_consistency = real.report()
        consistency = dict(consistency)
        consistency["report"] += "\nreal enforcer (kernel ipsets): " + real.report()
        consistency["ok"] = consistency["ok"] and real.ok
        consistency["real_enforcer_ok"] = real.ok
        if not real.ok:
            consistency["differences"] = consistency["differences"] + real.differences[:50]
        return consistency


def stage_costs(cpu: dict[str, float], node_cpu: dict[str, float], events: int,
                rate_per_s: float) -> dict[str, Any]:
    """A phase's CPU per event by stage (`benchmarks.churn.stages`), from `churn`'s deltas.

    The harness's own CPU less its simulated nodes' is the shared consumer and the
    simulation's bookkeeping: a simulation artefact, reported, never the bottleneck.
    """
    processes = {name: cpu[name] for name in (WATCHER, "broker", PROCESSOR, REAL) if name in cpu}
    shared = "harness: shared consumer (decodes every record once) + routing to every node"
    if HARNESS in cpu:
        processes[shared] = max(0.0, cpu[HARNESS] - cpu.get(FLEET, 0.0))
    note = {shared: "simulation artefact: one consumer for all simulated nodes",
            REAL: "one node, its own process: consumer, decode, netlink, iptables"}
    return stages.stage_report(processes, node_cpu, events, rate_per_s, unjudged=note)


def _settled(p99s: dict[int, float | None], limit: float | None,
             window: float, hold: int = 5) -> float | None:
    """Seconds until `hold` consecutive windows all have p99 <= limit (None: never)."""
    if limit is None:
        return None
    keys = sorted(p99s)
    for i, k in enumerate(keys):
        if all((p99s[j] or 0.0) <= limit for j in keys[i:i + hold]):
            return k * window
    return None


# --------------------------------------------------------------------------- baseline


def baseline(scn: Scenario, seed: int, budget_events: int, budget_s: float,
             nodes: int | None) -> dict[str, Any]:
    """The same first events through ours (pure core, in process) and the naive pipeline.

    Both run in this process without a broker, on the same cluster and the same events,
    each event processed to the end (memberships, then every simulated node programmed)
    before the next: the time per event is the pipeline's work, nothing else.
    """
    from dataclasses import replace

    spec = replace(scn.spec, seed=seed)
    out: dict[str, Any] = {}
    for name in ("portcullis (pure core)", "naive"):
        cluster = build_cluster(spec)
        sim = cluster.nodes[:nodes] if nodes else cluster.nodes
        gen = ChurnGenerator(cluster)
        times: list[float] = []
        t0 = time.perf_counter()
        deadline = t0 + budget_s
        if name == "naive":
            naive = NaivePipeline(cluster, sim)
            naive.recompute()
            load = time.perf_counter() - t0
            deadline = time.perf_counter() + budget_s
            for i in range(budget_events):
                ev = gen.next()
                t = time.perf_counter()
                naive.apply(ev.key, ev.record(2e9 + i), 2e9 + i)
                times.append(time.perf_counter() - t)
                if time.perf_counter() > deadline:
                    break
        else:
            pure = PurePipeline(cluster, scn.partitions)
            pure.fleet.nodes = {n: pure.fleet.nodes[n] for n in sim}
            pure.load()
            load = time.perf_counter() - t0
            deadline = time.perf_counter() + budget_s
            for i in range(budget_events):
                ev = gen.next()
                t = time.perf_counter()
                pure.publish_event(ev, 2e9 + i)
                pure.settle()
                times.append(time.perf_counter() - t)
                if time.perf_counter() > deadline:
                    break
        out[name] = {"events": len(times), "initial_s": round(load, 2),
                     "per_event_s": percentiles(times),
                     "mean_per_event_s": sum(times) / len(times) if times else None}
        if scn.storm:
            storms: list[dict[str, Any]] = []
            for label, doc in storm_documents(cluster, scn.growth_cidrs):
                obj = policy.load_document(doc, source="bench storm")
                pol, ep = storm_records(obj, 3e9 + len(storms))
                t = time.perf_counter()
                if name == "naive":
                    naive.policies[pol.key] = pol
                    if ep is not None:
                        naive.endpoints[ep.key] = ep
                        naive.fleet.endpoint(ep.key, ep, pol.observed_at)
                    naive.fleet.policy(pol.key, pol, pol.observed_at)
                    naive.events.add(pol.observed_at)
                    naive.recompute(pol.observed_at)
                else:
                    pure.publish_policy(pol)
                    if ep is not None:
                        pure.publish_endpoint(ep)
                    pure.settle()
                storms.append({"step": label, "seconds": time.perf_counter() - t})
            out[name]["storm"] = storms
    n = min(out["naive"]["events"], out["portcullis (pure core)"]["events"])
    out["events_compared"] = n
    ours = out["portcullis (pure core)"]["mean_per_event_s"]
    naive_mean = out["naive"]["mean_per_event_s"]
    out["speedup"] = round(naive_mean / ours, 1) if ours and naive_mean else None
    if scn.storm:
        out["storm_speedup"] = [
            round(n["seconds"] / o["seconds"], 1) if o["seconds"] else None
            for o, n in zip(out["portcullis (pure core)"]["storm"], out["naive"]["storm"],
                            strict=True)]
    out["note"] = ("time per event, in process, no broker: ours = incremental match (index) + "
                   "incremental plan/apply on each simulated node; naive = every selector "
                   "recomputed against every endpoint, then every node rendered from scratch "
                   "and every set rewritten in full (ipset-restore style swap), dry run. Same "
                   f"cluster and events; {len(sim)} nodes simulated.")
    return out


# --------------------------------------------------------------------------- reports


def tail_lines(result: dict[str, Any]) -> list[str]:
    """Where each phase's slowest 1% came from (`Tracker.tail`)."""
    lines = []
    for ph in result["phases"]:
        tail = ph.get("tail") or {}
        if not tail:
            continue
        share = tail["processor_stage_share_median"]
        nodes = ", ".join(f"{node}: {count}" for node, count in tail["last_nodes"])
        worst = tail["slowest"]
        stage = worst["processor_stage_s"]
        lines.append(
            f"Slowest 1% of {ph['phase']}: {tail['events']} events of "
            f"{tail['from_s'] * 1000:.0f} ms or more, published {tail['published_from_s']:.1f}"
            f"-{tail['published_to_s']:.1f} s into the phase; the processor stage took "
            f"{'-' if share is None else f'{share:.0%}'} of their latency (median; "
            f"{tail['without_membership']} changed no membership); programmed last on "
            f"{tail['distinct_last_nodes']} nodes ({nodes}). The slowest: "
            f"{worst['latency_s'] * 1000:.0f} ms, published {worst['published_s']:.1f} s in, "
            f"on {worst['node']}, its processor stage "
            f"{'none' if stage is None else f'{stage * 1000:.0f} ms'}.")
    return ["", *lines] if lines else []


def markdown(result: dict[str, Any]) -> str:
    def ms(v: Any) -> str:
        return "-" if v is None else f"{v * 1000:.0f}"

    lines = [f"### portcullis bench {result['scenario']}"
             + (" --small" if result.get("small") else ""), "",
             f"Goal: {result['goal']}", "",
             f"Cluster: {result['cluster']}; {result['simulated_nodes']} nodes simulated; "
             f"broker {result['broker']}; seed {result['seed']}", "",
             "| phase | events | p50 ms | p90 ms | p99 ms | max ms | sustained ev/s "
             "| of which processor p50 / p99 ms |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for ph in result["phases"]:
        lat = ph["latency_s"]
        stage = ph.get("processor_stage_s") or {}
        lines.append(f"| {ph['phase']} | {ph['events']} | {ms(lat['p50'])} | "
                     f"{ms(lat['p90'])} | {ms(lat['p99'])} | {ms(lat['max'])} | "
                     f"{ph['sustained_per_s']} | {ms(stage.get('p50'))} / "
                     f"{ms(stage.get('p99'))} |")
    for st in result.get("storm", []):
        lines.append(f"| storm: {st['phase']} | 1 | | | | {ms(st['all_nodes_programmed_s'])} "
                     f"| {st['nodes_programmed']}/{st['nodes_simulated']} nodes | "
                     f"{ms(st.get('first_membership_s'))} (first) |")
    for rs in result.get("restarts", []):
        def sec(v: Any) -> str:
            return "never" if v is None else f"{v:.0f} s"

        lines.append(f"| restart: {rs['what']} | | | | {ms(rs['worst_p99_after_s'])} (worst 1 s "
                     f"p99) | | p99 under goal after {sec(rs['back_under_goal_after_s'])}, "
                     f"at pre-restart level after {sec(rs['back_to_pre_restart_p99_after_s'])}"
                     " | |")
    real = result.get("real_enforcer", {})
    if real.get("ran"):
        lat = real["latency_s"]
        lines.append(f"| real enforcer ({real['node']}, netns, every change it applied) | "
                     f"{lat['n']} | {ms(lat['p50'])} | {ms(lat['p90'])} | {ms(lat['p99'])} | "
                     f"{ms(lat['max'])} | | |")
    lines += tail_lines(result)
    stalls = result.get("processor_loop_stalls")
    if stalls is not None:
        longest = max((seconds for _when, seconds in stalls), default=0.0)
        lines += ["", f"Processor event-loop stalls of 0.5 s or more: {len(stalls)}"
                  + (f", the longest {longest:.2f} s (at {', '.join(w for w, _s in stalls[:5])})"
                     if stalls else "") + "."]
    lines += stage_lines(result)
    base = result.get("baseline")
    if base:
        ours = base["portcullis (pure core)"]
        naive = base["naive"]
        lines += ["", "| per event (same events, in process) | events | mean ms | p99 ms |",
                  "|---|---:|---:|---:|",
                  f"| portcullis | {ours['events']} | {ms(ours['mean_per_event_s'])} | "
                  f"{ms(ours['per_event_s']['p99'])} |",
                  f"| naive baseline | {naive['events']} | {ms(naive['mean_per_event_s'])} | "
                  f"{ms(naive['per_event_s']['p99'])} |",
                  "", f"Portcullis is **{base['speedup']}x** faster per event than the naive "
                  "pipeline."]
        for o, n in zip(ours.get("storm", []), naive.get("storm", []), strict=False):
            lines.append(f"Storm step '{o['step']}' in process: portcullis "
                         f"{o['seconds'] * 1000:.0f} ms, naive {n['seconds'] * 1000:.0f} ms "
                         f"({n['seconds'] / max(o['seconds'], 1e-9):.1f}x).")
    if result.get("broker") != "kafka":
        lines += ["", "Note: the embedded Tansu broker answers a held fetch only when the "
                  "consumer's fetch wait ends, even when records are there, so every hop "
                  "costs up to its wait: 20 ms for the processor, 10 ms for the enforcers "
                  "(`--kafka` for Apache Kafka, which answers at once)."]
    lines += ["", f"Consistency: {'OK' if result['consistency']['ok'] else 'FAILED'} "
              f"({result['consistency']['nodes']} nodes, {result['consistency']['sets']} sets, "
              f"{result['consistency']['members']} members)"]
    procs = result.get("processes", {})
    if procs:
        lines += ["", "| process | CPU s | peak RSS MiB |", "|---|---:|---:|"]
        for name, use in procs.items():
            lines.append(f"| {name} | {use.get('cpu_s')} | {use.get('peak_rss_mib')} |")
    lines.append("")
    m = result.get("machine", {})
    lines.append(f"Machine: {m.get('nproc')} CPUs ({m.get('cpu')}), {m.get('memory_gib')} GiB, "
                 f"kernel {m.get('kernel')}, Python {m.get('python')}.")
    return "\n".join(lines)


def stage_lines(result: dict[str, Any]) -> list[str]:
    """Per phase: each stage's CPU per event, what one core could take, the bottleneck."""
    lines: list[str] = []
    for ph in result["phases"]:
        rep = ph.get("stages")
        if not rep:
            continue
        nodes = rep["nodes"]
        lines += ["", f"**{ph['phase']}** ({rep['events']} events; target "
                  f"{rep['rate_per_s']:g} ev/s, offered {ph.get('offered_per_s')} ev/s, "
                  f"sustained {ph['sustained_per_s']} ev/s)", "",
                  "| stage | CPU s | CPU ms / event | ev/s on one core | cores needed "
                  "at target | headroom |", "|---|---:|---:|---:|---:|---:|"]
        for st in rep["stages"]:
            name = st["stage"] + ("" if st["judged"] else f" ({st['note']})")
            head = st["headroom"]
            lines.append(f"| {name} | {st['cpu_s']} | {st['cpu_ms_per_event']:.3f} | "
                         f"{st['events_per_s_per_core'] or '-'} | {st['cores_at_rate']} | "
                         f"{'-' if head is None else f'{head}x'} |")
        if nodes.get("nodes"):
            lines.append(
                f"| enforcer nodes: median / max / fleet total | | "
                f"{nodes['cpu_ms_per_event_median']:.3f} / {nodes['cpu_ms_per_event_max']:.3f}"
                f" / {nodes['fleet_cpu_ms_per_event']:.3f} | | | |")
            lines.append("")
            lines.append(f"Per-node enforcer CPU at the target rate: median "
                         f"{nodes['core_pct_median']:.2f} %, max {nodes['core_pct_max']:.2f} % "
                         f"of one core ({nodes['nodes']} nodes simulated; goal <= 5 %).")
        over = "needs more than one core" if rep["bottleneck_over_one_core"] else \
            "the largest share, within one core"
        lines.append(f"Bottleneck: **{rep['bottleneck']}** ({over}).")
    return lines


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = result.get("timeline") or []
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
    t = [s["t"] for s in series]
    for key, style in (("p50", "-"), ("p99", "-"), ("max", ":")):
        ax1.plot(t, [None if s[key] is None else s[key] * 1000 for s in series], style,
                 label=key)
    ax1.axhline(300, color="red", linewidth=0.8, label="goal p99 300 ms")
    ax1.set_ylabel("event -> programmed (ms)")
    ax1.set_yscale("log")
    ax1.legend(loc="upper left")
    ax1.set_title(f"portcullis bench {result['scenario']}" + (" --small" if result.get("small")
                                                               else ""))
    ax2.plot(t, [s["published"] for s in series], label="events published /s")
    ax2.plot(t, [s["programmed"] for s in series], label="events fully programmed /s")
    ax2.set_xlabel("seconds")
    ax2.set_ylabel("events / s")
    ax2.legend(loc="upper left")
    if series:
        first = result.get("t0")
        for at, label in result.get("marks", []):
            if first is not None:
                x = at - first
                for ax in (ax1, ax2):
                    ax.axvline(x, color="grey", linewidth=0.6, linestyle="--")
                ax2.text(x, 0, label, rotation=90, fontsize=7, va="bottom")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(scn: Scenario, opts: Options, small: bool = False) -> dict[str, Any]:
    """Run one scenario end to end; write JSON, PNG and Markdown; return the result."""
    import logging

    for name in ("aiokafka", "enforcers", "kafka"):
        logging.getLogger(name).setLevel(logging.WARNING)
    broker = None
    bootstrap = opts.bootstrap
    broker_pid = None
    if opts.broker != "external":
        broker = start_broker(opts.broker)
        bootstrap = broker.bootstrap
        broker_pid = broker.process.pid if broker.process else None
    elif not bootstrap:
        raise BenchError("--broker external needs --bootstrap HOST:PORT")
    assert bootstrap is not None
    try:
        runner = Run(scn, opts, bootstrap, broker_pid)
        try:
            result = asyncio.run(runner.main())
        except asyncio.CancelledError:
            raise BenchError("interrupted; the processor, enforcer, network namespace and "
                             "broker this run started were stopped and removed") from None
    finally:
        if broker is not None:
            broker.stop()
    result["small"] = small
    result["machine"] = machine()
    result["t0"] = runner.tracker.published[0][0] if runner.tracker.published else None
    if opts.baseline:
        runner.log("baseline: the same events through the naive pipeline ...")
        result["baseline"] = baseline(scn, runner.spec.seed, scn.baseline_events,
                                      scn.baseline_seconds, result["simulated_nodes"]
                                      if result["simulated_nodes"] < scn.spec.nodes else None)
    table = markdown(result)
    result["markdown"] = table
    if opts.write:
        opts.out.mkdir(parents=True, exist_ok=True)
        stem = scn.name + ("_small" if small else "") + (
            "_kafka" if opts.broker == "kafka" else "")
        (opts.out / f"{stem}.json").write_text(json.dumps(result, indent=1, default=str))
        plot(result, opts.out / f"{stem}.png")
        (opts.out / f"{stem}.md").write_text(table + "\n")
        result["files"] = [str(opts.out / f"{stem}.{x}") for x in ("json", "png", "md")]
    return result
