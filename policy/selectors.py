"""Calico's label-selector language: parse, canonicalise, identify and evaluate.

Semantics follow libcalico-go ``lib/selector`` (tokenizer, parser and ast.go) so that users
can bring their Calico YAML unchanged and so that selector uids equal Calico's:

* Grammar: ``==``, ``!=``, ``in {…}``, ``not in {…}`` (also ``notin``), ``has(k)``,
  ``contains``, ``starts with`` (``startswith``), ``ends with`` (``endswith``), ``all()``,
  ``global()``, ``!``, ``&&``, ``||`` and parentheses. ``!`` binds to one term (a comparison,
  a function or a parenthesised group) and repeated ``!`` collapse; ``&&`` binds tighter
  than ``||``. Values are single- or double-quoted, without escapes. Label keys are
  ``[A-Za-z0-9_./-]{1,512}``; operator words are keywords only right after a label, so
  ``in``, ``has`` or ``contains`` are valid keys. The empty (or blank) selector is ``all()``.
* Absent labels: ``!=`` and ``not in`` are true; ``==``, ``in``, ``contains``,
  ``starts with`` and ``ends with`` are false.
* Canonical form (Calico's ``String()``): ``a == "b"`` (single quotes only when the value
  holds a double quote), ``has(a)``, ``a in {"x", "y"}`` with the set sorted and
  de-duplicated, ``!`` written directly before its operand, every ``&&``/``||`` group
  wrapped in one pair of parentheses: ``(a == "b" && (c == "d" || has(e)))``.
* Uid: ``"s:" + base64url_nopad(SHA-224(b"s:" + canonical))`` (Calico's
  ``hash.MakeUniqueID("s", …)``).

Deliberate, documented differences from Calico (none changes what a valid Calico selector
means or how Calico prints it):

* ``global()``: Calico's docs define it as "match all non-namespaced resources"; Calico's
  evaluator returns true and gives it that meaning by rewriting a ``namespaceSelector`` of
  ``global()`` to ``!has(projectcalico.org/namespace)``. We evaluate ``global()`` itself as
  ``!has(projectcalico.org/namespace)``, which gives the same result there and follows the
  docs everywhere else. Its canonical text stays ``global()``.
* Double negation through parentheses (``!(!has(a))``) collapses to the operand. Calico
  prints ``!!has(a)``, which its own parser reads back as ``has(a)``; collapsing makes the
  canonical form a fixed point of ``parse``.
* Newlines and carriage returns count as whitespace (Calico only skips spaces and tabs), so
  YAML block scalars with a trailing newline load.
* Parentheses nest at most ``MAX_DEPTH`` deep, so hostile input gets a clear error rather
  than exhausting the interpreter's stack.
"""

from __future__ import annotations

import base64
import functools
import hashlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Final, TypeAlias, cast

__all__ = [
    "ALL",
    "MAX_DEPTH",
    "MAX_KEY_LENGTH",
    "NAMESPACE_LABEL",
    "Matcher",
    "Node",
    "Selector",
    "SelectorError",
    "conjunction",
    "evaluate",
    "from_node",
    "label_restrictions",
    "parse",
    "python_expression",
    "uid_of",
]

MAX_KEY_LENGTH: Final = 512
MAX_DEPTH: Final = 100
NAMESPACE_LABEL: Final = "projectcalico.org/namespace"

_WHITESPACE: Final = " \t\r\n"
_KEY_CHARS: Final = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_./-")


class SelectorError(ValueError):
    """A selector that is not valid Calico syntax; says where (1-based column) and why."""

    def __init__(self, column: int, message: str) -> None:
        super().__init__(f"column {column}: {message}")
        self.column = column
        self.message = message


# --------------------------------------------------------------------------- syntax tree


@dataclass(frozen=True, slots=True)
class Eq:
    key: str
    value: str


@dataclass(frozen=True, slots=True)
class Ne:
    key: str
    value: str


@dataclass(frozen=True, slots=True)
class Contains:
    key: str
    value: str


@dataclass(frozen=True, slots=True)
class StartsWith:
    key: str
    value: str


@dataclass(frozen=True, slots=True)
class EndsWith:
    key: str
    value: str


@dataclass(frozen=True, slots=True)
class In:
    key: str
    values: tuple[str, ...]  # sorted, de-duplicated


@dataclass(frozen=True, slots=True)
class NotIn:
    key: str
    values: tuple[str, ...]  # sorted, de-duplicated


