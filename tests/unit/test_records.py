"""The event contract: every record type survives encode/decode, and bad input is named."""

from __future__ import annotations

import ipaddress
import re
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from topics import codec, specs
from topics.records import (
    DeadLetterRecord,
    DnsRecord,
    EndpointRecord,
    FlowRecord,
    HistoryRecord,
    Labels,
    MembershipRecord,
    PolicyRecord,
    ProfileRecord,
    Record,
    RecordError,
    SelectorRecord,
    canonical_ips,
    split_endpoint_key,
    split_membership_key,
    split_profile_key,
)

# ---------------------------------------------------------------------------
# Strategies
# ---------------------------------------------------------------------------

names = st.from_regex(r"[a-z0-9]([a-z0-9.-]{0,15}[a-z0-9])?", fullmatch=True)
labels_dns = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,15}[a-z0-9])?", fullmatch=True)  # namespaces
texts = st.text(max_size=20)
times = st.floats(min_value=0, max_value=4e9, allow_nan=False, allow_infinity=False)
labels = st.dictionaries(texts, texts, max_size=5)
addresses = st.one_of(
    st.ip_addresses(v=4).map(str),
    st.ip_addresses(v=6).map(str),
    st.ip_addresses(v=4).flatmap(
        lambda a: st.integers(0, 32).map(lambda p: f"{a}/{p}")
    ),
    st.ip_addresses(v=6).flatmap(
        lambda a: st.integers(0, 128).map(lambda p: f"{a}/{p}")
    ),
)
ip_lists = st.lists(addresses, max_size=6)
opt_names = st.none() | names
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | texts
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(texts, inner, max_size=3),
    max_leaves=10,
)


@st.composite
def endpoints(draw: st.DrawFn) -> EndpointRecord:
    kind: Any = draw(
        st.sampled_from(["pod", "hostendpoint", "networkset", "globalnetworkset", "vm"])
    )
    namespaced = kind in ("pod", "networkset")
    return EndpointRecord(
        kind=kind,
        namespace=draw(names) if namespaced else None,
        name=draw(names),
        node=draw(opt_names),
        interface=draw(interfaces(kind)),
        ips=tuple(draw(ip_lists)),
        labels=draw(labels),
        service_account=draw(opt_names),
        source=draw(st.sampled_from(["kubernetes", "inventory", "apply"])),
        observed_at=draw(times),
        resource_version=draw(st.none() | st.integers(0, 10**9).map(str)),
        profiles=tuple(draw(st.lists(names, max_size=2))),
    )


interface_name = st.from_regex(r"\A[A-Za-z0-9_.@:-]{1,15}\Z").filter(lambda n: n not in (".", ".."))


def interfaces(kind: str) -> st.SearchStrategy[str | None]:
    """None, one name, several separated by commas, or '*' for a host endpoint."""
    several = st.lists(interface_name, min_size=1, max_size=3).map(",".join)
    if kind == "hostendpoint":
        return st.none() | several | st.just("*")
    return st.none() | several


@st.composite
def profiles(draw: st.DrawFn) -> ProfileRecord:
    kind: Any = draw(st.sampled_from(["namespace", "serviceaccount"]))
    return ProfileRecord(
        kind=kind,
        namespace=draw(labels_dns),
        name=draw(names) if kind == "serviceaccount" else None,
        labels=draw(labels),
        observed_at=draw(times),
        resource_version=draw(st.none() | st.integers(0, 10**9).map(str)),
    )


@st.composite
def policies(draw: st.DrawFn) -> PolicyRecord:
    return PolicyRecord(
        kind=draw(st.sampled_from(["NetworkPolicy", "GlobalNetworkPolicy", "NetworkSet"])),
        namespace=draw(opt_names),
        name=draw(names),
        document=draw(st.dictionaries(texts, json_values, max_size=4)),
        actor=draw(names),
        applied_at=draw(times),
        observed_at=draw(times),
    )


uids = st.binary(min_size=1, max_size=28).map(
    lambda b: "s:" + __import__("base64").urlsafe_b64encode(b).decode().rstrip("=")
)


@st.composite
def selectors(draw: st.DrawFn) -> SelectorRecord:
    return SelectorRecord(
        uid=draw(uids),
        selector=draw(texts),
        namespace=draw(opt_names),
        active=draw(st.booleans()),
        observed_at=draw(times),
    )


