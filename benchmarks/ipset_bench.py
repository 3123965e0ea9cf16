"""Ipset member operations per second: batched netlink vs pyroute2 one-by-one vs ipset restore.

Run as root: ``.venv/bin/python -m benchmarks.ipset_bench [--members N] [--reps R]``.
All work happens in a network namespace of its own (``pc-ipsb-*``), removed at the end.
Every method fills a freshly created, identical set (hash:net, maxelem 1,048,576), so
they differ only in how members reach the kernel:

- ``batched``: :class:`enforcers.ipsets.NetlinkIpsets` (ADT nests, ~1,900 entries a message)
- ``pyroute2_one_by_one``: ``pyroute2.IPSet.add`` per member (one message + ack each)
- ``ipset_restore``: the ipset CLI reading ``add`` lines on stdin, process start included

Figures are medians over repetitions; results go to ``benchmarks/results/ipset_bench.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyroute2
from pyroute2 import IPSet

from enforcers import netns
from enforcers.ipsets import NetlinkIpsets, replace_contents
from enforcers.netlink_ipset import adt_chunks, parse_members

RESULTS = Path(__file__).parent / "results" / "ipset_bench.json"
GOAL_OPS = 100_000
GOAL_VS_ONE_BY_ONE = 20.0
GOAL_VS_RESTORE = 3.0


def v4_members(n: int, seed: int = 0) -> list[str]:
    """Mostly hosts, one in ten a /24 (like pod IPs plus network-set CIDRs)."""
    out = []
    for i in range(n):
        j = i + seed * n
        if i % 10 == 9:
            out.append(f"100.{(j >> 8) & 255}.{j & 255}.0/24" if j < 65536
                       else f"{101 + (j >> 16)}.{(j >> 8) & 255}.{j & 255}.0/24")
        else:
            out.append(f"10.{(j >> 16) & 255}.{(j >> 8) & 255}.{j & 255}")
    return out


def v6_members(n: int) -> list[str]:
    """Mostly hosts, one in ten a /48."""
    return [
        f"fd00::{i >> 16:x}:{i & 0xFFFF:x}" if i % 10
        else f"2001:{(i >> 16) + 1:x}:{i & 0xFFFF:x}::/48"
        for i in range(n)
    ]


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


class Bench:
    def __init__(self, ns: str) -> None:
        self.ns = ns
        self.backend = NetlinkIpsets(ns)

    def fresh(self, name: str, family: str = "inet") -> None:
        self.backend.destroy(name)
        self.backend.create(name, family)

    def count(self, name: str) -> int:
        return len(self.backend.listing(name)[name].members)

    def batched_add(self, members: list[str], family: str = "inet") -> float:
        self.fresh("bench", family)
        before = self.backend.messages_sent
        seconds = timed(lambda: self.backend.add("bench", members))
        self.last_messages = self.backend.messages_sent - before
        assert self.count("bench") == len(members)
        return seconds

    def batched_delete(self, members: list[str]) -> float:
        self.fresh("bench")
        self.backend.add("bench", members)
        seconds = timed(lambda: self.backend.delete("bench", members))
        assert self.count("bench") == 0
        return seconds

    def one_by_one_add(self, members: list[str]) -> float:
        self.fresh("bench")

        # pyroute2 0.9 opens one socket per thread, lazily, in that thread's namespace:
        # construct and use IPSet on a thread inside the netns; time the adds only.
        def in_netns() -> float:
            ipset = IPSet()
            try:
                def run() -> None:
                    for m in members:
                        ipset.add("bench", m, etype="net")
                return timed(run)
            finally:
                ipset.close()

        seconds = netns.run_in(self.ns, in_netns, timeout=600)
        assert self.count("bench") == len(members)
        return seconds

    def restore_add(self, members: list[str]) -> float:
        self.fresh("bench")
        script = "".join(f"add bench {m}\n" for m in members)
        cmd = ["ip", "netns", "exec", self.ns, "ipset", "restore"]

        def run() -> None:
            subprocess.run(cmd, input=script, text=True, check=True, timeout=300)
        seconds = timed(run)
        assert self.count("bench") == len(members)
        return seconds

    def restore_startup(self) -> float:
        """``ipset restore`` with no input: process start-up cost, for the record."""
        cmd = ["ip", "netns", "exec", self.ns, "ipset", "restore"]
        return timed(lambda: subprocess.run(cmd, input="", text=True, check=True, timeout=60))

    def encode_only(self, members: list[str]) -> float:
        """Parse, validate and pack every message without sending: our Python share."""
        def run() -> None:
            entries, _texts = parse_members(members, socket.AF_INET)
            for _chunk in adt_chunks(7, "bench", "hash:net", entries):
                pass
        return timed(run)

    def list_all(self, members: list[str]) -> float:
        self.fresh("bench")
        self.backend.add("bench", members)
        return timed(lambda: self.backend.list_sets())

    def replace(self, members: list[str], new: list[str]) -> float:
        self.fresh("bench")
        self.backend.add("bench", members)
        seconds = timed(lambda: replace_contents(self.backend, "bench", new))
        assert self.count("bench") == len(new)
        return seconds


def measure(label: str, reps: int, n: int, run: Callable[[], float]) -> dict[str, Any]:
    times = [run() for _ in range(reps)]
    median = statistics.median(times)
    rate = n / median if n else None
    row = {"method": label, "members": n, "reps": reps, "seconds": times,
           "median_seconds": median, "median_ops_per_s": rate}
    shown = f"{rate:>12,.0f} ops/s" if rate else ""
    print(f"  {label:<30} {n:>8,} members  median {median * 1000:9.1f} ms  {shown}",
          flush=True)
    return row


def tool_version(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.strip()
    except OSError as exc:
        return f"unavailable: {exc}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, default=100_000)
    parser.add_argument("--one-by-one-members", type=int, default=10_000)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--one-by-one-reps", type=int, default=3)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("ipset_bench needs root (it creates a network namespace)", file=sys.stderr)
        return 2

    n, n1 = args.members, args.one_by_one_members
    load_before = os.getloadavg()  # a shared machine: say how busy it was
    members = v4_members(n)
    ns = f"pc-ipsb-{secrets.token_hex(4)}"
    netns.create(ns)
    rows: dict[str, dict[str, Any]] = {}
    try:
        bench = Bench(ns)
        print(f"ipset member operations in netns {ns} (medians)")
        rows["batched"] = measure("batched netlink add", args.reps, n,
                                  lambda: bench.batched_add(members))
        messages = bench.last_messages
        rows["ipset_restore"] = measure("ipset restore add", args.reps, n,
                                        lambda: bench.restore_add(members))
        rows["ipset_restore_startup"] = measure("ipset restore, empty input", args.reps, 0,
                                                lambda: bench.restore_startup())
        rows["encode_only"] = measure("batched: encode only (no I/O)", args.reps, n,
                                      lambda: bench.encode_only(members))
        rows["pyroute2_one_by_one"] = measure(
            "pyroute2 IPSet.add 1-by-1", args.one_by_one_reps, n1,
            lambda: bench.one_by_one_add(members[:n1]))
        rows["batched_delete"] = measure("batched netlink delete", args.reps, n,
                                         lambda: bench.batched_delete(members))
        rows["batched_ipv6"] = measure("batched netlink add (IPv6)", args.reps, n,
                                       lambda: bench.batched_add(v6_members(n), "inet6"))
        rows["list_dump"] = measure("list_sets (dump + parse)", args.reps, n,
                                    lambda: bench.list_all(members))
        rows["replace_contents"] = measure(
            "replace_contents (tmp+swap)", args.reps, n,
            lambda: bench.replace(members, v4_members(n, seed=1)))
        bench.backend.close()
    finally:
        netns.remove(ns)

    ops = rows["batched"]["median_ops_per_s"]
    vs_one = ops / rows["pyroute2_one_by_one"]["median_ops_per_s"]
    restore_over_batched = rows["ipset_restore"]["median_ops_per_s"] / ops
    goals = {
        "ops_per_s": {"goal": GOAL_OPS, "value": ops, "met": ops >= GOAL_OPS},
        "speedup_vs_one_by_one": {"goal": GOAL_VS_ONE_BY_ONE, "value": vs_one,
                                  "met": vs_one >= GOAL_VS_ONE_BY_ONE},
        "restore_over_batched": {"goal_at_most": GOAL_VS_RESTORE,
                                 "value": restore_over_batched,
                                 "met": restore_over_batched <= GOAL_VS_RESTORE},
    }
    print(f"\nbatched: {ops:,.0f} ops/s in {messages} netlink messages per {n:,} members")
    print(f"  vs pyroute2 one-by-one: {vs_one:.1f}x faster (goal >= {GOAL_VS_ONE_BY_ONE:.0f}x)")
    print(f"  ipset restore / batched: {restore_over_batched:.2f} (goal <= {GOAL_VS_RESTORE})")
    encode_share = rows["encode_only"]["median_seconds"] / rows["batched"]["median_seconds"]
    print(f"  Python encoding share of the batched time: {encode_share:.0%}; the rest is "
          "the kernel and syscalls")
    print("  goals met: " + ", ".join(f"{k}={v['met']}" for k, v in goals.items()))

    result = {
        "benchmark": "ipset_bench",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "environment": {
            "kernel": platform.release(),
            "python": platform.python_version(),
            "pyroute2": pyroute2.__version__,
            "ipset": tool_version(["ipset", "--version"]),
            "cpus": os.cpu_count(),
            "load_average_before": load_before,
            "load_average_after": os.getloadavg(),
        },
        "batched_messages_per_add": messages,
        "python_encoding_share_of_batched": encode_share,
        "results": rows,
        "goals": goals,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"saved {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
