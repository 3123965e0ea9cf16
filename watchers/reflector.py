"""Glue between watched objects and the topics: translate, dedupe against the mirror, publish.

One `Reflector` serves every resource watcher. Each resource owns its keys in
the mirror, so a relist of pods only ever tombstones pod endpoints. The mirror
is committed only after Kafka acknowledged, so a failed publish is retried by
the relist that follows it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from watchers.metrics import WatchMetrics
from watchers.mirror import Mirror, Publication
from watchers.publisher import Publisher
from watchers.translate import TranslationError, object_id

log = logging.getLogger(__name__)


#: ``translator(obj, observed_at, deleted=...)``: see `watchers.translate`.
Translator = Callable[..., Publication | list[Publication]]


class _Named(Protocol):
    @property
    def name(self) -> str: ...


def _as_list(out: Publication | list[Publication]) -> list[Publication]:
    return [out] if isinstance(out, Publication) else list(out)


class Reflector:
    """Implements `watchers.kubernetes.Handler` for any set of translators."""

    def __init__(
        self,
        translators: Mapping[str, Translator],
        publisher: Publisher,
        mirror: Mirror | None = None,
        clock: Callable[[], float] = time.time,
        metrics: WatchMetrics | None = None,
    ) -> None:
        self.metrics = metrics
        self.translators = dict(translators)
        self.publisher = publisher
        self.mirror = mirror or Mirror()
        self.clock = clock
        self.rejected = 0
        self._lock = asyncio.Lock()

    def _translate(
        self, resource: str, obj: Mapping[str, Any], observed_at: float, deleted: bool
    ) -> list[Publication] | None:
        try:
            return _as_list(self.translators[resource](obj, observed_at, deleted=deleted))
        except (TranslationError, ValueError) as exc:  # RecordError is a ValueError too
            self.rejected += 1
            if self.metrics is not None:
                self.metrics.rejected.inc()
            log.error(
                "%s %s: not published, last valid state kept: %s", resource, _safe_id(obj), exc
            )
            return None

    async def snapshot(self, resource: _Named, items: list[dict[str, Any]]) -> None:
        observed_at = self.clock()
        pubs: list[Publication] = []
        keep: set[tuple[str, str]] = set()
        for obj in items:
            out = self._translate(resource.name, obj, observed_at, False)
            if out is None:  # invalid: keep whatever we published for it before
                ids = self._translate(resource.name, obj, observed_at, True) or []
                keep.update(p.slot for p in ids)
                continue
            pubs.extend(out)
        async with self._lock:
            changes = self.mirror.snapshot_changes(resource.name, pubs, keep=keep)
            await self.publisher.publish(changes)
            self.mirror.commit(resource.name, changes)
        if changes:
            log.info("%s: relist published %d change(s)", resource.name, len(changes))

    async def events(self, resource: _Named, events: Sequence[tuple[str, dict[str, Any]]]) -> None:
        observed_at = self.clock()
        pubs: list[Publication] = []
        for kind, obj in events:
            out = self._translate(resource.name, obj, observed_at, kind == "DELETED")
            if out is not None:
                pubs.extend(out)
        async with self._lock:
            changes = self.mirror.changes(pubs)
            await self.publisher.publish(changes)
            self.mirror.commit(resource.name, changes)


def _safe_id(obj: Mapping[str, Any]) -> str:
    try:
        return object_id(obj)
    except TranslationError:
        return "<unnamed>"
