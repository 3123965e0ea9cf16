"""`portcullis flows`: show the connection attempts enforcers logged (the flows topic)."""

from __future__ import annotations

import argparse
import asyncio
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
    from aiokafka import AIOKafkaConsumer, TopicPartition

    from topics.codec import decode_as
    from topics.records import RecordError

    consumer = AIOKafkaConsumer(**kafka_kwargs, enable_auto_commit=False, group_id=None,
                                auto_offset_reset="earliest", client_id="portcullis-flows")
    await consumer.start()
    records: list[FlowRecord] = []
    try:
        async with asyncio.timeout(timeout):
            parts = consumer.partitions_for_topic(topic)
            if parts is None:
                await consumer._client.force_metadata_update()
                parts = consumer.partitions_for_topic(topic)
            if not parts:
                raise LookupError(f"topic {topic!r} does not exist (run `portcullis topics "
                                  "create`)")
            tps = [TopicPartition(topic, p) for p in sorted(parts)]
            consumer.assign(tps)
            await consumer.seek_to_beginning(*tps)
            ends = await consumer.end_offsets(tps)
            while pending := [tp for tp in tps if await consumer.position(tp) < ends[tp]]:
                batch = await consumer.getmany(*pending, timeout_ms=500)
                for tp, messages in batch.items():
                    for msg in messages:
                        if msg.offset >= ends[tp]:
                            continue
                        try:
                            record = decode_as(FlowRecord, msg.value)
                        except RecordError as exc:
                            log.warning("%s[%d]@%d: skipped: %s", topic, tp.partition,
                                        msg.offset, exc)
                            continue
                        if record is not None:
                            records.append(record)
    finally:
        await consumer.stop()
    return records


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
        parser.add_argument("-o", "--output", choices=["table", "json", "yaml"],
                            default="table", help="output format (default table)")

    @staticmethod
    def run(args: argparse.Namespace, settings: Settings) -> int:
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
        text = render(shown, args.output)
        if not text and args.output == "table":
            print("No flows found.", file=sys.stderr)
        sys.stdout.write(text)
        return 0
