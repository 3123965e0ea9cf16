"""Leader election for the Kubernetes watcher: a coordination.k8s.io/v1 Lease (the adapter).

`watchers.leader` decides; this reads and writes the Lease with the real client, a
write being a compare-and-swap on ``metadata.resourceVersion`` (409 Conflict: another
candidate won the race). A leader's term ends ``renew_deadline`` after the last
successful renew was decided, on its own clock, whether or not the API answers: the
``on_lost`` callback runs then at the latest, before another candidate may take over.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import aiohttp
import orjson
from kubernetes_asyncio import client as k8s

from watchers.leader import LeaseRecord, Observed, Timing, decide, leads_until, observe

log = logging.getLogger(__name__)

NAMESPACE_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"


def default_namespace(path: str = NAMESPACE_FILE) -> str:
    """The pod's namespace (from its service account mount), else ``portcullis``."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().strip() or "portcullis"
    except OSError:
        return "portcullis"


def default_identity() -> str:
    """The pod's name (HOSTNAME) and a random suffix: a restarted pod is a new candidate."""
    host = os.environ.get("HOSTNAME") or os.uname().nodename or "watcher"
    return f"{host}_{secrets.token_hex(4)}"


def micro_time(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _record(lease: dict[str, Any]) -> LeaseRecord:
    spec = lease.get("spec") or {}
    return LeaseRecord(
        holder=spec.get("holderIdentity") or None,
        duration=float(spec.get("leaseDurationSeconds") or 0),
        acquire_time=spec.get("acquireTime"),
        renew_time=spec.get("renewTime"),
        transitions=int(spec.get("leaseTransitions") or 0),
    )


def _body(name: str, namespace: str, version: str | None, rec: LeaseRecord) -> dict[str, Any]:
    metadata: dict[str, Any] = {"name": name, "namespace": namespace}
    if version is not None:
        metadata["resourceVersion"] = version
    return {
        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": metadata,
        "spec": {"holderIdentity": rec.holder,
                 "leaseDurationSeconds": max(1, round(rec.duration)),
                 "acquireTime": rec.acquire_time, "renewTime": rec.renew_time,
                 "leaseTransitions": rec.transitions},
    }


class LeaseError(RuntimeError):
    """The API refused a lease request for another reason than a lost race."""


class LeaderElector:
    """Campaigns for the lease until cancelled; `leading` is set while this candidate leads."""

    def __init__(
        self, api: k8s.ApiClient, namespace: str, name: str, identity: str,
        timing: Timing | None = None, *,
        on_lost: Callable[[], None] | None = None,
        on_beat: Callable[[], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.coordination = k8s.CoordinationV1Api(api)
        self.namespace, self.name, self.identity = namespace, name, identity
        self.timing = timing or Timing()
        self.on_lost = on_lost
        self.on_beat = on_beat
        self.clock = clock
        self.leading = asyncio.Event()
        self.state = "candidate"  # candidate (not read yet), leader, standby
        self.holder: str | None = None
        self.terms = 0
        self._view: Observed | None = None
        self._until = float("-inf")

    def describe(self) -> str:
        if self.state == "leader":
            return f"leader ({self.identity}), publishing"
        if self.state == "standby":
            return (f"standby ({self.identity}), not publishing; lease {self.namespace}/"
                    f"{self.name} held by {self.holder}")
        return f"candidate ({self.identity}), lease {self.namespace}/{self.name} not read yet"

    async def run(self) -> None:
        """Try to acquire or renew every retry period; end a term on time."""
        while True:
            if self.on_beat is not None:
                self.on_beat()
            leading = self.state == "leader"
            budget = self._until - self.clock() if leading else self.timing.renew_deadline
            try:
                await asyncio.wait_for(self._try(), max(0.0, budget))
            except TimeoutError:
                log.warning("lease %s/%s: no answer in time", self.namespace, self.name)
            except (aiohttp.ClientError, LeaseError, OSError, ValueError) as exc:
                log.warning("lease %s/%s: %s", self.namespace, self.name, exc)
            if self.state == "leader" and self.clock() >= self._until:
                self._lose("could not renew the lease before the renew deadline")
            wait = self.timing.retry_period
            if self.state == "leader":
                wait = min(wait, max(0.0, self._until - self.clock()))
            await asyncio.sleep(wait)

    async def _try(self) -> None:
        decided_at = self.clock()  # before the read: a term never outlasts what it saw
        version, record = await self._read()
        seen_at = self.clock()  # after the read: a version written during it is not older
        self._view = observe(self._view, version, record, seen_at)
        decision = decide(self._view, seen_at, self.identity, self.timing,
                          micro_time(time.time()))
        if decision.action == "standby":
            self.holder = decision.holder
            if self.state == "leader":
                self._lose(f"the lease is held by {decision.holder}")
            self.state = "standby"
            return
        assert decision.record is not None
        if not await self._write(version, decision.record):
            log.info("lease %s/%s: lost a race to another candidate", self.namespace, self.name)
            return  # the next read tells who won; a leader's term still ends on time
        self._until = leads_until(decided_at, self.timing)
        self.holder = self.identity
        if self.state != "leader":
            self.state = "leader"
            self.terms += 1
            log.info("lease %s/%s: acquired by %s: leading", self.namespace, self.name,
                     self.identity)
            self.leading.set()

    async def release(self) -> bool:
        """Give the lease up (the caller stopped publishing first), so a standby takes
        over at once instead of after a lease duration. True if it was ours and is free."""
        if self.state != "leader":
            return False
        self._lose("released")
        version, record = await self._read()
        if record is None or record.holder != self.identity or version is None:
            return False
        stamp = micro_time(time.time())
        freed = LeaseRecord(None, 1.0, record.acquire_time, stamp, record.transitions)
        released = await self._write(version, freed)
        if released:
            log.info("lease %s/%s: released", self.namespace, self.name)
        return released

    def _lose(self, why: str) -> None:
        """End the term now: the callback stops publishing before anyone can take over."""
        log.warning("lease %s/%s: leadership lost (%s): standing by", self.namespace,
                    self.name, why)
        self.state = "standby"
        self.leading.clear()
        self._until = float("-inf")
        if self.on_lost is not None:
            self.on_lost()

    async def _read(self) -> tuple[str | None, LeaseRecord | None]:
        resp: Any = await self.coordination.read_namespaced_lease(
            self.name, self.namespace, _preload_content=False,
            _request_timeout=self.timing.renew_deadline)
        try:
            body = await resp.read()
            status = resp.status
        finally:
            resp.release()
        if status == 404:
            return None, None
        if status != 200:
            raise LeaseError(f"reading the lease: HTTP {status}: {body[:200]!r}")
        lease = orjson.loads(body)
        version = (lease.get("metadata") or {}).get("resourceVersion")
        if not version:
            raise LeaseError("the lease has no metadata.resourceVersion")
        return str(version), _record(lease)

    async def _write(self, version: str | None, record: LeaseRecord) -> bool:
        """Create (no version) or replace at `version`; False when another write came first."""
        body: Any = _body(self.name, self.namespace, version, record)  # a dict serialises as is
        kwargs: dict[str, Any] = {"_preload_content": False,
                                  "_request_timeout": self.timing.renew_deadline}
        resp: Any
        if version is None:
            resp = await self.coordination.create_namespaced_lease(self.namespace, body, **kwargs)
        else:
            resp = await self.coordination.replace_namespaced_lease(
                self.name, self.namespace, body, **kwargs)
        try:
            text = await resp.read()
            status = resp.status
        finally:
            resp.release()
        if status == 409:
            return False
        if not 200 <= status < 300:
            raise LeaseError(f"writing the lease: HTTP {status}: {text[:200]!r}")
        return True
