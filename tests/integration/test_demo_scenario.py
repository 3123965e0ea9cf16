"""The demo's pure parts, without a broker: the scenario's verdicts and the table's layout.

(Kept beside the end-to-end demo tests; none of these needs a broker or root.)
"""

from __future__ import annotations

import re
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from portcullis.demo import DemoError, scenario
from portcullis.demo.pipeline import PIECES, require, require_present
from portcullis.demo.runner import initial_publications, interface_of
from portcullis.demo.table import Row, Style, render, summary, width
from watchers import apply, translate


def world() -> tuple[scenario.Cluster, scenario.World, list[scenario.Case]]:
    cluster = scenario.default_cluster()
    objects = scenario.load_examples()
    w = scenario.World()
    w.add_objects(objects)
    pubs, outcomes = initial_publications(cluster, objects, translate, apply, time.time())
    assert {o.verb for o in outcomes} == {"created"}
    w.take(pubs)
    return cluster, w, scenario.cases(cluster, scenario.host_endpoint(objects))


def test_every_kind_of_source_has_allowed_and_denied_or_no_policy() -> None:
    _cluster, w, cases = world()
    verdicts = {(c.source.display, c.server.display): w.verdict(c.source.key, c.server)
                for c in cases}
    for source in ("prod/billing", "prod/reports", "node1 (host)"):
        actions = {v.allowed for (s, _d), v in verdicts.items() if s == source}
        assert actions == {True, False}, source
    staging = [v for (s, _d), v in verdicts.items() if s == "staging/web"]
    assert all(v.allowed and v.policy is None for v in staging)
    # the node never connects to the pod-hosted DNS server: its host endpoint is the uplink
    assert not any(s == "node1 (host)" and "kube-dns" in d for s, d in verdicts)
    # by name: billing through the network set's allowedEgressDomains, reports denied
    by_name = {s: v.allowed for (s, d), v in verdicts.items()
               if d.endswith("api.payments.example.com:443")}
    assert by_name == {"prod/billing": True, "prod/reports": False, "staging/web": True}


def test_the_label_change_flips_exactly_the_saas_connection_of_that_pod() -> None:
    cluster, w, cases = world()
    before = {c: w.verdict(c.source.key, c.server).allowed for c in cases}
    key, labels = cluster.relabel
    pod = cluster.pod(key)
    w.take([translate.pod_endpoint(scenario.pod_object(pod, labels, 2), time.time())])
    flipped = [c for c in cases if w.verdict(c.source.key, c.server).allowed != before[c]]
    assert [(c.source.key, c.server.ip, c.server.port) for c in flipped] == [
        ("pod/prod/reports", "203.0.113.10", 443),
        ("pod/prod/reports", "192.0.2.80", 443),  # by name, through the set's domains
    ]


def test_pods_get_the_interfaces_the_watcher_reports_and_distinct_links() -> None:
    cluster, w, _cases = world()
    names = [interface_of(w, p.key) for p in cluster.pods]
    assert len(set(names)) == len(names)
    assert all(len(n) <= 15 for n in names)  # Linux interface name limit
    assert len({p.ip for p in cluster.pods}) == len(cluster.pods)


def test_why_names_tier_policy_and_rule() -> None:
    _cluster, w, cases = world()
    texts = {(c.source.display, c.server.port): w.why(c.source.key, c.server) for c in cases}
    assert texts[("prod/billing", 443)] == (
        "tier default · NetworkPolicy prod/billing-to-saas · egress rule 0 (Allow)"
    )
    assert texts[("prod/billing", 5432)] == (
        "tier default: no rule of billing-to-saas, default-deny matched; the tier ends in Deny"
    )
    assert texts[("prod/reports", 443)] == (
        "tier default: no rule of default-deny matched; the tier ends in Deny"
    )
    assert texts[("node1 (host)", 5432)].startswith("tier platform · GlobalNetworkPolicy")
    assert texts[("node1 (host)", 6443)].startswith("failsafe")


rows = st.lists(
    st.builds(
        Row,
        source=st.sampled_from(["prod/billing", "staging/web", "node1 (host)", "a"]),
        destination=st.text("abcdefgh-.:0123456789 ", min_size=1, max_size=30).map(str.strip)
        .filter(bool),
        expected=st.booleans(),
        observed=st.none() | st.booleans(),
        why=st.text("abc ·()", max_size=20),
        changed=st.booleans(),
    ),
    min_size=1, max_size=8,
)


@settings(max_examples=60, deadline=None)
@given(rows)
def test_table_columns_line_up_and_flag_disagreements(table: list[Row]) -> None:
    lines = render(table, Style(False))
    assert len(lines) == len(table) + 1
    header = lines[0]
    policy_col = width(header[: header.index("POLICY")])
    why_col = width(header[: header.index("WHY")])
    for row, line in zip(table, lines[1:], strict=True):
        assert line.startswith("→ " if row.changed else "  ")
        mark = line[policy_col]
        assert mark == ("✔" if row.expected else "✘")
        assert line[why_col:].startswith(row.why)
        assert ("DISAGREES" in line) == row.disagrees
    assert "\033[" not in "".join(lines)
    assert re.search(r"\d+ connections: \d+ allowed", summary(table))


def test_colours_only_when_enabled() -> None:
    row = Row("prod/billing", "x 1.2.3.4:443", True, False, "because")
    coloured = render([row], Style(True))
    assert "\033[32" in coloured[1] and "\033[31" in coloured[1]
    assert "DISAGREES" in coloured[1]
    assert "\033[" not in "".join(render([row], Style(False)))


def test_a_missing_stage_is_a_clear_error_naming_the_piece() -> None:
    PIECES["nowhere.processor"] = ("the thing that processes", "issue 99")
    try:
        with pytest.raises(DemoError, match=r"the pipeline needs the thing that processes "
                           r"\(nowhere\.processor, issue 99\), which is not there yet"):
            require("nowhere.processor", "the pipeline")
        with pytest.raises(DemoError, match="issue 99"):
            require_present("nowhere.processor", "the pipeline")
    finally:
        del PIECES["nowhere.processor"]
    assert require("topics.codec", "reading").__name__ == "topics.codec"
    require_present("streams.app", "the membership stage")  # present: no error, not imported
