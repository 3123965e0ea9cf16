"""`portcullis bench`: Run a churn benchmark scenario."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from enforcers import DEFAULT_FETCH_MIN_BYTES
from portcullis.cli import CommandError, command
from portcullis.settings import Settings


@command("bench", "Run a churn benchmark scenario.")
class Command:
    @staticmethod
    def configure(parser: argparse.ArgumentParser) -> None:
        from benchmarks.churn.scenarios import SCENARIOS

        parser.add_argument("scenario", choices=sorted(SCENARIOS),
                            help="steady (churn 600 then 6,000 pods/min), storm (a global "
                            "policy and a network set grown by 5,000 CIDRs), restart "
                            "(processor and enforcer killed mid-churn), surge (6,000 -> "
                            "60,000 pods/min, every node simulated, CPU per event of each "
                            "stage), surge1000 (the same churn in a 1,000-node cluster)")
        parser.add_argument("--small", action="store_true",
                            help="2,000 pods, 10 nodes, short phases (about two minutes)")
        parser.add_argument("--kafka", action="store_true",
                            help="run on Apache Kafka (KRaft) instead of the embedded Tansu")
        parser.add_argument("--external", action="store_true",
                            help="use the brokers given with --bootstrap instead of starting one")
        parser.add_argument("--seed", type=int, help="the cluster and churn seed (printed)")
        parser.add_argument("--sim-nodes", type=int, metavar="N",
                            help="simulate the enforcers of the first N nodes only")
        parser.add_argument("--no-baseline", action="store_true",
                            help="skip the naive baseline")
        parser.add_argument("--no-real-enforcer", action="store_true",
                            help="do not run a real enforcer in a network namespace (root)")
        parser.add_argument("--out", type=Path, metavar="DIR",
                            help="where to write the JSON, PNG and Markdown "
                            "(default benchmarks/results)")
        parser.add_argument("--real-fetch-min-bytes", type=int,
                            default=DEFAULT_FETCH_MIN_BYTES, metavar="BYTES",
                            help="the real enforcer's --fetch-min-bytes (default "
                            f"{DEFAULT_FETCH_MIN_BYTES}, as `portcullis enforce`)")
        parser.add_argument("--quiet", action="store_true", help="no progress on stderr")

    @staticmethod
    def run(args: argparse.Namespace, settings: Settings) -> int:
        from benchmarks.churn.run import RESULTS, BenchError, Options, run
        from benchmarks.churn.scenarios import scenario

        if args.kafka and args.external:
            raise CommandError("--kafka and --external exclude each other")
        if args.sim_nodes is not None and args.sim_nodes < 1:
            raise CommandError("--sim-nodes must be at least 1")
        opts = Options(
            broker="kafka" if args.kafka else "external" if args.external else "tansu",
            bootstrap=settings.kafka.bootstrap if args.external else None,
            seed=args.seed,
            out=args.out or RESULTS,
            real_enforcer=False if args.no_real_enforcer else None,
            baseline=not args.no_baseline,
            sim_nodes=args.sim_nodes,
            progress=not args.quiet,
            partitions=args.partitions,
            real_fetch_min_bytes=args.real_fetch_min_bytes,
        )
        try:
            result = run(scenario(args.scenario, args.small), opts, small=args.small)
        except BenchError as exc:
            raise CommandError(str(exc)) from None
        print(result["markdown"])
        for path in result.get("files", []):
            print(f"wrote {path}", file=sys.stderr)
        if not result["consistency"]["ok"]:
            print("consistency check FAILED: the programmed state differs from the oracle",
                  file=sys.stderr)
            return 1
        return 0
