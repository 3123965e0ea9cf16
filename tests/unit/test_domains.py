"""Domain patterns: Calico Enterprise's wildcard rule, validation, and a regex oracle."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from policy.domains import DomainError, matches, validate


@pytest.mark.parametrize(
    ("pattern", "name", "expected"),
    [
        # Exact names (Calico Enterprise docs: google.com is distinct from www.google.com).
        ("google.com", "google.com", True),
        ("google.com", "www.google.com", False),
        ("www.google.com", "google.com", False),
        # The docs' wildcard examples.
        ("*.google.com", "www.google.com", True),
        ("*.google.com", "www.ipv6.google.com", True),
        ("*.google.com", "google.com", False),
        ("www.*.com", "www.sun.com", True),
        ("www.*.com", "www.apple.com", True),
        ("www.*.com", "www.com", False),
        ("update.*.mycompany.com", "update.tools.mycompany.com", True),
        ("update.*.mycompany.com", "update.tools.internal.mycompany.com", True),
        ("update.*.mycompany.com", "update.mycompany.com", False),
        # Whole labels only.
        ("*.example.com", "notexample.com", False),
        ("*.example.com", "a.notexample.com", False),
        ("*.example.com", "a.example.com.evil.org", False),
        ("api.*", "api.example.com", True),
        ("api.*", "api", False),
        # Case and the trailing dot.
        ("Example.COM", "example.com", True),
        ("example.com.", "EXAMPLE.com", True),
        ("example.com", "example.com.", True),
        ("*.Example.com", "WWW.example.COM.", True),
        # Malformed names match nothing.
        ("*.example.com", "a..example.com", False),
        ("example.com", "", False),
    ],
)
def test_matches_table(pattern: str, name: str, expected: bool) -> None:
    assert matches(pattern, name) is expected


@pytest.mark.parametrize(
    ("pattern", "normalised"),
    [
        ("example.com", "example.com"),
        ("Example.COM.", "example.com"),
        ("*.example.com", "*.example.com"),
        ("www.*.com", "www.*.com"),
        ("_sip._tcp.example.com", "_sip._tcp.example.com"),
        ("xn--bcher-kva.example", "xn--bcher-kva.example"),
        ("localhost", "localhost"),
        ("a" * 63 + ".com", "a" * 63 + ".com"),
    ],
)
def test_validate_normalises(pattern: str, normalised: str) -> None:
    assert validate(pattern) == normalised


@pytest.mark.parametrize(
    ("pattern", "reason"),
    [
        ("", "empty"),
        (".", "empty"),
        ("*", "bare '*'"),
        ("*.", "bare '*'"),
        ("a..b.com", "label 2 is empty"),
        (".example.com", "label 1 is empty"),
        ("example.com..", "is empty"),
        ("*.*.example.com", "at most one '*'"),
        ("www*.example.com", "whole label"),
        ("*www.example.com", "whole label"),
        ("ex ample.com", "contains ' '"),
        ("example.com/path", "contains '/'"),
        ("https://example.com", "contains ':'"),
        ("-example.com", "starts or ends with '-'"),
        ("example-.com", "starts or ends with '-'"),
        ("a" * 64 + ".com", "longer than 63"),
        (".".join(["abcdefghi"] * 26), "longer than 253"),
    ],
)
def test_validate_rejects_with_reason(pattern: str, reason: str) -> None:
    with pytest.raises(DomainError, match=re.escape(reason)):
        validate(pattern)
    with pytest.raises(DomainError):
        matches(pattern, "example.com")


def test_domain_error_is_a_value_error() -> None:
    assert issubclass(DomainError, ValueError)
    with pytest.raises(DomainError, match="must be a string"):
        validate(None)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- property

labels = st.sampled_from(["a", "b", "ab", "www", "api", "example", "com", "x-1", "_s"])
label_lists = st.lists(labels, min_size=1, max_size=5)


def oracle(pattern: str, name: str) -> bool:
    """Regex reading of the docs: '*' is one or more whole labels; case and final dot ignored."""
    pattern = pattern.lower().removesuffix(".")
    parts = [r"[^.]+(?:\.[^.]+)*" if part == "*" else re.escape(part)
             for part in pattern.split(".")]
    return re.fullmatch(r"\.".join(parts), name.lower().removesuffix(".")) is not None


@st.composite
def patterns(draw: st.DrawFn) -> str:
    parts = draw(label_lists)
    if draw(st.booleans()):
        position = draw(st.integers(0, len(parts)))
        parts.insert(position, "*")
        if len(parts) == 1:
            parts.append("com")
    text = ".".join(parts)
    if draw(st.booleans()):
        text = text.upper()
    return text + draw(st.sampled_from(["", "."]))


@settings(max_examples=400, deadline=None)
@given(patterns(), label_lists, st.booleans())
def test_matches_agrees_with_regex_oracle(pattern: str, name_labels: list[str], dot: bool) -> None:
    name = ".".join(name_labels) + ("." if dot else "")
    assert matches(pattern, name) == oracle(pattern, name)


@settings(max_examples=200, deadline=None)
@given(patterns(), st.data())
def test_names_built_from_the_pattern_match(pattern: str, data: st.DataObject) -> None:
    """Replacing '*' by one or more labels always matches; by zero labels never does."""
    canonical = validate(pattern)
    filler = data.draw(label_lists)
    assert matches(pattern, canonical.replace("*", ".".join(filler)))
    if "*" in canonical:
        apex = ".".join(part for part in canonical.split(".") if part != "*")
        assert not matches(pattern, apex)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=30))
def test_validate_raises_only_domain_error(text: str) -> None:
    try:
        normalised = validate(text)
    except DomainError:
        return
    assert validate(normalised) == normalised
