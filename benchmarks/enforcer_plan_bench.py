"""Cost of ``EnforcerState.plan()`` after one local change, against a full render.

A node with 200 local endpoints and 500 policies (3 tiers, 2-3 rules each with peer
selectors and ports). Each step makes one local change (a local endpoint joins or leaves
an applies-to selector, a local endpoint is added or removed, a policy applying here is
edited) and times the ``plan()`` that follows, and separately the engine's dry-run
programmer applying that plan (iptables diff and restore text, ipset operations
recorded). The baseline, measured in the same run on the same state, is what a plan
cost before incremental planning: the full render of every chain
(``render.render(endpoint_specs())``) plus the sets in use.

Two more sections, each with its baseline in the same run:

* ``one_changed_chain``: 100 and 1,000 local endpoints, one policy edited per batch (one
  chain changes): ``plan()`` + the programmer's apply (dry run), against the same plan
  applied the way the programmer did before (every chain's hashes compared and copied,
  the ruleset rebuilt: cost proportional to all chains).
* ``memory``: bytes per membership kept, for a selector local rules need (refcounted
  contents) and for one they do not (the compact record), 20,000 remote endpoints in 5
  selectors each; and the time a 10,000-member selector takes to become needed (its set
  created from the record) and to stop being needed (its contents dropped, set destroyed).

    .venv/bin/python benchmarks/enforcer_plan_bench.py [--steps 300]

Prints medians and p99s and saves ``benchmarks/results/enforcer_plan_bench.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import random
import statistics
import time
import tracemalloc
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from enforcers import render
from enforcers.engine import DryRunIptables, Programmer
from enforcers.ipsets import DryRunIpsets
from enforcers.render import Chain, PeerSpec, PortRange, RuleSpec, restore_text
from enforcers.state import (
    CompiledPolicy,
    CompiledRule,
    CompiledTier,
    EnforcerState,
    LocalEndpoint,
)
from policy.selectors import parse

RESULTS = Path(__file__).parent / "results" / "enforcer_plan_bench.json"
N_ENDPOINTS = 200
N_POLICIES = 500
N_APPLIES = 100  # applies-to selectors; each local endpoint is in a few
APPLIES = [parse(f"has(a{k})") for k in range(N_APPLIES)]
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
                          APPLIES[i % N_APPLIES], True, tuple(rules))


def endpoint(i: int) -> LocalEndpoint:
    """Local endpoint `i`, in a few applies-to selectors (by its labels)."""
    ip = f"10.0.{i // 250}.{i % 250}"
    labels = {f"a{(i * m) % N_APPLIES}": "y" for m in (1, 3, 7, 11)}
    return LocalEndpoint(f"pod/ns/e{i}", "workload", f"cali{i:011d}", (ip,), labels=labels)


def build(rng: random.Random) -> EnforcerState:
    state = EnforcerState("n1", namer)
    for tier in TIERS:
        state.upsert_tier(tier)
    for i in range(N_POLICIES):
        state.upsert_policy(make_policy(rng, i))
    for i in range(N_ENDPOINTS):
        state.upsert_endpoint(endpoint(i))
    for p in range(N_PEERS):  # remote peers: set contents only
        for j in range(20):
            state.upsert_membership(f"s:peer-{p}", f"pod/other/r{p}-{j}", [f"10.9.{p}.{j}"])
    state.plan()
    return state


def change(state: EnforcerState, rng: random.Random, kind: str, step: int) -> None:
    i = rng.randrange(N_ENDPOINTS)
    ep = endpoint(i)
    if kind == "membership":  # a label change: the endpoint joins or leaves a selector
        ep = state.endpoints.get(ep.key, ep)
        labels = dict(ep.labels)
        label = f"a{rng.randrange(N_APPLIES)}"
        if labels.pop(label, None) is None:
            labels[label] = "y"
        state.upsert_endpoint(dataclasses.replace(ep, labels=labels))
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


class WholeRulesetApply:
    """The baseline: how a batch's chains were applied before (``Programmer._apply_chains``
    with ``DryRunIptables``): the ruleset rebuilt, every chain's hashes listed and compared,
    and the kernel's and the programmer's copies rebuilt in full."""

    def __init__(self, chains: Mapping[str, Chain]) -> None:
        self.actual = {n: list(c.hashes) for n, c in chains.items()}
        self.kernel = dict(self.actual)
        self.chains = dict(chains)
        self.restores: list[str] = []

    def apply(self, chains: Mapping[str, Chain]) -> None:
        ruleset = dict(chains)  # the state built a new dict for every change
        write = [c for n, c in sorted(ruleset.items()) if self.actual.get(n) != list(c.hashes)]
        delete = tuple(sorted(set(self.actual) - set(ruleset)))
        if write or delete:
            self.restores.append(restore_text(write, delete))
        self.kernel = {n: list(c.hashes) for n, c in ruleset.items()}
        self.actual = {n: list(c.hashes) for n, c in ruleset.items()}
        self.chains = dict(ruleset)


def one_changed_chain(n_endpoints: int, steps: int) -> dict[str, Any]:
    """One policy edited per batch among ``n_endpoints`` local endpoints' chains."""
    state = EnforcerState("n1", namer)

    def pol(k: int, port: int) -> CompiledPolicy:
        rule = CompiledRule(RuleSpec("Allow", "tcp", destination=PeerSpec(
            ports=(PortRange(port, port),))), dst_uid=f"s:peer-{k}")
        return CompiledPolicy(f"GlobalNetworkPolicy//q{k}", "default", (float(k), f"q{k}"),
                              parse(f"has(q{k})"), True, (rule,))

    for k in range(10):
        state.upsert_policy(pol(k, 443))
        for j in range(20):
            state.upsert_membership(f"s:peer-{k}", f"pod/other/r{k}-{j}", [f"10.9.{k}.{j}"])
    for i in range(n_endpoints):
        state.upsert_endpoint(dataclasses.replace(endpoint(i), labels={f"q{i % 10}": "y"}))
    programmer = Programmer(DryRunIpsets(), DryRunIptables())
    programmer.start(state)
    baseline = WholeRulesetApply(programmer.chains)
    after: list[float] = []
    before: list[float] = []
    for step in range(steps):
        state.upsert_policy(pol(step % 10, 1000 + step))
        started = time.perf_counter()
        plan = state.plan()
        programmer.apply(plan)
        after.append((time.perf_counter() - started) * 1000)
        assert plan.changed_chains is not None and len(plan.changed_chains) == 1
        started = time.perf_counter()
        baseline.apply(plan.chains)  # the same plan, the old way
        before.append((time.perf_counter() - started) * 1000)
    assert baseline.actual == {n: list(h) for n, h in programmer.actual.chains.items()}  # type: ignore[union-attr]
    return {
        "chains": len(programmer.chains),
        "plan_and_apply_median_ms": statistics.median(after),
        "plan_and_apply_p99_ms": pct(after, 0.99),
        "baseline_whole_ruleset_apply_median_ms": statistics.median(before),
        "baseline_whole_ruleset_apply_p99_ms": pct(before, 0.99),
    }


