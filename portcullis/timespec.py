"""Times on the command line: ISO 8601, epoch seconds, or how long ago (`10m`, `2h`, `7d`)."""

from __future__ import annotations

import datetime as dt
import re

_AGO_RE = re.compile(r"^(?P<n>\d+(?:\.\d+)?)(?P<unit>[smhd])(?:\s*ago)?$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


class TimeSpecError(ValueError):
    """Not a time this module reads; the message gives the accepted forms."""


def parse_time(text: str, now: float) -> float:
    """Epoch seconds for `text`: ``now``, a duration ago, epoch seconds (``@1700000000`` or a
    bare number), or ISO 8601 (a time without a zone is UTC)."""
    value = text.strip()
    if value == "now":
        return now
    match = _AGO_RE.match(value)
    if match:
        return now - float(match["n"]) * _UNITS[match["unit"]]
    number = value[1:] if value.startswith("@") else value
    try:
        return float(number)
    except ValueError:
        pass
    try:
        when = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise TimeSpecError(
            f"not a time: {text!r} (use ISO 8601 like 2026-12-07T05:30:00Z, epoch seconds "
            "like @1796000000, or a duration ago like 90s, 10m, 2h, 7d)"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return when.timestamp()


def format_time(seconds: float) -> str:
    """ISO 8601 in UTC, to the millisecond."""
    when = dt.datetime.fromtimestamp(seconds, dt.UTC)
    return when.isoformat(timespec="milliseconds").replace("+00:00", "Z")
