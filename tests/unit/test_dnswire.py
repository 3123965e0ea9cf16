"""enforcers.dnswire against independent oracles: dnspython for DNS messages, struct for headers.

Responses are random dnspython messages (question, answer rrsets of A, AAAA, CNAME and of
types that must be skipped, TTLs up to 2**32 - 1, an authority section that is never
read), rendered three ways: dnspython's own ``to_wire`` (compressed, rdatas shuffled), and
a renderer here that writes records in a known order, with or without dnspython's name
compression, and says where each record ends. Truncated (TC) copies cut at every kind of
point keep exactly the records wholly present; anything else raises only `WireError`.
"""

from __future__ import annotations

import io
import ipaddress
import socket
import struct
from collections import Counter
from typing import Any

import dns.flags
import dns.message
import dns.name
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from enforcers.dnswire import (
    PROTO_TCP,
    PROTO_UDP,
    TYPE_A,
    TYPE_AAAA,
    TYPE_CNAME,
    Answer,
    Record,
    Segment,
    WireError,
    parse_message,
    parse_packet,
    split_tcp_messages,
)

FAST = settings(max_examples=150, deadline=None,
                suppress_health_check=[HealthCheck.too_slow])
KEPT = {dns.rdatatype.A, dns.rdatatype.AAAA, dns.rdatatype.CNAME}
IN = dns.rdataclass.IN

# --------------------------------------------------------------------------- strategies

_LDH = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_"
label_st = st.one_of(
    st.sampled_from(["www", "api", "a", "b", "example", "com", "org", "cdn", "Mail", "EXAMPLE"]),
    st.text(_LDH, min_size=1, max_size=12),
    st.text(_LDH, min_size=60, max_size=63),  # long labels: names near the 255-byte limit
)


@st.composite
def name_st(draw: st.DrawFn, pool: list[dns.name.Name] | None = None) -> dns.name.Name:
    """A name: fresh labels, optionally under a name of ``pool`` (so compression has
    suffixes to share)."""
    labels = draw(st.lists(label_st, min_size=0 if pool else 1, max_size=4))
    suffix: tuple[bytes, ...] = (b"",)
    if pool and draw(st.booleans()):
        suffix = draw(st.sampled_from(pool)).labels
    wire = [label.encode() for label in labels]
    # stay within 255 bytes on the wire (1 length byte per label, plus the root byte)
    while wire and sum(len(x) + 1 for x in wire) + sum(len(x) + 1 for x in suffix) > 255:
        wire.pop(0)
    if not wire and suffix == (b"",):
        wire = [b"x"]
    return dns.name.Name((*wire, *suffix))


ttl_st = st.one_of(
    st.integers(0, 86_400),
    st.integers(2**31 - 2, 2**31 + 1),
    st.integers(0, 2**32 - 1),
    st.just(2**32 - 1),
)
ipv4_st = st.binary(min_size=4, max_size=4).map(lambda b: socket.inet_ntop(socket.AF_INET, b))
ipv6_st = st.binary(min_size=16, max_size=16).map(
    lambda b: socket.inet_ntop(socket.AF_INET6, b))


@st.composite
def rdata_st(draw: st.DrawFn, pool: list[dns.name.Name]) -> dns.rdata.Rdata:
    kind = draw(st.sampled_from(["A", "AAAA", "CNAME", "A", "CNAME", "TXT", "MX", "NS",
                                 "SRV", "PTR"]))
    if kind == "A":
        text = draw(ipv4_st)
    elif kind == "AAAA":
        text = draw(ipv6_st)
    elif kind in ("CNAME", "NS", "PTR"):
        text = draw(name_st(pool)).to_text()
    elif kind == "MX":
        text = f"{draw(st.integers(0, 65535))} {draw(name_st(pool)).to_text()}"
    elif kind == "SRV":
        text = f"1 2 3 {draw(name_st(pool)).to_text()}"
    else:
        text = '"' + draw(st.text("abc xyz.=\\", max_size=40)).replace("\\", "") + '"'
    return dns.rdata.from_text(IN, dns.rdatatype.from_text(kind), text)


