"""The benchmark's pure pipeline, naive baseline, fleet and consistency checker."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from benchmarks.churn import checker
from benchmarks.churn.cluster import ChurnGenerator, ClusterSpec, build_cluster
from benchmarks.churn.fleet import Fleet
from benchmarks.churn.pipeline import NaivePipeline, PurePipeline
from streams.oracle import compacted_payloads
from topics.records import EndpointRecord

TINY = ClusterSpec(pods=150, nodes=3, policies=20, network_sets=3, cidrs_per_set=4,
                   pods_per_namespace=50, apps_per_namespace=3, seed=5)


def run_pure(spec: ClusterSpec, events: int, read_all: bool = False) -> PurePipeline:
    pipe = PurePipeline(build_cluster(spec), partitions=4, read_all=read_all)
    pipe.load()
    gen = ChurnGenerator(pipe.cluster)
    for i, event in enumerate(gen.stream(events)):
        pipe.publish_event(event, 2e9 + i)
        if i % 7 == 0:
            pipe.settle()
    pipe.settle()
    return pipe


def expected_of(pipe: PurePipeline) -> checker.Expected:
    endpoints, profiles, policies = pipe.inputs()
    return checker.expected_state(endpoints, profiles, policies, pipe.cluster.nodes)


def test_pure_pipeline_equals_the_oracle_after_churn() -> None:
    pipe = run_pure(TINY, 120)
    expected = expected_of(pipe)
    result = checker.check(expected, pipe.fleet.programmed_sets())
    assert result.ok, result.report()
    assert result.sets > 0 and result.members > 0
    assert checker.check_memberships(
        expected, compacted_payloads(pipe.processor.memberships)) == []
    # latency samples exist for churn events, none for the initial load
    assert pipe.fleet.samples
    assert all(at >= 2e9 for at, *_rest in pipe.fleet.samples)


@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), events=st.integers(1, 80))
def test_property_any_seed_any_length_is_consistent(seed: int, events: int) -> None:
    pipe = run_pure(replace(TINY, seed=seed), events)
    result = checker.check(expected_of(pipe), pipe.fleet.programmed_sets())
    assert result.ok, result.report()


@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), events=st.integers(1, 80))
def test_property_nodes_reading_every_record_program_what_routed_nodes_do(
        seed: int, events: int) -> None:
    """The surge scenarios' nodes read every record as bytes through the engine's sink
    (which decodes and prunes what is not theirs); the oracle: nodes routed only what
    concerns them, decoded once. Same sets, and both equal the checker's oracle."""
    spec = replace(TINY, seed=seed)
    every = run_pure(spec, events, read_all=True)
    routed = run_pure(spec, events)
    assert every.fleet.programmed_sets() == routed.fleet.programmed_sets()
    result = checker.check(expected_of(every), every.fleet.programmed_sets())
    assert result.ok, result.report()
    # every node read every membership record, not only those routed to it
    assert sum(n.state.membership_count() for n in every.fleet.nodes.values()) >= sum(
        n.state.membership_count() for n in routed.fleet.nodes.values())


def test_checker_reports_missing_extra_and_leftover_sets_readably() -> None:
    pipe = run_pure(TINY, 30)
    expected = expected_of(pipe)
    programmed = pipe.fleet.programmed_sets()
    node = next(n for n, sets in expected.sets.items() if any(sets.values()))
    name = next(n for n, m in expected.sets[node].items() if m)
    member = sorted(expected.sets[node][name])[0]
    broken = {n: {k: set(v) for k, v in sets.items()} for n, sets in programmed.items()}
    broken[node][name].discard(member)
    broken[node][name].add("203.0.113.99")
    broken[node]["pc-s:notneededbyanyrule"] = {"10.9.9.9"}
    broken[node]["pt-s:leftover"] = set()
    result = checker.check(expected, broken)
    assert not result.ok
    text = result.report()
    assert f"{node}: set {name}: missing 1: {member}; extra 1: 203.0.113.99" in text
    assert "pc-s:notneededbyanyrule programmed but no rule needs it" in text
    assert "temporary set pt-s:leftover left behind" in text
    del broken[node][name]
    assert f"{node}: set {name} missing" in checker.check(expected, broken).report()


def test_checker_flags_wrong_memberships() -> None:
    pipe = run_pure(TINY, 10)
    expected = expected_of(pipe)
    compacted = compacted_payloads(pipe.processor.memberships)
    key = sorted(compacted)[0]
    ns, node, iface, _ips = compacted[key]
    compacted[key] = (ns, node, iface, ("10.255.255.1",))
    del compacted[sorted(compacted)[1]]
    diffs = checker.check_memberships(expected, compacted)
    assert any(d.startswith(f"memberships: {key} is") for d in diffs)
    assert any(d.startswith("memberships: missing") for d in diffs)


