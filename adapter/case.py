"""One encounter's worth of billing facts, normalised from the resources of a run.

A Case is what the rules read, and all they read: program, OT sessions with their minutes and
performers, the Claim and its lines, payer, principal diagnosis, type of bill, the other
PHP/IOP services of each date and which documentation is on file. Building it is the only
place that knows where those facts hide in FHIR (see corpus-notes.md for the real-world
variety); the rules stay small and pure.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Iterator
from functools import lru_cache
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone, tzinfo
from typing import Any, Final, TypeVar
from zoneinfo import ZoneInfo

from .ingest import Entry, Index
from .ruleset import PayerPolicy, RuleSet
from .vocabulary import (
    CLAIM_STATUSES,
    COVERAGE_STATUSES,
    ENCOUNTER_STATUSES,
    LINE_EXTENSION,
    RULE_SYSTEM,
    TASK_CODE_SYSTEM,
    claim_encounter_references,
    draft_identifier,
    ehr_view,
    is_candidate_claim,
)

__all__ = [
    "ReviewAnswer",
    "Case",
    "ClaimLine",
    "Diagnosis",
    "InputProblem",
    "Performer",
    "Service",
    "Session",
    "build_cases",
    "codings",
]

Resource = dict[str, Any]
Code = tuple[str, str]
_T = TypeVar("_T")

# FHIR R4 dateTime (http://hl7.org/fhir/R4/datatypes.html#dateTime), except that a time without
# an offset is accepted: EHR exports send them, and the date part is then the local date.
_DATETIME: Final = re.compile(
    r"^([0-9]{4})(-(0[1-9]|1[0-2])(-(0[1-9]|[12][0-9]|3[01])"
    r"(T([01][0-9]|2[0-3]):[0-5][0-9]:([0-5][0-9]|60)(\.[0-9]+)?(Z|[+-]((0[0-9]|1[0-3]):[0-5][0-9]|14:00))?)?)?)?$"
)


# The values below are never assigned to once made (`replace` makes a new one) and hash by their
# fields, but are not `frozen`, and those a replay makes for every case or session have their
# `__init__` written out: a frozen dataclass's sets each field through object.__setattr__, and
# the one a dataclass is given runs interpreted, even in the compiled build. To make one,
# compiled: 3.1 µs frozen, 1.1 µs as generated, 0.14 µs written out (a 10k replay, paired runs:
# 5.5% less CPU than generated). Each `__init__` takes the fields in order, with their defaults.
@dataclass(slots=True, unsafe_hash=True)
class InputProblem:
    """An element of an input resource whose value is not valid FHIR (reported, never guessed at)."""

    source: str  # the file (or server search) the resource came from
    resource: str  # "Procedure/<id>"
    element: str  # "Procedure.status"
    value: str
    message: str


@dataclass(init=False, slots=True, unsafe_hash=True)
class Performer:
    reference: str | None
    discipline: str  # OT | OTA | other | unknown
    taxonomy: str | None
    person: str | None = None  # the Practitioner behind a PractitionerRole (or the reference itself)

    def __init__(self, reference: str | None, discipline: str, taxonomy: str | None, person: str | None = None) -> None:
        self.reference = reference
        self.discipline = discipline
        self.taxonomy = taxonomy
        self.person = person


@dataclass(init=False, slots=True, unsafe_hash=True)
class Session:
    procedure: str  # "Procedure/<id>"
    status: str | None
    start: str | None
    end: str | None
    minutes: float | None  # None when start or end is missing, invalid (or only a date)
    service_date: str | None  # the local calendar date of the start
    performers: tuple[Performer, ...]
    resource: Resource = field(repr=False, compare=False)
    # "counted" (completed), "review" (in-progress, on-hold, ...), "invalid" (not a status code)
    status_class: str = "counted"
    invalid_times: tuple[str, ...] = ()  # elements whose value is not a valid dateTime
    date_read_in: str | None = None  # a UTC start read in this offset or zone to date it
    date_uncertain: bool = False  # a UTC start with no zone to read it in, dated by its UTC day
    taken_as_one: tuple[str, ...] = ()  # other Procedures recording this same session
    duplicate_of: str | None = None  # set on a record folded into another one (SESSION-OVERLAP)

    def __init__(
        self,
        procedure: str,
        status: str | None,
        start: str | None,
        end: str | None,
        minutes: float | None,
        service_date: str | None,
        performers: tuple[Performer, ...],
        resource: Resource,
        status_class: str = "counted",
        invalid_times: tuple[str, ...] = (),
        date_read_in: str | None = None,
        date_uncertain: bool = False,
        taken_as_one: tuple[str, ...] = (),
        duplicate_of: str | None = None,
    ) -> None:
        self.procedure = procedure
        self.status = status
        self.start = start
        self.end = end
        self.minutes = minutes
        self.service_date = service_date
        self.performers = performers
        self.resource = resource
        self.status_class = status_class
        self.invalid_times = invalid_times
        self.date_read_in = date_read_in
        self.date_uncertain = date_uncertain
        self.taken_as_one = taken_as_one
        self.duplicate_of = duplicate_of

    @property
    def counts(self) -> bool:
        """A delivered session, recorded once: what the length rules and the lines look at."""
        return self.status_class == "counted" and self.duplicate_of is None


@dataclass(init=False, slots=True, unsafe_hash=True)
class ClaimLine:
    index: int  # position in Claim.item
    sequence: int | None
    system: str | None  # system key of productOrService (hcpcs, cpt, ...)
    code: str | None
    revenue: str | None
    quantity: float
    service_date: str | None
    modifiers: tuple[str, ...]
    has_modifier_extension: bool
    encounters: tuple[str, ...] = ()  # item.encounter, resolved to Encounter/<id>
    ours: bool = False  # added by the adapter (LINE_EXTENSION), not written by the EHR

    def __init__(
        self,
        index: int,
        sequence: int | None,
        system: str | None,
        code: str | None,
        revenue: str | None,
        quantity: float,
        service_date: str | None,
        modifiers: tuple[str, ...],
        has_modifier_extension: bool,
        encounters: tuple[str, ...] = (),
        ours: bool = False,
    ) -> None:
        self.index = index
        self.sequence = sequence
        self.system = system
        self.code = code
        self.revenue = revenue
        self.quantity = quantity
        self.service_date = service_date
        self.modifiers = modifiers
        self.has_modifier_extension = has_modifier_extension
        self.encounters = encounters
        self.ours = ours


@dataclass(init=False, slots=True, unsafe_hash=True)
class Service:
    """A PHP/IOP service on a date, other than the OT sessions themselves."""

    service_date: str | None
    code: Code
    kind: str  # ot | activity | other
    units: float

    def __init__(self, service_date: str | None, code: Code, kind: str, units: float) -> None:
        self.service_date = service_date
        self.code = code
        self.kind = kind
        self.units = units


@dataclass(init=False, slots=True, unsafe_hash=True)
class Diagnosis:
    system: str | None
    code: str
    source: str  # where it was found, e.g. "Claim.diagnosis" or "Encounter.diagnosis"

    def __init__(self, system: str | None, code: str, source: str) -> None:
        self.system = system
        self.code = code
        self.source = source


@dataclass(slots=True, unsafe_hash=True)
class ReviewAnswer:
    """A person's answer to the review Task of the Claim (completed, output `answer`)."""

    task: str  # the Task as read, version-specific: Task/<id>/_history/<n>
    answer: str  # approve | reject
    by: dict[str, Any]  # who answered: the Task's owner as it stands completed (a Reference)
    on: str | None  # when: executionPeriod.end, else the Task's lastModified, else meta.lastUpdated
    rules: frozenset[str]  # the rules that asked the question answered (Task.reasonCode)

    @property
    def who(self) -> str:
        return str(self.by.get("display") or self.by.get("reference") or "someone not recorded")


