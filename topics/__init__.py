"""The event contract: records, codec, topic specs, partitioner. Pure: imports nothing of ours."""

from topics.records import RecordError

__all__ = ["RecordError"]