@st.composite
def memberships(draw: st.DrawFn) -> MembershipRecord:
    endpoint = draw(endpoints())
    return MembershipRecord(
        selector_uid=draw(uids),
        endpoint_key=endpoint.key,
        namespace=endpoint.namespace,
        node=endpoint.node,
        interface=endpoint.interface,
        ips=endpoint.ips,
        observed_at=endpoint.observed_at,
    )


@st.composite
def dead_letters(draw: st.DrawFn) -> DeadLetterRecord:
    return codec.dead_letter(
        topic=draw(names),
        partition=draw(st.integers(0, 1000)),
        offset=draw(st.integers(0, 2**40)),
        key=draw(st.none() | st.binary(max_size=20) | texts.map(str.encode)),
        value=draw(st.none() | st.binary(max_size=40) | texts.map(str.encode)),
        error=draw(st.builds(RecordError, st.text(min_size=1, max_size=30))),
        rejected_by=draw(names),
        at=draw(times),
    )


@st.composite
def dns_records(draw: st.DrawFn) -> DnsRecord:
    host = st.ip_addresses().map(str)
    return DnsRecord(
        node=draw(names), endpoint=draw(st.none() | names), address=draw(host),
        server=draw(host), name=draw(names), ips=tuple(draw(st.lists(host, max_size=4))),
        ttl=draw(st.integers(0, 2**31)), observed_at=draw(times),
    )


@st.composite
def history_records(draw: st.DrawFn) -> HistoryRecord:
    record: Any = draw(st.one_of(endpoints(), profiles(), policies()))
    topic = TOPIC_OF[type(record)]
    deleted = draw(st.booleans())
    return HistoryRecord(
        topic=topic, key=record.key, change="delete" if deleted else "upsert",
        actor=draw(names), source=draw(names), at=draw(times),
        record=None if deleted else record.to_dict(),
    )


@st.composite
def flow_records(draw: st.DrawFn) -> FlowRecord:
    host = st.ip_addresses().map(str)
    start = draw(times)
    packets = draw(st.integers(1, 2**40))
    return FlowRecord(
        node=draw(names), direction=draw(st.sampled_from(["egress", "ingress"])),
        source_ip=draw(host), source_endpoint=draw(st.none() | names), dest_ip=draw(host),
        dest_port=draw(st.none() | st.integers(0, 65535)),
        protocol=draw(st.sampled_from(["TCP", "UDP", "ICMP", "ICMPv6", "47"])),
        dest_endpoint=draw(st.none() | names), action=draw(st.sampled_from(["allow", "deny"])),
        tier=draw(st.none() | names), policy=draw(st.none() | names),
        rule=draw(st.none() | st.just("egress[2]")), reason=draw(names),
        packets=packets, attempts=draw(st.integers(1, packets)), start=start,
        end=start + draw(st.floats(0, 1e6)), observed_at=draw(times),
    )


any_record = st.one_of(
    endpoints(), profiles(), policies(), selectors(), memberships(), dead_letters(),
    dns_records(), history_records(), flow_records(),
)

TOPIC_OF: dict[type[Any], str] = {
    EndpointRecord: "endpoints",
    ProfileRecord: "profiles",
    PolicyRecord: "policies",
    SelectorRecord: "selectors",
    MembershipRecord: "memberships",
    DeadLetterRecord: "deadletter",
    DnsRecord: "dns",
    HistoryRecord: "policies.history",
    FlowRecord: "flows",
}

# ---------------------------------------------------------------------------
# Round trips
# ---------------------------------------------------------------------------


@settings(max_examples=150)
@given(any_record)
def test_every_record_survives_encode_and_decode(record: Record) -> None:
    raw = codec.encode(record)
    assert orjson.loads(raw)["v"] == type(record).VERSION
    assert codec.decode(TOPIC_OF[type(record)], raw) == record
    assert codec.decode(type(record), raw) == record
    assert type(record).from_dict(record.to_dict()) == record
    # The same bytes again: encoding is deterministic, so compaction and idempotent
    # consumers see an unchanged record as unchanged.
    assert codec.encode(codec.decode(type(record), raw)) == raw  # type: ignore[arg-type]


@settings(max_examples=50)
@given(endpoints())
def test_history_topics_hold_history_records_by_full_name(record: EndpointRecord) -> None:
    raw = codec.encode(record)
    assert codec.decode("t-123.endpoints", raw) == record
    with pytest.raises(RecordError, match="HistoryRecord"):
        codec.decode("portcullis.endpoints.history", raw)  # a state record is not history
    history = HistoryRecord("endpoints", record.key, "upsert", "alice", "apply", 1.0,
                            record.to_dict())
    assert codec.decode("portcullis.endpoints.history", codec.encode(history)) == history
    assert history.partition_key == record.partition_key