@dataclass(init=False, slots=True)
class Case:
    encounter: str  # "Encounter/<id>"
    encounter_resource: Resource = field(repr=False)
    patient: str | None
    provider: str | None  # Encounter.serviceProvider
    encounter_date: str | None
    encounter_class: str | None
    encounter_programs: frozenset[str]  # from Encounter/EpisodeOfCare codings
    claim: Entry | None
    claim_programs: frozenset[str]  # from condition codes 41/92 on the Claim
    claim_lines: tuple[ClaimLine, ...]
    sessions: tuple[Session, ...]
    services: tuple[Service, ...]
    payer: str
    payer_name: str | None
    payer_policy: PayerPolicy | None
    coverage: str | None
    coverage_status: str | None
    coverage_period: tuple[str | None, str | None]  # (start, end) dates, None when open
    diagnosis: Diagnosis | None
    bill_type: str | None  # normalised, e.g. "131" or "871"
    bill_type_source: str | None  # "supportingInfo" | "subType"
    documentation: dict[str, bool]
    unknown_modifier_extensions: tuple[str, ...] = ()
    input_problems: tuple[InputProblem, ...] = ()
    source: str = ""  # where the Encounter came from
    draft: bool = False  # `claim` is a draft we made earlier: the EHR has no claim yet
    review_answer: ReviewAnswer | None = None  # a person's answer to the Claim's review Task

    def __init__(
        self,
        encounter: str,
        encounter_resource: Resource,
        patient: str | None,
        provider: str | None,
        encounter_date: str | None,
        encounter_class: str | None,
        encounter_programs: frozenset[str],
        claim: Entry | None,
        claim_programs: frozenset[str],
        claim_lines: tuple[ClaimLine, ...],
        sessions: tuple[Session, ...],
        services: tuple[Service, ...],
        payer: str,
        payer_name: str | None,
        payer_policy: PayerPolicy | None,
        coverage: str | None,
        coverage_status: str | None,
        coverage_period: tuple[str | None, str | None],
        diagnosis: Diagnosis | None,
        bill_type: str | None,
        bill_type_source: str | None,
        documentation: dict[str, bool],
        unknown_modifier_extensions: tuple[str, ...] = (),
        input_problems: tuple[InputProblem, ...] = (),
        source: str = "",
        draft: bool = False,
        review_answer: ReviewAnswer | None = None,
    ) -> None:
        self.encounter = encounter
        self.encounter_resource = encounter_resource
        self.patient = patient
        self.provider = provider
        self.encounter_date = encounter_date
        self.encounter_class = encounter_class
        self.encounter_programs = encounter_programs
        self.claim = claim
        self.claim_programs = claim_programs
        self.claim_lines = claim_lines
        self.sessions = sessions
        self.services = services
        self.payer = payer
        self.payer_name = payer_name
        self.payer_policy = payer_policy
        self.coverage = coverage
        self.coverage_status = coverage_status
        self.coverage_period = coverage_period
        self.diagnosis = diagnosis
        self.bill_type = bill_type
        self.bill_type_source = bill_type_source
        self.documentation = documentation
        self.unknown_modifier_extensions = unknown_modifier_extensions
        self.input_problems = input_problems
        self.source = source
        self.draft = draft
        self.review_answer = review_answer

    @property
    def program(self) -> str | None:
        """PHP, IOP or None. What the encounter says wins; the claim's code is checked against it."""
        for programs in (self.encounter_programs, self.claim_programs):
            if len(programs) == 1:
                for program in programs:  # its one member (`next(iter(...))` is two calls)
                    return program
        return None

    def owns(self, line: ClaimLine) -> bool:
        """Whether a claim line bills this encounter (a claim may bill several PHP days)."""
        if line.encounters:
            return self.encounter in line.encounters
        return line.service_date is None or line.service_date in self.service_dates

    @property
    def service_dates(self) -> set[str]:
        return {s.service_date for s in self.sessions if s.service_date} | ({self.encounter_date} if self.encounter_date else set())

    @property
    def claim_ref(self) -> str | None:
        """The EHR's Claim; None while there is none (a draft of ours stands in for it)."""
        return self.claim.key if self.claim and not self.draft else None

    @property
    def has_claim(self) -> bool:
        return self.claim is not None and not self.draft


def codings(concept: Any) -> list[tuple[str | None, str]]:
    """(system, code) of each coding of a CodeableConcept; text-only concepts have none.

    A list rather than a generator: most concepts have one coding, and a case reads a few
    hundred of them, where a generator's set-up and resumption cost more than the list."""
    out: list[tuple[str | None, str]] = []
    found = concept.get("coding") if isinstance(concept, dict) else None
    for coding in found if isinstance(found, list) else ():  # a malformed `coding` has none
        if isinstance(coding, dict):
            code = coding.get("code")
            if isinstance(code, str) and code:
                out.append((coding.get("system"), code.strip()))
    return out


