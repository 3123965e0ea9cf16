"""Table tests for the Calico selector language: operators, precedence, absent labels,
canonical forms and uids (Calico's own test vectors), errors with columns."""

from __future__ import annotations

import base64
import copy
import hashlib
import pickle

import pytest

from policy.selectors import (
    ALL,
    MAX_DEPTH,
    Selector,
    SelectorError,
    conjunction,
    evaluate,
    parse,
    uid_of,
)

# ----------------------------------------------------------------------------- matching

# (selector, label sets that match, label sets that do not): Calico's parser_test.go
# selectorTests, plus the absent-label rules for every operator.
MATCH_TABLE: list[tuple[str, list[dict[str, str]], list[dict[str, str]]]] = [
    ('a == "b"', [{"a": "b"}, {"a": "b", "c": "d"}], [{}, {"a": "c"}, {"c": "d"}]),
    (
        'a == "b" && c == "d"',
        [{"a": "b", "c": "d"}],
        [{}, {"a": "b", "c": "e"}, {"a": "c", "c": "d"}, {"c": "d"}, {"a": "b"}],
    ),
    (
        'a == "b" || c == "d"',
        [{"a": "b", "c": "d"}, {"a": "b"}, {"c": "d"}],
        [{}, {"a": "e", "c": "e"}, {"c": "e"}, {"a": "e"}],
    ),
    ("""a in {"'", '"', "c"}""", [{"a": "c"}, {"a": '"'}, {"a": "'"}], [{}, {"a": "e"}]),
    ("""a not in {"'", '"', "c"}""", [{}, {"a": "e"}], [{"a": "c"}, {"a": '"'}, {"a": "'"}]),
    ("a == 'a'", [{"a": "a"}], [{"a": "b"}, {}]),
    ('a != "b"', [{"a": "a"}, {}], [{"a": "b"}]),
    ('a != "a"', [{}], [{"a": "a"}]),
    ('a contains "a"', [{"a": "a"}, {"a": "bab"}, {"a": "aaa", "b": "c"}],
     [{}, {"a": "b"}, {"b": "aaa"}]),
    ('a starts with "a"', [{"a": "a"}, {"a": "abb"}], [{}, {"a": "b"}, {"a": "baa"}, {"b": "a"}]),
    ('a ends with "a"', [{"a": "a"}, {"a": "bba"}], [{}, {"a": "b"}, {"a": "aab"}, {"b": "a"}]),
    ('a contains ""', [{"a": ""}, {"a": "x"}], [{}, {"b": "x"}]),
    ('a starts with ""', [{"a": ""}], [{}]),
    ('a ends with ""', [{"a": "z"}], [{}]),
    ('a in {"a"}', [{"a": "a"}], [{"a": "b"}, {}]),
    ('!a in {"a"}', [{"a": "b"}, {}], [{"a": "a"}]),
    ('a in {"a", "b"}', [{"a": "a"}, {"a": "b"}], [{"a": "c"}, {}]),
    ('a not in {"d", "e"}', [{"a": "a"}, {}], [{"a": "d"}]),
    ("a in {}", [], [{}, {"a": ""}]),
    ("a not in {}", [{}, {"a": ""}], []),
    ("has(a)", [{"a": "b"}, {"a": ""}], [{}, {"b": "a"}]),
    ("!has(a)", [{"b": "b"}, {}], [{"a": "b"}]),
    ("", [{}, {"a": "b"}], []),
    (" ", [{}], []),
    ("all()", [{}, {"a": "b"}], []),
    (" all()", [{"a": "b"}], []),
    ("!all()", [], [{}, {"a": "b"}]),
    ("!!has(b)", [{"b": "x"}], [{"a": "b"}]),
    ("! has(a)", [], [{"a": "b"}]),
    ("!!! has(a)", [{}], [{"a": "b"}]),
    ("!! ! has(a)", [], [{"a": "b"}]),
    ("! !!has(a)", [], [{"a": "b"}]),
    ("a == 'a1' && b == 'b1'", [{"a": "a1", "b": "b1"}], [{"a": "a1"}]),
    ("a == 'a1' && b != 'b1'", [{"a": "a1"}], [{"a": "a1", "b": "b1"}]),
    ("a != 'a1' && !b == 'b1'", [{}], [{"a": "a1", "b": "b1"}]),
    ("!a == 'a1' && b == 'b1'", [{"b": "b1"}], [{"a": "a1", "b": "b1"}]),
    ("has(a) && !has(b)", [{"a": "a"}], [{"a": "a", "b": ""}]),
    ("!(!has(a) || has(b))", [{"a": "a"}], [{"a": "a", "b": "b"}, {}]),
    ("!(has(b) || !has(a))", [{"a": "a"}], [{"b": "b"}]),
    ("a == 'a1' || b != 'b1'", [{"a": "a1", "b": "b1"}, {}], [{"b": "b1"}]),
    ("a != 'a1' || b != 'b1'", [{"a": "a1"}], [{"a": "a1", "b": "b1"}]),
    ("! a == 'a1' || ! b == 'b1'", [{}], [{"a": "a1", "b": "b1"}]),
]