@dataclass(frozen=True, slots=True)
class Has:
    key: str


@dataclass(frozen=True, slots=True)
class AllNode:
    pass


@dataclass(frozen=True, slots=True)
class GlobalNode:
    pass


@dataclass(frozen=True, slots=True)
class Not:
    operand: Node


@dataclass(frozen=True, slots=True)
class And:
    operands: tuple[Node, ...]  # at least two


@dataclass(frozen=True, slots=True)
class Or:
    operands: tuple[Node, ...]  # at least two


Node: TypeAlias = (
    Eq | Ne | Contains | StartsWith | EndsWith | In | NotIn | Has | AllNode | GlobalNode | Not
    | And | Or
)
_ValueNode: TypeAlias = Eq | Ne | Contains | StartsWith | EndsWith

_VALUE_OPS: Final[dict[type[_ValueNode], str]] = {
    Eq: " == ",
    Ne: " != ",
    Contains: " contains ",
    StartsWith: " starts with ",
    EndsWith: " ends with ",
}


def _quote(value: str) -> str:
    """Calico's quoting: double quotes unless the value itself holds one."""
    return f"'{value}'" if '"' in value else f'"{value}"'


def _canonical(node: Node, *, faithful: bool = False) -> str:
    """Calico's ``collectFragments``: the canonical text of ``node``.

    Calico prints ``Not(Not(X))`` as ``!!X``, which parses back to ``X``: with
    ``faithful`` a doubly negated operand is parenthesised (``!(!X)``) so the
    text parses back to the same tree, for passing selectors between processes.
    """
    if isinstance(node, Eq | Ne | Contains | StartsWith | EndsWith):
        return node.key + _VALUE_OPS[type(node)] + _quote(node.value)
    if isinstance(node, In):
        return f"{node.key} in {{{', '.join(_quote(v) for v in node.values)}}}"
    if isinstance(node, NotIn):
        return f"{node.key} not in {{{', '.join(_quote(v) for v in node.values)}}}"
    if isinstance(node, Has):
        return f"has({node.key})"
    if isinstance(node, AllNode):
        return "all()"
    if isinstance(node, GlobalNode):
        return "global()"
    if isinstance(node, Not):
        operand = _canonical(node.operand, faithful=faithful)
        if faithful and isinstance(node.operand, Not):
            return f"!({operand})"
        return "!" + operand
    if isinstance(node, And | Or):
        joint = " && " if isinstance(node, And) else " || "
        return "(" + joint.join(_canonical(op, faithful=faithful) for op in node.operands) + ")"
    raise TypeError(f"not a selector node: {node!r}")


def evaluate(node: Node, labels: Mapping[str, str]) -> bool:
    """Reference tree-walking evaluator: the readable definition the compiled code must match."""
    if isinstance(node, Eq):
        return labels.get(node.key) == node.value
    if isinstance(node, Ne):
        return labels.get(node.key) != node.value
    if isinstance(node, Contains):
        value = labels.get(node.key)
        return value is not None and node.value in value
    if isinstance(node, StartsWith):
        value = labels.get(node.key)
        return value is not None and value.startswith(node.value)
    if isinstance(node, EndsWith):
        value = labels.get(node.key)
        return value is not None and value.endswith(node.value)
    if isinstance(node, In):
        value = labels.get(node.key)
        return value is not None and value in node.values
    if isinstance(node, NotIn):
        value = labels.get(node.key)
        return value is None or value not in node.values
    if isinstance(node, Has):
        return node.key in labels
    if isinstance(node, AllNode):
        return True
    if isinstance(node, GlobalNode):
        return NAMESPACE_LABEL not in labels
    if isinstance(node, Not):
        return not evaluate(node.operand, labels)
    if isinstance(node, And):
        return all(evaluate(op, labels) for op in node.operands)
    return any(evaluate(op, labels) for op in node.operands)


# --------------------------------------------------------------------------- compilation

Matcher: TypeAlias = Callable[[Mapping[str, str]], bool]


