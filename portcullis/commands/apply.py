"""`portcullis apply`, `delete` and `get`: policy documents to and from the policies topic."""

from __future__ import annotations

import argparse
import logging
import sys

from portcullis.cli import CommandError, command, run_async
from portcullis.settings import Settings

#: The topics apply and delete write; they must exist with the contract's partition count.
WRITTEN_TOPICS = ("policies", "policies.history", "endpoints", "endpoints.history")


def _add_files(parser: argparse.ArgumentParser, verb: str) -> None:
    parser.add_argument(
        "-f", "--filename", action="append", required=True, metavar="FILE|DIR|-",
        help=f"documents to {verb}: a YAML/JSON file, a directory of them, or - for stdin "
        "(repeatable)",
    )
    parser.add_argument("-R", "--recursive", action="store_true",
                        help="read directories recursively")
    parser.add_argument(
        "-n", "--namespace", default="default",
        help="namespace for namespaced documents that do not name one (default: default)",
    )
    parser.add_argument("--dry-run", action="store_true",
                        help="validate and compare, print what would change, publish nothing")


def _load(args: argparse.Namespace) -> list[object]:
    from watchers.apply import ApplyError, load_all, read_sources

    try:
        return load_all(
            read_sources(args.filename, recursive=args.recursive),
            default_namespace=args.namespace,
        )
    except ApplyError as exc:
        problems = str(exc).splitlines()
        for line in problems:
            print(line, file=sys.stderr)
        raise CommandError(
            f"{len(problems)} problem(s) found; nothing was published"
        ) from None


def _quiet_aiokafka(settings: Settings) -> None:
    if settings.log_level != "DEBUG":
        logging.getLogger("aiokafka").setLevel(logging.CRITICAL)


async def _check_topics(settings: Settings) -> None:
    """Refuse to write to missing or drifted topics (a broker may auto-create them wrongly)."""
    from portcullis.topics_admin import check_topics

    report = await check_topics(
        settings.kafka.aiokafka_kwargs(), settings.topic_prefix, settings.partitions,
        settings.replication_factor, create=False,
    )
    names = {settings.topic_prefix + suffix for suffix in WRITTEN_TOPICS}
    bad = [t for t in report.failures() if t.name in names]
    if bad:
        detail = "; ".join(f"{t.name}: {t.state}" + (f" ({', '.join(t.problems)})"
                                                     if t.problems else "") for t in bad)
        raise CommandError(f"{detail}; run `portcullis topics create` first")


def _warn_unenforced(objects: list[object]) -> None:
    """Say, per object, what the dataplane will not enforce as written (stderr)."""
    from policy.enforcement import notes

    for obj in objects:
        for note in notes(obj):  # type: ignore[arg-type]
            print(f"warning: {obj.key}: {note}", file=sys.stderr)  # type: ignore[attr-defined]


def _publish(args: argparse.Namespace, settings: Settings, *, delete: bool) -> int:
    from watchers.apply import publish_objects

    objects = _load(args)
    if not delete:
        _warn_unenforced(objects)
    _quiet_aiokafka(settings)

    async def go() -> list[object]:
        await _check_topics(settings)
        return await publish_objects(  # type: ignore[return-value]
            settings.kafka.aiokafka_kwargs(), settings.topic_prefix, objects,
            actor=settings.actor, delete=delete, dry_run=args.dry_run,
        )

    outcomes = run_async(go())
    suffix = " (dry run)" if args.dry_run else ""
    missing = 0
    for outcome in outcomes:
        print(outcome.line() + suffix, flush=True)
        missing += outcome.verb == "not found"
    if args.dry_run and not delete and any(
        getattr(o, "kind", "").startswith("Staged") for o in objects
    ):
        for line in run_async(_staged_preview(settings, objects)):
            print(line, flush=True)
    if missing:
        raise CommandError(f"{missing} object(s) not found")
    return 0


#: How far back `apply --dry-run` looks for flows to judge staged policies against.
PREVIEW_FLOWS_SINCE = 3600.0


async def _staged_preview(settings: Settings, objects: list[object]) -> list[str]:
    """What the staged objects would change: the state topics now, with `objects` applied,
    judged against the last hour's logged flows."""
    import time

    from portcullis.audit import preview
    from portcullis.audit.explain import World
    from portcullis.commands.flows import as_flow, current_state, read_flows
    from topics.records import PolicyRecord
    from topics.specs import FLOWS

    state = await current_state(settings)
    now = time.time()
    for obj in objects:
        key, doc = obj.key, obj.to_document()  # type: ignore[attr-defined]
        state.policies[key] = PolicyRecord(
            obj.kind, obj.namespace, obj.name, doc, settings.actor, now, now,  # type: ignore[attr-defined]
        )
    world = World.of(state)
    try:
        records = await read_flows(settings.kafka.aiokafka_kwargs(),
                                   FLOWS.name(settings.topic_prefix))
    except LookupError:
        records = []
    flows = [f for r in records if r.end >= now - PREVIEW_FLOWS_SINCE
             and (f := as_flow(r)) is not None]
    return preview.lines(preview.preview(world, flows))


@command("apply", "Validate policy documents and publish them to the policies topic.")
class Command:
    @staticmethod
    def configure(parser: argparse.ArgumentParser) -> None:
        _add_files(parser, "apply")

    @staticmethod
    def run(args: argparse.Namespace, settings: Settings) -> int:
        return _publish(args, settings, delete=False)


@command("delete", "Delete the policy objects named in documents from the policies topic.")
class Delete:
    @staticmethod
    def configure(parser: argparse.ArgumentParser) -> None:
        _add_files(parser, "delete")

    @staticmethod
    def run(args: argparse.Namespace, settings: Settings) -> int:
        return _publish(args, settings, delete=True)


@command("get", "Show policy objects as the policies topic holds them (table, YAML or JSON).")
class Get:
    @staticmethod
    def configure(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("kind", metavar="KIND",
                            help="globalnetworkpolicy (gnp), networkpolicy, globalnetworkset "
                            "(gns), networkset, hostendpoint (hep) or tier")
        parser.add_argument("name", metavar="NAME", nargs="?", help="only this object")
        scope = parser.add_mutually_exclusive_group()
        scope.add_argument("-n", "--namespace", help="only this namespace (namespaced kinds)")
        scope.add_argument("-A", "--all-namespaces", action="store_true",
                           help="every namespace (the default when -n is not given)")
        parser.add_argument("-o", "--output", choices=["table", "yaml", "json"],
                            default="table", help="output format (default table)")

    @staticmethod
    def run(args: argparse.Namespace, settings: Settings) -> int:
        from watchers.apply import ApplyError, policies_state, render, resolve_kind, select

        try:
            kind = resolve_kind(args.kind)
        except ApplyError as exc:
            raise CommandError(str(exc)) from None
        _quiet_aiokafka(settings)
        try:
            state = run_async(policies_state(settings.kafka.aiokafka_kwargs(),
                                             settings.topic_prefix))
        except LookupError as exc:
            raise CommandError(str(exc)) from None
        records = select(state, kind, args.name, args.namespace)
        if args.name and not records:
            where = f" in namespace {args.namespace}" if args.namespace else ""
            raise CommandError(f"{kind.lower()} {args.name!r} not found{where}")
        text = render(records, kind, args.output, single=bool(args.name))
        if not text and args.output == "table":
            print(f"No {kind} objects found.", file=sys.stderr)
        sys.stdout.write(text)
        return 0