@pytest.mark.parametrize(("text", "matching", "not_matching"), MATCH_TABLE)
def test_matches_table(
    text: str, matching: list[dict[str, str]], not_matching: list[dict[str, str]]
) -> None:
    selector = parse(text)
    again = parse(selector.canonical)
    for labels in matching:
        assert selector.matches(labels), (text, labels)
        assert again.matches(labels), (selector.canonical, labels)
    for labels in not_matching:
        assert not selector.matches(labels), (text, labels)
        assert not again.matches(labels), (selector.canonical, labels)


@pytest.mark.parametrize(
    ("text", "absent_result"),
    [
        ('k == "v"', False),
        ('k != "v"', True),
        ('k in {"v"}', False),
        ('k not in {"v"}', True),
        ('k contains "v"', False),
        ('k starts with "v"', False),
        ('k ends with "v"', False),
        ("has(k)", False),
        ("!has(k)", True),
    ],
)
def test_absent_label_rules(text: str, absent_result: bool) -> None:
    assert parse(text).matches({"other": "v"}) is absent_result


def test_global_matches_only_non_namespaced_label_sets() -> None:
    selector = parse("global()")
    assert selector.matches({})
    assert selector.matches({"app": "x"})
    assert not selector.matches({"projectcalico.org/namespace": "default"})
    assert parse("!global()").matches({"projectcalico.org/namespace": "default"})
    assert selector.canonical == "global()"


# ----------------------------------------------------------------------------- precedence


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        ('a == "1" || b == "2" && c == "3"', '(a == "1" || (b == "2" && c == "3"))'),
        ('a == "1" && b == "2" || c == "3"', '((a == "1" && b == "2") || c == "3")'),
        ('(a == "1" || b == "2") && c == "3"', '((a == "1" || b == "2") && c == "3")'),
        ('!a == "1" && b == "2"', '(!a == "1" && b == "2")'),
        ('!(a == "1" && b == "2")', '!(a == "1" && b == "2")'),
        ('!(a == "1")', '!a == "1"'),
        ("!!!!has(a)", "has(a)"),
        ('a == "1" && (b == "2" && c == "3")', '(a == "1" && (b == "2" && c == "3"))'),
        ('((a == "1"))', 'a == "1"'),
        ("has(a) || has(b) || has(c)", "(has(a) || has(b) || has(c))"),
    ],
)
def test_precedence_and_canonical_grouping(text: str, canonical: str) -> None:
    assert parse(text).canonical == canonical
    assert parse(canonical).canonical == canonical


@pytest.mark.parametrize(
    ("text", "canonical", "source"),
    [
        ("!(!has(a))", "!!has(a)", "!(!has(a))"),
        ("!(!(!has(a)))", "!!!has(a)", "!(!(!has(a)))"),
        ("!!(!has(a))", "!has(a)", "!has(a)"),
        ('!(!a == "1") && has(b)', '(!!a == "1" && has(b))', '(!(!a == "1") && has(b))'),
        ('!(!(a == "1" || has(b)))', '!!(a == "1" || has(b))', '!(!(a == "1" || has(b)))'),
    ],
)
def test_a_parenthesised_double_negation_stays_as_calico_keeps_it(
    text: str, canonical: str, source: str
) -> None:
    """Calico folds a run of '!' into one and never looks into '(…)': Not(Not(X)) stays,
    printed "!!X", so its uid is Felix's (not X's). "!!X" itself parses to X, so selectors
    cross topics as `source`, which parses back to the same selector."""
    selector = parse(text)
    assert selector.canonical == canonical
    assert selector.uid == uid_of(canonical)
    assert ("!!" in canonical) == (parse(canonical).uid != selector.uid)
    assert selector.source == source and parse(source) == selector
    assert parse(source).uid == selector.uid
    assert pickle.loads(pickle.dumps(selector)) == selector


