"""Local table state is a cache of the changelogs, trusted only after a clean stop.

Faust's rocksdb store writes a table change to disk at once, but sends it to the
changelog topic later, from the producer buffer. A worker killed in between (SIGKILL,
OOM, power loss) leaves rows on disk that no changelog holds. After a restart Faust
replays the changelogs on top of that disk state, so the stray rows survive: for the
``members`` table a member deleted on disk whose tombstone was never produced would stay
on the memberships topic for ever, because the table says there is nothing to delete.

So a marker file says "a worker is running on this state". A clean stop (the producer
flushed, offsets committed) removes it; a start that finds it discards the local tables
and recovers them from the changelogs alone, which are complete by construction.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

__all__ = ["LocalStateGuard"]

log = logging.getLogger("portcullis.streams")

MARKER = "portcullis-running"


class LocalStateGuard:
    """Guards one worker's table directory with a running marker beside it."""

    def __init__(self, table_dir: Path) -> None:
        self.table_dir = table_dir
        self.marker = table_dir.parent / MARKER

    def open(self) -> bool:
        """Mark the state in use; discard it first if the last run did not stop cleanly.

        Returns whether local state was discarded.
        """
        discarded = False
        if self.marker.exists():
            previous = self.marker.read_text(errors="replace").strip() or "unknown"
            if self.table_dir.exists():
                log.warning(
                    "the previous worker (pid %s) did not stop cleanly: discarding local "
                    "tables in %s; they are recovered from their changelogs",
                    previous, self.table_dir,
                )
                shutil.rmtree(self.table_dir)
                discarded = True
        self.marker.parent.mkdir(parents=True, exist_ok=True)
        self.marker.write_text(f"{os.getpid()}\n")
        return discarded

    def close_cleanly(self) -> None:
        """The worker stopped cleanly: its local tables equal the changelogs."""
        self.marker.unlink(missing_ok=True)
