"""One enforcer's CPU following the whole cluster's churn, in process, no broker (issue 14).

Every node reads every membership record of the cluster; most concern other nodes' pods.
This drives the streams' pure core (`PurePipeline`) and a few simulated nodes reading every
record as bytes through the engine's `RecordSink` (`Fleet.read_all`), and reports each
node's CPU per churn event and, at a given rate, its share of one core. ``--profile``
prints the cProfile of the nodes' work (the fleet's transactions only).

    python -m benchmarks.enforcer_follow_bench [--nodes 100] [--sim 5] [--events 2000]
        [--rate 6000] [--profile] [--out benchmarks/results/enforcer_follow_bench.json]
"""

from __future__ import annotations

import argparse
import cProfile
import json
import logging
import pstats
import statistics
import time
from pathlib import Path
from typing import Any

from benchmarks.churn.cluster import ChurnGenerator, ClusterSpec, build_cluster
from benchmarks.churn.pipeline import PurePipeline


def measure(nodes: int, sim: int, events: int, rate: float, pods: int = 20_000,
            profile: bool = False, seed: int = 1) -> dict[str, Any]:
    cluster = build_cluster(ClusterSpec(pods=pods, nodes=nodes, policies=500, seed=seed))
    pipe = PurePipeline(cluster, read_all=True, nodes=cluster.nodes[:sim])
    t0 = time.perf_counter()
    pipe.load()
    load_s = time.perf_counter() - t0
    gen = ChurnGenerator(cluster)
    before = {n: node.cpu for n, node in pipe.fleet.nodes.items()}
    records = pipe.fleet.records
    prof = cProfile.Profile() if profile else None
    if prof is not None:
        prof.enable()
    for i in range(events):
        pipe.publish_event(gen.next(), 2e9 + i)
        pipe.settle()
    if prof is not None:
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)
    per_event = sorted((node.cpu - before[n]) / events for n, node in pipe.fleet.nodes.items())
    med = statistics.median(per_event)
    return {
        "cluster_nodes": nodes, "pods": pods, "simulated": sim, "events": events,
        "records_per_event": round((pipe.fleet.records - records) / events, 2),
        "load_s": round(load_s, 1),
        "node_cpu_ms_per_event": {"median": round(med * 1000, 4),
                                  "max": round(per_event[-1] * 1000, 4)},
        "rate_per_min": rate,
        "core_pct_at_rate": {"median": round(100 * med * rate / 60, 2),
                             "max": round(100 * per_event[-1] * rate / 60, 2)},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=100, help="nodes in the cluster")
    parser.add_argument("--sim", type=int, default=5, help="nodes simulated")
    parser.add_argument("--pods", type=int, default=20_000)
    parser.add_argument("--events", type=int, default=2000)
    parser.add_argument("--rate", type=float, default=6000, help="pods/min for the core %%")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    logging.getLogger("enforcers").setLevel(logging.ERROR)  # the cluster's ingress notes
    result = measure(args.nodes, args.sim, args.events, args.rate, args.pods, args.profile)
    print(json.dumps(result, indent=1))
    if args.out:
        old = json.loads(args.out.read_text()) if args.out.exists() else []
        args.out.write_text(json.dumps([*old, result], indent=1) + "\n")


if __name__ == "__main__":
    main()
