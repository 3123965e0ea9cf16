"""DNS wire decoding against dnspython (an independent implementation) as the oracle."""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import struct

import dns.message
import dns.rdataclass
import dns.rdatatype
import dns.rrset
from hypothesis import given, settings
from hypothesis import strategies as st

from enforcers.dnswire import (
    TYPE_A,
    TYPE_AAAA,
    TYPE_CNAME,
    WireError,
    parse_message,
    parse_packet,
    split_tcp_messages,
)

labels = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?", fullmatch=True)
names = st.lists(labels, min_size=1, max_size=4).map(".".join)
ttls = st.integers(0, 2**32 - 1)
records = st.one_of(
    st.tuples(names, st.just("A"), ttls, st.ip_addresses(v=4).map(str)),
    st.tuples(names, st.just("AAAA"), ttls, st.ip_addresses(v=6).map(str)),
    st.tuples(names, st.just("CNAME"), ttls, names),
    st.tuples(names, st.just("TXT"), ttls, st.just('"hello"')),
    st.tuples(names, st.just("MX"), ttls, names.map(lambda n: f"10 {n}.")),
)
TYPES = {"A": TYPE_A, "AAAA": TYPE_AAAA, "CNAME": TYPE_CNAME}


def _response(question: str, answers: list[tuple[str, str, int, str]]) -> bytes:
    response = dns.message.make_response(dns.message.make_query(question + ".", "A"))
    for name, rtype, ttl, value in answers:
        data = value + "." if rtype == "CNAME" else value
        response.answer.append(dns.rrset.from_text(name + ".", ttl, "IN", rtype, data))
    return response.to_wire()  # compresses names


@settings(max_examples=300, deadline=None)
@given(names, st.lists(records, max_size=6, unique_by=lambda r: (r[0], r[1])))  # one rrset each
def test_records_decode_as_dnspython_encodes_them(
    question: str, answers: list[tuple[str, str, int, str]]
) -> None:
    wire = _response(question, answers)
    got = parse_message(wire)
    oracle = dns.message.from_wire(wire)
    want = [
        (str(rrset.name).rstrip(".").lower(), TYPES[dns.rdatatype.to_text(rrset.rdtype)],
         rrset.ttl, str(rdata.target).rstrip(".") if rrset.rdtype == dns.rdatatype.CNAME
         else str(ipaddress.ip_address(rdata.address)))
        for rrset in oracle.answer for rdata in rrset
        if dns.rdatatype.to_text(rrset.rdtype) in TYPES
    ]
    assert [(r.name, r.rtype, r.ttl, r.data) for r in got.records] == want
    assert got.question == question and got.rcode == 0 and not got.truncated
    assert got.id == oracle.id


@settings(max_examples=300, deadline=None)
@given(names, st.lists(records, min_size=1, max_size=6), st.data())
def test_cut_messages_raise_wire_errors_or_keep_whole_records_when_truncated(
    question: str, answers: list[tuple[str, str, int, str]], data: st.DataObject
) -> None:
    wire = bytearray(_response(question, answers))
    cut = data.draw(st.integers(0, len(wire) - 1))
    truncated = data.draw(st.booleans())
    if truncated and len(wire) > 3:
        wire[2] |= 0x02  # TC
    full = parse_message(bytes(wire))
    try:
        part = parse_message(bytes(wire[:cut]))
    except WireError:
        return
    assert list(part.records) == list(full.records)[: len(part.records)]


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=300))
def test_any_bytes_raise_only_wire_errors(raw: bytes) -> None:
    for parse in (parse_message, parse_packet):
        with contextlib.suppress(WireError):  # anything else fails the test
            parse(raw)


def test_compression_loops_and_queries_are_wire_errors() -> None:
    header = struct.pack("!HHHHHH", 1, 0x8180, 1, 0, 0, 0)
    for bad in (header + b"\xc0\x0c\x00\x01\x00\x01",  # a pointer to itself
                struct.pack("!HHHHHH", 1, 0x0100, 0, 0, 0, 0)):  # a query
        try:
            parse_message(bad)
        except WireError:
            continue
        raise AssertionError(bad)


@given(st.ip_addresses(), st.ip_addresses(), st.integers(1, 65535), st.integers(1, 65535),
       st.binary(max_size=64), st.booleans())
def test_packets_give_back_their_addresses_ports_and_payload(
    src: ipaddress.IPv4Address | ipaddress.IPv6Address,
    dst: ipaddress.IPv4Address | ipaddress.IPv6Address,
    sport: int, dport: int, payload: bytes, tcp: bool,
) -> None:
    if src.version != dst.version:
        dst = src
    body = (struct.pack("!HHIIBBHHH", sport, dport, 7, 0, 5 << 4, 0x18, 1024, 0, 0) + payload
            if tcp else struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload)
    proto = 6 if tcp else 17
    family = socket.AF_INET if src.version == 4 else socket.AF_INET6
    if src.version == 4:
        packet = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(body), 0, 0x4000, 64, proto, 0,
                             socket.inet_pton(family, str(src)),
                             socket.inet_pton(family, str(dst))) + body
    else:
        packet = struct.pack("!IHBB16s16s", 6 << 28, len(body), proto, 64,
                             socket.inet_pton(family, str(src)),
                             socket.inet_pton(family, str(dst))) + body
    segment = parse_packet(packet)
    assert (segment.source, segment.destination) == (str(src), str(dst))
    assert (segment.source_port, segment.destination_port, segment.payload) == (
        sport, dport, payload)
    assert segment.tcp_seq == (7 if tcp else 0)


@given(st.lists(st.binary(max_size=40), max_size=5), st.data())
def test_tcp_streams_split_into_their_messages(messages: list[bytes], data: st.DataObject) -> None:
    stream = b"".join(struct.pack("!H", len(m)) + m for m in messages)
    cut = data.draw(st.integers(0, len(stream)))
    first, rest = split_tcp_messages(stream[:cut])
    second, left = split_tcp_messages(rest + stream[cut:])
    assert first + second == messages and left == b""
