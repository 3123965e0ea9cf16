"""What the node has learned from DNS answers, as set members of domain rules. Pure.

A rule with ``destination.domains`` matches the IPs that trusted DNS servers
gave for a matching name. Each distinct pattern list is a *domain set*, named
by a uid (``d:`` + a hash of its sorted patterns) so that it flows through the
enforcer state exactly like a selector's set: its members are the learned
names (key ``dns:<name>``), each contributing the IPs still valid for it.

`DnsLearner` keeps name -> IP -> expiry. An answer teaches the question name
and every name of its CNAME chain the IPs at the chain's end, valid for the
smallest TTL along the way plus a grace period; at most ``max_ips`` IPs per
name (the soonest to expire are evicted, and counted). Expired IPs leave the
sets; connections already open keep working (conntrack accepts established
flows before any rule).

`DomainSets` joins the two: which domain sets exist (refcounted by the
policies that use them) and, for a learned name, which sets it belongs to.
Its methods return the membership changes for `enforcers.state.EnforcerState`.
"""

from __future__ import annotations

import base64
import hashlib
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

from enforcers.dnswire import TYPE_CNAME, Answer
from policy.domains import matches, validate

#: RFC 2181: a TTL with the top bit set is taken as zero.
MAX_TTL = 2**31 - 1
MEMBER_PREFIX = "dns:"


def domain_uid(patterns: Iterable[str]) -> str:
    """The set uid of a rule's domain patterns (normalised, order and repeats ignored)."""
    text = ",".join(sorted({validate(p) for p in patterns}))
    digest = hashlib.sha224(b"d:" + text.encode()).digest()
    return "d:" + base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def member_key(name: str) -> str:
    return MEMBER_PREFIX + name


@dataclass(frozen=True, slots=True)
class Learned:
    """What one answer taught: ``name`` resolves to ``ips`` for ``ttl`` seconds."""

    name: str
    ips: tuple[str, ...]
    ttl: int


def chains_of(answer: Answer) -> list[Learned]:
    """For the question name and each name on its CNAME chain: the IPs the chain ends in,
    valid for the smallest TTL from that name down to the addresses. Records about other
    names teach nothing (a server may add them; only the chain from the question is the
    answer)."""
    if answer.question is None or answer.rcode != 0:
        return []
    cnames: dict[str, tuple[str, int]] = {}
    addresses: dict[str, list[tuple[str, int]]] = {}
    for rec in answer.records:
        ttl = rec.ttl if rec.ttl <= MAX_TTL else 0
        if rec.rtype == TYPE_CNAME:
            cnames.setdefault(rec.name, (rec.data, ttl))
        else:
            addresses.setdefault(rec.name, []).append((rec.data, ttl))
    chain: list[tuple[str, int]] = []  # (name, TTL of its CNAME to the next name)
    name: str = answer.question
    seen: set[str] = set()
    while name not in seen:
        seen.add(name)
        if name not in cnames:
            break
        target, link_ttl = cnames[name]
        chain.append((name, link_ttl))
        name = target
    if name in seen and name in cnames:
        return []  # a CNAME loop: no address at its end
    found = addresses.get(name, [])
    if not found:
        return []
    ips = tuple(sorted({ip for ip, _ in found}))
    # each name is valid as long as every record from it down to the addresses is
    ttl = min(t for _, t in found)
    learned = [Learned(name, ips, ttl)]
    for alias, link_ttl in reversed(chain):
        ttl = min(ttl, link_ttl)
        learned.append(Learned(alias, ips, ttl))
    return learned[::-1]


@dataclass
class LearnerStats:
    answers: int = 0
    evictions: int = 0
    expired: int = 0