def _python_expr(node: Node, consts: dict[str, object]) -> str:
    """Python source for ``node`` over ``L`` (the labels) and ``g`` (``L.get``).

    ``not`` binds looser than comparisons and tighter than ``and``/``or``, and ``&&``/``||``
    groups are always parenthesised, so ``not X`` needs no parentheses of its own.
    """
    if isinstance(node, Eq):
        return f"g({node.key!r}) == {node.value!r}"
    if isinstance(node, Ne):
        return f"g({node.key!r}) != {node.value!r}"
    if isinstance(node, Contains | StartsWith | EndsWith):
        if node.value == "":
            return f"{node.key!r} in L"  # the empty string is in, starts and ends every value
        if isinstance(node, Contains):
            return f"{node.value!r} in g({node.key!r}, '')"
        method = "startswith" if isinstance(node, StartsWith) else "endswith"
        return f"g({node.key!r}, '').{method}({node.value!r})"
    if isinstance(node, In | NotIn):
        name = f"_c{len(consts)}"
        consts[name] = frozenset(node.values)
        op = "in" if isinstance(node, In) else "not in"
        return f"g({node.key!r}) {op} {name}"
    if isinstance(node, Has):
        return f"{node.key!r} in L"
    if isinstance(node, AllNode):
        return "True"
    if isinstance(node, GlobalNode):
        return f"{NAMESPACE_LABEL!r} not in L"
    if isinstance(node, Not):
        return "not " + _python_expr(node.operand, consts)
    joiner = " and " if isinstance(node, And) else " or "
    return "(" + joiner.join(_python_expr(op, consts) for op in node.operands) + ")"


def python_expression(node: Node, consts: dict[str, object]) -> str:
    """Python source testing ``node`` against ``L`` (the labels) with ``g = L.get`` bound.

    Constants it needs are added to ``consts`` under fresh ``_c<n>`` names, so several
    selectors can share one namespace (the label index compiles a bucket into one function).
    """
    return _python_expr(node, consts)


def _compile(node: Node) -> Matcher:
    """Generate a Python function for ``node``; fall back to the tree walker if Python refuses."""
    if isinstance(node, AllNode):
        return _match_everything
    consts: dict[str, object] = {}
    try:
        expr = _python_expr(node, consts)
        source = f"def _match(L):\n    g = L.get\n    return {expr}\n"
        code = compile(source, "<selector>", "exec")
        namespace: dict[str, object] = {"__builtins__": {}, **consts}
        exec(code, namespace)
    except (SyntaxError, RecursionError, MemoryError, ValueError):  # pragma: no cover
        return functools.partial(evaluate, node)
    return cast(Matcher, namespace["_match"])


def _match_everything(labels: Mapping[str, str]) -> bool:
    return True


# --------------------------------------------------------------------------- label restrictions

# key -> finite set of values the key must take (None: must merely be present)
_Restrictions: TypeAlias = dict[str, frozenset[str] | None]


def _restrictions(node: Node) -> _Restrictions:
    """What every matching label set must contain (Calico's ``LabelRestrictions``, minus
    absence): the index and namespace fan-out use it to avoid evaluating every selector."""
    if isinstance(node, Eq):
        return {node.key: frozenset((node.value,))}
    if isinstance(node, In):
        return {node.key: frozenset(node.values)}
    if isinstance(node, Has | Contains | StartsWith | EndsWith):
        return {node.key: None}
    if isinstance(node, And):
        merged: _Restrictions = {}
        for op in node.operands:
            for key, values in _restrictions(op).items():
                if key not in merged:
                    merged[key] = values
                else:
                    known = merged[key]
                    if known is None:
                        merged[key] = values
                    elif values is not None:
                        merged[key] = known & values
        return merged
    if isinstance(node, Or):
        branches = [_restrictions(op) for op in node.operands]
        common: _Restrictions = {}
        for key in set(branches[0]).intersection(*branches[1:]):
            union: frozenset[str] | None = frozenset()
            for branch in branches:
                values = branch[key]
                union = None if values is None or union is None else union | values
            common[key] = union
        return common
    return {}  # !=, not in, !…, all(), global() require no label to be present


def label_restrictions(node: Node) -> dict[str, frozenset[str] | None]:
    """Public view of the restrictions of any subtree (the index files ``||`` branches)."""
    return dict(_restrictions(node))


# --------------------------------------------------------------------------- selector


def uid_of(canonical: str) -> str:
    """Calico's ``hash.MakeUniqueID("s", canonical)``."""
    digest = hashlib.sha224(b"s:" + canonical.encode("utf-8", "surrogatepass")).digest()
    return "s:" + base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


