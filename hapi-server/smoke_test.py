#!/usr/bin/env python3
"""Smoke test of the HAPI test server (stdlib only).

Needs a running server (scripts/fhir-server up). Checks: R4 rest-hook Subscription with payload
and channel.header, a no-payload Subscription, If-Match conflict, conditional create, a
transaction, and searches with _lastUpdated, _include/_revinclude and _tag:not.

    python3 hapi-server/smoke_test.py [--base http://127.0.0.1:8080/fhir]
"""
import argparse
import http.server
import json
import socket
import sys
import threading
import time
import urllib.error
import urllib.request

RECEIVED = []  # (method, path, headers dict, body bytes, monotonic time)
LOCK = threading.Lock()


class Hook(http.server.BaseHTTPRequestHandler):
    def _handle(self):
        n = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(n) if n else b""
        with LOCK:
            RECEIVED.append((self.command, self.path, dict(self.headers.items()), body, time.monotonic()))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_POST = do_PUT = do_DELETE = _handle

    def log_message(self, fmt, *args):
        sys.stderr.write("  hook: " + (fmt % args) + "\n")


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def req(base, method, path, body=None, headers=None):
    data = json.dumps(body).encode() if body is not None else None
    h = {"Accept": "application/fhir+json"}
    if data is not None:
        h["Content-Type"] = "application/fhir+json"
    h.update(headers or {})
    r = urllib.request.Request(base + path, data=data, method=method, headers=h)
    try:
        with urllib.request.urlopen(r, timeout=30) as resp:
            raw = resp.read()
            return resp.status, dict(resp.headers.items()), (json.loads(raw) if raw else None)
    except urllib.error.HTTPError as e:
        raw = e.read()
        return e.code, dict(e.headers.items()), (json.loads(raw) if raw else None)


