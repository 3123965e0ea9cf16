"""The order of play of `portcullis demo`, and cleanup on every way out.

Every resource is recorded on `Demo` the moment it exists, and `Demo.cleanup()` (run
from a plain ``finally`` after the event loop is gone, with Ctrl-C and SIGTERM ignored
while it runs) stops the processes we started by PID, removes the namespaces and the
broker, and deletes the work directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from portcullis.demo import DemoError, scenario
from portcullis.demo.netsim import Network, leftover_namespaces, missing_requirements
from portcullis.demo.pipeline import (
    Publishing,
    Service,
    TopicReader,
    connection_args,
    create_topics,
    membership_lines,
    require,
    require_present,
    selector_texts,
    summarise,
    tail,
)
from portcullis.demo.scenario import Case, Cluster, World
from portcullis.demo.table import Row, Style, render, summary

_COMMENT = re.compile(r' -m comment --comment "pc:[^"]*"')
#: How long the processor and the enforcer may take to catch up before we give up.
SETTLE_TIMEOUT = 60.0
#: How long a label change may take to reach the dataplane before we say it did not.
FLIP_TIMEOUT = 30.0


@dataclass
class Options:
    dry_run: bool = False
    once: bool = False
    watch: bool = False
    keep_logs: bool = False
    partitions: int = 2
    bootstrap: str | None = None  # an existing broker instead of the embedded one
    topic_prefix: str | None = None
    watch_interval: float = 8.0
    colour: bool | None = None  # None: only when stdout is a terminal


class Demo:
    def __init__(self, options: Options, kafka: Mapping[str, Any] | None = None,
                 out: TextIO | None = None) -> None:
        self.options = options
        self.out = out or sys.stdout
        colour = options.colour
        if colour is None:
            colour = self.out.isatty() and os.environ.get("NO_COLOR") is None
        self.style = Style(colour)
        self.kafka_extra = {k: v for k, v in (kafka or {}).items() if k != "bootstrap_servers"}
        self.network = Network()
        self.workdir = Path(tempfile.mkdtemp(prefix=f"portcullis-demo-{self.network.run_id}-"))
        self.prefix = options.topic_prefix or (
            f"pcd-{self.network.run_id}." if options.bootstrap else "portcullis."
        )
        self.broker: Any = None
        self.services: list[Service] = []
        self.terminated = False
        self.dry_run = options.dry_run
        self.version = 1

    # ------------------------------------------------------------------ output

    def say(self, text: str = "") -> None:
        print(text, file=self.out, flush=True)

    def step(self, text: str) -> None:
        self.say(self.style(f"▸ {text}", "bold"))

    def detail(self, text: str) -> None:
        self.say(self.style(f"  {text}", "dim"))

    # ------------------------------------------------------------------ lifecycle

    def run(self) -> int:
        """Run to the end; returns the exit code. Cleans up on every way out."""
        try:
            return asyncio.run(self._main())
        except BrokenPipeError:
            # whoever read our output went away (`| head`): stop quietly, like `yes | head`
            with contextlib.suppress(OSError, ValueError):
                os.dup2(os.open(os.devnull, os.O_WRONLY), self.out.fileno())
            return 141
        except asyncio.CancelledError:
            if self.terminated:
                self.say("portcullis demo: terminated; cleaning up")
                return 143
            raise
        finally:
            self.cleanup()

    def _on_sigterm(self, task: asyncio.Task[Any]) -> None:
        self.terminated = True
        task.cancel()

    def cleanup(self) -> None:
        """Stop what we started and remove what we made; Ctrl-C cannot interrupt it."""
        previous = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            problems: list[str] = []
            for service in reversed(self.services):
                try:
                    service.stop()
                except Exception as exc:
                    problems.append(f"{service.name}: {exc}")
            problems += self.network.close()
            if self.broker is not None:
                with contextlib.suppress(Exception):
                    self.broker.stop()
            if self.options.keep_logs:
                self.say(f"logs kept in {self.workdir}")
            else:
                shutil.rmtree(self.workdir, ignore_errors=True)
            for problem in problems:
                print(f"portcullis demo: cleanup: {problem}", file=sys.stderr)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def check_services(self) -> None:
        for service in self.services:
            service.check()
        if self.broker is not None:
            try:
                self.broker.check_alive()
            except Exception as exc:
                raise DemoError(str(exc)) from None

    # ------------------------------------------------------------------ the play

    async def _main(self) -> int:
        task = asyncio.current_task()
        assert task is not None
        asyncio.get_running_loop().add_signal_handler(
            signal.SIGTERM, self._on_sigterm, task
        )
        translate = require("watchers.translate", "publishing the cluster as the watcher does")
        apply = require("watchers.apply", "applying the example policies")
        require("streams.membership", "computing what policy says")
        cluster = scenario.default_cluster()
        try:
            objects = apply.load_all(apply.read_sources(
                [str(scenario.EXAMPLES_DIR / name) for name in scenario.EXAMPLES]))
        except apply.ApplyError as exc:
            raise DemoError(f"the example policies do not load:\n{exc}") from None
        hep = scenario.host_endpoint(objects)
        world = World()
        world.add_objects(objects)
        publications, outcomes = initial_publications(cluster, objects, translate, apply,
                                                      time.time())
        world.take(publications)
        cases = scenario.cases(cluster, hep)

        self.intro(cluster)
        kafka = await self.start_broker()
        lines = await create_topics(kafka, self.prefix, self.options.partitions)
        self.detail(f"{len(lines)} topics created with prefix {self.prefix!r}, "
                    f"{self.options.partitions} partitions each")

        async with Publishing(kafka, self.prefix) as publishing:
            self.step(f"Publishing the cluster as the Kubernetes watcher would "
                      f"({len(publications)} records) and applying the example policies")
            await publishing.publish(publications)
            self.detail("portcullis apply -f " + " -f ".join(
                f"examples/{name}" for name in scenario.EXAMPLES) + ":")
            for outcome in outcomes:
                self.say("    " + outcome.line())
            await self.read_back(kafka, publications)

            if not self.dry_run:
                self.step("Creating the simulated cluster in network namespaces "
                          f"({self.network.name('…')})")
                self.network.build(cluster, str(hep.interface_name), str(hep.expected_ips[0]),
                                   lambda key: interface_of(world, key))
                self.detail(f"node {scenario.NODE}: {self.network.namespaces['node']}; "
                            f"{len(cluster.pods)} pods, outside network with "
                            f"{len(cluster.servers)} TCP servers")

            require_present("streams.app", "the membership stage")
            self.step("Starting the membership stream processor (`portcullis process`)")
            self.start_service("processor", ["process", "--store", "memory",
                                             "--data-dir", str(self.workdir / "streams"),
                                             "--group", f"{self.prefix}streams",
                                             # one worker: a short session joins in ~1 s
                                             "--session-timeout", "2"])
            reader = TopicReader(kafka, self.prefix, ("policies", "endpoints", "memberships"))
            await reader.start()
            try:
                took = await self.wait_memberships(reader, world)
                self.detail(f"memberships computed in {took:.1f}s:")
                texts = policy_selector_texts(world)
                for line in membership_lines(reader.current("memberships"), texts):
                    self.say("    " + line)
                probe = await self.enforce(reader, world, cases, hep)
                await self.show(world, cases, probe, "Connections, as policy decides them")
                await self.change_labels(publishing, reader, world, cluster, cases, probe,
                                         translate)
            finally:
                await reader.stop()
        self.say()
        self.say(self.style("Done: cleaning up the broker, processes and namespaces.", "bold"))
        return 0

    def intro(self, cluster: Cluster) -> None:
        self.say(self.style("Portcullis demo: egress policy on a small simulated cluster", "bold"))
        self.say(f"  namespaces: {', '.join(n.name for n in cluster.namespaces)}; pods: "
                 f"{', '.join(p.display for p in cluster.pods)}; node {scenario.NODE}")
        self.say(f"  policies: {', '.join('examples/' + n for n in scenario.EXAMPLES)}")
        if self.dry_run:
            self.say(self.style("  DRY RUN: ", "yellow", "bold")
                     + "no namespaces, no kernel rules; the enforcer's rules are computed and "
                     "packets are run through them in Python")
        self.say()

    async def start_broker(self) -> dict[str, Any]:
        if self.options.bootstrap:
            self.step(f"Using the broker at {self.options.bootstrap}")
            return {"bootstrap_servers": self.options.bootstrap, **self.kafka_extra}
        brokers = require("portcullis.brokers", "starting the embedded broker")
        self.step("Starting the embedded Tansu broker (memory storage)")
        broker = brokers.TansuBroker(workdir=self.workdir / "broker")
        self.broker = broker
        try:
            # on this (the main) thread: the broker then dies with us, even on SIGKILL
            broker.start()
        except brokers.BrokerError as exc:
            raise DemoError(str(exc)) from None
        self.detail(f"ready at {broker.bootstrap} in {broker.started_in:.2f}s")
        return {"bootstrap_servers": broker.bootstrap}

    async def read_back(self, kafka: Mapping[str, Any], publications: Sequence[Any]) -> None:
        """Read the input topics back: what the processor and the enforcers will see."""
        wanted = {(p.topic, p.key) for p in publications}
        reader = TopicReader(kafka, self.prefix, ("profiles", "endpoints", "policies"))
        await reader.start()
        try:
            deadline = time.monotonic() + 20
            while not wanted <= {(s, k) for s, keys in reader.latest.items() for k in keys}:
                if time.monotonic() > deadline:
                    raise DemoError("published records did not come back from the broker in 20s")
                await reader.poll(0.2)
            self.detail(f"read back {len(wanted)} keys from the topics:")
            for suffix in ("profiles", "endpoints", "policies"):
                for key, value in sorted(reader.latest.get(suffix, {}).items()):
                    self.say("    " + summarise(suffix, key, value))
        finally:
            await reader.stop()

    def start_service(self, name: str, args: list[str]) -> Service:
        bootstrap = (self.broker.bootstrap if self.broker is not None
                     else str(self.options.bootstrap))
        service = Service(
            name, [*args, *connection_args(bootstrap, self.prefix, self.options.partitions)],
            self.workdir / f"{name}.log",
        )
        self.services.append(service)
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        if self.broker is not None:
            # the embedded broker is plaintext on loopback: no settings from the environment
            env = {k: v for k, v in env.items() if not k.startswith("PORTCULLIS_")}
        service.start(env)
        self.detail(f"{name} pid {service.process.pid if service.process else '?'}, "
                    f"log {service.log_path}")
        return service

    async def wait_memberships(self, reader: TopicReader, world: World) -> float:
        """Until the memberships topic holds exactly what the oracle computes from the inputs."""
        oracle = require("streams.oracle", "checking the processor's output")
        began = time.monotonic()
        while True:
            want = set(oracle.oracle_memberships(
                world.endpoints.values(), world.profiles.values(), world.policies.values()))
            await reader.poll(0.1)
            if set(reader.current("memberships")) == want:
                return time.monotonic() - began
            self.check_services()
            if time.monotonic() - began > SETTLE_TIMEOUT:
                have = len(reader.current("memberships"))
                raise DemoError(
                    f"the processor did not publish the expected {len(want)} memberships in "
                    f"{SETTLE_TIMEOUT:.0f}s (the topic holds {have}); its log:\n"
                    + tail(self.workdir / "processor.log")
                )

    # ------------------------------------------------------------------ enforcement

    async def enforce(self, reader: TopicReader, world: World, cases: Sequence[Case],
                      hep: Any) -> Callable[[Sequence[Case]], Any]:
        """Start enforcing; returns how to observe the outcome of a list of cases."""
        if self.dry_run:
            self.step("Enforcer (dry run): computing node1's ipsets and iptables chains "
                      "from the topics")
            sim = Simulated(reader, str(hep.interface_name), str(hep.expected_ips[0]), world)
            await reader.poll(0.1)
            for line in sim.rules_text(policy_selector_texts(world)):
                self.say("    " + line)

            async def observe_sim(cs: Sequence[Case]) -> list[bool | None]:
                await reader.poll(0.05)
                return sim.outcomes(cs)

            return observe_sim

        require_present("enforcers.engine", "the enforcement stage")
        self.step(f"Starting the enforcer for {scenario.NODE} in its namespace "
                  "(`portcullis enforce`)")
        dns = [arg for s in world_dns_servers(self.network) for arg in ("--dns-server", s)]
        self.start_service("enforcer", ["enforce", "--node", scenario.NODE,
                                        "--netns", self.network.namespaces["node"], *dns,
                                        "--resync-interval", "5",
                                        # the embedded broker holds a fetch for its wait
                                        "--fetch-max-wait", "0.01"])

        async def observe_real(cs: Sequence[Case]) -> list[bool | None]:
            attempts = [(c.source.netns_role, c.server) for c in cs]
            return list(await asyncio.to_thread(self.network.connect_all, attempts))

        began = time.monotonic()
        expected = [world.verdict(c.source.key, c.server).allowed for c in cases]
        while True:
            self.check_services()
            got = await observe_real(cases)
            if got == expected:
                self.detail(f"dataplane programmed: every connection as policy says after "
                            f"{time.monotonic() - began:.1f}s")
                self.detail(self.network.dataplane_summary())
                break
            if time.monotonic() - began > SETTLE_TIMEOUT:
                self.detail(f"after {SETTLE_TIMEOUT:.0f}s some connections still disagree "
                            "with policy (marked below); enforcer log:\n"
                            + tail(self.workdir / "enforcer.log", 10))
                break
            await asyncio.sleep(0.3)
        return observe_real

    async def show(self, world: World, cases: Sequence[Case], observe: Any, title: str,
                   changed: set[Case] | None = None) -> list[Row]:
        observed = await observe(cases)
        rows = [
            Row(c.source.display, c.server.display,
                world.verdict(c.source.key, c.server).allowed, o,
                world.why(c.source.key, c.server), c in (changed or set()))
            for c, o in zip(cases, observed, strict=True)
        ]
        self.say()
        self.step(title)
        column = "RULES (sim)" if self.dry_run else "REAL TCP"
        for line in render(rows, self.style, column):
            self.say(line)
        self.say("  " + summary(rows))
        return rows

    async def observe_one(self, observe: Any, case: Case) -> bool | None:
        """One quick look at one connection (a short connect timeout for real TCP)."""
        if self.dry_run:
            got = await observe([case])
            return got[0]  # type: ignore[no-any-return]
        return await asyncio.to_thread(
            self.network.connect, case.source.netns_role, case.server, 0.05)

    async def change_labels(self, publishing: Publishing, reader: TopicReader, world: World,
                            cluster: Cluster, cases: Sequence[Case], observe: Any,
                            translate: Any) -> None:
        key, new_labels = cluster.relabel
        pod = cluster.pod(key)
        old_labels = dict(pod.labels)
        if not (self.options.once or self.options.watch) and self.out.isatty():
            await asyncio.sleep(2.0)  # a moment to read the table
        await self.change_label(publishing, reader, world, cluster, cases, observe, translate,
                                pod, new_labels)
        if not self.options.watch:
            return
        self.say()
        self.detail(f"--watch: flipping the label every {self.options.watch_interval:g}s; "
                    "Ctrl-C stops and cleans up")
        labels = [old_labels, dict(new_labels)]
        turn = 0
        while True:
            await asyncio.sleep(self.options.watch_interval)
            await self.change_label(publishing, reader, world, cluster, cases, observe,
                                    translate, pod, labels[turn % 2])
            turn += 1

    async def change_label(self, publishing: Publishing, reader: TopicReader, world: World,
                           cluster: Cluster, cases: Sequence[Case], observe: Any, translate: Any,
                           pod: scenario.Pod, labels: Mapping[str, str]) -> None:
        oracle = require("streams.oracle", "checking the processor's output")
        before = {c: world.verdict(c.source.key, c.server).allowed for c in cases}
        self.version += 1
        text = ", ".join(f"{k}={v}" for k, v in labels.items())
        self.say()
        self.step(f"Changing a label: pod {pod.display} is now {text}")
        publication = translate.pod_endpoint(
            scenario.pod_object(pod, labels, self.version), time.time())
        world.take([publication])
        flips = [c for c in cases if world.verdict(c.source.key, c.server).allowed != before[c]]
        want_members = set(oracle.oracle_memberships(
            world.endpoints.values(), world.profiles.values(), world.policies.values()))
        before_members = set(reader.current("memberships"))
        began = time.monotonic()
        began_wall = time.time()
        await publishing.publish([publication])
        published = time.monotonic() - began
        member_at: float | None = None
        flip_at: float | None = None
        while time.monotonic() - began < FLIP_TIMEOUT:
            self.check_services()
            if member_at is None:
                await reader.poll(0.02)
                if set(reader.current("memberships")) == want_members:
                    member_at = time.monotonic() - began
            if flip_at is None:
                if not flips:
                    flip_at = 0.0
                else:
                    # a dropped SYN costs the probe's timeout: probe briefly, often
                    got = await self.observe_one(observe, flips[0])
                    if got == (not before[flips[0]]):
                        flip_at = time.monotonic() - began
            if member_at is not None and flip_at is not None:
                break
        written = [reader.stamped.get(f"memberships|{k}")
                   for k in before_members ^ want_members]
        produced = (max(w for w in written if w is not None) - began_wall
                    if written and all(w is not None for w in written) else None)
        self.say(self.style("  propagation: ", "bold")
                 + f"label published in {published * 1000:.0f} ms; "
                 + (f"processor wrote the memberships after {produced * 1000:.0f} ms, "
                    if produced is not None else "")
                 + "seen on the topic after "
                 + (f"{member_at * 1000:.0f} ms" if member_at is not None else "— (not seen)")
                 + ("; connection flipped after "
                    + (f"{flip_at * 1000:.0f} ms" if flip_at is not None else
                       f"— (not within {FLIP_TIMEOUT:.0f}s)")
                    + f" ({flips[0].source.display} → {flips[0].server.display})"
                    if flips else "; no connection changes"))
        await self.show(world, cases, observe, "Connections after the label change "
                        "(→ marks what changed)", set(flips))


def world_dns_servers(network: Any) -> list[str]:
    """The demo's trusted DNS server: its kube-dns pod (answers learned for domain rules)."""
    return [network.dns_ip] if network.dns_ip else []