@dataclass(frozen=True)
class Selector:
    """A parsed selector; equal (and hashed) by its canonical text."""

    canonical: str
    uid: str = field(compare=False)
    root: Node = field(compare=False, repr=False)
    _match: Matcher = field(compare=False, repr=False)
    _restrictions: _Restrictions = field(compare=False, repr=False)

    def matches(self, labels: Mapping[str, str]) -> bool:
        """Whether ``labels`` is selected, with Calico's absent-label rules."""
        return self._match(labels)

    @property
    def matcher(self) -> Matcher:
        """The compiled match function itself, for hot loops that skip the method call."""
        return self._match

    def required_values(self, key: str) -> frozenset[str] | None:
        """The finite set ``labels[key]`` must belong to for any match, if there is one.

        Derived from ``==`` and ``in`` terms that every match needs (top-level ``&&``
        conjuncts, and ``||`` groups whose every branch restricts ``key``). An empty set
        means the selector can never match.
        """
        return self._restrictions.get(key)

    def required_keys(self) -> dict[str, frozenset[str] | None]:
        """Every key a match needs, with its finite value set when there is one."""
        return dict(self._restrictions)

    @property
    def source(self) -> str:
        """A text that parses back to this very selector (same canonical text and uid).

        The canonical text is that only when it holds no double negation: Calico
        prints ``!(!X)`` as ``!!X``, and ``!!X`` parses to ``X``. Selectors that
        cross a topic travel as this text.
        """
        return _canonical(self.root, faithful=True)

    def __str__(self) -> str:
        return self.canonical

    def __reduce__(self) -> tuple[Callable[[str], Selector], tuple[str]]:
        """Pickle (and deepcopy) as its source text: generated code does not pickle."""
        return parse, (self.source,)


def _make(root: Node) -> Selector:
    canonical = _canonical(root)
    return Selector(canonical, uid_of(canonical), root, _compile(root), _restrictions(root))


# --------------------------------------------------------------------------- tokenizer

_LABEL, _STRING, _LBRACE, _RBRACE, _COMMA = "label", "string", "{", "}", ","
_EQ, _NE, _IN, _NOT_IN, _NOT = "==", "!=", "in", "not in", "!"
_CONTAINS, _STARTS, _ENDS = "contains", "starts with", "ends with"
_ALL, _GLOBAL, _HAS, _LPAREN, _RPAREN = "all()", "global()", "has", "(", ")"
_AND, _OR, _EOF = "&&", "||", "end"

_VALUE_NODES: Final[dict[str, type[_ValueNode]]] = {
    _EQ: Eq, _NE: Ne, _CONTAINS: Contains, _STARTS: StartsWith, _ENDS: EndsWith
}
_OPERATOR_HINT: Final = "==, !=, in, not in, contains, starts with or ends with"


@dataclass(frozen=True, slots=True)
class _Token:
    kind: str
    value: str
    column: int  # 1-based

    def describe(self) -> str:
        if self.kind == _LABEL:
            return f"label {self.value!r}"
        if self.kind == _STRING:
            return f"quoted value {_quote(self.value)}"
        if self.kind == _HAS:
            return f"'has({self.value})'"
        if self.kind == _EOF:
            return "the end of the selector"
        return f"'{self.kind}'"


def _is_boundary(text: str, pos: int) -> bool:
    return pos >= len(text) or text[pos] not in _KEY_CHARS


def _skip_ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in _WHITESPACE:
        pos += 1
    return pos


def _cut_words(text: str, pos: int, *words: str) -> int:
    """End of ``words`` (optionally separated by whitespace) at ``pos``, or -1."""
    for word in words:
        if not text.startswith(word, pos):
            return -1
        pos = _skip_ws(text, pos + len(word))
    # Calico checks the word boundary after the last word only ("notin" is allowed).
    end = pos
    while end > 0 and text[end - 1] in _WHITESPACE:
        end -= 1
    return end if _is_boundary(text, end) else -1


def _cut_key(text: str, pos: int, what: str) -> tuple[str, int]:
    end = pos
    while end < len(text) and text[end] in _KEY_CHARS:
        end += 1
    if end == pos:
        found = "the end of the selector" if pos >= len(text) else repr(text[pos])
        raise SelectorError(pos + 1, f"expected {what}, found {found}")
    if end - pos > MAX_KEY_LENGTH:
        raise SelectorError(
            pos + 1, f"label name is {end - pos} characters long; the limit is {MAX_KEY_LENGTH}"
        )
    return text[pos:end], end


