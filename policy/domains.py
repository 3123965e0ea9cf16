"""Domain-name patterns for egress rules and network sets, with Calico Enterprise's rule.

From the Calico Enterprise "DNS policy" docs: a name without ``*`` matches exactly that name;
a single ``*`` in any position stands for ONE OR MORE whole labels at that position, so
``*.example.com`` matches ``a.example.com`` and ``a.b.example.com`` but never the apex
``example.com``, and ``www.*.com`` matches ``www.sun.com`` but not ``www.com``. Matching is
case-insensitive and a trailing dot (fully-qualified form) is ignored.

Validation (done once, at load) rejects what could not mean what the author wrote: empty
labels, more than one ``*``, ``*`` inside a label (``www*.example.com``), a bare ``*`` (it
would allow every domain; use a network set of ``0.0.0.0/0`` to say that explicitly),
labels over 63 characters or names over 253, and characters outside letters, digits,
``-`` and ``_``.
"""

from __future__ import annotations

import functools
from typing import Final

__all__ = ["DomainError", "matches", "validate"]

_MAX_NAME: Final = 253
_MAX_LABEL: Final = 63
_LABEL_CHARS: Final = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-_")


class DomainError(ValueError):
    """An invalid domain pattern; the message says what is wrong with it."""


def _normalise(text: str) -> str:
    text = text.lower()
    return text[:-1] if text.endswith(".") else text


def validate(pattern: str) -> str:
    """The normalised pattern (lowercase, no trailing dot), or :class:`DomainError`."""
    if not isinstance(pattern, str):
        raise DomainError(f"a domain must be a string, not {type(pattern).__name__}")
    if "://" in pattern:
        raise DomainError(f"{pattern!r} looks like a URL; give the host name only (it contains "
                          "':')")
    name = _normalise(pattern)
    if not name:
        raise DomainError(f"{pattern!r}: empty domain name")
    if len(name) > _MAX_NAME:
        raise DomainError(f"{pattern!r}: longer than {_MAX_NAME} characters")
    labels = name.split(".")
    stars = 0
    for index, label in enumerate(labels, start=1):
        if not label:
            raise DomainError(f"{pattern!r}: label {index} is empty (two dots in a row, or a "
                              "leading dot)")
        if label == "*":
            stars += 1
            continue
        if "*" in label:
            raise DomainError(f"{pattern!r}: '*' must be a whole label (like '*.example.com'), "
                              f"not part of {label!r}")
        if len(label) > _MAX_LABEL:
            raise DomainError(f"{pattern!r}: label {label!r} is longer than {_MAX_LABEL} "
                              "characters")
        bad = next((c for c in label if c not in _LABEL_CHARS), None)
        if bad is not None:
            raise DomainError(f"{pattern!r}: label {label!r} contains {bad!r}; only letters, "
                              "digits, '-' and '_' are allowed")
        if label.startswith("-") or label.endswith("-"):
            raise DomainError(f"{pattern!r}: label {label!r} starts or ends with '-'")
    if stars > 1:
        raise DomainError(f"{pattern!r}: at most one '*' is allowed")
    if stars == 1 and len(labels) == 1:
        raise DomainError(f"{pattern!r}: a bare '*' would allow every domain; name at least "
                          "one label besides '*'")
    return name


@functools.lru_cache(maxsize=4096)
def _compiled(pattern: str) -> tuple[tuple[str, ...], tuple[str, ...] | None]:
    """(prefix labels, suffix labels) around the '*', or (all labels, None) for exact names."""
    labels = tuple(validate(pattern).split("."))
    if "*" not in labels:
        return labels, None
    star = labels.index("*")
    return labels[:star], labels[star + 1 :]


def matches(pattern: str, name: str) -> bool:
    """Whether DNS ``name`` is covered by ``pattern`` (raises DomainError for a bad pattern).

    Names that are not well-formed (empty labels) match nothing.
    """
    prefix, suffix = _compiled(pattern)
    labels = _normalise(name).split(".")
    if "" in labels:
        return False
    if suffix is None:
        return tuple(labels) == prefix
    if len(labels) < len(prefix) + len(suffix) + 1:
        return False
    return (
        tuple(labels[: len(prefix)]) == prefix
        and tuple(labels[len(labels) - len(suffix) :]) == suffix
    )
