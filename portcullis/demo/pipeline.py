"""The demo's Kafka side: broker, topics, publishing as the watcher does, reading back,
and the processor and enforcer as subprocesses whose logs are shown when they fail."""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import importlib.util
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import IO, Any

from portcullis.brokers import die_with_parent_fn
from portcullis.demo import DemoError

#: Which piece of Portcullis each stage needs, and the issue that builds it.
PIECES: dict[str, tuple[str, str]] = {
    "portcullis.brokers": ("the embedded broker", "issue 3"),
    "portcullis.topics_admin": ("topic creation", "issue 3"),
    "watchers.translate": ("the watcher's translation of objects into records", "issue 6"),
    "watchers.publisher": ("the watcher's publisher", "issue 6"),
    "streams.app": ("the membership stream processor (`portcullis process`)", "issue 4"),
    "streams.membership": ("the label rules the processor applies", "issue 4"),
    "enforcers.engine": ("the enforcer (`portcullis enforce`)", "issue 5"),
    "enforcers.state": ("the enforcer's state", "issue 5"),
    "enforcers.render": ("the enforcer's rule rendering", "issue 5"),
}


def require(module: str, stage: str) -> ModuleType:
    """Import a piece the stage needs, or say clearly which piece is missing."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        what, issue = PIECES.get(module, (module, "another issue"))
        raise DemoError(
            f"{stage} needs {what} ({module}, {issue}), which is not there yet: {exc}"
        ) from None


def require_present(module: str, stage: str) -> None:
    """Like `require` for a piece that runs in a subprocess: found, but not imported here."""
    try:
        found = importlib.util.find_spec(module) is not None
    except ImportError:
        found = False
    if not found:
        what, issue = PIECES.get(module, (module, "another issue"))
        raise DemoError(f"{stage} needs {what} ({module}, {issue}), which is not there yet")


def tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return "    (no log written)"
    return "\n".join("    " + line for line in text[-lines:]) or "    (log is empty)"


# --------------------------------------------------------------------------- subprocesses

#: `portcullis` itself, run by this interpreter (no PATH lookup; `-m portcullis.cli` would
#: register the subcommands on a second copy of the module).
ENTRY = "import sys; from portcullis.cli import main; sys.exit(main())"


@dataclass
class Service:
    """A `portcullis …` subprocess in its own session (Ctrl-C reaches us, and we stop it)."""

    name: str
    args: list[str]
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    _log: IO[bytes] | None = None

    def start(self, env: Mapping[str, str] | None = None) -> Service:
        self._log = open(self.log_path, "ab")  # noqa: SIM115  (closed in stop())
        self.process = subprocess.Popen(
            [sys.executable, "-c", ENTRY, *self.args],
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
            env=dict(env if env is not None else os.environ), start_new_session=True,
            # Linux SIGTERMs the child when the demo dies, even by SIGKILL (no leaked
            # processor or enforcer); prctl only: safe before exec
            preexec_fn=die_with_parent_fn(),
        )
        return self

    def check(self) -> None:
        """Raise a DemoError with the log's tail when the process has died."""
        if self.process is not None and (code := self.process.poll()) is not None:
            raise DemoError(
                f"{self.name} exited with code {code}; its log {self.log_path}:\n"
                f"{tail(self.log_path)}"
            )

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL; by PID, only the process we started."""
        proc, self.process = self.process, None
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None


def connection_args(bootstrap: str, prefix: str, partitions: int) -> list[str]:
    return ["--bootstrap", bootstrap, "--topic-prefix", prefix, "--partitions", str(partitions),
            "--log-level", "INFO"]


# --------------------------------------------------------------------------- topics


async def create_topics(kafka: Mapping[str, Any], prefix: str, partitions: int) -> list[str]:
    """Create every topic (the broker is fresh); the report lines, or a DemoError."""
    admin = require("portcullis.topics_admin", "creating the topics")
    report = await admin.check_topics(kafka, prefix, partitions, 1, create=True, timeout=20.0)
    if not report.ok:
        raise DemoError("topics do not match the contract:\n" + "\n".join(report.lines()))
    return list(report.lines())


class Publishing:
    """The watcher's publisher on an aiokafka producer (started and stopped here)."""

    def __init__(self, kafka: Mapping[str, Any], prefix: str) -> None:
        self.kafka = dict(kafka)
        self.prefix = prefix
        self.producer: Any = None
        self.publisher: Any = None

    async def __aenter__(self) -> Publishing:
        publisher_mod = require("watchers.publisher", "publishing records")
        self.producer = publisher_mod.producer_for(self.kafka, "portcullis-demo")
        await self.producer.start()
        self.publisher = publisher_mod.KafkaPublisher(self.producer, self.prefix)
        return self

    async def publish(self, publications: Sequence[Any]) -> None:
        await self.publisher.publish(list(publications))

    async def __aexit__(self, *exc: object) -> None:
        if self.producer is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.producer.stop(), 10)


