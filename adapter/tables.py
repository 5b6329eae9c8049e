"""The schema of every rule table: what a billing analyst may write in `mappings/`, checked.

A table is input from a person. Each file is read through a pydantic model that rejects unknown
keys (a typo), wrong types (`[13, 76]` where type-of-bill prefixes are strings, `accepts: "no"`
where true/false/null is meant) and a YAML number where a code is expected (`code: 0430`
unquoted is the octal number 280 to YAML): the problem is named with the file and the key path,
and nothing is guessed. `ruleset.load_ruleset` turns the checked tables into lookups.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

__all__ = [
    "BillTypesTable",
    "DiagnosesTable",
    "DocumentationTable",
    "LinesTable",
    "MarketsTable",
    "OtSessionsTable",
    "PayerTable",
    "PerformersTable",
    "ProgramsTable",
    "RulesTable",
    "ServicesTable",
    "SiteTable",
    "SystemsTable",
    "TABLES",
    "TableProblem",
    "validate_table",
]

Severity = Literal["error", "review", "warning", "info"]
Status = Literal["CONFIRMED", "UNCERTAIN"]
Program = Literal["PHP", "IOP"]
Market = Literal["medicare-ffs", "medicare-advantage", "medicaid", "commercial"]


def _text(value: Any) -> Any:
    """A code or other text must be written as text: YAML turns `0430` into 280 and `13` into
    an integer, and a number that was meant as a code has lost its leading zeros by then."""
    if isinstance(value, bool) or isinstance(value, (int, float)):
        raise ValueError(
            f"{value!r} is read as a number; write codes in quotes (e.g. \"0430\", \"13\"): "
            "YAML reads 0430 unquoted as the octal number 280"
        )
    return value


Code = Annotated[str, BeforeValidator(_text), Field(min_length=1)]


class _Table(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class CodeEntry(_Table):
    system: Code
    code: Code
    display: str | None = None


# -- rules.yaml -------------------------------------------------------------------------------


class FindingKind(_Table):
    severity: Severity
    when: str = Field(min_length=1)


class RuleEntry(_Table):
    id: Code
    checks: str = Field(min_length=1)
    # Each kind of finding the rule can give, with its severity: the outcome follows from these.
    findings: dict[str, FindingKind] | None = None
    # Before 2026.11.1 the text of the severities; generated from `findings` now, read and ignored.
    when_violated: str | None = None
    source: str = Field(min_length=1)
    status: Status


class RulesTable(_Table):
    version: Code
    rules: list[RuleEntry]


# -- the other tables -------------------------------------------------------------------------


class SystemsTable(_Table):
    model_config = ConfigDict(extra="allow", strict=True, frozen=True)

    @classmethod
    def check(cls, value: Any) -> dict[str, list[str]]:
        if not isinstance(value, dict):
            raise ValueError("expected a mapping of key -> list of URIs")
        out: dict[str, list[str]] = {}
        for key, uris in value.items():
            if not isinstance(key, str):
                raise ValueError(f"{key!r}: a system key is text")
            if not isinstance(uris, list) or not uris or not all(isinstance(u, str) and u for u in uris):
                raise ValueError(f"{key}: needs a non-empty list of URIs (text)")
            out[key] = uris
        return out


class ProgramCoding(CodeEntry):
    program: Program


class ProgramsTable(_Table):
    claim_condition_codes: dict[Code, Program]
    encounter_codings: list[ProgramCoding]
    # IOP became a Medicare benefit on this date (CAA 2023 §4124). YAML reads 2024-01-01 as a date.
    iop_start: Annotated[dt.date, Field(strict=False)]
    # Encounter.class codes of a session not given in person.
    remote_encounter_classes: list[CodeEntry]


class OtSessionsTable(_Table):
    codes: list[CodeEntry]
    counted_statuses: list[Code]
    review_statuses: list[Code]
    excluded_statuses: list[Code]
    minimum_minutes: Annotated[int, Field(gt=0)]


class PerformersTable(_Table):
    system: Code
    ot_prefixes: list[Code]
    ota_prefixes: list[Code]


class BillTypesTable(_Table):
    allowed: dict[Program, list[Annotated[Code, Field(pattern=r"^\d{2}$")]]]
    never: list[Annotated[Code, Field(pattern=r"^\d{2}$")]]


class ServiceCode(CodeEntry):
    kind: Literal["ot", "activity", "other"]


class DayTiers(_Table):
    minimum: Annotated[int, Field(gt=0)]  # services a day needs for the per diem
    higher: Annotated[int, Field(gt=0)]  # services from which the day is in the higher tier


class ServicesTable(_Table):
    codes: list[ServiceCode]
    day_tiers: DayTiers
    # A day with services of these kinds only is not a PHP/IOP day on its own.
    ot_only_kinds: list[Literal["ot", "activity", "other"]]


class LinesTable(_Table):
    code: CodeEntry  # what the adapter bills
    revenue_default: Annotated[Code, Field(pattern=r"^\d{4}$")]
    # An EHR line's revenue code is kept when it starts with one of these.
    revenue_prefixes: list[Annotated[Code, Field(pattern=r"^\d{1,4}$")]]


class DiagnosisRange(_Table):
    start: Code  # first code of the range (inclusive), without the dot
    end: Code  # last code of the range (inclusive): F99 covers F99.x


class DiagnosesTable(_Table):
    system: Code
    mental_health: list[DiagnosisRange]


class SessionEvidence(_Table):
    session: str = Field(min_length=1)


class ResourceEvidence(_Table):
    resource: Code
    codes: list[CodeEntry] = []
    link: Literal["patient", "encounter"] = "patient"


class CredentialEvidence(_Table):
    performers_credentialed: Literal[True]


class DocElement(_Table):
    label: str = Field(min_length=1)
    evidence: list[SessionEvidence | ResourceEvidence | CredentialEvidence] = Field(min_length=1)


class DocumentationTable(_Table):
    elements: dict[str, DocElement]


class PayerMatch(_Table):
    identifiers: list[Code] = []
    names: list[str] = []
    states: list[Annotated[Code, Field(pattern=r"^[A-Za-z]{2}$")]] = []
    sopt_codes: list[Code] = []


class PayerProgram(_Table):
    accepts: bool | None
    source: str = Field(min_length=1)
    status: Status


class PayerTable(_Table):
    key: Code
    name: str = Field(min_length=1)
    market: Market
    match: PayerMatch
    policy: dict[Program, PayerProgram]


class MarketsTable(_Table):
    sopt_prefixes: dict[Code, Market]


class SiteTable(_Table):
    time_zone: str | None
    possible_time_zones: list[str]


# File name (under the tables directory) -> its schema. payers/*.yaml use PayerTable.
TABLES: dict[str, type[_Table]] = {
    "rules.yaml": RulesTable,
    "systems.yaml": SystemsTable,
    "programs.yaml": ProgramsTable,
    "ot_sessions.yaml": OtSessionsTable,
    "performers.yaml": PerformersTable,
    "bill_types.yaml": BillTypesTable,
    "services.yaml": ServicesTable,
    "lines.yaml": LinesTable,
    "diagnoses.yaml": DiagnosesTable,
    "documentation.yaml": DocumentationTable,
    "markets.yaml": MarketsTable,
    "site.yaml": SiteTable,
}


class TableProblem(Exception):
    """One or more problems in one table file, each naming the key path."""

    def __init__(self, path: Path, problems: list[str]) -> None:
        super().__init__("; ".join(f"{path}: {p}" for p in problems))
        self.path = path
        self.problems = [f"{path}: {p}" for p in problems]


_UNION_TAGS = ("SessionEvidence", "ResourceEvidence", "CredentialEvidence")


def _where(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in _UNION_TAGS or "[" in part or part.startswith("function-"):
            continue  # pydantic's names for the branch of a union or a validator, not a key
        else:
            out += f".{part}" if out else str(part)
    return out or "(top level)"


def _message(error: Any) -> str:
    if error["type"] == "extra_forbidden":
        return "unknown key (a typo?)"
    if error["type"] == "missing":
        return "required key is missing"
    if error["type"] == "value_error":
        return str(error["msg"]).removeprefix("Value error, ")
    if error["type"] in ("bool_type", "literal_error") and "accepts" in error["loc"]:
        return f"{error['input']!r}: write true, false or null (data not available)"
    return f"{error['msg']} (got {error['input']!r})" if "input" in error and not isinstance(error["input"], (dict, list)) else str(error["msg"])


def validate_table(raw: Any, schema: type[_Table], path: Path) -> Any:
    """`raw` (a table as YAML read it) checked against `schema`; raises TableProblem naming
    every problem with its key path."""
    if schema is SystemsTable:
        try:
            return SystemsTable.check(raw)
        except ValueError as exc:
            raise TableProblem(path, [str(exc)]) from None
    try:
        return schema.model_validate(raw)
    except ValidationError as exc:
        seen: dict[str, str] = {}
        for error in exc.errors():
            seen.setdefault(_where(tuple(error["loc"])), _message(error))
        raise TableProblem(path, [f"{where}: {message}" for where, message in seen.items()]) from None