def test_a_history_record_says_upsert_with_a_record_and_delete_without() -> None:
    with pytest.raises(RecordError, match="record: an upsert carries the record"):
        HistoryRecord("policies", "Tier//t", "delete", "a", "apply", 1.0, {"v": 1})
    with pytest.raises(RecordError, match="record: an upsert carries the record"):
        HistoryRecord("policies", "Tier//t", "upsert", "a", "apply", 1.0, None)
    with pytest.raises(RecordError, match="topic: expected one of"):
        HistoryRecord("memberships", "x", "delete", "a", "apply", 1.0, None)
    with pytest.raises(RecordError, match="key: not a profile key"):
        HistoryRecord("profiles", "pod/ns/x", "delete", "a", "apply", 1.0, None)


@pytest.mark.parametrize("topic", list(TOPIC_OF.values()))
def test_a_tombstone_decodes_to_none(topic: str) -> None:
    assert codec.decode(topic, None) is None


@settings(max_examples=100)
@given(ip_lists)
def test_canonical_ips_mean_the_same_addresses_sorted_and_unique(items: list[str]) -> None:
    canon = canonical_ips(items)
    assert list(canon) == sorted(set(canon), key=canon.index)  # unique
    assert canonical_ips(canon) == canon  # idempotent
    assert canonical_ips(reversed(items)) == canon  # order does not matter

    def meaning(text: str) -> Any:
        if "/" in text:
            return ipaddress.ip_network(text, strict=False)
        return ipaddress.ip_address(text)

    assert {meaning(i) for i in canon} == {meaning(i) for i in items}


def test_canonical_ips_examples() -> None:
    assert canonical_ips(["fd00::0001", "10.0.0.7/24", "10.0.0.1", "10.0.0.1"]) == (
        "10.0.0.0/24",  # by address, then prefix: a network sorts at its first address
        "10.0.0.1",
        "fd00::1",
    )


@settings(max_examples=50)
@given(profiles() | policies() | endpoints())
def test_hash_and_equality_agree_with_the_encoding(record: Record) -> None:
    twin = type(record).from_dict(orjson.loads(codec.encode(record)))
    assert twin == record
    if not isinstance(record, PolicyRecord):  # policies hold a dict: not hashable
        assert hash(twin) == hash(record)


# ---------------------------------------------------------------------------
# Keys
# ---------------------------------------------------------------------------


def _pod(**overrides: Any) -> EndpointRecord:
    fields: dict[str, Any] = dict(
        kind="pod",
        namespace="shop",
        name="web-1",
        node="node-1",
        interface="cali123",
        ips=("10.0.0.1",),
        labels={"app": "web"},
        service_account="default",
        source="kubernetes",
        observed_at=1700000000.5,
        resource_version="42",
    )
    fields.update(overrides)
    return EndpointRecord(**fields)


def test_keys_and_partition_keys() -> None:
    pod = _pod()
    assert pod.key == "pod/shop/web-1"
    assert pod.partition_key == "shop"
    host = _pod(kind="hostendpoint", namespace=None, name="node-1", service_account=None)
    assert host.key == "hostendpoint//node-1"
    assert host.partition_key == "node-1"
    assert split_endpoint_key(host.key) == ("hostendpoint", None, "node-1")
    assert split_endpoint_key(pod.key) == ("pod", "shop", "web-1")

    ns = ProfileRecord("namespace", "shop", None, {"team": "a"}, 1.0)
    sa = ProfileRecord("serviceaccount", "shop", "api", {}, 1.0)
    assert (ns.key, sa.key) == ("kns.shop", "ksa.shop.api")
    assert ns.partition_key == sa.partition_key == "shop"

    member = MembershipRecord("s:abc", host.key, None, "node-1", None, ("10.1.0.1",), 2.0)
    assert member.key == "s:abc|hostendpoint//node-1"
    assert member.partition_key == "node-1"
    assert split_membership_key(member.key) == ("s:abc", "hostendpoint//node-1")

    gnp = PolicyRecord("GlobalNetworkPolicy", None, "deny", {}, "alice", 1.0, 1.0)
    assert gnp.key == "GlobalNetworkPolicy//deny"
    assert gnp.partition_key == "deny"
    assert codec.encode_key(pod) == b"pod/shop/web-1"
    assert codec.decode_key(b"pod/shop/web-1") == pod.key


