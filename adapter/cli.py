"""The `g0129` command.

    g0129 replay PATH... [--out DIR]     decide, write decisions/claims/errors NDJSON
          [--fhir-base URL [--dry-run]]  ... and write the annotated Claims to a FHIR server
          [--bulk-export URL [--since INSTANT] [--group ID]]  ... of a FHIR Bulk Data export
    g0129 evaluate PATH...               print decisions as NDJSON, write nothing
    g0129 rules [--json]                 the rule catalog, with sources and status
    g0129 rules check [DIR]              every problem of a rule table directory
    g0129 rules diff DIR                 what a site's tables change against the bundled ones
    g0129 serve [--host] [--port]        the sidecar service (settings from G0129_* variables)
    g0129 subscribe --endpoint URL       create/update the rest-hook Subscriptions
    g0129 queue list|retry|purge         look at and act on the durable job queue
    g0129 --version                      the package and ruleset versions

The global options (`--mappings DIR`, `--no-progress`) go before or after the command.
Everything a command can check about its arguments is checked before it reads any input.

Exit codes: 0 every input processed, 1 some input invalid (the rest still processed) or a write
failed, 2 usage or rule-table error, 130 interrupted.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import tempfile
import textwrap
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from importlib import metadata
from pathlib import Path
from types import TracebackType
from typing import IO, TYPE_CHECKING, Any

import orjson

from . import jsonio
from . import replay as replay_
from .errors import AdapterError, FHIRError, InputError, MappingError, OutputError, UsageError
from .ingest import DEFAULT_MAX_FILE_BYTES, INPUT_SUFFIXES, Index, iter_input_files
from .pipeline import RunResult
from .ruleset import DEFAULT_MAPPINGS_DIR, RuleSet, check_tables, diff_tables, load_ruleset
from .settings import Settings
from .review import review_csv
from .sinks import DirectorySink, error_record
from .vocabulary import decision_resource_types

if TYPE_CHECKING:
    from .bulk import Export

__all__ = ["main"]

EXIT_OK, EXIT_INVALID_INPUT, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
PACKAGE = "g0129-adapter"
LOOKED_FOR = ", ".join(f"*{suffix}" for suffix in INPUT_SUFFIXES)


class _Context:
    """What a command may need beyond its arguments, made when first asked for.

    The rule tables are loaded only by the commands that use them, so `rules check` and
    `rules diff` can look at tables that do not load, and `queue` works whatever they say.
    """

    def __init__(self, args: argparse.Namespace) -> None:
        self._mappings: Path | None = args.mappings
        self._rules: RuleSet | None = None

    def mappings_dir(self) -> Path:
        """The rule tables in use: --mappings, else G0129_MAPPINGS_DIR, else the bundled ones."""
        return self._mappings or Settings.from_env().mappings_dir or DEFAULT_MAPPINGS_DIR

    def rules(self) -> RuleSet:
        if self._rules is None:
            self._rules = load_ruleset(self.mappings_dir())
        return self._rules


def _is_terminal(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError, OSError):  # no isatty, or a closed stream
        return False


class _Progress:
    """One progress bar at a time on stderr (reading, deciding), cleared when done.

    Only on a terminal: never a byte of it in a pipe or a file, where it would be noise in a log.
    """

    def __init__(self, stream: IO[str], enabled: bool = True) -> None:
        self.stream = stream
        self.enabled = enabled and _is_terminal(stream)
        self._bar: Any = None  # tqdm | None
        self._stage = ""

    def start(self, stage: str, total: int, unit: str, in_bytes: bool = False) -> None:
        self.close()
        self._stage = stage
        if self.enabled:
            # Imported here: a run with no terminal to draw on (a job, a pipe) never pays for it.
            # tqdm ships no type information (typeshed has `types-tqdm`, which we do not
            # require); the second code keeps mypy quiet where those stubs happen to be installed.
            from tqdm import tqdm  # type: ignore[import-untyped, unused-ignore]

            self._bar = tqdm(
                total=total, desc=stage, unit=unit, file=self.stream, leave=False, dynamic_ncols=True,
                unit_scale=in_bytes, unit_divisor=1024 if in_bytes else 1000,
            )

    def advance(self, n: int) -> None:
        """`ingest.load_paths`'s `on_bytes`: n more bytes read."""
        if self._bar is not None:
            self._bar.update(n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        self._stage = ""

    def __enter__(self) -> _Progress:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def _input_files(paths: list[Path], stderr: IO[str]) -> list[Path]:
    """The files to read, or a UsageError before any is read: a path that does not exist, or
    nothing to read at all. A directory without input beside others that have some is a warning."""
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise UsageError(f"no such file or directory: {', '.join(missing)}")
    files: list[Path] = []
    empty: list[str] = []
    for path in paths:
        found = list(iter_input_files([path]))
        if not found:
            empty.append(str(path))
        files.extend(found)
    if not files:
        raise UsageError(f"no FHIR input found in {', '.join(empty)} (looked for {LOOKED_FOR})")
    for name in empty:
        stderr.write(f"g0129: warning: no FHIR input found in {name} (looked for {LOOKED_FOR})\n")
    return files


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0  # reported as an input error when it is read


@dataclasses.dataclass
class _Run:
    """A streamed replay's totals, for the summary."""

    files: int = 0
    resources: int = 0
    encounters_seen: int = 0
    decided: int = 0
    claims: int = 0
    errors: int = 0
    outcomes: Counter[str] = dataclasses.field(default_factory=Counter)
    findings: Counter[tuple[str, str]] = dataclasses.field(default_factory=Counter)


def _stream(
    args: argparse.Namespace,
    files: list[Path],
    rules: RuleSet,
    scratch: Path,
    progress: _Progress,
    write: Callable[[str, bytes], None],
    stderr: IO[str],
    on_decided: Callable[[Index, RunResult], None] | None = None,
    may_be_empty: bool = False,
    errors: Sequence[InputError] = (),
) -> _Run:
    """Route the inputs into partitions under `scratch`, decide them, and hand each output
    block to `write(name, ndjson_bytes)` (name: decisions, claims, errors) as it is decided.
    `may_be_empty`: no resource at all is no usage error (an incremental export with nothing new);
    `errors`: input errors met before (a Bulk export's error files), reported first."""
    progress.start("reading", sum(_size(f) for f in files), "B", in_bytes=True)
    workers = 1 if on_decided is not None else args.workers
    plan = replay_.plan(files, scratch, args.shard, args.max_file_bytes, progress.advance, workers)
    totals = _Run(files=plan.files, resources=len(plan.shared))
    _errors([*errors, *plan.errors], totals, write, stderr)
    if not any(plan.spill.sizes) and not len(plan.shared) and not plan.errors and not may_be_empty:
        names = ", ".join(str(p) for p in args.paths)
        raise UsageError(f"no FHIR resources in {names} ({plan.files} file(s) read, each empty or an empty Bundle)")
    progress.start("deciding", plan.encounters, "encounter")
    for part in replay_.run(plan, rules, args.validation, workers, on_decided):
        write("decisions", part.decisions)
        write("claims", part.claims)
        write("review", part.review)
        _errors(part.errors, totals, write, stderr)
        totals.resources += part.resources
        totals.encounters_seen += part.encounters_seen
        totals.decided += sum(part.outcomes.values())
        totals.claims += part.claims_written
        totals.outcomes.update(part.outcomes)
        totals.findings.update(part.findings)
        progress.advance(part.encounters_seen)
    return totals


def _errors(errors: list[InputError], totals: _Run, write: Callable[[str, bytes], None], stderr: IO[str]) -> None:
    totals.errors += len(errors)
    write("errors", b"".join(jsonio.dumps_line(error_record(e)) for e in errors))
    for error in errors:
        stderr.write(f"error: {error}\n")


def _check_out(out: Path) -> None:
    """Refuse an --out that is no directory, before any input is read."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: exists and is not a directory")
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise UsageError(f"--out {out}: cannot be created ({parent} is not a directory)")
            break


def _make_out(out: Path) -> None:
    """Create --out and make sure a file can be written in it, before any input is read."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as exc:
        raise UsageError(f"--out {out}: cannot write there ({exc.strerror or exc})") from None


def _check_base_url(url: str, option: str = "--fhir-base") -> None:
    if not url.startswith(("http://", "https://")):
        raise UsageError(f"{option} must be an http(s) URL, got {url!r}")


def _check_bulk_args(args: argparse.Namespace) -> None:
    if args.bulk_export is None:
        for option, value in (("--since", args.since), ("--group", args.group)):
            if value is not None:
                raise UsageError(f"{option} needs --bulk-export: it chooses what the export holds")
        if not args.paths:
            raise UsageError("say what to replay: PATH... (files or directories), or --bulk-export URL")
        return
    _check_base_url(args.bulk_export, "--bulk-export")
    from .bulk import check_group, check_instant  # the HTTP stack, for this command only

    if args.since is not None:
        check_instant(args.since)
    if args.group is not None:
        check_group(args.group)


@contextmanager
def _bulk_files(args: argparse.Namespace, rules: RuleSet, stdout: IO[str], scratch: Path) -> Iterator[Export | None]:
    """With --bulk-export: the export downloaded into `scratch` (the run's, inside --out: the
    disk chosen for the output has room for it), removed at the end. Auth as every FHIR call: G0129_*."""
    if args.bulk_export is None:
        yield None
        return
    import asyncio  # (an event loop, like the HTTP stack, only for the commands that talk to a server)

    from .bulk import bulk_export
    from .fhir_client import FHIRClient

    settings = dataclasses.replace(Settings.from_env(), fhir_base_url=args.bulk_export.rstrip("/"))

    async def run(directory: Path) -> Export:
        async with FHIRClient.from_settings(settings) as client:
            return await bulk_export(
                client, directory, decision_resource_types(rules), since=args.since, group=args.group,
                poll=settings.http_retry_policy(), max_wait=settings.bulk_export_max_wait,
            )

    with tempfile.TemporaryDirectory(prefix="bulk-", dir=scratch) as directory:
        export = asyncio.run(run(Path(directory)))
        stdout.write(
            f"g0129 replay: bulk export of {args.bulk_export}: {len(export.files)} file(s), "
            f"as of {export.transaction_time} (the --since of the next export)\n"
        )
        yield export


def _replay(args: argparse.Namespace, ctx: _Context, stdout: IO[str], stderr: IO[str]) -> int:
    if args.dry_run and not args.fhir_base:
        raise UsageError("--dry-run needs --fhir-base: it shows what would be written to that server")
    if args.fhir_base:
        _check_base_url(args.fhir_base)
    _check_bulk_args(args)
    _check_out(args.out)
    files = _input_files(args.paths, stderr) if args.paths else []
    rules = ctx.rules()
    _make_out(args.out)
    # Held from the start: a second run into the same --out is refused before any work, and a
    # run that fails or is interrupted leaves the previous outputs as they were.
    pushed: list[bool] = []
    on_decided = None
    if args.fhir_base:
        import asyncio

        def on_decided(index: Index, result: RunResult) -> None:
            pushed.append(asyncio.run(_push(args, index, result, rules, stdout, stderr)))
    try:
        with DirectorySink(args.out) as sink, _bulk_files(args, rules, stdout, sink.scratch) as export:
            sink.write_block("review", review_csv([], header=True))
            with _Progress(stderr, args.progress) as progress:
                if export is None:
                    totals = _stream(args, files, rules, sink.scratch, progress, sink.write_block, stderr, on_decided)
                else:
                    totals = _stream(
                        args, [*files, *export.files], rules, sink.scratch, progress, sink.write_block, stderr, on_decided,
                        may_be_empty=True, errors=export.errors,
                    )
    except BrokenPipeError:
        raise  # the reader of stdout or stderr went away: no file of the run's (see main)
    except OSError as exc:
        # Inputs that cannot be read are input errors, reported where they are read: what is
        # left is the run's own files (outputs, partitions, a downloaded export) under --out.
        raise OutputError(
            f"--out {args.out}: the run's files could not be written ({exc}); the outputs there are as they were"
        ) from None
    by_rule = totals.findings
    stdout.write(f"g0129 replay: {totals.files} file(s), {totals.resources} resource(s) -> {args.out}/\n")
    stdout.write(
        f"  encounters: {totals.encounters_seen} seen, {totals.decided} in scope and decided "
        f"(an OT session or a PHP/IOP program), {max(totals.encounters_seen - totals.decided, 0)} out of scope\n"
    )
    stdout.write(f"  claims: {totals.claims} annotated\n")
    stdout.write("  outcomes: " + ", ".join(f"{o} {totals.outcomes.get(o, 0)}" for o in ("bill", "review", "do-not-bill")) + "\n")
    if by_rule:
        stdout.write("  findings by rule:\n")
        for info in rules.rules:
            counts = [f"{sev} {by_rule[(info.id, sev)]}" for sev in ("error", "review", "warning", "info") if by_rule[(info.id, sev)]]
            if counts:
                stdout.write(f"    {info.id:<15} {', '.join(counts)}\n")
    if totals.errors:
        stdout.write(f"  invalid input: {totals.errors} (see {args.out}/errors.ndjson)\n")
    return EXIT_INVALID_INPUT if totals.errors or any(pushed) else EXIT_OK


async def _push(args: argparse.Namespace, index: Index, run: RunResult, rules: RuleSet, stdout: IO[str], stderr: IO[str]) -> bool:
    from .fhir_client import FHIRClient
    from .writeback import Writer, push_claims

    settings = dataclasses.replace(Settings.from_env(), fhir_base_url=args.fhir_base.rstrip("/"))
    async with FHIRClient.from_settings(settings) as client:
        results = await push_claims(Writer(client, dry_run=args.dry_run, review_owner=settings.review_owner), index, run, rules)
    failed = False
    for claim, outcome in results:
        if isinstance(outcome, FHIRError):
            failed = True
            stderr.write(f"error: {claim.key}: not written: {outcome}\n")
            continue
        for written in outcome:
            if written.result == "dry-run":
                stdout.write(written.diff or f"{written.claim}: no change\n")
            else:
                version = f" (version {written.version})" if written.version else ""
                stdout.write(f"{written.claim}: {written.result}{version}\n")
    return failed


def _evaluate(args: argparse.Namespace, ctx: _Context, stdout: IO[str], stderr: IO[str]) -> int:
    files = _input_files(args.paths, stderr)
    rules = ctx.rules()
    args.validation, args.shard, args.workers = "none", replay_.Shard(), replay_.workers_default()

    def write(name: str, block: bytes) -> None:
        if name == "decisions":
            stdout.write(block.decode())

    with tempfile.TemporaryDirectory(prefix="g0129-") as scratch, _Progress(stderr, args.progress) as progress:
        totals = _stream(args, files, rules, Path(scratch), progress, write, stderr)
    return EXIT_INVALID_INPUT if totals.errors else EXIT_OK


def _rules(args: argparse.Namespace, ctx: _Context, stdout: IO[str], stderr: IO[str]) -> int:
    rules = ctx.rules()
    if args.json:
        catalog = [
            {"id": r.id, "checks": r.checks, "when_violated": r.when_violated, "source": r.source, "status": r.status}
            for r in rules.rules
        ]
        stdout.write(orjson.dumps({"ruleset_version": rules.version, "rules": catalog}, option=orjson.OPT_INDENT_2).decode() + "\n")
        return EXIT_OK
    stdout.write(f"G0129 ruleset {rules.version} ({rules.source_dir})\n\n")
    for r in rules.rules:
        stdout.write(f"{r.id}  [{r.status}]\n  checks:        {r.checks}\n  when violated: {r.when_violated}\n  source:        {r.source}\n\n")
    return EXIT_OK


def _table_problems(directory: Path, stderr: IO[str]) -> bool:
    """Print every problem of the tables in `directory` to stderr; True when there were any."""
    problems = check_tables(directory)
    for problem in problems:
        stderr.write(f"{problem}\n")
    return bool(problems)


def _rules_check(args: argparse.Namespace, ctx: _Context, stdout: IO[str], stderr: IO[str]) -> int:
    directory = args.dir or ctx.mappings_dir()
    if _table_problems(directory, stderr):
        return EXIT_USAGE
    stdout.write(f"{directory}: the rule tables are valid (ruleset {load_ruleset(directory).version})\n")
    return EXIT_OK


def _rules_diff(args: argparse.Namespace, ctx: _Context, stdout: IO[str], stderr: IO[str]) -> int:
    if _table_problems(args.dir, stderr):
        return EXIT_USAGE
    changes = diff_tables(args.dir)
    stdout.write("".join(f"{line}\n" for line in changes) or "no change against the bundled tables\n")
    return EXIT_OK


def _version(ctx: _Context, stdout: IO[str], stderr: IO[str]) -> int:
    try:
        package = metadata.version(PACKAGE)
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        package = "(not installed)"
    try:
        ruleset = f"ruleset {ctx.rules().version}"
    except MappingError as exc:
        stdout.write(f"g0129 {package} (ruleset not loaded)\n")
        stderr.write(f"g0129: {exc}\n")
        return EXIT_USAGE
    stdout.write(f"g0129 {package} ({ruleset})\n")
    return EXIT_OK


def _positive(text: str) -> int:
    """An argparse type: a whole number, at least 1."""
    try:
        number = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {number}")
    return number


def _serve(args: argparse.Namespace, ctx: _Context, stdout: IO[str], stderr: IO[str]) -> int:
    # Imported here: the web stack is not needed (nor paid for) by replay and evaluate.
    import uvicorn

    from .logs import configure
    from .service import create_app

    settings = Settings.from_env()
    level = args.log_level or settings.log_level
    if args.workers > 1 and args.dry_run:
        raise UsageError("--dry-run runs in one process: leave --workers at 1")
    # Once, before anything logs; uvicorn gets no logging config of its own (log_config=None),
    # so its lines, the access log included, go through the same handler and filter.
    configure(settings.log_format, level, stderr)
    rules = ctx.rules()
    logging.getLogger("adapter").info(
        "g0129 serve on %s:%d, ruleset %s, %d process(es)%s", args.host, args.port, rules.version, args.workers,
        ", dry run: nothing is written" if args.dry_run else "",
        extra={"event": "start", "ruleset": rules.version, "dry_run": args.dry_run, "fhir_base": settings.fhir_base_url, "workers": args.workers},
    )
    if args.workers > 1:
        # uvicorn starts the processes afresh (spawn) and each builds its app from the
        # environment: hand them what the command line said.
        os.environ["G0129_MAPPINGS_DIR"] = str(ctx.mappings_dir())
        os.environ["G0129_LOG_LEVEL"] = level
        uvicorn.run(
            "adapter.service:app_from_env", factory=True, workers=args.workers,
            host=args.host, port=args.port, log_level=level, log_config=None,
        )
        return EXIT_OK
    app = create_app(settings, rules=rules, dry_run=args.dry_run)
    uvicorn.run(app, host=args.host, port=args.port, log_level=level, log_config=None)
    return EXIT_OK


def _subscribe(args: argparse.Namespace, ctx: _Context, stdout: IO[str], stderr: IO[str]) -> int:
    import asyncio

    from .fhir_client import FHIRClient
    from .subscribe import SubscriptionResult, subscribe

    settings = Settings.from_env()
    if not settings.webhook_token:
        raise UsageError("G0129_WEBHOOK_TOKEN must be set: the Subscriptions carry it to the webhook")
    if args.fhir_base:
        settings = dataclasses.replace(settings, fhir_base_url=args.fhir_base.rstrip("/"))

    async def run() -> list[SubscriptionResult]:
        async with FHIRClient.from_settings(settings) as client:
            return await subscribe(client, args.endpoint, settings.webhook_token or "", payload=args.payload, wait=args.wait)

    results = asyncio.run(run())
    for r in results:
        stdout.write(f"Subscription/{r.id}: {r.action}, {r.status}  ({r.criteria})\n")
    if args.wait and any(r.status != "active" for r in results):
        stderr.write(f"g0129: not every Subscription became active within {args.wait:g} s\n")
        return EXIT_INVALID_INPUT
    return EXIT_OK


def _queue(args: argparse.Namespace, ctx: _Context, stdout: IO[str], stderr: IO[str]) -> int:
    from .queue import JobQueue

    with JobQueue.from_settings(Settings.from_env()) as queue:
        if args.action == "list":
            for job in queue.list(args.state):
                stdout.write(orjson.dumps({
                    "id": job.id, "state": job.state, "kind": job.kind,
                    "resource": f"{job.resource_type}/{job.resource_id}" + (f"/_history/{job.version_id}" if job.version_id else ""),
                    "source": job.source, "attempts": job.attempts, "last_error": job.last_error,
                }).decode() + "\n")
            counts = queue.counts()
            stderr.write(", ".join(f"{state} {n}" for state, n in counts.items()) + "\n")
        elif args.action == "retry":
            if args.job is None and not args.all:
                raise UsageError("say which job to retry (its id) or --all dead letters")
            stdout.write(f"{queue.retry(args.job)} job(s) back in the queue\n")
        else:
            stdout.write(f"{queue.purge(args.state)} {args.state} job(s) purged\n")
    return EXIT_OK


def _settings_variables() -> list[str]:
    """Every G0129_* variable, named after the Settings field it sets (as settings.py reads them)."""
    return [f"G0129_{f.name.upper()}" for f in dataclasses.fields(Settings)]


def _epilog() -> str:
    variables = textwrap.fill(", ".join(_settings_variables()), width=78, initial_indent="  ", subsequent_indent="  ")
    return (
        "exit codes:\n"
        "  0    every input processed\n"
        "  1    some input was invalid (the rest is still processed and written),\n"
        "       or a write to the FHIR server failed\n"
        "  2    usage error (bad arguments, a missing path, no input) or rule tables\n"
        "       that cannot be used\n"
        "  130  interrupted\n"
        "\n"
        'settings, read from the environment (see "Settings" in the README):\n'
        f"{variables}\n"
    )


def _global_options(in_subcommand: bool) -> argparse.ArgumentParser:
    """The options every command takes, before or after its name. A subcommand's copy defaults
    to SUPPRESS, so it leaves what was given before the subcommand alone."""
    options = argparse.ArgumentParser(add_help=False)
    options.add_argument(
        "--mappings", type=Path, metavar="DIR", default=argparse.SUPPRESS if in_subcommand else None,
        help="rule tables directory, e.g. a site's copy (default: G0129_MAPPINGS_DIR, else the bundled tables)",
    )
    options.add_argument(
        "--no-progress", dest="progress", action="store_false", default=argparse.SUPPRESS if in_subcommand else True,
        help="no progress bars (they are only ever shown on a terminal, on stderr)",
    )
    return options


def _byte_count(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    try:
        number = int(text[:-1]) * units[text[-1].lower()] if text[-1:].lower() in units else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (bytes, or with k, m or g)") from None
    if number <= 0:
        raise argparse.ArgumentTypeError("the size must be positive")
    return number


def _shard(text: str) -> replay_.Shard:
    index, _, count = text.partition("/")
    try:
        shard = replay_.Shard(int(index), int(count))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not I/N (e.g. 0/4)") from None
    if not 0 <= shard.index < shard.count:
        raise argparse.ArgumentTypeError(f"{text!r}: I must be at least 0 and less than N")
    return shard


def _max_file_bytes(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--max-file-bytes", type=_byte_count, default=DEFAULT_MAX_FILE_BYTES, metavar="SIZE",
        help="the largest JSON file, or NDJSON line, that is read (e.g. 512m; default 512m): a larger one is an input error",
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="g0129", description="Decide G0129 billing (OT in PHP/IOP) from FHIR R4 data.",
        epilog=_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter, parents=[_global_options(False)],
    )
    parser.add_argument("--version", action="store_true", help="print the package and ruleset versions and exit")
    common = [_global_options(True)]
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    replay = sub.add_parser("replay", parents=common, help="decide FHIR bundles/NDJSON offline and write the results to a directory")
    replay.add_argument(
        "paths", nargs="*", type=Path, metavar="PATH",
        help="Bundle, resource, NDJSON file or directory (read recursively); optional with --bulk-export",
    )
    replay.add_argument("--out", type=Path, default=Path("out"), metavar="DIR", help="output directory (default: ./out)")
    _max_file_bytes(replay)
    replay.add_argument(
        "--validate", dest="validation", choices=["changes", "full"], default="changes",
        help="how each annotated Claim is proven valid R4: changes (default) validates what the annotation adds or "
        "changes with the R4B models of those elements; full validates every whole Claim (several times slower)",
    )
    replay.add_argument("--no-validate", dest="validation", action="store_const", const="none", help="no validation of the annotated Claims")
    replay.add_argument(
        "--workers", type=_positive, default=replay_.workers_default(), metavar="N",
        help="decide in N processes (default: the CPUs available, %(default)s here); the output is the same bytes for any N",
    )
    replay.add_argument(
        "--shard", type=_shard, default=replay_.Shard(), metavar="I/N",
        help="decide only the patients of shard I of N (0 <= I < N), e.g. one per machine or Kubernetes Job index",
    )
    replay.add_argument("--fhir-base", metavar="URL", help="also write the annotated Claims to this FHIR server (If-Match, Provenance)")
    replay.add_argument("--dry-run", action="store_true", help="with --fhir-base: print the Claim diffs, write nothing")
    replay.add_argument(
        "--bulk-export", metavar="BASE_URL",
        help="read a FHIR Bulk Data export of this server ($export of what the decision reads; auth from G0129_FHIR_AUTH)",
    )
    replay.add_argument("--since", metavar="INSTANT", help="with --bulk-export: only resources changed after this FHIR instant (_since)")
    replay.add_argument("--group", metavar="ID", help="with --bulk-export: only this Group's patients (Group/ID/$export)")
    replay.set_defaults(run=_replay)
    evaluate_ = sub.add_parser("evaluate", parents=common, help="print decisions as NDJSON on stdout; write nothing")
    evaluate_.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="Bundle, resource, NDJSON file or directory (read recursively)")
    _max_file_bytes(evaluate_)
    evaluate_.set_defaults(run=_evaluate)
    rules_ = sub.add_parser(
        "rules", parents=common, help="show the rule catalog with sources and status; check or compare rule tables",
        usage="%(prog)s [-h] [--mappings DIR] [--no-progress] [--json] [check [DIR] | diff DIR]",
        description="Without an action: the rule catalog of the tables in use.",
    )
    rules_.add_argument("--json", action="store_true", help="the catalog as JSON")
    rules_.set_defaults(run=_rules)
    tables = rules_.add_subparsers(dest="tables", metavar="ACTION")
    check = tables.add_parser("check", parents=common, help="list every problem of a rule table directory (exit 2 if any)")
    check.add_argument("dir", nargs="?", type=Path, metavar="DIR", help="the tables to check (default: the ones in use, see --mappings)")
    check.set_defaults(run=_rules_check)
    diff = tables.add_parser("diff", parents=common, help="what a site's rule tables change against the bundled ones, rule by rule")
    diff.add_argument("dir", type=Path, metavar="DIR", help="the site's copy of the tables")
    diff.set_defaults(run=_rules_diff)
    serve = sub.add_parser("serve", parents=common, help="run the sidecar service (settings from G0129_* variables)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1; 0.0.0.0 for every interface)")
    serve.add_argument("--port", type=int, default=8000, help="port to listen on (default: 8000)")
    serve.add_argument(
        "--log-level", choices=["critical", "error", "warning", "info", "debug"],
        help="the lowest level logged (default: G0129_LOG_LEVEL, else info); the format is G0129_LOG_FORMAT (json or text)",
    )
    serve.add_argument("--dry-run", action="store_true", help="decide and log the Claim diffs; write nothing back")
    serve.add_argument(
        "--workers", type=_positive, default=1, metavar="N",
        help="processes serving the port, each with its worker (default: 1); more than 1 wants G0129_DATABASE_URL=postgresql://...",
    )
    serve.set_defaults(run=_serve)
    subscribe_ = sub.add_parser("subscribe", parents=common, help="create or update the R4 rest-hook Subscriptions (idempotent)")
    subscribe_.add_argument("--endpoint", required=True, help="the adapter's notify URL as the FHIR server reaches it, e.g. http://adapter:8000/notify")
    subscribe_.add_argument("--fhir-base", metavar="URL", help="FHIR server (default: G0129_FHIR_BASE_URL)")
    subscribe_.add_argument("--no-payload", dest="payload", action="store_false", help="notify without the resource (the adapter searches)")
    subscribe_.add_argument("--wait", type=float, default=60.0, help="seconds to wait for the Subscriptions to become active (0: don't)")
    subscribe_.set_defaults(run=_subscribe)
    queue = sub.add_parser("queue", parents=common, help="the durable job queue (G0129_DATABASE_URL, default: a file under G0129_DATA_DIR)")
    actions = queue.add_subparsers(dest="action", required=True, metavar="ACTION")
    list_ = actions.add_parser("list", parents=common, help="list jobs in a state")
    list_.add_argument("--state", choices=["pending", "dead", "done"], default="pending", help="which jobs (default: pending)")
    retry = actions.add_parser("retry", parents=common, help="put dead letters back in the queue")
    retry.add_argument("job", nargs="?", type=int, help="job id (default with --all: every dead letter)")
    retry.add_argument("--all", action="store_true", help="every dead letter")
    purge = actions.add_parser("purge", parents=common, help="delete finished or dead jobs")
    purge.add_argument("--state", choices=["done", "dead"], required=True, help="which jobs to delete")
    queue.set_defaults(run=_queue)
    return parser


def main(argv: Sequence[str] | None = None, stdout: IO[str] | None = None, stderr: IO[str] | None = None) -> int:
    stdout = stdout or sys.stdout
    stderr = stderr or sys.stderr
    parser = _parser()
    try:
        # argparse prints to sys.stdout/sys.stderr: point them at ours (a caller's, a test's).
        with redirect_stdout(stdout), redirect_stderr(stderr):
            args = parser.parse_args(argv)
            if args.command is None and not args.version:
                parser.error("say which command to run (g0129 --help lists them)")
    except SystemExit as exc:  # argparse has printed its usage message (or the help)
        return int(exc.code or 0) and EXIT_USAGE
    ctx = _Context(args)
    try:
        if args.version:
            return _version(ctx, stdout, stderr)
        return int(args.run(args, ctx, stdout, stderr))
    except (MappingError, UsageError) as exc:
        stderr.write(f"g0129: {exc}\n")
        return EXIT_USAGE
    except AdapterError as exc:
        stderr.write(f"g0129: {exc}\n")
        return EXIT_INVALID_INPUT
    except KeyboardInterrupt:
        stderr.write("g0129: interrupted; nothing was written\n")
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader went away (`g0129 evaluate ... | head`): stop quietly, as Unix tools do.
        # Python would otherwise complain again when it flushes stdout at exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_INVALID_INPUT


if __name__ == "__main__":
    sys.exit(main())
