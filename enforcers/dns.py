"""DNS learning on a node: hold each trusted answer until its IPs are programmed.

``pc-dns`` (``render.dns_chain``) sends answers from trusted DNS servers to local
endpoints to an NFQUEUE queue; `DnsSnooper` reads them, decodes them
(`enforcers.dnswire`), hands what they teach to the domain sets
(`enforcers.dnscache`), has the enforcer program the new members, and only then
accepts the packet. So the pod gets its answer after the IPs are in the sets:
its first connection to a new name is never dropped. This is Calico
Enterprise's DelayDNSResponse, done in the enforcer's own loop; a node-local
proxy would add a hop to every lookup, not only to the answers that change a set.

Never hang DNS: every packet gets its verdict in the same callback, accepted
whatever happens (a packet we cannot decode, a program that fails); a hold that
took longer than ``max_hold`` is counted. With no enforcer bound to the queue
the kernel passes answers untouched (``--queue-bypass``): nothing is learned and
domain rules fail closed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from enforcers.dnscache import DomainSets, Learned, MemberChange, chains_of
from enforcers.dnswire import (
    PROTO_TCP,
    Segment,
    WireError,
    parse_message,
    parse_packet,
    split_tcp_messages,
)
from enforcers.metrics import EnforcerMetrics
from enforcers.nfqueue import NfQueue, QueuedPacket
from enforcers.render import DnsCapture

log = logging.getLogger(__name__)

#: Bytes of an unfinished DNS-over-TCP message kept per flow (a message is at most 64 KiB).
MAX_TCP_BUFFER = 65_537
MAX_TCP_FLOWS = 4096

Flow = tuple[str, int, str, int]


@dataclass(frozen=True)
class DnsSettings:
    """How a node learns from DNS: the trusted servers' addresses, the NFQUEUE queue, the
    grace added to every TTL, the IPs kept per name, and the longest expected hold."""

    servers: tuple[str, ...]
    queue: int = 100
    namespace: str | None = None
    grace: float = 2.0
    max_ips: int = 64
    max_hold: float = 0.5
    #: where what was learned is kept across restarts (None: not kept)
    state_file: str | None = None
    #: publish what is learned on the dns topic (for audit)
    publish: bool = True

    def capture(self) -> DnsCapture:
        return DnsCapture(self.queue, self.servers)


@dataclass
class _TcpStream:
    next_seq: int
    data: bytes


class DnsSnooper:
    """Reads one NFQUEUE queue; learns, programs, then releases each answer."""

    def __init__(
        self,
        settings: DnsSettings,
        domains: DomainSets,
        apply: Callable[[list[MemberChange], float], None],
        metrics: EnforcerMetrics,
        publish: Callable[[Learned, Segment, float], None] | None = None,
    ) -> None:
        """``apply(changes, learned_at)``: put the members in the states and program them
        (synchronously: the answer is released when it returns). ``publish``: what an
        answer taught, for the dns topic (None: not published)."""
        self.settings = settings
        self.servers = frozenset(settings.servers)
        self.domains = domains
        self.apply = apply
        self.metrics = metrics
        self.publish = publish
        self.max_hold = settings.max_hold
        self.queue: NfQueue | None = None
        self._tcp: dict[Flow, _TcpStream] = {}

    def open(self) -> NfQueue:
        """Bind the queue (`readable` must then be called when its socket is readable)."""
        self.queue = NfQueue(self.settings.queue, self.settings.namespace)
        return self.queue

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        loop.add_reader(self.open().fileno(), self.readable)
        log.info("learning DNS answers of %s on NFQUEUE %d", ", ".join(sorted(self.servers)),
                 self.settings.queue)

    def stop(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        if self.queue is not None:
            if loop is not None:
                loop.remove_reader(self.queue.fileno())
            self.queue.close()
            self.queue = None

    def readable(self) -> None:
        if self.queue is None:
            return
        for packet in self.queue.receive():
            self.handle(packet)

    def handle(self, packet: QueuedPacket) -> None:
        """Learn from one queued packet, then accept it (always)."""
        started = time.monotonic()
        try:
            self._learn(packet.payload, time.time())
        except Exception:  # never keep an answer from its pod
            self.metrics.dns_errors.inc()
            log.exception("learning from a DNS answer failed; released it")
        finally:
            if self.queue is not None:
                self.queue.verdict(packet.packet_id, accept=True)
            held = time.monotonic() - started
            self.metrics.dns_hold.observe(held)
            if held > self.max_hold:
                self.metrics.dns_slow_holds.inc()

    def _learn(self, payload: bytes, now: float) -> None:
        try:
            segment = parse_packet(payload)
        except WireError as exc:
            self.metrics.dns_malformed.inc()
            log.debug("not an IP packet we can read: %s", exc)
            return
        if segment.source not in self.servers or segment.source_port != 53:
            self.metrics.dns_untrusted.inc()
            return
        if segment.protocol == PROTO_TCP:
            messages = self._tcp_messages(segment.source, segment.source_port,
                                          segment.destination, segment.destination_port,
                                          segment.tcp_seq, segment.payload)
        else:
            messages = [segment.payload]
        for message in messages:
            try:
                answer = parse_message(message)
            except WireError as exc:
                self.metrics.dns_malformed.inc()
                log.debug("a DNS answer we cannot read from %s: %s", segment.source, exc)
                continue
            learned = chains_of(answer)
            changes = self.domains.learn_items(learned, now)
            self.metrics.dns_answers.inc()
            if changes:
                self.apply(changes, now)
                self.metrics.dns_ips_programmed.inc(
                    sum(1 for _uid, _key, ips in changes if ips is not None))
            if self.publish is not None:
                for item in learned:
                    self.publish(item, segment, now)

    def _tcp_messages(self, src: str, sport: int, dst: str, dport: int, seq: int,
                      data: bytes) -> list[bytes]:
        """Whole DNS messages of a TCP flow, reassembled from in-order segments (a segment
        out of order drops what was gathered: its answer is then not learned)."""
        if not data:
            return []
        flow = (src, sport, dst, dport)
        stream = self._tcp.get(flow)
        if stream is not None and stream.next_seq == seq:
            buffer = stream.data + data
        elif stream is not None and (seq - stream.next_seq) % 2**32 > 2**31:
            return []  # a retransmission of what we have seen: learned already
        else:
            buffer = data
        messages, rest = split_tcp_messages(buffer)
        if rest and len(rest) <= MAX_TCP_BUFFER:
            if len(self._tcp) >= MAX_TCP_FLOWS:
                self._tcp.pop(next(iter(self._tcp)))
            self._tcp[flow] = _TcpStream((seq + len(data)) % 2**32, rest)
        else:
            self._tcp.pop(flow, None)
        return messages

    def expire(self, now: float) -> list[MemberChange]:
        return self.domains.expire(now)
