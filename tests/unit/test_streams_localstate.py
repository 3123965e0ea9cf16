"""The local table state guard: stray disk state from a crashed worker is discarded."""

from __future__ import annotations

from pathlib import Path

from streams.localstate import MARKER, LocalStateGuard


def make_tables(root: Path) -> Path:
    tables = root / "app-data" / "v1" / "tables"
    (tables / "members-0.db").mkdir(parents=True)
    (tables / "members-0.db" / "000001.sst").write_bytes(b"rows")
    return tables


def test_first_start_keeps_state_and_marks_it(tmp_path: Path) -> None:
    tables = make_tables(tmp_path)
    guard = LocalStateGuard(tables)
    assert guard.open() is False
    assert (tables / "members-0.db" / "000001.sst").exists()
    assert (tables.parent / MARKER).exists()


def test_clean_stop_keeps_state_for_next_start(tmp_path: Path) -> None:
    tables = make_tables(tmp_path)
    LocalStateGuard(tables).open()
    LocalStateGuard(tables).close_cleanly()
    assert not (tables.parent / MARKER).exists()
    assert LocalStateGuard(tables).open() is False
    assert (tables / "members-0.db" / "000001.sst").exists()


def test_start_after_crash_discards_local_tables(tmp_path: Path) -> None:
    tables = make_tables(tmp_path)
    LocalStateGuard(tables).open()  # the worker is killed: no close_cleanly
    assert LocalStateGuard(tables).open() is True
    assert not tables.exists()
    assert (tables.parent / MARKER).exists()  # the new worker marks it again


def test_start_after_crash_without_tables(tmp_path: Path) -> None:
    tables = tmp_path / "app-data" / "v1" / "tables"
    LocalStateGuard(tables).open()
    assert LocalStateGuard(tables).open() is False