def test_naive_baseline_programs_the_same_sets() -> None:
    ours = run_pure(TINY, 25)
    naive = NaivePipeline(build_cluster(TINY))
    naive.recompute()
    gen = ChurnGenerator(naive.cluster)
    for i, event in enumerate(gen.stream(25)):
        naive.apply(event.key, event.record(2e9 + i), 2e9 + i)
    assert naive.programmed_sets() == ours.fleet.programmed_sets()
    # and it rewrote every set in full each time: far more member operations than ours
    naive_ops = sum(n.member_ops for n in naive.fleet.nodes.values())
    our_ops = sum(n.member_ops for n in ours.fleet.nodes.values())
    assert naive_ops > 5 * our_ops


def test_restarted_node_converges_without_losing_changes() -> None:
    pipe = run_pure(TINY, 40)
    node = pipe.cluster.nodes[0]
    pipe.fleet.restart_node(node, 2e9 + 100)
    gen = ChurnGenerator(pipe.cluster)
    gen.rng = random.Random(99)
    for i, event in enumerate(gen.stream(20)):
        pipe.publish_event(event, 2e9 + 200 + i)
    pipe.settle()
    result = checker.check(expected_of(pipe), pipe.fleet.programmed_sets())
    assert result.ok, result.report()


def _pod(name: str, at: float) -> EndpointRecord:
    return EndpointRecord(kind="pod", namespace="a", name=name, node="n1", interface=f"c{name}",
                          ips=("10.0.0.1",), labels={}, service_account=None,
                          source="kubernetes", observed_at=at)


def test_fleet_node_clock_batches_by_arrival_and_never_overlaps() -> None:
    """Records arriving within the batch window share a transaction; a node is serial."""
    fleet = Fleet.of(["n1"])
    base = 2e9
    cold = _pod("p0", base - 100)
    fleet.endpoint(cold.key, cold, base - 100)
    assert fleet.program() == 1  # the cold start: everything read, programmed once
    first, second, later = _pod("p1", base), _pod("p2", base + 1e-4), _pod("p3", base + 10)
    fleet.endpoint(first.key, first, base + 0.5)
    fleet.endpoint(second.key, second, base + 0.501)  # inside the 3 ms window
    fleet.endpoint(later.key, later, base + 10.2)
    assert fleet.program(horizon=base + 5) == 1  # the later one may still miss records
    assert fleet.program() == 1
    done = {at: d for at, _node, _sim, _wall, d in fleet.samples}
    assert done[base] == done[base + 1e-4] >= base + 0.503
    assert done[base + 10] >= base + 10.203
    sims = {at: sim for at, _n, sim, _w, _d in fleet.samples}
    assert sims[base] == done[base] - base


def test_fleet_node_busy_delays_the_next_transaction() -> None:
    fleet = Fleet.of(["n1"])
    base = 2e9
    cold = _pod("p0", base - 100)
    fleet.endpoint(cold.key, cold, base - 100)
    fleet.program()
    fleet.nodes["n1"].busy_until = base + 7.0  # the node is still working on something
    rec = _pod("p1", base)
    fleet.endpoint(rec.key, rec, base + 0.1)
    fleet.program()
    (_at, _node, sim, _wall, done), = fleet.samples
    assert done >= base + 7.0 and sim >= 7.0


def test_fleet_pending_counts_what_waits_for_a_transaction() -> None:
    """What `settle` waits for: records read but held back by the horizon."""
    fleet = Fleet.of(["n1", "n2"])
    base = 2e9
    cold = _pod("p0", base - 100)
    fleet.endpoint(cold.key, cold, base - 100)
    fleet.program()
    assert fleet.pending() == 0
    rec = _pod("p1", base)
    fleet.endpoint(rec.key, rec, base + 1.0)
    fleet.program(horizon=base + 0.5)  # read, not yet known to be complete
    assert fleet.pending() == 1  # only n1 hosts the pod
    fleet.program()
    assert fleet.pending() == 0


class _Partitions:
    """What `Run.read_horizon` asks of the consumer: each partition's end and position."""

    def __init__(self, ends: dict[str, int | None], positions: dict[str, int]) -> None:
        self.ends, self.positions = ends, positions

    def highwater(self, tp: str) -> int | None:
        return self.ends[tp]

    async def position(self, tp: str) -> int:
        return self.positions[tp]


