"""`portcullis bench` end to end on the embedded broker: a tiny scenario, checked, not timed.

Publishes a few hundred pods and their policies, runs the Faust processor as a subprocess
and three simulated dry-run enforcers, churns for a few seconds, grows a network set and
adds a global policy (the storm path), then asserts that every node programmed exactly
what the oracle computes from the inputs. Speed is the benchmark's business, not this
test's.
"""

from __future__ import annotations

from typing import Any

import pytest

from benchmarks.churn.cluster import ClusterSpec
from benchmarks.churn.run import Options, run
from benchmarks.churn.scenarios import Phase, Scenario

pytestmark = [pytest.mark.broker, pytest.mark.timeout(180)]


def test_tiny_scenario_is_consistent_end_to_end(tansu_broker: Any, tmp_path: Any) -> None:
    scn = Scenario(
        "tiny",
        ClusterSpec(pods=300, nodes=3, policies=20, network_sets=4, cidrs_per_set=4,
                    pods_per_namespace=100, apps_per_namespace=3, seed=7),
        (Phase("churn 1200/min", 1200, 5),),
        goal="behaviour only",
        storm=True,
        growth_cidrs=300,
        partitions=4,
    )
    opts = Options(broker="external", bootstrap=tansu_broker.bootstrap, baseline=False,
                   real_enforcer=False, write=False, progress=False, out=tmp_path)
    result = run(scn, opts, small=True)
    consistency = result["consistency"]
    assert consistency["ok"], consistency["report"]
    assert consistency["nodes"] == 3 and consistency["sets"] > 0
    phase = result["phases"][0]
    assert phase["events"] == 100
    assert phase["latency_s"]["n"] > 50  # most events changed some node's dataplane
    # the storm reached every simulated node: the new policy applies to pods everywhere
    policy_storm, set_growth = result["storm"]
    assert policy_storm["nodes_programmed"] == 3
    assert set_growth["nodes_programmed"] >= 1
    assert "| churn 1200/min | 100 |" in result["markdown"]
