"""Selector evaluation and label-index lookup speed, against brute force in the same run.

Workload: 2,000 mixed, realistic selectors (app/tier/team/env labels, namespace scoping
conjuncts as the compile stage produces them, some ``has``, some ``!=``/``not in``, a few
that no index can help) and 10,000 endpoint label sets shaped like Calico's (own labels plus
``projectcalico.org/*`` and inherited ``pcns.*`` labels).

Run: ``.venv/bin/python -m benchmarks.selector_bench`` (``--quick`` for a smoke run).
Prints the figures and saves them to ``benchmarks/results/selector_bench.json``.
Goals (issue 2): index lookups >= 20x brute force, and >= 20,000 lookups per second.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

from policy.labelindex import SelectorIndex
from policy.selectors import Selector, parse

RESULTS = Path(__file__).resolve().parent / "results" / "selector_bench.json"
NS = "projectcalico.org/namespace"

NAMESPACES = [f"ns-{i:03d}" for i in range(100)]
APPS = [f"app-{i:03d}" for i in range(300)]
TIERS = ["web", "api", "db", "cache", "worker", "batch"]
TEAMS = [f"team-{name}" for name in ("payments", "search", "identity", "billing", "ads",
                                     "infra", "data", "mobile", "growth", "support")]
TEAMS += [f"team-{i:02d}" for i in range(20)]
ENVS = ["prod", "staging", "dev"]
VERSIONS = [f"v{i}" for i in range(1, 6)]


def make_label_sets(count: int, rng: random.Random) -> list[dict[str, str]]:
    """Endpoints: each namespace belongs to one team and env and hosts a few apps."""
    ns_team = {ns: rng.choice(TEAMS) for ns in NAMESPACES}
    ns_env = {ns: rng.choice(ENVS) for ns in NAMESPACES}
    ns_apps = {ns: rng.sample(APPS, 6) for ns in NAMESPACES}
    sets = []
    for _ in range(count):
        ns = rng.choice(NAMESPACES)
        labels = {
            "app": rng.choice(ns_apps[ns]),
            "tier": rng.choice(TIERS),
            "team": ns_team[ns],
            "env": ns_env[ns],
            "version": rng.choice(VERSIONS),
            "pod-template-hash": f"{rng.getrandbits(32):08x}",
            NS: ns,
            "projectcalico.org/orchestrator": "k8s",
            "projectcalico.org/serviceaccount": rng.choice(["default", "app", "ci"]),
            "pcns.projectcalico.org/name": ns,
            "pcns.team": ns_team[ns],
            "pcns.env": ns_env[ns],
        }
        if rng.random() < 0.05:
            labels["canary"] = "true"
        if rng.random() < 0.3:
            labels["sidecar"] = "istio"
        sets.append(labels)
    return sets


def make_selectors(count: int, rng: random.Random) -> list[str]:
    """A policy mix: mostly namespace-scoped peers, some global ones, a few unindexable."""
    def ns() -> str:
        return rng.choice(NAMESPACES)

    def app() -> str:
        return rng.choice(APPS)

    makers: list[tuple[float, Callable[[], str]]] = [
        (0.35, lambda: f"({NS} == '{ns()}' && app == '{app()}')"),
        (0.12, lambda: f"({NS} == '{ns()}' && tier in {{'web', 'api'}})"),
        (0.08, lambda: f"(({NS} == '{ns()}' && has(app)) && tier != 'db')"),
        (0.08, lambda: f"app == '{app()}' && env == 'prod'"),
        (0.07, lambda: f"team == '{rng.choice(TEAMS)}' && has(version) && tier == "
                       f"'{rng.choice(TIERS)}'"),
        (0.06, lambda: f"pcns.team == '{rng.choice(TEAMS)}' && tier not in {{'db', 'cache'}}"),
        (0.06, lambda: f"app in {{'{app()}', '{app()}', '{app()}'}} && env != 'dev'"),
        (0.05, lambda: f"({NS} == '{ns()}' && (app == '{app()}' || version starts with 'v1'))"),
        (0.04, lambda: f"(({NS} == '{ns()}' || {NS} == '{ns()}') && role == 'frontend')"),
        (0.03, lambda: f"has(canary) && team == '{rng.choice(TEAMS)}'"),
        (0.03, lambda: "has(canary)" if rng.random() < 0.5 else "has(legacy-network)"),
        (0.02, lambda: f"pcns.projectcalico.org/name in {{'{ns()}', '{ns()}'}} && "
                       f"projectcalico.org/serviceaccount == 'ci'"),
        # Unindexable: no label every match must carry.
        (0.01, lambda: rng.choice([
            "env != 'dev'", "!has(sidecar)", "tier not in {'db'}", "global()",
            f"app == '{app()}' || team == '{rng.choice(TEAMS)}'",
        ])),
    ]
    weights = [w for w, _ in makers]
    texts = []
    for _ in range(count):
        (_, maker), = rng.choices(makers, weights)
        texts.append(maker())
    return texts


def _timed(fn: Callable[[], object]) -> float:
    """CPU seconds of ``fn``: the machine is shared, and CPU time is what we want to compare
    (wall-clock time would also count the time other processes held the core)."""
    start = time.process_time()
    fn()
    return time.process_time() - start


def run(n_selectors: int, n_labels: int, n_brute: int, rounds: int, seed: int) -> dict[str, object]:
    rng = random.Random(seed)
    label_sets = make_label_sets(n_labels, rng)
    texts = make_selectors(n_selectors, rng)

    start = time.process_time()
    selectors: list[Selector] = [parse(text) for text in texts]
    parse_seconds = time.process_time() - start
    unique = len({s.canonical for s in selectors})

    index: SelectorIndex[int] = SelectorIndex()
    start = time.process_time()
    for i, selector in enumerate(selectors):
        index.add(i, selector)
    add_seconds = time.process_time() - start

    brute_sets = label_sets[:n_brute]
    matchers = [(i, s.matcher) for i, s in enumerate(selectors)]

    def brute(labels: dict[str, str]) -> set[int]:
        return {i for i, m in matchers if m(labels)}

    # Correctness first: the index must equal brute force on every label set we time.
    total_matches = 0
    for labels in brute_sets:
        expected = brute(labels)
        assert index.matching(labels) == expected, labels
        total_matches += len(expected)

    eval_rates, brute_rates, index_rates = [], [], []
    for _ in range(rounds):
        seconds = _timed(lambda: [m(labels) for labels in brute_sets for _, m in matchers])
        eval_rates.append(len(brute_sets) * len(matchers) / seconds)
        seconds = _timed(lambda: [brute(labels) for labels in brute_sets])
        brute_rates.append(len(brute_sets) / seconds)
        seconds = _timed(lambda: [index.matching(labels) for labels in label_sets])
        index_rates.append(len(label_sets) / seconds)

    candidates = _count_candidates(index, label_sets[:1000])
    stats = index.stats()
    index_rate = statistics.median(index_rates)
    brute_rate = statistics.median(brute_rates)
    return {
        "benchmark": "selector_bench",
        "python": sys.version.split()[0],
        "machine": platform.machine(),
        "seed": seed,
        "rounds": rounds,
        "selectors": n_selectors,
        "unique_selectors": unique,
        "label_sets": n_labels,
        "brute_force_label_sets": n_brute,
        "mean_matches_per_label_set": total_matches / max(1, len(brute_sets)),
        "parse_per_second": n_selectors / parse_seconds,
        "index_adds_per_second": n_selectors / add_seconds,
        "index_placement": {
            "by_value": stats.by_value, "by_presence": stats.by_presence,
            "by_branches": stats.by_branches, "unindexed": stats.unindexed,
            "never": stats.never,
        },
        "mean_candidates_per_lookup": candidates,
        "selector_evaluations_per_second": statistics.median(eval_rates),
        "brute_force_lookups_per_second": brute_rate,
        "index_lookups_per_second": index_rate,
        "index_speedup_vs_brute_force": index_rate / brute_rate,
        "all_rounds": {
            "selector_evaluations_per_second": eval_rates,
            "brute_force_lookups_per_second": brute_rates,
            "index_lookups_per_second": index_rates,
        },
        "goals": {
            "speedup_at_least_20x": index_rate / brute_rate >= 20,
            "lookups_per_second_at_least_20000": index_rate >= 20_000,
        },
    }


def _count_candidates(index: SelectorIndex[int], label_sets: list[dict[str, str]]) -> float:
    """How many selectors a lookup evaluates on average (the index's whole point)."""
    return sum(index.candidate_count(labels) for labels in label_sets) / max(1, len(label_sets))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small smoke run, not saved")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--seed", type=int, default=2)
    args = parser.parse_args(argv)
    if args.quick:
        result = run(200, 1000, 100, 1, args.seed)
    else:
        result = run(2000, 10_000, 500, args.rounds, args.seed)
    for key in (
        "selectors", "unique_selectors", "label_sets", "mean_matches_per_label_set",
        "parse_per_second", "index_adds_per_second", "index_placement",
        "mean_candidates_per_lookup", "selector_evaluations_per_second",
        "brute_force_lookups_per_second", "index_lookups_per_second",
        "index_speedup_vs_brute_force", "goals",
    ):
        value = result[key]
        shown = f"{value:,.1f}" if isinstance(value, float) else value
        print(f"{key:34} {shown}")
    if not args.quick:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(result, indent=2) + "\n")
        print(f"saved {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