def test_read_horizon_stops_at_the_last_record_of_a_partition_still_behind() -> None:
    import asyncio

    from benchmarks.churn.run import Run

    def horizon(ends: dict[str, int | None], positions: dict[str, int],
                read_to: dict[str, float]) -> float:
        consumer = _Partitions(ends, positions)
        return asyncio.run(Run.read_horizon(consumer, list(ends), read_to, 100.0))

    # every partition read to its end: the latest record read bounds nothing
    assert horizon({"a": 5, "b": 9}, {"a": 5, "b": 9}, {"a": 40.0, "b": 100.0}) == 100.0
    # b is behind: nothing after its last record read may be programmed yet
    assert horizon({"a": 5, "b": 9}, {"a": 5, "b": 7}, {"a": 40.0, "b": 60.0}) == 60.0
    # the earliest of the partitions behind
    assert horizon({"a": 5, "b": 9}, {"a": 3, "b": 7}, {"a": 40.0, "b": 60.0}) == 40.0
    # behind and never read: nothing may be programmed
    assert horizon({"a": 5, "b": 9}, {"a": 5, "b": 0}, {"a": 100.0}) == float("-inf")
    # never fetched (no end known yet): no bound from it
    assert horizon({"a": None, "b": 9}, {"a": 0, "b": 9}, {"b": 100.0}) == 100.0


def test_tracker_tail_names_the_slowest_percent_when_and_where() -> None:
    from benchmarks.churn.run import Tracker

    tracker = Tracker()
    start = 1000.0
    for i in range(300):  # one event every 10 ms; 3 of them (1%) slow, on node-b
        at = start + i * 0.01
        tracker.add_event(at, "fast")
        slow = i in (100, 150, 151)
        latency = 0.5 + i / 1000 if slow else 0.02
        tracker.membership_seen(at, at + 0.1 if slow else at + 0.01)
        tracker.sample((at, "node-a", 0.01, 0.01, at + 0.01))
        tracker.sample((at, "node-b" if slow else "node-c", latency, latency, at + latency))
    tracker.add_event(9999.0, "other")
    tracker.sample((9999.0, "node-z", 50.0, 50.0, 10049.0))  # another phase: not counted
    tail = tracker.tail("fast", start)
    assert tail["events"] == 3
    assert tail["from_s"] == 0.6
    assert (round(tail["published_from_s"], 6), round(tail["published_to_s"], 6)) == (1.0, 1.51)
    # 0.1 s of processor stage in latencies of 0.6, 0.65 and 0.651 s: the middle one
    assert round(tail["processor_stage_share_median"], 6) == round(0.1 / 0.65, 6)
    assert tail["distinct_last_nodes"] == 1 and tail["last_nodes"] == [("node-b", 3)]
    assert tail["without_membership"] == 0
    assert tail["slowest"]["node"] == "node-b" and tail["slowest"]["latency_s"] == 0.651
    assert round(tail["slowest"]["published_s"], 6) == 1.51
    assert round(tail["slowest"]["processor_stage_s"], 6) == 0.1
    from benchmarks.churn.run import tail_lines

    line = tail_lines({"phases": [{"phase": "fast", "tail": tail}]})[-1]
    assert "3 events of 600 ms or more" in line and "651 ms" in line and "node-b" in line
    assert Tracker().tail("fast", start) == {}


def test_tracker_tail_shares_leave_out_events_without_a_membership() -> None:
    from benchmarks.churn.run import Tracker

    tracker = Tracker()
    for i in range(100):
        at = 50.0 + i
        tracker.add_event(at, "p")
        if i != 99:  # the slowest changed no membership: a node's own endpoint
            tracker.membership_seen(at, at + 0.005)
        tracker.sample((at, "n", 0.01 if i != 99 else 2.0, 0.01, at))
    tail = tracker.tail("p", 50.0)
    assert tail["events"] == 1 and tail["without_membership"] == 1
    assert tail["processor_stage_share_median"] is None
    assert tail["slowest"]["processor_stage_s"] is None


def test_the_bench_reads_the_loop_stalls_the_processor_logs(
        caplog: pytest.LogCaptureFixture) -> None:
    import asyncio
    import logging
    import time
    from types import SimpleNamespace

    from benchmarks.churn.run import loop_stalls
    from streams.app import Processor
    from streams.metrics import LoopWatch, StreamsMetrics

    watch = LoopWatch(0.25, 0.5)
    watch.tick(time.monotonic() - 2.25)  # the previous tick, 2 s late now
    fake = SimpleNamespace(loop_watch=watch, metrics=StreamsMetrics())
    with caplog.at_level(logging.WARNING):
        asyncio.run(Processor._watch_loop(fake))  # type: ignore[arg-type]
    # as `portcullis` formats its log lines (portcullis.cli)
    formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    text = "\n".join(formatter.format(r) for r in caplog.records) + "\nINFO other line\n"
    stalls = loop_stalls(text)
    assert len(stalls) == 1 and 2.0 <= stalls[0][1] < 2.5, text
    assert fake.metrics.loop_stalls.value == 1
    assert loop_stalls("2026-12-08 00:51:05,508 INFO x: nothing\n") == []