@st.composite
def response_st(draw: st.DrawFn, single: bool = False) -> dns.message.Message:
    """A random response; ``single``: each answer rrset holds one rdata (so dnspython's
    shuffling of an rrset's rdatas cannot change the wire)."""
    qname = draw(name_st())
    pool = [qname]
    query = dns.message.make_query(qname, draw(st.sampled_from(["A", "AAAA", "ANY"])))
    msg = dns.message.make_response(query)
    msg.id = draw(st.integers(0, 65535))
    msg.set_rcode(draw(st.sampled_from([0, 0, 0, 1, 2, 3, 5, 15])))
    for _ in range(draw(st.integers(0, 7))):
        owner = draw(st.sampled_from(pool)) if draw(st.booleans()) else draw(name_st(pool))
        pool.append(owner)
        rdatas = [draw(rdata_st(pool))]
        if not single:
            rdatas += [rd for rd in draw(st.lists(rdata_st(pool), max_size=3))
                       if rd.rdtype == rdatas[0].rdtype]
        rrset = dns.rrset.from_rdata_list(owner, draw(ttl_st), rdatas)
        msg.answer.append(rrset)
        for rd in rdatas:
            if hasattr(rd, "target"):
                pool.append(rd.target)
            elif hasattr(rd, "exchange"):
                pool.append(rd.exchange)
    for _ in range(draw(st.integers(0, 2))):
        owner = draw(st.sampled_from(pool))
        msg.authority.append(dns.rrset.from_rdata_list(owner, draw(ttl_st), [
            dns.rdata.from_text(IN, dns.rdatatype.NS, draw(name_st(pool)).to_text())]))
    return msg


# --------------------------------------------------------------------------- oracle


def text_of(name: dns.name.Name) -> str:
    """How dnswire spells a name: lowercase, dot-joined, no trailing dot."""
    return ".".join(label.decode().lower() for label in name.labels if label)


def expected_records(msg: dns.message.Message) -> list[tuple[str, int, int, str]]:
    """The answer records dnswire must return, in rendering order (within an rrset: the
    rdataset's order, which dnspython's to_wire may shuffle)."""
    out = []
    for rrset in msg.answer:
        for rd in rrset:
            if rrset.rdclass != IN or rrset.rdtype not in KEPT:
                continue
            data = text_of(rd.target) if rrset.rdtype == dns.rdatatype.CNAME else rd.address
            out.append((text_of(rrset.name), int(rrset.rdtype), wire_ttl(rrset.ttl), data))
    return out


def wire_ttl(ttl: int) -> int:
    """RFC 2181 section 8: a TTL with the top bit set is read as zero (as dnspython does)."""
    return ttl if ttl < 2**31 else 0


def normal(record: Record | tuple[str, int, int, str]) -> tuple[str, int, int, str]:
    if isinstance(record, Record):
        record = (record.name, record.rtype, record.ttl, record.data)
    name, rtype, ttl, data = record
    if rtype in (TYPE_A, TYPE_AAAA):
        data = str(ipaddress.ip_address(data))
    return name, rtype, ttl, data


def render(msg: dns.message.Message, compress: bool) -> tuple[bytes, int, list[int]]:
    """The wire form of ``msg`` with its answer records in rdataset order (no shuffling),
    names compressed by dnspython's own name writer or not at all; the offset at which the
    question section ends, and those at which each answer record (of any type) ends."""
    out = io.BytesIO()
    table: dict[Any, int] | None = {} if compress else None
    out.write(struct.pack("!HHHHHH", msg.id, msg.flags | (msg.rcode() & 0xF),
                          len(msg.question), sum(len(r) for r in msg.answer),
                          sum(len(r) for r in msg.authority), 0))
    for q in msg.question:
        q.name.to_wire(out, table)
        out.write(struct.pack("!HH", q.rdtype, q.rdclass))
    question_end = out.tell()
    ends = []
    for section in (msg.answer, msg.authority):
        for rrset in section:
            for rd in rrset:
                rrset.name.to_wire(out, table)
                out.write(struct.pack("!HHI", rrset.rdtype, rrset.rdclass, rrset.ttl))
                at = out.tell()
                out.write(b"\0\0")
                rd.to_wire(out, table)
                end = out.tell()
                out.seek(at)
                out.write(struct.pack("!H", end - at - 2))
                out.seek(end)
                if section is msg.answer:
                    ends.append(end)
    return out.getvalue(), question_end, ends


# --------------------------------------------------------------------------- responses


