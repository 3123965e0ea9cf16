"""`portcullis flows`' pure part: time arguments, filters against a direct oracle, output."""

from __future__ import annotations

import ipaddress
import json

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from portcullis.flowview import FlowFilter, FlowQueryError, parse_time, render, select, table
from topics.records import FlowRecord


def _record(**changes: object) -> FlowRecord:
    fields: dict[str, object] = dict(
        node="n1", direction="egress", source_ip="10.65.1.2", source_endpoint="pod/shop/a",
        dest_ip="10.66.3.1", dest_port=80, protocol="TCP", dest_endpoint=None, action="deny",
        tier="default", policy="NetworkPolicy/shop/web", rule="egress[0]", reason="rule",
        packets=3, attempts=3, start=1000.0, end=1010.0, observed_at=1011.0)
    fields.update(changes)
    return FlowRecord(**fields)  # type: ignore[arg-type]


def test_times_are_iso_or_durations_before_now() -> None:
    assert parse_time("10m", 10_000.0) == 9_400.0
    assert parse_time("1.5h", 10_000.0) == 10_000.0 - 5400
    assert parse_time("1970-01-01T01:00:00Z", 0) == 3600.0
    assert parse_time("1970-01-01T01:00:00", 0) == 3600.0  # no zone: UTC
    assert parse_time("1970-01-01T02:00:00+01:00", 0) == 3600.0
    with pytest.raises(FlowQueryError, match="--until 'yesterday': expected an ISO time"):
        parse_time("yesterday", 0, "--until")


peers = st.sampled_from(["pod/shop/a", "shop/a", "a", "10.65.1.2", "10.65.0.0/16", "b",
                         "10.66.3.1", "fd00::/8"])
records = st.builds(
    _record, source_ip=st.sampled_from(["10.65.1.2", "10.65.9.9", "fd00::1"]),
    source_endpoint=st.sampled_from([None, "pod/shop/a", "pod/shop/b"]),
    dest_ip=st.sampled_from(["10.66.3.1", "10.65.1.2"]),
    dest_endpoint=st.sampled_from([None, "pod/shop/a"]),
    action=st.sampled_from(["allow", "deny"]), node=st.sampled_from(["n1", "n2"]),
    start=st.floats(0, 100), end=st.floats(100, 200))


def _peer(wanted: str, ip: str, endpoint: str | None) -> bool:
    names = set() if endpoint is None else {endpoint, endpoint.partition("/")[2],
                                            endpoint.split("/")[-1]}
    if wanted in names:
        return True
    try:
        return ipaddress.ip_address(ip) in ipaddress.ip_network(wanted)
    except ValueError:
        return False


@given(st.lists(records, max_size=12), st.none() | st.floats(0, 250),
       st.none() | st.floats(0, 250), st.none() | st.sampled_from(["allow", "deny"]),
       st.none() | st.sampled_from(["n1", "n2"]), st.none() | peers, st.none() | peers)
def test_filters_keep_exactly_what_each_says(
    recs: list[FlowRecord], since: float | None, until: float | None, action: str | None,
    node: str | None, source: str | None, dest: str | None,
) -> None:
    got = select(recs, FlowFilter(since, until, action, node, source, dest))
    want = [r for r in recs
            if (since is None or r.end >= since) and (until is None or r.start <= until)
            and action in (None, r.action) and node in (None, r.node)
            and (source is None or _peer(source, r.source_ip, r.source_endpoint))
            and (dest is None or _peer(dest, r.dest_ip, r.dest_endpoint))]
    assert sorted(got, key=id) == sorted(want, key=id)
    assert [r.start for r in got] == sorted(r.start for r in got)


def test_output_formats() -> None:
    recs = [_record(), _record(dest_ip="fd00::5", dest_port=None, protocol="ICMPv6",
                               policy=None, rule=None, reason="end of tier", end=1020.0)]
    lines = table(recs).splitlines()
    assert lines[0].split() == ["LAST", "SEEN", "NODE", "ACTION", "SOURCE", "DESTINATION",
                                "PROTO", "ATTEMPTS", "PACKETS", "DECIDED", "BY"]
    assert lines[1].split()[:4] == ["1970-01-01T00:16:50Z", "n1", "DENY", "pod/shop/a"]
    assert lines[1].endswith("default · NetworkPolicy/shop/web · egress[0]")
    assert "[fd00::5]" in lines[2] and lines[2].endswith("default · end of tier")
    assert json.loads(render(recs, "json"))[0]["dest_port"] == 80
    assert yaml.safe_load(render(recs, "yaml"))[1]["protocol"] == "ICMPv6"
    assert render([], "table") == "" and json.loads(render([], "json")) == []
    with pytest.raises(FlowQueryError):
        render(recs, "xml")
