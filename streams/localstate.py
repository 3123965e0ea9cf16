"""Crash bookkeeping for a worker's local (rocksdb) tables, so a crash costs no full replay.

Faust's rocksdb store writes a table row to disk at once and sends it to the changelog
later, from the producer. A worker killed in between (SIGKILL, OOM) leaves rows on disk
that no changelog holds; Faust then replays only the changelog's tail on top of them, so
they survive. For the input tables that is harmless: the event that wrote the row was
not committed either, so it is processed again and rewrites (or re-tombstones) the row.
For the ``members`` table it is not: a member deleted on disk whose tombstone was never
produced stays on the memberships topic for ever, because the table says there is
nothing to delete.

So every write to ``members`` first names its key in an *intent log* on disk. A producer
flush makes every write durable that was *queued* in the producer when it began, so the
log is rotated when a flush starts and the rotated file is deleted when it ends; a key
noted but not yet queued at that moment (its sender was waiting for the producer's
buffer) is written again to the new log, as the flush does not cover it. A marker file
says a worker is running; a start that finds it (the last run crashed) turns the keys
left in intent logs into *suspects*, kept in a file until the processor has republished
each one from the inputs (an upsert if it is a member, a tombstone if not) and a flush
has made that durable.

The alternative, discarding the local tables after a crash, is also correct but turns
every crash into a full replay of the memberships topic (hundreds of thousands of
records at 20,000 endpoints): tens of seconds instead of a few.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

__all__ = ["FlushToken", "LocalState"]

log = logging.getLogger("portcullis.streams")

MARKER = "portcullis-running"
INTENTS = "intents"
SUSPECTS = "suspects"


@dataclass(frozen=True)
class FlushToken:
    """What a producer flush makes durable: intent logs up to `generation`, `settled` keys."""

    generation: int
    settled: frozenset[str]


class LocalState:
    """The running marker, the intent logs and the suspects of one worker's state directory.

    Not thread-safe: used from the worker's event loop only.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.marker = root / MARKER
        self.intents_dir = root / INTENTS
        self.suspects_path = root / SUSPECTS
        self.suspects: set[str] = set()
        self._generation = 0
        self._fd: int | None = None
        self._settled: set[str] = set()  # republished; forgotten after a later flush
        self._unqueued: dict[bytes, int] = {}  # noted, not yet in the producer: how often

    # ------------------------------------------------------------------ lifecycle

    def open(self) -> set[str]:
        """Start bookkeeping; return the member keys the last run may have left wrong."""
        self.intents_dir.mkdir(parents=True, exist_ok=True)
        self.suspects = set(_read_keys(self.suspects_path))
        logs = sorted(self.intents_dir.glob("*.log"), key=_generation_of)
        if self.marker.exists():
            crashed = set()
            for path in logs:
                crashed.update(_read_keys(path))
            previous = self.marker.read_text(errors="replace").strip() or "unknown"
            log.warning(
                "the previous worker (pid %s) did not stop cleanly: %d member keys written "
                "since its last flush will be republished from the inputs",
                previous, len(crashed),
            )
            self.suspects |= crashed
            _write_keys(self.suspects_path, self.suspects)
        for path in logs:
            path.unlink()
        self._generation = max((_generation_of(p) for p in logs), default=0) + 1
        self._fd = self._open_log(self._generation)
        self.marker.write_text(f"{os.getpid()}\n")
        return set(self.suspects)

    def close_cleanly(self) -> None:
        """The worker stopped after a final flush: nothing it wrote is pending."""
        self._close_log()
        for path in self.intents_dir.glob("*.log"):
            path.unlink()
        self.marker.unlink(missing_ok=True)

    # ------------------------------------------------------------------ writes and flushes

    def note(self, key: bytes) -> None:
        """About to write `key` to the members table (call before the local write).

        Call `queued` once its changelog record is in the producer.
        """
        if self._fd is None:
            raise RuntimeError("LocalState.note before open")
        os.write(self._fd, key + b"\n")
        self._unqueued[key] = self._unqueued.get(key, 0) + 1

    def queued(self, keys: Iterable[bytes]) -> None:
        """The changelog records of these noted writes are in the producer now."""
        unqueued = self._unqueued
        for key in keys:
            left = unqueued.get(key, 0) - 1
            if left > 0:
                unqueued[key] = left
            else:
                unqueued.pop(key, None)

    def begin_flush(self) -> FlushToken:
        """A producer flush starts: later writes go to a new intent log.

        Pass the token to `end_flush` when that flush has completed: every write noted
        and queued before it, and every republished suspect settled before it, is then
        durable. Writes noted but not queued yet are noted again in the new log.
        """
        token = FlushToken(self._generation, frozenset(self._settled))
        self._close_log()
        self._generation += 1
        self._fd = self._open_log(self._generation)
        if self._unqueued:
            os.write(self._fd, b"".join(key + b"\n" for key in self._unqueued))
        return token

    def end_flush(self, token: FlushToken) -> None:
        """The flush that `begin_flush` returned `token` for has completed."""
        for path in self.intents_dir.glob("*.log"):
            if _generation_of(path) <= token.generation:
                path.unlink(missing_ok=True)
        done = token.settled & self.suspects
        self._settled -= token.settled
        if done:
            self.suspects -= done
            _write_keys(self.suspects_path, self.suspects)

    def settle(self, keys: Iterable[str]) -> None:
        """These suspects were republished: forget them once a later flush has completed."""
        self._settled.update(key for key in keys if key in self.suspects)

    # ------------------------------------------------------------------ files

    def _open_log(self, generation: int) -> int:
        path = self.intents_dir / f"{generation:012d}.log"
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)

    def _close_log(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None


def _generation_of(path: Path) -> int:
    try:
        return int(path.stem)
    except ValueError:
        return 0


def _read_keys(path: Path) -> list[str]:
    """Keys of an intent or suspects file; a torn last line (crash mid-write) is dropped."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    lines = data.split(b"\n")
    if data and not data.endswith(b"\n"):
        lines = lines[:-1]  # the write that was torn never reached the table either
    return [line.decode(errors="replace") for line in lines if line]


def _write_keys(path: Path, keys: Iterable[str]) -> None:
    """Replace `path` atomically with `keys`, one per line."""
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(b"".join(key.encode() + b"\n" for key in sorted(keys)))
    os.replace(tmp, path)
