"""The records on every Portcullis topic: frozen, versioned, validated on construction.

Each record type has a `VERSION`, a `key` (the Kafka message key, as text), a
`partition_key` (what the partitioner hashes: namespace, else name), and
`to_dict()` / `from_dict()` for the JSON encoding in `topics.codec`. The dict
form always carries `"v"`, the record version. Constructors canonicalise (IPs,
labels, float timestamps) and reject bad data with `RecordError`, so a record
that exists is a record every consumer can use.

Keys:
  * endpoints:   ``kind/namespace/name``; cluster-scoped objects have an empty
                 namespace: ``hostendpoint//node-1``, ``globalnetworkset//corp``.
  * profiles:    ``kns.<ns>`` and ``ksa.<ns>.<sa>``.
  * policies:    ``kind/namespace/name`` (cluster-scoped: ``kind//name``).
  * selectors:   the selector uid (``s:...``).
  * memberships: ``selector-uid|endpoint-key``.
  * deadletter:  the original key, byte for byte.

A tombstone (a null Kafka value) deletes the key on compacted topics; it is not
a record and has no class here.
"""

from __future__ import annotations

import base64
import binascii
import functools
import ipaddress
import math
import re
from collections.abc import ItemsView, Iterable, Iterator, KeysView, Mapping, ValuesView
from dataclasses import dataclass, fields
from typing import Any, ClassVar, Literal, TypeAlias, cast, get_args

import orjson

__all__ = [
    "HISTORY_OF",
    "DeadLetterRecord",
    "EndpointKind",
    "EndpointRecord",
    "FlowRecord",
    "HistoryRecord",
    "Labels",
    "MembershipRecord",
    "PolicyRecord",
    "ProfileKind",
    "ProfileRecord",
    "Record",
    "RecordError",
    "SelectorRecord",
    "canonical_ips",
    "endpoint_key",
    "membership_key",
    "profile_key",
    "split_endpoint_key",
    "split_membership_key",
    "split_profile_key",
]


class RecordError(ValueError):
    """A record is malformed: the message says which field and what was wrong."""


EndpointKind: TypeAlias = Literal["pod", "hostendpoint", "networkset", "globalnetworkset", "vm"]
ENDPOINT_KINDS: tuple[str, ...] = get_args(EndpointKind)
#: Endpoint kinds that live in a namespace; the others are cluster-scoped.
NAMESPACED_ENDPOINT_KINDS: frozenset[str] = frozenset({"pod", "networkset"})
ProfileKind: TypeAlias = Literal["namespace", "serviceaccount"]
PROFILE_KINDS: tuple[str, ...] = get_args(ProfileKind)
EndpointSource: TypeAlias = Literal["kubernetes", "inventory", "apply"]
ENDPOINT_SOURCES: tuple[str, ...] = get_args(EndpointSource)


class Labels(Mapping[str, str]):
    """An immutable, hashable label mapping, so records stay frozen and hashable."""

    __slots__ = ("_hash", "_items")

    def __init__(self, items: Mapping[str, str] | Iterable[tuple[str, str]] = ()) -> None:
        if type(items) is dict:  # decoded JSON: the common case, without the ABC check
            pairs = items
        else:
            pairs = dict(items.items() if isinstance(items, Mapping) else items)
        self._items: dict[str, str] = dict(sorted(pairs.items()))
        self._hash: int | None = None

    def __getitem__(self, key: str) -> str:
        return self._items[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    # The dict's own views and lookups (Mapping's generic ones go through __getitem__ per
    # key: a third of the cost of building an endpoint's effective labels).
    def items(self) -> ItemsView[str, str]:
        return self._items.items()

    def keys(self) -> KeysView[str]:
        return self._items.keys()

    def values(self) -> ValuesView[str]:
        return self._items.values()

    def get(self, key: str, default: Any = None) -> Any:
        return self._items.get(key, default)

    def __contains__(self, key: object) -> bool:
        return key in self._items

    def __hash__(self) -> int:
        if self._hash is None:
            self._hash = hash(tuple(self._items.items()))
        return self._hash

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Labels):
            return self._items == other._items
        if isinstance(other, Mapping):
            return self._items == dict(other.items())
        return NotImplemented

    def __repr__(self) -> str:
        return f"Labels({self._items!r})"

    def to_dict(self) -> dict[str, str]:
        """A plain (sorted) dict copy, for JSON."""
        return dict(self._items)


# ---------------------------------------------------------------------------
# Validation helpers shared by constructors and from_dict
# ---------------------------------------------------------------------------


def _fail(cls: str, field: str, problem: str) -> RecordError:
    return RecordError(f"{cls}.{field}: {problem}")


def _check_str(cls: str, field: str, value: object, *, empty: bool = False) -> str:
    if not isinstance(value, str):
        raise _fail(cls, field, f"expected a string, got {_describe(value)}")
    if not empty and not value:
        raise _fail(cls, field, "must not be empty")
    return value


def _check_opt_str(cls: str, field: str, value: object) -> str | None:
    if value is None:
        return None
    return _check_str(cls, field, value)


