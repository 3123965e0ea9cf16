"""Rows as a kubectl-style table: one column per key of the first row, padded, 3 spaces apart."""

from __future__ import annotations

from collections.abc import Mapping, Sequence


def table(rows: Sequence[Mapping[str, str]]) -> str:
    """The rows under a header line; empty text for no rows."""
    if not rows:
        return ""
    headers = list(rows[0])
    widths = {h: max(len(h), *(len(r[h]) for r in rows)) for h in headers}
    lines = ["   ".join(h.ljust(widths[h]) for h in headers).rstrip()]
    lines += ["   ".join(r[h].ljust(widths[h]) for h in headers).rstrip() for r in rows]
    return "\n".join(lines) + "\n"