@settings(max_examples=100)
@given(profiles())
def test_profile_keys_split_back_into_namespace_and_account(profile: ProfileRecord) -> None:
    assert split_profile_key(profile.key) == (profile.namespace, profile.name)


def test_profile_keys_that_are_not_profile_keys_are_rejected() -> None:
    for bad in ("kns.", "ksa.shop", "ksa..x", "pod/shop/x", "kns.a.b"):
        with pytest.raises(RecordError, match="not a profile key"):
            split_profile_key(bad)
    with pytest.raises(RecordError, match="has no dots"):
        ProfileRecord("namespace", "a.b", None, {}, 1.0)


def test_labels_are_an_immutable_mapping() -> None:
    pod = _pod(labels={"b": "2", "a": "1"})
    assert isinstance(pod.labels, Labels)
    assert dict(pod.labels) == {"a": "1", "b": "2"}
    assert pod.labels == {"b": "2", "a": "1"}
    with pytest.raises(TypeError):
        pod.labels["c"] = "3"  # type: ignore[index]
    with pytest.raises(AttributeError):
        pod.name = "other"  # type: ignore[misc]


@settings(max_examples=100)
@given(st.none() | st.binary(max_size=30), st.none() | st.binary(max_size=60))
def test_dead_letters_keep_the_original_bytes(key: bytes | None, value: bytes | None) -> None:
    letter = codec.dead_letter("x.endpoints", 3, 17, key, value, ValueError("bad"), "test")
    back = codec.decode("deadletter", codec.encode(letter))
    assert isinstance(back, DeadLetterRecord)
    assert back.raw_key() == key
    assert back.raw_value() == value
    assert back.reason == "ValueError: bad"
    assert codec.encode_key(back) == (key or b"")


# ---------------------------------------------------------------------------
# Malformed input: RecordError with the reason
# ---------------------------------------------------------------------------

GOOD = orjson.loads(codec.encode(_pod()))


def _with(**changes: Any) -> bytes:
    data = dict(GOOD)
    for name, value in changes.items():
        if value is _DROP:
            del data[name]
        else:
            data[name] = value
    return orjson.dumps(data)


_DROP = object()

MALFORMED: list[tuple[str, bytes, str]] = [
    ("not json", b'{"v": 1, "kind": ', "not valid JSON"),
    ("not an object", b"[1, 2]", "expected a JSON object, got list"),
    ("json null", b"null", "expected a JSON object, got null"),
    ("no version", _with(v=_DROP), "missing version field 'v'"),
    ("unknown version", _with(v=99), "unknown version 99"),
    ("version not a number", _with(v="1"), "version 'v' must be an integer"),
    ("missing field", _with(ips=_DROP), "missing field(s) 'ips'"),
    ("extra field", _with(colour="red"), "unexpected field(s) 'colour'"),
    ("wrong kind", _with(kind="container"), "EndpointRecord.kind: expected one of"),
    ("bad ip", _with(ips=["10.0.0.256"]), "EndpointRecord.ips: not an IP address or CIDR"),
    ("ips as string", _with(ips="10.0.0.1"), "EndpointRecord.ips: expected a list"),
    ("label not a string", _with(labels={"a": 1}), "EndpointRecord.labels"),
    ("time as string", _with(observed_at="now"), "EndpointRecord.observed_at: expected epoch"),
    ("time as bool", _with(observed_at=True), "EndpointRecord.observed_at: expected epoch"),
    ("negative time", _with(observed_at=-1), "non-negative"),
    ("pod without namespace", _with(namespace=None), "a pod needs a namespace"),
    ("empty name", _with(name=""), "EndpointRecord.name: must not be empty"),
    ("slash in name", _with(name="a/b"), "must not contain '/'"),
    ("bad source", _with(source="rumour"), "EndpointRecord.source"),
    # an interface iptables would read as a prefix (cali+) or another option (-j), or a
    # workload on "every interface" (iptables takes -i '*' literally: it matches nothing)
    ("wildcard interface", _with(interface="cali+"), "not an interface name: 'cali+'"),
    ("interface with a space", _with(interface="eth0 -j"), "not an interface name"),
    ("interface too long", _with(interface="a" * 16), "not an interface name"),
    ("empty interface in a list", _with(interface="eth0,"), "not an interface name: ''"),
    ("a pod on every interface", _with(interface="*"), "'*' (every interface) is for host"),
    ("profiles not a list", _with(profiles="x"), "EndpointRecord.profiles: expected a list"),
    ("not utf-8", b'{"v":1,"name":"\xff"}', "not valid JSON"),
]


