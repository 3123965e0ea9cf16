"""`portcullis demo`: Show the whole pipeline on a small simulated cluster."""

from __future__ import annotations

import argparse
import logging

from portcullis.cli import CommandError, command
from portcullis.settings import Settings


@command("demo", "Show the whole pipeline on a small simulated cluster.")
class Command:
    @staticmethod
    def configure(parser: argparse.ArgumentParser) -> None:
        parser.description = (
            "Start the embedded broker, create the topics, run the stream processor and an "
            "enforcer, build a small cluster in network namespaces (a node, pods in two "
            "namespaces, an outside network with servers), apply the example policies and show "
            "which connections are allowed or denied and why, checked with real TCP; then "
            "change a pod label and show the table change with the measured propagation time. "
            "Everything it creates is removed on exit, also on Ctrl-C. Without root it runs "
            "in dry-run mode (rules computed, not installed). The host's firewall is never "
            "touched: all rules live in the demo's own namespaces."
        )
        parser.add_argument(
            "--dry-run", action="store_true",
            help="do not create namespaces or rules: compute the enforcer's rules and run the "
            "connections through them in Python (the default without root)",
        )
        parser.add_argument(
            "--once", action="store_true",
            help="non-interactive: no pauses; exit after the label change (for tests and CI)",
        )
        parser.add_argument(
            "--watch", action="store_true",
            help="keep running after the label change, flipping it back and forth until Ctrl-C",
        )
        parser.add_argument(
            "--keep-logs", action="store_true",
            help="keep the work directory with the broker, processor and enforcer logs",
        )
        parser.add_argument(
            "--color", choices=["auto", "always", "never"], default="auto",
            help="colour the table (default: only when stdout is a terminal)",
        )

    @staticmethod
    def run(args: argparse.Namespace, settings: Settings) -> int:
        from portcullis.demo import DemoError
        from portcullis.demo.runner import Options
        from portcullis.demo.runner import run as run_demo

        if args.once and args.watch:
            raise CommandError("--once and --watch contradict each other; pick one")
        options = Options(
            dry_run=args.dry_run,
            once=args.once,
            watch=args.watch,
            keep_logs=args.keep_logs,
            # flags that were given explicitly; the embedded broker needs none of them
            partitions=args.partitions or 2,
            bootstrap=args.bootstrap,
            topic_prefix=args.topic_prefix,
            colour={"auto": None, "always": True, "never": False}[args.color],
        )
        if settings.log_level != "DEBUG":
            # the demo's own output says what happens; client chatter would drown the table
            for name in ("aiokafka", "kafka", "faust", "mode"):
                logging.getLogger(name).setLevel(logging.WARNING)
        try:
            return run_demo(options, settings.kafka.aiokafka_kwargs())
        except DemoError as exc:
            raise CommandError(str(exc)) from None
