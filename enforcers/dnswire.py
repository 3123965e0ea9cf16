"""DNS answers as the kernel hands them over: IP packet -> transport -> DNS message. Pure.

Only what domain policy needs is decoded: the question, the A, AAAA and CNAME
records of the answer section (with their TTLs), the TC and RCODE bits. Name
compression is followed with a bound on jumps, so a crafted message can cost
nothing more than a `WireError`. Everything here takes bytes and returns plain
values: the NFQUEUE adapter (`enforcers.nfqueue`) and the DNS learner
(`enforcers.dnscache`) are the only users.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from dataclasses import dataclass
from typing import Final

__all__ = [
    "Answer",
    "Record",
    "Segment",
    "WireError",
    "parse_message",
    "parse_packet",
    "split_tcp_messages",
]

TYPE_A: Final = 1
TYPE_CNAME: Final = 5
TYPE_AAAA: Final = 28
CLASS_IN: Final = 1
PROTO_TCP: Final = 6
PROTO_UDP: Final = 17
#: A name has at most 127 labels; more pointer jumps than that is a loop.
MAX_POINTERS: Final = 128
MAX_NAME: Final = 255


class WireError(ValueError):
    """Bytes that are not what they claim to be (the message says where it went wrong)."""


@dataclass(frozen=True, slots=True)
class Segment:
    """The transport payload of one IP packet, with the addresses and ports it carries."""

    family: int  # 4 or 6
    protocol: int  # PROTO_UDP or PROTO_TCP
    source: str
    destination: str
    source_port: int
    destination_port: int
    payload: bytes
    tcp_seq: int = 0  # TCP only: the sequence number of the payload's first byte


@dataclass(frozen=True, slots=True)
class Record:
    """One answer record domain policy uses: ``data`` is an IP (A, AAAA) or a name (CNAME)."""

    name: str
    rtype: int
    ttl: int
    data: str


@dataclass(frozen=True, slots=True)
class Answer:
    """A DNS response: its id, question name, flags, and the records of its answer section."""

    id: int
    question: str | None
    rcode: int
    truncated: bool
    records: tuple[Record, ...]


# --------------------------------------------------------------------------- IP and transport


def _v6(raw: bytes) -> str:
    """IPv6 text as `ipaddress` spells it (everywhere else addresses are compared in that
    spelling; ``inet_ntop`` writes IPv4-mapped ones differently)."""
    return str(ipaddress.IPv6Address(raw))


def parse_packet(packet: bytes) -> Segment:
    """The UDP or TCP payload of an IPv4 or IPv6 packet (no IPv6 extension headers)."""
    if not packet:
        raise WireError("empty packet")
    version = packet[0] >> 4
    if version == 4:
        if len(packet) < 20:
            raise WireError("IPv4 header cut short")
        header = (packet[0] & 0x0F) * 4
        total = struct.unpack_from("!H", packet, 2)[0]
        if header < 20 or total < header or len(packet) < total:
            raise WireError("IPv4 lengths do not add up")
        if struct.unpack_from("!H", packet, 6)[0] & 0x3FFF:
            raise WireError("IPv4 fragment")
        protocol = packet[9]
        source = socket.inet_ntop(socket.AF_INET, packet[12:16])
        destination = socket.inet_ntop(socket.AF_INET, packet[16:20])
        body = packet[header:total]
    elif version == 6:
        if len(packet) < 40:
            raise WireError("IPv6 header cut short")
        length = struct.unpack_from("!H", packet, 4)[0]
        protocol = packet[6]
        source = _v6(packet[8:24])
        destination = _v6(packet[24:40])
        if len(packet) < 40 + length:
            raise WireError("IPv6 payload cut short")
        body = packet[40 : 40 + length]
    else:
        raise WireError(f"IP version {version}")
    return _transport(version, protocol, source, destination, body)


def _transport(family: int, protocol: int, source: str, destination: str,
               body: bytes) -> Segment:
    if protocol == PROTO_UDP:
        if len(body) < 8:
            raise WireError("UDP header cut short")
        sport, dport, length = struct.unpack_from("!HHH", body, 0)
        if length < 8 or length > len(body):
            raise WireError("UDP length does not add up")
        return Segment(family, protocol, source, destination, sport, dport, body[8:length])
    if protocol == PROTO_TCP:
        if len(body) < 20:
            raise WireError("TCP header cut short")
        sport, dport, seq = struct.unpack_from("!HHI", body, 0)
        offset = (body[12] >> 4) * 4
        if offset < 20 or offset > len(body):
            raise WireError("TCP data offset does not add up")
        return Segment(family, protocol, source, destination, sport, dport, body[offset:], seq)
    raise WireError(f"IP protocol {protocol} is neither UDP nor TCP")


def split_tcp_messages(stream: bytes) -> tuple[list[bytes], bytes]:
    """DNS over TCP: each message is prefixed by its 2-byte length. The whole messages at
    the start of ``stream``, and the bytes of the incomplete one that follows."""
    messages: list[bytes] = []
    pos = 0
    while len(stream) - pos >= 2:
        length = struct.unpack_from("!H", stream, pos)[0]
        if len(stream) - pos - 2 < length:
            break
        messages.append(stream[pos + 2 : pos + 2 + length])
        pos += 2 + length
    return messages, stream[pos:]


# --------------------------------------------------------------------------- DNS


def _name(message: bytes, pos: int) -> tuple[str, int]:
    """The (lowercased, dot-joined) name at ``pos`` and the position after it."""
    labels: list[str] = []
    end = -1
    jumps = 0
    length = 1  # the root's zero byte: 255 bytes on the wire in all (RFC 1035 3.1)
    while True:
        if pos >= len(message):
            raise WireError("name runs past the end of the message")
        size = message[pos]
        if size & 0xC0 == 0xC0:
            if pos + 1 >= len(message):
                raise WireError("compression pointer cut short")
            jumps += 1
            if jumps > MAX_POINTERS:
                raise WireError("compression pointers loop")
            if end < 0:
                end = pos + 2
            pos = ((size & 0x3F) << 8) | message[pos + 1]
            continue
        if size & 0xC0:
            raise WireError(f"label type {size >> 6:#x} is not supported")
        if size == 0:
            return ".".join(labels), (end if end >= 0 else pos + 1)
        label = message[pos + 1 : pos + 1 + size]
        if len(label) < size:
            raise WireError("label runs past the end of the message")
        length += size + 1
        if length > MAX_NAME:
            raise WireError("name longer than 255 bytes")
        labels.append(label.decode("ascii", "replace").lower())
        pos += 1 + size


def parse_message(message: bytes) -> Answer:
    """A DNS response's question and its A, AAAA and CNAME answers (class IN).

    Raises `WireError` for a query (QR clear) or bytes that are no DNS message.
    Records of other types are skipped; a truncated (TC) response keeps the
    records it holds, which are as true as those of a full one.
    """
    if len(message) < 12:
        raise WireError("DNS header cut short")
    ident, flags, qdcount, ancount = struct.unpack_from("!HHHH", message, 0)
    if not flags & 0x8000:
        raise WireError("a DNS query, not a response")
    pos = 12
    question: str | None = None
    for index in range(qdcount):
        name, pos = _name(message, pos)
        if pos + 4 > len(message):
            raise WireError("question cut short")
        pos += 4
        if index == 0:
            question = name
    records: list[Record] = []
    for _ in range(ancount):
        try:
            name, pos = _name(message, pos)
        except WireError:
            if flags & 0x0200:
                break  # truncated inside (or right before) a record's owner name
            raise
        if pos + 10 > len(message):
            if flags & 0x0200:
                break  # truncated: what arrived is all there is
            raise WireError("answer record cut short")
        rtype, rclass, ttl, size = struct.unpack_from("!HHIH", message, pos)
        pos += 10
        if pos + size > len(message):
            if flags & 0x0200:
                break
            raise WireError("answer data cut short")
        data = message[pos : pos + size]
        ttl = ttl if ttl < 2**31 else 0  # RFC 2181: a TTL with the top bit set means zero
        start = pos
        pos += size
        if rclass != CLASS_IN:
            continue
        if rtype == TYPE_A and size == 4:
            records.append(Record(name, rtype, ttl, socket.inet_ntop(socket.AF_INET, data)))
        elif rtype == TYPE_AAAA and size == 16:
            records.append(Record(name, rtype, ttl, _v6(data)))
        elif rtype == TYPE_CNAME:
            target, _ = _name(message, start)
            records.append(Record(name, rtype, ttl, target))
    return Answer(ident, question, flags & 0x000F, bool(flags & 0x0200), tuple(records))
