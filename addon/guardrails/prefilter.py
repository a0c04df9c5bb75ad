"""Literal prefilters: a cheap proof that a regex cannot match a text.

Most scanned items hold no secret, yet each of ~60 secret rules (and Presidio's
and the injection patterns) walks the whole item, several at every position
(a leading lookbehind defeats the regex engine's literal-prefix search). Most
patterns can only match around a fixed literal (``AKIA``, ``sk-``, ``://``,
``key``): ``gate`` reads the pattern's parse tree (the ``re`` module's own
parser, so the syntax is read exactly as the scanner compiles it) and derives a
set of literals one of which every match must contain. ``str.__contains__``
over the item then skips the rule when none is present. The derivation only
ever weakens (an unknown construct ends a literal run), so a skipped rule is a
rule that could not have matched: no finding is lost, and
tests/test_guardrails_prefilter.py checks gated and ungated scanners agree.

Case-insensitive patterns: an ASCII text is lowered once and searched for the
lowered literals (for ASCII, that is exactly the engine's case folding); any
other text is searched with the literals compiled under the pattern's own
``IGNORECASE``, since Unicode folding has cases ``lower()`` misses (U+017F, long s,
matches ``s``).
"""

from __future__ import annotations

import importlib
import re
import warnings
from collections.abc import Iterable
from typing import Any, NamedTuple

_parser: Any = importlib.import_module("re._parser")  # no stub; Python 3.11's sre_parse
_c: Any = importlib.import_module("re._constants")

_MAX_SET = 64
"""Largest set of alternative strings kept while building runs (bounds the checks)."""
_SELECTIVE = 4
"""Literals this long are rare enough in text that fewer of them beats longer ones."""
_MAX_CLASS = 8
"""Largest character class expanded into alternatives (``[pousr]``, ``[ -]``)."""
_ZERO_WIDTH = frozenset({""})


class _Info(NamedTuple):
    exact: frozenset[str] | None
    """Every string the node can match (None: unknown or too many)."""
    req: frozenset[str] | None
    """Non-empty strings one of which every match contains (None: none known)."""


_UNKNOWN = _Info(None, None)
_EMPTY = _Info(_ZERO_WIDTH, None)


def _minimal(strings: Iterable[str]) -> frozenset[str]:
    """Drop strings containing another one: "has s or t" where s in t is "has s"."""
    ordered = sorted(set(strings), key=len)
    keep: list[str] = []
    for s in ordered:
        if not any(k in s for k in keep):
            keep.append(s)
    return frozenset(keep)


def _usable(s: frozenset[str] | None) -> frozenset[str] | None:
    return None if s is None or not s or "" in s else _minimal(s)


def _better(a: frozenset[str] | None, b: frozenset[str] | None) -> frozenset[str] | None:
    """The more selective requirement: longer shortest literal (up to ``_SELECTIVE``),
    then fewer literals (each is one substring search)."""
    if a is None:
        return b
    if b is None:
        return a
    ka = (min(_SELECTIVE, *map(len, a)), -len(a))
    kb = (min(_SELECTIVE, *map(len, b)), -len(b))
    return a if ka >= kb else b


def _cross(a: frozenset[str], b: frozenset[str]) -> frozenset[str] | None:
    if len(a) * len(b) > _MAX_SET:
        return None
    return frozenset(x + y for x in a for y in b)


class _Walker:
    def __init__(self, fold: bool) -> None:
        self.fold = fold

    def char(self, code: int) -> str | None:
        ch = chr(code)
        if self.fold:  # only ASCII folds like str.lower(); others: no claim
            return ch.lower() if ch.isascii() else None
        return ch

    def seq(self, items: Any) -> _Info:
        run: frozenset[str] = _ZERO_WIDTH
        whole: frozenset[str] | None = _ZERO_WIDTH
        best: frozenset[str] | None = None
        for op, av in items:
            info = self.node(op, av)
            if info.exact is not None:
                joined = _cross(run, info.exact)
                if joined is None:
                    best = _better(best, _usable(run))
                    joined = info.exact
                run = joined
                whole = None if whole is None else _cross(whole, info.exact)
            else:
                best = _better(best, _usable(run))
                best = _better(best, info.req)
                run, whole = _ZERO_WIDTH, None
        best = _better(best, _usable(run))
        return _Info(whole, best)

    def node(self, op: Any, av: Any) -> _Info:
        if op is _c.LITERAL:
            ch = self.char(av)
            return _UNKNOWN if ch is None else _Info(frozenset({ch}), frozenset({ch}))
        if op in (_c.AT, _c.ASSERT_NOT, _c.ASSERT):  # zero-width: consecutive text stays so
            return _EMPTY
        if op is _c.IN:
            return self.charset(av)
        if op is _c.SUBPATTERN:
            return self.seq(av[-1])
        if op is _c.ATOMIC_GROUP:
            return self.seq(av)
        if op is _c.BRANCH:
            return self.branch(av[1])
        if op in (_c.MAX_REPEAT, _c.MIN_REPEAT, _c.POSSESSIVE_REPEAT):
            return self.repeat(*av)
        return _UNKNOWN  # ANY, NOT_LITERAL, GROUPREF, GROUPREF_EXISTS, ...

    def charset(self, items: Any) -> _Info:
        chars: set[str] = set()
        for op, av in items:
            if op is _c.LITERAL:
                codes: Iterable[int] = (av,)
            elif op is _c.RANGE and av[1] - av[0] < _MAX_CLASS:
                codes = range(av[0], av[1] + 1)
            else:  # NEGATE, CATEGORY (\d, \w), big ranges
                return _UNKNOWN
            for code in codes:
                ch = self.char(code)
                if ch is None:
                    return _UNKNOWN
                chars.add(ch)
        if not chars or len(chars) > _MAX_CLASS:
            return _UNKNOWN
        exact = frozenset(chars)
        return _Info(exact, exact)

    def branch(self, alternatives: Any) -> _Info:
        infos = [self.seq(alt) for alt in alternatives]
        exact: frozenset[str] | None = None
        if all(i.exact is not None for i in infos):
            union = frozenset().union(*(i.exact for i in infos if i.exact is not None))
            exact = union if len(union) <= _MAX_SET else None
        reqs = [_better(i.req, _usable(i.exact)) for i in infos]
        req = None
        if all(r is not None for r in reqs):
            union = _minimal(s for r in reqs if r is not None for s in r)
            req = union if len(union) <= _MAX_SET else None
        return _Info(exact, req)

    def repeat(self, lo: int, hi: int, item: Any) -> _Info:
        info = self.seq(item)
        exact: frozenset[str] | None = None
        if info.exact is not None and hi <= 4:
            power: frozenset[str] | None = _ZERO_WIDTH
            union: set[str] = set()
            for k in range(hi + 1):
                if k >= lo and power is not None:
                    union.update(power)
                if power is not None and k < hi:
                    power = _cross(power, info.exact)
            exact = frozenset(union) if power is not None and len(union) <= _MAX_SET else None
        req = _better(info.req, _usable(info.exact)) if lo >= 1 else None
        return _Info(exact, req)


