"""Hypothesis properties for selectors, against an independent oracle.

Random selector trees are rendered to text in many spellings (quotes, spacing, optional
parentheses, ``startswith``/``notin``), parsed, and compared with a tiny evaluator written
here from the Calico rules; the source form must round-trip and mean the same; uids
must be stable; the parser must raise nothing but SelectorError whatever it is fed.
"""

from __future__ import annotations

import base64
import hashlib
import re
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from policy.selectors import MAX_DEPTH, SelectorError, evaluate, parse

KEYS = [
    "a", "b", "app", "in", "has", "not", "contains", "all", "x.y/z-1",
    "projectcalico.org/namespace",
]
VALUES = ["", "a", "b", "ab", "ba", "prod", "x'y", 'x"y', " sp ace "]

Tree = tuple[Any, ...]

keys = st.sampled_from(KEYS)
values = st.sampled_from(VALUES)
value_lists = st.lists(values, max_size=4)

leaves: st.SearchStrategy[Tree] = st.one_of(
    st.tuples(st.sampled_from(["eq", "ne", "contains", "starts", "ends"]), keys, values),
    st.tuples(st.sampled_from(["in", "notin"]), keys, value_lists),
    st.tuples(st.just("has"), keys),
    st.tuples(st.sampled_from(["all", "global"])),
)


def _extend(children: st.SearchStrategy[Tree]) -> st.SearchStrategy[Tree]:
    return st.one_of(
        st.tuples(st.just("not"), children),
        st.tuples(st.sampled_from(["and", "or"]), st.lists(children, min_size=2, max_size=4)),
    )


trees: st.SearchStrategy[Tree] = st.recursive(leaves, _extend, max_leaves=12)

label_sets = st.dictionaries(keys, values, max_size=6)


def oracle(tree: Tree, labels: dict[str, str]) -> bool:
    """Calico's semantics, written independently of policy.selectors."""
    kind = tree[0]
    if kind in ("eq", "ne", "contains", "starts", "ends", "in", "notin"):
        present = tree[1] in labels
        value = labels.get(tree[1], "")
        arg = tree[2]
        if kind == "eq":
            return present and value == arg
        if kind == "ne":
            return not present or value != arg
        if kind == "contains":
            return present and arg in value
        if kind == "starts":
            return present and value.startswith(arg)
        if kind == "ends":
            return present and value.endswith(arg)
        if kind == "in":
            return present and value in arg
        return not present or value not in arg
    if kind == "has":
        return tree[1] in labels
    if kind == "all":
        return True
    if kind == "global":
        return "projectcalico.org/namespace" not in labels
    if kind == "not":
        return not oracle(tree[1], labels)
    if kind == "and":
        return all(oracle(child, labels) for child in tree[1])
    return any(oracle(child, labels) for child in tree[1])


@st.composite
def rendered(draw: st.DrawFn, tree: Tree) -> str:
    """One of the many texts Calico accepts for ``tree``."""
    ws = lambda: draw(st.sampled_from(["", " ", "  ", "\t"]))  # noqa: E731
    ws1 = lambda: draw(st.sampled_from([" ", "  ", "\t", " \t "]))  # noqa: E731

    def quote(value: str) -> str:
        if '"' in value:
            return f"'{value}'"
        if "'" in value:
            return f'"{value}"'
        q = draw(st.sampled_from(["'", '"']))
        return f"{q}{value}{q}"

    def render(node: Tree, parent: str) -> str:
        kind = node[0]
        if kind in ("eq", "ne"):
            op = "==" if kind == "eq" else "!="
            return f"{node[1]}{ws()}{op}{ws()}{quote(node[2])}"
        if kind in ("contains", "starts", "ends"):
            word = {
                "contains": ["contains"],
                "starts": ["starts with", "startswith", "starts  with"],
                "ends": ["ends with", "endswith", "ends\twith"],
            }[kind]
            return f"{node[1]}{ws1()}{draw(st.sampled_from(word))}{ws()}{quote(node[2])}"
        if kind in ("in", "notin"):
            word = "in" if kind == "in" else draw(st.sampled_from(["not in", "notin", "not  in"]))
            items = ("," + ws()).join(quote(v) for v in node[2])
            trailing = "," if node[2] and draw(st.booleans()) else ""
            return f"{node[1]}{ws1()}{word}{ws()}{{{ws()}{items}{trailing}{ws()}}}"
        if kind == "has":
            return f"has({ws()}{node[1]}{ws()})"
        if kind in ("all", "global"):
            return f"{kind}({ws()})"
        if kind == "not":
            child = node[1]
            inner = render(child, "not")
            if child[0] in ("and", "or", "not") or draw(st.booleans()):
                inner = f"({ws()}{inner}{ws()})"
            return f"!{ws()}{inner}"
        joiner = f"{ws()}{'&&' if kind == 'and' else '||'}{ws()}"
        text = joiner.join(render(child, kind) for child in node[1])
        # "||" inside "&&" or under "!" needs parentheses; anything else may have them.
        needs = parent == "not" or (kind == "or" and parent == "and")
        if needs or draw(st.booleans()):
            text = f"({ws()}{text}{ws()})"
        return text

    return ws() + render(tree, "top") + ws()


