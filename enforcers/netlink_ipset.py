"""The ipset netlink protocol, spoken directly: many entries per message.

pyroute2's ``IPSet.add`` sends one entry per message and waits for its ack. The kernel
also accepts, like ``ipset restore`` sends it, one ``IPSET_CMD_ADD``/``DEL`` carrying an
``IPSET_ATTR_ADT`` nest with thousands of ``IPSET_ATTR_DATA`` entries, each tagged with
an ``IPSET_ATTR_LINENO``; on a failing entry the kernel stops that message and answers
with the failing line number, so we can name the entry. Entries are packed with one
precompiled ``struct`` per entry: Python-side cost stays around a microsecond.

Error semantics (what a caller can rely on):
- Member text is parsed and checked (syntax, prefix length, family of the set, /0)
  for the *whole* call before anything is sent: an invalid member raises
  :class:`InvalidMember` naming it, and the kernel is not touched.
- The kernel processes a netlink message synchronously inside ``send``; we send one
  message, read its answer, then send the next. If the kernel rejects an entry
  (set full, set missing, out of memory), :class:`IpsetError` names the entry, every
  entry *before* it (in the caller's order) is applied, it and every entry after it
  are not. Adding and deleting are idempotent, so retrying the whole call is safe.
- Re-adding a present member or deleting an absent one is not an error
  (no ``NLM_F_EXCL``, i.e. the kernel's ``IPSET_FLAG_EXIST`` semantics).

Constants come from pyroute2 (``pyroute2.netlink`` and its nfnetlink ipset module).
"""

from __future__ import annotations

import errno
import ipaddress
import itertools
import os
import socket
import struct
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

from pyroute2.netlink import (
    NETLINK_NETFILTER,
    NLA_F_NESTED,
    NLA_F_NET_BYTEORDER,
    NLM_F_ACK,
    NLM_F_DUMP,
    NLM_F_REQUEST,
    NLMSG_DONE,
    NLMSG_ERROR,
)
from pyroute2.netlink.nfnetlink import NFNL_SUBSYS_IPSET
from pyroute2.netlink.nfnetlink import ipset as _c

from enforcers import netns as _netns

# --- attribute numbers (include/uapi/linux/netfilter/ipset/ip_set.h) -------------------
ATTR_PROTOCOL = 1
ATTR_SETNAME = 2
ATTR_TYPENAME = 3
ATTR_SETNAME2 = 3
ATTR_REVISION = 4
ATTR_FAMILY = 5
ATTR_FLAGS = 6
ATTR_DATA = 7
ATTR_ADT = 8
ATTR_LINENO = 9
ATTR_PROTOCOL_MIN = 10
# inside IPSET_ATTR_DATA
ATTR_IP = 1
ATTR_CIDR = 3
ATTR_CADT_LINENO = 9
ATTR_HASHSIZE = 18
ATTR_MAXELEM = 19
ATTR_ELEMENTS = 24
# inside IPSET_ATTR_IP
ATTR_IPADDR_IPV4 = 1
ATTR_IPADDR_IPV6 = 2

NLA_TYPE_MASK = ~(NLA_F_NESTED | NLA_F_NET_BYTEORDER) & 0xFFFF
FAMILIES: dict[str, int] = {"inet": socket.AF_INET, "inet6": socket.AF_INET6}
FAMILY_NAMES: dict[int, str] = {v: k for k, v in FAMILIES.items()}
KINDS = ("hash:net", "hash:ip")
MAX_NAME_LEN = _c.IPSET_MAXNAMELEN - 1  # 31 characters + NUL
DEFAULT_MAXELEM = 1_048_576  # as Calico's Felix: large selectors must fit
# An IPSET_ATTR_ADT nest has a 16-bit length: stay well under 64 KiB per message.
DEFAULT_MAX_MESSAGE_BYTES = 60_000

