"""A small in-memory FHIR R4 server for the worker tests and the service benchmark.

It implements what the adapter uses, the way HAPI answers it (fhir-subscriptions-hapi.md D):
read, versioned writes with ETags, `If-Match` mismatch -> 409, conditional create, search with
the parameters and `_include`/`_revinclude` the adapter sends, `batch` and `transaction`
Bundles. It is mounted with respx (`respx_mock.route(host=...).mock(side_effect=server)`) or as
an httpx.MockTransport. `fail_next` injects outages: statuses or exceptions, in order.
The real server is HAPI, in the end-to-end tests.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path
from datetime import datetime, timedelta, timezone
from typing import Any
from urllib.parse import parse_qsl

import httpx

from adapter import jsonio

Resource = dict[str, Any]

# search parameter -> the paths of the reference it searches
REFERENCE_PARAMS: dict[str, tuple[str, ...]] = {
    "subject": ("subject",),
    "patient": ("subject", "patient", "beneficiary", "for"),
    "beneficiary": ("beneficiary",),
    "encounter": ("encounter", "context.encounter", "item.encounter"),
    "episode-of-care": ("episodeOfCare",),
    "diagnosis": ("diagnosis.condition",),
    "service-provider": ("serviceProvider",),
    "performer": ("performer.actor",),
    "practitioner": ("practitioner",),
    "payor": ("payor",),
}


def rewrite_references(value: Any, rewrites: dict[str, str]) -> Any:
    """`value` with every Reference.reference found in `rewrites` replaced."""
    if isinstance(value, dict):
        out = {k: rewrite_references(v, rewrites) for k, v in value.items()}
        if isinstance(out.get("reference"), str) and out["reference"] in rewrites:
            out["reference"] = rewrites[out["reference"]]
        return out
    if isinstance(value, list):
        return [rewrite_references(v, rewrites) for v in value]
    return value


def _values(resource: Any, path: str) -> Iterator[Any]:
    head, _, rest = path.partition(".")
    value = resource.get(head) if isinstance(resource, dict) else None
    for item in value if isinstance(value, list) else [value]:
        if item is None:
            continue
        if rest:
            yield from _values(item, rest)
        else:
            yield item


def _refs(resource: Resource, param: str) -> list[str]:
    out = []
    for path in REFERENCE_PARAMS.get(param, (param,)):
        for ref in _values(resource, path):
            if isinstance(ref, dict) and isinstance(ref.get("reference"), str):
                out.append(ref["reference"].split("/_history/")[0])
    return out


class FakeFHIR:
    def __init__(self, base: str = "http://fhir.test/fhir") -> None:
        self.base = base.rstrip("/")
        self.store: dict[tuple[str, str], list[Resource]] = {}
        self.clock = datetime(2026, 1, 1, tzinfo=timezone.utc)
        self.fail_next: list[int | Exception | httpx.Response] = []
        # Each runs once, before a transaction is applied (a biller's concurrent edit, for
        # example); one that returns a Response answers the transaction with it instead.
        self.before_transaction: list[Any] = []
        self.requests: list[httpx.Request] = []
        self._ids = itertools.count(1)

    # -- state ---------------------------------------------------------------------------------

    def _tick(self) -> str:
        self.clock += timedelta(milliseconds=10)
        return self.clock.isoformat(timespec="milliseconds").replace("+00:00", "Z")

    def put(self, resource: Resource) -> Resource:
        """Store a new version (as a client's PUT or POST would)."""
        rtype = resource["resourceType"]
        rid = str(resource.get("id") or f"f{next(self._ids)}")
        history = self.store.setdefault((rtype, rid), [])
        stored = jsonio.copy(resource)
        stored["id"] = rid
        meta = dict(stored.get("meta") or {})
        meta["versionId"] = str(len(history) + 1)
        meta["lastUpdated"] = self._tick()
        stored["meta"] = meta
        history.append(stored)
        return stored

    def load(self, *resources: Resource) -> None:
        for resource in resources:
            self.put(resource)

    def load_file(self, path: Path) -> dict[str, str]:
        """Store every resource of a fixture (a Bundle, a resource or NDJSON) as a FHIR server
        does with a transaction: resources without an id get one, and references to a fullUrl
        (`urn:uuid:`, or an absolute URL) become `Type/id`. Returns those rewrites."""
        data = path.read_bytes()
        values = [jsonio.loads(line) for line in data.splitlines() if line.strip()] if path.suffix == ".ndjson" else [jsonio.loads(data)]
        entries: list[tuple[str | None, Resource]] = []
        for value in values:
            if value.get("resourceType") == "Bundle":
                entries.extend((e.get("fullUrl"), e["resource"]) for e in value.get("entry", []) if "resource" in e)
            else:
                entries.append((None, value))
        rewrites: dict[str, str] = {}
        for full_url, resource in entries:
            resource.setdefault("id", f"f{next(self._ids)}")
            if full_url and full_url != f"{resource['resourceType']}/{resource['id']}":
                rewrites[full_url] = f"{resource['resourceType']}/{resource['id']}"
        for _, resource in entries:
            self.put(rewrite_references(resource, rewrites))
        return rewrites

    def current(self, rtype: str, rid: str) -> Resource | None:
        history = self.store.get((rtype, rid))
        return history[-1] if history else None

    def all(self, rtype: str) -> list[Resource]:
        return [h[-1] for (t, _), h in self.store.items() if t == rtype]

    def writes(self, method: str, path_prefix: str = "") -> list[httpx.Request]:
        return [r for r in self.requests if r.method == method and r.url.path.removeprefix("/fhir").strip("/").startswith(path_prefix)]

    # -- HTTP ----------------------------------------------------------------------------------

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if self.fail_next:
            failure = self.fail_next.pop(0)
            if isinstance(failure, Exception):
                raise failure
            if isinstance(failure, httpx.Response):
                return failure
            return self._outcome(failure, "injected failure")
        path = request.url.path.removeprefix("/fhir").strip("/")
        parts = path.split("/") if path else []
        body = jsonio.loads(request.content) if request.content else None
        if request.method == "GET" and parts == ["metadata"]:
            return self._json(200, {"resourceType": "CapabilityStatement", "status": "active", "fhirVersion": "4.0.1"})
        if request.method == "POST" and not parts:
            return self._bundle(body)
        if request.method == "GET" and len(parts) == 1:
            return self._json(200, self._search(parts[0], list(parse_qsl(request.url.query.decode()))))
        if request.method == "GET" and len(parts) == 2:
            found = self.current(parts[0], parts[1])
            return self._json(200, found, found) if found else self._outcome(404, "not found")
        if request.method == "PUT" and len(parts) == 2:
            status, resource = self._update(body, request.headers.get("if-match"))
            return self._json(status, resource, resource if status < 300 else None)
        if request.method == "POST" and len(parts) == 1:
            status, resource = self._create(body, request.headers.get("if-none-exist"))
            return self._json(status, resource, resource if status < 300 else None)
        return self._outcome(400, f"unsupported {request.method} {path}")

    def _json(self, status: int, body: Resource, versioned: Resource | None = None) -> httpx.Response:
        headers = {"Content-Type": "application/fhir+json"}
        if versioned and versioned.get("meta"):
            headers["ETag"] = f'W/"{versioned["meta"]["versionId"]}"'
            headers["Location"] = f"{self.base}/{versioned['resourceType']}/{versioned['id']}/_history/{versioned['meta']['versionId']}"
        return httpx.Response(status, content=jsonio.dumps(body), headers=headers)

    def _outcome(self, status: int, text: str) -> httpx.Response:
        return self._json(status, {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "processing", "diagnostics": text}]})

    def _update(self, resource: Resource, if_match: str | None) -> tuple[int, Resource]:
        current = self.current(resource["resourceType"], str(resource["id"]))
        if if_match and current and if_match.removeprefix("W/").strip('"') != current["meta"]["versionId"]:
            return 409, {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "conflict", "diagnostics": "HAPI-0989: version conflict"}]}
        stored = self.put(resource)
        return (200 if current else 201), stored

    def _create(self, resource: Resource, if_none_exist: str | None) -> tuple[int, Resource]:
        if if_none_exist:
            matches = self._matches(resource["resourceType"], parse_qsl(if_none_exist))
            if len(matches) == 1:
                return 200, matches[0]
        resource = {k: v for k, v in resource.items() if k != "id"}
        return 201, self.put(resource)

    def _matches(self, rtype: str, params: list[tuple[str, str]]) -> list[Resource]:
        out = []
        for resource in self.all(rtype):
            ok = True
            for name, value in params:
                if name.startswith("_") and name not in ("_id", "_lastUpdated", "_tag:not"):
                    continue
                if name == "_id":
                    ok = resource["id"] in value.split(",")
                elif name == "_lastUpdated":
                    ok = resource["meta"]["lastUpdated"] >= value.removeprefix("ge").replace("+00:00", "Z")
                elif name == "_tag:not":
                    system, _, code = value.partition("|")
                    ok = not any(t.get("system") == system and t.get("code") == code for t in resource["meta"].get("tag", []))
                elif name == "status":
                    ok = resource.get("status") in value.split(",")
                elif name == "code":  # a token: system|code
                    system, _, code = value.partition("|")
                    ok = any(c.get("system") == system and c.get("code") == code for c in (resource.get("code") or {}).get("coding", []))
                elif name == "identifier":
                    system, _, code = value.partition("|")
                    ok = any(i.get("system") == system and i.get("value") == code for i in resource.get("identifier", []))
                else:
                    ok = value in _refs(resource, name)
                if not ok:
                    break
            if ok:
                out.append(resource)
        return out

    def _search(self, rtype: str, params: list[tuple[str, str]]) -> Resource:
        matches = self._matches(rtype, params)
        if ("_sort", "_lastUpdated") in params:
            matches.sort(key=lambda r: r["meta"]["lastUpdated"])
        entries = [{"fullUrl": f"{self.base}/{rtype}/{r['id']}", "resource": r, "search": {"mode": "match"}} for r in matches]
        seen = {f"{r['resourceType']}/{r['id']}" for r in matches}
        included: list[Resource] = []
        for name, value in params:
            if name not in ("_include", "_revinclude", "_include:iterate"):
                continue
            source_type, _, param = value.partition(":")
            pool = matches + included if name == "_include:iterate" else matches
            if name == "_revinclude":
                targets = {f"{r['resourceType']}/{r['id']}" for r in matches}
                found = [r for r in self.all(source_type) if targets & set(_refs(r, param))]
            else:
                found = []
                for r in pool:
                    if r["resourceType"] != source_type:
                        continue
                    for ref in _refs(r, param):
                        t, _, i = ref.partition("/")
                        hit = self.current(t, i)
                        if hit:
                            found.append(hit)
            for r in found:
                key = f"{r['resourceType']}/{r['id']}"
                if key not in seen:
                    seen.add(key)
                    included.append(r)
                    entries.append({"fullUrl": f"{self.base}/{key}", "resource": r, "search": {"mode": "include"}})
        return {"resourceType": "Bundle", "type": "searchset", "total": len(matches), "entry": entries}

    def _bundle(self, bundle: Resource) -> httpx.Response:
        if bundle.get("type") == "batch":
            entries = []
            for entry in bundle.get("entry", []):
                url = entry["request"]["url"]
                rtype, _, query = url.partition("?")
                if "?" not in url and "/" in url:  # a read
                    found = self.current(*url.split("/", 1))
                    entries.append({"resource": found, "response": {"status": "200 OK"}} if found else {"response": {"status": "404 Not Found"}})
                    continue
                entries.append({"resource": self._search(rtype, parse_qsl(query)), "response": {"status": "200 OK"}})
            return self._json(200, {"resourceType": "Bundle", "type": "batch-response", "entry": entries})
        if self.before_transaction:
            answer = self.before_transaction.pop(0)(self)
            if isinstance(answer, httpx.Response):
                return answer
        # transaction: all or nothing
        snapshot = {k: list(v) for k, v in self.store.items()}
        resolved: dict[str, str] = {}
        out = []
        for entry in bundle.get("entry", []):
            request, resource = entry["request"], rewrite_references(entry["resource"], resolved)
            rtype, conditional, query = request["url"].partition("?")
            if request["method"] == "PUT" and conditional:  # conditional update: the one match, else create
                matches = self._matches(rtype, parse_qsl(query))
                if len(matches) > 1:
                    self.store = snapshot
                    return self._outcome(412, f"{len(matches)} resources match {request['url']}")
                if matches:
                    status, stored = self._update(resource | {"id": matches[0]["id"]}, None)
                else:
                    status, stored = self._create(resource, None)
            elif request["method"] == "PUT":
                status, stored = self._update(resource, request.get("ifMatch"))
            else:
                status, stored = self._create(resource, request.get("ifNoneExist"))
            if status >= 400:
                self.store = snapshot
                return self._json(status, stored)
            if entry.get("fullUrl"):
                resolved[entry["fullUrl"]] = f"{stored['resourceType']}/{stored['id']}"
            version = stored["meta"]["versionId"]
            out.append({"response": {
                "status": f"{status} {'Created' if status == 201 else 'OK'}",
                "location": f"{stored['resourceType']}/{stored['id']}/_history/{version}",
                "etag": f'W/"{version}"',
                "lastModified": stored["meta"]["lastUpdated"],
            }})
        return self._json(200, {"resourceType": "Bundle", "type": "transaction-response", "entry": out})
