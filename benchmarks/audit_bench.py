"""Replaying a week of history to a point in time: records/s, and `audit state --at` end to end.

A week-like history: ``--pods`` pods on ``--namespaces`` namespaces churning (created,
relabelled, deleted, recreated) plus policy and namespace-label changes by several actors,
``--records`` history records in all, timestamps spread over seven days. Measured in the
same run:

* ``decode floor``: only ``orjson.loads`` of every value (what any replay must pay);
* ``replay (pure)``: every value decoded and validated as a `HistoryRecord` and replayed to
  the middle of the week (`portcullis.audit.read.history_change` + `history.state_at`);
* ``broker``: the records on a real broker's history topics (``--broker kafka`` or
  ``tansu``), read back with `read_history` and replayed, as ``audit state --at`` does.

Goal (issue 13): at least 100,000 records/s. Prints and saves benchmarks/results/audit_bench.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import platform
import random
import statistics
import time
from pathlib import Path
from typing import Any

import orjson

from portcullis.audit.history import state_at
from portcullis.audit.read import Skipped, latest_until, read_history_until
from topics.partitioner import partition_for_key
from topics.records import EndpointRecord, HistoryRecord, PolicyRecord, ProfileRecord
from topics.specs import topic_name

RESULTS = Path(__file__).parent / "results" / "audit_bench.json"
WEEK = 7 * 86400.0
#: The week starts an hour inside a broker's 7-day retention, so it keeps all of it.
START = time.time() - WEEK + 3600
PARTITIONS = 6


def week(records: int, pods: int, namespaces: int, seed: int = 7) -> list[tuple[str, bytes, bytes]]:
    """(history topic suffix, key, encoded HistoryRecord) in publication order."""
    rnd = random.Random(seed)
    start = START
    out: list[tuple[str, bytes, bytes]] = []
    alive: dict[str, dict[str, Any]] = {}
    for i in range(records):
        at = start + WEEK * i / records
        roll = rnd.random()
        if roll < 0.01:  # a policy change
            n = rnd.randrange(200)
            ns = f"ns-{n % namespaces}"
            doc = {"apiVersion": "projectcalico.org/v3", "kind": "NetworkPolicy",
                   "metadata": {"name": f"p{n}", "namespace": ns},
                   "spec": {"order": i % 1000, "selector": f"app == 'a{n % 50}'",
                            "types": ["Egress"],
                            "egress": [{"action": "Allow", "protocol": "TCP",
                                        "destination": {"ports": [443 + i % 7]}}]}}
            rec: Any = PolicyRecord("NetworkPolicy", ns, f"p{n}", doc,
                                    rnd.choice(("alice", "bob", "ci")), at, at)
            out.append(_history("policies", rec, at, rec.actor))
            continue
        if roll < 0.012:  # namespace labels
            ns = f"ns-{rnd.randrange(namespaces)}"
            rec = ProfileRecord("namespace", ns, None, {"team": f"t{i % 9}"}, at)
            out.append(_history("profiles", rec, at, "kubernetes"))
            continue
        name = f"pod-{rnd.randrange(pods)}"
        ns = f"ns-{hash(name) % namespaces}"
        key = f"pod/{ns}/{name}"
        if key in alive and rnd.random() < 0.3:
            del alive[key]
            data = HistoryRecord("endpoints", key, "delete", "kubernetes", "kubernetes", at,
                                 None)
            out.append(("endpoints.history", key.encode(), orjson.dumps(data.to_dict())))
            continue
        labels = {"app": f"a{rnd.randrange(50)}", "version": f"v{rnd.randrange(5)}",
                  "pod-template-hash": f"{rnd.getrandbits(40):010x}"}
        n = rnd.randrange(1, 60000)
        rec = EndpointRecord("pod", ns, name, f"node-{n % 100}", f"cali{n:011x}",
                             (f"10.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}",), labels,
                             "default", "kubernetes", at, str(i))
        alive[key] = labels
        out.append(_history("endpoints", rec, at, "kubernetes"))
    return out


def _history(topic: str, rec: Any, at: float, actor: str) -> tuple[str, bytes, bytes]:
    data = HistoryRecord(topic, rec.key, "upsert", actor, "kubernetes", at, rec.to_dict())
    return f"{topic}.history", rec.key.encode(), orjson.dumps(data.to_dict())


def _timed(fn: Any, repeat: int) -> tuple[float, Any]:
    times, result = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), result


def bench_pure(history: list[tuple[str, bytes, bytes]], at: float, repeat: int) -> dict[str, Any]:
    floor_s, _ = _timed(lambda: [orjson.loads(v) for _t, _k, v in history], repeat)

    def replay() -> Any:
        messages = [(t, 0, i, k, v) for i, (t, k, v) in enumerate(history)]
        return state_at(latest_until(messages, at, Skipped()))

    replay_s, state = _timed(replay, repeat)
    n = len(history)
    return {"records": n, "decode_floor_s": floor_s, "decode_floor_per_s": n / floor_s,
            "replay_s": replay_s, "replay_per_s": n / replay_s,
            "ratio_to_floor": replay_s / floor_s, "endpoints_at": len(state.endpoints),
            "policies_at": len(state.policies)}


async def _produce(bootstrap: str, prefix: str, history: list[tuple[str, bytes, bytes]],
                   idempotent: bool) -> float:
    from aiokafka import AIOKafkaProducer

    from portcullis.topics_admin import check_topics

    report = await check_topics({"bootstrap_servers": bootstrap}, prefix, PARTITIONS,
                                create=True)
    assert not report.failures(), report.lines()
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=20,
                                max_batch_size=1 << 20, enable_idempotence=idempotent)
    await producer.start()
    t0 = time.perf_counter()
    futures = []
    try:
        for suffix, key, value in history:
            record = HistoryRecord.from_dict(orjson.loads(value))
            futures.append(await producer.send(
                topic_name(prefix, suffix), value, key=key,
                partition=partition_for_key(record.partition_key, PARTITIONS),
                timestamp_ms=math.ceil(record.at * 1000)))
        results = await asyncio.gather(*futures, return_exceptions=True)
    finally:
        await producer.stop()
    failed = [r for r in results if isinstance(r, BaseException)]
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(history)} records not produced: {failed[0]!r}")
    return time.perf_counter() - t0


async def _read(bootstrap: str, prefix: str, at: float) -> tuple[float, float, Any]:
    t0 = time.perf_counter()
    report = Skipped()
    changes = await read_history_until({"bootstrap_servers": bootstrap}, prefix, at,
                                       skipped=report)
    read_s = time.perf_counter() - t0
    state = state_at(changes)
    return read_s, time.perf_counter() - t0, (report.messages, state)


def bench_broker(kind: str, history: list[tuple[str, bytes, bytes]], at: float) -> dict[str, Any]:
    from portcullis.brokers import BROKERS

    broker = BROKERS[kind]()
    broker.start()
    try:
        prefix = f"bench{random.getrandbits(24):06x}."
        # Tansu has no idempotent producer
        produce_s = asyncio.run(_produce(broker.bootstrap, prefix, history, kind == "kafka"))
        runs = [asyncio.run(_read(broker.bootstrap, prefix, at)) for _ in range(3)]
    finally:
        broker.stop()
    read_s = statistics.median(r[0] for r in runs)
    total_s = statistics.median(r[1] for r in runs)
    count = runs[0][2][0]
    return {"broker": kind, "produce_s": produce_s, "records_read": count,
            "read_s": read_s, "read_per_s": count / read_s,
            "state_at_s": total_s, "state_at_per_s": count / total_s,
            "endpoints_at": len(runs[0][2][1].endpoints)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--pods", type=int, default=20_000)
    parser.add_argument("--namespaces", type=int, default=50)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--broker", choices=["kafka", "tansu", "none"], default="kafka")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    t0 = time.perf_counter()
    history = week(args.records, args.pods, args.namespaces)
    at = START + WEEK / 2
    print(f"built {len(history):,} history records in {time.perf_counter() - t0:.1f} s "
          f"({sum(len(v) for _t, _k, v in history) / len(history):.0f} bytes each)", flush=True)
    results: dict[str, Any] = {
        "machine": {"python": platform.python_version(), "platform": platform.platform()},
        "workload": {"records": args.records, "pods": args.pods,
                     "namespaces": args.namespaces, "at": "middle of the week"},
        "goal_records_per_s": 100_000,
        "pure": bench_pure(history, at, args.repeat),
    }
    p = results["pure"]
    print(f"decode floor   {p['decode_floor_per_s']:>12,.0f} records/s", flush=True)
    print(f"replay (pure)  {p['replay_per_s']:>12,.0f} records/s  "
          f"({p['ratio_to_floor']:.1f}x the floor; {p['endpoints_at']:,} endpoints at T)",
          flush=True)
    if args.broker != "none":
        results["broker"] = b = bench_broker(args.broker, history, at)
        print(f"{args.broker}: produced in {b['produce_s']:.1f} s; read {b['records_read']:,} "
              f"at {b['read_per_s']:,.0f} records/s; audit state --at in "
              f"{b['state_at_s']:.1f} s ({b['state_at_per_s']:,.0f} records/s)", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
