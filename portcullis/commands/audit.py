"""`portcullis audit log|state` and `portcullis explain`: the history topics, replayed."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from typing import Any

from portcullis.cli import CommandError, command, run_async
from portcullis.settings import Settings, add_arguments

KIND_NAMES = {
    "pod": "Pod", "pods": "Pod", "hostendpoint": "HostEndpoint", "hep": "HostEndpoint",
    "vm": "VM", "vms": "VM", "namespace": "Namespace", "ns": "Namespace",
    "serviceaccount": "ServiceAccount", "sa": "ServiceAccount",
}


def _kinds(texts: list[str] | None) -> frozenset[str]:
    from watchers.apply import KIND_ALIASES

    out = set()
    for text in texts or ():
        for part in text.split(","):
            low = part.strip().lower()
            kind = KIND_ALIASES.get(low) or KIND_NAMES.get(low)
            if kind is None:
                known = sorted({*KIND_ALIASES.values(), *KIND_NAMES.values()})
                raise CommandError(f"unknown kind {part!r} (known: {', '.join(known)})")
            out.add(kind)
    return frozenset(out)


def _time(text: str | None, now: float, flag: str) -> float | None:
    from portcullis.timespec import TimeSpecError, parse_time

    if text is None:
        return None
    try:
        return parse_time(text, now)
    except TimeSpecError as exc:
        raise CommandError(f"{flag}: {exc}") from None


def _quiet(settings: Settings) -> None:
    if settings.log_level != "DEBUG":
        logging.getLogger("aiokafka").setLevel(logging.CRITICAL)


async def _changes(settings: Settings, topics: tuple[str, ...]) -> list[Any]:
    from portcullis.audit.read import Skipped, read_history

    skipped = Skipped()
    try:
        changes = await read_history(settings.kafka.aiokafka_kwargs(), settings.topic_prefix,
                                     topics, skipped=skipped)
    except LookupError as exc:
        raise CommandError(str(exc)) from None
    for line in skipped.lines:
        print(f"warning: skipped {line}", file=sys.stderr)
    return changes


def state_at(settings: Settings, at: float | None) -> Any:
    """The state topics as they stood at `at` (None: now), from the history topics."""
    from portcullis.audit.history import state_at as replay
    from portcullis.audit.read import Skipped, read_history_until

    async def survivors() -> list[Any]:
        skipped = Skipped()
        try:
            changes = await read_history_until(
                settings.kafka.aiokafka_kwargs(), settings.topic_prefix,
                time.time() if at is None else at, skipped=skipped)
        except LookupError as exc:
            raise CommandError(str(exc)) from None
        for line in skipped.lines:
            print(f"warning: skipped {line}", file=sys.stderr)
        for line in skipped.notes:
            print(f"warning: {line}", file=sys.stderr)
        return changes

    state = replay(run_async(survivors()))
    for line in state.problems:
        print(f"warning: unreadable record left out: {line}", file=sys.stderr)
    return state


def _output(parser: argparse.ArgumentParser, first: str = "table") -> None:
    parser.add_argument("-o", "--output", choices=[first, "yaml", "json"], default=first,
                        help=f"output format (default {first})")


@command("audit", "Replay the history topics: who changed what and when, and the state then.")
class Audit:
    @staticmethod
    def configure(parser: argparse.ArgumentParser) -> None:
        sub = parser.add_subparsers(dest="audit_command", metavar="WHAT", required=True)
        log = sub.add_parser("log", help="every change, with its actor, source and a diff")
        log.add_argument("--since", help="from this time (ISO 8601, @epoch, or 10m/2h/7d ago)")
        log.add_argument("--until", help="up to this time (same forms)")
        log.add_argument("--kind", action="append",
                         help="only these kinds (gnp, networkpolicy, gns, hep, tier, pod, vm, "
                         "namespace...; comma-separated or repeated)")
        log.add_argument("--name", help="only objects with this name")
        log.add_argument("-n", "--namespace", help="only objects in this namespace")
        log.add_argument("--actor", dest="changed_by", help="only changes by this actor")
        log.add_argument("--no-diff", action="store_true", help="one line per change")
        _output(log, "text")
        add_arguments(log, nested=True)
        state = sub.add_parser("state", help="policies and endpoints as they stood at a time")
        state.add_argument("--at", help="the time (ISO 8601, @epoch, or 10m/2h/7d ago; "
                           "default now)")
        state.add_argument("--kind", action="append", help="only these kinds")
        _output(state)
        add_arguments(state, nested=True)

    @staticmethod
    def run(args: argparse.Namespace, settings: Settings) -> int:
        from portcullis.audit import history, render

        _quiet(settings)
        now = time.time()
        if args.audit_command == "state":
            at = _time(args.at, now, "--at")
            state = state_at(settings, at)
            text = render.render_state(state, args.output, at=at if at is not None else now,
                                       kinds=_kinds(args.kind))
            if not text and args.output == "table":
                print("Nothing existed at that time.", file=sys.stderr)
            sys.stdout.write(text)
            return 0
        where = history.LogFilter(
            since=_time(args.since, now, "--since"), until=_time(args.until, now, "--until"),
            kinds=_kinds(args.kind), name=args.name, namespace=args.namespace,
            actor=args.changed_by,
        )
        changes = run_async(_changes(settings, ("endpoints", "profiles", "policies")))
        entries = list(history.log_entries(changes, where))
        sys.stdout.write(render.render_log(entries, args.output, diffs=not args.no_diff))
        if not entries and args.output == "text":
            print("No changes match.", file=sys.stderr)
        return 0


@command("explain", "Why a connection is allowed or denied: the tier, policy and rule that decide.")
class Explain:
    @staticmethod
    def configure(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("source", metavar="SOURCE",
                            help="a pod (namespace/name, or name with -n), host endpoint or VM")
        parser.add_argument("destination", metavar="DEST[:PORT[/PROTO]]",
                            help="an IP ([v6]:PORT with a port), an endpoint, or a domain name "
                            "of a network set or rule; protocol TCP unless given")
        parser.add_argument("-n", "--namespace", help="namespace of SOURCE and DEST names")
        parser.add_argument("--at", help="as policy stood at this time (ISO 8601, @epoch, or "
                            "10m/2h/7d ago; default now)")
        parser.add_argument("--staged", action="store_true",
                            help="as it would be with every staged policy applied")
        _output(parser, "text")

    @staticmethod
    def run(args: argparse.Namespace, settings: Settings) -> int:
        from portcullis.audit import render
        from portcullis.audit.explain import ExplainError, World

        _quiet(settings)
        at = _time(args.at, time.time(), "--at")
        world = World.of(state_at(settings, at))
        for line in world.problems:
            print(f"warning: invalid policy left out: {line}", file=sys.stderr)
        try:
            explanation = world.explain(args.source, args.destination,
                                        namespace=args.namespace, staged=args.staged)
        except ExplainError as exc:
            raise CommandError(str(exc)) from None
        sys.stdout.write(render.render_explanation(explanation, args.output, at))
        return 0
