"""The connection table as text: aligned columns, ✔/✘, colours only on a terminal. Pure."""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass

ALLOW, DENY, UNKNOWN = "✔", "✘", "·"

_COLOURS = {"green": "32", "red": "31", "yellow": "33", "bold": "1", "dim": "2"}


@dataclass(frozen=True)
class Row:
    source: str
    destination: str
    expected: bool  # what policy.verdict says
    observed: bool | None  # what the dataplane did (None: not checked)
    why: str
    changed: bool = False  # differs from the previous table

    @property
    def disagrees(self) -> bool:
        return self.observed is not None and self.observed != self.expected


class Style:
    """ANSI colours when `enabled` (stdout is a terminal), plain text otherwise."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled

    def __call__(self, text: str, *colours: str) -> str:
        if not self.enabled or not colours:
            return text
        codes = ";".join(_COLOURS[c] for c in colours)
        return f"\033[{codes}m{text}\033[0m"


def width(text: str) -> int:
    """Display width (✔ and ✘ are one column; East Asian wide characters two)."""
    return sum(2 if unicodedata.east_asian_width(ch) in "WF" else 1 for ch in text)


def _pad(text: str, size: int) -> str:
    return text + " " * max(0, size - width(text))


def mark(allowed: bool | None, style: Style) -> str:
    if allowed is None:
        return style(UNKNOWN, "dim")
    return style(ALLOW, "green", "bold") if allowed else style(DENY, "red", "bold")


def render(rows: Sequence[Row], style: Style, observed_title: str = "REAL TCP") -> list[str]:
    """The table's lines; a row whose outcome disagrees with policy says so."""
    headers = ("SOURCE", "DESTINATION", "POLICY", observed_title, "WHY (tier · policy · rule)")
    cells = [
        (r.source, r.destination, "allow" if r.expected else "deny",
         "—" if r.observed is None else ("open" if r.observed else "blocked"), r.why)
        for r in rows
    ]
    widths = [max([width(h)] + [width(c[i]) for c in cells]) for i, h in enumerate(headers[:4])]
    lines = [
        "  " + "  ".join(_pad(h, w + (2 if i in (2, 3) else 0)) for i, (h, w) in
                         enumerate(zip(headers[:4], widths, strict=True))) + "  " + headers[4]
    ]
    lines[0] = style(lines[0], "bold")
    previous_source = None
    for row, cell in zip(rows, cells, strict=True):
        source = cell[0] if cell[0] != previous_source else ""
        previous_source = cell[0]
        expected = mark(row.expected, style) + " " + _pad(cell[2], widths[2])
        observed = mark(row.observed, style) + " " + _pad(cell[3], widths[3])
        flag = "→ " if row.changed else "  "
        line = (f"{style(flag, 'yellow', 'bold')}{_pad(source, widths[0])}  "
                f"{_pad(cell[1], widths[1])}  {expected}  {observed}  {style(cell[4], 'dim')}")
        if row.disagrees:
            line += "  " + style("⚠ DATAPLANE DISAGREES WITH POLICY", "yellow", "bold")
        lines.append(line)
    return lines


def summary(rows: Sequence[Row]) -> str:
    allowed = sum(r.expected for r in rows)
    checked = [r for r in rows if r.observed is not None]
    text = f"{len(rows)} connections: {allowed} allowed, {len(rows) - allowed} denied by policy"
    if checked:
        wrong = sum(r.disagrees for r in checked)
        text += (f"; {len(checked)} checked, "
                 + ("all as policy says" if not wrong else f"{wrong} DISAGREE with policy"))
    return text