def wait_for(pred, timeout, step=0.1):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = pred()
        if v:
            return v
        time.sleep(step)
    return None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", default="http://127.0.0.1:8080/fhir")
    base = ap.parse_args().base.rstrip("/")
    failures = []

    def check(cond, msg):
        print(("ok   " if cond else "FAIL ") + msg)
        if not cond:
            failures.append(msg)

    port = free_port()
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", port), Hook)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    hook = f"http://127.0.0.1:{port}"

    # --- Subscription with payload + header
    sub = {
        "resourceType": "Subscription", "status": "requested", "reason": "smoke test",
        "criteria": "Claim?_tag:not=https://example.org/tags|annotated",
        "channel": {"type": "rest-hook", "endpoint": hook + "/notify",
                    "payload": "application/fhir+json", "header": ["Authorization: Bearer xyz"]},
    }
    t0 = time.monotonic()
    st, _, s1 = req(base, "POST", "/Subscription", sub)
    check(st == 201, f"create payload Subscription -> {st}")
    sid = s1["id"]
    active = wait_for(lambda: req(base, "GET", f"/Subscription/{sid}")[2].get("status") == "active", 120, 0.2)
    check(bool(active), f"Subscription/{sid} active after {time.monotonic() - t0:.2f}s")

    # --- no-payload Subscription
    sub2 = {"resourceType": "Subscription", "status": "requested", "reason": "smoke test no payload",
            "criteria": "Claim?status=draft",
            "channel": {"type": "rest-hook", "endpoint": hook + "/bare"}}
    t0 = time.monotonic()
    st, _, s2 = req(base, "POST", "/Subscription", sub2)
    sid2 = s2["id"]
    active2 = wait_for(lambda: req(base, "GET", f"/Subscription/{sid2}")[2].get("status") == "active", 120, 0.2)
    check(bool(active2), f"no-payload Subscription/{sid2} active after {time.monotonic() - t0:.2f}s")

    # --- a Patient, then a Claim that references it
    st, _, pat = req(base, "POST", "/Patient", {"resourceType": "Patient", "name": [{"family": "Smoke"}]})
    pid = pat["id"]
    claim = {"resourceType": "Claim", "status": "draft", "use": "claim",
             "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/claim-type", "code": "professional"}]},
             "patient": {"reference": f"Patient/{pid}"}, "created": "2024-01-01",
             "provider": {"display": "Dr Smoke"}, "priority": {"coding": [{"code": "normal"}]},
             "insurance": [{"sequence": 1, "focal": True, "coverage": {"display": "Cov"}}]}
    t0 = time.monotonic()
    st, hdrs, c = req(base, "POST", "/Claim", claim)
    check(st == 201, f"create Claim -> {st}, ETag {hdrs.get('ETag')}")
    cid = c["id"]

    def got(method, path_prefix):
        with LOCK:
            return [r for r in RECEIVED if r[0] == method and r[1].startswith(path_prefix)]

    hit = wait_for(lambda: got("PUT", f"/notify/Claim/{cid}"), 30)
    if hit:
        m, path, h, body, when = hit[0]
        print(f"     delivered {m} {path} after {when - t0:.2f}s; headers: "
              + ", ".join(f"{k}: {v}" for k, v in h.items()))
        hl = {k.lower(): v for k, v in h.items()}
        check(hl.get("authorization") == "Bearer xyz", "Authorization header passed")
        res = json.loads(body)
        check(res.get("resourceType") == "Claim" and res.get("id") == cid, "payload is the Claim")
    else:
        check(False, f"PUT /notify/Claim/{cid} received")
    bare = wait_for(lambda: got("POST", "/bare"), 30)
    if bare:
        m, path, h, body, when = bare[0]
        print(f"     delivered {m} {path} after {when - t0:.2f}s, body {len(body)} bytes, "
              f"Content-Type {h.get('Content-Type')}")
        check(len(body) == 0, "no-payload notification is a bodyless POST")
    else:
        check(False, "POST /bare received")

    # --- tagged update must NOT notify the _tag:not subscription
    with LOCK:
        RECEIVED.clear()
    st, _, c = req(base, "GET", f"/Claim/{cid}")
    c.setdefault("meta", {})["tag"] = [{"system": "https://example.org/tags", "code": "annotated"}]
    st, hdrs, c2 = req(base, "PUT", f"/Claim/{cid}", c, {"If-Match": 'W/"1"'})
    check(st == 200 and hdrs.get("ETag") == 'W/"2"', f"PUT with matching If-Match -> {st}, ETag {hdrs.get('ETag')}")
    time.sleep(3)
    check(not got("PUT", "/notify/"), "tagged update not delivered to the _tag:not subscription")
    check(bool(got("POST", "/bare")), "tagged update still delivered to the no-payload subscription")

    # --- If-Match mismatch
    st, _, oo = req(base, "PUT", f"/Claim/{cid}", c2, {"If-Match": 'W/"1"'})
    check(st in (409, 412), f"PUT with stale If-Match -> {st}")

    # --- conditional create
    ident = {"system": "https://example.org/claims", "value": "smoke-%d" % time.time_ns()}
    cc = dict(claim, identifier=[ident])
    q = {"If-None-Exist": f"identifier={ident['system']}|{ident['value']}"}
    st1, _, r1 = req(base, "POST", "/Claim", cc, q)
    st2, _, r2 = req(base, "POST", "/Claim", cc, q)
    check(st1 == 201 and st2 == 200 and r1["id"] == r2["id"], f"If-None-Exist: {st1} then {st2}, same id")

    # --- transaction
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": "urn:uuid:11111111-1111-1111-1111-111111111111",
         "resource": {"resourceType": "Patient", "name": [{"family": "Tx"}]},
         "request": {"method": "POST", "url": "Patient"}},
        {"resource": dict(claim, patient={"reference": "urn:uuid:11111111-1111-1111-1111-111111111111"}),
         "request": {"method": "POST", "url": "Claim"}}]}
    st, _, tr = req(base, "POST", "", bundle)
    check(st == 200 and tr.get("type") == "transaction-response", f"transaction -> {st}")

    # --- searches
    st, _, b = req(base, "GET", "/Claim?_lastUpdated=gt2000-01-01&_include=Claim:patient&_count=50")
    kinds = {e["resource"]["resourceType"] for e in b.get("entry", [])}
    check(st == 200 and kinds >= {"Claim", "Patient"}, f"_lastUpdated + _include -> {st} {sorted(kinds)}")
    st, _, b = req(base, "GET", f"/Patient?_id={pid}&_revinclude=Claim:patient")
    kinds = {e["resource"]["resourceType"] for e in b.get("entry", [])}
    check(st == 200 and kinds >= {"Claim", "Patient"}, f"_revinclude -> {st} {sorted(kinds)}")
    st, _, b = req(base, "GET", "/Claim?_tag:not=https://example.org/tags|annotated&_count=100")
    ids = {e["resource"]["id"] for e in b.get("entry", [])}
    check(st == 200 and cid not in ids and len(ids) > 0, f"_tag:not (raw '|') -> {st}, tagged claim excluded")

    # leave no Subscription behind that points at this (soon closed) port
    for s_id in (sid, sid2):
        st, _, _ = req(base, "DELETE", f"/Subscription/{s_id}")
        check(st in (200, 204), f"delete Subscription/{s_id} -> {st}")
    time.sleep(2)  # let deliveries already queued reach us before the hook closes
    srv.shutdown()
    print(f"{len(failures)} failed" if failures else "all checks passed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