_NLMSGHDR = struct.Struct("=IHHII")
_NFGENMSG = struct.Struct("=BBH")
_NLA = struct.Struct("=HH")
_NLMSGERR = struct.Struct("=i")
_HEADER_LEN = _NLMSGHDR.size + _NFGENMSG.size

_DATA = ATTR_DATA | NLA_F_NESTED
_IP = ATTR_IP | NLA_F_NESTED
_V4 = ATTR_IPADDR_IPV4 | NLA_F_NET_BYTEORDER
_V6 = ATTR_IPADDR_IPV6 | NLA_F_NET_BYTEORDER
# One entry = DATA{ IP{ IPADDR }, [CIDR u8], LINENO u32 }: a single struct.pack each.
_ENTRY_NET4 = struct.Struct("=HHHHHH4sHHBxxxHHI")
_ENTRY_NET6 = struct.Struct("=HHHHHH16sHHBxxxHHI")
_ENTRY_IP4 = struct.Struct("=HHHHHH4sHHI")
_ENTRY_IP6 = struct.Struct("=HHHHHH16sHHI")

_ERRORS = {
    _c.IPSET_ERR_PROTOCOL: "ipset protocol error (kernel and program disagree)",
    _c.IPSET_ERR_FIND_TYPE: "set type not supported by the kernel",
    _c.IPSET_ERR_MAX_SETS: "maximal number of sets reached",
    _c.IPSET_ERR_BUSY: "set is in use by a kernel component (an iptables rule?)",
    _c.IPSET_ERR_EXIST_SETNAME2: "the second set does not exist / the new name is taken",
    _c.IPSET_ERR_TYPE_MISMATCH: "the sets have different types or families",
    _c.IPSET_ERR_EXIST: "element already added / not present",
    _c.IPSET_ERR_INVALID_CIDR: "invalid CIDR prefix length for this set",
    _c.IPSET_ERR_INVALID_NETMASK: "invalid netmask",
    _c.IPSET_ERR_INVALID_FAMILY: "protocol family not supported by the set type",
    _c.IPSET_ERR_IPADDR_IPV4: "an IPv4 address was expected",
    _c.IPSET_ERR_IPADDR_IPV6: "an IPv6 address was expected",
    _c.IPSET_ERR_TYPE_SPECIFIC: "set is full (maxelem reached) or type-specific error",
    errno.ENOENT: "no such set",
    errno.EEXIST: "set already exists with a different type, family or options",
}


class InvalidMember(ValueError):
    """A member string that cannot go into the set; raised before the kernel is touched."""

    def __init__(self, member: str, reason: str) -> None:
        super().__init__(f"invalid ipset member {member!r}: {reason}")
        self.member = member
        self.reason = reason


class IpsetError(OSError):
    """The kernel refused an ipset command; ``member`` names the failing entry if known."""

    def __init__(
        self, code: int, command: str, set_name: str | None, member: str | None = None,
        detail: str | None = None,
    ) -> None:
        reason = detail or _ERRORS.get(code) or os.strerror(code)
        where = f" set {set_name!r}" if set_name else ""
        what = f" member {member!r}" if member is not None else ""
        super().__init__(code, f"ipset {command}{where}{what}: {reason} (error {code})")
        self.code = code
        self.command = command
        self.set_name = set_name
        self.member = member


class NoSuchSet(IpsetError):
    """The named set does not exist."""


# --- members ---------------------------------------------------------------------------


