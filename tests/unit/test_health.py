"""The shared health verdicts, metric exposition, the processor's catch-up arithmetic and the
HTTP server that serves them (real HTTP on localhost)."""

from __future__ import annotations

import re
import urllib.error
import urllib.request

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from portcullis import observe
from streams.metrics import LoopWatch, behind
from topics.health import Beat, Condition, Health, liveness, readiness
from topics.metrics import Counter, Family, exposition

names = st.text("abcdefgh", min_size=1, max_size=4)


@given(st.dictionaries(names, st.tuples(st.floats(0, 100), st.floats(0.1, 50)), max_size=5),
       st.floats(0, 200))
def test_healthy_exactly_when_every_loop_beat_within_its_max_age(
    beats: dict[str, tuple[float, float]], now: float
) -> None:
    verdict = liveness("c", {n: Beat(last, age) for n, (last, age) in beats.items()}, now)
    silent = {n for n, (last, age) in beats.items() if max(0.0, now - last) > age}
    assert verdict.ok == (bool(beats) and not silent)
    assert verdict.status == (200 if verdict.ok else 503)
    for name in silent:
        assert f"{name} loop silent" in verdict.body["why"]
    assert {n for n, loop in verdict.body["loops"].items() if not loop["ok"]} == silent


@given(st.dictionaries(names, st.tuples(st.booleans(), st.text(max_size=10)), max_size=5))
def test_ready_exactly_when_every_condition_holds(conds: dict[str, tuple[bool, str]]) -> None:
    verdict = readiness("c", {n: Condition(ok, d) for n, (ok, d) in conds.items()})
    failing = {n for n, (ok, _d) in conds.items() if not ok}
    assert verdict.ok == (bool(conds) and not failing)
    for name in failing:
        assert f"{name}: " in verdict.body["why"]
    assert ("why" in verdict.body) == (not verdict.ok)


def test_a_stalled_loop_stops_beating_and_goes_unhealthy() -> None:
    now = [0.0]
    health = Health("c", clock=lambda: now[0])
    health.loop("main", 5)
    now[0] = 4
    health.beat("main")
    now[0] = 8
    assert health.healthz().ok  # beat at 4, 4 s ago
    health.stall("main")
    health.beat("main")  # ignored
    now[0] = 9.5
    assert not health.healthz().ok
    health.note("brokers", "unreachable")
    assert health.healthz().body["notes"] == {"brokers": "unreachable"}
    with pytest.raises(KeyError, match="never registered"):
        health.beat("other")


@given(st.dictionaries(st.tuples(st.text("ab\"\\\n", max_size=3), st.integers(0, 3)),
                       st.floats(0, 1e6, allow_nan=False), max_size=6))
def test_labelled_series_read_back_from_the_exposition(
    values: dict[tuple[str, int], float],
) -> None:
    family = Family("x_total", "help", ("topic", "partition"))
    for (topic, partition), value in values.items():
        family.set(value, topic=topic, partition=partition)
    text = exposition([family, Counter("y_total", "other")])
    samples = re.findall(r'^x_total\{topic="((?:[^"\\]|\\.)*)",partition="(\d+)"\} (\S+)$',
                         text, re.M)
    unescape = {"\\\\": "\\", '\\"': '"', "\\n": "\n"}
    got = {(re.sub(r'\\[\\"n]', lambda m: unescape[m.group(0)], t), int(p)): float(v)
           for t, p, v in samples}
    assert got == pytest.approx(values)
    assert "# TYPE x_total counter" in text and "y_total 0" in text


def test_a_family_refuses_other_labels() -> None:
    family = Family("x", "h", ("topic",))
    with pytest.raises(ValueError, match="labels"):
        family.inc(partition=1)


offsets = st.dictionaries(st.tuples(st.sampled_from("ab"), st.integers(0, 2)),
                          st.integers(0, 50), max_size=6)


@given(offsets, offsets, offsets)
def test_behind_counts_what_is_left_before_the_targets(
    targets: dict[tuple[str, int], int], starts: dict[tuple[str, int], int],
    processed: dict[tuple[str, int], int],
) -> None:
    left = behind(targets, starts, processed)
    assert set(left) == set(targets)
    for tp, target in targets.items():
        at = max(starts.get(tp, 0), processed.get(tp, 0))
        assert left[tp] == (target - at if at < target else 0)


@given(st.lists(st.floats(min_value=0.0, max_value=5.0, allow_nan=False), min_size=1,
                max_size=30))
def test_the_loop_watch_reports_how_late_each_tick_ran(gaps: list[float]) -> None:
    watch = LoopWatch(interval=0.25, stall_after=0.5)
    assert watch.tick(100.0) == (0.0, False)  # the first tick has nothing to be late for
    previous = 100.0
    for gap in gaps:
        now = previous + gap
        late, stalled = watch.tick(now)
        assert late == max(0.0, now - previous - 0.25)
        assert stalled == (late >= 0.5)
        previous = now


def test_the_loop_watch_refuses_intervals_that_measure_nothing() -> None:
    with pytest.raises(ValueError, match="must be positive"):
        LoopWatch(interval=0.0, stall_after=0.5)
    with pytest.raises(ValueError, match="must be positive"):
        LoopWatch(interval=0.25, stall_after=-1.0)


def _get(port: int, path: str, method: str = "GET") -> tuple[int, bytes]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method)
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_the_server_answers_probes_and_metrics_and_hides_the_hook_by_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(observe.TEST_HOOKS_ENV, raising=False)
    health = Health("c")
    health.loop("main", 30)
    health.set("synced", False, "reading")
    routes = {"/metrics": observe.metrics_route(lambda: "m 1\n"), **observe.health_routes(health)}
    server = observe.Server(0, routes, health, host="127.0.0.1")
    try:
        assert _get(server.port, "/metrics") == (200, b"m 1\n")
        status, body = _get(server.port, "/readyz")
        assert status == 503 and orjson.loads(body)["why"] == "synced: reading"
        health.set("synced", True, "done")
        assert _get(server.port, "/readyz")[0] == 200
        assert _get(server.port, "/healthz")[0] == 200
        assert _get(server.port, "/nothing")[0] == 404
        assert _get(server.port, "/debug/stall?loop=main", "POST")[0] == 404
        assert not health.beats["main"].stalled
    finally:
        server.close()
