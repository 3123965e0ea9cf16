"""Ipset programming for the enforcer: the backend interface, the netlink backend, a dry run.

The enforcer programs one ``hash:net`` set per selector uid (:func:`set_name`) and fills
it with canonical member strings (``10.0.0.1``, ``10.1.0.0/16``, ``fd00::/64``). Members
are refcounted above this layer; here a set is a plain set of strings. Bulk changes go
to the kernel as a few large netlink messages (``enforcers.netlink_ipset``), not one
message per entry, so 100,000 members take a fraction of a second.

Guarantees of :class:`NetlinkIpsets` (and mirrored by :class:`DryRunIpsets`):

- ``create`` is idempotent for an identical set; a set of the same name but another
  type or family raises :class:`IpsetError`.
- ``add`` / ``delete`` are idempotent. Every member of a call is validated first; an
  invalid one (bad syntax, wrong family, /0, a network in a ``hash:ip``) raises
  :class:`InvalidMember` naming it and nothing of the call is applied. A kernel error
  (set full, set missing) raises :class:`IpsetError` naming the member; the members
  before it in the call's order are applied, it and the ones after it are not.
- ``destroy`` of a missing set is a no-op; other commands on a missing set raise
  :class:`NoSuchSet`.
- :func:`replace_contents` swaps a fully filled temporary set in: readers of the set
  (iptables rules) see the old contents, then the new, never a partial or empty set.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import hashlib
import socket
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

from pyroute2.netlink.nfnetlink import ipset as _c

from enforcers.netlink_ipset import (
    DEFAULT_MAXELEM,
    FAMILIES,
    KINDS,
    MAX_NAME_LEN,
    InvalidMember,
    IpsetError,
    IpsetSocket,
    NoSuchSet,
    SetListing,
    canonical_member,
    hash_net_members,
    parse_members,
)

__all__ = [
    "DryRunIpsets",
    "InvalidMember",
    "IpsetBackend",
    "IpsetError",
    "NetlinkIpsets",
    "NoSuchSet",
    "SetInfo",
    "canonical_member",
    "hash_net_members",
    "replace_contents",
    "set_name",
    "temp_name",
]


@dataclass(frozen=True)
class SetInfo:
    """What a set is (its members aside): needed to build a swappable twin."""

    family: str
    kind: str


class IpsetBackend(Protocol):
    """What the enforcer needs from the kernel's ipsets (real or recorded)."""

    def list_sets(self) -> dict[str, set[str]]: ...

    def info(self, name: str) -> SetInfo | None: ...

    def create(self, name: str, family: str = "inet", kind: str = "hash:net") -> None: ...

    def add(self, name: str, members: Iterable[str]) -> None: ...

    def delete(self, name: str, members: Iterable[str]) -> None: ...

    def swap(self, a: str, b: str) -> None: ...

    def destroy(self, name: str) -> None: ...

    def flush(self, name: str) -> None: ...


def set_name(selector_uid: str, prefix: str = "pc") -> str:
    """A deterministic ipset name for a selector uid, Calico-like, at most 31 characters.

    ``s:<base64url sha224>`` uids keep their first 20 characters after ``s:`` (120 bits,
    as unique as Calico's ``cali40s:`` names); any other uid is hashed first.
    """
    body = selector_uid[2:] if selector_uid.startswith("s:") else ""
    if len(body) < 20 or not all(c.isalnum() or c in "-_" for c in body[:20]):
        digest = hashlib.sha224(selector_uid.encode()).digest()
        body = base64.urlsafe_b64encode(digest).decode().rstrip("=")
    name = f"{prefix}-s:{body[:20]}"
    _check_name(name)
    return name


def temp_name(name: str) -> str:
    """The temporary twin used by :func:`replace_contents` (``pc-s:…`` -> ``pt-s:…``)."""
    _check_name(name)
    if name.startswith("pc-"):
        return "pt-" + name[3:]
    return name[: MAX_NAME_LEN - 2] + "~t"


