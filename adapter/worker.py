"""The worker: takes jobs from the durable queue, decides, writes back.

A job is a changed resource (from a notification or the catch-up search) or a catch-up run.
Failures are sorted by what can fix them: an outage (network, timeout, 429, 5xx) or a version
conflict that keeps recurring puts the job back with backoff, for as long as the queue's
retry window allows; anything retrying cannot fix counts toward the dead letter.

Every decision, write-back, conflict, retry and dead letter is one log line with the fields
`event`, `job`, `claim`, `encounters` and `outcome` (adapter/logs.py renders them as JSON).

Replicas: any number of worker processes share one queue. A job is leased by one of them; a
job's writes happen under a lock per patient (the queue's named locks), so two replicas, or two
jobs in flight in one process, never write the same Claim at once; the leases and locks of a
replica that died are taken over within seconds (`reclaim_abandoned` every RECLAIM_EVERY); and
the catch-up timer is a lock too, so the replicas together queue one catch-up per interval.
Several jobs are in flight per process (`concurrency`); deciding and validating run in threads,
off the event loop that serves the webhook.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any


from . import jsonio
from .errors import AdapterError, TransientFHIRError, VersionConflict
from .fhir_client import FHIRClient
from .gather import encounters_touched, gather, patients_of
from .metrics import Metrics
from .notifications import Change
from .pipeline import AnnotatedClaim, RunResult, evaluate
from .queue import CATCH_UP, Job, JobQueue
from .ruleset import RuleSet
from .writeback import WriteResult, Writer, settle

__all__ = ["CATCH_UP", "CHECKPOINT", "RESOURCE", "Worker"]

log = logging.getLogger(__name__)

RESOURCE = "resource"  # job kind: look at this resource (version)
CHECKPOINT = "lastUpdated"
WATCHED = ("Encounter", "Procedure", "Claim", "Task")
DONE_RETENTION = 7 * 86400.0
# Searched from a little before the checkpoint: resources updated in the same instant as the
# last one seen are not missed; the queue's deduplication drops the repeats.
OVERLAP = timedelta(seconds=2)
# A patient's lock outlives a hung holder by no more than a job's lease.
LOCK_SECONDS = 300.0
LOCK_POLL = 0.05
# How soon a replica takes over the jobs of one that died.
RECLAIM_EVERY = 5.0
# The lock whose holder queues the next catch-up (it expires after one interval).
CATCH_UP_TIMER = "catch-up-timer"


@dataclass(slots=True)
class _Context:
    """What the job in hand has come to, for its log lines: the Encounters it touches and the
    Claim being written (set as each write starts), so a conflict, a retry or a dead letter
    names them."""

    job: int | None = None
    encounters: list[str] = field(default_factory=list)
    claim: AnnotatedClaim | None = None


# The job this task is working on; a ContextVar, so a direct `sync()` (tests, bench) has none.
_job: ContextVar[_Context | None] = ContextVar("g0129_job", default=None)


def _fields(event: str, outcome: str, job: int | None, claim: str | None, encounters: Sequence[str], **more: Any) -> dict[str, Any]:
    """The fields every worker log line carries, then `more`."""
    return {"event": event, "job": job, "claim": claim, "encounters": list(encounters), "outcome": outcome, **more}


class Worker:
    def __init__(
        self,
        queue: JobQueue,
        client: FHIRClient,
        rules: RuleSet,
        metrics: Metrics,
        *,
        dry_run: bool = False,
        review_owner: str | None = None,
        catch_up_interval: float = 60.0,
        concurrency: int = 1,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.queue = queue
        self.concurrency = concurrency
        self.client = client
        self.rules = rules
        self.metrics = metrics
        self.clock = clock
        self.catch_up_interval = catch_up_interval
        self.writer = Writer(client, on_write=queue.record_own_write, dry_run=dry_run, review_owner=review_owner)
        # Set by the service when it accepts work, so a new job starts at once.
        self.wake = asyncio.Event()

    # -- the loop ------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event, idle: float = 0.5) -> None:
        """Work until `stop` is set, `concurrency` jobs at a time, and take over the jobs of
        replicas that died."""
        tasks = [asyncio.create_task(self._work(stop, idle)) for _ in range(self.concurrency)]
        tasks.append(asyncio.create_task(self._reclaim(stop)))
        await asyncio.gather(*tasks)

    async def _reclaim(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), RECLAIM_EVERY)
            except asyncio.TimeoutError:
                pass
            try:
                reclaimed = await asyncio.to_thread(self.queue.reclaim_abandoned)
            except Exception:
                log.exception("worker: the job queue failed while looking for abandoned jobs")
                continue
            if reclaimed:
                log.warning("%d job(s) leased by a replica that stopped are due again", reclaimed, extra={"event": "reclaimed", "jobs": reclaimed})
                self.wake.set()

    async def _work(self, stop: asyncio.Event, idle: float) -> None:
        """One job at a time until `stop` is set. With nothing due, wait for `wake` (set when a
        notification is accepted) or `idle` seconds, whichever comes first: delayed retries
        fall due without anyone waking us."""
        while not stop.is_set():
            try:
                worked = await self.run_once()
            except Exception:  # the state store failed (disk full, locked): back off, go on
                log.exception("worker: the job queue failed; retrying in %.0f s", idle * 10)
                worked = False
                await asyncio.sleep(idle * 10)
            if not worked:
                self.wake.clear()
                try:
                    await asyncio.wait_for(self.wake.wait(), idle)
                except asyncio.TimeoutError:
                    pass

    async def run_once(self) -> bool:
        """Process the next due job; False when there was none."""
        job = await asyncio.to_thread(self.queue.claim_next, self.clock())
        if job is None:
            return False
        token = _job.set(_Context(job.id))
        try:
            await self._run(job)
        finally:
            _job.reset(token)
        return True

    async def _run(self, job: Job) -> None:
        try:
            await self.process(job)
        except (TransientFHIRError, VersionConflict) as exc:
            retry_after = exc.retry_after if isinstance(exc, TransientFHIRError) else None
            self.metrics.retries.labels("job").inc()
            await self._failed(job, str(exc), True, retry_after)
        except AdapterError as exc:
            await self._failed(job, f"{type(exc).__name__}: {exc}", False)
        except Exception as exc:  # a bug must not stop the worker; the job shows it
            log.exception("job %s failed unexpectedly", job.id, extra={"event": "bug", "job": job.id, "resource": _resource(job)})
            await self._failed(job, f"unexpected {type(exc).__name__}: {exc}", False)
        else:
            await asyncio.to_thread(self.queue.complete, job.id)
            self.metrics.latency.observe(max(0.0, self.clock() - job.accepted_at))

    async def _failed(self, job: Job, error: str, transient: bool, retry_after: float | None = None) -> None:
        state = await asyncio.to_thread(self.queue.retry_later, job.id, error, transient, self.clock(), retry_after)
        context = _job.get() or _Context(job.id)
        claim = context.claim.key if context.claim else None
        fields = _fields(
            "dead-letter" if state == "dead" else "retry", state, job.id, claim, context.encounters,
            resource=_resource(job), error=error, transient=transient, tries=job.tries + 1,
        )
        if retry_after is not None:
            fields["retry_after"] = retry_after
        if state == "dead":
            self.metrics.dead_letters.inc()
            log.error("job %s (%s) dead-lettered: %s", job.id, fields["resource"], error, extra=fields)
        else:
            log.warning("job %s (%s) will be retried: %s", job.id, fields["resource"], error, extra=fields)

    # -- jobs ----------------------------------------------------------------------------------

    async def process(self, job: Job) -> None:
        if job.kind == CATCH_UP:
            queued = await self.catch_up()
            # Every interval: worth a line when it found something the notifications missed.
            log.log(
                logging.INFO if queued else logging.DEBUG, "catch-up: %d change(s) queued", queued,
                extra={"event": "catch-up", "job": job.id, "queued": queued},
            )
            return
        payload: dict[str, Any] | None = jsonio.loads(job.payload) if job.payload else None
        change = Change(job.resource_type, job.resource_id, job.version_id, payload)
        # The job's lastUpdated (from the notification or the catch-up) tells a version we wrote
        # from one a reset server made anew under the same number.
        if change.resource_type == "Claim" and change.version_id and await asyncio.to_thread(
            self.queue.is_own_write, change.resource_id, change.version_id, job.last_updated or None
        ):
            self.metrics.writebacks.labels("own-echo").inc()
            log.debug("%s/_history/%s is our own write", change.resource_type, change.version_id, extra={"event": "own-echo", "job": job.id, "resource": _resource(job)})
            return
        extra = [payload] if payload and change.resource_type == "Claim" else []
        encounter_ids = await encounters_touched(self.client, change, self.rules)
        if encounter_ids:
            await self.sync(encounter_ids, extra)

    async def sync(self, encounter_ids: Sequence[str], extra: Sequence[dict[str, Any]] = ()) -> list[WriteResult]:
        """Decide these encounters and every Claim that bills them, as the server has them now,
        and write each Claim that changed once (the one decision step, `pipeline.evaluate`)."""
        carried = list(extra)
        context = _job.get() or _Context()
        context.encounters = [f"Encounter/{i}" for i in encounter_ids]
        held: dict[str, str] = {}  # lock name -> token

        async def decide() -> RunResult:
            while True:
                serial = await asyncio.to_thread(self.queue.lock_serial)
                index = await gather(self.client, encounter_ids, self.rules, carried)
                # Whose Claims these are is known once gathered: lock them (in order, so two
                # jobs never wait for each other), and gather again if another writer had them
                # since the gathering began.
                wanted = sorted(patients_of(index, encounter_ids) - held.keys())
                if not wanted or not await self._lock(wanted, held, serial):
                    break
            # A Claim carried by the notification may be older than the server's: after a
            # conflict, only what the server says now counts.
            carried.clear()
            run = await asyncio.to_thread(evaluate, index, self.rules)
            for error in run.errors:
                log.warning("input error: %s", error, extra={"event": "input-error", "job": context.job, "encounters": context.encounters})
            return run

        def current_of(claim: AnnotatedClaim) -> dict[str, Any] | None:
            context.claim = claim  # the Claim being written, should a conflict or failure follow
            return claim.original

        def conflict() -> None:
            self.metrics.writebacks.labels("conflict").inc()
            claim = context.claim
            encounters = [case.encounter for case in claim.cases] if claim else context.encounters
            log.warning(
                "%s changed on the server while we wrote it: reading it again and deciding again", claim.key if claim else "a Claim",
                extra=_fields("conflict", "re-deciding", context.job, claim.key if claim else None, encounters),
            )

        try:
            results = await settle(self.writer, decide, current_of, on_conflict=conflict)
        finally:
            for name, token in held.items():
                await asyncio.to_thread(self.queue.unlock, name, token)
        for result in results:
            self.metrics.writebacks.labels(result.result).inc()
            encounters = [decision.encounter for decision in result.decisions]
            for decision in result.decisions:
                self.metrics.decisions.labels(decision.outcome).inc()
                log.info(
                    "%s on %s: %s (%s)", decision.encounter, result.claim, decision.outcome, ", ".join(decision.rule_ids) or "no finding",
                    extra=_fields("decision", decision.outcome, context.job, result.claim, [decision.encounter], rules=list(decision.rule_ids), ruleset=decision.ruleset_version),
                )
            fields = _fields("write-back", result.result, context.job, result.claim, encounters, version=result.version)
            if result.result == "dry-run":
                # What would be written, as a JSON Patch (RFC 6902) from the server's Claim.
                log.info("%s: dry run, not written (%d change(s))", result.claim, len(result.patch), extra=fields | {"patch": result.patch})
            else:
                version = f" (version {result.version})" if result.version else ""
                log.info("%s: %s%s", result.claim, result.result, version, extra=fields)
        return results

    async def _lock(self, names: Sequence[str], held: dict[str, str], serial: int) -> bool:
        """Take these locks, waiting for each as long as it takes; True if any was held by
        someone else after `serial` (`JobQueue.lock_serial`, read before gathering): what was
        gathered may be stale. A lock found free may have been held and released while we
        gathered: a writer's write then fell between our read and our lock."""
        waited = False
        for name in names:
            while (token := await asyncio.to_thread(self.queue.try_lock, name, LOCK_SECONDS)) is None:
                waited = True
                await asyncio.sleep(LOCK_POLL)
            held[name] = token
        return waited or await asyncio.to_thread(self.queue.released_since, names, serial)

    async def catch_up(self) -> int:
        """Queue every watched resource changed since the checkpoint; returns how many were new."""
        since = await asyncio.to_thread(self.queue.get_checkpoint, CHECKPOINT)
        if since is None:
            start = datetime.fromtimestamp(self.clock(), timezone.utc) - timedelta(seconds=self.catch_up_interval)
        else:
            start = datetime.fromisoformat(since) - OVERLAP
        newest = since
        queued = 0
        for rtype in WATCHED:
            params = [("_lastUpdated", f"ge{start.isoformat(timespec='milliseconds')}"), ("_sort", "_lastUpdated"), ("_count", "100")]
            for resource in await self.client.search(rtype, params):
                meta = resource.get("meta") or {}
                version = str(meta.get("versionId") or "")
                updated = meta.get("lastUpdated")
                if isinstance(updated, str) and (newest is None or _instant(updated) > _instant(newest)):
                    newest = updated
                if await asyncio.to_thread(
                    self.queue.enqueue, RESOURCE, rtype, str(resource["id"]), version, jsonio.dumps(resource), "catch-up"
                ):
                    queued += 1
                else:
                    self.metrics.deduplicated.inc()
        if newest is not None and newest != since:
            await asyncio.to_thread(self.queue.set_checkpoint, CHECKPOINT, newest)
        elif since is None:
            await asyncio.to_thread(self.queue.set_checkpoint, CHECKPOINT, start.isoformat())
        return queued

    async def tick_catch_up(self, stop: asyncio.Event) -> None:
        """Queue a catch-up run every `catch_up_interval` seconds, starting now, unless another
        replica did: the one that takes the timer lock (held for an interval, taken over at
        once from a replica that died) queues it. Each replica looks 4 times an interval, so
        the runs are 1 to 1.25 intervals apart."""
        while not stop.is_set():
            try:
                if await asyncio.to_thread(self.queue.try_lock, CATCH_UP_TIMER, self.catch_up_interval):
                    await asyncio.to_thread(self.queue.enqueue, CATCH_UP, "Subscription", CATCH_UP, "", None, "timer")
                    # Done jobs only serve deduplication; a week covers any server's redelivery.
                    await asyncio.to_thread(self.queue.purge, "done", self.clock() - DONE_RETENTION)
                    self.wake.set()
            except Exception:
                log.exception("catch-up timer: the job queue failed")
            try:
                await asyncio.wait_for(stop.wait(), self.catch_up_interval / 4)
            except asyncio.TimeoutError:
                pass


def _resource(job: Job) -> str:
    """The job's resource as a reference (version-specific when it has one)."""
    reference = f"{job.resource_type}/{job.resource_id}"
    return f"{reference}/_history/{job.version_id}" if job.version_id else reference


def _instant(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