def test_not_binds_to_one_term() -> None:
    selector = parse('!a == "1" || b == "2"')
    assert selector.matches({"b": "2", "a": "1"})
    assert selector.matches({})
    assert not selector.matches({"a": "1"})


def test_and_binds_tighter_than_or() -> None:
    selector = parse('a == "1" || b == "2" && c == "3"')
    assert selector.matches({"a": "1"})
    assert not selector.matches({"b": "2"})
    assert selector.matches({"b": "2", "c": "3"})


# ----------------------------------------------------------------------------- canonical forms

# Calico's canonicalisationTests (lib/selector/parser/parser_test.go), uids included.
CALICO_CANONICAL = [
    ("", "all()", "s:5y5I3VdRZfDU01O--xXAPx2yxCQQqMf0M6IWug"),
    (" all() ", "all()", "s:5y5I3VdRZfDU01O--xXAPx2yxCQQqMf0M6IWug"),
    (" (all() )", "all()", "s:5y5I3VdRZfDU01O--xXAPx2yxCQQqMf0M6IWug"),
    ("! (has( b)||! has(a ))", "!(has(b) || !has(a))", "s:Iss0uCleLYv1GSv_pNm7hAO58kE9jAx1NKyG3Q"),
    ('! (a == "b"&&! c != "d")', '!(a == "b" && !c != "d")',
     "s:lh3haoY1ikTRkd4UZu0nWSaIBknYLPJLX16d-w"),
    ("a == \"'\"", "a == \"'\"", None),
    ("a == '\"'", "a == '\"'", None),
    ("a contains '\"'", "a contains '\"'", None),
    ("a contains \"'\"", "a contains \"'\"", None),
    ("a startswith '\"'", "a starts with '\"'", None),
    ("a endswith \"'\"", "a ends with \"'\"", None),
    ("a!='\"'", "a != '\"'", None),
    ('a in {"d"}', 'a in {"d"}', None),
    ('a in {"a", "b"}', 'a in {"a", "b"}', None),
    ('a in {"d", "a", "b"}', 'a in {"a", "b", "d"}', None),
    ('a in {"z", "x", "y", "a"}', 'a in {"a", "x", "y", "z"}', None),
    ('a in {"z", "z", "x", "y", "x", "a"}', 'a in {"a", "x", "y", "z"}', None),
    # Calico's visitor test, without the prefix.
    ("!(!(k == 'v' && has(t) || all()) && (a in {'b', 'c'}))",
     '!(!((k == "v" && has(t)) || all()) && a in {"b", "c"})', None),
]


@pytest.mark.parametrize(("text", "canonical", "uid"), CALICO_CANONICAL)
def test_calico_canonical_forms_and_uids(text: str, canonical: str, uid: str | None) -> None:
    selector = parse(text)
    assert selector.canonical == canonical
    assert parse(canonical).canonical == canonical
    assert parse(canonical).uid == selector.uid
    if uid is not None:
        assert selector.uid == uid


def test_all_uid_and_constant() -> None:
    assert ALL.uid == "s:5y5I3VdRZfDU01O--xXAPx2yxCQQqMf0M6IWug"
    assert parse("") == ALL
    assert parse("\t \n") == ALL


