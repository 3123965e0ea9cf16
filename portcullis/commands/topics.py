"""`portcullis topics`: create, check or list every Portcullis topic."""

from __future__ import annotations

import argparse
import logging

from portcullis.cli import CommandError, command, run_async
from portcullis.settings import Settings

ACTIONS = {
    "create": "create missing topics, then check every topic (idempotent)",
    "check": "check every topic without creating any; missing topics are an error",
    "list": "print the topic contract (names, partitions, cleanup, keys); no broker needed",
}


@command("topics", "Create, check or list every Portcullis topic; report drift from the contract.")
class Command:
    @staticmethod
    def configure(parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "action",
            nargs="?",
            default="create",
            choices=list(ACTIONS),
            help="; ".join(f"{name}: {text}" for name, text in ACTIONS.items())
            + " (default: create)",
        )
        parser.add_argument(
            "--timeout",
            type=float,
            default=30.0,
            metavar="SECONDS",
            help="how long to wait for the brokers (default 30)",
        )

    @staticmethod
    def run(args: argparse.Namespace, settings: Settings) -> int:
        if args.action == "list":
            return _list(settings)
        from portcullis.topics_admin import check_topics

        if args.timeout <= 0:
            raise CommandError(f"--timeout must be positive, got {args.timeout:g}")
        aiokafka_log = logging.getLogger("aiokafka")
        level = aiokafka_log.level
        if settings.log_level != "DEBUG":
            # aiokafka logs each failed connection attempt; the one-line error below says it all.
            aiokafka_log.setLevel(logging.CRITICAL)
        try:
            report = run_async(
                check_topics(
                    settings.kafka.aiokafka_kwargs(),
                    settings.topic_prefix,
                    settings.partitions,
                    settings.replication_factor,
                    create=args.action == "create",
                    timeout=args.timeout,
                )
            )
        finally:
            aiokafka_log.setLevel(level)
        for line in report.lines():
            print(line, flush=True)
        failures = report.failures()
        if failures:
            kinds = sorted({t.state for t in failures})
            raise CommandError(
                f"{len(failures)} of {len(report.topics)} topics do not match the contract "
                f"({', '.join(kinds)}); see above"
            )
        return 0


def _list(settings: Settings) -> int:
    from topics.specs import all_specs

    rows = all_specs(settings.topic_prefix, settings.partitions)
    width = max(len(name) for name, _spec, _count in rows)
    for name, spec, count in rows:
        print(
            f"{name:<{width}}  {count:>3} {spec.cleanup_policy:<8} key: {spec.key}; "
            f"partitioned by {spec.partitioned_by}"
        )
    return 0
