"""Cost of ``EnforcerState.plan()`` after one local change, against a full render.

A node with 200 local endpoints and 500 policies (3 tiers, 2-3 rules each with peer
selectors and ports). Each step makes one local change (a local endpoint joins or leaves
an applies-to selector, a local endpoint is added or removed, a policy applying here is
edited) and times the ``plan()`` that follows, and separately the engine's dry-run
programmer applying that plan (iptables diff and restore text, ipset operations
recorded). The baseline, measured in the same run on the same state, is what a plan
cost before incremental planning: the full render of every chain
(``render.render(endpoint_specs())``) plus the sets in use.

    .venv/bin/python benchmarks/enforcer_plan_bench.py [--steps 300]

Prints medians and p99s and saves ``benchmarks/results/enforcer_plan_bench.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import time
from pathlib import Path

from enforcers import render
from enforcers.engine import DryRunIptables, Programmer
from enforcers.ipsets import DryRunIpsets
from enforcers.render import PeerSpec, PortRange, RuleSpec
from enforcers.state import (
    CompiledPolicy,
    CompiledRule,
    CompiledTier,
    EnforcerState,
    LocalEndpoint,
)

RESULTS = Path(__file__).parent / "results" / "enforcer_plan_bench.json"
N_ENDPOINTS = 200
N_POLICIES = 500
N_APPLIES = 100  # applies-to selectors; each local endpoint is in a few
N_PEERS = 150
TIERS = [CompiledTier("sec", (False, False, 10.0, "sec"), "Pass"),
         CompiledTier("platform", (False, False, 20.0, "platform"), "Deny")]


def namer(uid: str) -> str:
    return "pc-" + uid.replace(":", "")[:20]


def make_policy(rng: random.Random, i: int, version: int = 0) -> CompiledPolicy:
    rules = []
    for _ in range(rng.randint(2, 3)):
        port = rng.choice([80, 443, 5432, 8080 + version])
        rules.append(CompiledRule(
            RuleSpec(rng.choice(["Allow", "Allow", "Deny", "Pass"]), "tcp",
                     destination=PeerSpec(ports=(PortRange(port, port),))),
            dst_uid=f"s:peer-{rng.randrange(N_PEERS)}"))
    tier = rng.choice(["default", "default", "sec", "platform"])
    return CompiledPolicy(f"GlobalNetworkPolicy//p{i}", tier, (float(i % 17), f"p{i}"),
                          f"s:apply-{i % N_APPLIES}", True, tuple(rules))


def endpoint(i: int) -> LocalEndpoint:
    ip = f"10.0.{i // 250}.{i % 250}"
    return LocalEndpoint(f"pod/ns/e{i}", "workload", f"cali{i:011d}", (ip,))


def build(rng: random.Random) -> EnforcerState:
    state = EnforcerState("n1", namer)
    for tier in TIERS:
        state.upsert_tier(tier)
    for i in range(N_POLICIES):
        state.upsert_policy(make_policy(rng, i))
    for i in range(N_ENDPOINTS):
        ep = endpoint(i)
        state.upsert_endpoint(ep)
        for uid in {f"s:apply-{rng.randrange(N_APPLIES)}" for _ in range(4)}:
            state.upsert_membership(uid, ep.key, ep.ips)
    for p in range(N_PEERS):  # remote peers: set contents only
        for j in range(20):
            state.upsert_membership(f"s:peer-{p}", f"pod/other/r{p}-{j}", [f"10.9.{p}.{j}"])
    state.plan()
    return state


def change(state: EnforcerState, rng: random.Random, kind: str, step: int) -> None:
    i = rng.randrange(N_ENDPOINTS)
    ep = endpoint(i)
    if kind == "membership":  # a label change: the endpoint joins or leaves a selector
        uid = f"s:apply-{rng.randrange(N_APPLIES)}"
        if state.membership(uid, ep.key) is not None:
            state.delete_membership(uid, ep.key)
        else:
            state.upsert_membership(uid, ep.key, ep.ips)
    elif kind == "endpoint":  # a pod goes and comes back (new interface: a new chain)
        if ep.key in state.endpoints:
            state.delete_endpoint(ep.key)
        else:
            state.upsert_endpoint(ep)
    else:  # a policy is edited
        j = rng.randrange(N_POLICIES)
        state.upsert_policy(make_policy(random.Random(j), j, version=step))


def full_render(state: EnforcerState) -> None:
    """What every plan() did before: every chain rendered, every set in use recomputed."""
    render.render(state.endpoint_specs(), state.family)
    state.uids_in_use()


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    rng = random.Random(7)
    state = build(rng)
    programmer = Programmer(DryRunIpsets(), DryRunIptables())
    programmer.start(state)
    results: dict[str, dict[str, float]] = {}
    for kind in ("membership", "endpoint", "policy"):
        plans: list[float] = []
        fulls: list[float] = []
        applies: list[float] = []
        for step in range(args.steps):
            change(state, rng, kind, step)
            started = time.perf_counter()
            plan = state.plan()
            plans.append((time.perf_counter() - started) * 1000)
            started = time.perf_counter()
            programmer.apply(plan)
            applies.append((time.perf_counter() - started) * 1000)
            if step % 3 == 0:  # the baseline on the very same state
                started = time.perf_counter()
                full_render(state)
                fulls.append((time.perf_counter() - started) * 1000)
        results[kind] = {
            "plan_median_ms": statistics.median(plans), "plan_p99_ms": pct(plans, 0.99),
            "full_render_median_ms": statistics.median(fulls),
            "full_render_p99_ms": pct(fulls, 0.99),
            "speedup_median": statistics.median(fulls) / max(statistics.median(plans), 1e-9),
            "dry_run_apply_median_ms": statistics.median(applies),
            "dry_run_apply_p99_ms": pct(applies, 0.99),
        }
        r = results[kind]
        print(f"{kind:10s} plan median {r['plan_median_ms']:7.3f} ms  p99 {r['plan_p99_ms']:7.3f}"
              f" ms | full render median {r['full_render_median_ms']:7.3f} ms  p99 "
              f"{r['full_render_p99_ms']:7.3f} ms | x{r['speedup_median']:.0f} | dry-run apply "
              f"median {r['dry_run_apply_median_ms']:.3f} ms")
    # the incremental result is the from-scratch one
    assert state.plan().chains == state.desired().chains
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({
        "endpoints": N_ENDPOINTS, "policies": N_POLICIES, "steps": args.steps,
        "machine": {"python": platform.python_version(), "cpu": platform.processor()
                    or platform.machine()},
        "results": results,
    }, indent=2) + "\n")
    print(f"saved {RESULTS}")


if __name__ == "__main__":
    main()
