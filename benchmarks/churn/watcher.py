"""The simulated watcher: publishes the cluster's churn on schedule, in its own process.

The benchmark's measuring process is busy simulating enforcers; publishing from it would
delay events behind that work and understate the offered rate. So events are published
from here, stamped with ``observed_at`` the moment they are sent, at the phase's rate, the
way `watchers.publisher` publishes them. Every event is also written as one JSON line on
stdout *before* it is published, so the measuring process knows it (and, for a deletion,
which event caused the tombstones that follow) before any derived record can arrive.

Protocol (JSON lines). Stdin: ``{"run": [phase, rate, count, actions]}`` runs a churn
phase (``actions`` maps event indexes to names the parent acts on), ``{"storm": {...}}``
publishes the storm, ``{"quit": true}`` ends. Stdout: ``{"e": [at, key, phase]}`` per
event, ``{"action": name}`` when an action is due (the watcher waits for ``{"ok": true}``),
``{"done": {...}}`` at the end of each command.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from typing import Any

from benchmarks.churn.cluster import (
    ChurnGenerator,
    ClusterSpec,
    build_cluster,
    storm_documents,
)


def _say(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


class Watcher:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        spec = ClusterSpec(**json.loads(args.spec))
        self.cluster = build_cluster(spec)
        self.gen = ChurnGenerator(self.cluster)
        self.last_at = 0.0

    def stamp(self) -> float:
        at = time.time()
        if at <= self.last_at:
            at = self.last_at + 1e-6
        self.last_at = at
        return at

    async def start(self) -> None:
        from watchers.publisher import KafkaPublisher, producer_for

        self.producer = producer_for({"bootstrap_servers": self.args.bootstrap}, "bench-churn")
        await self.producer.start()
        self.publisher = KafkaPublisher(self.producer, self.args.prefix)

    async def churn(self, phase: str, rate: float, count: int,
                    actions: dict[str, str], lines: asyncio.Queue[dict[str, Any]]) -> None:
        from watchers.mirror import Publication

        step = 60.0 / rate
        t0 = time.monotonic()
        pending: list[asyncio.Task[None]] = []
        late = 0.0
        for i in range(count):
            if str(i) in actions:
                _say({"action": actions[str(i)]})
                await lines.get()  # the parent acted
            due = t0 + i * step
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            else:
                late = max(late, -delay)
            event = self.gen.next()
            at = self.stamp()
            _say({"e": [at, event.key, phase]})
            rec = event.record(at)
            pub = (Publication.upsert("endpoints", rec) if rec is not None
                   else Publication.tombstone("endpoints", event.key, event.namespace))
            pending.append(asyncio.create_task(self.publisher.publish([pub])))
            if len(pending) > 1000:
                await asyncio.gather(*pending[:500])
                pending = pending[500:]
        await asyncio.gather(*pending)
        elapsed = time.monotonic() - t0
        _say({"done": {"phase": phase, "events": count, "publish_seconds": elapsed,
                       "max_behind_schedule_s": late}})

    async def storm(self, growth: int) -> None:
        import policy as policy_mod
        from watchers.translate import policy_publications

        for step, (name, doc) in enumerate(storm_documents(self.cluster, growth)):
            if step:
                await self.lines.get()  # the parent has measured the previous step
            obj = policy_mod.load_document(doc, source="bench storm")
            at = self.stamp()
            key = obj.key if obj.kind != "GlobalNetworkSet" else f"globalnetworkset//{obj.name}"
            _say({"e": [at, key, name]})
            await self.publisher.publish(policy_publications(
                obj, actor="bench", applied_at=at, observed_at=at, source="apply"))
            _say({"done": {"phase": name, "at": at}})

    async def main(self) -> None:
        await self.start()
        loop = asyncio.get_running_loop()
        self.lines: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        _say({"ready": True})

        async def read() -> None:
            while line := await reader.readline():
                await self.lines.put(json.loads(line))
            await self.lines.put({"quit": True})

        reading = asyncio.create_task(read())
        try:
            while True:
                cmd = await self.lines.get()
                if "quit" in cmd:
                    break
                if "run" in cmd:
                    phase, rate, count, actions = cmd["run"]
                    await self.churn(phase, rate, count, actions, self.lines)
                elif "storm" in cmd:
                    await self.storm(int(cmd["storm"]["growth"]))
        finally:
            reading.cancel()
            await self.producer.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--prefix", required=True)
    parser.add_argument("--spec", required=True, help="ClusterSpec fields as JSON")
    args = parser.parse_args(argv)
    asyncio.run(Watcher(args).main())
    return 0


if __name__ == "__main__":
    sys.exit(main())