@FAST
@given(response_st())
def test_dnspython_wire_matches_the_oracle(msg: dns.message.Message) -> None:
    """dnspython's to_wire (compressed; rdatas may be shuffled within an rrset)."""
    wire = msg.to_wire()
    answer = parse_message(wire)
    assert answer.id == msg.id
    assert answer.question == text_of(msg.question[0].name)
    assert answer.rcode == msg.rcode()
    assert answer.truncated is False
    expected = [normal(r) for r in expected_records(msg)]
    got = [normal(r) for r in answer.records]
    assert Counter(got) == Counter(expected)
    # the rrsets come in order; only the rdatas within one may be reordered
    assert [r[:3] for r in got] == [r[:3] for r in expected]
    # and dnspython reads the same records back from the same bytes
    back = dns.message.from_wire(wire)
    # (it merges the rrsets of one name and type, so compare without TTLs and repeats, and
    # keeps one CNAME per name)
    theirs = {(n, t, d) for n, t, _, d in map(normal, expected_records(back))}
    ours = {(n, t, d) for n, t, _, d in got}
    assert {r for r in theirs if r[1] != TYPE_CNAME} == {r for r in ours if r[1] != TYPE_CNAME}
    assert theirs <= ours


@FAST
@given(response_st(), st.booleans())
def test_ordered_rendering_matches_exactly(msg: dns.message.Message, compress: bool) -> None:
    wire, _, _ = render(msg, compress)
    answer = parse_message(wire)
    assert answer == Answer(msg.id, text_of(msg.question[0].name), msg.rcode(), False,
                            answer.records)
    assert [normal(r) for r in answer.records] == [normal(r) for r in expected_records(msg)]
    # the same message, compressed or not, reads the same
    assert parse_message(render(msg, not compress)[0]) == answer
    # addresses are spelled as ipaddress spells them (as everywhere else they are compared)
    for record in answer.records:
        if record.rtype != TYPE_CNAME:
            assert record.data == str(ipaddress.ip_address(record.data))


@FAST
@given(response_st(single=True))
def test_compression_is_actually_exercised_and_equal(msg: dns.message.Message) -> None:
    """With single-rdata rrsets dnspython's own wire is deterministic: it must be our
    compressed rendering byte for byte (so `render` is a faithful oracle) and parse alike."""
    wire, _, _ = render(msg, compress=True)
    assert wire == msg.to_wire()
    assert parse_message(wire) == parse_message(render(msg, compress=False)[0])


def test_compression_example() -> None:
    msg = dns.message.make_response(dns.message.make_query("WWW.Example.COM", "A"))
    msg.answer.append(dns.rrset.from_text("www.example.com.", 300, "IN", "CNAME",
                                          "cdn.example.com."))
    msg.answer.append(dns.rrset.from_text("cdn.example.com.", 2**31 + 5, "IN", "A",
                                          "192.0.2.1", "192.0.2.2"))
    msg.answer.append(dns.rrset.from_text("cdn.example.com.", 60, "IN", "TXT", '"v=1"'))
    msg.answer.append(dns.rrset.from_text("cdn.example.com.", 60, "IN", "MX",
                                          "10 mail.example.com."))
    msg.answer.append(dns.rrset.from_text("cdn.example.com.", 7, "IN", "AAAA", "2001:db8::1"))
    wire = msg.to_wire()
    assert wire.count(b"\xc0") >= 5  # pointers
    answer = parse_message(wire)
    assert answer.question == "www.example.com"
    assert sorted(answer.records, key=lambda r: (r.rtype, r.data)) == [
        Record("cdn.example.com", TYPE_A, 0, "192.0.2.1"),  # top bit set: zero
        Record("cdn.example.com", TYPE_A, 0, "192.0.2.2"),
        Record("www.example.com", TYPE_CNAME, 300, "cdn.example.com"),
        Record("cdn.example.com", TYPE_AAAA, 7, "2001:db8::1"),
    ]


@FAST
@given(response_st(), st.booleans())
def test_a_query_is_refused(msg: dns.message.Message, compress: bool) -> None:
    wire = bytearray(render(msg, compress)[0])
    wire[2] &= 0x7F  # QR clear
    with pytest.raises(WireError, match="query"):
        parse_message(bytes(wire))


def test_a_dnspython_query_is_refused() -> None:
    with pytest.raises(WireError):
        parse_message(dns.message.make_query("example.com", "A").to_wire())


