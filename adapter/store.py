"""Where the job queue keeps its state: an SQLite file (the default) or a PostgreSQL database.

`G0129_DATABASE_URL` chooses: `sqlite:///path` (default `G0129_DATA_DIR/queue.sqlite3`) for one
service on one host, `postgresql://...` for replicas on several hosts. The queue
(adapter/queue.py) speaks one SQL to both; a store gives it what differs:

- transactions: SQLite takes its write lock up front (`BEGIN IMMEDIATE`), so a read-then-write
  never interleaves with another process's; PostgreSQL claims rows `FOR UPDATE SKIP LOCKED`
  and serializes the few read-then-writes that must be (`serialize`) with an advisory lock;
- the SQL text: placeholders (`?` / `%s`), column types, `max` / `GREATEST`, the schema version
  (`PRAGMA user_version` / a `schema_version` table), the columns of a table;
- whether a lease holder still lives: a holder is a queue instance (`pid-uuid`). On SQLite it
  keeps an `flock` on a file of its own beside the queue; on PostgreSQL a session advisory lock
  on its connection. The kernel drops the first, the server the second, when the process dies,
  even by `kill -9`, so another process sees at once that the holder is gone.

Each store has one connection, guarded by a lock: one instance may be shared by threads.
"""

from __future__ import annotations

import os
import re
import sqlite3
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from abc import ABC, abstractmethod
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any, Protocol, cast

from adapter.errors import UsageError

if sys.platform != "win32":
    import fcntl

__all__ = ["Cursor", "Db", "PostgresStore", "SQLiteStore", "Store", "open_store", "sqlite_path"]

_OWNER = re.compile(r"[0-9]+-[0-9a-f]{32}")
# pg_advisory_xact_lock key for the read-then-writes of enqueue and for migrations (any constant:
# "g0129" in ASCII); owners' session locks use keys derived from their uuid.
_SERIAL_KEY = 0x6730313239
_MIGRATION_KEY = _SERIAL_KEY + 1
# Seconds an SQLite statement waits for another connection's lock before "database is locked".
_BUSY_TIMEOUT = 30.0


class Cursor(Protocol):
    rowcount: int

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...

    def __iter__(self) -> Iterator[Any]: ...


class Db(Protocol):
    """What the queue's SQL runs on, inside a transaction or not: rows are tuples."""

    def execute(self, sql: str, params: Sequence[Any] = (), /) -> Cursor: ...


class Store(ABC):
    """One database under the queue. SQL is written with `?` placeholders."""

    # The column types and table options that differ, for the schema's `str.format`.
    types: dict[str, str]
    # SQL's two-argument maximum.
    greatest: str
    # Appended to the SELECT that picks the next job to claim.
    claim_lock = ""
    # The SQLite file; None for PostgreSQL.
    path: Path | None = None
    # For messages: the file, or the URL without its password.
    name: str

    @abstractmethod
    def transaction(self) -> AbstractContextManager[Db]:
        """A transaction, committed when the block ends (durably), rolled back on an error."""

    @abstractmethod
    def read(self) -> AbstractContextManager[Db]:
        """The connection for one read statement, outside any transaction."""

    @abstractmethod
    def serialize(self, db: Db) -> None:
        """Serialize the rest of this transaction with every other doing the same."""

    @abstractmethod
    def schema_version(self, db: Db) -> int: ...

    @abstractmethod
    def set_schema_version(self, db: Db, version: int) -> None: ...

    @abstractmethod
    def columns(self, db: Db, table: str) -> set[str]: ...

    @abstractmethod
    def hold_owner(self, owner: str) -> None:
        """Show `owner` alive for as long as this store is open (idempotent)."""

    @abstractmethod
    def holder_alive(self, db: Db, holder: str | None) -> bool:
        """Whether the queue instance `holder` still lives."""

    @abstractmethod
    def close(self) -> None: ...


def sqlite_path(url: str) -> Path | None:
    """The file of a `sqlite:///path` URL (`sqlite:////abs` or `sqlite:///rel`), else None."""
    if url.startswith("sqlite:///"):
        return Path(url.removeprefix("sqlite:///")).expanduser()
    return None


