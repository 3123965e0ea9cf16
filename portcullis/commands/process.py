"""`portcullis process`: Run the membership stream processor (Faust)."""

from __future__ import annotations

import argparse
import gc
import os
import sys
from pathlib import Path
from typing import Any

from portcullis import observe
from portcullis.cli import CommandError, command
from portcullis.settings import Settings

#: Allocations between two collections of the youngest generation (see `Command.run`).
GC_YOUNG_THRESHOLD = 50_000


@command("process", "Run the membership stream processor (Faust).")
class Command:
    @staticmethod
    def configure(parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--store",
            choices=["rocksdb", "memory"],
            default=os.environ.get("PORTCULLIS_STREAMS_STORE", "rocksdb"),
            help="table store: rocksdb (default; local state survives restarts, also a "
            "SIGKILL: members written since the last flush are republished from the inputs) "
            "or memory (tables are rebuilt from their changelogs on every start)",
        )
        parser.add_argument(
            "--data-dir",
            default=os.environ.get("PORTCULLIS_STREAMS_DATA_DIR", "/var/lib/portcullis/streams"),
            metavar="DIR",
            help="where rocksdb tables live (default /var/lib/portcullis/streams)",
        )
        parser.add_argument(
            "--group",
            default=None,
            metavar="ID",
            help="consumer group / Faust app id (default <topic-prefix>streams); workers "
            "with the same group share the partitions",
        )

        parser.add_argument(
            "--session-timeout",
            type=float,
            default=60.0,
            metavar="SECONDS",
            help="consumer group session timeout: how long a dead worker keeps its partitions "
            "(default 60)",
        )

        parser.add_argument(
            "--fetch-max-wait",
            type=float,
            default=0.02,
            metavar="SECONDS",
            help="how long the broker may hold an empty fetch (default 0.02). Apache Kafka "
            "answers as soon as records arrive, so on Kafka this only sets idle polling "
            "(0.5 is fine there); the embedded Tansu answers only when the wait ends, so "
            "there it adds up to this much latency per event",
        )
        parser.add_argument(
            "--producer-linger",
            type=float,
            default=0.02,
            metavar="SECONDS",
            help="how long table and membership writes wait to be batched (default 0.02; "
            "shorter: lower latency at low rates, more CPU per event at high rates)",
        )
        observe.add_arguments(parser, max_age=30.0)
        parser.add_argument(
            "--batch-size",
            type=int,
            default=1000,
            metavar="N",
            help="most events processed as one batch (a fetch brings up to 2,000): their table "
            "and membership writes coalesced and sent as one record batch per table and "
            "partition (default 1000; 1: one event at a time)",
        )
        parser.add_argument(
            "--brute-force",
            action="store_true",
            help="evaluate every selector for every endpoint change, without the label index "
            "(the benchmark baseline; never in production)",
        )

    @staticmethod
    def run(args: argparse.Namespace, settings: Settings) -> int:

        from streams.app import Processor, StreamsConfig
        from topics.health import Health

        error = observe.check_arguments(args)
        if error:
            raise CommandError(error)
        if args.session_timeout <= 0:
            raise CommandError(f"--session-timeout must be positive, got {args.session_timeout:g}")
        if args.batch_size < 1:
            raise CommandError(f"--batch-size must be at least 1, got {args.batch_size}")
        for flag, value in (("--fetch-max-wait", args.fetch_max_wait),
                            ("--producer-linger", args.producer_linger)):
            if not 0 <= value <= 10:
                raise CommandError(f"{flag} must be between 0 and 10 seconds, got {value:g}")
        kafka = settings.kafka
        _check_topics(settings)
        ssl_context = None
        if kafka.security_protocol in ("SSL", "SASL_SSL"):
            ssl_context = kafka.aiokafka_kwargs()["ssl_context"]
        try:  # Faust keeps its own files there even with the memory store
            os.makedirs(args.data_dir, exist_ok=True)
        except OSError as exc:
            raise CommandError(
                f"--data-dir {args.data_dir}: cannot create: {exc.strerror}"
            ) from None
        config = StreamsConfig(
            bootstrap=kafka.bootstrap,
            topic_prefix=settings.topic_prefix,
            partitions=settings.partitions,
            replication_factor=settings.replication_factor,
            store=f"{args.store}://",
            data_dir=args.data_dir,
            security_protocol=kafka.security_protocol,
            ssl_context=ssl_context,
            sasl_mechanism=kafka.sasl_mechanism,
            sasl_username=kafka.sasl_username,
            sasl_password=kafka.sasl_password,
            app_id=args.group,
            session_timeout=args.session_timeout,
            brute_force=args.brute_force,
            fetch_max_wait=args.fetch_max_wait,
            producer_linger=args.producer_linger,
            batch_size=args.batch_size,
        )
        # Faust consumes in a thread of its own; every socket write of the main thread
        # releases the GIL and then waits up to the switch interval (5 ms) to get it back
        # from the busy consumer thread. A short interval keeps produce calls from stalling.
        sys.setswitchinterval(0.0005)
        # The worker allocates a few hundred short-lived objects per event; Python's default
        # collects the young generation every 700 allocations. Interleaved on Kafka, 20,000
        # endpoints (streams_bench, 4 runs each): median 6,997 -> 7,711 events per worker
        # CPU-second at 50,000 (200,000 gave no more). Refcounting still frees most garbage.
        gc.set_threshold(GC_YOUNG_THRESHOLD, 10, 10)
        health = Health("processor")
        health.loop("main", args.health_max_age)
        processor = Processor(config, health)
        try:
            servers = observe.start(args, processor.metrics.expose, health)
        except OSError as exc:
            raise CommandError(str(exc)) from None
        try:
            _run(processor, args, settings, kafka)
        finally:
            observe.stop(servers)
        return 0