# --------------------------------------------------------------------------- truncation


def one_record_each(msg: dns.message.Message) -> list[tuple[str, int, int, str] | None]:
    """For a message whose answer rrsets hold one rdata each: per answer record, what
    dnswire must return for it (None: a type it skips)."""
    out: list[tuple[str, int, int, str] | None] = []
    for rrset in msg.answer:
        alone = dns.message.Message(msg.id)
        alone.answer.append(rrset)
        kept = expected_records(alone)
        out.append(kept[0] if kept else None)
    return out


@FAST
@given(response_st(single=True), st.booleans(), st.data())
def test_truncated_responses_keep_exactly_the_whole_records(
        msg: dns.message.Message, compress: bool, data: st.DataObject) -> None:
    """TC set and the bytes cut anywhere (inside an owner name, a pointer, the fixed
    fields, the data, or at a record boundary): the records wholly before the cut."""
    msg.flags |= dns.flags.TC
    wire, question_end, ends = render(msg, compress)
    per_record = one_record_each(msg)
    cuts = {data.draw(st.integers(0, len(wire)), label="cut") for _ in range(3)}
    cuts |= {c + d for c in (question_end, *ends) for d in (-2, -1, 0, 1, 2, 3, 11)}
    for cut in sorted(c for c in cuts if 0 <= c <= len(wire)):
        if cut < question_end:
            with pytest.raises(WireError):
                parse_message(wire[:cut])
            continue
        answer = parse_message(wire[:cut])
        assert answer.truncated
        whole = sum(1 for e in ends if e <= cut)
        assert [normal(r) for r in answer.records] == [
            normal(r) for r in per_record[:whole] if r is not None], (cut, ends)
    assert [normal(r) for r in parse_message(wire).records] == [
        normal(r) for r in expected_records(msg)]


@FAST
@given(response_st(), st.booleans(), st.data())
def test_cut_responses_raise_only_wire_error(
        msg: dns.message.Message, compress: bool, data: st.DataObject) -> None:
    """Without TC a message cut before the end of its answer section is rejected; one cut
    in the (unread) authority section still reads whole."""
    wire, question_end, ends = render(msg, compress)
    answer_end = ends[-1] if ends else question_end
    for cut in {data.draw(st.integers(0, len(wire) - 1), label="cut") for _ in range(4)}:
        if cut < answer_end:
            with pytest.raises(WireError):
                parse_message(wire[:cut])
            continue
        assert [normal(r) for r in parse_message(wire[:cut]).records] == [
            normal(r) for r in expected_records(msg)]


# --------------------------------------------------------------------------- malformed


