"""Hosts and VMs outside Kubernetes, from a directory of YAML files (one per host).

A file looks like this::

    name: billing-vm-1          # required: the endpoint's name (a DNS-1123 label)
    kind: vm                    # vm (default) or host (published as a host endpoint)
    node: billing-vm-1          # where its enforcer runs (default: the name)
    interfaces:                 # at least one, each with at least one IP
      - name: eth0
        ips: [10.20.0.5, "fd00::5"]
    labels:
      app: billing
    profiles: []                # host only: [projectcalico-default-allow] allows what no
                                # policy decides (a host endpoint denies it by default)

It becomes one endpoint record (``vm//billing-vm-1``): every interface's IPs, and the
interface names (several separated by commas). Where a VM is enforced depends on
``node``: by default (``node`` is the VM's own name) the enforcer runs inside the VM
(``portcullis enforce --node billing-vm-1``), and everything the VM sends or forwards out
of the listed interfaces is its egress; with ``node`` naming a hypervisor, the enforcer
runs there and the interfaces are the VM's tap interfaces on it, which its traffic
arrives on. A ``host`` is enforced on what it sends out of the listed interfaces, and
denied after the last tier (Calico's host endpoint default) unless ``profiles`` lists
``projectcalico-default-allow``. A new file puts the host under
policy, a removed file tombstones it. A broken file is reported with its path
and field, and the host keeps its last valid state. `Inventory` is the pure
core; `watch_directory` is the watchfiles adapter.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from topics.records import (
    DEFAULT_ALLOW_PROFILE,
    INTERFACE_NAME_RE,
    EndpointRecord,
    canonical_ips,
)
from watchers.mirror import Mirror, Publication
from watchers.publisher import Publisher

log = logging.getLogger(__name__)

OWNER = "inventory"
SUFFIXES = (".yaml", ".yml")
NAME_RE = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
LABEL_KEY_RE = re.compile(
    r"^([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$"
)
KINDS = {"vm": "vm", "host": "hostendpoint"}
FIELDS = {"name", "kind", "node", "interfaces", "labels", "profiles"}


class InventoryError(ValueError):
    """A host file is invalid; str() is ``path: field: problem`` per line."""


def is_host_file(path: Path) -> bool:
    return path.suffix in SUFFIXES and not path.name.startswith(".")


def parse_host(text: str, source: str, observed_at: float) -> EndpointRecord:
    """One host file as its endpoint record, or InventoryError naming every bad field."""
    problems: list[str] = []

    def bad(where: str, message: str) -> None:
        problems.append(f"{source}: {where}: {message}" if where else f"{source}: {message}")

    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        bad(where, f"not valid YAML: {getattr(exc, 'problem', None) or exc}")
        raise InventoryError("\n".join(problems)) from None
    if not isinstance(doc, Mapping):
        bad("", "expected a mapping with name, interfaces and labels")
        raise InventoryError("\n".join(problems))
    for extra in sorted(set(map(str, doc)) - FIELDS):
        bad(extra, f"unknown field (expected {', '.join(sorted(FIELDS))})")

    name = doc.get("name")
    if not isinstance(name, str) or not name:
        bad("name", "required: a DNS-1123 name")
    elif len(name) > 253 or not NAME_RE.match(name):
        bad("name", f"invalid name {name!r} (lowercase letters, digits, '-' and '.')")
    kind = doc.get("kind", "vm")
    if kind not in KINDS:
        bad("kind", f"expected vm or host, got {kind!r}")
    node = doc.get("node", name)
    if node is not None and (not isinstance(node, str) or not node):
        bad("node", f"expected a node name, got {node!r}")

    interfaces = doc.get("interfaces")
    ips: list[str] = []
    names: list[str] = []
    if not isinstance(interfaces, list) or not interfaces:
        bad("interfaces", "required: a list of interfaces, each with a name and ips")
    else:
        for i, iface in enumerate(interfaces):
            where = f"interfaces[{i}]"
            if not isinstance(iface, Mapping):
                bad(where, "expected a mapping with name and ips")
                continue
            for extra in sorted(set(map(str, iface)) - {"name", "ips"}):
                bad(f"{where}.{extra}", "unknown field (expected name, ips)")
            ifname = iface.get("name")
            if not isinstance(ifname, str) or not INTERFACE_NAME_RE.match(ifname) or (
                ifname in (".", "..")
            ):
                bad(f"{where}.name", f"expected an interface name (1-15 chars), got {ifname!r}")
            elif ifname in names:
                bad(f"{where}.name", f"interface {ifname!r} is listed twice")
            else:
                names.append(ifname)
            raw_ips = iface.get("ips")
            if not isinstance(raw_ips, list) or not raw_ips:
                bad(f"{where}.ips", "required: a list of IP addresses")
                continue
            for j, ip in enumerate(raw_ips):
                try:
                    canonical_ips([str(ip)])
                except ValueError:
                    bad(f"{where}.ips[{j}]", f"not an IP address or CIDR: {ip!r}")
                    continue
                ips.append(str(ip))

    labels = doc.get("labels") or {}
    if not isinstance(labels, Mapping):
        bad("labels", f"expected a mapping of strings, got {type(labels).__name__}")
        labels = {}
    for key, value in labels.items():
        if not isinstance(key, str) or not LABEL_KEY_RE.match(key) or len(key) > 316:
            bad(f"labels.{key}", "invalid label key")
        elif not isinstance(value, str | int | float | bool) or value is None:
            bad(f"labels.{key}", f"expected a string value, got {value!r}")
    profiles = doc.get("profiles") or []
    if not isinstance(profiles, list):
        bad("profiles", f"expected a list of profile names, got {type(profiles).__name__}")
        profiles = []
    for i, profile in enumerate(profiles):
        if profile != DEFAULT_ALLOW_PROFILE:
            bad(f"profiles[{i}]", f"unknown profile {profile!r} (Portcullis has one: "
                f"{DEFAULT_ALLOW_PROFILE}, which allows what no policy decides)")
        elif kind != "host":
            bad(f"profiles[{i}]", "only a host has profiles (a VM allows what no policy "
                "decides already)")
    if problems:
        raise InventoryError("\n".join(problems))
    return EndpointRecord(
        kind=KINDS[kind],  # type: ignore[arg-type]
        namespace=None,
        name=str(name),
        node=str(node),
        interface=",".join(names),
        ips=tuple(ips),
        labels={str(k): _label_value(v) for k, v in labels.items()},
        service_account=None,
        source="inventory",
        observed_at=observed_at,
        profiles=tuple(dict.fromkeys(profiles)),
    )


def _label_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


@dataclass
class Inventory:
    """Which file stands for which endpoint key; the last valid state of each file."""

    hosts: dict[str, EndpointRecord] = field(default_factory=dict)  # path -> record
    errors: dict[str, str] = field(default_factory=dict)  # path -> problems

    def _owner_of(self, key: str) -> str | None:
        for path, record in self.hosts.items():
            if record.key == key:
                return path
        return None

    def update(self, path: str, text: str, observed_at: float) -> list[Publication]:
        """A file was added or changed: its new record, or nothing (and an error) if invalid."""
        try:
            record = parse_host(text, path, observed_at)
            other = self._owner_of(record.key)
            if other is not None and other != path:
                raise InventoryError(f"{path}: name: {record.name!r} is already defined in {other}")
        except InventoryError as exc:
            self.errors[path] = str(exc)
            return []
        self.errors.pop(path, None)
        pubs: list[Publication] = []
        previous = self.hosts.get(path)
        if previous is not None and previous.key != record.key:  # the file renamed its host
            pubs.append(Publication.tombstone("endpoints", previous.key, previous.name))
        self.hosts[path] = record
        pubs.append(Publication.upsert("endpoints", record))
        return pubs

    def remove(self, path: str) -> list[Publication]:
        """A file was removed: tombstone its host."""
        self.errors.pop(path, None)
        previous = self.hosts.pop(path, None)
        if previous is None:
            return []
        return [Publication.tombstone("endpoints", previous.key, previous.name)]

    def wanted(self) -> list[Publication]:
        return [Publication.upsert("endpoints", r) for r in self.hosts.values()]


def seed_from_topic(mirror: Mirror, endpoints: Mapping[str, EndpointRecord]) -> int:
    """Adopt what a previous run published (source "inventory"), so removals while down count."""
    ours = {("endpoints", k): r for k, r in endpoints.items() if r.source == "inventory"}
    mirror.seed(OWNER, ours)
    return len(ours)


class InventoryWatcher:
    """Keeps the endpoints topic equal to a directory of host files."""

    def __init__(
        self,
        directory: Path,
        publisher: Publisher,
        mirror: Mirror | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        # Absolute and resolved: watchfiles reports absolute paths, and a file must have
        # one name whether the scan or a change event saw it.
        self.directory = directory.resolve()
        self.publisher = publisher
        self.mirror = mirror or Mirror()
        self.inventory = Inventory()
        self.clock = clock
        self.ready = asyncio.Event()
        self.reported: dict[str, str] = {}

    def _files(self) -> list[Path]:
        return sorted(p for p in self.directory.iterdir() if p.is_file() and is_host_file(p))

    def _read(self, path: Path) -> str | None:
        try:
            return path.read_text()
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as exc:
            self.inventory.errors[str(path)] = f"{path}: cannot read: {exc}"
            return ""

    async def _publish(self, pubs: list[Publication], snapshot: bool = False) -> None:
        changes = (self.mirror.snapshot_changes(OWNER, pubs) if snapshot
                   else self.mirror.changes(pubs))
        await self.publisher.publish(changes)
        self.mirror.commit(OWNER, changes)
        for pub in changes:
            log.info("%s %s", "removed" if pub.value is None else "published", pub.key)

    def _report(self) -> None:
        for path, message in self.inventory.errors.items():
            if self.reported.get(path) != message:
                log.error("invalid host file, last valid state kept:\n%s", message)
        self.reported = dict(self.inventory.errors)

    async def scan(self) -> None:
        """Read every file and make the topic match exactly (tombstones for vanished hosts)."""
        now = self.clock()
        for path in self._files():
            text = self._read(path)
            if text is not None:
                self.inventory.update(str(path), text, now)
        self._report()
        await self._publish(self.inventory.wanted(), snapshot=True)

    async def changed(self, paths: set[Path]) -> None:
        now = self.clock()
        pubs: list[Publication] = []
        for path in sorted(paths):
            if not is_host_file(path):
                continue
            text = self._read(path) if path.exists() else None
            if text is None:
                pubs.extend(self.inventory.remove(str(path)))
            else:
                pubs.extend(self.inventory.update(str(path), text, now))
        self._report()
        await self._publish(pubs)

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Scan, then follow changes until `stop` is set (or the task is cancelled)."""
        from watchfiles import awatch

        if not self.directory.is_dir():
            raise InventoryError(f"{self.directory}: not a directory")
        # Scan once the directory is being watched (the first, empty, yield), so no file
        # written in between is missed; seeing a file twice changes nothing (the mirror).
        watcher = awatch(self.directory, stop_event=stop, debounce=50, step=20,
                         recursive=False, yield_on_timeout=True, rust_timeout=100)
        async for changes in watcher:
            if not self.ready.is_set():
                await self.scan()
                self.ready.set()
            if changes:
                await self.changed({Path(p) for _change, p in changes})
