"""Refuse a user regular expression (``demographics.filename_regex``) that can backtrack
catastrophically, before it ever meets a file name.

Python's ``re`` cannot be interrupted, so a pattern is judged by its shape, from the parse
tree ``re`` itself builds (after its own rewrites: ``a|a`` becomes ``a(?:|)``, ``a|[a-z]`` a
character set). Refused, under a backtracking repeat (``*``, ``+``, ``?``, ``{m,n}``):

* a quantifier of variable count (``(a+)+``, ``(.*)*``, ``(ab?)+``): nested quantifiers;
* an alternation whose alternatives can start alike or match nothing (``(a|a)*``,
  ``(ab|[a-z]c)+``, ``(a|aa)+``);

and anywhere, more than :data:`MAX_UNBOUNDED` unbounded quantifiers (``a*a*a*a*x`` takes
seconds per 255-character name: the cost grows as a power of the name length, one per
quantifier). Possessive quantifiers (``a*+``) and atomic groups (``(?>...)``) never backtrack
into what they matched, so they are the way to rewrite a refused pattern; they are not counted.
Names are matched on their first :data:`MAX_NAME_CHARS` characters, so the work per name is
bounded too."""

from __future__ import annotations

try:  # Python 3.11+: the parser behind re.compile
    from re import _constants as _c
    from re import _parser
except ImportError:  # pragma: no cover - Python < 3.11
    import sre_constants as _c  # type: ignore[no-redef]
    import sre_parse as _parser  # type: ignore[no-redef]

MAX_UNBOUNDED = 3
MAX_NAME_CHARS = 255  # the longest file name most file systems allow; zip entry names can be longer

_BACKTRACKING = (_c.MAX_REPEAT, _c.MIN_REPEAT)
_ALL = [(0, 0x10FFFF)]
Chars = list[tuple[int, int]]  # code point intervals a match can start with

HINT = ("it can take time exponential in the file name's length; rewrite it without a repeat inside a "
        "repeat, or make the inner part possessive (a++, .*+) or atomic ((?>...))")


def backtracking_risk(pattern: str) -> str | None:
    """What makes ``pattern`` (already known to compile) risky, in words, or None."""
    try:
        tree = _parser.parse(pattern)
    except Exception:  # noqa: BLE001 - re.compile already judged it; nothing more to say
        return None
    ignore_case = bool(tree.state.flags & _c.SRE_FLAG_IGNORECASE)
    found = _walk(tree, False, ignore_case)
    if found:
        return found
    unbounded = _count_unbounded(tree)
    if unbounded > MAX_UNBOUNDED:
        return (f"{unbounded} unbounded quantifiers (at most {MAX_UNBOUNDED}; each multiplies the work "
                "by the name's length)")
    return None


def _walk(items: list, in_repeat: bool, ignore_case: bool) -> str | None:
    for op, av in items:
        found: str | None = None
        if op in _BACKTRACKING:
            lo, hi, body = av
            if in_repeat and lo != hi:
                return "nested quantifiers (a repeat inside a repeat, like (a+)+)"
            found = _walk(body, in_repeat or hi > 1, ignore_case)
        elif op == _c.BRANCH:
            alternatives = av[1]
            if in_repeat:
                found = _branch_risk(alternatives, ignore_case)
            for alt in alternatives:
                found = found or _walk(alt, in_repeat, ignore_case)
        else:  # an atomic group is never re-entered by the repeat around it: only what is inside counts
            for body in _bodies(op, av):
                found = found or _walk(body, in_repeat and op != _c.ATOMIC_GROUP, ignore_case)
        if found:
            return found
    return None


def _bodies(op: object, av: object) -> list:
    """The sub-patterns inside one node (a possessive repeat's body: it never backtracks as a whole)."""
    if op == _c.SUBPATTERN:
        return [av[-1]]  # type: ignore[index]
    if op == _c.POSSESSIVE_REPEAT:
        return [av[2]]  # type: ignore[index]
    if op == _c.ATOMIC_GROUP:
        return [av]
    if op in (_c.ASSERT, _c.ASSERT_NOT):
        return [av[1]]  # type: ignore[index]
    if op == _c.GROUPREF_EXISTS:
        return [b for b in av[1:] if b is not None]  # type: ignore[index]
    return []


def _branch_risk(alternatives: list, ignore_case: bool) -> str | None:
    """Alternatives that can start alike, or match nothing, under a repeat: each repetition then
    has two ways to match the same text."""
    starts = [_first(alt, ignore_case) for alt in alternatives]
    if any(nullable for _, nullable in starts) or any(
            _overlap(a, b) for i, (a, _) in enumerate(starts) for b, _ in starts[i + 1:]):
        return "alternatives that can match the same text or nothing, under a repeat (like (a|a)*, (a|aa)+)"
    return None


def _first(items: list, ignore_case: bool) -> tuple[Chars, bool]:
    """(the characters a match of ``items`` can start with, whether it can match nothing)."""
    chars: Chars = []
    for op, av in items:
        first, nullable = _node_first(op, av, ignore_case)
        chars += first
        if not nullable:
            return chars, False
    return chars, True


def _node_first(op: object, av: object, ignore_case: bool) -> tuple[Chars, bool]:
    if op == _c.LITERAL:
        ch = chr(av)  # type: ignore[arg-type]
        codes = {ord(ch), ord(ch.lower()[0]), ord(ch.upper()[0])} if ignore_case else {ord(ch)}
        return [(c, c) for c in codes], False
    if op == _c.IN:
        return _set_chars(av, ignore_case), False  # type: ignore[arg-type]
    if op in (_c.ANY, _c.NOT_LITERAL):
        return _ALL, False
    if op in (_c.AT, _c.ASSERT, _c.ASSERT_NOT):
        return [], True  # zero width
    if op in (*_BACKTRACKING, _c.POSSESSIVE_REPEAT):
        lo, _, body = av  # type: ignore[misc]
        chars, nullable = _first(body, ignore_case)
        return chars, nullable or lo == 0
    if op == _c.SUBPATTERN:
        return _first(av[-1], ignore_case)  # type: ignore[index]
    if op == _c.ATOMIC_GROUP:
        return _first(av, ignore_case)  # type: ignore[arg-type]
    if op == _c.BRANCH:
        parts = [_first(alt, ignore_case) for alt in av[1]]  # type: ignore[index]
        return [c for chars, _ in parts for c in chars], any(n for _, n in parts)
    return _ALL, True  # back-references, conditionals...: assume the worst


def _set_chars(items: list, ignore_case: bool) -> Chars:
    """The characters of a ``[...]`` set (a negated set or a category: any character)."""
    out: Chars = []
    for op, av in items:
        if op == _c.LITERAL:
            out += _node_first(op, av, ignore_case)[0]
        elif op == _c.RANGE:
            out.append(av)
            if ignore_case:
                return _ALL  # a case-folded range: not worth being exact
        else:  # NEGATE, CATEGORY, ...
            return _ALL
    return out


def _overlap(a: Chars, b: Chars) -> bool:
    return any(lo1 <= hi2 and lo2 <= hi1 for lo1, hi1 in a for lo2, hi2 in b)


def _count_unbounded(items: list) -> int:
    n = 0
    for op, av in items:
        if op in _BACKTRACKING:
            n += av[1] == _c.MAXREPEAT
            n += _count_unbounded(av[2])
        elif op == _c.BRANCH:
            n += sum(_count_unbounded(alt) for alt in av[1])
        else:
            n += sum(_count_unbounded(body) for body in _bodies(op, av))
    return n
