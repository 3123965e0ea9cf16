"""The streams benchmark's round summary: per-round CPU ratios against the index worker."""

from __future__ import annotations

import statistics
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from benchmarks.streams_bench import cpu_ratios

costs = st.floats(min_value=1e-6, max_value=1e-2, allow_nan=False)


def _round(index: float, two: float, paced: tuple[float, float] | None) -> dict[str, Any]:
    one_worker: dict[str, Any] = {"worker_cpu_s_per_event": index}
    two_workers: dict[str, Any] = {"worker_cpu_s_per_event": two}
    if paced is not None:
        one_worker["paced"] = {"worker_cpu_s_per_event": paced[0]}
        two_workers["paced"] = {"worker_cpu_s_per_event": paced[1]}
    return {"index": one_worker, "two_workers": two_workers}


@given(st.lists(st.tuples(costs, costs), min_size=1, max_size=7))
def test_the_ratio_is_per_round_and_its_median_sets_the_capacity(
        pairs: list[tuple[float, float]]) -> None:
    ratios = cpu_ratios([_round(a, b, None) for a, b in pairs])
    expected = [b / a for a, b in pairs]
    entry = ratios["two_workers"]
    assert entry["per_round"] == [round(x, 3) for x in expected]
    assert entry["median"] == statistics.median(expected)
    assert entry["capacity_vs_one_worker"] == 2 / statistics.median(expected)
    assert "paced_two_workers" not in ratios  # no round measured a paced phase


def test_paced_figures_get_their_own_ratio_and_failed_rounds_are_left_out() -> None:
    rounds = [_round(1.0, 1.2, (2.0, 2.6)), _round(1.0, 1.1, (2.0, 2.2)),
              {"index": {"error": "timed out"}, "two_workers": {"worker_cpu_s_per_event": 9.0}}]
    ratios = cpu_ratios(rounds)
    assert ratios["two_workers"]["per_round"] == [1.2, 1.1]
    assert ratios["paced_two_workers"]["per_round"] == [1.3, 1.1]
    assert ratios["paced_two_workers"]["median"] == statistics.median([1.3, 1.1])
    assert "index" not in ratios