def _keyed(concept: Any, rules: RuleSet) -> list[Code]:
    """`codings` with the system's key in place of its URI ("" for none).

    The same walk as `codings` rather than a pass over its result: this is the most called
    function of case building (a dozen concepts a case), and the second pass cost a third of it.
    Whole lists are read where a caller may stop at the first match, so nothing malformed may
    raise here: a system that is an object or an array is no system."""
    out: list[Code] = []
    found = concept.get("coding") if isinstance(concept, dict) else None
    for coding in found if isinstance(found, list) else ():
        if isinstance(coding, dict):
            code = coding.get("code")
            if isinstance(code, str) and code:
                try:
                    key = rules.system_key(coding.get("system"))
                except TypeError:  # an object or an array, which no dict can look up
                    key = None
                out.append((key or "", code.strip()))
    return out


# What `_read_datetime` has read, by the text. A dict of our own, not `lru_cache`: its hit is
# a dict lookup from compiled code, where calling an lru_cache wrapper (by tp_call, with a tuple
# of arguments) cost ~600 instructions, and a case reads a dozen times. Emptied when full.
_DATETIMES: Final[dict[str, tuple[bool, datetime | None, bool]]] = {}
_MAX_DATETIMES: Final = 1 << 14


def _read_datetime(value: str) -> tuple[bool, datetime | None, bool]:
    """(whether `value` is a valid dateTime, the instant when it has a time part, whether that
    instant is given in UTC).

    Kept (`_DATETIMES`): a case reads each time several times over (validity, the session
    length, the local date, overlaps) and parsing it is a good part of building a case. A
    replay partition's times (some thousands) fit, the memo stays a few MB in a long-lived
    service, and a datetime is immutable, so sharing one is safe."""
    read = _DATETIMES.get(value)
    if read is None:
        if len(_DATETIMES) >= _MAX_DATETIMES:
            _DATETIMES.clear()
        read = _DATETIMES[value] = _datetime_of(value)
    return read


def _datetime_of(value: str) -> tuple[bool, datetime | None, bool]:
    if not _DATETIME.match(value):
        return False, None, False
    if "T" not in value:
        return True, None, False
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:  # 2025-02-30T..., or a leap second
        return False, None, False
    return True, moment, moment.tzinfo is not None and moment.utcoffset() == timedelta(0)


def _valid_datetime(value: Any) -> bool:
    return isinstance(value, str) and _read_datetime(value)[0]


def _parse_instant(value: Any) -> datetime | None:
    """A valid dateTime with a time part, or None (date-only and partial dates carry no clock time)."""
    return _read_datetime(value)[1] if isinstance(value, str) else None


def _offset_text(zone: tzinfo) -> str:
    offset = datetime(2000, 1, 1, tzinfo=zone).utcoffset() or timedelta(0)
    sign = "-" if offset < timedelta(0) else "+"
    minutes = abs(int(offset.total_seconds())) // 60
    return f"{sign}{minutes // 60:02d}:{minutes % 60:02d}"


@lru_cache(maxsize=64)  # a site's encounters share one or two offsets, case after case, group after group
def _offset_zone(offset: timedelta) -> tuple[tzinfo, str]:
    """The zone of a UTC offset an Encounter.period gives, and how a decision names it."""
    zone = timezone(offset)
    return zone, f"{_offset_text(zone)} (the offset of Encounter.period)"


def _organization(org: Resource) -> tuple[list[str], list[str], list[str]]:
    """A payer Organization's names, identifiers and states."""
    names = [str(org["name"])] if org.get("name") else []
    names.extend(str(a) for a in org.get("alias") or ())
    identifiers = [str(i.get("value")) for i in org.get("identifier") or () if isinstance(i, dict)]
    states = [str(a.get("state")).upper() for a in org.get("address") or () if isinstance(a, dict) and a.get("state")]
    return names, identifiers, states


def _minutes(start: datetime | None, end: datetime | None) -> float | None:
    if start is None or end is None:
        return None
    if (start.tzinfo is None) != (end.tzinfo is None):
        # FHIR requires a zone with a time; when only one side has it, compare clock times.
        start, end = start.replace(tzinfo=None), end.replace(tzinfo=None)
    return (end - start).total_seconds() / 60.0


def _object(value: Any) -> dict[str, Any]:
    """A JSON object, or an empty one in place of anything else (absent, null, a wrong type)."""
    return value if isinstance(value, dict) else {}


def _date_part(value: Any) -> str | None:
    if isinstance(value, str) and len(value) >= 10:
        return value[:10]
    return None


