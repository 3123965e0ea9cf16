"""NFLOG over netlink (``nfnetlink_log``), in pure Python: receive the packets our flow-log
rules copy (``-j NFLOG --nflog-group G``; see ``render.FlowLog``).

NFLOG never holds a packet: the kernel copies its first bytes (``copy_range``: enough
for the IP and transport headers) to the bound socket and the packet goes on at once.
If we are slow, the socket's buffer fills and the kernel drops log messages, never
packets: ``receive`` counts what was lost, from the per-group sequence numbers the
kernel stamps on every message (``NFULNL_CFG_F_SEQ``) and from ``ENOBUFS``.

Only the messages this needs are spoken: config (bind, copy mode, batching, flags) and
packet; the layout is the kernel's ``include/uapi/linux/netfilter/nfnetlink_log.h``.
"""

from __future__ import annotations

import errno
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final

from enforcers import netns
from enforcers.nfqueue import NETLINK_NETFILTER, NLM_F_ACK, NLM_F_REQUEST, NLMSG_ERROR

NFNL_SUBSYS_ULOG: Final = 4
NFULNL_MSG_PACKET: Final = 0
NFULNL_MSG_CONFIG: Final = 1
NFULA_CFG_CMD: Final = 1
NFULA_CFG_MODE: Final = 2
NFULA_CFG_NLBUFSIZ: Final = 3
NFULA_CFG_TIMEOUT: Final = 4
NFULA_CFG_QTHRESH: Final = 5
NFULA_CFG_FLAGS: Final = 6
NFULNL_CFG_CMD_BIND: Final = 1
NFULNL_CFG_CMD_UNBIND: Final = 2
NFULNL_COPY_PACKET: Final = 2
NFULNL_CFG_F_SEQ: Final = 0x0001
NFULA_PACKET_HDR: Final = 1
NFULA_IFINDEX_INDEV: Final = 4
NFULA_IFINDEX_OUTDEV: Final = 5
NFULA_PAYLOAD: Final = 9
NFULA_PREFIX: Final = 10
NFULA_SEQ: Final = 12
_NLMSG = struct.Struct("=IHHII")
_NFGEN = struct.Struct("=BBH")


class LogError(OSError):
    """The kernel refused a log-group operation (the message says which and why)."""


@dataclass(frozen=True, slots=True)
class LoggedPacket:
    """One packet a flow-log rule copied: the rule's prefix, the first bytes of the
    packet (from its IP header), the interfaces (ifindex, 0: none), the address family
    and the group's sequence number (None if the kernel sent none)."""

    prefix: str
    payload: bytes
    indev: int = 0
    outdev: int = 0
    family: int = 0
    seq: int | None = None


def attribute(kind: int, data: bytes) -> bytes:
    size = 4 + len(data)
    return struct.pack("=HH", size, kind) + data + b"\0" * (-size % 4)


def attributes(data: bytes) -> Iterator[tuple[int, bytes]]:
    pos = 0
    while pos + 4 <= len(data):
        size, kind = struct.unpack_from("=HH", data, pos)
        if size < 4:
            return
        yield kind & 0x3FFF, data[pos + 4 : pos + size]
        pos += (size + 3) & ~3


def messages(data: bytes) -> Iterator[tuple[int, int, bytes]]:
    """(type, sequence, payload) of each netlink message in a datagram."""
    pos = 0
    while pos + _NLMSG.size <= len(data):
        length, kind, _flags, seq, _pid = _NLMSG.unpack_from(data, pos)
        if length < _NLMSG.size:
            return
        yield kind, seq, data[pos + _NLMSG.size : pos + length]
        pos += (length + 3) & ~3


def parse_packet(message: bytes) -> LoggedPacket:
    """A ``NFULNL_MSG_PACKET`` message's payload (its nfgenmsg first) as a `LoggedPacket`."""
    family = message[0] if message else 0
    prefix = ""
    payload = b""
    indev = outdev = 0
    seq: int | None = None
    for kind, value in attributes(message[_NFGEN.size :]):
        if kind == NFULA_PREFIX:
            prefix = value.split(b"\0", 1)[0].decode("ascii", "replace")
        elif kind == NFULA_PAYLOAD:
            payload = value
        elif kind == NFULA_IFINDEX_INDEV and len(value) >= 4:
            indev = struct.unpack_from("!I", value, 0)[0]
        elif kind == NFULA_IFINDEX_OUTDEV and len(value) >= 4:
            outdev = struct.unpack_from("!I", value, 0)[0]
        elif kind == NFULA_SEQ and len(value) >= 4:
            seq = struct.unpack_from("!I", value, 0)[0]
    return LoggedPacket(prefix, payload, indev, outdev, family, seq)


