"""FHIR JSON in and out without losing a digit.

FHIR decimals carry their precision in their text: a biller's `125.00` is not `125.0`, and a
Claim we write back must say what the EHR wrote. So `loads` reads each decimal as a
`FhirDecimal`: a float (the rules compare it as a number) that remembers its text, which `dumps`
writes back verbatim. msgspec hands the parser's own text of each non-integer number to a hook,
so this costs one parse, no slower than orjson's that forgets the text; an integer too long for
64 bits stays an exact int (orjson would make it a float), and `dumps` writes its digits too.

Every reading and writing of FHIR JSON goes through `loads` and `dumps` (but for replay's routing
pass, which reads only what routes a resource, `compartment.routing_view`, and keeps its bytes).
"""

from __future__ import annotations

from typing import Any, Final

import msgspec
import orjson

from .decimals import FhirDecimal

__all__ = ["FhirDecimal", "JSONDecodeError", "copy", "dumps", "dumps_line", "loads"]


class JSONDecodeError(ValueError):
    """Not JSON: the message says what is wrong and at which byte."""


_DECODER: Final = msgspec.json.Decoder(float_hook=FhirDecimal)
# Bound once: called by name (`_DECODER.decode(data)`) from compiled code, the method is looked
# up on its type at each call, and a replay parses every resource.
_DECODE: Final = _DECODER.decode


def loads(data: bytes | str) -> Any:
    """Parse JSON; raises JSONDecodeError when it is not valid JSON (UTF-8, no NaN, no BOM)."""
    try:
        return _DECODE(data)
    except msgspec.DecodeError as exc:
        raise JSONDecodeError(str(exc)) from None
    except (UnicodeDecodeError, UnicodeEncodeError) as exc:  # bytes that are not UTF-8, a str with a lone surrogate
        raise JSONDecodeError(f"not UTF-8 at {exc.start}") from None
    except RecursionError:  # a document nested thousands deep
        raise JSONDecodeError("nested too deeply to be read") from None


def _default(value: Any) -> Any:
    if isinstance(value, FhirDecimal):
        return orjson.Fragment(value.text)
    raise TypeError(f"{type(value).__name__} is not JSON")


def dumps(value: Any, option: int = 0) -> bytes:
    """JSON bytes of `value`, each FhirDecimal as it was written."""
    try:
        return orjson.dumps(value, default=_default, option=option)
    except TypeError:
        # orjson refuses an integer beyond 64 bits: a decimal written with no fraction, rare
        # enough that a second pass giving such integers as their digits costs nothing. (What
        # else is not JSON fails again in that pass, with orjson's message.)
        return orjson.dumps(_long_ints_as_text(value), default=_default, option=option)


def dumps_line(value: Any) -> bytes:
    """`dumps` and a line end: one line of NDJSON, made in one buffer (adding the line end to
    the bytes copies them again: a replay writes a million Claims)."""
    return dumps(value, orjson.OPT_APPEND_NEWLINE)


def _long_ints_as_text(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _long_ints_as_text(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_long_ints_as_text(v) for v in value]
    if type(value) is int and not -(1 << 63) <= value < 1 << 64:
        return orjson.Fragment(str(value))
    return value


def copy(value: Any) -> Any:
    """A deep copy of a JSON value (dicts, lists and scalars), decimals kept as they are."""
    if isinstance(value, dict):
        return {k: copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [copy(v) for v in value]
    return value
