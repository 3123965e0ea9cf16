"""What ``/healthz`` and ``/readyz`` answer, as plain data: every process says it the same way.

*Healthy* means the process's loops are alive: each registered loop beat less than its
``max_age`` ago. *Ready* means every readiness condition holds (the enforcer synced and
programmed, the processor caught up, the watcher listed and leading or standing by).
Notes (the brokers unreachable, standing by) are reported without changing either
verdict. Pure: the clock is given; serving it is `portcullis.observe`'s job.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Verdict:
    """An HTTP answer: 200 when ``ok``, else 503, with a short JSON ``body``."""

    ok: bool
    body: dict[str, Any]

    @property
    def status(self) -> int:
        return 200 if self.ok else 503


@dataclass(frozen=True)
class Beat:
    last: float  # when the loop last beat (the clock's time; registration counts)
    max_age: float
    stalled: bool = False  # a test hook froze it: beats are ignored


@dataclass(frozen=True)
class Condition:
    ok: bool
    detail: str


def liveness(component: str, beats: Mapping[str, Beat], now: float,
             notes: Mapping[str, str] | None = None) -> Verdict:
    """Healthy when every loop beat within its ``max_age`` (and there is at least one)."""
    loops = {}
    why = []
    for name, beat in sorted(beats.items()):
        age = max(0.0, now - beat.last)
        alive = age <= beat.max_age
        loops[name] = {"ok": alive, "age": round(age, 3), "max_age": beat.max_age}
        if not alive:
            why.append(f"{name} loop silent for {age:.1f}s (more than {beat.max_age:g}s)")
    if not beats:
        why.append("no loop started yet")
    body: dict[str, Any] = {"status": "ok" if not why else "unhealthy", "component": component,
                            "loops": loops}
    if why:
        body["why"] = "; ".join(why)
    if notes:
        body["notes"] = dict(notes)
    return Verdict(not why, body)


def readiness(component: str, conditions: Mapping[str, Condition],
              notes: Mapping[str, str] | None = None) -> Verdict:
    """Ready when every condition holds (and there is at least one)."""
    why = [f"{name}: {c.detail}" for name, c in sorted(conditions.items()) if not c.ok]
    if not conditions:
        why.append("starting")
    body: dict[str, Any] = {
        "status": "ready" if not why else "not ready", "component": component,
        "conditions": {n: {"ok": c.ok, "detail": c.detail} for n, c in sorted(conditions.items())},
    }
    if why:
        body["why"] = "; ".join(why)
    if notes:
        body["notes"] = dict(notes)
    return Verdict(not why, body)


class Health:
    """A process's heartbeats, readiness conditions and notes (thread-safe enough to be read
    by an HTTP thread: every update replaces one dictionary entry)."""

    def __init__(self, component: str, clock: Callable[[], float] = time.monotonic) -> None:
        self.component = component
        self.clock = clock
        self.beats: dict[str, Beat] = {}
        self.conditions: dict[str, Condition] = {}
        self.notes: dict[str, str] = {}

    def loop(self, name: str, max_age: float) -> None:
        """Register a loop; its registration counts as its first beat."""
        if max_age <= 0:
            raise ValueError(f"max_age of loop {name!r} must be positive, got {max_age:g}")
        self.beats[name] = Beat(self.clock(), max_age)

    def beat(self, name: str) -> None:
        beat = self.beats.get(name)
        if beat is None:
            raise KeyError(f"loop {name!r} was never registered (Health.loop)")
        if not beat.stalled:
            self.beats[name] = Beat(self.clock(), beat.max_age)

    def forget(self, name: str) -> None:
        self.beats.pop(name, None)

    def stall(self, name: str) -> None:
        """Test hook: the loop's beats are ignored from now on, as if it were wedged."""
        beat = self.beats[name]
        self.beats[name] = Beat(beat.last, beat.max_age, stalled=True)

    def set(self, name: str, ok: bool, detail: str) -> None:
        self.conditions[name] = Condition(ok, detail)

    def note(self, name: str, text: str | None) -> None:
        if text is None:
            self.notes.pop(name, None)
        else:
            self.notes[name] = text

    def healthz(self) -> Verdict:
        return liveness(self.component, dict(self.beats), self.clock(), dict(self.notes))

    def readyz(self) -> Verdict:
        return readiness(self.component, dict(self.conditions), dict(self.notes))
