"""iptables adapter: one ``iptables-restore --noflush`` per batch, only our chains.

Reads back ``iptables-save`` and compares each of our chains' comment hashes
with the desired ones, so unchanged chains are never rewritten and a rule
removed by hand is noticed (and restored) by the next resync. Runs inside a
named network namespace (``ip netns exec``) when given one; nothing outside
chains named ``pc-*`` and the two hook jumps is ever touched.
"""

from __future__ import annotations

import logging
import re
import subprocess
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import TypeVar

from enforcers.render import (
    CHAIN_PREFIX,
    HOOK_COMMENT,
    HOOKS,
    Chain,
    IptRule,
    Jump,
    chain_lines,
    restore_text,
)

log = logging.getLogger(__name__)
V = TypeVar("V")

_COMMENT = re.compile(r'--comment "?(pc:[A-Za-z0-9]+)"?')


class IptablesError(RuntimeError):
    """iptables-restore or iptables-save failed; the message carries its stderr."""


#: The scratch chain rules are test-loaded into (and removed again, in the same commit).
PROBE_CHAIN = "pc-probe"


@dataclass(frozen=True)
class RejectedRule:
    """A rule of ours the kernel refuses: chain, index in the chain, and what it said."""

    chain: str
    index: int
    error: str


class RulesRejected(IptablesError):
    """A transaction failed because the kernel refuses these rules (found by probing)."""

    def __init__(self, rules: list[RejectedRule], cause: IptablesError) -> None:
        self.rules = rules
        where = ", ".join(f"{r.chain} rule {r.index}" for r in rules)
        super().__init__(f"the kernel refuses {where}: {cause}")


def probeable(rule: IptRule) -> bool:
    """Whether a rule can be test-loaded alone (a jump needs its target chain to exist)."""
    return not isinstance(rule.target, Jump)


@dataclass
class Actual:
    """What the kernel has: our chains (name -> rule hashes) and which hooks exist."""

    chains: dict[str, tuple[str, ...]] = field(default_factory=dict)
    hooks: set[tuple[str, str]] = field(default_factory=set)


@dataclass(frozen=True)
class ApplyResult:
    written: tuple[str, ...]
    deleted: tuple[str, ...]
    hooks_added: tuple[tuple[str, str], ...]

    @property
    def changed(self) -> bool:
        return bool(self.written or self.deleted or self.hooks_added)


def parse_save(text: str) -> Actual:
    """Our chains and hooks from ``iptables-save`` output (filter table only)."""
    actual = Actual()
    chains: dict[str, list[str]] = {}
    table = None
    for line in text.splitlines():
        if line.startswith("*"):
            table = line[1:].strip()
            continue
        if table != "filter":
            continue
        if line.startswith(":" + CHAIN_PREFIX):
            chains.setdefault(line[1:].split()[0], [])
        elif line.startswith("-A "):
            parts = line.split()
            chain = parts[1]
            if chain.startswith(CHAIN_PREFIX):
                match = _COMMENT.search(line)
                chains.setdefault(chain, []).append(
                    match.group(1)[3:] if match else "?"
                )
            else:
                for builtin, ours in HOOKS:
                    if chain == builtin and f"-j {ours}" in line and HOOK_COMMENT in line:
                        actual.hooks.add((builtin, ours))
    actual.chains = {name: tuple(hashes) for name, hashes in chains.items()}
    return actual


def chains_to_write(
    desired: Mapping[str, Chain], actual: Actual, changed: Collection[str] | None = None
) -> tuple[list[Chain], tuple[str, ...]]:
    """The chains whose hashes differ from the kernel's, and ours it should no longer have.

    With ``changed`` (the names that may differ), only those are compared: a batch costs
    the chains it changed, not every chain of the node. None compares everything (start
    and resync, where anything may differ).
    """
    if changed is None:
        write = [c for name, c in sorted(desired.items()) if actual.chains.get(name) != c.hashes]
        return write, tuple(sorted(set(actual.chains) - set(desired)))
    write = []
    for name in sorted(changed):
        chain = desired.get(name)
        if chain is not None and actual.chains.get(name) != chain.hashes:
            write.append(chain)
    delete = tuple(sorted(n for n in changed if n not in desired and n in actual.chains))
    return write, delete


def copy_chains(
    target: dict[str, V], desired: Mapping[str, Chain], changed: Collection[str] | None,
    value: Callable[[Chain], V],
) -> None:
    """Make `target` map each desired chain's name to ``value(chain)``, after an apply.

    With ``changed`` only those names are looked at (as in ``chains_to_write``): a name
    no longer desired leaves `target`. None replaces everything.
    """
    if changed is None:
        target.clear()
        target.update((name, value(chain)) for name, chain in desired.items())
        return
    for name in changed:
        chain = desired.get(name)
        if chain is None:
            target.pop(name, None)
        else:
            target[name] = value(chain)


def chain_hashes(chain: Chain) -> tuple[str, ...]:
    return chain.hashes