def replace_contents(backend: IpsetBackend, name: str, members: Iterable[str],
                     family: str = "inet", kind: str = "hash:net") -> None:
    """Make set ``name`` hold exactly ``members``, atomically for packet matching.

    A missing set is created with ``family``/``kind``; an existing one keeps its own
    type. The temporary twin is filled, swapped in, and destroyed.
    """
    members = list(members)
    existing = backend.info(name)
    if existing is None:
        backend.create(name, family, kind)
        existing = SetInfo(family, kind)
    tmp = temp_name(name)
    backend.destroy(tmp)  # left over from a crash, or absent
    backend.create(tmp, existing.family, existing.kind)
    try:
        backend.add(tmp, members)
        backend.swap(tmp, name)
    finally:
        backend.destroy(tmp)


def _check_name(name: str) -> None:
    if not name or len(name) > MAX_NAME_LEN:
        raise ValueError(f"ipset name {name!r} must be 1..{MAX_NAME_LEN} characters")


def _check_kind(family: str, kind: str) -> None:
    if family not in FAMILIES:
        raise ValueError(f"ipset family {family!r} not supported (use one of {sorted(FAMILIES)})")
    if kind not in KINDS:
        raise ValueError(f"ipset type {kind!r} not supported (use one of {list(KINDS)})")


def _clash(name: str, current: SetInfo | None, wanted: SetInfo) -> IpsetError:
    have = f"{current.family} {current.kind}" if current else "something else"
    return IpsetError(errno.EEXIST, "create", name, None,
                      f"a set of that name exists as {have}, wanted {wanted.family} {wanted.kind}")


def _validated(members: Iterable[str], info: SetInfo, name: str
               ) -> tuple[list[tuple[int, bytes, int]], list[str]]:
    """Parse everything before touching anything; a hash:ip holds hosts only."""
    entries, texts = parse_members(members, FAMILIES[info.family])
    if info.kind == "hash:ip":
        for (fam, _raw, prefix), text in zip(entries, texts, strict=True):
            if prefix != (32 if fam == socket.AF_INET else 128):
                raise InvalidMember(text, f"set {name!r} is a hash:ip and holds hosts only")
    return entries, texts


class NetlinkIpsets:
    """The real backend: ipsets in the kernel, in the caller's or a named network namespace.

    Blocking calls, each one or a few netlink round trips; not thread-safe (one per
    thread, or call it from one worker).
    """

    def __init__(self, netns: str | None = None, maxelem: int = DEFAULT_MAXELEM,
                 max_message_bytes: int = 60_000) -> None:
        self.netns = netns
        self.maxelem = maxelem
        self.max_message_bytes = max_message_bytes
        self._sock = IpsetSocket(netns)
        self._info: dict[str, SetInfo] = {}
        self._revisions: dict[tuple[str, str], int] = {}
        self.messages_sent = 0

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> NetlinkIpsets:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def listing(self, name: str | None = None) -> dict[str, SetListing]:
        """Sets with their type, family and maxelem as well as their members."""
        try:
            sets = self._sock.list_sets(name)
        except NoSuchSet:
            self._info.pop(name or "", None)
            return {}
        for listing in sets.values():
            self._info[listing.name] = SetInfo(listing.family, listing.kind)
        return sets

    def list_sets(self) -> dict[str, set[str]]:
        return {name: s.members for name, s in self.listing().items()}

    def info(self, name: str) -> SetInfo | None:
        """Type and family of a set, from the kernel (a header-only dump of it)."""
        try:
            sets = self._sock.list_sets_headers(name)
        except NoSuchSet:
            self._info.pop(name, None)
            return None
        listing = sets.get(name)
        if listing is None:
            return None
        info = self._info[name] = SetInfo(listing.family, listing.kind)
        return info

    def create(self, name: str, family: str = "inet", kind: str = "hash:net") -> None:
        _check_name(name)
        _check_kind(family, kind)
        revision = self._revisions.get((kind, family))
        if revision is None:
            revision = self._revisions[(kind, family)] = self._sock.type_revision(kind, family)
        wanted = SetInfo(family, kind)
        try:
            self._sock.create(name, kind, family, revision, self.maxelem)
        except IpsetError as exc:
            if exc.code != errno.EEXIST:  # EEXIST despite IPSET_FLAG_EXIST: another set
                raise
        # The kernel accepts an inet6 re-create of an inet hash:net: check it ourselves.
        current = self.info(name)
        if current != wanted:
            raise _clash(name, current, wanted)

    def _info_of(self, name: str) -> SetInfo:
        info = self._info.get(name) or self.info(name)
        if info is None:
            raise NoSuchSet(errno.ENOENT, "add/del", name)
        return info

    def _adt(self, cmd: int, name: str, members: Iterable[str]) -> None:
        info = self._info_of(name)
        entries, texts = _validated(members, info, name)
        if not entries:
            return
        try:
            self.messages_sent += self._sock.adt(cmd, name, info.kind, FAMILIES[info.family],
                                                 entries, texts, self.max_message_bytes)
        except NoSuchSet:
            self._info.pop(name, None)  # destroyed behind our back: forget the cache
            raise

    def add(self, name: str, members: Iterable[str]) -> None:
        self._adt(_c.IPSET_CMD_ADD, name, members)

    def delete(self, name: str, members: Iterable[str]) -> None:
        self._adt(_c.IPSET_CMD_DEL, name, members)

    def swap(self, a: str, b: str) -> None:
        self._sock.simple(_c.IPSET_CMD_SWAP, a, b, command="swap")
        ia, ib = self._info.pop(a, None), self._info.pop(b, None)
        if ia and ib:
            self._info[a], self._info[b] = ib, ia

    def destroy(self, name: str) -> None:
        with contextlib.suppress(NoSuchSet):
            self._sock.simple(_c.IPSET_CMD_DESTROY, name, command="destroy")
        self._info.pop(name, None)

    def flush(self, name: str) -> None:
        self._sock.simple(_c.IPSET_CMD_FLUSH, name, command="flush")