def test_uid_is_sha224_of_prefixed_canonical() -> None:
    selector = parse("app == 'web' && tier in {'b', 'a'}")
    digest = hashlib.sha224(b"s:" + selector.canonical.encode()).digest()
    assert selector.uid == "s:" + base64.urlsafe_b64encode(digest).decode().rstrip("=")


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        ("a notin {'x'}", 'a not in {"x"}'),
        ("a not   in {'x'}", 'a not in {"x"}'),
        ("a starts   with 'x'", 'a starts with "x"'),
        ("a ends\twith 'x'", 'a ends with "x"'),
        ("a in {'x',}", 'a in {"x"}'),
        ("a in{}", "a in {}"),
        ("has(  a.b/c-d_e )", "has(a.b/c-d_e)"),
        ("all(  )", "all()"),
        ("global( )", "global()"),
        ("a==''", 'a == ""'),
        ("a contains'x'", 'a contains "x"'),
        ("k8s-app == \"kube-dns\"", 'k8s-app == "kube-dns"'),
        ("a == 'ünïcødé ✓'", 'a == "ünïcødé ✓"'),
    ],
)
def test_spellings_and_spacing(text: str, canonical: str) -> None:
    assert parse(text).canonical == canonical


@pytest.mark.parametrize(
    ("text", "canonical", "labels"),
    [
        ("in in {'a'}", 'in in {"a"}', {"in": "a"}),
        ("has == 'x'", 'has == "x"', {"has": "x"}),
        ("all == 'x'", 'all == "x"', {"all": "x"}),
        ("global != 'x'", 'global != "x"', {}),
        ("contains contains 'x'", 'contains contains "x"', {"contains": "axb"}),
        ("starts starts with 'x'", 'starts starts with "x"', {"starts": "xa"}),
        ("not in {'a'}", 'not in {"a"}', {"not": "a"}),
        ("not not in {'a'}", 'not not in {"a"}', {"not": "b"}),
        ("notin notin {'a'}", 'notin not in {"a"}', {}),
        ("has(has)", "has(has)", {"has": ""}),
    ],
)
def test_keywords_are_usable_as_keys(text: str, canonical: str, labels: dict[str, str]) -> None:
    selector = parse(text)
    assert selector.canonical == canonical
    assert selector.matches(labels)


def test_key_length_limit() -> None:
    assert parse("k" * 512 + " == 'v'").matches({"k" * 512: "v"})
    with pytest.raises(SelectorError, match="limit is 512"):
        parse("k" * 513 + " == 'v'")
    with pytest.raises(SelectorError, match="limit is 512"):
        parse("has(" + "k" * 513 + ")")


def test_equality_and_hash_follow_canonical_text() -> None:
    a = parse("a == 'x' && b in {'2', '1'}")
    b = parse('(a=="x")&&(b in {"1","2","1"})')
    assert a == b
    assert hash(a) == hash(b)
    assert a is not b
    assert len({a, b}) == 1
    assert isinstance(a, Selector)
    assert str(a) == a.canonical


def test_pickles_and_copies_as_canonical_text() -> None:
    selector = parse("app in {'b', 'a'} && !has(x)")
    for clone in (pickle.loads(pickle.dumps(selector)), copy.deepcopy(selector)):
        assert clone == selector
        assert clone.uid == selector.uid
        assert clone.matches({"app": "a"}) and not clone.matches({"app": "a", "x": ""})


@pytest.mark.parametrize(
    ("text", "canonical", "labels"),
    [
        ("a == 'x\\y'", 'a == "x\\y"', {"a": "x\\y"}),
        ("a == '{}()!&|,'", 'a == "{}()!&|,"', {"a": "{}()!&|,"}),
        ('a in {"\'", "it\'s"}', "a in {\"'\", \"it's\"}", {"a": "it's"}),
        ("a == '  '", 'a == "  "', {"a": "  "}),
        ("a == 'line\nbreak'", 'a == "line\nbreak"', {"a": "line\nbreak"}),
    ],
)
def test_values_are_taken_literally(text: str, canonical: str, labels: dict[str, str]) -> None:
    selector = parse(text)
    assert selector.canonical == canonical
    assert selector.matches(labels)
    assert parse(canonical).matches(labels)
    assert not selector.matches({"a": "other"})


def test_parse_is_cached() -> None:
    assert parse("app == 'cached'") is parse("app == 'cached'")


# ----------------------------------------------------------------------------- required values