def memory(n_remote: int = 20_000, per_endpoint: int = 5) -> dict[str, Any]:
    """Bytes per membership kept, needed and not; a big selector needed and dropped again."""
    out: dict[str, Any] = {"remote_endpoints": n_remote, "selectors_per_endpoint": per_endpoint}
    n_sel = 10
    for label, needed in (("needed", True), ("not_needed", False)):
        state = EnforcerState("n1", namer)
        state.upsert_endpoint(endpoint(0))
        if needed:
            rules = tuple(CompiledRule(RuleSpec("Allow"), dst_uid=f"s:peer-{k}")
                          for k in range(n_sel))
            state.upsert_policy(CompiledPolicy("p", "default", (1.0, "p"), APPLIES[0], True,
                                               rules))
        state.plan()
        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
        for i in range(n_remote):
            ip = f"10.{100 + (i >> 16)}.{(i >> 8) & 255}.{i & 255}"
            for k in range(per_endpoint):
                state.upsert_membership(f"s:peer-{(i + k) % n_sel}", f"pod/ns{i % 50}/r{i}", [ip])
        state.plan()
        used = tracemalloc.get_traced_memory()[0] - base
        tracemalloc.stop()
        out[f"bytes_per_membership_{label}"] = used / (n_remote * per_endpoint)
    # a 10,000-member selector becomes needed (a policy now refers to it), then not
    state = EnforcerState("n1", namer)
    state.upsert_endpoint(endpoint(0))
    for i in range(10_000):
        state.upsert_membership("s:big", f"pod/ns/b{i}", [f"10.200.{i >> 8}.{i & 255}"])
    state.plan()
    need, drop = [], []
    for _ in range(5):
        state.upsert_policy(CompiledPolicy("p", "default", (1.0, "p"), APPLIES[0], True,
                                           (CompiledRule(RuleSpec("Allow"), dst_uid="s:big"),)))
        started = time.perf_counter()
        plan = state.plan()
        need.append((time.perf_counter() - started) * 1000)
        assert len(plan.create_sets[namer("s:big")]) == 10_000
        state.delete_policy("p")
        started = time.perf_counter()
        plan = state.plan()
        drop.append((time.perf_counter() - started) * 1000)
        assert plan.destroy_sets == {namer("s:big")} and not state.contents
    out["selector_10k_becomes_needed_median_ms"] = statistics.median(need)
    out["selector_10k_dropped_median_ms"] = statistics.median(drop)
    return out


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
    scaling = {}
    for n in (100, 1000):
        r2 = scaling[str(n)] = one_changed_chain(n, args.steps)
        print(f"one changed chain of {r2['chains']:5d}: plan+apply median "
              f"{r2['plan_and_apply_median_ms']:.3f} ms p99 {r2['plan_and_apply_p99_ms']:.3f} ms"
              f" | baseline whole-ruleset apply median "
              f"{r2['baseline_whole_ruleset_apply_median_ms']:.3f} ms p99 "
              f"{r2['baseline_whole_ruleset_apply_p99_ms']:.3f} ms")
    mem = memory()
    print(f"memory: {mem['bytes_per_membership_needed']:.0f} bytes/membership needed, "
          f"{mem['bytes_per_membership_not_needed']:.0f} not needed (compact); a 10,000-member "
          f"selector needed in {mem['selector_10k_becomes_needed_median_ms']:.1f} ms, dropped "
          f"in {mem['selector_10k_dropped_median_ms']:.1f} ms")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({
        "endpoints": N_ENDPOINTS, "policies": N_POLICIES, "steps": args.steps,
        "machine": {"python": platform.python_version(), "cpu": platform.processor()
                    or platform.machine()},
        "results": results,
        "one_changed_chain": scaling,
        "memory": mem,
    }, indent=2) + "\n")
    print(f"saved {RESULTS}")


if __name__ == "__main__":
    main()
