"""The PostgreSQL greylist backend: one database shared by every MX host.

A domain with several MX hosts greylists badly when each keeps its own
state: a sender retrying on another MX starts over there.  With
``[greylist] backend = "postgresql"`` and a ``dsn``, every heloguard uses one
database, so a retry first seen by one host passes on any other.  The
decisions themselves are :class:`heloguard.greylist.Greylist`'s, the same SQL
as SQLite's; this module only connects, migrates, locks and times out.

* Connections: psycopg 3 with a psycopg_pool pool (at most ``pool_size``
  per heloguard process, autocommit, each decision one explicit
  transaction).  A decision locks the triplet's row (``SELECT ... FOR
  UPDATE``) or creates it (``INSERT ... ON CONFLICT DO NOTHING``), and
  counts passes with one upsert, so two hosts deciding on the same triplet
  at once give the answers one host would have given in turn.
* Schema: tables ``triplets`` and ``clients`` (give heloguard a database, or
  a schema through ``options=-csearch_path=...``, of its own), versioned in
  ``heloguard_schema`` and migrated step by step under an advisory lock, so
  hosts starting together migrate once.  A database newer than this
  heloguard is refused, never changed.
* Expiry: every host runs the purger, but a purge first takes a session
  advisory lock (``pg_try_advisory_lock``); a host that does not get it
  leaves the purge to the host that has it.  Purged rows are chosen with
  ``FOR UPDATE SKIP LOCKED``, so a purge never waits for a decision.

Failure behaviour.  A decision never waits for the database longer than
``db_timeout`` (500 ms by default; Postfix and Sendmail wait 10 s or more
for the milter): it runs on a worker thread while the milter's thread waits
at most that long, and the server cancels statements and lock waits after
it too (``statement_timeout``, ``lock_timeout``).  A database that is down,
unreachable, frozen or too slow makes the decision a :class:`StoreError`,
which the greylist logs, counts and answers per ``on_error``.  After three
such failures in a row, decisions fail at once, without waiting, for one
second, then one tries again: while the database is down, mail is not held
up by a timeout per recipient (and one slow decision on a busy machine does
not switch greylisting off for a second).  The pool reconnects in the background (its own attempts
give up after a few seconds, and the next decision asks again), a
connection found broken is dropped and the decision tried once more on a
fresh one, so heloguard recovers by itself when the database returns,
without a restart.  Purges, admin commands and copies ("housekeeping") wait
longer: up to 5 s for a connection and 60 s for a statement.
"""

from __future__ import annotations

import functools
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from contextlib import contextmanager, nullcontext
from typing import Any

import psycopg
import psycopg.errors
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.rows import TupleRow
from psycopg_pool import ConnectionPool, PoolClosed, PoolTimeout

from heloguard.config import GreylistConfig
from heloguard.greylist import SCHEMA_VERSION, Backend, Closeable, StoreError, T

log = logging.getLogger("heloguard.greylist")

PG_MIGRATIONS: dict[int, tuple[str, ...]] = {
    # version reached -> statements that reach it from the one before
    1: (
        """CREATE TABLE triplets (
            client text NOT NULL, sender text NOT NULL, rcpt text NOT NULL,
            first_seen bigint NOT NULL, last_seen bigint NOT NULL,
            passed_at bigint, attempts integer NOT NULL DEFAULT 1,
            PRIMARY KEY (client, sender, rcpt))""",
        "CREATE INDEX triplets_last_seen ON triplets (last_seen)",
        # the purge's other half: pending triplets past the retry window
        "CREATE INDEX triplets_pending ON triplets (first_seen) WHERE passed_at IS NULL",
        """CREATE TABLE clients (
            client text PRIMARY KEY, passes integer NOT NULL DEFAULT 0,
            last_counted bigint NOT NULL DEFAULT 0, whitelisted_until bigint,
            allowed_by_admin integer NOT NULL DEFAULT 0)""",
    ),
}
# Advisory lock keys (per database): "helomigr" and "helogrey" as 64-bit integers.
MIGRATE_LOCK = int.from_bytes(b"helomigr", "big")
EXPIRY_LOCK = int.from_bytes(b"helogrey", "big")
TRIP_AFTER = 3  # decisions in a row that find the database unavailable...
RETRY_INTERVAL = 1.0  # ... make the next ones fail at once for this long
RECONNECT_TIMEOUT = 5.0  # the pool gives up a reconnection after this; the next decision asks anew
CONNECT_WAIT = 5.0  # housekeeping waits this long for a connection
HOUSEKEEPING_STATEMENT_TIMEOUT = 60.0
IDLE_IN_TRANSACTION_TIMEOUT = 60.0