@dataclass
class DnsLearner:
    """name -> IP -> expiry time, bounded per name."""

    grace: float = 2.0
    max_ips: int = 64
    names: dict[str, dict[str, float]] = field(default_factory=dict)
    stats: LearnerStats = field(default_factory=LearnerStats)

    def learn(self, learned: Iterable[Learned], now: float) -> set[str]:
        """Take what an answer taught; the names whose set of valid IPs changed."""
        changed: set[str] = set()
        for item in learned:
            ips = self.names.setdefault(item.name, {})
            before = set(ips)
            expires = now + item.ttl + self.grace
            for ip in item.ips:
                ips[ip] = max(ips.get(ip, 0.0), expires)
            self._bound(ips)
            if set(ips) != before:
                changed.add(item.name)
        return changed

    def _bound(self, ips: dict[str, float]) -> None:
        """At most ``max_ips``: the soonest to expire go (and are counted)."""
        if len(ips) > self.max_ips:
            drop = sorted(ips, key=lambda ip: (ips[ip], ip))[: len(ips) - self.max_ips]
            for ip in drop:
                del ips[ip]
            self.stats.evictions += len(drop)

    def expire(self, now: float) -> set[str]:
        """Forget the IPs whose time is up; the names that lost some."""
        changed: set[str] = set()
        for name in list(self.names):
            ips = self.names[name]
            gone = [ip for ip, expires in ips.items() if expires <= now]
            if not gone:
                continue
            for ip in gone:
                del ips[ip]
            self.stats.expired += len(gone)
            changed.add(name)
            if not ips:
                del self.names[name]
        return changed

    def ips(self, name: str) -> tuple[str, ...]:
        return tuple(sorted(self.names.get(name, ())))

    def snapshot(self) -> dict[str, dict[str, float]]:
        """Everything learned (name -> IP -> expiry, wall-clock seconds), to persist."""
        return {name: dict(ips) for name, ips in self.names.items()}

    def restore(self, snapshot: object, now: float) -> set[str]:
        """Take back a `snapshot` (what has expired since is left out); the names it
        taught. Raises ValueError, changing nothing, if it is not a snapshot."""
        if not isinstance(snapshot, dict):
            raise ValueError("a DNS snapshot is a JSON object of name -> {ip: expiry}")
        taken: dict[str, dict[str, float]] = {}
        for name, ips in snapshot.items():
            if not isinstance(name, str) or not isinstance(ips, dict) or not all(
                isinstance(ip, str) and isinstance(t, int | float) for ip, t in ips.items()
            ):
                raise ValueError(f"a DNS snapshot entry is name -> {{ip: expiry}}: {name!r}")
            live = {ip: float(t) for ip, t in ips.items() if t > now}
            if live:
                taken[name] = live
        for name, ips in taken.items():
            known = self.names.setdefault(name, {})
            for ip, expires in ips.items():
                known[ip] = max(known.get(ip, 0.0), expires)
            self._bound(known)  # a snapshot taken with a higher max_ips, or on top of others
        return set(taken)

    def next_expiry(self) -> float | None:
        return min((e for ips in self.names.values() for e in ips.values()), default=None)

    def ip_count(self) -> int:
        return sum(len(ips) for ips in self.names.values())


#: A membership change for the enforcer state: (set uid, member key, IPs; None: gone).
MemberChange = tuple[str, str, tuple[str, ...] | None]


@dataclass
class DomainSets:
    """The domain sets in use and their members, from a `DnsLearner`."""

    learner: DnsLearner = field(default_factory=DnsLearner)
    patterns: dict[str, tuple[str, ...]] = field(default_factory=dict)
    refs: Counter[str] = field(default_factory=Counter)
    # learned name -> the uids whose patterns match it (cached; cleared when sets change)
    _matching: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def use(self, uid: str, patterns: tuple[str, ...]) -> list[MemberChange]:
        """One more user of a domain set; a new set is filled with what is known already."""
        self.refs[uid] += 1
        if uid in self.patterns:
            return []
        self.patterns[uid] = patterns
        self._matching.clear()
        return [(uid, member_key(name), self.learner.ips(name))
                for name in self.learner.names if self._covers(patterns, name)]

    def release(self, uid: str) -> list[MemberChange]:
        """One user fewer; the last one takes the set's members out."""
        if self.refs[uid] <= 0:
            return []
        self.refs[uid] -= 1
        if self.refs[uid]:
            return []
        del self.refs[uid]
        patterns = self.patterns.pop(uid)
        self._matching.clear()
        return [(uid, member_key(name), None)
                for name in self.learner.names if self._covers(patterns, name)]

    def sets_of(self, name: str) -> tuple[str, ...]:
        found = self._matching.get(name)
        if found is None:
            found = self._matching[name] = tuple(
                uid for uid, patterns in self.patterns.items() if self._covers(patterns, name))
        return found

    def changes(self, names: Iterable[str]) -> list[MemberChange]:
        """The members the learner's current state gives these names, in every set."""
        out: list[MemberChange] = []
        for name in names:
            ips = self.learner.ips(name) or None
            out += [(uid, member_key(name), ips) for uid in self.sets_of(name)]
            if ips is None:
                self._matching.pop(name, None)
        return out

    def learn(self, answer: Answer, now: float) -> list[MemberChange]:
        return self.learn_items(chains_of(answer), now)

    def learn_items(self, learned: Iterable[Learned], now: float) -> list[MemberChange]:
        self.learner.stats.answers += 1
        return self.changes(self.learner.learn(learned, now))

    def restore(self, snapshot: object, now: float) -> list[MemberChange]:
        return self.changes(self.learner.restore(snapshot, now))

    def expire(self, now: float) -> list[MemberChange]:
        return self.changes(self.learner.expire(now))

    @staticmethod
    def _covers(patterns: tuple[str, ...], name: str) -> bool:
        return any(matches(p, name) for p in patterns)