def _check_key_part(cls: str, field: str, value: object) -> str:
    text = _check_str(cls, field, value)
    if "/" in text or "|" in text:
        raise _fail(cls, field, f"must not contain '/' or '|' (it is part of a key): {text!r}")
    return text


def _check_opt_key_part(cls: str, field: str, value: object) -> str | None:
    if value is None:
        return None
    return _check_key_part(cls, field, value)


def _check_time(cls: str, field: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _fail(cls, field, f"expected epoch seconds (a number), got {_describe(value)}")
    number = float(value)
    if not math.isfinite(number) or number < 0:
        raise _fail(cls, field, f"expected finite, non-negative epoch seconds, got {value!r}")
    return number


def _check_int(cls: str, field: str, value: object, *, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(cls, field, f"expected an integer, got {_describe(value)}")
    if value < minimum:
        raise _fail(cls, field, f"must be at least {minimum}, got {value}")
    return value


def _check_bool(cls: str, field: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise _fail(cls, field, f"expected true or false, got {_describe(value)}")
    return value


def _check_choice(cls: str, field: str, value: object, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise _fail(cls, field, f"expected one of {', '.join(choices)}; got {value!r}")
    return value


def _check_labels(cls: str, field: str, value: object) -> Labels:
    if isinstance(value, Labels):
        return value
    if type(value) is not dict and not isinstance(value, Mapping):
        raise _fail(cls, field, f"expected a mapping of strings, got {_describe(value)}")
    for k, v in value.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise _fail(cls, field, f"expected string keys and values, got {k!r}: {v!r}")
    return Labels(cast("Mapping[str, str]", value))


def _check_ips(cls: str, field: str, value: object) -> tuple[str, ...]:
    if not _is_sequence(value):
        raise _fail(cls, field, f"expected a list of IPs or CIDRs, got {_describe(value)}")
    items = tuple(cast("Iterable[object]", value))
    for item in items:
        if not isinstance(item, str):
            raise _fail(cls, field, f"expected IP or CIDR strings, got {_describe(item)}")
    try:
        if len(items) == 1 or len(items) > _CACHED_IPS:  # see canonical_ips; a network
            return canonical_ips(cast("tuple[str, ...]", items))  # set's nets: not kept
        return _canonical_tuple(cast("tuple[str, ...]", items))
    except ValueError as exc:
        raise _fail(cls, field, str(exc)) from None


#: Longest IP list `_canonical_tuple` caches: an endpoint's addresses. A network set grown
#: by thousands of CIDRs, one version per update, would otherwise fill the cache with them.
_CACHED_IPS = 8


@functools.lru_cache(maxsize=1 << 16)
def _canonical_tuple(items: tuple[str, ...]) -> tuple[str, ...]:
    """`canonical_ips` of a whole list, cached: an endpoint's IPs recur in every record of
    it (its updates, and the memberships built from it)."""
    return canonical_ips(items)


def _check_profiles(cls: str, value: object) -> tuple[str, ...]:
    if not _is_sequence(value):
        raise _fail(cls, "profiles", f"expected a list of profile names, got {_describe(value)}")
    names = tuple(cast("Iterable[object]", value))
    for name in names:
        if not isinstance(name, str) or not name:
            raise _fail(cls, "profiles", f"expected profile names, got {_describe(name)}")
    return cast("tuple[str, ...]", names)


def _is_sequence(value: object) -> bool:
    """A list or tuple (decoded JSON, our records), or another iterable that is no string."""
    if type(value) is list or type(value) is tuple:  # without the ABC check
        return True
    return not isinstance(value, str) and isinstance(value, Iterable)


def _describe(value: object) -> str:
    if value is None:
        return "null"
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{type(value).__name__} {text}"


_OCTET = "(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
#: A dotted-quad IPv4 address as `ipaddress` reads it (no leading zeros), already canonical.
_IPV4 = re.compile(rf"{_OCTET}(?:\.{_OCTET}){{3}}", re.ASCII)


@functools.lru_cache(maxsize=1 << 16)
def _canonical_ip(text: str) -> tuple[int, int, int, str]:
    """(version, address, prefix, canonical text); cached: the same IPs recur in many records."""
    if _IPV4.fullmatch(text):  # the common case, ten times faster than ipaddress
        a, b, c, d = (int(part) for part in text.split("."))
        return (4, a << 24 | b << 16 | c << 8 | d, 33, text)
    try:
        if "/" in text:
            net = ipaddress.ip_network(text, strict=False)
            return (net.version, int(net.network_address), net.prefixlen, str(net))
        addr = ipaddress.ip_address(text)
        return (addr.version, int(addr), addr.max_prefixlen + 1, str(addr))
    except ValueError:
        raise ValueError(f"not an IP address or CIDR: {text!r}") from None


def canonical_ips(items: Iterable[str]) -> tuple[str, ...]:
    """IPs and CIDRs in canonical text, deduplicated and sorted (IPv4 before IPv6).

    A bare address stays an address (``10.0.0.1``); a CIDR keeps its prefix and
    loses host bits (``10.0.0.7/24`` -> ``10.0.0.0/24``). Two records that mean
    the same set of addresses therefore compare (and encode) equal.
    """
    if isinstance(items, tuple | list) and len(items) == 1 and _IPV4.fullmatch(items[0]):
        return (items[0],)  # a pod's one IPv4 address, already canonical: most records
    return tuple(entry[3] for entry in sorted({_canonical_ip(item) for item in items}))


def _check_fields(cls: type[Any], data: Mapping[str, Any]) -> None:
    """Reject a dict that is not exactly this record's encoding (version, fields)."""
    if type(data) is dict and data.keys() == cls.__dataclass_keys__:
        version = data["v"]
        if type(version) is int and version == cls.VERSION:
            return  # exactly the fields, and this version: the common case, at once
    name = cls.__name__
    if not isinstance(data, Mapping):
        raise RecordError(f"{name}: expected a JSON object, got {_describe(data)}")
    if "v" not in data:
        raise RecordError(f"{name}: missing version field 'v'")
    version = data["v"]
    if isinstance(version, bool) or not isinstance(version, int):
        raise RecordError(f"{name}: version 'v' must be an integer, got {_describe(version)}")
    if version != cls.VERSION:
        raise RecordError(
            f"{name}: unknown version {version} (this build reads version {cls.VERSION})"
        )
    expected: tuple[str, ...] = cls.__dataclass_fields_order__
    missing = [f for f in expected if f not in data]
    if missing:
        raise RecordError(f"{name}: missing field(s) {', '.join(repr(f) for f in missing)}")
    extra = sorted(set(data) - set(expected) - {"v"})
    if extra:
        raise RecordError(f"{name}: unexpected field(s) {', '.join(repr(f) for f in extra)}")


def _field_order(cls: type[Any]) -> type[Any]:
    cls.__dataclass_fields_order__ = tuple(f.name for f in fields(cls))
    cls.__dataclass_keys__ = frozenset({"v", *cls.__dataclass_fields_order__})
    return cls


# ---------------------------------------------------------------------------
# Keys
# ---------------------------------------------------------------------------


def endpoint_key(kind: str, namespace: str | None, name: str) -> str:
    """``kind/namespace/name``; cluster-scoped objects have an empty namespace part."""
    return f"{kind}/{namespace or ''}/{name}"


def split_endpoint_key(key: str) -> tuple[str, str | None, str]:
    """The inverse of `endpoint_key` (also for policy keys): (kind, namespace or None, name)."""
    parts = key.split("/")
    if len(parts) != 3 or not parts[0] or not parts[2]:
        raise RecordError(f"not a kind/namespace/name key: {key!r}")
    return parts[0], parts[1] or None, parts[2]


def profile_key(namespace: str, serviceaccount: str | None = None) -> str:
    """``kns.<ns>`` for a namespace, ``ksa.<ns>.<sa>`` for a service account."""
    if serviceaccount is None:
        return f"kns.{namespace}"
    return f"ksa.{namespace}.{serviceaccount}"


def split_profile_key(key: str) -> tuple[str, str | None]:
    """(namespace, service account or None) from ``kns.<ns>`` / ``ksa.<ns>.<sa>``.

    Unambiguous because namespace names are DNS labels (no dots; `ProfileRecord`
    enforces it), while service-account names may hold dots.
    """
    if key.startswith("kns.") and len(key) > 4 and "." not in key[4:]:
        return key[4:], None
    if key.startswith("ksa."):
        namespace, sep, account = key[4:].partition(".")
        if sep and namespace and account:
            return namespace, account
    raise RecordError(f"not a profile key (kns.<ns> or ksa.<ns>.<sa>): {key!r}")


def membership_key(selector_uid: str, endpoint_key: str) -> str:
    """``selector-uid|endpoint-key`` (selector uids are base64url, so never contain ``|``)."""
    return f"{selector_uid}|{endpoint_key}"


def split_membership_key(key: str) -> tuple[str, str]:
    """(selector uid, endpoint key) from a membership key, e.g. for a tombstone."""
    uid, sep, endpoint = key.partition("|")
    if not sep or not uid or not endpoint:
        raise RecordError(f"not a selector-uid|endpoint-key key: {key!r}")
    return uid, endpoint


# ---------------------------------------------------------------------------
# Records
# ---------------------------------------------------------------------------


#: A Linux interface name as iptables matches it literally (``+`` would make it a prefix).
INTERFACE_NAME_RE = re.compile(r"^[A-Za-z0-9_.@:-]{1,15}$")
#: Calico's built-in profile that allows everything after the last tier.
DEFAULT_ALLOW_PROFILE = "projectcalico-default-allow"


def interface_names(interface: str) -> tuple[str, ...]:
    """The names in an endpoint's ``interface`` (one, or several separated by commas)."""
    return tuple(interface.split(","))


def _check_interface(cls: str, kind: str, value: object) -> str | None:
    text = _check_opt_str(cls, "interface", value)
    if text is None:
        return None
    if text == "*":
        if kind != "hostendpoint":
            raise _fail(cls, "interface",
                        f"'*' (every interface) is for host endpoints, not a {kind}")
        return text
    for name in interface_names(text):
        if not INTERFACE_NAME_RE.match(name) or name in (".", ".."):
            raise _fail(cls, "interface", f"not an interface name: {name!r} (1-15 letters, "
                        "digits, '_', '.', '@', ':' or '-'; several separated by commas)")
    return text


@_field_order
@dataclass(frozen=True, slots=True)
class EndpointRecord:
    """Something traffic comes from: a pod, host endpoint, network set or VM.

    Network sets are endpoints whose `ips` are CIDRs: selectors match them by
    labels like any other endpoint. `node`/`interface` say where to enforce
    (None for network sets); `interface` is one name, several separated by commas (a VM
    with several interfaces), or ``*`` (a host endpoint on every interface). `profiles`
    are Calico profiles after the last tier (``projectcalico-default-allow``: allow).
    `source` says which watcher saw it.

    Version 2 added `profiles`; version 1 records (without it) are still read.
    """

    VERSION: ClassVar[int] = 2
    kind: EndpointKind
    namespace: str | None
    name: str
    node: str | None
    interface: str | None
    ips: tuple[str, ...]
    labels: Mapping[str, str]
    service_account: str | None
    source: str
    observed_at: float
    resource_version: str | None = None
    profiles: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        c = "EndpointRecord"
        _check_choice(c, "kind", self.kind, ENDPOINT_KINDS)
        _check_opt_key_part(c, "namespace", self.namespace)
        if self.kind in NAMESPACED_ENDPOINT_KINDS and self.namespace is None:
            raise _fail(c, "namespace", f"a {self.kind} needs a namespace")
        if self.kind not in NAMESPACED_ENDPOINT_KINDS and self.namespace is not None:
            raise _fail(c, "namespace", f"a {self.kind} is cluster-scoped; namespace must be null")
        _check_key_part(c, "name", self.name)
        _check_opt_str(c, "node", self.node)
        _check_interface(c, self.kind, self.interface)
        object.__setattr__(self, "ips", _check_ips(c, "ips", self.ips))
        object.__setattr__(self, "labels", _check_labels(c, "labels", self.labels))
        _check_opt_str(c, "service_account", self.service_account)
        _check_choice(c, "source", self.source, ENDPOINT_SOURCES)
        object.__setattr__(self, "observed_at", _check_time(c, "observed_at", self.observed_at))
        _check_opt_str(c, "resource_version", self.resource_version)
        object.__setattr__(self, "profiles", _check_profiles(c, self.profiles))

    @property
    def key(self) -> str:
        return endpoint_key(self.kind, self.namespace, self.name)

    @property
    def partition_key(self) -> str:
        return self.namespace if self.namespace is not None else self.name

    def to_dict(self) -> dict[str, Any]:
        return {
            "v": self.VERSION,
            "kind": self.kind,
            "namespace": self.namespace,
            "name": self.name,
            "node": self.node,
            "interface": self.interface,
            "ips": list(self.ips),
            "labels": cast(Labels, self.labels).to_dict(),
            "service_account": self.service_account,
            "source": self.source,
            "observed_at": self.observed_at,
            "resource_version": self.resource_version,
            "profiles": list(self.profiles),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EndpointRecord:
        if isinstance(data, Mapping) and data.get("v") == 1:  # before profiles
            if "profiles" in data:
                raise RecordError("EndpointRecord: unexpected field(s) 'profiles' in version 1")
            _check_fields(cls, {**data, "v": cls.VERSION, "profiles": []})
        else:
            _check_fields(cls, data)
        fields_ = dict(data)
        del fields_["v"]
        return cls(**fields_)


@_field_order
@dataclass(frozen=True, slots=True)
class ProfileRecord:
    """Labels endpoints inherit: a namespace's (``pcns.``) or a service account's (``pcsa.``)."""

    VERSION: ClassVar[int] = 1
    kind: ProfileKind
    namespace: str
    name: str | None
    labels: Mapping[str, str]
    observed_at: float
    resource_version: str | None = None

    def __post_init__(self) -> None:
        c = "ProfileRecord"
        _check_choice(c, "kind", self.kind, PROFILE_KINDS)
        _check_key_part(c, "namespace", self.namespace)
        if "." in self.namespace:
            raise _fail(c, "namespace", f"a namespace name has no dots: {self.namespace!r}")
        if self.kind == "namespace" and self.name is not None:
            raise _fail(c, "name", "must be null for a namespace profile")
        if self.kind == "serviceaccount":
            _check_key_part(c, "name", self.name)
        object.__setattr__(self, "labels", _check_labels(c, "labels", self.labels))
        object.__setattr__(self, "observed_at", _check_time(c, "observed_at", self.observed_at))
        _check_opt_str(c, "resource_version", self.resource_version)

    @property
    def key(self) -> str:
        return profile_key(self.namespace, self.name if self.kind == "serviceaccount" else None)

    @property
    def partition_key(self) -> str:
        return self.namespace

    def to_dict(self) -> dict[str, Any]:
        return {
            "v": self.VERSION,
            "kind": self.kind,
            "namespace": self.namespace,
            "name": self.name,
            "labels": cast(Labels, self.labels).to_dict(),
            "observed_at": self.observed_at,
            "resource_version": self.resource_version,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ProfileRecord:
        _check_fields(cls, data)
        return cls(**{k: v for k, v in data.items() if k != "v"})


@_field_order
@dataclass(frozen=True, slots=True, eq=True)
class PolicyRecord:
    """A validated policy document (plain JSON, from the policy loader) and who applied it.

    `topics` does not import `policy`: the document is stored as JSON and the
    consumer re-loads it. Not hashable (the document is a dict); compare with ==.
    """

    VERSION: ClassVar[int] = 1
    kind: str
    namespace: str | None
    name: str
    document: Mapping[str, Any]
    actor: str
    applied_at: float
    observed_at: float

    __hash__ = None  # type: ignore[assignment]

    def __post_init__(self) -> None:
        c = "PolicyRecord"
        _check_key_part(c, "kind", self.kind)
        _check_opt_key_part(c, "namespace", self.namespace)
        _check_key_part(c, "name", self.name)
        if not isinstance(self.document, Mapping):
            raise _fail(c, "document", f"expected a JSON object, got {_describe(self.document)}")
        _check_str(c, "actor", self.actor)
        object.__setattr__(self, "applied_at", _check_time(c, "applied_at", self.applied_at))
        object.__setattr__(self, "observed_at", _check_time(c, "observed_at", self.observed_at))

    @property
    def key(self) -> str:
        return endpoint_key(self.kind, self.namespace, self.name)

    @property
    def partition_key(self) -> str:
        return self.namespace if self.namespace is not None else self.name

    def to_dict(self) -> dict[str, Any]:
        return {
            "v": self.VERSION,
            "kind": self.kind,
            "namespace": self.namespace,
            "name": self.name,
            "document": dict(self.document),
            "actor": self.actor,
            "applied_at": self.applied_at,
            "observed_at": self.observed_at,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PolicyRecord:
        _check_fields(cls, data)
        return cls(**{k: v for k, v in data.items() if k != "v"})


@_field_order
@dataclass(frozen=True, slots=True)
class SelectorRecord:
    """A selector the match stream must evaluate, registered by the compile stream.

    `namespace` None means the selector can match in any namespace and is
    fanned out to every partition; otherwise only to its namespace's partition.
    `active` False retires it (a tombstone does the same on compacted topics).
    """

    VERSION: ClassVar[int] = 1
    uid: str
    selector: str
    namespace: str | None
    active: bool
    observed_at: float

    def __post_init__(self) -> None:
        c = "SelectorRecord"
        _check_key_part(c, "uid", self.uid)
        _check_str(c, "selector", self.selector, empty=True)
        _check_opt_key_part(c, "namespace", self.namespace)
        _check_bool(c, "active", self.active)
        object.__setattr__(self, "observed_at", _check_time(c, "observed_at", self.observed_at))

    @property
    def key(self) -> str:
        return self.uid

    @property
    def partition_key(self) -> str | None:
        """The namespace to send it to, or None: every partition (fan-out)."""
        return self.namespace

    def to_dict(self) -> dict[str, Any]:
        return {
            "v": self.VERSION,
            "uid": self.uid,
            "selector": self.selector,
            "namespace": self.namespace,
            "active": self.active,
            "observed_at": self.observed_at,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SelectorRecord:
        _check_fields(cls, data)
        return cls(**{k: v for k, v in data.items() if k != "v"})


@_field_order
@dataclass(frozen=True, slots=True)
class MembershipRecord:
    """An endpoint is a member of a selector; a tombstone on its key ends that.

    Carries what an enforcer needs without joining: where the member is
    (`node`, `interface`) and its `ips`, plus `observed_at` of the change that
    caused it, carried forward for end-to-end latency.
    """

    VERSION: ClassVar[int] = 1
    selector_uid: str
    endpoint_key: str
    namespace: str | None
    node: str | None
    interface: str | None
    ips: tuple[str, ...]
    observed_at: float

    def __post_init__(self) -> None:
        c = "MembershipRecord"
        _check_key_part(c, "selector_uid", self.selector_uid)
        key = _check_str(c, "endpoint_key", self.endpoint_key)
        try:
            _kind, namespace, _name = split_endpoint_key(key)
        except RecordError as exc:
            raise _fail(c, "endpoint_key", str(exc)) from None
        _check_opt_key_part(c, "namespace", self.namespace)
        if namespace != self.namespace:
            raise _fail(
                c, "namespace", f"{self.namespace!r} is not the namespace of endpoint {key!r}"
            )
        _check_opt_str(c, "node", self.node)
        _check_opt_str(c, "interface", self.interface)
        object.__setattr__(self, "ips", _check_ips(c, "ips", self.ips))
        object.__setattr__(self, "observed_at", _check_time(c, "observed_at", self.observed_at))

    @classmethod
    def of_endpoint(cls, selector_uid: str, endpoint: EndpointRecord, observed_at: float,
                    endpoint_key: str | None = None) -> MembershipRecord:
        """The membership of a (validated) endpoint in a (registered) selector.

        `endpoint_key` is ``endpoint.key``, when the caller has it already.

        Built without `__post_init__`'s checks: every field comes from records that passed
        them (the endpoint's key, namespace, node, interface and canonical IPs; the uid of
        a parsed selector), so they would only cost time, once per membership change.
        """
        record = object.__new__(cls)
        setattr_ = object.__setattr__
        setattr_(record, "selector_uid", selector_uid)
        setattr_(record, "endpoint_key", endpoint.key if endpoint_key is None else endpoint_key)
        setattr_(record, "namespace", endpoint.namespace)
        setattr_(record, "node", endpoint.node)
        setattr_(record, "interface", endpoint.interface)
        setattr_(record, "ips", endpoint.ips)
        setattr_(record, "observed_at", observed_at)
        return record

    @property
    def key(self) -> str:
        return membership_key(self.selector_uid, self.endpoint_key)

    @property
    def partition_key(self) -> str:
        """The member endpoint's partition key: its namespace, else its name."""
        _kind, namespace, name = split_endpoint_key(self.endpoint_key)
        return namespace if namespace is not None else name

    def to_dict(self) -> dict[str, Any]:
        return {
            "v": self.VERSION,
            "selector_uid": self.selector_uid,
            "endpoint_key": self.endpoint_key,
            "namespace": self.namespace,
            "node": self.node,
            "interface": self.interface,
            "ips": list(self.ips),
            "observed_at": self.observed_at,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MembershipRecord:
        _check_fields(cls, data)
        return cls(**{k: v for k, v in data.items() if k != "v"})

    @classmethod
    def from_own_json(cls, raw: bytes) -> MembershipRecord:
        """A record this program encoded itself (its own table state), without validation.

        A processor rebuilding a partition decodes every member it published (120,000 at
        bench scale); validating them again costs more than all the rest of the rebuild.
        Input from anyone else goes through `topics.codec.decode_as`. A value that is
        not such a record still fails, with a `RecordError`.
        """
        try:
            data = orjson.loads(raw)
            record = object.__new__(cls)
            for name in ("selector_uid", "endpoint_key", "namespace", "node", "interface",
                         "observed_at"):
                object.__setattr__(record, name, data[name])
            object.__setattr__(record, "ips", tuple(data["ips"]))
        except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
            raise RecordError(f"MembershipRecord: not a stored membership: {exc!r}") from None
        return record


Encoding: TypeAlias = Literal["utf-8", "base64"]
ENCODINGS: tuple[str, ...] = get_args(Encoding)


def bytes_to_text(raw: bytes | None) -> tuple[str | None, Encoding]:
    """Lossless text for arbitrary bytes: UTF-8 when it is, base64 otherwise."""
    if raw is None:
        return None, "utf-8"
    try:
        return raw.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        return base64.b64encode(raw).decode("ascii"), "base64"


def text_to_bytes(text: str | None, encoding: Encoding) -> bytes | None:
    """The inverse of `bytes_to_text`."""
    if text is None:
        return None
    if encoding == "base64":
        return base64.b64decode(text.encode("ascii"), validate=True)
    return text.encode("utf-8")


@_field_order
@dataclass(frozen=True, slots=True)
class DeadLetterRecord:
    """A record some consumer rejected, with where it was, why, and who rejected it.

    `key`/`value` hold the original bytes losslessly: as UTF-8 text when they
    are valid UTF-8, else base64 (see `key_encoding`/`value_encoding`);
    `raw_key()`/`raw_value()` give the bytes back.
    """

    VERSION: ClassVar[int] = 1
    topic: str
    partition: int
    offset: int
    key: str | None
    key_encoding: Encoding
    value: str | None
    value_encoding: Encoding
    reason: str
    rejected_by: str
    at: float

    def __post_init__(self) -> None:
        c = "DeadLetterRecord"
        _check_str(c, "topic", self.topic)
        _check_int(c, "partition", self.partition)
        _check_int(c, "offset", self.offset, minimum=-1)
        if self.key is not None:
            _check_str(c, "key", self.key, empty=True)
        _check_choice(c, "key_encoding", self.key_encoding, ENCODINGS)
        if self.value is not None:
            _check_str(c, "value", self.value, empty=True)
        _check_choice(c, "value_encoding", self.value_encoding, ENCODINGS)
        for field, text, enc in (
            ("key", self.key, self.key_encoding),
            ("value", self.value, self.value_encoding),
        ):
            if enc == "base64" and text is not None:
                try:
                    base64.b64decode(text.encode("ascii"), validate=True)
                except (binascii.Error, UnicodeEncodeError):
                    raise _fail(c, field, "declared base64 but is not valid base64") from None
        _check_str(c, "reason", self.reason)
        _check_str(c, "rejected_by", self.rejected_by)
        object.__setattr__(self, "at", _check_time(c, "at", self.at))

    @property
    def partition_key(self) -> None:
        """Dead letters are not partitioned by namespace."""
        return None

    def raw_key(self) -> bytes | None:
        """The original key bytes."""
        return text_to_bytes(self.key, self.key_encoding)

    def raw_value(self) -> bytes | None:
        """The original value bytes."""
        return text_to_bytes(self.value, self.value_encoding)

    def to_dict(self) -> dict[str, Any]:
        return {
            "v": self.VERSION,
            "topic": self.topic,
            "partition": self.partition,
            "offset": self.offset,
            "key": self.key,
            "key_encoding": self.key_encoding,
            "value": self.value,
            "value_encoding": self.value_encoding,
            "reason": self.reason,
            "rejected_by": self.rejected_by,
            "at": self.at,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DeadLetterRecord:
        _check_fields(cls, data)
        return cls(**{k: v for k, v in data.items() if k != "v"})


@_field_order
@dataclass(frozen=True, slots=True)
class DnsRecord:
    """What one trusted DNS answer taught a node: ``name`` resolves to ``ips`` for ``ttl``
    seconds from ``observed_at`` (when the enforcer held the answer). ``endpoint`` is the
    local endpoint it was for (None: not a known endpoint's address), ``address`` the
    address it went to, ``server`` who sent it. For audit (an enforcer keeps what it learnt
    across a restart in its own ``--dns-state-file``)."""

    VERSION: ClassVar[int] = 1
    node: str
    endpoint: str | None
    address: str
    server: str
    name: str
    ips: tuple[str, ...]
    ttl: int
    observed_at: float

    def __post_init__(self) -> None:
        c = "DnsRecord"
        _check_key_part(c, "node", self.node)
        _check_opt_str(c, "endpoint", self.endpoint)
        _check_ips(c, "address", [self.address])
        _check_ips(c, "server", [self.server])
        _check_str(c, "name", self.name)
        object.__setattr__(self, "ips", _check_ips(c, "ips", self.ips))
        _check_int(c, "ttl", self.ttl)
        object.__setattr__(self, "observed_at", _check_time(c, "observed_at", self.observed_at))

    @property
    def key(self) -> str:
        return f"{self.node}|{self.name}"

    @property
    def partition_key(self) -> str:
        return self.node

    def to_dict(self) -> dict[str, Any]:
        return {
            "v": self.VERSION,
            "node": self.node,
            "endpoint": self.endpoint,
            "address": self.address,
            "server": self.server,
            "name": self.name,
            "ips": list(self.ips),
            "ttl": self.ttl,
            "observed_at": self.observed_at,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DnsRecord:
        _check_fields(cls, data)
        return cls(**{k: v for k, v in data.items() if k != "v"})


#: State topics whose every change is also appended, as a `HistoryRecord`, to a history topic.
HISTORY_OF: Mapping[str, str] = {
    "endpoints": "endpoints.history",
    "profiles": "profiles.history",
    "policies": "policies.history",
}
HistoryChange: TypeAlias = Literal["upsert", "delete"]


@_field_order
@dataclass(frozen=True, slots=True, eq=True)
class HistoryRecord:
    """One change to a state topic, for audit: who (``actor``) changed ``key`` of ``topic``
    through what (``source``: ``apply``, ``kubernetes``, ``inventory``...) at ``at`` (when
    the change was published). ``record`` is the state record as it is encoded on
    ``topic`` (None for a delete), so replaying a history topic up to a time rebuilds the
    state topic as it stood then; a delete carries its actor, which a tombstone cannot."""

    VERSION: ClassVar[int] = 1
    topic: str
    key: str
    change: HistoryChange
    actor: str
    source: str
    at: float
    record: Mapping[str, Any] | None

    __hash__ = None  # type: ignore[assignment]

    def __post_init__(self) -> None:
        c = "HistoryRecord"
        if self.topic not in HISTORY_OF:
            raise _fail(c, "topic", f"expected one of {', '.join(HISTORY_OF)}, got "
                        f"{_describe(self.topic)}")
        _check_str(c, "key", self.key)
        if self.change not in get_args(HistoryChange):
            raise _fail(c, "change", f"expected 'upsert' or 'delete', got {_describe(self.change)}")
        _check_str(c, "actor", self.actor)
        _check_str(c, "source", self.source)
        object.__setattr__(self, "at", _check_time(c, "at", self.at))
        if (self.record is None) != (self.change == "delete"):
            raise _fail(c, "record", "an upsert carries the record and a delete does not")
        if self.record is not None and not isinstance(self.record, Mapping):
            raise _fail(c, "record", f"expected a JSON object, got {_describe(self.record)}")
        self._partition()

    def _partition(self) -> str:
        try:
            if self.topic == "profiles":
                return split_profile_key(self.key)[0]
            _kind, namespace, name = split_endpoint_key(self.key)
        except RecordError as exc:
            raise _fail("HistoryRecord", "key", str(exc)) from None
        return namespace if namespace is not None else name

    @property
    def partition_key(self) -> str:
        """The state record's partition key, so a key's history stays in order."""
        return self._partition()

    def to_dict(self) -> dict[str, Any]:
        return {
            "v": self.VERSION,
            "topic": self.topic,
            "key": self.key,
            "change": self.change,
            "actor": self.actor,
            "source": self.source,
            "at": self.at,
            "record": None if self.record is None else dict(self.record),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> HistoryRecord:
        _check_fields(cls, data)
        return cls(**{k: v for k, v in data.items() if k != "v"})


FlowDirection: TypeAlias = Literal["egress", "ingress"]
FLOW_DIRECTIONS: tuple[str, ...] = get_args(FlowDirection)
FlowAction: TypeAlias = Literal["allow", "deny"]
FLOW_ACTIONS: tuple[str, ...] = get_args(FlowAction)
_PROTOCOL_TEXT = re.compile(r"^(TCP|UDP|ICMP|ICMPv6|SCTP|UDPLite|[0-9]{1,3})$")


@_field_order
@dataclass(frozen=True, slots=True)
class FlowRecord:
    """Connection attempts one node's enforcer saw decided, aggregated over an interval:
    ``packets`` first packets of ``attempts`` attempts (distinct source ports, or ICMP
    echo ids; retransmissions are packets of the same attempt) from ``source_ip`` to
    ``dest_ip``:``dest_port`` over ``protocol``, first seen at ``start``, last at ``end``,
    and what decided: ``action``, with the ``tier``, ``policy`` (its key on the policies
    topic) and ``rule`` (``egress[2]``) when a rule did, and ``reason`` in words ("rule",
    "end of tier", "no policy (profile)", ...). ``source_endpoint`` / ``dest_endpoint``:
    the local endpoint's key when the address is one. ``observed_at``: when the interval's
    records were made. A ``reason`` of "overflow" sums what did not fit the interval's cap
    of distinct flows (its addresses are then the unspecified address)."""

    VERSION: ClassVar[int] = 1
    node: str
    direction: FlowDirection
    source_ip: str
    source_endpoint: str | None
    dest_ip: str
    dest_port: int | None
    protocol: str
    dest_endpoint: str | None
    action: FlowAction
    tier: str | None
    policy: str | None
    rule: str | None
    reason: str
    packets: int
    attempts: int
    start: float
    end: float
    observed_at: float

    def __post_init__(self) -> None:
        c = "FlowRecord"
        _check_key_part(c, "node", self.node)
        _check_choice(c, "direction", self.direction, FLOW_DIRECTIONS)
        object.__setattr__(self, "source_ip", _check_address(c, "source_ip", self.source_ip))
        _check_opt_str(c, "source_endpoint", self.source_endpoint)
        object.__setattr__(self, "dest_ip", _check_address(c, "dest_ip", self.dest_ip))
        if self.dest_port is not None:
            _check_int(c, "dest_port", self.dest_port)
            if self.dest_port > 65535:
                raise _fail(c, "dest_port", f"must be at most 65535, got {self.dest_port}")
        _check_str(c, "protocol", self.protocol)
        if not _PROTOCOL_TEXT.match(self.protocol):
            raise _fail(c, "protocol", "expected TCP, UDP, ICMP, ICMPv6, SCTP, UDPLite or a "
                        f"protocol number, got {self.protocol!r}")
        _check_opt_str(c, "dest_endpoint", self.dest_endpoint)
        _check_choice(c, "action", self.action, FLOW_ACTIONS)
        for name in ("tier", "policy", "rule"):
            _check_opt_str(c, name, getattr(self, name))
        _check_str(c, "reason", self.reason)
        _check_int(c, "packets", self.packets, minimum=1)
        _check_int(c, "attempts", self.attempts, minimum=1)
        if self.attempts > self.packets:
            raise _fail(c, "attempts", f"cannot exceed packets ({self.packets}), got "
                        f"{self.attempts}")
        start = _check_time(c, "start", self.start)
        end = _check_time(c, "end", self.end)
        if end < start:
            raise _fail(c, "end", f"must not be before start ({start}), got {end}")
        object.__setattr__(self, "start", start)
        object.__setattr__(self, "end", end)
        object.__setattr__(self, "observed_at", _check_time(c, "observed_at", self.observed_at))

    @property
    def key(self) -> str:
        return self.node

    @property
    def partition_key(self) -> str:
        return self.node

    def to_dict(self) -> dict[str, Any]:
        return {"v": self.VERSION, **{name: getattr(self, name)
                                      for name in self.__dataclass_fields_order__}}  # type: ignore[attr-defined]

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FlowRecord:
        _check_fields(cls, data)
        return cls(**{k: v for k, v in data.items() if k != "v"})


def _check_address(cls: str, field: str, value: object) -> str:
    """One IP address (not a network), in canonical text."""
    text = _check_str(cls, field, value)
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise _fail(cls, field, f"expected an IP address, got {text!r}") from None


Record: TypeAlias = (
    EndpointRecord
    | ProfileRecord
    | PolicyRecord
    | SelectorRecord
    | MembershipRecord
    | DeadLetterRecord
    | DnsRecord
    | HistoryRecord
    | FlowRecord
)
RECORD_TYPES: tuple[type[Record], ...] = (
    EndpointRecord,
    ProfileRecord,
    PolicyRecord,
    SelectorRecord,
    MembershipRecord,
    DnsRecord,
    HistoryRecord,
    FlowRecord,
    DeadLetterRecord,
)