# psycopg_pool logs every failed connection attempt (a warning each second
# while the database is down).  heloguard logs the trouble itself, once, with
# the reason kept here, per pool.
_connect_errors: dict[str, str] = {}


class _ConnectErrors(logging.Filter):
    """Keep psycopg_pool's "error connecting" reasons; drop its own log lines."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg == "error connecting in %r: %s" and len(record.args or ()) == 2:
            name, exc = record.args  # type: ignore[misc]
            _connect_errors[str(name)] = one_line(exc)
            return False
        return record.levelno >= logging.ERROR


logging.getLogger("psycopg.pool").addFilter(_ConnectErrors())


def one_line(exc: object) -> str:
    """An error message on one line (libpq's span several)."""
    return " ".join(str(exc).split()) or type(exc).__name__


@functools.cache
def pg_sql(sql: str) -> str:
    """The shared SQL ("?" placeholders) in psycopg's style ("%s")."""
    return sql.replace("?", "%s")


class _PgTx:
    """A transaction on one connection, running the shared SQL."""

    __slots__ = ("conn",)

    def __init__(self, conn: psycopg.Connection[TupleRow]) -> None:
        self.conn = conn

    def execute(self, sql: str, parameters: Sequence[Any] = (), /) -> psycopg.Cursor[TupleRow]:
        return self.conn.execute(pg_sql(sql), parameters)

    def executemany(self, sql: str, seq_of_parameters: Sequence[Sequence[Any]], /) -> None:
        with self.conn.cursor() as cur:
            cur.executemany(pg_sql(sql), seq_of_parameters)


class _Workers:
    """Threads that run decisions for callers who wait a limited time.

    Daemon threads: one stuck on a frozen server must not keep the process
    from exiting.
    """

    def __init__(self, size: int, name: str) -> None:
        self._jobs: queue.SimpleQueue[tuple[Future[Any], Callable[[], Any]] | None] = (
            queue.SimpleQueue()
        )
        self._threads = [
            threading.Thread(target=self._run, name=f"{name}-{i}", daemon=True) for i in range(size)
        ]
        for t in self._threads:
            t.start()

    def submit(self, job: Callable[[], T]) -> Future[T]:
        """Queue a job; its future says how it went."""
        future: Future[T] = Future()
        self._jobs.put((future, job))
        return future

    def _run(self) -> None:
        while (item := self._jobs.get()) is not None:
            future, job = item
            if not future.set_running_or_notify_cancel():
                continue  # the caller gave up before the job started
            try:
                future.set_result(job())
            except Exception as exc:  # noqa: BLE001 - handed to the caller, who raises it
                future.set_exception(exc)

    def stop(self) -> None:
        """Let every thread end after its current job."""
        for _ in self._threads:
            self._jobs.put(None)


class PgBackend(Backend):
    """PostgreSQL through a connection pool, each decision within ``db_timeout``."""

    name = "postgresql"
    for_update = " FOR UPDATE"
    skip_locked = " FOR UPDATE SKIP LOCKED"

    def __init__(self, cfg: GreylistConfig) -> None:
        self.cfg = cfg
        self.timeout = float(cfg.db_timeout)
        params = conninfo_to_dict(cfg.dsn)
        shown = ("host", "hostaddr", "port", "dbname", "user")
        self.where = " ".join(f"{k}={params[k]}" for k in shown if k in params)
        extra: dict[str, Any] = {"fallback_application_name": "heloguard"}
        if "connect_timeout" not in params:
            extra["connect_timeout"] = 2  # libpq's minimum; the pool connects in the background
        if "tcp_user_timeout" not in params:
            extra["tcp_user_timeout"] = 10_000  # ms: a vanished server frees a worker soon
        self.conninfo = make_conninfo(cfg.dsn, **extra)
        self._pool: ConnectionPool[psycopg.Connection[TupleRow]] = ConnectionPool(
            self.conninfo,
            min_size=1,
            max_size=max(1, cfg.pool_size),
            open=False,
            timeout=self.timeout,
            kwargs={"autocommit": True},
            configure=self._configure,
            name=f"heloguard-greylist-{id(self):x}",
            reconnect_timeout=RECONNECT_TIMEOUT,
        )
        self._opened = False
        self._closed = False
        self._open_lock = threading.Lock()
        self._schema_lock = threading.Lock()
        self._schema_ok = False
        self._local = threading.local()  # the connection a purge holds its lock on
        self._workers: _Workers | None = None
        self._misses = 0  # decisions in a row that found the database unavailable
        self._retry_at = 0.0  # monotonic: until then decisions fail at once
        self._down = ""  # why

    def describe(self) -> str:
        """Where the database is (never the password)."""
        return f"PostgreSQL {self.where or '(libpq defaults)'}"

    # -- connections ------------------------------------------------------

    def _configure(self, conn: psycopg.Connection[TupleRow]) -> None:
        """Server-side limits for every new connection of the pool."""
        ms = str(max(1, int(self.timeout * 1000)))
        conn.execute(
            "SELECT set_config('statement_timeout', %s, false), "
            "set_config('lock_timeout', %s, false), "
            "set_config('idle_in_transaction_session_timeout', %s, false)",
            (ms, ms, str(int(IDLE_IN_TRANSACTION_TIMEOUT * 1000))),
        )

    def _open(self) -> None:
        if self._opened:
            return
        with self._open_lock:
            if not self._opened and not self._closed:
                self._pool.open(wait=False)
                self._opened = True

    def _error(self, exc: psycopg.Error, wait: float) -> StoreError:
        """A StoreError saying what went wrong, on one line."""
        if isinstance(exc, PoolClosed):
            return StoreError("the greylist store is closed")
        if isinstance(exc, psycopg.errors.UndefinedTable):
            self._schema_ok = False  # tables dropped or restored away: check and migrate again
        if isinstance(exc, PoolTimeout):
            why = _connect_errors.get(self._pool.name, "")
            text = f"no connection to {self.describe()} within {wait:g} s"
            return StoreError(f"{text} ({why})" if why else text, unavailable=True)
        unavailable = isinstance(exc, psycopg.OperationalError)
        state = exc.sqlstate or ""
        broken = unavailable and (not state or state.startswith(("08", "57P")))
        return StoreError(one_line(exc), unavailable=unavailable, retry=broken)

    @contextmanager
    def transaction(self, *, write: bool = True, housekeeping: bool = False) -> Iterator[_PgTx]:
        """One transaction on a pooled connection; every failure becomes StoreError."""
        wait = max(self.timeout, CONNECT_WAIT) if housekeeping else self.timeout
        deadline: float | None = getattr(self._local, "deadline", None)
        if deadline is not None and not housekeeping:
            # leave the waiting caller time to hear why, before its own wait ends
            wait = max(0.0, deadline - time.monotonic())
        pinned: psycopg.Connection[TupleRow] | None = getattr(self._local, "conn", None)
        try:
            if pinned is None:
                self._open()
            with nullcontext(pinned) if pinned else self._pool.connection(wait) as conn:
                if not self._schema_ok:
                    self._migrate(conn)
                with conn.transaction():
                    if housekeeping:
                        conn.execute(
                            "SELECT set_config('statement_timeout', %s, true)",
                            (str(int(HOUSEKEEPING_STATEMENT_TIMEOUT * 1000)),),
                        )
                    yield _PgTx(conn)
        except psycopg.Error as exc:
            raise self._error(exc, self.timeout if deadline else wait) from exc

    def _migrate(self, conn: psycopg.Connection[TupleRow]) -> None:
        """Bring the schema to SCHEMA_VERSION, once per process, one host at a time."""
        with self._schema_lock:
            if self._schema_ok:
                return
            with conn.transaction():
                conn.execute(
                    "SELECT set_config('statement_timeout', %s, true)",
                    (str(int(HOUSEKEEPING_STATEMENT_TIMEOUT * 1000)),),
                )
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATE_LOCK,))
                row = conn.execute("SELECT to_regclass('heloguard_schema') IS NOT NULL").fetchone()
                exists = bool(row and row[0])
                version = 0
                if exists:
                    row = conn.execute("SELECT max(version) FROM heloguard_schema").fetchone()
                    version = int(row[0]) if row and row[0] is not None else 0
                if version > SCHEMA_VERSION:
                    raise StoreError(
                        f"database schema {version} is newer than this heloguard ({SCHEMA_VERSION})"
                    )
                if version < SCHEMA_VERSION:
                    if not exists:
                        conn.execute("CREATE TABLE heloguard_schema (version integer NOT NULL)")
                    for step in range(version + 1, SCHEMA_VERSION + 1):
                        for statement in PG_MIGRATIONS[step]:
                            conn.execute(statement)
                    conn.execute("DELETE FROM heloguard_schema")
                    conn.execute("INSERT INTO heloguard_schema VALUES (%s)", (SCHEMA_VERSION,))
                    log.info(
                        "greylist: %s schema migrated from version %d to %d",
                        self.describe(),
                        version,
                        SCHEMA_VERSION,
                    )
            self._schema_ok = True

    def connect(self) -> Closeable:
        """A new direct connection, after making sure the schema is current (raises StoreError)."""
        with self.transaction(housekeeping=True):
            pass
        try:
            return psycopg.connect(self.conninfo, autocommit=True)
        except psycopg.Error as exc:
            raise self._error(exc, CONNECT_WAIT) from exc

    # -- decisions within the time limit ------------------------------------

    def guarded(self, decide: Callable[[], T], *, write: bool = True) -> T:
        """Run a decision on a worker thread; wait at most db_timeout for it.

        The milter's thread never waits longer, whatever the database does
        (a frozen server does not answer even a cancel).  A decision still
        running when the wait ends finishes or fails on its own; its answer
        is dropped.
        """
        now = time.monotonic()
        if self._retry_at:
            if now < self._retry_at:
                raise StoreError(self._down, unavailable=True)
            self._retry_at = now + RETRY_INTERVAL  # this decision probes; the others fail at once
        workers = self._workers
        if workers is None:
            with self._open_lock:
                if self._closed:
                    raise StoreError("the greylist store is closed")
                if self._workers is None:
                    self._workers = _Workers(max(1, self.cfg.pool_size), "heloguard-greylist-pg")
                workers = self._workers
        future = workers.submit(lambda: self._attempt(decide, now + self.timeout * 0.9))
        try:
            result = future.result(timeout=self.timeout)
        except TimeoutError:
            future.cancel()
            why = f"{self.describe()} did not answer within {self.timeout:g} s"
            self._missed(why)
            raise StoreError(why, unavailable=True) from None
        except StoreError as exc:
            if exc.unavailable:
                self._missed(str(exc))
            else:
                self._answered()  # it answered, if only to refuse
            raise
        self._answered()
        return result

    def _missed(self, why: str) -> None:
        """A decision found the database unavailable: after a few in a row, stop waiting."""
        self._misses += 1
        if self._misses >= TRIP_AFTER or self._retry_at:
            self._down = why
            self._retry_at = time.monotonic() + RETRY_INTERVAL

    def _answered(self) -> None:
        self._misses = 0
        self._retry_at = 0.0

    def _attempt(self, decide: Callable[[], T], deadline: float) -> T:
        """The decision; once more on a fresh connection if the first one was broken."""
        self._local.deadline = deadline
        try:
            try:
                return decide()
            except StoreError as exc:
                if not exc.retry:
                    raise
            # the database restarted, or a connection died: drop every dead one, try again
            try:
                self._pool.check()
            except psycopg.Error as exc:
                raise self._error(exc, self.timeout) from exc
            return decide()
        finally:
            self._local.deadline = None

    # -- expiry, one host at a time ----------------------------------------

    @contextmanager
    def expiry_lock(self) -> Iterator[bool]:
        """Hold the database's expiry lock on one connection while this thread purges."""
        self._open()
        try:
            with self._pool.connection(max(self.timeout, CONNECT_WAIT)) as conn:
                row = conn.execute("SELECT pg_try_advisory_lock(%s)", (EXPIRY_LOCK,)).fetchone()
                mine = bool(row and row[0])
                if not mine:
                    yield False
                    return
                self._local.conn = conn
                try:
                    yield True
                finally:
                    self._local.conn = None
                    try:
                        conn.execute("SELECT pg_advisory_unlock(%s)", (EXPIRY_LOCK,))
                    except psycopg.Error:
                        conn.close()  # the server releases a session's locks when it ends
        except psycopg.Error as exc:
            raise self._error(exc, CONNECT_WAIT) from exc

    def close(self) -> None:
        """Close the pool and the worker threads."""
        with self._open_lock:
            self._closed = True
            workers, self._workers = self._workers, None
        if workers is not None:
            workers.stop()
        self._pool.close(timeout=5.0)