@dataclass
class TopicReader:
    """Reads whole topics (every partition, no group) and keeps the latest value per key."""

    kafka: Mapping[str, Any]
    prefix: str
    suffixes: tuple[str, ...]
    latest: dict[str, dict[str, bytes | None]] = field(default_factory=dict)
    arrived: dict[str, float] = field(default_factory=dict)  # "suffix|key" -> time.time()
    stamped: dict[str, float] = field(default_factory=dict)  # "suffix|key" -> record timestamp
    consumer: Any = None
    count: int = 0

    async def start(self) -> TopicReader:
        from aiokafka import AIOKafkaConsumer, TopicPartition

        from topics.specs import topic_name

        self.consumer = AIOKafkaConsumer(
            **self.kafka, enable_auto_commit=False, auto_offset_reset="earliest",
            client_id="portcullis-demo-reader", fetch_max_wait_ms=20,
        )
        await self.consumer.start()
        # the consumer's own cluster view tracks only subscribed topics: ask for all
        cluster = await self.consumer._client.fetch_all_metadata()
        tps = []
        for suffix in self.suffixes:
            topic = topic_name(self.prefix, suffix)
            parts = cluster.partitions_for_topic(topic)
            if not parts:
                raise DemoError(f"topic {topic} does not exist")
            tps += [TopicPartition(topic, p) for p in sorted(parts)]
        self.consumer.assign(tps)
        await self.consumer.seek_to_beginning(*tps)
        return self

    async def poll(self, timeout: float = 0.2) -> list[tuple[str, str, bytes | None]]:
        """What arrived since the last poll: (suffix, key, value)."""
        from topics.specs import spec_for

        got: list[tuple[str, str, bytes | None]] = []
        batch = await self.consumer.getmany(timeout_ms=int(timeout * 1000))
        now = time.time()
        for tp, messages in batch.items():
            suffix = spec_for(tp.topic).suffix
            for msg in messages:
                key = (msg.key or b"").decode("utf-8", "replace")
                self.latest.setdefault(suffix, {})[key] = msg.value
                self.arrived[f"{suffix}|{key}"] = now
                self.stamped[f"{suffix}|{key}"] = msg.timestamp / 1000.0
                got.append((suffix, key, msg.value))
        self.count += len(got)
        return got

    def current(self, suffix: str) -> dict[str, bytes]:
        """The compacted view of a topic: keys whose latest value is not a tombstone."""
        return {k: v for k, v in self.latest.get(suffix, {}).items() if v is not None}

    async def stop(self) -> None:
        if self.consumer is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.consumer.stop(), 5)
            self.consumer = None


def summarise(suffix: str, key: str, value: bytes | None) -> str:
    """One readable line for a record read back from a topic."""
    from topics import codec

    if value is None:
        return f"{suffix:<12} {key}  (tombstone)"
    try:
        rec: Any = codec.decode(suffix, value)
    except ValueError as exc:
        return f"{suffix:<12} {key}  UNREADABLE: {exc}"
    if suffix == "endpoints":
        labels = ",".join(f"{k}={v}" for k, v in rec.labels.items())
        return f"{suffix:<12} {key}  ips={','.join(rec.ips)} labels={labels or '-'}"
    if suffix == "profiles":
        labels = ",".join(f"{k}={v}" for k, v in rec.labels.items())
        return f"{suffix:<12} {key}  labels={labels or '-'}"
    if suffix == "policies":
        return f"{suffix:<12} {key}  applied by {rec.actor}"
    if suffix == "memberships":
        ips = ",".join(rec.ips)
        return f"{suffix:<12} {rec.endpoint_key} in {rec.selector_uid[:14]}…  ips={ips}"
    return f"{suffix:<12} {key}"


def membership_lines(
    memberships: Mapping[str, bytes], selector_text: Mapping[str, str]
) -> list[str]:
    """Selector → members, the processor's output as a reader wants to see it."""
    from topics.records import split_membership_key

    members: dict[str, list[str]] = {}
    for key in memberships:
        uid, endpoint = split_membership_key(key)
        members.setdefault(uid, []).append(endpoint)
    lines = []
    for uid, endpoints in sorted(members.items(), key=lambda kv: selector_text.get(kv[0], kv[0])):
        text = selector_text.get(uid, uid)
        lines.append(f"{text}")
        lines += [f"    ∋ {e}" for e in sorted(endpoints)]
    return lines


def selector_texts(policies: Iterable[Any]) -> dict[str, str]:
    """Selector uid → its canonical text, for every selector of these policies."""
    from policy.compile import all_selectors

    out: dict[str, str] = {}
    for pol in policies:
        for sel in all_selectors(pol, ("Egress",)):
            out[sel.uid] = str(sel)
    return out
