"""CPU-seconds per event of each pipeline stage, the bottleneck and the headroom (issue 14).

The machine running the benchmark has two cores; the broker, the processor, the watcher and
a hundred simulated enforcers cannot all keep up with 1,000 events a second on it. So the
surge report does not stop at latency: per phase it divides each stage's CPU time by the
events of the phase. ``1 / (CPU-s per event)`` is how many events a second the stage could
take on one core of this machine; the offered rate times the CPU-s per event is how many
cores it would need to keep up. Every simulated node is its own machine (as in production),
so the enforcer stage is judged by its busiest node, and the fleet's total is given beside.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping
from typing import Any

__all__ = ["NODE_STAGE", "stage_report"]

NODE_STAGE = "enforcer (busiest node)"


def _stage(name: str, cpu_s: float, events: int, rate: float, judged: bool = True,
           note: str = "") -> dict[str, Any]:
    per_event = cpu_s / events if events else 0.0
    return {
        "stage": name,
        "cpu_s": round(cpu_s, 3),
        "cpu_ms_per_event": round(per_event * 1000, 4),
        # events a second one core of this machine could take at this cost
        "events_per_s_per_core": round(1 / per_event, 1) if per_event > 0 else None,
        # cores needed to keep up with the offered rate
        "cores_at_rate": round(per_event * rate, 3),
        "headroom": round(1 / (per_event * rate), 2) if per_event > 0 and rate > 0 else None,
        "judged": judged,
        "note": note,
    }


def stage_report(processes: Mapping[str, float], node_cpu: Mapping[str, float], events: int,
                 rate_per_s: float, unjudged: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Each stage's cost per event in one phase, and which one limits the pipeline.

    ``processes``: CPU seconds each single-process stage (watcher, broker, processor, ...)
    spent in the phase; ``node_cpu``: CPU seconds each simulated node spent; ``rate_per_s``:
    the phase's target rate. ``unjudged`` maps stages reported but never named the bottleneck
    (the harness's one consumer for all nodes, a simulation artefact) to why.
    """
    unjudged = unjudged or {}
    stages = [_stage(name, cpu, events, rate_per_s, judged=name not in unjudged,
                     note=unjudged.get(name, "")) for name, cpu in processes.items()]
    nodes = sorted(node_cpu.values())
    node_summary: dict[str, Any] = {"nodes": len(nodes)}
    if nodes:
        median, busiest, total = statistics.median(nodes), nodes[-1], sum(nodes)
        stages.append(_stage(NODE_STAGE, busiest, events, rate_per_s,
                             note=f"of {len(nodes)} simulated nodes, each its own machine"))
        node_summary.update({
            "cpu_ms_per_event_median": round(median / events * 1000, 4) if events else None,
            "cpu_ms_per_event_max": round(busiest / events * 1000, 4) if events else None,
            "fleet_cpu_ms_per_event": round(total / events * 1000, 4) if events else None,
            # share of one core a node needs to follow this rate (the goal: <= 5 %)
            "core_pct_median": round(100 * median / events * rate_per_s, 3) if events else None,
            "core_pct_max": round(100 * busiest / events * rate_per_s, 3) if events else None,
        })
    judged = [s for s in stages if s["judged"] and s["cpu_s"] > 0]
    worst = max(judged, key=lambda s: s["cores_at_rate"], default=None)
    return {
        "rate_per_s": round(rate_per_s, 1),
        "events": events,
        "stages": stages,
        "nodes": node_summary,
        "bottleneck": worst["stage"] if worst else None,
        "bottleneck_over_one_core": bool(worst and worst["cores_at_rate"] > 1.0),
    }