def _tokenize(text: str) -> list[_Token]:
    """Calico's tokenizer, with positions for error messages."""
    tokens: list[_Token] = []
    pos = 0
    n = len(text)
    simple = {"(": _LPAREN, ")": _RPAREN, "{": _LBRACE, "}": _RBRACE, ",": _COMMA}
    while True:
        pos = _skip_ws(text, pos)
        if pos >= n:
            tokens.append(_Token(_EOF, "", n + 1))
            return tokens
        col = pos + 1
        ch = text[pos]
        after_label = bool(tokens) and tokens[-1].kind == _LABEL
        if ch in simple:
            tokens.append(_Token(simple[ch], "", col))
            pos += 1
        elif ch in "\"'":
            end = text.find(ch, pos + 1)
            if end < 0:
                raise SelectorError(col, f"unterminated string: no closing {ch} for this quote")
            tokens.append(_Token(_STRING, text[pos + 1 : end], col))
            pos = end + 1
        elif ch == "=":
            if not text.startswith("==", pos):
                raise SelectorError(col, "expected '==' (a single '=' is not an operator)")
            tokens.append(_Token(_EQ, "", col))
            pos += 2
        elif ch == "!":
            if text.startswith("!=", pos):
                tokens.append(_Token(_NE, "", col))
                pos += 2
            else:
                tokens.append(_Token(_NOT, "", col))
                pos += 1
        elif ch == "&":
            if not text.startswith("&&", pos):
                raise SelectorError(col, "expected '&&' (a single '&' is not an operator)")
            tokens.append(_Token(_AND, "", col))
            pos += 2
        elif ch == "|":
            if not text.startswith("||", pos):
                raise SelectorError(col, "expected '||' (a single '|' is not an operator)")
            tokens.append(_Token(_OR, "", col))
            pos += 2
        elif after_label:
            for kind, words in (
                (_CONTAINS, ("contains",)),
                (_STARTS, ("starts", "with")),
                (_ENDS, ("ends", "with")),
                (_NOT_IN, ("not", "in")),
                (_IN, ("in",)),
            ):
                end = _cut_words(text, pos, *words)
                if end >= 0:
                    tokens.append(_Token(kind, "", col))
                    pos = end
                    break
            else:
                word_end = pos
                while word_end < n and text[word_end] in _KEY_CHARS:
                    word_end += 1
                found = repr(text[pos:word_end]) if word_end > pos else repr(ch)
                raise SelectorError(
                    col,
                    f"expected an operator ({_OPERATOR_HINT}) after label "
                    f"{tokens[-1].value!r}, found {found}",
                )
        elif text.startswith("has(", pos):
            key, pos = _cut_key(text, _skip_ws(text, pos + 4), "a label name inside has(...)")
            pos = _skip_ws(text, pos)
            if not text.startswith(")", pos):
                raise SelectorError(pos + 1, f"expected ')' to close 'has({key}'")
            tokens.append(_Token(_HAS, key, col))
            pos += 1
        elif text.startswith("all(", pos) or text.startswith("global(", pos):
            name = "all" if ch == "a" else "global"
            pos = _skip_ws(text, pos + len(name) + 1)
            if not text.startswith(")", pos):
                raise SelectorError(pos + 1, f"expected ')' right after '{name}(' ({name}() takes "
                                             "no arguments)")
            tokens.append(_Token(_ALL if name == "all" else _GLOBAL, "", col))
            pos += 1
        elif ch in _KEY_CHARS:
            key, pos = _cut_key(text, pos, "a label name")
            tokens.append(_Token(_LABEL, key, col))
        else:
            raise SelectorError(col, f"unexpected character {ch!r}")


# --------------------------------------------------------------------------- parser