class _Builder:
    def __init__(self, index: Index, rules: RuleSet) -> None:
        self.index = index
        self.rules = rules
        self._procedures_by_encounter: dict[str, list[Entry]] = {}
        self._claims_by_encounter: dict[str, list[Entry]] = {}
        self._by_patient: dict[tuple[str, str], list[Entry]] = {}
        self._by_encounter: dict[tuple[str, str], list[Entry]] = {}
        self._coverages_by_patient: dict[str, list[Entry]] = {}
        # Completed review Tasks by the Claim they focus on: Tasks are shared by every partition
        # of a replay, so looking through all of them for each Claim would grow with their square.
        self._review_tasks: dict[str, list[Entry]] = {}
        # Memos of what depends only on the input, which does not change while cases are built:
        # the same references, performers and documentation come back case after case. (What
        # depends on one resource and the tables alone is kept longer: see `_derived`.)
        self._keys: dict[str, str] = {}
        self._performers: dict[tuple[str, str | None], Performer] = {}
        self._evidence_codes: dict[Entry, frozenset[Code]] = {}
        self._doc_types = {ev.resource_type for el in rules.documentation for ev in el.evidence if ev.kind == "resource"}
        self._site_zone = ZoneInfo(rules.time_zone) if rules.time_zone else None
        self._possible_zones = tuple(ZoneInfo(z) for z in rules.possible_time_zones)
        self._group()

    # -- indexing -----------------------------------------------------------------------------

    def _key_of(self, reference: Any, context: Entry) -> str | None:
        """The key of the resource a Reference points at; None for a contained one or none."""
        ref = reference.get("reference") if isinstance(reference, dict) else None
        if not isinstance(ref, str) or not ref or ref[0] == "#":
            return None  # nothing to resolve, or a contained resource, which has no key
        if context.base is not None:  # read against the context's server first
            hit = self.index.resolve_entry(reference, context)
            return hit.key if isinstance(hit, Entry) else None
        # Otherwise where a reference leads depends on it alone, and the same Patient and
        # Encounter references come back resource after resource: each is resolved once
        # ("" for one that leads nowhere; a key never is empty).
        key = self._keys.get(ref)
        if key is None:
            hit = self.index.resolve_entry(reference, context)
            key = self._keys[ref] = hit.key if isinstance(hit, Entry) else ""
        return key or None

    def _group(self) -> None:
        for proc in self.index.of_type("Procedure"):
            enc = self._key_of(proc.resource.get("encounter"), proc)
            if enc:
                self._procedures_by_encounter.setdefault(enc, []).append(proc)
        for claim in self.index.of_type("Claim"):
            for enc in self._claim_encounters(claim):
                bucket = self._claims_by_encounter.setdefault(enc, [])
                if claim not in bucket:
                    bucket.append(claim)
        for cov in self.index.of_type("Coverage"):
            patient = self._key_of(cov.resource.get("beneficiary"), cov)
            if patient:
                self._coverages_by_patient.setdefault(patient, []).append(cov)
        for task in self.index.of_type("Task"):
            res = task.resource
            if res.get("status") != "completed" or (TASK_CODE_SYSTEM, "review") not in codings(res.get("code")):
                continue
            focus = self._key_of(res.get("focus"), task)
            if focus:
                self._review_tasks.setdefault(focus, []).append(task)
        for rtype in self._doc_types:
            for entry in self.index.of_type(rtype):
                res = entry.resource
                subject = res.get("subject") or res.get("patient")
                patient = self._key_of(subject, entry)
                if patient:
                    self._by_patient.setdefault((rtype, patient), []).append(entry)
                enc_refs = [res.get("encounter")]
                context = res.get("context")
                if isinstance(context, dict):
                    enc_refs.extend(context.get("encounter") or ())
                for ref in enc_refs:
                    enc = self._key_of(ref, entry)
                    if enc:
                        self._by_encounter.setdefault((rtype, enc), []).append(entry)

    def _claim_encounters(self, claim: Entry) -> Iterator[str]:
        for ref in claim_encounter_references(claim.resource):
            key = self._key_of(ref, claim)
            if key:
                yield key

    # -- facts ----------------------------------------------------------------------------------

    def encounter_programs(self, enc: Entry) -> frozenset[str]:
        res = enc.resource
        concepts: list[Any] = list(res.get("type") or ())
        concepts.append(res.get("serviceType"))
        for ref in res.get("episodeOfCare") or ():
            episode = self.index.resolve(ref, enc)
            if episode:
                concepts.extend(episode.get("type") or ())
        found = set()
        for concept in concepts:
            for code in _keyed(concept, self.rules):
                program = self.rules.program_codings.get(code)
                if program:
                    found.add(program)
        return frozenset(found)

    def claim_programs(self, claim: Entry) -> frozenset[str]:
        found = set()
        for info in claim.resource.get("supportingInfo") or ():
            if not isinstance(info, dict):
                continue
            for system, code in _keyed(info.get("code"), self.rules):
                if system == "condition_code" and code in self.rules.claim_condition_codes:
                    found.add(self.rules.claim_condition_codes[code])
        return frozenset(found)

    def pick_claim(self, enc_key: str) -> Entry | None:
        """The institutional claim that bills the encounter (newest first), or None."""
        candidates = [c for c in self._claims_by_encounter.get(enc_key, ()) if is_candidate_claim(c.resource, self.rules)]
        if len(candidates) < 2:  # nearly always one claim or none: nothing to order
            return candidates[0] if candidates else None
        return max(candidates, key=lambda c: (str(c.resource.get("created") or ""), c.key))

    def review_answer(self, claim: Entry | None) -> ReviewAnswer | None:
        """The answer of the newest completed review Task focused on the Claim, if any: its
        output `answer` (task-codes `approve` or `reject`, a CodeableConcept or a code)."""
        tasks = self._review_tasks.get(claim.key) if claim is not None else None
        if not tasks:
            return None
        answers = []
        for task in tasks:
            res = task.resource
            for output in res.get("output") or ():
                if not isinstance(output, dict) or (TASK_CODE_SYSTEM, "answer") not in codings(output.get("type")):
                    continue
                values = {c for s, c in codings(output.get("valueCodeableConcept")) if s == TASK_CODE_SYSTEM}
                values.add(str(output.get("valueCode")))
                answer = next((a for a in ("reject", "approve") if a in values), None)
                if answer is None:
                    continue
                meta = _object(res.get("meta"))
                on = _object(res.get("executionPeriod")).get("end") or res.get("lastModified") or meta.get("lastUpdated")
                owner = res.get("owner")
                version = meta.get("versionId")
                answers.append(
                    ReviewAnswer(
                        task=f"{task.key}/_history/{version}" if version else task.key,
                        answer=answer,
                        by=dict(owner) if isinstance(owner, dict) else {},
                        on=str(on) if on else None,
                        rules=frozenset(c for s, c in codings(res.get("reasonCode")) if s == RULE_SYSTEM),
                    )
                )
        return max(answers, key=lambda a: a.on or "", default=None)

    def claim_lines(self, claim: Entry) -> tuple[ClaimLine, ...]:
        lines = []
        for n, item in enumerate(claim.resource.get("item") or ()):
            if not isinstance(item, dict):
                continue
            products = _keyed(item.get("productOrService"), self.rules)
            product: tuple[str | None, str | None] = products[0] if products else (None, None)
            for system, code in products:
                if system in ("hcpcs", "cpt"):
                    product = (system, code)
                    break
            revenues = _keyed(item.get("revenue"), self.rules)
            revenue = revenues[0][1] if revenues else None
            quantity = item.get("quantity") or {}
            value = quantity.get("value") if isinstance(quantity, dict) else None
            period = item.get("servicedPeriod") or {}
            date = _date_part(item.get("servicedDate")) or (
                _date_part(period.get("start")) if isinstance(period, dict) else None
            )
            seq = item.get("sequence")
            modifiers, extensions = item.get("modifier"), item.get("extension")
            lines.append(
                ClaimLine(
                    index=n,
                    sequence=seq if isinstance(seq, int) else None,
                    system=product[0],
                    code=product[1],
                    revenue=revenue,
                    quantity=float(value) if isinstance(value, (int, float)) else 1.0,
                    service_date=date,
                    modifiers=tuple(c for m in modifiers for _, c in codings(m)) if modifiers else (),
                    has_modifier_extension=bool(item.get("modifierExtension")),
                    encounters=self._encounter_keys(item.get("encounter"), claim),
                    ours=any(isinstance(e, dict) and e.get("url") == LINE_EXTENSION for e in extensions) if extensions else False,
                )
            )
        return tuple(lines)

    def _encounter_keys(self, references: Any, context: Entry) -> tuple[str, ...]:
        keys = []
        for ref in references or ():
            key = self._key_of(ref, context)
            if key:
                keys.append(key)
        return tuple(keys)

    def performer(self, ref: Any, context: Entry) -> Performer:
        target = ref.get("reference") if isinstance(ref, dict) else None
        if not isinstance(target, str) or target.startswith("#"):
            return self._read_performer(ref, context)
        # A site's few therapists perform session after session: each is read once. Only a
        # contained performer depends on more than the reference and the context's base.
        memo = (target, context.base)
        found = self._performers.get(memo)
        if found is None:
            found = self._performers[memo] = self._read_performer(ref, context)
        return found

    def _read_performer(self, ref: Any, context: Entry) -> Performer:
        hit = self.index.resolve_entry(ref, context)
        if isinstance(hit, Entry) and hit.type != "PractitionerRole":
            # What a Practitioner (or any performer but a role, which names another resource) is
            # depends on it and the tables alone: kept on its entry, it is read once a replay,
            # not once in each group of patients its sessions are decided in.
            entry = hit
            return self._derived(entry, "performer", lambda: self._performer_of(entry, ref, context))
        return self._performer_of(hit, ref, context)

    def _performer_of(self, hit: Entry | Resource | None, ref: Any, context: Entry) -> Performer:
        """The Performer reference `ref` resolved to (`hit`: an entry, a contained resource or
        nothing)."""
        resource = hit.resource if isinstance(hit, Entry) else hit
        label = hit.key if isinstance(hit, Entry) else (ref.get("reference") if isinstance(ref, dict) else None)
        if not resource:
            return Performer(label, "unknown", None, label)
        concepts: list[Any] = []
        person = label
        if resource.get("resourceType") == "PractitionerRole":
            concepts.extend(resource.get("code") or ())
            concepts.extend(resource.get("specialty") or ())
            owner = context if isinstance(hit, dict) else hit
            practitioner = self.index.resolve_entry(resource.get("practitioner"), owner)
            if isinstance(practitioner, Entry):
                person = practitioner.key
                practitioner = practitioner.resource
            if practitioner:
                concepts.extend(q.get("code") for q in practitioner.get("qualification") or () if isinstance(q, dict))
        else:
            concepts.extend(q.get("code") for q in resource.get("qualification") or () if isinstance(q, dict))
        taxonomies = [c for concept in concepts for s, c in _keyed(concept, self.rules) if s == self.rules.performer_system]
        for prefixes, discipline in ((self.rules.ot_prefixes, "OT"), (self.rules.ota_prefixes, "OTA")):
            for taxonomy in taxonomies:
                if taxonomy.startswith(prefixes):
                    return Performer(label, discipline, taxonomy, person)
        if taxonomies:
            return Performer(label, "other", taxonomies[0], person)
        return Performer(label, "unknown", None, person)

    def local_date(self, value: Any, zone: tzinfo | None, zone_label: str) -> tuple[str | None, str | None, bool]:
        """(local date, what a UTC time was read in, whether that date is uncertain) of a FHIR
        date or dateTime. The date of a claim line is the day the service was given where it
        was given, not the UTC day (an evening session in the Americas is the next UTC day)."""
        if not isinstance(value, str):
            return None, None, False
        valid, moment, utc = _read_datetime(value)
        if not valid:
            return None, None, False
        if moment is None or not utc:
            return value[:10], None, False
        if zone is not None:
            return moment.astimezone(zone).date().isoformat(), zone_label, False
        utc_date = moment.date()
        uncertain = any(moment.astimezone(z).date() != utc_date for z in self._possible_zones)
        return utc_date.isoformat(), None, uncertain

    def encounter_zone(self, res: Resource) -> tuple[tzinfo | None, str]:
        """The zone a UTC time of this encounter is read in: its period's own offset, else the site's."""
        value = _object(res.get("period")).get("start")
        _, start, utc = _read_datetime(value) if isinstance(value, str) else (False, None, False)
        if start is not None and start.tzinfo is not None and not utc:
            return _offset_zone(start.utcoffset() or timedelta(0))
        if self._site_zone is not None:
            return self._site_zone, f"{self.rules.time_zone} (the site time zone, site.yaml)"
        return None, ""

    def invalid_values(
        self, enc: Entry, claim: Entry | None, coverage: Resource | None, cov_key: str | None, cov_context: Entry | None
    ) -> list[InputProblem]:
        """Values the rules read from the Encounter, the Claim and the Coverage that FHIR does
        not allow: a status outside its value set, a date or dateTime that is none."""
        out: list[InputProblem] = []
        res = enc.resource
        period = _object(res.get("period"))
        status = res.get("status")
        if status not in ENCOUNTER_STATUSES:
            out.append(_code_problem(enc, enc.key, "Encounter.status", status))
        for element, value in (("Encounter.period.start", period.get("start")), ("Encounter.period.end", period.get("end"))):
            if _invalid_time(value, "dateTime"):
                out.append(_time_problem(enc, enc.key, element, value, "dateTime"))
        if claim is not None:
            status = claim.resource.get("status")
            if status not in CLAIM_STATUSES:
                out.append(_code_problem(claim, claim.key, "Claim.status", status))
            for n, item in enumerate(claim.resource.get("item") or ()):
                if isinstance(item, dict) and _invalid_time(item.get("servicedDate"), "date"):
                    element = f"Claim.item[{n}].servicedDate"  # named only when wrong: a claim has many lines
                    out.append(_time_problem(claim, claim.key, element, item.get("servicedDate"), "date"))
        if coverage is not None and cov_key is not None:
            cov_period = _object(coverage.get("period"))
            status = coverage.get("status")
            if status not in COVERAGE_STATUSES:
                out.append(_code_problem(cov_context, cov_key, "Coverage.status", status))
            for element, value in (("Coverage.period.start", cov_period.get("start")), ("Coverage.period.end", cov_period.get("end"))):
                if _invalid_time(value, "dateTime"):
                    out.append(_time_problem(cov_context, cov_key, element, value, "dateTime"))
        return out

    def _status_class(self, status: Any) -> str | None:
        """counted | review | invalid, or None for a record that is no session at all."""
        if status in self.rules.counted_session_statuses:
            return "counted"
        if status in self.rules.review_session_statuses:
            return "review"
        if status in self.rules.excluded_session_statuses:
            return None
        return "invalid"

    def sessions(
        self, enc_key: str, encounter_date: str | None, zone: tzinfo | None, zone_label: str, problems: list[InputProblem]
    ) -> tuple[Session, ...]:
        sessions = []
        for proc in self._procedures_by_encounter.get(enc_key, ()):
            res = proc.resource
            if self.rules.ot_codes.isdisjoint(_keyed(res.get("code"), self.rules)):
                continue
            status = res.get("status")
            status_class = self._status_class(status)
            if status_class is None:
                continue
            if status_class == "invalid":
                problems.append(
                    InputProblem(proc.source, proc.key, "Procedure.status", str(status), f"{status!r} is not a Procedure.status code")
                )
            period = _object(res.get("performedPeriod"))
            elements = (
                ("Procedure.performedPeriod.start", period.get("start")),
                ("Procedure.performedPeriod.end", period.get("end")),
                ("Procedure.performedDateTime", res.get("performedDateTime")),
            )
            invalid = tuple(name for name, value in elements if value is not None and not _valid_datetime(value))
            for name in invalid:
                value = dict(elements)[name]
                problems.append(InputProblem(proc.source, proc.key, name, str(value), f"{value!r} is not a FHIR dateTime"))
            start_s = period.get("start") or res.get("performedDateTime")
            end_s = period.get("end")
            start, end = _parse_instant(start_s), _parse_instant(end_s)
            date, read_in, uncertain = self.local_date(start_s, zone, zone_label)
            performers = tuple(
                self.performer(p.get("actor"), proc) for p in res.get("performer") or () if isinstance(p, dict)
            )
            sessions.append(
                Session(
                    procedure=proc.key,
                    status=status if isinstance(status, str) else None,
                    start=start_s if start else None,
                    end=end_s if end else None,
                    minutes=_minutes(start, end),
                    service_date=date or encounter_date,
                    performers=performers,
                    resource=res,
                    status_class=status_class,
                    invalid_times=invalid,
                    date_read_in=read_in,
                    date_uncertain=uncertain,
                )
            )
        if len(sessions) > 1:
            sessions.sort(key=lambda s: (s.start or "", s.procedure))
        return _fold_overlaps(sessions)

    def services(
        self, enc_key: str, claim_lines: tuple[ClaimLine, ...], has_claim: bool, default_date: str | None, zone: tzinfo | None
    ) -> tuple[Service, ...]:
        """The other PHP/IOP services of the encounter's dates (G0129 itself is counted from sessions)."""
        out = []
        if has_claim:
            for line in claim_lines:
                code = (line.system or "", line.code or "")
                kind = self.rules.services.get(code)
                if kind and code != self.rules.billed_code:
                    out.append(Service(line.service_date or default_date, code, kind, line.quantity))
            return tuple(out)
        for proc in self._procedures_by_encounter.get(enc_key, ()):
            res = proc.resource
            if res.get("status") not in self.rules.counted_session_statuses:
                continue
            codes = _keyed(res.get("code"), self.rules)
            if not self.rules.ot_codes.isdisjoint(codes):
                continue
            for code in codes:
                kind = self.rules.services.get(code)
                if kind:
                    period = _object(res.get("performedPeriod"))
                    date = self.local_date(period.get("start") or res.get("performedDateTime"), zone, "")[0] or default_date
                    out.append(Service(date, code, kind, 1.0))
                    break
        return tuple(out)

    def coverage(self, claim: Entry | None, patient: str | None, date: str | None) -> tuple[str | None, Resource | None, Entry | None]:
        if claim is not None:
            insurance = [i for i in claim.resource.get("insurance") or () if isinstance(i, dict)]
            focal = [i for i in insurance if i.get("focal")] or insurance
            for item in focal:
                hit = self.index.resolve_entry(item.get("coverage"), claim)
                if isinstance(hit, Entry):
                    return hit.key, hit.resource, hit
                if isinstance(hit, dict):
                    return f"{claim.key}#{hit.get('id')}", hit, claim
        if patient is None:
            return None, None, None
        candidates = []
        for cov in self._coverages_by_patient.get(patient, ()):
            res = cov.resource
            if res.get("status") != "active":
                continue
            period = res.get("period") or {}
            if date and isinstance(period, dict):
                if (period.get("start") and str(period["start"])[:10] > date) or (
                    period.get("end") and str(period["end"])[:10] < date
                ):
                    continue
            order = res.get("order")
            candidates.append((order if isinstance(order, int) else 999, cov.key, cov))
        if not candidates:
            return None, None, None
        _, key, cov = min(candidates, key=lambda c: (c[0], c[1]))
        return key, cov.resource, cov

    def payer(self, coverage: Resource | None, context: Entry | None) -> tuple[str, str | None, PayerPolicy | None]:
        if coverage is None:
            return "unknown", None, None
        sopt = frozenset(c for s, c in _keyed(coverage.get("type"), self.rules) if s == "sopt")
        names: list[str] = []
        identifiers: set[str] = set()
        states: set[str] = set()
        for ref in coverage.get("payor") or ():
            if not isinstance(ref, dict):
                continue
            org = self._payer_organization(ref, context) if context else None
            if org is not None:
                names.extend(org[0])
                identifiers.update(org[1])
                states.update(org[2])
            if ref.get("display"):
                names.append(str(ref["display"]))
            ident = ref.get("identifier")
            if isinstance(ident, dict) and ident.get("value"):
                identifiers.add(str(ident["value"]))
        display = names[0] if names else None
        policy = self.rules.payer_policy(sopt, tuple([n.lower() for n in names]), frozenset(identifiers), frozenset(states))
        if policy is None:
            return "unknown", display, None
        return policy.key, display or policy.name, policy

    def _payer_organization(self, ref: dict[str, Any], context: Entry) -> tuple[list[str], list[str], list[str]] | None:
        """The names, identifiers and states of the Organization a Coverage.payor refers to."""
        hit = self.index.resolve_entry(ref, context)
        if isinstance(hit, Entry):
            # Every Coverage names one of a few payers: each is read once a run.
            org = hit
            return self._derived(org, "payer", lambda: _organization(org.resource)) if org.type == "Organization" else None
        if isinstance(hit, dict) and hit.get("resourceType") == "Organization":  # a contained one
            return _organization(hit)
        return None

    def _derived(self, entry: Entry, kind: str, read: Callable[[], _T]) -> _T:
        """What `read()` works out from `entry`'s resource and the tables alone, read once for
        each tables it is asked under and kept on the entry (see `Entry.derived`)."""
        facts = entry.derived
        if facts is None:
            facts = entry.derived = {}
        known = facts.get(kind)
        if known is None or known[0] is not self.rules:
            known = facts[kind] = (self.rules, read())
        value: _T = known[1]
        return value

    def diagnosis(self, claim: Entry | None, enc: Entry) -> Diagnosis | None:
        if claim is not None:
            for dx in claim.resource.get("diagnosis") or ():
                if not isinstance(dx, dict):
                    continue
                types = {code for concept in dx.get("type") or () for code in _keyed(concept, self.rules)}
                if ("diagnosis_type", "principal") in types:
                    concept = dx.get("diagnosisCodeableConcept")
                    if concept is None:
                        condition = self.index.resolve(dx.get("diagnosisReference"), claim)
                        concept = condition.get("code") if condition else None
                    found = self._pick_dx(concept, "Claim.diagnosis")
                    if found:
                        return found
        diagnoses = [d for d in enc.resource.get("diagnosis") or () if isinstance(d, dict)]
        ranked = [d for d in diagnoses if d.get("rank") == 1] or (diagnoses if len(diagnoses) == 1 else [])
        for dx in ranked:
            condition = self.index.resolve(dx.get("condition"), enc)
            if condition:
                found = self._pick_dx(condition.get("code"), "Encounter.diagnosis")
                if found:
                    return found
        return None

    def _pick_dx(self, concept: Any, source: str) -> Diagnosis | None:
        codes = _keyed(concept, self.rules)
        if not codes:
            return None
        system, code = codes[0]
        for candidate in codes:
            if candidate[0] == "icd10cm":
                system, code = candidate
                break
        return Diagnosis(system or None, code, source)

    def bill_type(self, claim: Entry | None) -> tuple[str | None, str | None]:
        if claim is None:
            return None, None
        res = claim.resource
        for info in res.get("supportingInfo") or ():
            if isinstance(info, dict) and "typeofbill" in [c for _, c in codings(info.get("category"))]:
                for _, code in codings(info.get("code")):
                    return _normalise_tob(code), "supportingInfo"
        for system, code in _keyed(res.get("subType"), self.rules):
            if system == "bill_type":
                return _normalise_tob(code), "subType"
        return None, None

    def documentation(self, enc_key: str, patient: str | None, sessions: tuple[Session, ...]) -> dict[str, bool]:
        present = {}
        resources = [s.resource for s in sessions]
        credentialed = bool(sessions) and all(
            s.performers and all(p.discipline in ("OT", "OTA") for p in s.performers) for s in sessions
        )
        for element in self.rules.documentation:
            ok = False
            for ev in element.evidence:
                if ev.kind == "session":
                    ok = bool(resources) and all([_has_path(r, ev.path) for r in resources])
                elif ev.kind == "performers_credentialed":
                    ok = credentialed
                elif ev.link == "encounter":
                    ok = self._evidenced(self._by_encounter.get((ev.resource_type, enc_key), ()), ev.codes)
                else:
                    ok = self._evidenced(self._by_patient.get((ev.resource_type, patient or ""), ()), ev.codes)
                if ok:
                    break
            present[element.key] = ok
        return present

    def _evidenced(self, pool: Collection[Entry], codes: frozenset[Code]) -> bool:
        """Whether a resource of the pool is evidence: any, or one with one of the codes."""
        if not codes:
            return bool(pool)
        for entry in pool:
            if not codes.isdisjoint(self._evidence_codes_of(entry)):
                return True
        return False

    def _evidence_codes_of(self, entry: Entry) -> frozenset[Code]:
        """The codes a documentation resource is recognised by; read once, as a patient's
        resources are looked at again for each of the patient's encounters."""
        codes = self._evidence_codes.get(entry)
        if codes is None:
            res = entry.resource
            found = _keyed(res.get("code"), self.rules) + _keyed(res.get("type"), self.rules)
            category = res.get("category")
            for concept in category if isinstance(category, list) else ():
                found.extend(_keyed(concept, self.rules))
            codes = self._evidence_codes[entry] = frozenset(found)
        return codes

    # -- the case -------------------------------------------------------------------------------

    def build(self, enc: Entry) -> Case | None:
        res = enc.resource
        enc_key = enc.key
        zone, zone_label = self.encounter_zone(res)
        encounter_date = self.local_date(_object(res.get("period")).get("start"), zone, zone_label)[0]
        problems: list[InputProblem] = []
        sessions = self.sessions(enc_key, encounter_date, zone, zone_label, problems)
        claim = self.pick_claim(enc_key)
        # Every fact is read from the Claim as the EHR wrote it, never from our annotations on
        # it; a draft of ours is no EHR claim at all.
        draft = claim is not None and draft_identifier(claim.resource) is not None
        view = Entry(ehr_view(claim.resource), claim.source, claim.full_url) if claim is not None and not draft else None
        enc_programs = self.encounter_programs(enc)
        claim_programs = self.claim_programs(view) if view else frozenset()
        if not sessions and not enc_programs and not claim_programs:
            return None
        patient = self._key_of(res.get("subject"), enc)
        claim_lines = self.claim_lines(view) if view else ()
        counted = tuple([s for s in sessions if s.counts])
        dates = [s.service_date for s in counted if s.service_date]
        first_date = min(dates) if dates else encounter_date
        cov_key, coverage, cov_context = self.coverage(view, patient, first_date)
        payer, payer_name, policy = self.payer(coverage, cov_context)
        period = _object((coverage or {}).get("period"))
        problems.extend(self.invalid_values(enc, view, coverage, cov_key, cov_context))
        cls = res.get("class")  # a Coding, not a CodeableConcept
        class_codes = _keyed({"coding": [cls]}, self.rules) if isinstance(cls, dict) else []
        encounter_class = class_codes[0][1] if class_codes and class_codes[0][0] == "act_code" else None
        bill_type, bill_type_source = self.bill_type(view)
        qualifying = tuple(s for s in counted if s.minutes is not None and s.minutes >= self.rules.minimum_minutes)
        return Case(
            encounter=enc_key,
            encounter_resource=res,
            patient=patient,
            provider=self._key_of(res.get("serviceProvider"), enc),
            encounter_date=encounter_date,
            encounter_class=encounter_class,
            encounter_programs=enc_programs,
            claim=claim,
            claim_programs=claim_programs,
            claim_lines=claim_lines,
            sessions=sessions,
            services=self.services(enc_key, claim_lines, view is not None, encounter_date, zone),
            payer=payer,
            payer_name=payer_name,
            payer_policy=policy,
            coverage=cov_key,
            coverage_status=str(coverage.get("status")) if coverage and coverage.get("status") else None,
            coverage_period=(_date_part(period.get("start")), _date_part(period.get("end"))),
            diagnosis=self.diagnosis(view, enc),
            bill_type=bill_type,
            bill_type_source=bill_type_source,
            documentation=self.documentation(enc_key, patient, qualifying or counted or sessions),
            unknown_modifier_extensions=tuple(
                f"Claim.item[{line.index}]" for line in claim_lines if line.has_modifier_extension
            ),
            input_problems=tuple(problems),
            source=enc.source,
            draft=draft,
            review_answer=self.review_answer(claim),
        )


