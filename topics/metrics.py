"""Prometheus metrics without a dependency: counters, gauges, histograms, labelled families.

The text exposition format is simple enough that a hundred lines beat another package
on every node. It lives here, in the shared contract, because every process (enforcer,
processor, watchers) exposes its metrics the same way and `topics` is the one package
they may all import; it is pure (string formatting, no I/O): serving it is the
composition root's job (`portcullis.observe`).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)


class Metric(Protocol):
    def expose(self) -> list[str]: ...


@dataclass
class Counter:
    name: str
    help: str
    value: float = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount

    def expose(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} counter",
                f"{self.name} {_num(self.value)}"]


@dataclass
class Gauge:
    name: str
    help: str
    value: float = 0.0

    def set(self, value: float) -> None:
        self.value = value

    def expose(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} gauge",
                f"{self.name} {_num(self.value)}"]


@dataclass
class Family:
    """Series of one counter or gauge told apart by labels (``topic``, ``partition``…)."""

    name: str
    help: str
    labels: tuple[str, ...]
    kind: str = "counter"
    values: dict[tuple[str, ...], float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in ("counter", "gauge"):
            raise ValueError(f"{self.name}: kind must be counter or gauge, not {self.kind!r}")

    def _key(self, labels: Mapping[str, object]) -> tuple[str, ...]:
        if set(labels) != set(self.labels):
            raise ValueError(f"{self.name}: labels {sorted(labels)} != {sorted(self.labels)}")
        return tuple(str(labels[name]) for name in self.labels)

    def inc(self, amount: float = 1.0, **labels: object) -> None:
        key = self._key(labels)
        self.values[key] = self.values.get(key, 0.0) + amount

    def set(self, value: float, **labels: object) -> None:
        self.values[self._key(labels)] = value

    def remove(self, **labels: object) -> None:
        self.values.pop(self._key(labels), None)

    def get(self, **labels: object) -> float | None:
        return self.values.get(self._key(labels))

    def expose(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]
        for key, value in sorted(list(self.values.items())):  # a copy: other threads read
            pairs = ",".join(f'{n}="{_escape(v)}"' for n, v in zip(self.labels, key, strict=True))
            lines.append(f"{self.name}{{{pairs}}} {_num(value)}")
        return lines


@dataclass
class Histogram:
    name: str
    help: str
    buckets: tuple[float, ...] = LATENCY_BUCKETS
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    n: int = 0
    samples: list[float] = field(default_factory=list)
    keep_samples: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * len(self.buckets)

    def observe(self, value: float) -> None:
        index = bisect.bisect_left(self.buckets, value)
        if index < len(self.counts):
            self.counts[index] += 1
        self.total += value
        self.n += 1
        if self.keep_samples and len(self.samples) < self.keep_samples:
            self.samples.append(value)

    def expose(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        running = 0
        for bound, count in zip(self.buckets, self.counts, strict=True):
            running += count
            lines.append(f'{self.name}_bucket{{le="{_num(bound)}"}} {running}')
        lines.append(f'{self.name}_bucket{{le="+Inf"}} {self.n}')
        lines.append(f"{self.name}_sum {_num(self.total)}")
        lines.append(f"{self.name}_count {self.n}")
        return lines


def exposition(metrics: Iterable[Metric]) -> str:
    """The text exposition of these metrics (``GET /metrics``'s body)."""
    lines: list[str] = []
    for metric in metrics:
        lines += metric.expose()
    return "\n".join(lines) + "\n"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _num(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if math.isnan(value):
        return "NaN"
    return repr(float(value)) if not float(value).is_integer() else str(int(value))