def _folds(items: Any) -> bool:
    """Whether any scoped group turns IGNORECASE on (``(?i:...)``)."""
    for op, av in items:
        if op is _c.SUBPATTERN and (av[1] & re.IGNORECASE or _folds(av[-1])):
            return True
        if op is _c.BRANCH and any(_folds(alt) for alt in av[1]):
            return True
        if op in (_c.MAX_REPEAT, _c.MIN_REPEAT, _c.POSSESSIVE_REPEAT) and _folds(av[2]):
            return True
        if op in (_c.ASSERT, _c.ASSERT_NOT) and _folds(av[1]):
            return True
        if op is _c.ATOMIC_GROUP and _folds(av):
            return True
    return False


class Gate:
    """A necessary condition for a pattern to match: the text holds one of ``literals``."""

    __slots__ = ("_folded", "fold", "literals")

    def __init__(self, literals: frozenset[str], fold: bool) -> None:
        self.literals = tuple(sorted(literals))
        self.fold = fold
        self._folded = (re.compile("|".join(map(re.escape, self.literals)), re.IGNORECASE)
                        if fold else None)

    def admits(self, text: str, lowered: str | None) -> bool:
        """False only if no match is possible; ``lowered``: ``text.lower()`` if ASCII."""
        if self._folded is None:
            return any(lit in text for lit in self.literals)
        if lowered is not None:
            return any(lit in lowered for lit in self.literals)
        return self._folded.search(text) is not None

    def __repr__(self) -> str:
        return f"Gate({self.literals!r}, fold={self.fold})"


def gate(pattern: str, flags: int = 0) -> Gate | None:
    """The prefilter for ``re.compile(pattern, flags)``; None when none is known (the
    pattern then always runs). See ``regex_gate`` for the ``regex`` module's patterns."""
    if flags & re.LOCALE:
        return None
    try:
        with warnings.catch_warnings():  # "possible nested set": syntax meant for another
            warnings.simplefilter("error", FutureWarning)  # engine (the regex module's)
            parsed = _parser.parse(pattern, flags)
    except (re.error, ValueError, TypeError, OverflowError, FutureWarning):
        return None
    all_flags = int(parsed.state.flags) | flags
    if all_flags & re.LOCALE:
        return None
    fold = bool(all_flags & re.IGNORECASE) or _folds(parsed.data)
    if not fold and _starts_with_literal(parsed.data):
        return None  # the engine already searches for that prefix as fast as a gate would
    req = _Walker(fold).seq(parsed.data).req
    return None if req is None else Gate(req, fold)


def _starts_with_literal(items: Any) -> bool:
    """Whether the pattern opens with a literal character (``AKC...``, ``BEGIN ...``)."""
    while items:
        op, av = items[0]
        if op is _c.LITERAL:
            return True
        if op is not _c.SUBPATTERN or av[1] or av[2]:
            return False
        items = av[-1]
    return False


_FUZZY = re.compile(r"\{[^{}]*[eids<][^{}]*\}")
"""The regex module's fuzzy constraints (``{e<=1}``), which ``re`` reads as literal text."""


def regex_gate(pattern: str, flags: int) -> Gate | None:
    """A gate for a pattern of the ``regex`` module (Presidio's), read as ``re`` syntax.

    In V0 mode the two agree on what is used here, except syntax ``re`` does not know:
    most of it ``re`` rejects (``\\p{..}``, ``(?V1)``, branch reset) or warns about (nested
    sets), both meaning no gate; fuzzy constraints it would read as literals are refused
    by name. Case folding differs outside ASCII (``FULLCASE``): callers trust a folding
    gate on ASCII text only (``lowered`` not None)."""
    if _FUZZY.search(pattern):
        return None
    return gate(pattern, flags & (re.IGNORECASE | re.MULTILINE | re.DOTALL | re.VERBOSE))


def min_width(pattern: str, flags: int = 0) -> int:
    """The fewest characters a match of ``re.compile(pattern, flags)`` spans (the
    engine's own bound); a shorter text cannot hold one. 0 when unknown."""
    try:
        return int(_parser.parse(pattern, flags).getwidth()[0])
    except (re.error, ValueError, TypeError, OverflowError):
        return 0


def lowered_ascii(text: str) -> str | None:
    """The ``lowered`` argument of ``Gate.admits``."""
    return text.lower() if text.isascii() else None
