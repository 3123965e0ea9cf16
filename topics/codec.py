"""The one place records become bytes and back (orjson), and failures become dead letters.

Values are JSON objects with a ``"v"`` version field plus the record's fields;
keys are the record's key as UTF-8. A null value is a tombstone and decodes to
None. Anything else that is not exactly a record of the topic's type and a
version this build reads raises `RecordError` with the reason, which a
consumer hands to `dead_letter` and publishes to the deadletter topic instead
of crashing or silently dropping it.
"""

from __future__ import annotations

import time
from typing import Any, TypeVar, overload

import orjson

from topics.records import (
    DeadLetterRecord,
    Record,
    RecordError,
    bytes_to_text,
)
from topics.specs import spec_for

__all__ = [
    "RecordError",
    "dead_letter",
    "decode",
    "decode_as",
    "decode_key",
    "encode",
    "encode_key",
]

R = TypeVar("R", bound=Record)


def encode(record: Record) -> bytes:
    """The JSON bytes of `record` (with its ``"v"`` version)."""
    try:
        return orjson.dumps(record.to_dict())
    except orjson.JSONEncodeError as exc:
        raise RecordError(f"{type(record).__name__}: cannot encode as JSON: {exc}") from None


def encode_key(record: Record) -> bytes:
    """The Kafka message key of `record`; dead letters keep the original key bytes."""
    if isinstance(record, DeadLetterRecord):
        return record.raw_key() or b""
    return record.key.encode("utf-8")


def decode_key(raw: bytes | None) -> str:
    """A message key as text; a missing or non-UTF-8 key is a `RecordError`."""
    if raw is None:
        raise RecordError("message has no key")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RecordError(f"key is not UTF-8: {exc.reason} at byte {exc.start}") from None


def decode_as(cls: type[R], value: bytes | None) -> R | None:
    """A record of type `cls` from `value`, or None for a tombstone."""
    if value is None:
        return None
    try:
        data: Any = orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        raise RecordError(f"{cls.__name__}: not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        kind = "null" if data is None else type(data).__name__
        raise RecordError(f"{cls.__name__}: expected a JSON object, got {kind}")
    record = cls.from_dict(data)
    return record  # type: ignore[return-value]


@overload
def decode(topic: type[R], value: bytes | None) -> R | None: ...
@overload
def decode(topic: str, value: bytes | None) -> Record | None: ...
def decode(topic: str | type[Any], value: bytes | None) -> Record | None:
    """Decode a value read from `topic` (a suffix like ``endpoints``, a full name, or a class).

    Returns None for a tombstone; raises `RecordError` for anything malformed.
    """
    cls: type[Record] = spec_for(topic).record if isinstance(topic, str) else topic
    return decode_as(cls, value)


def dead_letter(
    topic: str,
    partition: int,
    offset: int,
    key: bytes | None,
    value: bytes | None,
    error: BaseException | str,
    rejected_by: str,
    *,
    at: float | None = None,
) -> DeadLetterRecord:
    """The dead-letter record for a message that `rejected_by` could not use, and why.

    Key and value are kept losslessly (UTF-8 text, else base64), so the
    original message can be inspected or replayed after a fix.
    """
    if isinstance(error, RecordError):
        reason = str(error)
    elif isinstance(error, BaseException):
        reason = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
    else:
        reason = error
    key_text, key_encoding = bytes_to_text(key)
    value_text, value_encoding = bytes_to_text(value)
    return DeadLetterRecord(
        topic=topic,
        partition=partition,
        offset=offset,
        key=key_text,
        key_encoding=key_encoding,
        value=value_text,
        value_encoding=value_encoding,
        reason=reason or "rejected (no reason given)",
        rejected_by=rejected_by,
        at=time.time() if at is None else at,
    )