@pytest.mark.parametrize(
    ("raw", "reason"), [(raw, reason) for _name, raw, reason in MALFORMED],
    ids=[name for name, _raw, _reason in MALFORMED],
)
def test_malformed_endpoint_values_are_rejected_with_a_reason(raw: bytes, reason: str) -> None:
    with pytest.raises(RecordError) as caught:
        codec.decode("endpoints", raw)
    assert reason in str(caught.value)
    letter = codec.dead_letter("p.endpoints", 0, 5, b"k", raw, caught.value, "unit-test")
    assert letter.reason == str(caught.value)
    assert letter.raw_value() == raw


def test_version_1_endpoints_are_read_without_profiles() -> None:
    """Records written before ``profiles`` existed stay readable on the compacted topics."""
    old = dict(GOOD, v=1)
    del old["profiles"]
    record = codec.decode("endpoints", orjson.dumps(old))
    assert isinstance(record, EndpointRecord) and record.profiles == ()
    assert record == codec.decode("endpoints", orjson.dumps(dict(GOOD)))
    with pytest.raises(RecordError, match="unexpected field"):  # v1 never had profiles
        codec.decode("endpoints", orjson.dumps(dict(GOOD, v=1)))


def test_other_record_types_reject_bad_fields_too() -> None:
    with pytest.raises(RecordError, match="must be null for a namespace profile"):
        ProfileRecord("namespace", "shop", "api", {}, 1.0)
    with pytest.raises(RecordError, match=r"ProfileRecord\.name: expected a string"):
        ProfileRecord("serviceaccount", "shop", None, {}, 1.0)
    with pytest.raises(RecordError, match=r"SelectorRecord\.active: expected true or false"):
        SelectorRecord("s:x", "all()", None, 1, 1.0)  # type: ignore[arg-type]
    with pytest.raises(RecordError, match="is not the namespace of endpoint"):
        MembershipRecord("s:x", "pod/shop/web", "other", None, None, (), 1.0)
    with pytest.raises(RecordError, match="not a kind/namespace/name key"):
        MembershipRecord("s:x", "web", None, None, None, (), 1.0)
    with pytest.raises(RecordError, match=r"PolicyRecord\.document: expected a JSON object"):
        PolicyRecord("NetworkPolicy", "shop", "p", [], "me", 1.0, 1.0)  # type: ignore[arg-type]
    with pytest.raises(RecordError, match="declared base64"):
        DeadLetterRecord("t", 0, 0, "!!", "base64", None, "utf-8", "r", "me", 1.0)
    with pytest.raises(RecordError, match="cannot encode as JSON"):
        codec.encode(PolicyRecord("NetworkPolicy", "shop", "p", {"x": {1, 2}}, "me", 1.0, 1.0))
    with pytest.raises(RecordError, match="key is not UTF-8"):
        codec.decode_key(b"\xff")
    with pytest.raises(RecordError, match="no key"):
        codec.decode_key(None)


def test_a_record_of_the_wrong_type_is_rejected() -> None:
    profile = codec.encode(ProfileRecord("namespace", "shop", None, {}, 1.0))
    with pytest.raises(RecordError, match="EndpointRecord: missing field"):
        codec.decode("endpoints", profile)


def test_unknown_topics_are_a_programming_error_not_a_record_error() -> None:
    with pytest.raises(ValueError, match="not a Portcullis topic") as caught:
        codec.decode("somewhere.else", b"{}")
    assert not isinstance(caught.value, RecordError)


def test_specs_name_every_topic_in_order() -> None:
    names = specs.topic_names("pc.")
    assert list(names) == [
        "endpoints",
        "endpoints.history",
        "profiles",
        "profiles.history",
        "policies",
        "policies.history",
        "selectors",
        "memberships",
        "dns",
        "flows",
        "deadletter",
    ]
    assert names["memberships"] == "pc.memberships"
    rows = specs.all_specs("pc.", 6)
    assert [(n, s.cleanup_policy, c) for n, s, c in rows][:2] == [
        ("pc.endpoints", "compact", 6),
        ("pc.endpoints.history", "delete", 6),
    ]
    assert rows[-1][2] == 1  # deadletter: one partition
    assert specs.spec_for("pc.policies.history") is specs.POLICIES_HISTORY
    assert specs.ENDPOINTS.topic_configs() == {"cleanup.policy": "compact"}