@settings(max_examples=600, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_raise_only_wire_error(blob: bytes) -> None:
    for message in (blob, b"\x12\x34\x81\x80" + blob, b"\x12\x34\x83\x80" + blob):
        try:
            answer = parse_message(message)
        except WireError:
            continue
        assert isinstance(answer, Answer)
        assert all(r.rtype in (TYPE_A, TYPE_AAAA, TYPE_CNAME) for r in answer.records)


@FAST
@given(response_st(), st.booleans(),
       st.lists(st.tuples(st.integers(0, 2**16), st.integers(0, 255)), min_size=1,
                max_size=6))
def test_corrupted_responses_raise_only_wire_error(
        msg: dns.message.Message, compress: bool, edits: list[tuple[int, int]]) -> None:
    wire = bytearray(render(msg, compress)[0])
    for at, value in edits:
        wire[at % len(wire)] = value
    try:
        answer = parse_message(bytes(wire))
    except WireError:
        return
    for record in answer.records:
        assert len(record.name) <= 254 and 0 <= record.ttl < 2**32
        if record.rtype == TYPE_CNAME:
            assert len(record.data) <= 254
        else:
            ipaddress.ip_address(record.data)


HEADER = struct.pack("!HHHHHH", 7, 0x8180, 1, 1, 0, 0)


@pytest.mark.parametrize(
    "name",
    [
        b"\xc0\x0c",  # points at itself
        b"\xc0\x0e\xc0\x0c",  # two pointers at each other
        b"\x01a\xc0\x0c",  # a label, then back to it: grows without end
        b"\x03www\x07example\xc0\x0c",
    ],
)
def test_pointer_loops_in_the_question(name: bytes) -> None:
    with pytest.raises(WireError, match=r"loop|longer|past"):
        parse_message(HEADER + name + b"\0\x01\0\x01")


def endless(segments: list[tuple[list[bytes], int]], base: int) -> bytes:
    """Segments of labels, each ending in a pointer to the start of a segment (the first
    one at offset ``base`` of the message): a name read from any of them never ends."""
    starts, at = [], base
    for labels, _ in segments:
        starts.append(at)
        at += sum(len(x) + 1 for x in labels) + 2
    return b"".join(
        b"".join(bytes([len(x)]) + x for x in labels)
        + struct.pack("!H", 0xC000 | starts[target % len(starts)])
        for labels, target in segments)


QUESTION = b"\x01q\0\0\x01\0\x01"  # q, A, IN (at offset 12)


@FAST
@given(st.lists(st.tuples(st.lists(st.sampled_from([b"a", b"bb", b"xyz"]), max_size=3),
                          st.integers(0, 20)), min_size=1, max_size=6),
       st.sampled_from(["question", "owner", "cname"]), st.booleans())
def test_names_that_never_end_raise_wire_error(
        segments: list[tuple[list[bytes], int]], where: str, truncated: bool) -> None:
    flags = 0x8380 if truncated else 0x8180
    if where == "question":
        wire = (struct.pack("!HHHHHH", 1, flags, 1, 0, 0, 0) + endless(segments, 12)
                + b"\0\x01\0\x01")
    elif where == "owner":
        wire = (struct.pack("!HHHHHH", 1, flags, 1, 1, 0, 0) + QUESTION
                + endless(segments, 12 + len(QUESTION))
                + struct.pack("!HHIH", 1, 1, 60, 4) + b"\1\2\3\4")
        if truncated:  # an owner name that is not all there ends a TC message's records
            assert parse_message(wire).records == ()
            return
    else:
        rdata = endless(segments, 12 + len(QUESTION) + 2 + 10)
        wire = (struct.pack("!HHHHHH", 1, flags, 1, 1, 0, 0) + QUESTION + b"\xc0\x0c"
                + struct.pack("!HHIH", 5, 1, 60, len(rdata)) + rdata)
    with pytest.raises(WireError, match=r"loop|longer"):
        parse_message(wire)


def test_name_length_limit() -> None:
    """255 bytes on the wire, the root's zero byte included (RFC 1035 3.1)."""
    def wire_of(total: int) -> bytes:
        labels, left = b"", total - 1  # the root byte
        while left:
            size = min(63, left - 1)
            labels += bytes([size]) + b"a" * size
            left -= size + 1
        assert len(labels) + 1 == total
        return HEADER[:6] + b"\0\0\0\0\0\0" + labels + b"\0\0\x01\0\x01"

    assert parse_message(wire_of(255)).question is not None
    assert len(parse_message(wire_of(255)).question or "") == 253
    with pytest.raises(WireError, match="255"):
        parse_message(wire_of(256))


def test_unsupported_label_types_and_skipped_records() -> None:
    with pytest.raises(WireError, match="label type"):
        parse_message(HEADER + b"\x41a\0\0\x01\0\x01")
    # A and AAAA records of the wrong size, and one of class CH, are skipped
    body = (b"\x01q\0\0\x01\0\x01"
            + b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 5, 3) + b"\1\2\3"
            + b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 5, 16) + b"\1" * 16
            + b"\xc0\x0c" + struct.pack("!HHIH", 28, 1, 5, 4) + b"\1\2\3\4"
            + b"\xc0\x0c" + struct.pack("!HHIH", 1, 3, 5, 4) + b"\1\2\3\4"
            + b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 5, 4) + b"\1\2\3\4")
    answer = parse_message(struct.pack("!HHHHHH", 9, 0x8183, 1, 5, 0, 0) + body)
    assert answer.rcode == 3 and answer.id == 9
    assert answer.records == (Record("q", TYPE_A, 5, "1.2.3.4"),)


def test_no_question() -> None:
    answer = parse_message(struct.pack("!HHHHHH", 1, 0x8180, 0, 0, 0, 0))
    assert answer.question is None and answer.records == ()


# --------------------------------------------------------------------------- IP and transport

v4_st = st.binary(min_size=4, max_size=4)
v6_st = st.binary(min_size=16, max_size=16)
port_st = st.integers(0, 65535)


