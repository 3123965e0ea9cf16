"""NFQUEUE over netlink (``nfnetlink_queue``), in pure Python: receive packets, give verdicts.

The enforcer holds DNS answers here until the IPs they carry are in the domain
sets (see `enforcers.dns`): iptables sends them to queue N with
``-j NFQUEUE --queue-num N --queue-bypass``, so with no enforcer bound to the
queue they pass untouched (learning nothing: domain rules then fail closed).
The queue is configured fail-open (a full queue accepts rather than drops), so
DNS is never broken by us being slow.

Only the messages this needs are spoken: config (bind, copy mode, max length,
flags), packet, and verdict; the layout is the kernel's
``include/uapi/linux/netfilter/nfnetlink_queue.h``.
"""

from __future__ import annotations

import errno
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final

from enforcers import netns

NETLINK_NETFILTER: Final = 12
NFNL_SUBSYS_QUEUE: Final = 3
NFQNL_MSG_PACKET: Final = 0
NFQNL_MSG_VERDICT: Final = 1
NFQNL_MSG_CONFIG: Final = 2
NFQA_CFG_CMD: Final = 1
NFQA_CFG_PARAMS: Final = 2
NFQA_CFG_QUEUE_MAXLEN: Final = 3
NFQA_CFG_MASK: Final = 4
NFQA_CFG_FLAGS: Final = 5
NFQNL_CFG_CMD_BIND: Final = 1
NFQNL_CFG_CMD_UNBIND: Final = 2
NFQNL_COPY_PACKET: Final = 2
NFQA_CFG_F_FAIL_OPEN: Final = 0x1
NFQA_PACKET_HDR: Final = 1
NFQA_VERDICT_HDR: Final = 2
NFQA_IFINDEX_INDEV: Final = 5
NFQA_IFINDEX_OUTDEV: Final = 6
NFQA_PAYLOAD: Final = 10
NF_DROP: Final = 0
NF_ACCEPT: Final = 1
NLM_F_REQUEST: Final = 0x1
NLM_F_ACK: Final = 0x4
NLMSG_ERROR: Final = 2
_NLMSG = struct.Struct("=IHHII")
_NFGEN = struct.Struct("=BBH")  # family, version, res_id (big-endian, packed by hand)


class QueueError(OSError):
    """The kernel refused a queue operation (the message says which and why)."""


@dataclass(frozen=True, slots=True)
class QueuedPacket:
    """A packet the kernel holds until we give its verdict."""

    packet_id: int
    payload: bytes
    indev: int  # ifindex it arrived on (0: none, locally generated)
    outdev: int


def _attr(kind: int, data: bytes) -> bytes:
    size = 4 + len(data)
    return struct.pack("=HH", size, kind) + data + b"\0" * (-size % 4)


def _attrs(data: bytes) -> Iterator[tuple[int, bytes]]:
    pos = 0
    while pos + 4 <= len(data):
        size, kind = struct.unpack_from("=HH", data, pos)
        if size < 4:
            return
        yield kind & 0x3FFF, data[pos + 4 : pos + size]
        pos += (size + 3) & ~3


