"""Strict JSON for file headers: one meaning per document, bounded work to read it.

Python's :func:`json.loads` accepts documents no sgsc writer emits and that other readers read
differently: duplicate keys (the last wins silently), the ``NaN``/``Infinity`` literals, integers
of thousands of digits (a bare ``ValueError`` from ``int``), ``1e400`` (read as ``inf``), and nesting
deep enough to exhaust the stack. :func:`loads` refuses all of them with a ``ValueError`` that
says which; the caller names the file.
"""

from __future__ import annotations

import json
import math

# The deepest header is three levels (the sgsc header's config holds lists); the slack is for readers of
# future fields, not for nesting bombs.
MAX_DEPTH = 8
# int64 holds every integer a header needs (CRCs, seeds, config sizes); 19 digits is its longest literal.
MAX_INT_DIGITS = 19


def _object(pairs: list[tuple[str, object]]) -> dict:
    result = dict(pairs)
    if len(result) != len(pairs):
        seen: set[str] = set()
        duplicate = next(key for key, _ in pairs if key in seen or seen.add(key))
        raise ValueError(f"duplicate key {duplicate!r}")
    return result


def _int(literal: str) -> int:
    if len(literal) > MAX_INT_DIGITS + 1 and len(literal.lstrip("-")) > MAX_INT_DIGITS:  # + 1 for a sign
        raise ValueError(f"an integer of {len(literal.lstrip('-'))} digits (at most {MAX_INT_DIGITS})")
    return int(literal)


def _float(literal: str) -> float:
    value = float(literal)
    if not math.isfinite(value):
        raise ValueError(f"the number {literal[:40]} is out of float range")
    return value


def _constant(name: str):
    raise ValueError(f"the non-standard literal {name}")


def _check_depth(document: object) -> None:
    """Iterative, so a document just under the parser's recursion limit cannot exhaust ours."""
    pending = [(document, 1)] if isinstance(document, (dict, list)) else []
    while pending:
        value, depth = pending.pop()
        if depth > MAX_DEPTH:
            raise ValueError(f"nesting deeper than {MAX_DEPTH} levels")
        children = value.values() if isinstance(value, dict) else value
        pending.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))


def loads(text: str | bytes) -> object:
    """Parse ``text`` as strict JSON; ``ValueError`` names what is not allowed."""
    try:
        document = json.loads(text, object_pairs_hook=_object, parse_int=_int, parse_float=_float,
                              parse_constant=_constant)
    except RecursionError:
        raise ValueError(f"nesting deeper than {MAX_DEPTH} levels") from None
    except UnicodeDecodeError as exc:
        raise ValueError(f"not UTF-8 text: {exc}") from None
    _check_depth(document)
    return document
