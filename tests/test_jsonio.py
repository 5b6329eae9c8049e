"""FHIR JSON in and out without losing a digit."""

from __future__ import annotations

import pytest

from adapter import jsonio


@pytest.mark.parametrize(
    "document",
    [
        b'{"total":{"value":125.00,"currency":"USD"}}',
        b'{"value":1e5}',
        b'{"value":-2E-3}',
        b'{"value":1.5e+2}',
        b'{"values":[0.10, 3.000]}',
        b'{"value":0.0}',
        # Digits and dots inside strings (OIDs, versions, fractional seconds) beside a decimal.
        b'{"system":"urn:oid:2.16.840.1.113883.6.238","time":"10:00:00.250Z","value":7.50}',
    ],
)
def test_decimals_keep_their_text(document: bytes) -> None:
    assert jsonio.dumps(jsonio.loads(document)) == document.replace(b", ", b",")


@pytest.mark.parametrize(
    "document",
    [b'{"system":"urn:oid:2.16.840.1.113883.6.238","version":"4.0.1","count":3}', b'{"url":"http://hl7.org/fhir","n":-12}'],
)
def test_documents_without_a_decimal_read_the_same(document: bytes) -> None:
    value = jsonio.loads(document)
    assert jsonio.dumps(value) == document
    assert not any(isinstance(v, jsonio.FhirDecimal) for v in value.values())


def test_an_integer_beyond_64_bits_keeps_its_digits() -> None:
    # A decimal written without a fraction: orjson alone would read it as a float (1.2345e+22).
    document = b'{"valueDecimal":12345678901234567890123,"n":[-99999999999999999999,3]}'
    assert jsonio.dumps(jsonio.loads(document)) == document


@pytest.mark.parametrize("bad", ['{"a":"\ud800"}', b'{"a":1', b'{"a":NaN}', b'{"a":[1e400]}', b'\xef\xbb\xbf{}', b'{"a":"\xff"}', b'["\\ud800"]', b"[" * 5000 + b"]" * 5000])
def test_what_is_not_json_raises_one_error(bad: bytes | str) -> None:
    with pytest.raises(jsonio.JSONDecodeError):
        jsonio.loads(bad)


def test_dumps_still_refuses_what_is_not_json() -> None:
    with pytest.raises(TypeError):
        jsonio.dumps({"when": object()})


@pytest.mark.parametrize(
    "document",
    [b'{"total":{"value":125.00,"currency":"USD"}}', b'{"valueDecimal":12345678901234567890123}', b'["a",1,null]'],
)
def test_a_line_is_the_json_and_a_line_end(document: bytes) -> None:
    # Decimals and long integers too (the second pass keeps the line end).
    assert jsonio.dumps_line(jsonio.loads(document)) == document + b"\n"
