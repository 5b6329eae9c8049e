"""FHIR JSON in and out without losing a digit.

FHIR decimals carry their precision in their text: a biller's `125.00` is not `125.0`, and a
Claim we write back must say what the EHR wrote. orjson (the fast path) reads every decimal as a
float, which forgets that text. So a document whose bytes hold a decimal number is read again by
the standard library with each decimal kept as a `FhirDecimal`: a float (the rules compare it as
a number) that remembers its text, which `dumps` writes back verbatim. Documents with no decimal,
most of them, stay on orjson alone.

Every reading and writing of FHIR JSON goes through `loads` and `dumps`.
"""

from __future__ import annotations

import json
import re
from typing import Any

import orjson

__all__ = ["FhirDecimal", "copy", "dumps", "loads"]

# A number with a fraction or an exponent right after a JSON structural character. It may also
# match inside a string (", 1.5"): then the exact reading runs for nothing, which is only slower.
_DECIMAL = re.compile(rb"[:,\[]\s*-?[0-9]+(?:\.[0-9]|[eE])")
# What every such number holds: a digit, then `.` and a digit, or `e`/`E`. Each pattern starts
# with a literal, which the regular expression engine finds at memchr speed; `_DECIMAL` tries
# at every `:` and `,` of a document and costs more than parsing it. Most documents hold none
# of the three, and `_DECIMAL` is asked only about those that do.
_MAYBE_DECIMAL = tuple(re.compile(p) for p in (rb"\.(?<=[0-9]\.)[0-9]", rb"e(?<=[0-9]e)[-+0-9]", rb"E(?<=[0-9]E)[-+0-9]"))


class FhirDecimal(float):
    """A JSON decimal as written: compares as a float, serialises as its own text."""

    __slots__ = ("text",)
    text: str

    def __new__(cls, text: str) -> FhirDecimal:
        number = super().__new__(cls, text)
        number.text = text
        return number

    def __repr__(self) -> str:
        return self.text


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def loads(data: bytes | str) -> Any:
    """Parse JSON (raises orjson.JSONDecodeError, a ValueError, when it is not valid JSON)."""
    value = orjson.loads(data)
    raw = data.encode() if isinstance(data, str) else data
    if any(p.search(raw) for p in _MAYBE_DECIMAL) and _DECIMAL.search(raw):
        # orjson has already judged the document valid JSON; this reading only keeps the text.
        try:
            return json.loads(raw, parse_float=FhirDecimal, parse_constant=_reject_constant)
        except RecursionError:  # the standard library recurses: a document nested ~1,000 deep
            raise orjson.JSONDecodeError("nested too deeply to be read", raw.decode(errors="replace")[:80], 0) from None
    return value


def _default(value: Any) -> Any:
    if isinstance(value, FhirDecimal):
        return orjson.Fragment(value.text)
    raise TypeError(f"{type(value).__name__} is not JSON")


def dumps(value: Any, option: int = 0) -> bytes:
    """JSON bytes of `value`, each FhirDecimal as it was written."""
    return orjson.dumps(value, default=_default, option=option)


def copy(value: Any) -> Any:
    """A deep copy of a JSON value (dicts, lists and scalars), decimals kept as they are."""
    if isinstance(value, dict):
        return {k: copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [copy(v) for v in value]
    return value
