"""`portcullis flows`: show the connection attempts enforcers logged (the flows topic)."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from typing import Any

from portcullis.cli import CommandError, command, run_async
from portcullis.settings import Settings
from topics.records import FlowRecord

log = logging.getLogger("portcullis.flows")


async def read_flows(kafka_kwargs: dict[str, Any], topic: str,
                     timeout: float = 30.0) -> list[FlowRecord]:
    """Every record on the topic up to its end offsets when reading starts (records that
    arrive meanwhile are not waited for); malformed ones are skipped and logged."""
    from portcullis.audit.read import read_log
    from topics.codec import decode_as
    from topics.records import RecordError

    records: list[FlowRecord] = []
    async for partition, offset, _key, value, _stamp in read_log(kafka_kwargs, topic,
                                                                 timeout=timeout):
        try:
            record = decode_as(FlowRecord, value)
        except RecordError as exc:
            log.warning("%s[%d]@%d: skipped: %s", topic, partition, offset, exc)
            continue
        if record is not None:
            records.append(record)
    return records


async def current_state(settings: Settings) -> Any:
    """The state topics as they are now, as an `audit.history.AuditState`."""
    from portcullis.audit.history import AuditState
    from topics.records import EndpointRecord, PolicyRecord, ProfileRecord
    from topics.specs import topic_name
    from watchers.topicstate import read_state

    kw, prefix = settings.kafka.aiokafka_kwargs(), settings.topic_prefix
    return AuditState(
        endpoints=await read_state(kw, topic_name(prefix, "endpoints"), EndpointRecord),
        profiles=await read_state(kw, topic_name(prefix, "profiles"), ProfileRecord),
        policies=await read_state(kw, topic_name(prefix, "policies"), PolicyRecord),
    )


def as_flow(record: FlowRecord) -> Any:
    """A logged egress attempt from a known endpoint as a question for policy (else None)."""
    from portcullis.audit.preview import Flow

    if record.direction != "egress" or record.source_endpoint is None:
        return None
    return Flow(record.source_endpoint, record.dest_ip, record.dest_port, record.protocol,
                record.attempts)


def if_staged(world: Any, records: list[FlowRecord]) -> list[str]:
    """Per record: what policy would decide with every staged policy enforced."""
    from portcullis.audit.preview import judge

    out = []
    for record in records:
        flow = as_flow(record)
        judged = judge(world, flow) if flow is not None else None
        if judged is None:
            out.append("-")
            continue
        now, staged = (v.action for v in judged)
        out.append(f"would {staged}" if staged != now else staged)
    return out


@command("flows", "Show connection attempts the enforcers logged (denied, and allowed where "
         "enabled), from the flows topic.")
class Command:
    @staticmethod
    def configure(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--since", metavar="TIME",
                            help="only flows seen at or after TIME: ISO 8601 (no zone: UTC) "
                                 "or a duration before now (90s, 10m, 2h, 1d)")
        parser.add_argument("--until", metavar="TIME", help="only flows seen up to TIME")
        parser.add_argument("--action", choices=["allow", "deny"], help="only this action")
        parser.add_argument("--node", help="only flows this node logged")
        parser.add_argument("--source", metavar="ENDPOINT|IP|CIDR",
                            help="only from this endpoint (key kind/namespace/name, "
                                 "namespace/name or name) or address")
        parser.add_argument("--dest", metavar="ENDPOINT|IP|CIDR",
                            help="only to this endpoint or address")
        parser.add_argument("--staged", action="store_true",
                            help="add what policy would decide with every staged policy "
                                 "enforced (\"would deny\" where it differs from now)")
        parser.add_argument("-o", "--output", choices=["table", "json", "yaml"],
                            default="table", help="output format (default table)")

    @staticmethod
    def run(args: argparse.Namespace, settings: Settings) -> int:
        from portcullis.audit.explain import World
        from portcullis.flowview import FlowFilter, FlowQueryError, parse_time, render, select
        from topics.specs import FLOWS

        now = time.time()
        try:
            flt = FlowFilter(
                since=parse_time(args.since, now) if args.since else None,
                until=parse_time(args.until, now, "--until") if args.until else None,
                action=args.action, node=args.node, source=args.source, dest=args.dest)
        except FlowQueryError as exc:
            raise CommandError(str(exc)) from None
        if settings.log_level != "DEBUG":
            logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
        try:
            records = run_async(read_flows(settings.kafka.aiokafka_kwargs(),
                                           FLOWS.name(settings.topic_prefix)))
        except LookupError as exc:
            raise CommandError(str(exc)) from None
        except TimeoutError:
            raise CommandError("reading the flows topic took over 30 s") from None
        shown = select(records, flt)
        staged = (if_staged(World.of(run_async(current_state(settings))), shown)
                  if args.staged else None)
        text = render(shown, args.output, staged)
        if not text and args.output == "table":
            print("No flows found.", file=sys.stderr)
        sys.stdout.write(text)
        return 0