def udp(sport: int, dport: int, payload: bytes, trailer: bytes = b"") -> bytes:
    return struct.pack("!HHHH", sport, dport, 8 + len(payload), 0xBEEF) + payload + trailer


def tcp(sport: int, dport: int, seq: int, payload: bytes, options: bytes = b"") -> bytes:
    assert len(options) % 4 == 0
    offset = (20 + len(options)) // 4
    return (struct.pack("!HHIIBBHHH", sport, dport, seq, 12345, offset << 4, 0x18, 512, 0, 0)
            + options + payload)


def ipv4(src: bytes, dst: bytes, protocol: int, body: bytes, options: bytes = b"",
         flags: int = 0x4000, padding: bytes = b"") -> bytes:
    ihl = (20 + len(options)) // 4
    total = ihl * 4 + len(body)
    return (struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0, total, 99, flags, 64, protocol, 0,
                        src, dst) + options + body + padding)


def ipv6(src: bytes, dst: bytes, protocol: int, body: bytes, padding: bytes = b"",
         flow: int = 0) -> bytes:
    return (struct.pack("!IHBB16s16s", (6 << 28) | flow, len(body), protocol, 64, src, dst)
            + body + padding)


@FAST
@given(st.sampled_from([4, 6]), st.sampled_from([PROTO_UDP, PROTO_TCP]), st.data(),
       port_st, port_st, st.binary(max_size=600), st.binary(max_size=8))
def test_packets_round_trip(family: int, protocol: int, data: st.DataObject, sport: int,
                            dport: int, payload: bytes, padding: bytes) -> None:
    src = data.draw(v4_st if family == 4 else v6_st, label="src")
    dst = data.draw(v4_st if family == 4 else v6_st, label="dst")
    seq = data.draw(st.integers(0, 2**32 - 1), label="seq")
    if protocol == PROTO_UDP:
        # bytes after the UDP length (inside the IP packet) are not payload
        body = udp(sport, dport, payload, data.draw(st.binary(max_size=4), label="trailer"))
    else:
        opts = b"\x01" * (4 * data.draw(st.integers(0, 10), label="tcp options"))
        body = tcp(sport, dport, seq, payload, opts)
    if family == 4:
        options = b"\x01" * (4 * data.draw(st.integers(0, 10), label="ip options"))
        flags = data.draw(st.sampled_from([0, 0x4000]), label="df")
        packet = ipv4(src, dst, protocol, body, options, flags, padding)
    else:
        packet = ipv6(src, dst, protocol, body, padding, data.draw(
            st.integers(0, 2**28 - 1), label="flow"))
    segment = parse_packet(packet)
    assert segment == Segment(family, protocol, segment.source, segment.destination, sport,
                              dport, payload, seq if protocol == PROTO_TCP else 0)
    assert segment.source == str(ipaddress.ip_address(src))
    assert segment.destination == str(ipaddress.ip_address(dst))
    # cut anywhere inside the IP packet proper: rejected, never anything else
    end = len(packet) - len(padding)
    cut = data.draw(st.integers(0, end - 1), label="cut")
    with pytest.raises(WireError):
        parse_packet(packet[:cut])


@FAST
@given(v4_st, v4_st, st.one_of(st.sampled_from([0x2000, 0x2001, 0x0001, 0x1FFF]),
                               st.integers(1, 0x3FFF)), st.booleans())
def test_ipv4_fragments_are_refused(src: bytes, dst: bytes, frag: int, df: bool) -> None:
    """More fragments (MF) or a fragment offset: the first fragment too (MF alone)."""
    packet = ipv4(src, dst, PROTO_UDP, udp(53, 999, b"x"), flags=frag | (0x4000 * df))
    with pytest.raises(WireError, match="fragment"):
        parse_packet(packet)


@pytest.mark.parametrize("protocol", [0, 1, 4, 41, 43, 44, 58, 132])
def test_other_protocols_are_refused(protocol: int) -> None:
    with pytest.raises(WireError, match="neither"):
        parse_packet(ipv4(b"\1\2\3\4", b"\5\6\7\x08", protocol, udp(53, 1, b"x")))
    with pytest.raises(WireError, match="neither"):
        parse_packet(ipv6(b"\1" * 16, b"\2" * 16, protocol, udp(53, 1, b"x")))