class NfQueue:
    """One bound NFQUEUE queue in a network namespace; a non-blocking netlink socket."""

    def __init__(self, number: int, namespace: str | None = None, max_len: int = 1024) -> None:
        self.number = number
        self.sock = netns.open_socket(namespace, socket.AF_NETLINK, socket.SOCK_RAW,
                                      NETLINK_NETFILTER)
        self._seq = 0
        try:
            self.sock.bind((0, 0))
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
            self._config(_attr(NFQA_CFG_CMD, struct.pack("!BxH", NFQNL_CFG_CMD_BIND, 0)), "bind")
            self._config(_attr(NFQA_CFG_PARAMS, struct.pack("!IB", 0xFFFF, NFQNL_COPY_PACKET)),
                         "copy mode")
            self._config(_attr(NFQA_CFG_QUEUE_MAXLEN, struct.pack("!I", max_len)), "length")
            self._config(_attr(NFQA_CFG_MASK, struct.pack("!I", NFQA_CFG_F_FAIL_OPEN))
                         + _attr(NFQA_CFG_FLAGS, struct.pack("!I", NFQA_CFG_F_FAIL_OPEN)),
                         "fail-open")
        except BaseException:
            self.sock.close()
            raise
        self.sock.setblocking(False)

    def fileno(self) -> int:
        return self.sock.fileno()

    def _message(self, kind: int, body: bytes, flags: int) -> bytes:
        self._seq += 1
        head = _NFGEN.pack(socket.AF_UNSPEC, 0, socket.htons(self.number))
        payload = head + body
        return _NLMSG.pack(_NLMSG.size + len(payload), (NFNL_SUBSYS_QUEUE << 8) | kind,
                           flags, self._seq, 0) + payload

    def _config(self, body: bytes, what: str) -> None:
        """Send a config message and wait for its acknowledgement (blocking socket)."""
        self.sock.send(self._message(NFQNL_MSG_CONFIG, body, NLM_F_REQUEST | NLM_F_ACK))
        seq = self._seq
        while True:
            data = self.sock.recv(65536)
            for kind, msg_seq, payload in _messages(data):
                if kind == NLMSG_ERROR and msg_seq == seq:
                    code = -struct.unpack_from("=i", payload, 0)[0]
                    if code:
                        raise QueueError(code, f"NFQUEUE {self.number}: {what} failed: "
                                         f"{errno.errorcode.get(code, code)}")
                    return

    def receive(self) -> list[QueuedPacket]:
        """The packets waiting now (none if nothing is; never blocks)."""
        out: list[QueuedPacket] = []
        while True:
            try:
                data = self.sock.recv(1 << 17)
            except BlockingIOError:
                return out
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:  # we fell behind: fail-open let them through
                    continue
                raise
            for kind, _seq, payload in _messages(data):
                if kind == (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET:
                    packet = _packet(payload[_NFGEN.size :])
                    if packet is not None:
                        out.append(packet)

    def verdict(self, packet_id: int, accept: bool = True) -> None:
        body = _attr(NFQA_VERDICT_HDR,
                     struct.pack("!II", NF_ACCEPT if accept else NF_DROP, packet_id))
        self.sock.send(self._message(NFQNL_MSG_VERDICT, body, NLM_F_REQUEST))

    def close(self) -> None:
        try:
            self.sock.setblocking(True)
            self.sock.settimeout(1.0)
            self._config(_attr(NFQA_CFG_CMD, struct.pack("!BxH", NFQNL_CFG_CMD_UNBIND, 0)),
                         "unbind")
        except OSError:
            pass  # closing the socket unbinds too
        finally:
            self.sock.close()


def _messages(data: bytes) -> Iterator[tuple[int, int, bytes]]:
    pos = 0
    while pos + _NLMSG.size <= len(data):
        length, kind, _flags, seq, _pid = _NLMSG.unpack_from(data, pos)
        if length < _NLMSG.size:
            return
        yield kind, seq, data[pos + _NLMSG.size : pos + length]
        pos += (length + 3) & ~3


def _packet(data: bytes) -> QueuedPacket | None:
    packet_id = None
    payload = b""
    indev = outdev = 0
    for kind, value in _attrs(data):
        if kind == NFQA_PACKET_HDR:
            packet_id = struct.unpack_from("!I", value, 0)[0]
        elif kind == NFQA_PAYLOAD:
            payload = value
        elif kind == NFQA_IFINDEX_INDEV:
            indev = struct.unpack_from("!I", value, 0)[0]
        elif kind == NFQA_IFINDEX_OUTDEV:
            outdev = struct.unpack_from("!I", value, 0)[0]
    return None if packet_id is None else QueuedPacket(packet_id, payload, indev, outdev)
