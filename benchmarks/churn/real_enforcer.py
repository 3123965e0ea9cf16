"""One real enforcer for the benchmark, in its own process, programming a network namespace.

The same `enforcers.engine.Enforcer` that `portcullis enforce --netns` runs (netlink
ipsets, `iptables-restore` in the namespace), plus one thing the metrics endpoint cannot
give: the exact latency samples (not histogram buckets), written every second to a JSON
file so that they survive a SIGKILL (all but the last second) for the report.

    python -m benchmarks.churn.real_enforcer --node N --netns NS --bootstrap B \
        --prefix P --samples FILE
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
from pathlib import Path

from enforcers import DEFAULT_FETCH_MIN_BYTES


async def _main(args: argparse.Namespace) -> None:
    from enforcers.engine import Enforcer, Programmer
    from enforcers.ipsets import NetlinkIpsets, set_name
    from enforcers.iptables import Iptables
    from enforcers.metrics import EnforcerMetrics
    from enforcers.state import EnforcerState

    metrics = EnforcerMetrics()
    metrics.latency.keep_samples = 1_000_000
    ipsets = NetlinkIpsets(netns=args.netns)
    enforcer = Enforcer(EnforcerState(args.node, set_name),
                        Programmer(ipsets, Iptables(args.netns)),
                        {"bootstrap_servers": args.bootstrap}, args.prefix, metrics,
                        resync_interval=3600.0, fetch_max_wait_ms=args.fetch_max_wait_ms,
                        fetch_min_bytes=args.fetch_min_bytes)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    out = Path(args.samples)

    def dump() -> None:
        data = {"samples": [v for v in metrics.latency.samples if v < 1e6],
                "batches": metrics.batches.value, "member_ops": metrics.member_ops.value,
                "errors": metrics.errors.value, "in_sync": metrics.in_sync.value}
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(data))
        os.replace(tmp, out)

    async def every_second() -> None:
        while not stop.is_set():
            await asyncio.sleep(1.0)
            dump()

    writer = asyncio.create_task(every_second())
    try:
        await enforcer.run(stop)
    finally:
        writer.cancel()
        dump()
        ipsets.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--node", required=True)
    parser.add_argument("--netns", required=True)
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--prefix", required=True)
    parser.add_argument("--samples", required=True)
    parser.add_argument("--fetch-max-wait-ms", type=int, default=50)
    parser.add_argument("--fetch-min-bytes", type=int, default=DEFAULT_FETCH_MIN_BYTES)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    profile = os.environ.get("PORTCULLIS_BENCH_PROFILE")  # where to write cProfile stats
    if not profile:
        asyncio.run(_main(args))
        return 0
    import cProfile

    prof = cProfile.Profile()
    try:
        prof.runcall(asyncio.run, _main(args))
    finally:
        prof.dump_stats(f"{profile}.{os.getpid()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
