"""A FHIR decimal as the JSON wrote it (`125.00`, not `125.0`): see `jsonio`.

A module of its own so that `jsonio` can be compiled: mypyc compiles no subclass of float, and
this one is only made (by the JSON parser's hook) and read, never called in a loop of ours.
"""

from __future__ import annotations

import math

__all__ = ["FhirDecimal"]


class FhirDecimal(float):
    """A JSON decimal as written: compares as a float, serialises as its own text."""

    __slots__ = ("text",)
    text: str

    def __new__(cls, text: str) -> FhirDecimal:
        number = super().__new__(cls, text)
        if math.isinf(number):  # (msgspec reports it as the JSON's error, where it is)
            raise ValueError(f"{text} is beyond the range of a number")
        number.text = text
        return number

    def __repr__(self) -> str:
        return self.text