class _Parser:
    """Calico's recursive-descent parser: or-expression > and-expression > operation."""

    def __init__(self, tokens: list[_Token]) -> None:
        self.tokens = tokens
        self.pos = 0
        self.depth = 0

    def peek(self) -> _Token:
        return self.tokens[self.pos]

    def take(self) -> _Token:
        token = self.tokens[self.pos]
        if token.kind != _EOF:
            self.pos += 1
        return token

    def parse_or(self) -> Node:
        operands = [self.parse_and()]
        while self.peek().kind == _OR:
            self.take()
            operands.append(self.parse_and())
        return operands[0] if len(operands) == 1 else Or(tuple(operands))

    def parse_and(self) -> Node:
        operands = [self.parse_operation()]
        while self.peek().kind == _AND:
            self.take()
            operands.append(self.parse_operation())
        return operands[0] if len(operands) == 1 else And(tuple(operands))

    def parse_operation(self) -> Node:
        negated = False
        while self.peek().kind == _NOT:
            self.take()
            negated = not negated
        token = self.take()
        node: Node
        if token.kind == _HAS:
            node = Has(token.value)
        elif token.kind == _ALL:
            node = AllNode()
        elif token.kind == _GLOBAL:
            node = GlobalNode()
        elif token.kind == _LABEL:
            node = self.parse_comparison(token)
        elif token.kind == _LPAREN:
            if self.depth >= MAX_DEPTH:
                raise SelectorError(
                    token.column, f"parentheses nested more than {MAX_DEPTH} deep"
                )
            self.depth += 1
            node = self.parse_or()
            self.depth -= 1
            closing = self.take()
            if closing.kind != _RPAREN:
                raise SelectorError(
                    closing.column,
                    f"expected ')' to close the '(' at column {token.column}, "
                    f"found {closing.describe()}",
                )
        else:
            raise SelectorError(
                token.column,
                "expected a label comparison, has(...), all(), global(), '!' or '(', "
                f"found {token.describe()}",
            )
        # Calico folds the leading '!'s into one negation and never looks inside the
        # operand: "!(!X)" stays Not(Not(X)), canonical "!!X", with Felix's uid.
        return Not(node) if negated else node

    def parse_comparison(self, label: _Token) -> Node:
        op = self.take()
        key = label.value
        if op.kind in (_EQ, _NE, _CONTAINS, _STARTS, _ENDS):
            value = self.take()
            if value.kind != _STRING:
                raise SelectorError(
                    value.column,
                    f"expected a quoted value after '{op.kind}', found {value.describe()}",
                )
            return _VALUE_NODES[op.kind](key, value.value)
        if op.kind in (_IN, _NOT_IN):
            brace = self.take()
            if brace.kind != _LBRACE:
                raise SelectorError(
                    brace.column,
                    f"expected '{{' to start the set after '{op.kind}', found {brace.describe()}",
                )
            values: list[str] = []
            while self.peek().kind == _STRING:
                values.append(self.take().value)
                if self.peek().kind != _COMMA:
                    break
                self.take()
            after_value = self.tokens[self.pos - 1].kind == _STRING
            end = self.take()
            if end.kind != _RBRACE:
                expected = "',' or '}'" if after_value else "a quoted value or '}'"
                raise SelectorError(
                    end.column,
                    f"expected {expected} in the set after '{op.kind}', found {end.describe()}",
                )
            unique = tuple(sorted(set(values)))
            return In(key, unique) if op.kind == _IN else NotIn(key, unique)
        raise SelectorError(
            op.column,
            f"expected an operator ({_OPERATOR_HINT}) after label {key!r}, found {op.describe()}",
        )


def _parse_root(text: str) -> Node:
    tokens = _tokenize(text)
    if tokens[0].kind == _EOF:
        return AllNode()
    parser = _Parser(tokens)
    node = parser.parse_or()
    rest = parser.peek()
    if rest.kind != _EOF:
        if rest.kind == _RPAREN:
            raise SelectorError(rest.column, "unmatched ')'")
        raise SelectorError(
            rest.column,
            f"unexpected {rest.describe()} after a complete expression; "
            "expected '&&', '||' or the end of the selector",
        )
    return node


def parse(text: str) -> Selector:
    """Parse Calico selector text; raises :class:`SelectorError` (only) when it is invalid.

    Results are cached: selectors are immutable and the same texts recur across policies.
    """
    if not isinstance(text, str):
        raise SelectorError(1, f"a selector must be a string, not {type(text).__name__}")
    return _parse_cached(text)


@functools.lru_cache(maxsize=8192)
def _parse_cached(text: str) -> Selector:
    return _make(_parse_root(text))


def from_node(root: Node) -> Selector:
    """A selector from a syntax tree built in code (e.g. namespace scoping in compile)."""
    return parse(_canonical(root))


def conjunction(selectors: Iterable[Selector]) -> Selector:
    """``a && b && …`` of the given selectors (``all()`` terms dropped), as Calico composes
    rule selectors: each operand keeps its own parse tree, so its canonical text nests."""
    parts = [s.root for s in selectors if not isinstance(s.root, AllNode)]
    if not parts:
        return ALL
    if len(parts) == 1:
        return from_node(parts[0])
    return from_node(And(tuple(parts)))


ALL: Final[Selector] = parse("all()")
