"""End offsets a changelog recovery can trust, on Apache Kafka and on Tansu alike.

Tansu (the embedded broker) answers ListOffsets(latest) with the base offset of a
partition's last record batch + 1, not the offset after its last record, while its Fetch
responses carry the true high watermark. A reader that stops at the listed end, as Faust's
table recovery does, misses the rest of that batch, and Faust's rocksdb store then sees a
persisted offset beyond the end and refuses to start.

`true_end_offsets` asks each partition's leader for one fetch at the listed end - 1 and
keeps the larger of the listed end and the fetch's high watermark. On Kafka the two agree,
so the answer is unchanged (one extra request per leader). The fetch waits at most 1 ms:
Tansu answers a fetch with a zero wait with no partitions at all.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Mapping
from typing import Any, Protocol, TypeVar

from aiokafka.errors import KafkaError
from aiokafka.protocol.fetch import FetchRequest


class _Partition(Protocol):
    @property
    def topic(self) -> str: ...

    @property
    def partition(self) -> int: ...


TPT = TypeVar("TPT", bound=_Partition)  # aiokafka's TopicPartition or Faust's TP

READ_UNCOMMITTED = 0
NO_ERROR = 0
PROBE_WAIT_MS = 1
PROBE_BYTES = 1  # the broker still answers the whole first batch

log = logging.getLogger(__name__)


async def true_end_offsets(client: Any, listed: Mapping[TPT, int]) -> dict[TPT, int]:
    """`listed` (from ListOffsets) raised to each partition's high watermark.

    `client` is the consumer's `AIOKafkaClient`. A partition whose leader is unknown or
    whose probe fails keeps its listed end, as before this correction.
    """
    ends = dict(listed)
    by_leader: dict[int, dict[str, list[tuple[int, int, int]]]] = defaultdict(
        lambda: defaultdict(list)
    )
    keys: dict[tuple[str, int], TPT] = {}
    for tp, end in listed.items():
        topic, partition = tp.topic, tp.partition
        leader = client.cluster.leader_for_partition(tp)
        if end <= 0 or leader is None or leader < 0:
            continue
        by_leader[leader][topic].append((partition, end - 1, PROBE_BYTES))
        keys[(topic, partition)] = tp
    for leader, topics in by_leader.items():
        request = FetchRequest(
            PROBE_WAIT_MS, 1, PROBE_BYTES, READ_UNCOMMITTED, list(topics.items())
        )
        try:
            response = await client.send(leader, request)
        except KafkaError as exc:
            log.warning("end offsets: probe of broker %s failed (%s); keeping %s",
                        leader, exc, {t: ends[keys[(t, p)]] for t, ps in topics.items()
                                      for p, _, _ in ps})
            continue
        for topic, partitions in response.topics:
            for partition, error_code, highwater, *_ in partitions:
                probed = keys.get((topic, partition))
                if probed is not None and error_code == NO_ERROR:
                    ends[probed] = max(ends[probed], highwater)
    return ends