@given(memberships())
def test_own_membership_decodes_like_a_validated_one(record: MembershipRecord) -> None:
    raw = codec.encode(record)
    assert MembershipRecord.from_own_json(raw) == codec.decode_as(MembershipRecord, raw)


@pytest.mark.parametrize("raw", [b"not json", b"[1, 2]", b'{"v": 1, "selector_uid": "s:x"}'])
def test_own_membership_that_is_not_one_is_a_record_error(raw: bytes) -> None:
    with pytest.raises(RecordError, match="not a stored membership"):
        MembershipRecord.from_own_json(raw)


def _flow(**changes: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "v": 1, "node": "n1", "direction": "egress", "source_ip": "10.0.0.1",
        "source_endpoint": "pod/shop/a", "dest_ip": "10.0.0.2", "dest_port": 443,
        "protocol": "TCP", "dest_endpoint": None, "action": "deny", "tier": "default",
        "policy": "GlobalNetworkPolicy//p", "rule": "egress[0]", "reason": "rule",
        "packets": 3, "attempts": 2, "start": 10.0, "end": 11.0, "observed_at": 12.0,
    }
    data.update(changes)
    return data


def test_a_flow_record_keys_on_its_node_and_canonicalises_addresses() -> None:
    record = FlowRecord.from_dict(_flow(source_ip="fd00:0::1"))
    assert (record.key, record.partition_key, record.source_ip) == ("n1", "n1", "fd00::1")
    assert codec.decode("x.flows", codec.encode(record)) == record


@pytest.mark.parametrize(("changes", "message"), [
    ({"direction": "sideways"}, "FlowRecord.direction: expected one of egress, ingress"),
    ({"source_ip": "10.0.0.0/8"}, "FlowRecord.source_ip: expected an IP address"),
    ({"dest_port": 70000}, "FlowRecord.dest_port: must be at most 65535"),
    ({"protocol": "tcp!"}, "FlowRecord.protocol: expected TCP"),
    ({"action": "Allow"}, "FlowRecord.action: expected one of allow, deny"),
    ({"packets": 0, "attempts": 0}, "FlowRecord.packets: must be at least 1"),
    ({"attempts": 4}, "FlowRecord.attempts: cannot exceed packets"),
    ({"end": 9.0}, "FlowRecord.end: must not be before start"),
    ({"node": "a/b"}, "FlowRecord.node: must not contain"),
    ({"reason": ""}, "FlowRecord.reason: must not be empty"),
])
def test_a_malformed_flow_record_says_which_field(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(RecordError, match=re.escape(message)):
        FlowRecord.from_dict(_flow(**changes))


@given(endpoints(), uids, times)
def test_membership_of_an_endpoint_is_the_validated_record(
    endpoint: EndpointRecord, uid: str, at: float
) -> None:
    """The unchecked constructor builds exactly what the checked one would, and it
    survives the codec (so a reader validates it like any other)."""
    built = MembershipRecord.of_endpoint(uid, endpoint, at)
    checked = MembershipRecord(
        selector_uid=uid, endpoint_key=endpoint.key, namespace=endpoint.namespace,
        node=endpoint.node, interface=endpoint.interface, ips=endpoint.ips, observed_at=at)
    assert built == checked
    assert codec.decode_as(MembershipRecord, codec.encode(built)) == checked



def _by_ipaddress(text: str) -> str | None:
    try:
        if "/" in text:
            return str(ipaddress.ip_network(text, strict=False))
        return str(ipaddress.ip_address(text))
    except ValueError:
        return None


ipv4_like = st.lists(
    st.one_of(st.integers(0, 300).map(str), st.sampled_from(["00", "01", "007", "", " 1", "1 ",
                                                             "+1", "٣", "0x1", "1\n"])),
    min_size=3, max_size=5,
).map(".".join)


@given(st.one_of(ipv4_like, addresses))
def test_canonical_ips_read_every_address_as_ipaddress_does(text: str) -> None:
    """The dotted-quad fast path accepts, rejects and writes exactly what `ipaddress` does."""
    expected = _by_ipaddress(text)
    if expected is None:
        with pytest.raises(ValueError):
            canonical_ips([text])
    else:
        assert canonical_ips([text]) == (expected,)