def open_store(location: str | Path) -> Store:
    """The store at `location`: a path or `sqlite:///` URL (SQLite), or a `postgresql://` URL."""
    text = str(location)
    if text.startswith(("postgresql://", "postgres://")):
        return PostgresStore(text)
    path = sqlite_path(text)
    if path is None and "://" in text:
        raise UsageError(f"G0129_DATABASE_URL must be sqlite:///PATH or postgresql://..., got {_redacted(text)!r}")
    return SQLiteStore(path or Path(location))


class SQLiteStore(Store):
    """A file in WAL mode with `synchronous=FULL`: each commit is fsynced before it returns, so
    neither a `kill -9` nor a power cut loses an accepted job (NORMAL would survive the former
    but may roll back the last commits on the latter)."""

    types = {"id": "INTEGER PRIMARY KEY", "blob": "BLOB", "real": "REAL", "rowid": "WITHOUT ROWID"}
    greatest = "max"

    def __init__(self, path: Path) -> None:
        self.path: Path | None = path
        self.name = str(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._owners = path.with_name(path.name + ".owners")
        self._owner: str | None = None
        self._owner_fd: int | None = None
        # Autocommit mode: transactions are opened explicitly, see transaction().
        self._db = sqlite3.connect(
            path, isolation_level=None, check_same_thread=False, timeout=_BUSY_TIMEOUT
        )
        try:
            _enter_wal(self._db)
            self._db.execute("PRAGMA synchronous=FULL")
        except BaseException:
            self._db.close()
            raise

    @contextmanager
    def transaction(self) -> Iterator[Db]:
        # IMMEDIATE takes the write lock at BEGIN, so a read-then-write (claim, dedup) cannot
        # interleave with another process's.
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield cast(Db, self._db)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    @contextmanager
    def read(self) -> Iterator[Db]:
        with self._lock:
            yield cast(Db, self._db)

    def serialize(self, db: Db) -> None:
        pass  # BEGIN IMMEDIATE did

    def schema_version(self, db: Db) -> int:
        return int(db.execute("PRAGMA user_version").fetchone()[0])

    def set_schema_version(self, db: Db, version: int) -> None:
        db.execute(f"PRAGMA user_version={int(version)}")

    def columns(self, db: Db, table: str) -> set[str]:
        return {row[1] for row in db.execute(f"PRAGMA table_info({table})")}

    def hold_owner(self, owner: str) -> None:
        """Create and lock the holder file, once, before the first lease is written: a lease
        naming us exists only while the lock shows us alive."""
        if self._owner_fd is not None or sys.platform == "win32":
            return
        with self._lock:  # threads sharing this instance: one file, locked once
            if self._owner_fd is None:
                self._owners.mkdir(exist_ok=True)
                fd = os.open(self._owners / f"{owner}.lock", os.O_RDWR | os.O_CREAT, 0o600)
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a fresh name: nobody else has it
                self._owner, self._owner_fd = owner, fd

    def holder_alive(self, db: Db, holder: str | None) -> bool:
        """Whether the queue instance `holder` still lives: its lock file exists and is locked."""
        if sys.platform == "win32":
            return True  # no flock: leases run out as before
        if holder is None or not _OWNER.fullmatch(holder):
            return False
        path = self._owners / f"{holder}.lock"
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)  # releases our lock, if we got it
        path.unlink(missing_ok=True)  # a dead holder's file
        return False

    def close(self) -> None:
        with self._lock:
            self._db.close()
            if self._owner_fd is not None:
                # Our leases are all released or will be reclaimed; the lock file goes with us.
                (self._owners / f"{self._owner}.lock").unlink(missing_ok=True)
                os.close(self._owner_fd)
                self._owner_fd = None