def test_bad_lengths() -> None:
    good = ipv4(b"\1\2\3\4", b"\5\6\7\x08", PROTO_UDP, udp(53, 1, b"abc"))
    assert parse_packet(good).payload == b"abc"
    for packet in (
        b"",
        b"\x50" + good[1:],  # version 5
        b"\x44" + good[1:],  # IHL 4
        good[:2] + struct.pack("!H", 19) + good[4:],  # total < header
        good[:2] + struct.pack("!H", len(good) + 1) + good[4:],  # total > bytes
        good[:24] + struct.pack("!H", 7) + good[26:],  # UDP length < 8
        good[:24] + struct.pack("!H", 12) + good[26:],  # UDP length > body
        ipv4(b"\1\2\3\4", b"\5\6\7\x08", PROTO_TCP, tcp(53, 1, 0, b"")[:12] + b"\x40"
             + tcp(53, 1, 0, b"")[13:]),  # TCP offset 16
        ipv4(b"\1\2\3\4", b"\5\6\7\x08", PROTO_TCP, tcp(53, 1, 0, b"")[:12] + b"\xf0"
             + tcp(53, 1, 0, b"")[13:]),  # TCP offset past the segment
    ):
        with pytest.raises(WireError):
            parse_packet(packet)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=120), st.sampled_from([b"", b"\x45", b"\x46", b"\x60"]))
def test_random_packets_raise_only_wire_error(blob: bytes, head: bytes) -> None:
    try:
        segment = parse_packet(head + blob)
    except WireError:
        return
    assert segment.family in (4, 6) and segment.protocol in (PROTO_UDP, PROTO_TCP)


def test_dns_answer_in_a_packet() -> None:
    msg = dns.message.make_response(dns.message.make_query("example.com", "A"))
    msg.answer.append(dns.rrset.from_text("example.com.", 30, "IN", "A", "192.0.2.9"))
    wire = msg.to_wire()
    segment = parse_packet(ipv6(socket.inet_pton(socket.AF_INET6, "fd00::53"),
                                socket.inet_pton(socket.AF_INET6, "fd00::1"), PROTO_UDP,
                                udp(53, 40000, wire)))
    assert (segment.source, segment.source_port) == ("fd00::53", 53)
    assert parse_message(segment.payload).records == (
        Record("example.com", TYPE_A, 30, "192.0.2.9"),)
    stream = struct.pack("!H", len(wire)) + wire
    segment = parse_packet(ipv4(b"\x0a\0\0\x35", b"\x0a\0\0\1", PROTO_TCP,
                                tcp(53, 40000, 77, stream)))
    assert segment.tcp_seq == 77 and split_tcp_messages(segment.payload) == ([wire], b"")


# --------------------------------------------------------------------------- TCP framing


def framed(messages: list[bytes]) -> bytes:
    return b"".join(struct.pack("!H", len(m)) + m for m in messages)


@FAST
@given(st.lists(st.binary(max_size=300), max_size=8), st.data())
def test_split_tcp_messages_reassembles_any_chunking(messages: list[bytes],
                                                     data: st.DataObject) -> None:
    stream = framed(messages)
    points = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10),
                              label="points"))
    chunks = [stream[a:b] for a, b in zip([0, *points], [*points, len(stream)], strict=True)]
    got: list[bytes] = []
    buffer = b""
    for chunk in chunks:
        whole, buffer = split_tcp_messages(buffer + chunk)
        got += whole
    assert got == messages and buffer == b""
    # one cut: the messages wholly before it, and the rest verbatim
    cut = data.draw(st.integers(0, len(stream)), label="cut")
    whole, rest = split_tcp_messages(stream[:cut])
    assert whole == messages[: len(whole)]
    assert framed(whole) + rest == stream[:cut]
    assert len(whole) == len(messages) or len(framed(messages[: len(whole) + 1])) > cut


def test_split_tcp_messages_edges() -> None:
    assert split_tcp_messages(b"") == ([], b"")
    assert split_tcp_messages(b"\0") == ([], b"\0")
    assert split_tcp_messages(b"\0\0\0\0") == ([b"", b""], b"")
    assert split_tcp_messages(b"\xff\xff" + b"a" * 100) == ([], b"\xff\xff" + b"a" * 100)
    big = b"z" * 65535
    assert split_tcp_messages(framed([big, b"x"])) == ([big, b"x"], b"")
