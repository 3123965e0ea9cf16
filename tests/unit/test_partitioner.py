"""The partitioner: Kafka's murmur2, byte for byte, and one namespace -> one partition."""

from __future__ import annotations

import pytest
from aiokafka.partitioner import DefaultPartitioner
from aiokafka.partitioner import murmur2 as aiokafka_murmur2
from hypothesis import given, settings
from hypothesis import strategies as st

from topics.partitioner import (
    murmur2,
    partition_for,
    partition_for_key,
    partitions_for,
    to_positive,
)
from topics.records import (
    DeadLetterRecord,
    EndpointRecord,
    MembershipRecord,
    PolicyRecord,
    ProfileRecord,
    SelectorRecord,
)

# Vectors from the Java client's own tests (org.apache.kafka.common.utils.UtilsTest#testMurmur2)
# and from akka's Murmur2Spec, which checked its port against the Java client. (kafkajs's
# "legacy" murmur2 vectors are deliberately absent: that port is known not to match Java.)
JAVA_VECTORS: list[tuple[bytes, int]] = [
    (b"21", -973932308),
    (b"foobar", -790332482),
    (b"a-little-bit-long-string", -985981536),
    (b"a-little-bit-longer-string", -1486304829),
    (b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8", -58897971),
    (b"abc", 479470107),
    (b"1", -1993445489),
    (b"12", 126087238),
    (b"123", -267702483),
    (b"1234", -1614185708),
    (b"12345", -1188365604),
]


@pytest.mark.parametrize(
    ("data", "expected"), JAVA_VECTORS, ids=[d.decode() for d, _ in JAVA_VECTORS]
)
def test_murmur2_matches_the_java_client(data: bytes, expected: int) -> None:
    assert murmur2(data) == expected


def test_to_positive_clears_the_sign_bit_like_java() -> None:
    assert to_positive(-1) == 0x7FFFFFFF
    assert to_positive(-(2**31)) == 0  # abs() would overflow in Java; masking does not
    assert to_positive(123) == 123


@settings(max_examples=300)
@given(st.binary(max_size=64))
def test_murmur2_agrees_with_aiokafkas_port(data: bytes) -> None:
    assert murmur2(data) & 0xFFFFFFFF == aiokafka_murmur2(data)
    assert -(2**31) <= murmur2(data) < 2**31


namespaces = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,30}[a-z0-9])?", fullmatch=True)
counts = st.integers(1, 64)


@settings(max_examples=200)
@given(namespaces, counts)
def test_a_namespace_lands_where_kafkas_default_partitioner_puts_that_key(
    namespace: str, partitions: int
) -> None:
    # A producer using aiokafka's (= the Java client's) default partitioner with the namespace
    # as the key would choose the same partition as our explicit partition=.
    expected = DefaultPartitioner()(namespace.encode(), list(range(partitions)), [])
    assert partition_for_key(namespace, partitions) == expected
    assert 0 <= expected < partitions


@settings(max_examples=200)
@given(namespaces, namespaces, counts, st.floats(0, 4e9))
def test_every_record_of_one_namespace_goes_to_one_partition(
    namespace: str, name: str, partitions: int, at: float
) -> None:
    pod = EndpointRecord(
        "pod", namespace, name, "node-1", "cali0", ("10.0.0.1",), {"app": name},
        "default", "kubernetes", at,
    )
    netset = EndpointRecord(
        "networkset", namespace, name + "-set", None, None, ("10.9.0.0/16",), {}, None, "apply", at
    )
    ns_profile = ProfileRecord("namespace", namespace, None, {"team": "x"}, at)
    sa_profile = ProfileRecord("serviceaccount", namespace, name, {}, at)
    policy = PolicyRecord("NetworkPolicy", namespace, name, {"spec": {}}, "alice", at, at)
    selector = SelectorRecord("s:abc", "app == 'x'", namespace, True, at)
    member = MembershipRecord("s:abc", pod.key, namespace, "node-1", "cali0", pod.ips, at)
    got = {
        partition_for(record, partitions)
        for record in (pod, netset, ns_profile, sa_profile, policy, selector, member)
    }
    assert got == {partition_for_key(namespace, partitions)}
    assert partitions_for(selector, partitions) == (partition_for_key(namespace, partitions),)


@settings(max_examples=100)
@given(namespaces, counts)
def test_cluster_scoped_objects_and_memberships_go_by_name(name: str, partitions: int) -> None:
    host = EndpointRecord(
        "hostendpoint", None, name, name, "eth0", ("192.0.2.1",), {}, None, "inventory", 1.0
    )
    member = MembershipRecord("s:x", host.key, None, name, "eth0", host.ips, 1.0)
    policy = PolicyRecord("GlobalNetworkPolicy", None, name, {}, "bob", 1.0, 1.0)
    expected = partition_for_key(name, partitions)
    assert partition_for(host, partitions) == expected
    assert partition_for(member, partitions) == expected
    assert partition_for(policy, partitions) == expected


def test_global_selectors_fan_out_to_every_partition() -> None:
    selector = SelectorRecord("s:abc", "all()", None, True, 1.0)
    assert partitions_for(selector, 5) == (0, 1, 2, 3, 4)
    with pytest.raises(ValueError, match="fans out"):
        partition_for(selector, 5)


def test_dead_letters_use_their_single_partition() -> None:
    letter = DeadLetterRecord("t", 0, 0, None, "utf-8", None, "utf-8", "bad", "me", 1.0)
    assert partition_for(letter, 8) == 0
    assert partitions_for(letter, 8) == (0,)


def test_partition_counts_below_one_are_refused() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        partition_for_key("shop", 0)


def test_the_spread_is_not_degenerate() -> None:
    # 1000 namespaces over 8 partitions: every partition gets a fair share (murmur2 is a
    # good hash; a bug such as hashing only the first byte would fail this).
    counts = [0] * 8
    for i in range(1000):
        counts[partition_for_key(f"team-{i}", 8)] += 1
    assert min(counts) > 80