def _run(processor: Any, args: argparse.Namespace, settings: Settings, kafka: Any) -> None:
    """Prepare the changelogs, then run the Faust worker until it stops."""
    import faust

    from portcullis.cli import run_async
    from streams.app import prepare_changelogs
    from streams.localstate import LocalState

    try:
        run_async(prepare_changelogs(processor, kafka.aiokafka_kwargs()))
    except RuntimeError as exc:
        raise CommandError(str(exc)) from None
    local_state = None
    if args.store == "rocksdb":  # local tables survive restarts: keep crash bookkeeping
        local_state = LocalState(Path(processor.app.conf.tabledir).parent)
        local_state.open()
        processor.attach_local_state(local_state)
    worker = faust.Worker(
        processor.app,
        loglevel=settings.log_level,
        quiet=True,
        override_logging=False,
    )
    try:
        worker.execute_from_commandline()
    except SystemExit as exit_:
        crashed = worker.crash_reason or processor.app.crash_reason
        if exit_.code in (0, None) and crashed is None and local_state is not None:
            local_state.close_cleanly()
        raise


def _check_topics(settings: Settings) -> None:
    """Refuse to start on missing or wrongly partitioned topics, saying how to fix it.

    Faust would otherwise wait forever for a topic or crash on a partition mismatch.
    """
    from portcullis.cli import run_async
    from portcullis.topics_admin import check_topics

    report = run_async(
        check_topics(
            settings.kafka.aiokafka_kwargs(),
            settings.topic_prefix,
            settings.partitions,
            settings.replication_factor,
            create=False,
        )
    )
    needed = ("endpoints", "profiles", "policies", "selectors", "memberships", "deadletter")
    bad = [
        t
        for t in report.failures()
        if t.spec.suffix in needed
        and (t.state in ("missing", "error") or any("partitions" in p for p in t.problems))
    ]
    if bad:
        details = "; ".join(f"{t.name}: {t.state} {' '.join(t.problems)}".strip() for t in bad)
        raise CommandError(
            f"topics not ready ({details}); run `portcullis topics create` with the same "
            "--topic-prefix and --partitions first"
        )