@pytest.mark.parametrize(
    ("text", "key", "expected"),
    [
        ("a == 'x'", "a", {"x"}),
        ("a in {'x', 'y'}", "a", {"x", "y"}),
        ("a == 'x' && b == 'y'", "b", {"y"}),
        ("a in {'x', 'y'} && a in {'y', 'z'}", "a", {"y"}),
        ("a == 'x' && a == 'y'", "a", set()),
        ("a == 'x' || a in {'y'}", "a", {"x", "y"}),
        ("(a == 'x' && b == '1') || (a == 'y' && c == '2')", "a", {"x", "y"}),
        ("a == 'x' || b == 'y'", "a", None),
        ("has(a)", "a", None),
        ("a != 'x'", "a", None),
        ("!a == 'x'", "a", None),
        ("a not in {'x'}", "a", None),
        ("all()", "a", None),
        ("has(a) && a == 'x'", "a", {"x"}),
        ("projectcalico.org/namespace == 'ns1' && app == 'web'",
         "projectcalico.org/namespace", {"ns1"}),
    ],
)
def test_required_values(text: str, key: str, expected: set[str] | None) -> None:
    got = parse(text).required_values(key)
    assert got == (None if expected is None else frozenset(expected))


# ----------------------------------------------------------------------------- Calico docs examples


@pytest.mark.parametrize(
    ("text", "matching", "not_matching"),
    [
        ("type == 'webserver' && deployment == 'prod'",
         {"type": "webserver", "deployment": "prod"}, {"type": "webserver", "deployment": "dev"}),
        ("type in {'frontend', 'backend'}", {"type": "backend"}, {"type": "db"}),
        ("deployment != 'dev'", {"app": "x"}, {"deployment": "dev"}),
        ("! has(label-name)", {"other": "x"}, {"label-name": "x"}),
        ("k8s-app == 'kube-dns'", {"k8s-app": "kube-dns"}, {"k8s-app": "dns"}),
        ("role == 'frontend' || role == 'backend'", {"role": "frontend"}, {"role": "db"}),
        ("projectcalico.org/name in {'foo', 'bar'}", {"projectcalico.org/name": "foo"},
         {"projectcalico.org/name": "baz"}),
        ("color == 'red'", {"color": "red"}, {"color": "blue"}),
        ("has(projectcalico.org/namespace)", {"projectcalico.org/namespace": "x"}, {}),
        ("tier starts with 'app-'", {"tier": "app-1"}, {"tier": "db-app-1"}),
        ("domain ends with '.svc'", {"domain": "a.svc"}, {"domain": "a.svc.x"}),
        ("team contains 'pay'", {"team": "ops-payments"}, {"team": "ops"}),
        ("(a == 'x' && b == 'y') || c == 'z'", {"c": "z"}, {"a": "x"}),
    ],
)
def test_calico_docs_examples(
    text: str, matching: dict[str, str], not_matching: dict[str, str]
) -> None:
    selector = parse(text)
    assert selector.matches(matching)
    assert not selector.matches(not_matching)


# ----------------------------------------------------------------------------- composition


def test_conjunction_drops_all_and_nests_like_calico() -> None:
    app = parse("app == 'web'")
    scope = parse("projectcalico.org/namespace == 'ns1'")
    both = conjunction([app, scope])
    assert both.canonical == '(app == "web" && projectcalico.org/namespace == "ns1")'
    assert conjunction([ALL, app]) == app
    assert conjunction([]) == ALL
    pair = conjunction([parse("a == '1' && b == '2'"), scope])
    assert pair.canonical == '((a == "1" && b == "2") && projectcalico.org/namespace == "ns1")'
    assert pair.required_values("projectcalico.org/namespace") == frozenset({"ns1"})


# ----------------------------------------------------------------------------- errors

