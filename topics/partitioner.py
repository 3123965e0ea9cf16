"""Which partition a record goes to: Kafka's murmur2 of its namespace (else its name).

Every producer (watchers, `portcullis apply`, the Faust streams) passes the
partition explicitly, computed here, so all of them agree regardless of their
client library's default partitioner, and one namespace always lands on one
partition: the worker that owns it sees its endpoints, profiles and selectors
in one ordered stream. The hash is byte-identical to the Java client's
``Utils.murmur2`` and ``toPositive``, so a Java or Kafka Streams producer
hashing the same partition key with the default partitioner agrees too.
"""

from __future__ import annotations

from typing import Protocol

from topics.records import DeadLetterRecord

__all__ = [
    "murmur2",
    "partition_for",
    "partition_for_key",
    "partitions_for",
    "to_positive",
]

_MASK = 0xFFFFFFFF
_SEED = 0x9747B28C
_M = 0x5BD1E995
_R = 24


def murmur2(data: bytes) -> int:
    """Kafka's murmur2 (``org.apache.kafka.common.utils.Utils.murmur2``) as a signed 32-bit int."""
    length = len(data)
    h = (_SEED ^ length) & _MASK
    tail = length & ~3
    for i in range(0, tail, 4):
        k = data[i] | (data[i + 1] << 8) | (data[i + 2] << 16) | (data[i + 3] << 24)
        k = (k * _M) & _MASK
        k ^= k >> _R
        k = (k * _M) & _MASK
        h = (h * _M) & _MASK
        h ^= k
    remaining = length & 3
    if remaining == 3:
        h ^= data[tail + 2] << 16
    if remaining >= 2:
        h ^= data[tail + 1] << 8
    if remaining >= 1:
        h ^= data[tail]
        h = (h * _M) & _MASK
    h ^= h >> 13
    h = (h * _M) & _MASK
    h ^= h >> 15
    return h - (1 << 32) if h & 0x80000000 else h


def to_positive(number: int) -> int:
    """Java's ``Utils.toPositive``: clear the sign bit (not abs(), which overflows)."""
    return number & 0x7FFFFFFF


def partition_for_key(namespace_or_name: str, partitions: int) -> int:
    """The partition of a namespace (or of a cluster-scoped object's name)."""
    if partitions < 1:
        raise ValueError(f"partitions must be at least 1, got {partitions}")
    return to_positive(murmur2(namespace_or_name.encode("utf-8"))) % partitions


class _Partitioned(Protocol):
    @property
    def partition_key(self) -> str | None: ...


def partition_for(record: _Partitioned, partitions: int) -> int:
    """The one partition `record` belongs to.

    Selector records of global selectors (no namespace) belong to every
    partition: use `partitions_for`. Dead letters have no partition key and go
    to partition 0 (their topic has one partition).
    """
    key = record.partition_key
    if key is None:
        if isinstance(record, DeadLetterRecord):
            return 0
        raise ValueError(
            f"{type(record).__name__} has no partition key (a global selector fans out to "
            "every partition): use partitions_for()"
        )
    return partition_for_key(key, partitions)


def partitions_for(record: _Partitioned, partitions: int) -> tuple[int, ...]:
    """Every partition `record` must be sent to: all of them for a global selector."""
    key = record.partition_key
    if key is None:
        if isinstance(record, DeadLetterRecord):
            return (0,)
        if partitions < 1:
            raise ValueError(f"partitions must be at least 1, got {partitions}")
        return tuple(range(partitions))
    return (partition_for_key(key, partitions),)