class Iptables:
    """Programs our chains of the filter table, in ``netns`` (None: this namespace)."""

    def __init__(self, netns: str | None = None, family: int = 4, timeout: float = 30.0) -> None:
        self.netns = netns
        self.timeout = timeout
        base = "iptables" if family == 4 else "ip6tables"
        self._save = [f"{base}-save", "-t", "filter"]
        self._restore = [f"{base}-restore", "--noflush", "--wait"]

    def _cmd(self, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.netns, *argv] if self.netns else argv

    def save(self) -> Actual:
        proc = subprocess.run(
            self._cmd(self._save), capture_output=True, text=True, timeout=self.timeout
        )
        if proc.returncode != 0:
            raise IptablesError(f"{' '.join(self._save)} failed: {proc.stderr.strip()}")
        return parse_save(proc.stdout)

    def _restore_errors(self, text: str) -> str | None:
        """Run one restore; None if it succeeded, else what it said (one line)."""
        proc = subprocess.run(
            self._cmd(self._restore), input=text, capture_output=True, text=True,
            timeout=self.timeout,
        )
        if proc.returncode == 0:
            return None
        said = [line.strip() for line in proc.stderr.splitlines()
                if line.strip() and not line.startswith("Try `")]
        return "; ".join(said) or f"exit status {proc.returncode}"

    def restore(self, text: str) -> None:
        error = self._restore_errors(text)
        if error is not None:
            lines = text.splitlines()
            where = re.search(r"line:? (\d+)", error)
            if where and 0 < int(where.group(1)) <= len(lines):
                context = f"line {where.group(1)}: {lines[int(where.group(1)) - 1]}"
            else:
                context = "\n".join(lines[:20]) + ("\n…" if len(lines) > 20 else "")
            raise IptablesError(f"iptables-restore failed: {error}\n{context}")

    def _loads(self, rules: list[tuple[str, int, IptRule]]) -> str | None:
        """Load `rules` into a scratch chain and remove it in the same commit: the kernel
        checks every rule and nothing changes. None if it took them, else its error."""
        chain = Chain.build(PROBE_CHAIN, [rule for _name, _index, rule in rules])
        text = "\n".join(["*filter", f":{PROBE_CHAIN} - [0:0]", *chain_lines(chain),
                          f"-F {PROBE_CHAIN}", f"-X {PROBE_CHAIN}", "COMMIT", ""])
        error = self._restore_errors(text)
        if error is None:
            return None
        # a line number would point into the probe's text, which nobody sees
        return re.sub(r";? ?Error occurred at line: \d+", "", error)

    def rejected_rules(self, chains: Collection[Chain]) -> list[RejectedRule]:
        """The rules of `chains` the kernel refuses, by bisection: loading a group of rules
        that the kernel takes clears them all, so k bad rules among n cost about
        k·log2(n) probes. Rules that jump to another chain are not probed."""
        candidates = [(c.name, i, r) for c in chains for i, r in enumerate(c.rules)
                      if probeable(r)]
        found: list[RejectedRule] = []
        pending = [candidates] if candidates else []
        while pending:
            group = pending.pop()
            error = self._loads(group)
            if error is None:
                continue
            if len(group) == 1:
                name, index, _rule = group[0]
                found.append(RejectedRule(name, index, error))
                continue
            half = len(group) // 2
            pending += [group[half:], group[:half]]
        return sorted(found, key=lambda r: (r.chain, r.index))

    def apply(
        self, desired: Mapping[str, Chain], actual: Actual | None = None,
        changed: Collection[str] | None = None,
    ) -> ApplyResult:
        """Make our chains equal ``desired`` in one atomic restore; return what changed.

        ``changed``: the only chain names that may differ from ``actual`` (see
        ``chains_to_write``); None compares every chain."""
        if actual is None:
            actual = self.save()
            changed = None
        write, delete = chains_to_write(desired, actual, changed)
        hooks = tuple(
            h for h in HOOKS if h not in actual.hooks and h[1] in desired
        )
        if write or delete or hooks:
            try:
                self.restore(restore_text(write, delete, hooks))
            except IptablesError as exc:
                rejected = self.rejected_rules(write)
                if rejected:
                    raise RulesRejected(rejected, exc) from exc
                raise
            log.debug("iptables: wrote %d chains, deleted %d", len(write), len(delete))
        return ApplyResult(tuple(c.name for c in write), delete, hooks)

    def remove_all(self) -> None:
        """Remove our hooks and chains (for tests and uninstall; the enforcer never does)."""
        actual = self.save()
        lines = ["*filter"]
        lines += [
            f'-D {builtin} -m comment --comment "{HOOK_COMMENT}" -j {ours}'
            for builtin, ours in sorted(actual.hooks)
        ]
        lines += [f"-F {name}" for name in sorted(actual.chains)]
        lines += [f"-X {name}" for name in sorted(actual.chains)]
        lines.append("COMMIT")
        if len(lines) > 2:
            self.restore("\n".join(lines) + "\n")
