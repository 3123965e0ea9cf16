"""The surge report: CPU per event of each stage, the bottleneck, the headroom."""

from __future__ import annotations

import pytest

from benchmarks.churn.run import markdown, stage_costs
from benchmarks.churn.scenarios import scenario
from benchmarks.churn.stages import NODE_STAGE, stage_report


def test_per_event_cost_headroom_and_the_bottleneck() -> None:
    rep = stage_report({"broker": 4.0, "processor": 1.0}, {"a": 0.1, "b": 0.3, "c": 0.2},
                       events=1000, rate_per_s=500.0)
    by = {s["stage"]: s for s in rep["stages"]}
    assert by["broker"]["cpu_ms_per_event"] == pytest.approx(4.0)
    assert by["broker"]["events_per_s_per_core"] == pytest.approx(250.0)
    assert by["broker"]["cores_at_rate"] == pytest.approx(2.0)
    assert by["broker"]["headroom"] == pytest.approx(0.5)
    assert by["processor"]["headroom"] == pytest.approx(2.0)
    assert by[NODE_STAGE]["cpu_s"] == pytest.approx(0.3)  # the busiest node
    nodes = rep["nodes"]
    assert nodes["cpu_ms_per_event_median"] == pytest.approx(0.2)
    assert nodes["fleet_cpu_ms_per_event"] == pytest.approx(0.6)
    assert nodes["core_pct_median"] == pytest.approx(10.0)
    assert nodes["core_pct_max"] == pytest.approx(15.0)
    assert rep["bottleneck"] == "broker" and rep["bottleneck_over_one_core"]


def test_an_unjudged_stage_is_reported_but_never_the_bottleneck() -> None:
    rep = stage_report({"harness": 9.0, "broker": 0.5}, {}, events=100, rate_per_s=10.0,
                       unjudged={"harness": "simulation artefact"})
    assert rep["bottleneck"] == "broker" and not rep["bottleneck_over_one_core"]
    assert [s["judged"] for s in rep["stages"]] == [False, True]
    assert rep["nodes"] == {"nodes": 0}


def test_stage_costs_takes_the_harness_less_its_nodes() -> None:
    cpu = {"harness (fleet, publisher)": 5.0, "fleet nodes (thread CPU)": 3.0,
           "broker": 1.0, "processor (faust)": 1.0, "watcher (publisher)": 0.5}
    rep = stage_costs(cpu, {"n1": 1.0, "n2": 2.0}, 100, 100.0)
    by = {s["stage"].split(":")[0]: s for s in rep["stages"]}
    assert by["harness"]["cpu_s"] == pytest.approx(2.0) and not by["harness"]["judged"]
    assert rep["bottleneck"] == NODE_STAGE  # 20 ms an event at 100/s: two cores


def test_surge_scenarios() -> None:
    full, small = scenario("surge"), scenario("surge", small=True)
    assert full.sim_nodes is None and full.read_all and full.stages
    assert (full.spec.pods, full.spec.nodes) == (20_000, 100)
    assert (small.spec.pods, small.spec.nodes) == (2000, 10)
    assert [p.rate for p in full.phases] == [6000, 30000, 60000]
    assert sum(p.seconds for p in full.phases) <= 600
    big = scenario("surge1000")
    assert big.spec.nodes == 1000 and big.spec.pods == 20_000 and big.sim_nodes


def test_the_markdown_has_a_stage_table_per_phase() -> None:
    rep = stage_report({"broker": 4.0}, {"a": 0.1}, events=1000, rate_per_s=1000.0)
    phase = {"phase": "60000/min", "events": 1000, "sustained_per_s": 800.0,
             "offered_per_s": 990.0, "stages": rep,
             "latency_s": {"p50": 0.1, "p90": 0.2, "p99": 0.3, "max": 0.4}}
    result = {"scenario": "surge", "goal": "g", "cluster": {}, "simulated_nodes": 1,
              "broker": "tansu", "seed": 1, "phases": [phase],
              "consistency": {"ok": True, "nodes": 1, "sets": 1, "members": 1}}
    text = markdown(result)
    assert "| broker | 4.0 | 4.000 | 250.0 | 4.0 | 0.25x |" in text
    assert "Bottleneck: **broker** (needs more than one core)." in text
    assert "median 10.00 %, max 10.00 % of one core" in text