BAD = [
    # Calico's badSelectors
    ("b == b", 6, "expected a quoted value after '=='"),
    ("b contains b", 12, "expected a quoted value after 'contains'"),
    ("b starts with b", 15, "expected a quoted value after 'starts with'"),
    ("b ends with b", 13, "expected a quoted value after 'ends with'"),
    ("'b1' == b", 1, "expected a label comparison"),
    ("b", 2, "expected an operator"),
    ("a b", 3, "expected an operator"),
    ("!", 2, "found the end of the selector"),
    ('foo == "bar" &', 14, "expected '&&'"),
    ('foo == "bar" |', 14, "expected '||'"),
    ("foo != ||", 8, "expected a quoted value after '!='"),
    ('foo in {"", ||', 13, "expected a quoted value or '}'"),
    ('foo in ""', 8, "expected '{'"),
    ('"FOO', 1, "unterminated string"),
    ("\"FOO'", 1, "unterminated string"),
    ("'FOO", 1, "unterminated string"),
    ("(", 2, "found the end of the selector"),
    ('(a == "foo"', 12, "expected ')' to close the '(' at column 1"),
    (")", 1, "found ')'"),
    ("()", 2, "found ')'"),
    ("%", 1, "unexpected character '%'"),
    ('a == "b" && %', 13, "unexpected character"),
    ('a == "b" || %', 13, "unexpected character"),
    ("a ", 3, "expected an operator"),
    ("has(foo) &&", 12, "found the end of the selector"),
    # more
    ("app == 'x' && tier == web", 23, "expected a quoted value after '=='"),
    ("a = 'b'", 3, "expected '=='"),
    ("a in {'x' 'y'}", 11, "expected ',' or '}'"),
    ("a in ('x')", 6, "expected '{'"),
    ("has()", 5, "expected a label name inside has(...)"),
    ("has(a", 6, "expected ')' to close 'has(a'"),
    ("has(a b)", 7, "expected ')'"),
    ("all(x)", 5, "expected ')'"),
    ("global(", 8, "expected ')'"),
    ('a == "b")', 9, "unmatched ')'"),
    ('a == "b" c == "d"', 10, "expected '&&', '||' or the end"),
    ("a startswith", 13, "found the end of the selector"),
    ("a starts 'x'", 3, "expected an operator"),
    ("a == 'b' && && b == 'c'", 13, "found '&&'"),
    ("a in {'x'", 10, "expected ',' or '}'"),
    ("a ∈ {'x'}", 3, "expected an operator"),
    ("é == 'x'", 1, "unexpected character 'é'"),
    ("has(a) == 'x'", 8, "expected '&&', '||' or the end"),
]


@pytest.mark.parametrize(("text", "column", "fragment"), BAD)
def test_errors_name_column_and_reason(text: str, column: int, fragment: str) -> None:
    with pytest.raises(SelectorError) as info:
        parse(text)
    err = info.value
    assert isinstance(err, ValueError)
    assert err.column == column, str(err)
    assert fragment in err.message, str(err)
    assert str(err) == f"column {column}: {err.message}"


def test_error_message_example_from_the_brief() -> None:
    with pytest.raises(SelectorError) as info:
        parse("app == 'x' && tier == web")
    assert str(info.value).startswith("column 23: expected a quoted value after '=='")


def test_nesting_limit_is_a_clear_error() -> None:
    ok = "(" * MAX_DEPTH + "a == 'b'" + ")" * MAX_DEPTH
    assert parse(ok).canonical == 'a == "b"'
    with pytest.raises(SelectorError, match="nested more than"):
        parse("(" * (MAX_DEPTH + 1) + "a == 'b'" + ")" * (MAX_DEPTH + 1))
    with pytest.raises(SelectorError, match="nested more than"):
        parse("(" * 100_000)


def test_deep_alternating_nesting_compiles_and_matches() -> None:
    text = "a == '0'"
    for depth in range(1, MAX_DEPTH + 1):
        op = "&&" if depth % 2 else "||"
        text = f"!has(k{depth}) {op} ({text})"
    selector = parse(text)
    assert parse(selector.canonical) == selector
    assert selector.matcher.__name__ == "_match"  # generated code, not the fallback
    assert selector.matches({})  # the outermost "||" holds: k100 is absent
    assert not selector.matches({"k100": "", "k99": ""})
    everything = {f"k{i}": "" for i in range(1, MAX_DEPTH + 1)}
    for labels in ({"k100": ""}, everything, {**everything, "a": "0"}, {"k1": "", "k100": ""}):
        assert selector.matches(labels) == evaluate(selector.root, labels)


def test_long_flat_inputs() -> None:
    many = " && ".join(f"has(k{i})" for i in range(3000))
    selector = parse(many)
    assert selector.matches({f"k{i}": "" for i in range(3000)})
    assert not selector.matches({})
    assert parse("!" * 10001 + "has(a)").canonical == "!has(a)"


def test_non_string_input_is_a_selector_error() -> None:
    with pytest.raises(SelectorError, match="must be a string"):
        parse(123)  # type: ignore[arg-type]