class NfLog:
    """One bound NFLOG group in a network namespace; a non-blocking netlink socket.

    ``copy_range``: bytes of each packet copied (from its IP header); ``batch``: messages
    the kernel gathers before it sends (it sends sooner after ``flush_after`` 1/100 s);
    ``buffer``: the socket's receive buffer (a burst of that many bytes is never lost)."""

    def __init__(self, group: int, namespace: str | None = None, copy_range: int = 80,
                 batch: int = 32, flush_after: int = 5, buffer: int = 8 << 20) -> None:
        if not 0 <= group <= 65535:
            raise ValueError(f"NFLOG group must be 0-65535, got {group}")
        self.group = group
        self.sock = netns.open_socket(namespace, socket.AF_NETLINK, socket.SOCK_RAW,
                                      NETLINK_NETFILTER)
        self._seq = 0
        self._next_seq: int | None = None
        #: log messages the kernel could not deliver (seen as gaps or ENOBUFS)
        self.lost = 0
        self.overruns = 0
        try:
            self.sock.bind((0, 0))
            self._set_buffer(buffer)
            self._config(attribute(NFULA_CFG_CMD, struct.pack("!B", NFULNL_CFG_CMD_BIND)),
                         "bind")
            self._config(attribute(NFULA_CFG_MODE,
                                   struct.pack("!IBx", copy_range, NFULNL_COPY_PACKET)),
                         "copy mode")
            self._config(attribute(NFULA_CFG_QTHRESH, struct.pack("!I", batch))
                         + attribute(NFULA_CFG_TIMEOUT, struct.pack("!I", flush_after))
                         + attribute(NFULA_CFG_FLAGS, struct.pack("!H", NFULNL_CFG_F_SEQ)),
                         "batching")
        except BaseException:
            self.sock.close()
            raise
        self.sock.setblocking(False)

    def _set_buffer(self, size: int) -> None:
        try:  # root may go past net.core.rmem_max
            self.sock.setsockopt(socket.SOL_SOCKET, 33, size)  # SO_RCVBUFFORCE
        except OSError:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)

    def fileno(self) -> int:
        return self.sock.fileno()

    def _message(self, kind: int, body: bytes, flags: int) -> bytes:
        self._seq += 1
        head = _NFGEN.pack(socket.AF_UNSPEC, 0, socket.htons(self.group))
        payload = head + body
        return _NLMSG.pack(_NLMSG.size + len(payload), (NFNL_SUBSYS_ULOG << 8) | kind,
                           flags, self._seq, 0) + payload

    def _config(self, body: bytes, what: str) -> None:
        """Send a config message and wait for its acknowledgement (blocking socket)."""
        self.sock.send(self._message(NFULNL_MSG_CONFIG, body, NLM_F_REQUEST | NLM_F_ACK))
        seq = self._seq
        while True:
            data = self.sock.recv(65536)
            for kind, msg_seq, payload in messages(data):
                if kind == NLMSG_ERROR and msg_seq == seq:
                    code = -struct.unpack_from("=i", payload, 0)[0]
                    if code:
                        raise LogError(code, f"NFLOG group {self.group}: {what} failed: "
                                       f"{errno.errorcode.get(code, code)}")
                    return

    def receive(self, max_datagrams: int = 256) -> list[LoggedPacket]:
        """The packets waiting now, from at most `max_datagrams` reads (never blocks)."""
        out: list[LoggedPacket] = []
        for _ in range(max_datagrams):
            try:
                data = self.sock.recv(1 << 18)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:  # the kernel dropped messages: seq says how many
                    self.overruns += 1
                    continue
                raise
            for kind, _seq, payload in messages(data):
                if kind == (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_PACKET:
                    packet = parse_packet(payload)
                    self._count(packet.seq)
                    out.append(packet)
        return out

    def _count(self, seq: int | None) -> None:
        if seq is None:
            return
        if self._next_seq is not None and seq != self._next_seq:
            self.lost += (seq - self._next_seq) % (1 << 32)
        self._next_seq = (seq + 1) % (1 << 32)

    def close(self) -> None:
        try:
            self.sock.setblocking(True)
            self.sock.settimeout(1.0)
            self._config(attribute(NFULA_CFG_CMD, struct.pack("!B", NFULNL_CFG_CMD_UNBIND)),
                         "unbind")
        except OSError:
            pass  # closing the socket unbinds too
        finally:
            self.sock.close()