def _invalid_time(value: Any, kind: str) -> bool:
    """Whether a date (kind "date") or dateTime element holds what FHIR does not allow; absent is fine."""
    return value is not None and not (_valid_datetime(value) and (kind != "date" or len(str(value)) == 10))


def _code_problem(entry: Entry | None, key: str, element: str, value: Any) -> InputProblem:
    source = entry.source if entry is not None else ""
    return InputProblem(source, key, element, str(value), f"{value!r} is not a code of the {element} value set")


def _time_problem(entry: Entry | None, key: str, element: str, value: Any, kind: str) -> InputProblem:
    source = entry.source if entry is not None else ""
    return InputProblem(source, key, element, str(value), f"{value!r} is not a FHIR {kind}")


def _normalise_tob(code: str) -> str:
    code = code.strip()
    # NUBC writes the type of bill with a leading zero (0131); the rules read the 3 digits.
    if len(code) == 4 and code.startswith("0"):
        return code[1:]
    return code


def _has_path(resource: Resource, path: tuple[str, ...]) -> bool:
    value: Any = resource
    for part in path:
        if isinstance(value, list):
            value = value[0] if value else None
        if not isinstance(value, dict):
            return False
        value = value.get(part)
    return value not in (None, "", [], {})


def _fold_overlaps(sessions: list[Session]) -> tuple[Session, ...]:
    """Records of one session made twice (a flowsheet row and a charge) become one.

    Completed sessions with times that share a performer and overlap are one session: nobody
    gives two sessions at once. The longest record stands for it (then the earliest, then the
    Procedure id); the others are kept, marked as its duplicates, so the finding can name them.
    """
    if len(sessions) < 2:  # most encounters have one session: nothing to fold
        return tuple(sessions)
    timed = [
        (n, s, _parse_instant(s.start), _parse_instant(s.end))
        for n, s in enumerate(sessions)
        if s.status_class == "counted" and s.start and s.end
    ]
    group = list(range(len(sessions)))

    def root(n: int) -> int:
        while group[n] != n:
            group[n] = group[group[n]]
            n = group[n]
        return n

    for i, (a, sa, start_a, end_a) in enumerate(timed):
        people_a = {p.person for p in sa.performers if p.person}
        for b, sb, start_b, end_b in timed[i + 1:]:
            if start_a is None or end_a is None or start_b is None or end_b is None:
                continue
            if people_a & {p.person for p in sb.performers if p.person} and _before(start_a, end_b) and _before(start_b, end_a):
                group[root(b)] = root(a)
    members: dict[int, list[int]] = {}
    for n in range(len(sessions)):
        members.setdefault(root(n), []).append(n)
    out = list(sessions)
    for indices in members.values():
        if len(indices) < 2:
            continue
        kept = min(indices, key=lambda n: (-(sessions[n].minutes or 0.0), sessions[n].start or "", sessions[n].procedure))
        others = tuple(sessions[n].procedure for n in indices if n != kept)
        out[kept] = replace(sessions[kept], taken_as_one=others)
        for n in indices:
            if n != kept:
                out[n] = replace(sessions[n], duplicate_of=sessions[kept].procedure)
    return tuple(out)


def _before(a: datetime, b: datetime) -> bool:
    if (a.tzinfo is None) != (b.tzinfo is None):
        a, b = a.replace(tzinfo=None), b.replace(tzinfo=None)
    return a < b


def build_cases(index: Index, rules: RuleSet, encounters: Collection[str] | None = None) -> list[Case]:
    """One Case per Encounter (of `encounters`, when given) that has an OT session or is part of
    a PHP/IOP program."""
    builder = _Builder(index, rules)
    cases = []
    for enc in index.of_type("Encounter"):
        if encounters is not None and enc.key not in encounters:
            continue
        case = builder.build(enc)
        if case is not None:
            cases.append(case)
    return cases