class PostgresStore(Store):
    """A PostgreSQL database (psycopg 3). Commits are durable when they return (the server's
    `synchronous_commit`, on by default); several processes on several hosts share it."""

    types = {"id": "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY", "blob": "BYTEA", "real": "DOUBLE PRECISION", "rowid": ""}
    greatest = "GREATEST"
    # Two replicas claiming at once each get another job, neither waits for the other.
    claim_lock = " FOR UPDATE SKIP LOCKED"

    def __init__(self, url: str) -> None:
        import psycopg  # imported here: an SQLite-only service never loads it

        self.name = _redacted(url)
        self._lock = threading.Lock()
        self._owner: str | None = None
        try:
            # Autocommit: a read is one statement; writes open transaction() explicitly.
            self._db = _PgDb(psycopg.connect(url, autocommit=True, application_name="g0129"))
        except psycopg.Error as exc:
            raise UsageError(f"cannot connect to the database {self.name}: {str(exc).strip()}") from None

    @contextmanager
    def transaction(self) -> Iterator[Db]:
        with self._lock, self._db.connection.transaction():
            yield self._db

    @contextmanager
    def read(self) -> Iterator[Db]:
        with self._lock:
            yield self._db

    def serialize(self, db: Db) -> None:
        db.execute("SELECT pg_advisory_xact_lock(?)", (_SERIAL_KEY,))

    def schema_version(self, db: Db) -> int:
        # Replicas starting together: one migrates, the others wait and find it done.
        db.execute("SELECT pg_advisory_xact_lock(?)", (_MIGRATION_KEY,))
        db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        row = db.execute("SELECT max(version) FROM schema_version").fetchone()
        return int(row[0] or 0)

    def set_schema_version(self, db: Db, version: int) -> None:
        db.execute("DELETE FROM schema_version")
        db.execute("INSERT INTO schema_version (version) VALUES (?)", (version,))

    def columns(self, db: Db, table: str) -> set[str]:
        return {
            row[0]
            for row in db.execute(
                "SELECT column_name FROM information_schema.columns"
                " WHERE table_schema = current_schema() AND table_name = ?",
                (table,),
            )
        }

    def hold_owner(self, owner: str) -> None:
        if self._owner is not None:
            return
        with self._lock:
            if self._owner is None:
                # Session-level: held by this connection until it closes or the process dies.
                self._db.execute("SELECT pg_advisory_lock(?)", (_owner_key(owner),))
                self._owner = owner

    def holder_alive(self, db: Db, holder: str | None) -> bool:
        if holder is None or not _OWNER.fullmatch(holder):
            return False
        if holder == self._owner:
            return True
        key = _owner_key(holder)
        # pg_locks shows every session's advisory locks, whoever the user; a bigint key is
        # split in two oids.
        row = db.execute(
            "SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted"
            " AND classid = ? AND objid = ? AND objsubid = 1",
            (key >> 32, key & 0xFFFFFFFF),
        ).fetchone()
        return row is not None

    def close(self) -> None:
        with self._lock:
            self._db.connection.close()


class _PgDb:
    """A psycopg connection that takes the queue's `?` placeholders (none of its SQL holds a
    `?` or `%` of its own)."""

    def __init__(self, connection: Any) -> None:
        self.connection = connection
        self._sql: dict[str, str] = {}

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Cursor:
        text = self._sql.get(sql)
        if text is None:
            text = self._sql[sql] = sql.replace("?", "%s")
        cursor: Cursor = self.connection.execute(text, params, prepare=True)
        return cursor


def _enter_wal(db: sqlite3.Connection) -> None:
    """Put the file in WAL mode. While another connection holds the write lock of a file not yet
    in WAL mode, SQLite refuses the switch at once, without its busy handler: replicas opening a
    new queue together failed with "database is locked" (2 rounds in 300 of 4 threads opening
    one new file). So this waits, as the busy handler does for every other statement, up to the
    same timeout."""
    deadline = time.monotonic() + _BUSY_TIMEOUT
    pause = 0.001
    while True:
        try:
            db.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if exc.sqlite_errorcode & 0xFF != sqlite3.SQLITE_BUSY or time.monotonic() >= deadline:
                raise
        time.sleep(pause)
        pause = min(pause * 2, 0.1)


def _owner_key(owner: str) -> int:
    """The advisory lock key of a holder: 60 bits of its uuid (positive, so both oids of
    pg_locks read it back unchanged)."""
    return int(owner.rsplit("-", 1)[1][:15], 16)


def _redacted(url: str) -> str:
    """A database URL without its password, for messages and logs."""
    return re.sub(r"(://[^:/@]+):[^@]*@", r"\1:***@", url)