def policy_selector_texts(world: World) -> dict[str, str]:
    from policy.model import Policy

    return selector_texts(o for o in world.objects.values() if isinstance(o, Policy))


def interface_of(world: World, pod_key: str) -> str:
    """The host-side veth name the watcher reported for a pod."""
    rec = world.endpoints.get(pod_key)
    if rec is None or not rec.interface:
        raise DemoError(f"no endpoint with an interface was published for {pod_key}")
    return str(rec.interface)


def initial_publications(cluster: Cluster, objects: Sequence[Any], translate: Any, apply: Any,
                         now: float) -> tuple[list[Any], list[Any]]:
    """Namespaces and pods as the Kubernetes watcher publishes them, and the example
    policies as `portcullis apply` does on fresh topics; plus apply's outcomes."""
    pubs: list[Any] = [
        translate.namespace_profile(scenario.namespace_object(ns), now)
        for ns in cluster.namespaces
    ]
    pubs += [translate.pod_endpoint(scenario.pod_object(pod), now) for pod in cluster.pods]
    outcomes, applied = apply.plan_apply(objects, {}, actor=scenario.ACTOR, now=now)
    return pubs + list(applied), list(outcomes)


class Simulated:
    """The enforcer's pure core fed from the topics: rendered rules, and packets through them."""

    def __init__(self, reader: TopicReader, uplink: str, node_ip: str, world: World) -> None:
        self.reader = reader
        self.uplink = uplink
        self.node_ip = node_ip
        self.world = world

    def state(self) -> Any:
        engine = require("enforcers.engine", "the dry-run enforcer")
        state_mod = require("enforcers.state", "the dry-run enforcer")
        from enforcers.dnscache import Learned
        from enforcers.ipsets import set_name
        from enforcers.metrics import EnforcerMetrics

        state = state_mod.EnforcerState(scenario.NODE, set_name)
        sink = engine.RecordSink(state, EnforcerMetrics(), prune=True)  # policies come first
        for suffix in ("policies", "endpoints", "memberships"):
            for key, value in self.reader.latest.get(suffix, {}).items():
                sink.message(suffix, key.encode(), value)
        # what the enforcer would learn from kube-dns's answers for the names looked up
        learned = [Learned(s.domain, (s.ip,), 300)
                   for s in scenario.default_cluster().servers if s.domain]
        sink.apply_domain_changes(sink.domains.learn_items(learned, time.time()))
        return state

    def rules_text(self, selector_text: Mapping[str, str]) -> list[str]:
        """The ipsets and the policy chains the enforcer would program, readably."""
        render = require("enforcers.render", "the dry-run enforcer")
        from enforcers.ipsets import set_name

        desired = self.state().desired()
        by_set = {set_name(uid): text for uid, text in selector_text.items()}
        lines = ["ipsets (one per selector a rule refers to):"]
        for name, members in sorted(desired.sets.items()):
            lines.append(f"  {name}  {{{', '.join(sorted(members))}}}  ← {by_set.get(name, '?')}")
        policies = {render.policy_chain(k): k for k in self.world.objects}
        ours = [n for n in sorted(desired.chains) if n in policies]
        endpoints = len(desired.chains) - len(ours) - len(render.DISPATCH_CHAINS)
        fwd = desired.chains.get(render.FORWARD_CHAIN)
        out = desired.chains.get(render.OUTPUT_CHAIN)
        lines.append(
            f"iptables: {render.FORWARD_CHAIN} dispatches {len(fwd.rules) if fwd else 0} pod "
            f"interfaces, {render.OUTPUT_CHAIN} {len(out.rules) if out else 0} host interface(s) "
            f"to {endpoints} endpoint chains, which jump to the policy chains:"
        )
        for name in ours:
            lines.append(f"  {name}  ({policies[name]})")
            lines += [f"    {_COMMENT.sub('', line)}"
                      for line in render.chain_lines(desired.chains[name])]
        return lines

    def outcomes(self, cases: Sequence[Case]) -> list[bool | None]:
        render = require("enforcers.render", "the dry-run enforcer")
        desired = self.state().desired()
        out: list[bool | None] = []
        for case in cases:
            if case.source.kind == "host":
                start = render.OUTPUT_CHAIN
                pkt = render.Packet(self.node_ip, case.server.ip, "tcp", case.server.port,
                                    out_iface=self.uplink)
            else:
                rec = self.world.endpoints[case.source.key]
                start = render.FORWARD_CHAIN
                pkt = render.Packet(rec.ips[0], case.server.ip, "tcp", case.server.port,
                                    in_iface=rec.interface or "")
            if start not in desired.chains:
                out.append(True)  # nothing programmed: the kernel's default lets it through
                continue
            result = render.simulate(desired.chains, start, pkt, desired.sets)
            out.append(result != "DROP")
        return out


def run(options: Options, kafka: Mapping[str, Any] | None = None) -> int:
    """Entry point for the CLI: choose the mode, explain it, run, clean up."""
    if not options.dry_run:
        missing = missing_requirements()
        if missing:
            print("portcullis demo: the real dataplane needs " + "; ".join(missing) + ".",
                  flush=True)
            print("  Running in dry-run mode instead: the same broker, topics and processor, "
                  "the enforcer's rules computed but not installed.\n"
                  "  For real connections run it as root: sudo ./dev demo\n", flush=True)
            options.dry_run = True
        else:
            stale = leftover_namespaces()
            if stale:
                # not removed: they may belong to a demo running right now
                print(f"portcullis demo: note: {len(stale)} network namespace(s) from another "
                      f"demo run exist ({', '.join(stale[:4])}{'…' if len(stale) > 4 else ''}); "
                      "if no other demo is running, remove them with `ip netns del NAME`",
                      flush=True)
    return Demo(options, kafka).run()
