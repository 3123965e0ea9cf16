"""Leader election's pure core against a compare-and-swap store oracle, under any interleaving."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from watchers.leader import (
    Decision,
    LeaseRecord,
    Observed,
    Timing,
    decide,
    leads_until,
    observe,
)

TIMING = Timing(15.0, 10.0, 2.0)


@dataclass
class Store:
    """The API server's lease: one object, a version bumped by every successful write."""

    version: int = 0
    record: LeaseRecord | None = None

    def read(self) -> tuple[str | None, LeaseRecord | None]:
        return (str(self.version) if self.record is not None else None), self.record

    def write(self, expected: str | None, record: LeaseRecord) -> bool:
        current = str(self.version) if self.record is not None else None
        if current != expected:
            return False  # 409 Conflict (or AlreadyExists on create)
        self.version += 1
        self.record = record
        return True


@dataclass
class Candidate:
    name: str
    view: Observed | None = None
    pending: tuple[str | None, Decision, float] | None = None  # read version, decision, when
    leads_until: float = float("-inf")
    terms: list[float] = field(default_factory=list)

    def read(self, store: Store, now: float, took: float = 0.0) -> None:
        """A read answered now that was sent `took` seconds ago: as the adapter does, the
        term counts from when it was sent, the version is seen when the answer came."""
        version, record = store.read()
        self.view = observe(self.view, version, record, now)
        decision = decide(self.view, now, self.name, TIMING, f"t{now}")
        if decision.action == "standby":
            self.leads_until = float("-inf")  # someone else holds it: not the leader
            self.pending = None
        else:
            self.pending = (version, decision, now - took)

    def write(self, store: Store, now: float) -> None:
        if self.pending is None:
            return
        version, decision, decided_at = self.pending
        self.pending = None
        assert decision.record is not None
        if store.write(version, decision.record):
            self.leads_until = leads_until(decided_at, TIMING)
            self.terms.append(decided_at)

    def leads(self, now: float) -> bool:
        return now < self.leads_until


steps = st.lists(
    st.tuples(st.integers(0, 1), st.sampled_from(["try", "try", "read", "write", "wait"]),
              st.sampled_from([0.0, 0.5, 1.0, 2.0, 5.0, 9.5, 10.0, 14.5, 15.0])
              | st.floats(0, 20, allow_nan=False),
              st.sampled_from([0.0, 0.0, 1.0, 4.0, 6.0, 8.0]) | st.floats(0, 8)),
    max_size=60,
)


@settings(max_examples=2000, deadline=None)
@given(steps)
# a slow read must not make the lease look older than it is (seen when answered)
@example([(0, "try", 0.0, 0.0), (1, "read", 0.0, 6.0), (0, "wait", 9.5, 0.0),
          (1, "try", 0.0, 0.0)])
# a takeover waits a whole lease duration; a term ends at the renew deadline
@example([(0, "try", 0.0, 0.0), (1, "read", 0.0, 0.0), (0, "wait", 14.5, 0.0),
          (1, "try", 0.0, 0.0), (0, "wait", 0.5, 0.0), (1, "try", 0.0, 0.0)])
def test_two_candidates_never_both_believe_they_lead(
    script: list[tuple[int, str, float, float]],
) -> None:
    store = Store()
    candidates = [Candidate("a"), Candidate("b")]
    now = 0.0
    for who, op, dt, took in script:
        candidate = candidates[who]
        if op == "wait":
            now += dt
        elif op == "read":
            candidate.read(store, now, took)
        elif op == "try":  # read and write at once, as an uncontended candidate does
            candidate.read(store, now, took)
            candidate.write(store, now)
        else:
            candidate.write(store, now)
        leaders = [c.name for c in candidates if c.leads(now)]
        assert len(leaders) <= 1, (leaders, now, store)


@settings(max_examples=200, deadline=None)
@given(st.floats(0, 1000, allow_nan=False), st.floats(0, 100, allow_nan=False))
def test_a_silent_holder_is_replaced_only_after_a_full_lease_duration(
    seen_at: float, later: float
) -> None:
    view = Observed("7", LeaseRecord("old", 15.0, "x", "x", 3), seen_at)
    decision = decide(view, seen_at + later, "new", TIMING, "now")
    if later < 15.0:
        assert (decision.action, decision.holder, decision.expires_at) == (
            "standby", "old", seen_at + 15.0)
    else:
        assert decision.action == "acquire" and decision.record is not None
        assert (decision.record.holder, decision.record.transitions) == ("new", 4)


def test_a_holder_renews_and_a_new_lease_is_created() -> None:
    mine = Observed("3", LeaseRecord("me", 15.0, "t0", "t1", 2), 100.0)
    renew = decide(mine, 500.0, "me", TIMING, "t9")
    assert renew.action == "renew"
    assert renew.record == LeaseRecord("me", 15.0, "t0", "t9", 2)
    create = decide(Observed(None, None, 0.0), 0.0, "me", TIMING, "t0")
    assert (create.action, create.record) == ("acquire", LeaseRecord("me", 15.0, "t0", "t0", 0))
    released = decide(Observed("4", LeaseRecord(None, 15.0), 10.0), 10.0, "me", TIMING, "t")
    assert released.action == "acquire"


def test_the_view_keeps_when_a_version_was_first_seen() -> None:
    rec = LeaseRecord("a", 15.0)
    first = observe(None, "1", rec, 5.0)
    assert observe(first, "1", rec, 9.0).seen_at == 5.0
    assert observe(first, "2", rec, 9.0).seen_at == 9.0


@pytest.mark.parametrize("timing", [(15, 15, 2), (15, 10, 10), (15, 10, 0)])
def test_timings_that_would_allow_two_leaders_are_refused(timing: tuple[int, int, int]) -> None:
    with pytest.raises(ValueError, match="renew deadline < lease duration"):
        Timing(*timing)
