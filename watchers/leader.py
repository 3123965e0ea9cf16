"""Leader election over a Lease, as client-go's leaderelection decides it: the pure core.

A candidate reads the lease, notes *when it first saw* the current version (its own
clock: never the holder's ``renewTime``, so clock skew between pods does not matter),
and decides:

* no lease: **acquire** (create it);
* held by someone else, whose version this candidate saw less than ``leaseDuration``
  ago: **stand by**;
* held by itself: **renew**;
* held by no one, or by someone silent for ``leaseDuration``: **acquire** (take over,
  ``leaseTransitions`` + 1).

A write is a compare-and-swap on the version read (the adapter sends
``resourceVersion``; 409 Conflict is a lost race). After a successful write a leader
believes it leads until ``decided_at + renew_deadline``; with ``renew_deadline <
lease_duration`` it stops before anyone can take over, since every other candidate
waits a full ``lease_duration`` from a moment after that write.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal


@dataclass(frozen=True)
class Timing:
    """client-go's defaults: 15 s lease, 10 s renew deadline, 2 s retry period."""

    lease_duration: float = 15.0
    renew_deadline: float = 10.0
    retry_period: float = 2.0

    def __post_init__(self) -> None:
        if not 0 < self.retry_period < self.renew_deadline < self.lease_duration:
            raise ValueError(
                "leader election needs 0 < retry period < renew deadline < lease duration, "
                f"got {self.retry_period:g} / {self.renew_deadline:g} / {self.lease_duration:g}")


@dataclass(frozen=True)
class LeaseRecord:
    """The lease's spec as the election uses it (times are the adapter's strings)."""

    holder: str | None
    duration: float
    acquire_time: str | None = None
    renew_time: str | None = None
    transitions: int = 0


@dataclass(frozen=True)
class Observed:
    """A candidate's view: the lease's version and when this candidate first saw it."""

    version: str | None  # None: there is no lease
    record: LeaseRecord | None
    seen_at: float


@dataclass(frozen=True)
class Decision:
    action: Literal["acquire", "renew", "standby"]
    record: LeaseRecord | None  # what to write (acquire, renew); None: stand by
    holder: str | None  # who holds it after the decision
    expires_at: float | None = None  # standby: when this candidate may try to take over


def observe(previous: Observed | None, version: str | None, record: LeaseRecord | None,
            now: float) -> Observed:
    """The new view after a read: `seen_at` moves only when the version changed."""
    if previous is not None and previous.version == version and version is not None:
        return replace(previous, record=record)
    return Observed(version, record, now)


def decide(view: Observed, now: float, me: str, timing: Timing, stamp: str) -> Decision:
    """Acquire, renew or stand by, given this candidate's view (`stamp`: `now` spelled for
    the lease's acquireTime/renewTime)."""
    if not me:
        raise ValueError("a candidate needs an identity")
    record = view.record
    if record is None:
        return Decision("acquire", LeaseRecord(me, timing.lease_duration, stamp, stamp, 0), me)
    if record.holder == me:
        renewed = replace(record, renew_time=stamp, duration=timing.lease_duration)
        return Decision("renew", renewed, me)
    expires_at = view.seen_at + record.duration
    if record.holder and now < expires_at:
        return Decision("standby", None, record.holder, expires_at)
    taken = LeaseRecord(me, timing.lease_duration, stamp, stamp, record.transitions + 1)
    return Decision("acquire", taken, me)


def leads_until(decided_at: float, timing: Timing) -> float:
    """After a successful write decided at `decided_at`: the end of this term, unless renewed."""
    return decided_at + timing.renew_deadline
