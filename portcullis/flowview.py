"""What `portcullis flows` shows, the pure part: time arguments, filters, and rendering of
`FlowRecord`s as a table (like kubectl), JSON or YAML."""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import yaml

from portcullis import tables, timespec
from topics.records import FlowRecord


class FlowQueryError(ValueError):
    """A filter argument that cannot be read (the message says which and why)."""


def parse_time(text: str, now: float, flag: str = "--since") -> float:
    """Epoch seconds from an ISO 8601 time (no zone: UTC), ``@epoch``, or a duration before
    `now` (``90s``, ``10m``, ``2h``, ``1d``): `portcullis.timespec`, with the flag named."""
    try:
        return timespec.parse_time(text, now)
    except timespec.TimeSpecError:
        raise FlowQueryError(f"{flag} {text!r}: expected an ISO time (2024-05-01T12:00:00Z), "
                             "@epoch, or a duration before now (90s, 10m, 2h, 1d)") from None


def _network(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network | None:
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        return None


def _peer_matches(wanted: str, ip: str, endpoint: str | None) -> bool:
    """An endpoint by key (``pod/shop/web-1``), by ``namespace/name`` or by name; or an IP
    or CIDR holding the address."""
    if endpoint is not None and wanted in (endpoint, endpoint.split("/", 1)[-1],
                                           endpoint.rsplit("/", 1)[-1]):
        return True
    network = _network(wanted)
    return network is not None and ipaddress.ip_address(ip) in network


@dataclass(frozen=True)
class FlowFilter:
    """Which records to show: those overlapping [since, until], of this action and node,
    from this source and to this destination (see `_peer_matches`); None: any."""

    since: float | None = None
    until: float | None = None
    action: str | None = None
    node: str | None = None
    source: str | None = None
    dest: str | None = None

    def matches(self, record: FlowRecord) -> bool:
        return ((self.since is None or record.end >= self.since)
                and (self.until is None or record.start <= self.until)
                and (self.action is None or record.action == self.action)
                and (self.node is None or record.node == self.node)
                and (self.source is None
                     or _peer_matches(self.source, record.source_ip, record.source_endpoint))
                and (self.dest is None
                     or _peer_matches(self.dest, record.dest_ip, record.dest_endpoint)))


def select(records: Iterable[FlowRecord], flt: FlowFilter) -> list[FlowRecord]:
    """The matching records, oldest first."""
    return sorted((r for r in records if flt.matches(r)), key=lambda r: (r.start, r.end))


def _when(epoch: float) -> str:
    return dt.datetime.fromtimestamp(epoch, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _destination(r: FlowRecord) -> str:
    address = f"[{r.dest_ip}]" if ":" in r.dest_ip else r.dest_ip
    where = address if r.dest_port is None else f"{address}:{r.dest_port}"
    return f"{where} ({r.dest_endpoint})" if r.dest_endpoint else where


def decided_by(r: FlowRecord) -> str:
    """``tier · policy · rule`` when a rule decided, else the tier and the reason."""
    if r.policy is not None:
        parts = [p for p in (r.tier, r.policy, r.rule) if p]
        suffix = "" if r.reason == "rule" else f" ({r.reason})"
        return " · ".join(parts) + suffix
    return f"{r.tier} · {r.reason}" if r.tier else r.reason


def table(records: Sequence[FlowRecord], staged: Sequence[str] | None = None) -> str:
    """One row per record; ``staged``: per record, what it would be with the staged policies
    enforced (an extra column)."""
    if not records:
        return ""
    rows = [{
        "LAST SEEN": _when(r.end),
        "NODE": r.node,
        "ACTION": r.action.upper(),
        "SOURCE": r.source_endpoint or r.source_ip,
        "DESTINATION": _destination(r),
        "PROTO": r.protocol,
        "ATTEMPTS": str(r.attempts),
        "PACKETS": str(r.packets),
        "DECIDED BY": decided_by(r),
    } for r in records]
    if staged is not None:
        for row, would in zip(rows, staged, strict=True):
            row["IF STAGED"] = would
    return tables.table(rows)


def render(records: Sequence[FlowRecord], output: str,
           staged: Sequence[str] | None = None) -> str:
    """``table``, ``json`` (a list) or ``yaml`` (a list) of the records' fields (with
    ``if_staged`` when `staged` is given)."""
    items = [{k: v for k, v in r.to_dict().items() if k != "v"} for r in records]
    if staged is not None:
        for item, would in zip(items, staged, strict=True):
            item["if_staged"] = would
    if output == "json":
        return json.dumps(items, indent=2) + "\n"
    if output == "yaml":
        return str(yaml.safe_dump(items, sort_keys=False, default_flow_style=False))
    if output == "table":
        return table(records, staged)
    raise FlowQueryError(f"-o {output!r}: expected table, json or yaml")
