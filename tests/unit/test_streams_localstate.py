"""Crash bookkeeping of local tables: a crash never loses a member key that may be wrong."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from streams.localstate import MARKER, FlushToken, LocalState

KEYS = [f"s:u{i}|pod/ns/p{i}" for i in range(6)]


def test_first_start_has_no_suspects(tmp_path: Path) -> None:
    state = LocalState(tmp_path)
    assert state.open() == set()
    assert (tmp_path / MARKER).exists()


def test_clean_stop_leaves_nothing_to_republish(tmp_path: Path) -> None:
    state = LocalState(tmp_path)
    state.open()
    state.note(KEYS[0].encode())
    state.close_cleanly()
    assert not (tmp_path / MARKER).exists()
    assert LocalState(tmp_path).open() == set()


def test_crash_makes_unflushed_writes_suspects(tmp_path: Path) -> None:
    state = LocalState(tmp_path)
    state.open()
    state.note(KEYS[0].encode())
    state.queued([KEYS[0].encode()])
    token = state.begin_flush()
    state.note(KEYS[1].encode())  # written while the flush runs: not covered by it
    state.queued([KEYS[1].encode()])
    state.end_flush(token)
    state.note(KEYS[2].encode())
    # SIGKILL: no close_cleanly
    assert LocalState(tmp_path).open() == {KEYS[1], KEYS[2]}


def test_suspects_survive_until_republished_and_flushed(tmp_path: Path) -> None:
    state = LocalState(tmp_path)
    state.open()
    state.note(KEYS[0].encode())
    again = LocalState(tmp_path)
    assert again.open() == {KEYS[0]}
    again.close_cleanly()  # stopped before republishing: still suspect
    third = LocalState(tmp_path)
    assert third.open() == {KEYS[0]}
    early = third.begin_flush()  # began before the republish: does not settle it
    third.settle([KEYS[0]])
    third.end_flush(early)
    assert third.suspects == {KEYS[0]}
    third.end_flush(third.begin_flush())
    assert third.suspects == set()
    third.close_cleanly()
    assert LocalState(tmp_path).open() == set()


def test_torn_last_line_is_ignored(tmp_path: Path) -> None:
    state = LocalState(tmp_path)
    state.open()
    state.note(KEYS[0].encode())
    log = next((tmp_path / "intents").glob("*.log"))
    with log.open("ab") as f:
        f.write(b"s:half-written")
    assert LocalState(tmp_path).open() == {KEYS[0]}


def test_a_write_not_queued_when_a_flush_begins_stays_noted(tmp_path: Path) -> None:
    """A flush covers what is in the producer when it begins: a write still waiting for
    room there (noted, stored, not queued) must outlive that flush's end."""
    state = LocalState(tmp_path)
    state.open()
    state.note(KEYS[0].encode())
    state.note(KEYS[1].encode())
    state.queued([KEYS[0].encode()])
    token = state.begin_flush()  # KEYS[1] is still waiting for the producer
    state.queued([KEYS[1].encode()])
    state.end_flush(token)
    # SIGKILL before a later flush: KEYS[1] may never have reached the topic
    assert LocalState(tmp_path).open() == {KEYS[1]}


# A sequence of operations, against an oracle of what a crash may have left wrong.
OPS = st.lists(
    st.one_of(
        st.tuples(st.just("note"), st.sampled_from(KEYS)),
        st.tuples(st.just("queue"), st.sampled_from(KEYS)),
        st.tuples(st.just("begin"), st.just("")),
        st.tuples(st.just("end"), st.just("")),
        st.tuples(st.just("settle"), st.sampled_from(KEYS)),
        st.tuples(st.just("crash"), st.just("")),
        st.tuples(st.just("restart"), st.just("")),
    ),
    max_size=40,
)


@dataclass
class Write:
    """The oracle's view of one noted members write."""

    key: str
    queued_at: int | None = None  # when its changelog record went into the producer


@settings(max_examples=300, deadline=None)
@given(OPS)
def test_suspects_cover_every_write_not_made_durable(ops: list[tuple[str, str]]) -> None:
    """After any crash, every key of a write not queued before the start of a flush that
    completed is a suspect; a suspect disappears only when republished and then flushed."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        state = LocalState(root)
        state.open()
        pending: list[Write] = []  # oracle: writes not made durable yet
        suspects: set[str] = set()  # oracle: keys that must be republished
        settled: dict[str, int] = {}  # republished suspects -> when
        flushes: list[tuple[FlushToken, int]] = []
        for clock, (op, key) in enumerate(ops, start=1):
            if op == "note":
                state.note(key.encode())
                pending.append(Write(key))
            elif op == "queue":
                waiting = [w for w in pending if w.key == key and w.queued_at is None]
                if waiting:  # the processor queues only what it noted
                    state.queued([key.encode()])
                    waiting[0].queued_at = clock
            elif op == "begin":
                flushes.append((state.begin_flush(), clock))
            elif op == "end" and flushes:
                token, began = flushes.pop(0)
                state.end_flush(token)
                pending = [w for w in pending if w.queued_at is None or w.queued_at > began]
                suspects -= {k for k, t in settled.items() if t < began}
                settled = {k: t for k, t in settled.items() if t > began}
            elif op == "settle" and key in state.suspects:
                state.settle([key])
                settled.setdefault(key, clock)
            elif op in ("crash", "restart"):
                if op == "restart" and not flushes:
                    state.queued([w.key.encode() for w in pending if w.queued_at is None])
                    state.end_flush(state.begin_flush())  # the final flush of a clean stop
                    pending.clear()
                    suspects -= set(settled)
                    state.close_cleanly()
                suspects |= {w.key for w in pending}
                pending.clear()
                settled.clear()
                flushes.clear()
                state = LocalState(root)
                found = state.open()
                assert suspects <= found
                suspects = found  # the bookkeeping may keep a key one flush longer
        assert suspects <= state.suspects | {w.key for w in pending} | set(settled)