@st.composite
def tree_and_text(draw: st.DrawFn) -> tuple[Tree, str]:
    tree = draw(trees)
    return tree, draw(rendered(tree))


PROPS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPS
@given(tree_and_text(), st.lists(label_sets, min_size=1, max_size=8))
def test_parsed_selector_agrees_with_oracle(case: tuple[Tree, str], labelsets: list[Any]) -> None:
    tree, text = case
    selector = parse(text)
    again = parse(selector.canonical)
    for labels in labelsets:
        expected = oracle(tree, labels)
        assert selector.matches(labels) == expected, (text, selector.canonical, labels)
        assert evaluate(selector.root, labels) == expected
        assert again.matches(labels) == expected


@PROPS
@given(tree_and_text())
def test_source_round_trip_and_uid(case: tuple[Tree, str]) -> None:
    _, text = case
    selector = parse(text)
    again = parse(selector.source)
    assert again.canonical == selector.canonical
    assert again.uid == selector.uid
    assert again == selector
    # The canonical text is Calico's: a parenthesised double negation prints as "!!",
    # which (as in Calico) parses back with each run of "!" folded to its parity.
    folded = re.sub(r"!+(?!=)", lambda run: "!" * (len(run.group()) % 2), selector.canonical)
    assert parse(selector.canonical).canonical == folded
    if "!!" not in selector.canonical:
        assert selector.source == selector.canonical
    digest = hashlib.sha224(b"s:" + selector.canonical.encode()).digest()
    assert selector.uid == "s:" + base64.urlsafe_b64encode(digest).decode().rstrip("=")


@PROPS
@given(trees, st.data())
def test_every_spelling_means_the_same(tree: Tree, data: st.DataObject) -> None:
    first = parse(data.draw(rendered(tree)))
    second = parse(data.draw(rendered(tree)))
    # Optional parentheses may regroup "&&"/"||" chains (and so the canonical text), never
    # the meaning.
    for labels in data.draw(st.lists(label_sets, min_size=1, max_size=5)):
        assert first.matches(labels) == second.matches(labels)


@PROPS
@given(tree_and_text(), st.lists(label_sets, min_size=1, max_size=8))
def test_required_values_are_sound(case: tuple[Tree, str], labelsets: list[Any]) -> None:
    selector = parse(case[1])
    required = selector.required_keys()
    for labels in labelsets:
        if not selector.matches(labels):
            continue
        for key, allowed in required.items():
            assert key in labels
            if allowed is not None:
                assert labels[key] in allowed


# ----------------------------------------------------------------------------- fuzzing

TOKENS = [
    "(", ")", "{", "}", ",", "==", "!=", "!", "&&", "||", "&", "|", "=", "in", "not", "notin",
    "not in", "contains", "starts", "with", "startswith", "ends with", "has(", "has(a)",
    "all()", "all(", "global()", "global(", "a", "b.c/d", "'v'", '"v"', "'", '"', "%", "k" * 513,
    " ", "\t", "\n", "é", "\x00", "\ud800",
]


def _only_selector_errors(text: str) -> None:
    try:
        selector = parse(text)
    except SelectorError as err:
        assert err.column >= 1
        assert err.message
        assert str(err) == f"column {err.column}: {err.message}"
        return
    assert parse(selector.source) == selector
    selector.matches({"a": "v", "b.c/d": ""})


@settings(max_examples=500, deadline=None)
@given(st.text(max_size=60))
def test_parser_raises_only_selector_error_on_any_text(text: str) -> None:
    _only_selector_errors(text)


@settings(max_examples=800, deadline=None)
@given(st.lists(st.sampled_from(TOKENS), max_size=25), st.sampled_from(["", " "]))
def test_parser_raises_only_selector_error_on_token_soup(tokens: list[str], sep: str) -> None:
    _only_selector_errors(sep.join(tokens))


@settings(max_examples=60, deadline=None)
@given(
    st.integers(min_value=0, max_value=3 * MAX_DEPTH),
    st.integers(min_value=0, max_value=3 * MAX_DEPTH),
    st.sampled_from(["(", "!(", "( !", "(!!"]),
)
def test_deep_nesting_gives_selector_errors_not_recursion_errors(
    opening: int, closing: int, prefix: str
) -> None:
    _only_selector_errors(prefix * opening + "has(a)" + ")" * closing)