@dataclass
class _DrySet:
    info: SetInfo
    members: set[str] = field(default_factory=set)


class DryRunIpsets:
    """Records operations instead of touching the kernel, with the same checks and errors.

    ``operations`` holds ``(op, name, detail)`` tuples; ``member_ops`` counts members
    added or deleted, for benchmarks that simulate many nodes.
    """

    def __init__(self, maxelem: int = DEFAULT_MAXELEM) -> None:
        self.maxelem = maxelem
        self.sets: dict[str, _DrySet] = {}
        self.operations: list[tuple[str, str, object]] = []
        self.member_ops = 0

    def _get(self, name: str, command: str) -> _DrySet:
        s = self.sets.get(name)
        if s is None:
            raise NoSuchSet(errno.ENOENT, command, name)
        return s

    def list_sets(self) -> dict[str, set[str]]:
        return {name: set(s.members) for name, s in self.sets.items()}

    def info(self, name: str) -> SetInfo | None:
        s = self.sets.get(name)
        return s.info if s else None

    def create(self, name: str, family: str = "inet", kind: str = "hash:net") -> None:
        _check_name(name)
        _check_kind(family, kind)
        existing = self.sets.get(name)
        if existing is not None:
            if existing.info != SetInfo(family, kind):
                raise _clash(name, existing.info, SetInfo(family, kind))
            return
        self.sets[name] = _DrySet(SetInfo(family, kind))
        self.operations.append(("create", name, (family, kind)))

    def add(self, name: str, members: Iterable[str]) -> None:
        s = self._get(name, "add")
        entries, texts = _validated(members, s.info, name)
        for text in texts:  # like the kernel: the members before a failing one stay in
            member = canonical_member(text)
            if member not in s.members and len(s.members) >= self.maxelem:
                raise IpsetError(_c.IPSET_ERR_TYPE_SPECIFIC, "add", name, text)
            s.members.add(member)
        self.member_ops += len(entries)
        self.operations.append(("add", name, len(entries)))

    def delete(self, name: str, members: Iterable[str]) -> None:
        s = self._get(name, "del")
        entries, texts = _validated(members, s.info, name)
        s.members.difference_update(canonical_member(t) for t in texts)
        self.member_ops += len(entries)
        self.operations.append(("del", name, len(entries)))

    def swap(self, a: str, b: str) -> None:
        sa, sb = self._get(a, "swap"), self.sets.get(b)
        if sb is None:
            raise IpsetError(_c.IPSET_ERR_EXIST_SETNAME2, "swap", a, None)
        if sa.info != sb.info:
            raise IpsetError(_c.IPSET_ERR_TYPE_MISMATCH, "swap", a, None)
        self.sets[a], self.sets[b] = sb, sa
        self.operations.append(("swap", a, b))

    def destroy(self, name: str) -> None:
        if self.sets.pop(name, None) is not None:
            self.operations.append(("destroy", name, None))

    def flush(self, name: str) -> None:
        self._get(name, "flush").members.clear()
        self.operations.append(("flush", name, None))