def parse_member(text: str) -> tuple[int, bytes, int]:
    """``"10.0.0.0/8"`` -> (AF_INET, network bytes with host bits cleared, 8).

    Host bits are cleared as the kernel does for hash:net. /0 is refused: hash:net cannot
    hold it (split it with :func:`hash_net_members`).
    """
    if not isinstance(text, str):
        raise InvalidMember(repr(text), "expected a string")
    addr, slash, plen = text.partition("/")
    if ":" in addr:
        fam, bits = socket.AF_INET6, 128
    else:
        fam, bits = socket.AF_INET, 32
    try:
        raw = socket.inet_pton(fam, addr)
    except (OSError, ValueError):
        raise InvalidMember(text, "not an IPv4/IPv6 address or CIDR") from None
    if slash:
        if not (plen.isascii() and plen.isdigit()) or len(plen) > 3:
            raise InvalidMember(text, "prefix length must be a decimal number")
        prefix = int(plen)
        if prefix > bits:
            raise InvalidMember(text, f"prefix length must be at most {bits}")
        if prefix == 0:
            raise InvalidMember(text, "a hash:net set cannot hold /0; use two /1 halves")
        if prefix < bits:
            n = int.from_bytes(raw, "big") & (((1 << prefix) - 1) << (bits - prefix))
            raw = n.to_bytes(bits // 8, "big")
    else:
        prefix = bits
    return fam, raw, prefix


def format_member(fam: int, raw: bytes, prefix: int) -> str:
    """Canonical text: a bare address for a host, as ``ipset save`` prints it.

    Addresses are written as Python's ``ipaddress`` writes them (what the rest of the
    enforcer compares against); that equals glibc's ``inet_ntop`` (and so ``ipset save``)
    except for IPv6 addresses with an embedded IPv4 (``::ffff:1.2.3.4``), which
    ``ipaddress`` writes in hex.
    """
    addr = socket.inet_ntop(fam, raw)
    if fam == socket.AF_INET6 and "." in addr:
        addr = str(ipaddress.IPv6Address(raw))
    return addr if prefix == len(raw) * 8 else f"{addr}/{prefix}"


def canonical_member(text: str) -> str:
    """Canonical member text: ``10.1.2.3/8`` -> ``10.0.0.0/8``, ``1.2.3.4/32`` -> ``1.2.3.4``."""
    return format_member(*parse_member(text))


def hash_net_members(cidr: str) -> list[str]:
    """Members a hash:net needs for ``cidr``: ``0.0.0.0/0`` and ``::/0`` become two /1s."""
    addr, _, plen = cidr.partition("/")
    if plen == "0":
        if ":" in addr:
            socket.inet_pton(socket.AF_INET6, addr)
            return ["::/1", "8000::/1"]
        socket.inet_pton(socket.AF_INET, addr)
        return ["0.0.0.0/1", "128.0.0.0/1"]
    return [canonical_member(cidr)]


# --- message building ------------------------------------------------------------------


def nla(attr_type: int, payload: bytes) -> bytes:
    """One netlink attribute, padded to 4 bytes."""
    length = _NLA.size + len(payload)
    return _NLA.pack(length, attr_type) + payload + b"\0" * (-length % 4)


def nla_str(attr_type: int, value: str) -> bytes:
    return nla(attr_type, value.encode() + b"\0")


def nla_u8(attr_type: int, value: int) -> bytes:
    return nla(attr_type, bytes((value,)))


def nla_be32(attr_type: int, value: int) -> bytes:
    return nla(attr_type | NLA_F_NET_BYTEORDER, struct.pack(">I", value))


def message(cmd: int, flags: int, seq: int, family: int, attrs: bytes) -> bytes:
    """A complete nfnetlink ipset message."""
    length = _HEADER_LEN + len(attrs)
    return (
        _NLMSGHDR.pack(length, (NFNL_SUBSYS_IPSET << 8) | cmd, flags, seq, 0)
        + _NFGENMSG.pack(family, 0, 0)
        + attrs
    )


def pack_entry(kind: str, fam: int, raw: bytes, prefix: int, lineno: int) -> bytes:
    """One IPSET_ATTR_DATA entry for an ADT nest."""
    if kind == "hash:net":
        if fam == socket.AF_INET:
            return _ENTRY_NET4.pack(32, _DATA, 12, _IP, 8, _V4, raw, 5, ATTR_CIDR, prefix,
                                    8, ATTR_CADT_LINENO, lineno)
        return _ENTRY_NET6.pack(44, _DATA, 24, _IP, 20, _V6, raw, 5, ATTR_CIDR, prefix,
                                8, ATTR_CADT_LINENO, lineno)
    if fam == socket.AF_INET:
        return _ENTRY_IP4.pack(24, _DATA, 12, _IP, 8, _V4, raw, 8, ATTR_CADT_LINENO, lineno)
    return _ENTRY_IP6.pack(36, _DATA, 24, _IP, 20, _V6, raw, 8, ATTR_CADT_LINENO, lineno)


@dataclass(frozen=True)
class AdtChunk:
    """One ADD/DEL message body and which caller entries (1-based line numbers) it holds."""

    attrs: bytes
    first_lineno: int
    last_lineno: int


def adt_chunks(
    protocol: int,
    set_name: str,
    kind: str,
    entries: Sequence[tuple[int, bytes, int]],
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
) -> Iterator[AdtChunk]:
    """Split parsed entries into ADT message bodies below ``max_message_bytes`` each.

    Entry *i* (0-based) carries line number *i + 1*, so a kernel error names it.
    """
    head = nla_u8(ATTR_PROTOCOL, protocol) + nla_str(ATTR_SETNAME, set_name)
    head += nla(ATTR_LINENO, struct.pack("=I", 0))  # required with ADT; kernel fills it in
    budget = max_message_bytes - _HEADER_LEN - len(head) - _NLA.size
    budget = min(budget, 0xFFFF - _NLA.size)
    if budget < 64:
        raise ValueError(f"max_message_bytes={max_message_bytes} is too small")
    parts: list[bytes] = []
    size = 0
    first = 1
    net4 = kind == "hash:net"
    pack_net4 = _ENTRY_NET4.pack
    for lineno, (fam, raw, prefix) in enumerate(entries, start=1):
        if net4 and fam == socket.AF_INET:  # the common case, inlined (bulk adds)
            packed = pack_net4(32, _DATA, 12, _IP, 8, _V4, raw, 5, ATTR_CIDR, prefix,
                               8, ATTR_CADT_LINENO, lineno)
        else:
            packed = pack_entry(kind, fam, raw, prefix, lineno)
        if size + len(packed) > budget:
            yield AdtChunk(head + _adt(parts, size), first, lineno - 1)
            parts, size, first = [], 0, lineno
        parts.append(packed)
        size += len(packed)
    if parts:
        yield AdtChunk(head + _adt(parts, size), first, len(entries))


def _adt(parts: list[bytes], size: int) -> bytes:
    return _NLA.pack(_NLA.size + size, ATTR_ADT | NLA_F_NESTED) + b"".join(parts)


# --- message parsing -------------------------------------------------------------------


def iter_nla(buf: bytes | memoryview, start: int = 0, end: int | None = None
             ) -> Iterator[tuple[int, int, int]]:
    """(type without flags, payload start, payload end) for each attribute in a range."""
    end = len(buf) if end is None else end
    pos = start
    while pos + 4 <= end:
        length, attr_type = _NLA.unpack_from(buf, pos)
        if length < 4:
            break
        yield attr_type & NLA_TYPE_MASK, pos + 4, pos + length
        pos += (length + 3) & ~3


def iter_messages(buf: bytes | memoryview, size: int) -> Iterator[tuple[int, int, int, int, int]]:
    """(type, flags, seq, payload start, payload end) for each netlink message."""
    pos = 0
    while pos + _NLMSGHDR.size <= size:
        length, msg_type, flags, seq, _pid = _NLMSGHDR.unpack_from(buf, pos)
        if length < _NLMSGHDR.size:
            break
        yield msg_type, flags, seq, pos + _NLMSGHDR.size, pos + length
        pos += (length + 3) & ~3


@dataclass
class SetListing:
    """A set as the kernel lists it."""

    name: str
    kind: str = ""
    family: str = ""
    revision: int = 0
    maxelem: int = 0
    members: set[str] = field(default_factory=set)


def parse_list_message(buf: bytes | memoryview, start: int, end: int,
                       sets: dict[str, SetListing]) -> None:
    """Merge one IPSET_CMD_LIST dump message into ``sets`` (a big set spans messages)."""
    body = start + _NFGENMSG.size
    attrs = {t: (s, e) for t, s, e in iter_nla(buf, body, end)}
    if ATTR_SETNAME not in attrs:
        return
    s, e = attrs[ATTR_SETNAME]
    name = bytes(buf[s:e]).split(b"\0", 1)[0].decode()
    listing = sets.get(name)
    if listing is None:
        listing = sets[name] = SetListing(name)
    if ATTR_TYPENAME in attrs:
        s, e = attrs[ATTR_TYPENAME]
        listing.kind = bytes(buf[s:e]).split(b"\0", 1)[0].decode()
    if ATTR_FAMILY in attrs:
        listing.family = FAMILY_NAMES.get(buf[attrs[ATTR_FAMILY][0]], "")
    if ATTR_REVISION in attrs:
        listing.revision = buf[attrs[ATTR_REVISION][0]]
    if ATTR_DATA in attrs:
        for t, s, _e in iter_nla(buf, *attrs[ATTR_DATA]):
            if t == ATTR_MAXELEM:
                listing.maxelem = struct.unpack_from(">I", buf, s)[0]
    if ATTR_ADT in attrs:
        add = listing.members.add
        for t, s, e in iter_nla(buf, *attrs[ATTR_ADT]):
            if t != ATTR_DATA:
                continue
            fam = 0
            raw = b""
            prefix = -1
            for t2, s2, e2 in iter_nla(buf, s, e):
                if t2 == ATTR_IP:
                    for t3, s3, e3 in iter_nla(buf, s2, e2):
                        raw = bytes(buf[s3:e3])
                        fam = socket.AF_INET if t3 == ATTR_IPADDR_IPV4 else socket.AF_INET6
                elif t2 == ATTR_CIDR:
                    prefix = buf[s2]
            if fam:
                add(format_member(fam, raw, prefix if prefix >= 0 else len(raw) * 8))


# --- the socket ------------------------------------------------------------------------


class IpsetSocket:
    """A NETLINK_NETFILTER socket for ipset commands, optionally inside a named netns.

    Not thread-safe: use one per thread (or guard it with a lock).
    """

    def __init__(self, netns: str | None = None, rcvbuf: int = 4 << 20,
                 timeout: float = 30.0) -> None:
        self.netns = netns
        self._sock = _netns.open_socket(netns, socket.AF_NETLINK, socket.SOCK_RAW,
                                        NETLINK_NETFILTER)
        try:
            # The kernel answers within the send; a missing answer must not hang us.
            self._sock.settimeout(timeout)
            for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
                self._sock.setsockopt(socket.SOL_SOCKET, opt, rcvbuf)
            self._sock.bind((0, 0))
            self._seq = itertools.count(int.from_bytes(os.urandom(2), "big") + 1)
            self._buf = bytearray(1 << 20)
            self.protocol = self._negotiate_protocol()
        except BaseException:
            self._sock.close()
            raise

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> IpsetSocket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- plumbing --

    def _next_seq(self) -> int:
        return next(self._seq) & 0xFFFFFFFF

    def _recv(self) -> tuple[memoryview, int]:
        size = self._sock.recv_into(self._buf)
        return memoryview(self._buf), size

    def transact(self, cmd: int, attrs: bytes, family: int = socket.AF_INET,
                 flags: int = NLM_F_REQUEST | NLM_F_ACK, command: str = "",
                 set_name: str | None = None) -> list[bytes]:
        """Send one request; return the payloads of the answers (without the ack).

        Raises :class:`IpsetError` on an error answer. Dumps (``NLM_F_DUMP``) collect
        every message up to NLMSG_DONE.
        """
        seq = self._next_seq()
        self._sock.send(message(cmd, flags, seq, family, attrs))
        answers: list[bytes] = []
        while True:
            buf, size = self._recv()
            for msg_type, _flags, mseq, start, end in iter_messages(buf, size):
                if mseq != seq:
                    continue  # a late answer to an abandoned request
                if msg_type == NLMSG_ERROR:
                    code = -_NLMSGERR.unpack_from(buf, start)[0]
                    if code == 0:
                        return answers
                    raise _error(code, command or str(cmd), set_name)
                if msg_type == NLMSG_DONE:
                    return answers
                answers.append(bytes(buf[start:end]))
            if not flags & NLM_F_DUMP and answers and not flags & NLM_F_ACK:
                return answers

    def _negotiate_protocol(self) -> int:
        answers = self.transact(_c.IPSET_CMD_PROTOCOL, nla_u8(ATTR_PROTOCOL, 6),
                                flags=NLM_F_REQUEST, command="protocol")
        attrs = {t: (s, e) for t, s, e in iter_nla(answers[0], _NFGENMSG.size)}
        kernel_max = answers[0][attrs[ATTR_PROTOCOL][0]]
        kernel_min = answers[0][attrs[ATTR_PROTOCOL_MIN][0]] if ATTR_PROTOCOL_MIN in attrs else 6
        proto = min(kernel_max, 7)
        if proto < max(kernel_min, 6):
            raise IpsetError(_c.IPSET_ERR_PROTOCOL, "protocol", None)
        return proto

    # -- commands --

    def type_revision(self, kind: str, family: str) -> int:
        """The newest revision of ``kind`` the kernel supports (create must name one)."""
        attrs = (nla_u8(ATTR_PROTOCOL, self.protocol) + nla_str(ATTR_TYPENAME, kind)
                 + nla_u8(ATTR_FAMILY, FAMILIES[family]))
        answers = self.transact(_c.IPSET_CMD_TYPE, attrs, command=f"type {kind}")
        attrs_at = {t: (s, e) for t, s, e in iter_nla(answers[0], _NFGENMSG.size)}
        return answers[0][attrs_at[ATTR_REVISION][0]]

    def create(self, name: str, kind: str, family: str, revision: int,
               maxelem: int = DEFAULT_MAXELEM, hashsize: int | None = None) -> None:
        data = nla_be32(ATTR_MAXELEM, maxelem)
        if hashsize is not None:
            data += nla_be32(ATTR_HASHSIZE, hashsize)
        attrs = (nla_u8(ATTR_PROTOCOL, self.protocol) + nla_str(ATTR_SETNAME, name)
                 + nla_str(ATTR_TYPENAME, kind) + nla_u8(ATTR_REVISION, revision)
                 + nla_u8(ATTR_FAMILY, FAMILIES[family]) + nla(_DATA, data))
        # No NLM_F_EXCL: re-creating an identical set is accepted (IPSET_FLAG_EXIST).
        self.transact(_c.IPSET_CMD_CREATE, attrs, FAMILIES[family], command="create",
                      set_name=name)

    def simple(self, cmd: int, name: str, name2: str | None = None, command: str = "") -> None:
        """DESTROY / FLUSH (one name) and SWAP / RENAME (two names)."""
        attrs = nla_u8(ATTR_PROTOCOL, self.protocol) + nla_str(ATTR_SETNAME, name)
        if name2 is not None:
            attrs += nla_str(ATTR_SETNAME2, name2)
        self.transact(cmd, attrs, command=command or str(cmd), set_name=name)

    def list_sets(self, name: str | None = None) -> dict[str, SetListing]:
        """Every set (or the one named) with its header and members, via one dump."""
        return self._list(name, 0)

    def list_sets_headers(self, name: str | None = None) -> dict[str, SetListing]:
        """Like :meth:`list_sets` without the members: cheap, for type and family."""
        return self._list(name, _c.IPSET_FLAG_LIST_HEADER)

    def _list(self, name: str | None, list_flags: int) -> dict[str, SetListing]:
        attrs = nla_u8(ATTR_PROTOCOL, self.protocol)
        if name is not None:
            attrs += nla_str(ATTR_SETNAME, name)
        if list_flags:
            attrs += nla_be32(ATTR_FLAGS, list_flags)
        answers = self.transact(_c.IPSET_CMD_LIST, attrs, flags=NLM_F_REQUEST | NLM_F_DUMP,
                                command="list", set_name=name)
        sets: dict[str, SetListing] = {}
        for payload in answers:
            parse_list_message(payload, 0, len(payload), sets)
        return sets

    def adt(self, cmd: int, name: str, kind: str, family: int,
            entries: Sequence[tuple[int, bytes, int]], texts: Sequence[str],
            max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> int:
        """Add (``IPSET_CMD_ADD``) or delete many parsed entries; returns messages sent.

        One message at a time: the kernel has processed it when ``send`` returns, so
        reading its answer before the next send costs little and lets us stop at the
        first failing entry (see the module docstring for the guarantee).
        """
        command = "add" if cmd == _c.IPSET_CMD_ADD else "del"
        sent = 0
        for chunk in adt_chunks(self.protocol, name, kind, entries, max_message_bytes):
            seq = self._next_seq()
            self._sock.send(message(cmd, NLM_F_REQUEST | NLM_F_ACK, seq, family, chunk.attrs))
            sent += 1
            self._await_adt_answer(seq, chunk, command, name, texts)
        return sent

    def _await_adt_answer(self, seq: int, chunk: AdtChunk, command: str, name: str,
                          texts: Sequence[str]) -> None:
        while True:
            buf, size = self._recv()
            for msg_type, _flags, mseq, start, end in iter_messages(buf, size):
                if mseq != seq or msg_type != NLMSG_ERROR:
                    continue
                code = -_NLMSGERR.unpack_from(buf, start)[0]
                if code == 0:
                    return
                lineno = _echoed_lineno(buf, start + _NLMSGERR.size, end)
                member = texts[lineno - 1] if 0 < lineno <= len(texts) else None
                if member is None and code != errno.ENOENT:  # no line number: name the chunk
                    member = (f"{texts[chunk.first_lineno - 1]} .. "
                              f"{texts[chunk.last_lineno - 1]}")
                raise _error(code, command, name, member)


def _echoed_lineno(buf: memoryview, start: int, end: int) -> int:
    """The failing line number the kernel wrote into the echoed request, or 0."""
    if end - start < _HEADER_LEN:
        return 0
    length = _NLMSGHDR.unpack_from(buf, start)[0]
    for t, s, _e in iter_nla(buf, start + _HEADER_LEN, min(end, start + length)):
        if t == ATTR_LINENO:
            return int(struct.unpack_from("=I", buf, s)[0])
    return 0


def _error(code: int, command: str, set_name: str | None, member: str | None = None
           ) -> IpsetError:
    if code == errno.ENOENT:
        return NoSuchSet(code, command, set_name, member)
    return IpsetError(code, command, set_name, member)


def parse_members(members: Iterable[str], family: int | None = None
                  ) -> tuple[list[tuple[int, bytes, int]], list[str]]:
    """Parse and check every member before anything is sent; dedupe, keep order.

    Returns the parsed entries and the caller's text of each (to name a failing one).
    """
    entries: list[tuple[int, bytes, int]] = []
    texts: list[str] = []
    seen: set[tuple[int, bytes, int]] = set()
    inet, pton = socket.AF_INET, socket.inet_pton
    for text in members:
        entry: tuple[int, bytes, int] | None = None
        if type(text) is str and "/" not in text and ":" not in text:
            try:  # noqa: SIM105 (a bare IPv4 address, most members: no general parser)
                entry = (inet, pton(inet, text), 32)
            except OSError:
                pass  # the general parser names the problem
        if entry is None:
            entry = parse_member(text)
        if family is not None and entry[0] != family:
            want = "IPv4" if family == socket.AF_INET else "IPv6"
            raise InvalidMember(text, f"the set holds {want} members only")
        if entry in seen:
            continue
        seen.add(entry)
        entries.append(entry)
        texts.append(text)
    return entries, texts
