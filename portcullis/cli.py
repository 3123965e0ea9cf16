"""The one console script, `portcullis`: a subcommand for every service and tool."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any

from portcullis import settings as settings_mod


class CommandError(Exception):
    """An expected failure: printed as one line, exit code 1."""


Handler = Callable[[argparse.Namespace, settings_mod.Settings], int | None]
_COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Handler]] = {}


def command(name: str, help_text: str) -> Callable[[Any], Any]:
    """Register `configure(parser)` and `run(args, settings)` for a subcommand (see commands.py)."""

    def register(obj: Any) -> Any:
        _COMMANDS[name] = (help_text, obj.configure, obj.run)
        return obj

    return register


def build_parser() -> argparse.ArgumentParser:
    from portcullis import commands  # noqa: F401  (registers every subcommand)

    parser = argparse.ArgumentParser(
        prog="portcullis",
        description="Egress access control for Kubernetes workloads, hosts and VMs.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (help_text, configure, _run) in _COMMANDS.items():
        sp = sub.add_parser(name, help=help_text, description=help_text)
        configure(sp)
        settings_mod.add_arguments(sp)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        conf = settings_mod.load(args)
        logging.basicConfig(
            level=conf.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
        )
        _help, _configure, run = _COMMANDS[args.command]
        return int(run(args, conf) or 0)
    except (CommandError, settings_mod.SettingsError) as exc:
        print(f"portcullis {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"portcullis {args.command}: interrupted", file=sys.stderr)
        return 130


def run_async(coro: Any) -> Any:
    """Run a coroutine, turning connection failures into one-line errors."""
    from aiokafka.errors import KafkaConnectionError, KafkaError

    try:
        return asyncio.run(coro)
    except KafkaConnectionError as exc:
        raise CommandError(f"cannot reach the Kafka brokers: {exc}") from None
    except KafkaError as exc:
        raise CommandError(f"Kafka error: {exc}") from None


if __name__ == "__main__":
    sys.exit(main())
