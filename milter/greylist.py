"""Greylisting: a 4xx for a first delivery attempt, a pass for a timely retry.

Real MTAs queue and retry; many bots do not, and the delay buys time for
block lists to catch the rest.  heloguard greylists at RCPT, and aims where
it hurts bots rather than big senders:

* The key is (client, sender, recipient).  The client part is the client's
  forward-confirmed registered domain when it has one that is not generic
  (so Outlook, SES or Mimecast retrying from another address of their pool
  still match), else its address masked to /24 (IPv4) or /64 (IPv6).
* The sender is normalized: lower case, ``+extension`` and BATV ``prvs=``
  tags stripped, digit runs in the local part (VERP) replaced by ``#``.
* Policy ``suspicious`` (default) greylists only clients that some rule
  flagged without refusing (a warning, a list hit below the threshold);
  ``all`` greylists everyone who is judged.  Exceptions, authenticated
  clients, trusted networks and DNSWL hits are never greylisted.
* Defaults (postgrey's): delay 5 minutes; a first retry is accepted up to 2
  days after the first attempt; a passed triplet lives 35 days after its
  last use; a client that passed 5 times (at most one counted per hour) is
  whitelisted as a whole for 35 days.

Two stores, one behaviour.  :class:`Greylist` holds every decision (new,
too early, passed, known, whitelisted; pass counting; expiry; the admin
operations) once, as SQL that both backends run; a :class:`Backend` only
opens connections and transactions, migrates its schema and supplies the
few words of SQL that differ:

* SQLite (default, :class:`SqliteBackend`): stdlib sqlite3 in WAL mode with
  a busy timeout.  Decisions go to one committer thread, which runs all the
  decisions queued meanwhile in one ``BEGIN IMMEDIATE`` transaction (group
  commit) and answers each caller only after the COMMIT: a crash loses at
  most the decisions in flight, none that a client was told.  A caller
  waits at most ``busy_timeout``, then follows ``on_error``.  The schema is
  versioned (``PRAGMA user_version``) and migrated step by step.
* PostgreSQL (``heloguard.greylist_pg``, imported only when configured):
  one database shared by every MX host, so a retry first seen by one host
  passes on another.  See that module.

Every row a decision changes is written with an upsert (``INSERT ... ON
CONFLICT``) or read with a row lock, so two hosts deciding on the same
triplet at the same moment agree: exactly one of them sees the first
attempt.  Expired rows are purged in small batches, by one host at a time.

Failures: when the store cannot be used (SQLite locked, read-only, full or
corrupt; PostgreSQL down, unreachable or too slow), the decision follows
``on_error`` (``accept`` without greylisting, default, or ``tempfail``), is
counted in ``faults`` (and by the caller in the greylist metric, outcome
``error``), and is logged: once when the trouble starts, again for each new
kind of failure and every minute while it lasts, and once when the store
works again.  Nothing is restarted: the next decision simply tries again.
A database file is never deleted or rewritten.

The clock is injectable so tests travel through delay, window and expiry.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import ipaddress
import logging
import queue
import re
import sqlite3
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol, TypeVar

from heloguard.answers import IPAddress
from heloguard.config import GreylistConfig
from heloguard.engine import Decision, Effect
from heloguard.hostclass import classify
from heloguard.names import registered_domain
from heloguard.rules.base import Reply

log = logging.getLogger("heloguard.greylist")

T = TypeVar("T")

# The logical schema; each backend migrates its own tables to this version
# (SQLite: MIGRATIONS below; PostgreSQL: greylist_pg.PG_MIGRATIONS).
SCHEMA_VERSION = 1
MIGRATIONS: dict[int, tuple[str, ...]] = {
    # version reached -> statements that reach it from the one before
    1: (
        """CREATE TABLE triplets (
            client TEXT NOT NULL, sender TEXT NOT NULL, rcpt TEXT NOT NULL,
            first_seen INTEGER NOT NULL, last_seen INTEGER NOT NULL,
            passed_at INTEGER, attempts INTEGER NOT NULL DEFAULT 1,
            PRIMARY KEY (client, sender, rcpt)) WITHOUT ROWID""",
        "CREATE INDEX triplets_last_seen ON triplets (last_seen)",
        """CREATE TABLE clients (
            client TEXT PRIMARY KEY, passes INTEGER NOT NULL DEFAULT 0,
            last_counted INTEGER NOT NULL DEFAULT 0, whitelisted_until INTEGER,
            allowed_by_admin INTEGER NOT NULL DEFAULT 0) WITHOUT ROWID""",
    ),
}
PASS_COUNT_INTERVAL = 3600  # at most one pass per client per hour counts towards the whitelist
# A pass is remembered in memory this long: a repeat within it is answered
# without a store transaction.  What that skips is a last_seen update (expiry
# is 35 days) and a pass count (counted at most hourly), each delayed by at
# most this; a triplet or client deleted by another process (the admin
# command, another host) may still pass here for up to this long.
PASS_MEMO = 60.0
PASS_MEMO_SIZE = 65536  # remembered passes at most (oldest dropped first)
ALLOWED = "allowed by an admin"
WHITELISTED = "client whitelisted after repeated passes"
CLIENT_PASSES = (ALLOWED, WHITELISTED)  # a pass of the whole client, not of one triplet
FAULT_REPORT_INTERVAL = 60.0  # while the store keeps failing, a summary line this often

# The SQL of every decision, shared by both backends: "?" placeholders (the
# PostgreSQL backend turns them into "%s"), and nothing either dialect lacks.
SQL_CLIENT = "SELECT whitelisted_until, allowed_by_admin FROM clients WHERE client=?"
SQL_TRIPLET = (
    "SELECT first_seen, last_seen, passed_at FROM triplets WHERE client=? AND sender=? AND rcpt=?"
)
SQL_INSERT = (
    "INSERT INTO triplets (client, sender, rcpt, first_seen, last_seen) VALUES (?,?,?,?,?) "
    "ON CONFLICT (client, sender, rcpt) DO NOTHING RETURNING 1"
)
SQL_TOUCH = (
    "UPDATE triplets SET last_seen=?, attempts=attempts+1 WHERE client=? AND sender=? AND rcpt=?"
)
SQL_PASSED = (
    "UPDATE triplets SET last_seen=?, passed_at=?, attempts=attempts+1 "
    "WHERE client=? AND sender=? AND rcpt=?"
)
SQL_RESTART = (
    "UPDATE triplets SET first_seen=?, last_seen=?, passed_at=NULL, attempts=1 "
    "WHERE client=? AND sender=? AND rcpt=?"
)
# One statement counts a pass, at most once per PASS_COUNT_INTERVAL, and says
# the new count (no row back: not counted), so concurrent passes never lose one.
SQL_COUNT_PASSES = (
    "INSERT INTO clients (client, passes, last_counted) VALUES (?, 1, ?) "
    "ON CONFLICT (client) DO UPDATE SET passes = clients.passes + 1, "
    "last_counted = excluded.last_counted "
    "WHERE excluded.last_counted - clients.last_counted >= 3600 "  # PASS_COUNT_INTERVAL
    "RETURNING passes"
)
SQL_WHITELIST = "UPDATE clients SET whitelisted_until=? WHERE client=?"
SQL_PURGE_TRIPLETS = (
    "DELETE FROM triplets WHERE (client, sender, rcpt) IN ("
    " SELECT client, sender, rcpt FROM triplets"
    " WHERE (passed_at IS NULL AND first_seen < ?) OR last_seen < ? LIMIT ?{lock})"
)
SQL_PURGE_CLIENTS = (
    "DELETE FROM clients WHERE allowed_by_admin = 0 AND last_counted < ? "
    "AND (whitelisted_until IS NULL OR whitelisted_until < ?)"
)
SQL_ALLOW = (
    "INSERT INTO clients (client, passes, last_counted, allowed_by_admin) "
    "VALUES (?, 0, ?, 1) ON CONFLICT (client) DO UPDATE SET allowed_by_admin = 1"
)
# Copying between stores: every column, merged so that a copy run twice, or
# two hosts' stores copied into one, keep the union of what each knew (the
# earliest first attempt and pass, the latest use, the larger counts).
SQL_EXPORT_TRIPLETS = (
    "SELECT client, sender, rcpt, first_seen, last_seen, passed_at, attempts FROM triplets"
)
SQL_EXPORT_CLIENTS = (
    "SELECT client, passes, last_counted, whitelisted_until, allowed_by_admin FROM clients"
)
SQL_MERGE_TRIPLET = (
    "INSERT INTO triplets (client, sender, rcpt, first_seen, last_seen, passed_at, attempts) "
    "VALUES (?,?,?,?,?,?,?) "
    "ON CONFLICT (client, sender, rcpt) DO UPDATE SET "
    "first_seen = CASE WHEN excluded.first_seen < triplets.first_seen "
    "THEN excluded.first_seen ELSE triplets.first_seen END, "
    "last_seen = CASE WHEN excluded.last_seen > triplets.last_seen "
    "THEN excluded.last_seen ELSE triplets.last_seen END, "
    "passed_at = CASE WHEN triplets.passed_at IS NULL OR excluded.passed_at < triplets.passed_at "
    "THEN excluded.passed_at ELSE triplets.passed_at END, "
    "attempts = CASE WHEN excluded.attempts > triplets.attempts "
    "THEN excluded.attempts ELSE triplets.attempts END"
)
SQL_MERGE_CLIENT = (
    "INSERT INTO clients (client, passes, last_counted, whitelisted_until, allowed_by_admin) "
    "VALUES (?,?,?,?,?) "
    "ON CONFLICT (client) DO UPDATE SET "
    "passes = CASE WHEN excluded.passes > clients.passes "
    "THEN excluded.passes ELSE clients.passes END, "
    "last_counted = CASE WHEN excluded.last_counted > clients.last_counted "
    "THEN excluded.last_counted ELSE clients.last_counted END, "
    "whitelisted_until = CASE WHEN clients.whitelisted_until IS NULL "
    "OR excluded.whitelisted_until > clients.whitelisted_until "
    "THEN excluded.whitelisted_until ELSE clients.whitelisted_until END, "
    "allowed_by_admin = CASE WHEN excluded.allowed_by_admin > clients.allowed_by_admin "
    "THEN excluded.allowed_by_admin ELSE clients.allowed_by_admin END"
)


@dataclass(frozen=True, slots=True)
class Outcome:
    """What greylisting says about one recipient."""

    passed: bool
    reason: str
    retry_in: int = 0  # seconds until a retry can pass (for a deferral)
    error: bool = False  # the store failed; the verdict follows on_error


class StoreError(Exception):
    """The database could not be used (locked, read-only, full, corrupt, down, slow...).

    ``unavailable``: the database could not be reached or did not answer in
    time (as opposed to refusing a statement).  ``retry``: the connection
    broke, so the same work may be tried once more on another connection.
    """

    def __init__(self, message: str, *, unavailable: bool = False, retry: bool = False) -> None:
        super().__init__(message)
        self.unavailable = unavailable
        self.retry = retry


# -- who and what ---------------------------------------------------------------


def suspicious(*decisions: Decision | None) -> str:
    """Why earlier stages found the client suspicious ("" when they did not).

    A rule that failed with action warn, or a DNS list that listed the client
    below the threshold, flags it without refusing it.
    """
    for d in decisions:
        if d is None:
            continue
        for r in d.reports:
            if r.effect is Effect.WARN:
                return f"suspicious: {r.rule} ({r.result.outcome})"
            if r.result.facts.get("listed"):
                return f"suspicious: listed by {r.rule} below the threshold"
    return ""


def greylist_reply(outcome: Outcome, delay: float) -> Reply:
    """The deferral, saying when to come back."""
    wait = outcome.retry_in or int(delay)
    if outcome.error:
        return Reply(451, "4.3.0", "Temporary local problem; try again later")
    return Reply(451, "4.7.1", f"Greylisted: please try again in {wait} seconds ({outcome.reason})")


# -- keys ---------------------------------------------------------------------

_BATV = re.compile(r"^(?:prvs|msprvs1|btv1)=[^=]+=(.+)$", re.IGNORECASE)
_DIGITS = re.compile(r"\d+")


def normalize_sender(sender: str) -> str:
    """Lower case, BATV tag, +extension and VERP digits removed; <> stays empty."""
    sender = sender.strip().strip("<>").lower()
    if "@" not in sender:
        return sender
    local, _, domain = sender.rpartition("@")
    m = _BATV.match(local)
    if m:
        local = m.group(1)
    local = local.split("+", 1)[0]
    local = _DIGITS.sub("#", local)
    return f"{local}@{domain}"


def client_key(client: IPAddress, verified: tuple[str, ...], cfg: GreylistConfig) -> str:
    """The client part of the key: its verified, non-generic domain, else its network."""
    return _client_key(client, verified, cfg.ipv4_mask, cfg.ipv6_mask)


@functools.lru_cache(maxsize=16384)
def _client_key(
    client: IPAddress, verified: tuple[str, ...], ipv4_mask: int, ipv6_mask: int
) -> str:
    # Pure (the built-in classifier only), and asked for every greylisted
    # session: a repeat client's key is remembered rather than classified again.
    for name in verified:
        domain = registered_domain(name)
        if domain and not classify(name, client).generic:
            return f"domain:{domain}"
    mask = ipv4_mask if client.version == 4 else ipv6_mask
    net = ipaddress.ip_network(f"{client}/{mask}", strict=False)
    return f"net:{net}"


def admin_key(text: str, cfg: GreylistConfig) -> str:
    """The client key an admin means by an address, a network or a domain."""
    text = text.strip().lower()
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        pass
    else:
        return client_key(addr, (), cfg)
    try:
        return f"net:{ipaddress.ip_network(text, strict=False)}"
    except ValueError:
        pass
    if text.startswith(("domain:", "net:")):
        return text
    return f"domain:{text.rstrip('.')}"


# -- the backends ----------------------------------------------------------------


class Cursor(Protocol):
    """What a statement gives back (sqlite3's and psycopg's cursors both fit)."""

    @property
    def rowcount(self) -> int:
        """Rows a DELETE or UPDATE changed."""
        ...

    def fetchone(self) -> Any:
        """The next row, or None."""
        ...

    def fetchmany(self, size: int = ..., /) -> list[Any]:
        """Up to ``size`` more rows."""
        ...


class Tx(Protocol):
    """One open transaction: statements with "?" placeholders."""

    def execute(self, sql: str, parameters: Sequence[Any] = ..., /) -> Cursor:
        """Run one statement."""
        ...

    def executemany(self, sql: str, seq_of_parameters: Sequence[Sequence[Any]], /) -> object:
        """Run one statement for each row of parameters."""
        ...


class Closeable(Protocol):
    """A connection, as far as a caller of connect() cares."""

    def close(self) -> None:
        """Close it."""
        ...


class Backend(ABC):
    """The store interface: connections, transactions, schema, and dialect.

    Both backends run the same SQL (``SQL_*`` above) through :meth:`transaction`
    and must give the same results; they differ only in how they connect,
    migrate, lock and time out.  Every database failure leaves a backend as a
    :class:`StoreError`.
    """

    name: ClassVar[str]
    #: appended to the SELECT of a row that the decision will change
    for_update: ClassVar[str] = ""
    #: appended to the purge's choice of rows: rows being decided are left for later
    skip_locked: ClassVar[str] = ""

    @abstractmethod
    def transaction(
        self, *, write: bool = True, housekeeping: bool = False
    ) -> AbstractContextManager[Tx]:
        """One transaction; in ``housekeeping`` (purge, admin, copy) it may wait longer."""

    @abstractmethod
    def connect(self) -> Closeable:
        """A new connection to a database migrated to the current schema (raises StoreError)."""

    def guarded(self, decide: Callable[[], T], *, write: bool = True) -> T:
        """Run one decision within the backend's time limit (raises StoreError)."""
        return decide()

    @contextmanager
    def expiry_lock(self) -> Iterator[bool]:
        """Hold the right to purge; False when another host is purging now."""
        yield True

    @abstractmethod
    def describe(self) -> str:
        """Where the store is, for the log (never a password)."""

    @abstractmethod
    def close(self) -> None:
        """Release what this backend holds (for the calling thread, or all of it)."""


class SqliteBackend(Backend):
    """SQLite in WAL mode: decisions committed in batches by one thread; reads on
    connections any thread may take."""

    name = "sqlite"

    def __init__(self, cfg: GreylistConfig) -> None:
        self.cfg = cfg
        # The committer's (and the purger's) own connection.  Thread-local state
        # is per Python thread state, and pymilter makes one of those for every
        # milter connection, so a callback's reads never use it: they take a
        # connection from ``_readers`` and give it back (a connection per
        # session cost an open, three PRAGMAs and a schema check each time).
        # At most ``READERS_MAX`` are open at once: a burst of hundreds of
        # connections waits a moment for one rather than opening hundreds (each
        # with its own descriptors and page cache) and closing them after.
        self._local = threading.local()
        self._readers: list[sqlite3.Connection] = []  # idle read connections, any thread's
        self._readers_open = 0  # idle or in use
        self._reader_freed = threading.Condition(threading.Lock())  # guards both
        # Writers of this process queue here, in turn, rather than in SQLite's
        # busy handler, which sleeps in growing steps (up to 100 ms) and so lets
        # waiters time out while the lock is free; with hundreds of libmilter
        # threads the soak saw exactly that.  Other processes (the admin
        # command, a second daemon) still meet busy_timeout.
        self._writers = threading.Lock()
        # Decisions go to one committer thread, which runs every decision
        # queued meanwhile in one transaction (group commit).  A callback thread
        # holding SQLite's lock gives the GIL up in every statement and, among
        # hundreds of threads, waits to get it back each time; one thread doing
        # the writing in batches does not.  A caller learns its outcome only
        # after the COMMIT that made it durable.
        self._requests: queue.SimpleQueue[_Request] = queue.SimpleQueue()
        self._committer: threading.Thread | None = None
        self._start_lock = threading.Lock()

    def guarded(self, decide: Callable[[], T], *, write: bool = True) -> T:
        """Run the decision in the committer's next transaction (raises StoreError).

        A read (``write=False``: the warn-mode peek) runs here, in the caller's
        own read transaction: it needs neither the writer nor its queue."""
        if not write:
            return decide()
        request = _Request(decide, concurrent.futures.Future())
        with self._start_lock:  # the committer cannot retire between these two
            self._start_committer()
            self._requests.put(request)
        try:
            result: T = request.future.result(timeout=self.cfg.busy_timeout)
        except concurrent.futures.TimeoutError:
            request.future.cancel()  # the committer skips it if it has not begun
            raise StoreError(
                f"database is locked: no turn within {self.cfg.busy_timeout:g} s"
            ) from None
        return result

    def _start_committer(self) -> None:
        """Start the committer unless it runs (the caller holds ``_start_lock``)."""
        if self._committer is None or not self._committer.is_alive():
            self._committer = threading.Thread(
                target=self._commit_loop, name="heloguard-greylist", daemon=True
            )
            self._committer.start()

    def _commit_loop(self) -> None:
        while True:
            try:
                first = self._requests.get(timeout=COMMITTER_IDLE)
            except queue.Empty:
                # idle: retire (a store that a reload replaced leaves no thread
                # behind); the next decision starts a new committer
                with self._start_lock:
                    if self._requests.empty():
                        self._committer = None
                        self._drop_conn()
                        return
                continue
            batch = [first]
            while len(batch) < MAX_BATCH:
                try:
                    batch.append(self._requests.get_nowait())
                except queue.Empty:
                    break
            if any(r is _CLOSE for r in batch):
                for r in batch:
                    if r is not _CLOSE:
                        r.future.set_exception(StoreError("the greylist store was closed"))
                self._drop_conn()
                return
            self._commit(batch)

    def _commit(self, batch: list[_Request]) -> None:
        """One transaction for every request still wanted; answers after COMMIT."""
        live = [r for r in batch if r.future.set_running_or_notify_cancel()]
        if not live:
            return
        done: list[tuple[_Request, object, BaseException | None]] = []
        try:
            with self._writers, self._batch() as conn:
                self._local.batch = conn
                try:
                    for r in live:
                        try:
                            done.append((r, r.decide(), None))
                        except StoreError as exc:  # this decision's own failure
                            done.append((r, None, exc))
                finally:
                    self._local.batch = None
        except StoreError as exc:  # BEGIN or COMMIT failed: none of them counts
            for r in live:
                r.future.set_exception(exc)
            return
        except Exception as exc:  # noqa: BLE001 - a bug: each caller sees it, the thread lives
            for r in live:
                if not r.future.done():
                    r.future.set_exception(exc)
            return
        for r, value, error in done:
            if error is not None:
                r.future.set_exception(error)
            else:
                r.future.set_result(value)

    @contextmanager
    def _batch(self) -> Iterator[sqlite3.Connection]:
        yield from self._transaction(True)

    def describe(self) -> str:
        """The database file."""
        return f"SQLite {self.cfg.database}"

    def _uri(self) -> tuple[str, bool]:
        db = self.cfg.database
        if db.startswith("file:"):
            return db, True
        return db, False

    def connect(self) -> sqlite3.Connection:
        """A new connection, migrated to the current schema (raises StoreError)."""
        target, uri = self._uri()
        try:
            if not uri:
                Path(target).parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(
                target,
                timeout=self.cfg.busy_timeout,
                isolation_level=None,
                uri=uri,
                check_same_thread=False,
            )
            conn.execute(f"PRAGMA busy_timeout = {int(self.cfg.busy_timeout * 1000)}")
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()
            if mode and str(mode[0]).lower() != "wal" and "mode=ro" not in target:
                log.warning("greylist database %s is not in WAL mode (%s)", target, mode[0])
            conn.execute("PRAGMA synchronous = NORMAL")
            self._migrate(conn)
        except (sqlite3.Error, OSError) as exc:
            raise StoreError(f"cannot open {target}: {exc}") from exc
        return conn

    def _migrate(self, conn: sqlite3.Connection) -> None:
        version = int(conn.execute("PRAGMA user_version").fetchone()[0])
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"database schema {version} is newer than this heloguard ({SCHEMA_VERSION})"
            )
        while version < SCHEMA_VERSION:
            step = version + 1
            conn.execute("BEGIN IMMEDIATE")
            try:
                again = int(conn.execute("PRAGMA user_version").fetchone()[0])
                if again == version:  # another process may have migrated meanwhile
                    for statement in MIGRATIONS[step]:
                        conn.execute(statement)
                    conn.execute(f"PRAGMA user_version = {step}")
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            version = int(conn.execute("PRAGMA user_version").fetchone()[0])

    def _conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = self.connect()
            self._local.conn = conn
        return conn

    def _drop_conn(self) -> None:
        conn = getattr(self._local, "conn", None)
        self._local.conn = None
        if conn is not None:
            with contextlib.suppress(sqlite3.Error):
                conn.close()

    @contextmanager
    def transaction(
        self, *, write: bool = True, housekeeping: bool = False
    ) -> Iterator[sqlite3.Connection]:
        """One transaction (BEGIN IMMEDIATE to write); any database failure becomes StoreError.

        Inside the committer's batch it is that batch's transaction."""
        batch: sqlite3.Connection | None = getattr(self._local, "batch", None)
        if batch is not None:
            yield batch
            return
        if write and not self._writers.acquire(timeout=self.cfg.busy_timeout):
            raise StoreError(
                f"database is locked: other decisions held it {self.cfg.busy_timeout:g} s"
            )
        try:
            yield from self._transaction(write)
        finally:
            if write:
                self._writers.release()

    def _transaction(self, write: bool) -> Iterator[sqlite3.Connection]:
        conn = self._conn() if write else self._take_reader()
        usable = True  # False: the connection failed, and is closed rather than used again
        try:
            try:
                conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            except sqlite3.Error as exc:
                usable = False
                raise StoreError(str(exc)) from exc
            try:
                yield conn
                conn.execute("COMMIT")
            except sqlite3.Error as exc:
                try:
                    conn.execute("ROLLBACK")
                except sqlite3.Error:
                    usable = False
                raise StoreError(str(exc)) from exc
            except BaseException:
                usable = False  # until the ROLLBACK is done
                conn.execute("ROLLBACK")
                usable = True
                raise
        finally:
            if write and not usable:
                self._drop_conn()
            elif not write:
                if not usable:
                    with contextlib.suppress(sqlite3.Error):
                        conn.close()
                self._give_reader(conn if usable else None)

    def _take_reader(self) -> sqlite3.Connection:
        """An idle read connection, or a new one while fewer than ``READERS_MAX``
        are open; otherwise wait for one (raises StoreError after busy_timeout)."""
        with self._reader_freed:
            if not self._reader_freed.wait_for(self._reader_ready, self.cfg.busy_timeout):
                raise StoreError(
                    f"all {READERS_MAX} read connections busy for {self.cfg.busy_timeout:g} s"
                )
            if self._readers:
                return self._readers.pop()
            self._readers_open += 1
        try:
            return self.connect()
        except BaseException:
            self._give_reader(None)
            raise

    def _reader_ready(self) -> bool:
        return bool(self._readers) or self._readers_open < READERS_MAX

    def _give_reader(self, conn: sqlite3.Connection | None) -> None:
        """Keep a reader for the next read; ``None`` for one that failed (closed)."""
        with self._reader_freed:
            if conn is not None:
                self._readers.append(conn)
            else:
                self._readers_open -= 1
            self._reader_freed.notify()

    def close(self) -> None:
        """Close this thread's connection and the idle readers, and stop the
        committer (a later decision starts a new one)."""
        with self._start_lock:
            committer, self._committer = self._committer, None
            if committer is not None and committer.is_alive():
                self._requests.put(_CLOSE)
        if committer is not None:
            committer.join(timeout=self.cfg.busy_timeout + 5)
        self._drop_conn()
        with self._reader_freed:
            idle, self._readers = self._readers, []
            self._readers_open -= len(idle)
            self._reader_freed.notify_all()
        for conn in idle:
            with contextlib.suppress(sqlite3.Error):
                conn.close()


@dataclass(frozen=True, slots=True)
class _Request:
    """One decision for the SQLite committer, and where its outcome goes."""

    decide: Callable[[], object]
    future: concurrent.futures.Future[Any]


_CLOSE = _Request(lambda: None, concurrent.futures.Future())  # stops the committer
MAX_BATCH = 256  # decisions in one transaction at most
READERS_MAX = 32  # read connections open at once at most; a read waits for one
COMMITTER_IDLE = 60.0  # seconds without a decision before the committer thread retires


def backend_for(cfg: GreylistConfig) -> Backend:
    """The backend that ``[greylist] backend`` names (PostgreSQL's module is imported only here)."""
    if cfg.backend == "postgresql":
        from heloguard.greylist_pg import PgBackend

        return PgBackend(cfg)
    return SqliteBackend(cfg)


# -- the store ------------------------------------------------------------------


class Greylist:
    """The greylist: every decision, on whichever backend the configuration names."""

    def __init__(
        self,
        cfg: GreylistConfig,
        *,
        clock: Callable[[], float] = time.time,
        backend: Backend | None = None,
    ) -> None:
        self.cfg = cfg
        self.clock = clock
        self.backend = backend if backend is not None else backend_for(cfg)
        self._purger: threading.Thread | None = None
        self._stop = threading.Event()
        self.faults = 0  # store failures seen (for the log and the metrics)
        self._fault_lock = threading.Lock()
        self._failing_since: float | None = None  # monotonic; None while the store works
        self._failed = 0  # decisions that followed on_error in the current trouble
        self._seen: set[str] = set()  # reasons already logged in the current trouble
        self._reported = 0.0
        # recent passes: a client key (whitelisted) or a triplet -> (until, reason)
        self._passes: dict[str | tuple[str, str, str], tuple[float, str]] = {}
        self._passes_lock = threading.Lock()  # for writers; a read is one dict lookup

    def describe(self) -> str:
        """Where the store is, for the log."""
        return self.backend.describe()

    def connect(self) -> Closeable:
        """A new connection, migrated to the current schema (raises StoreError)."""
        return self.backend.connect()

    # -- failures -----------------------------------------------------------

    def _fault(self, exc: StoreError) -> Outcome:
        """Count a failed decision, log it (once per kind of trouble), follow on_error."""
        now = time.monotonic()
        reason = str(exc)
        with self._fault_lock:
            self.faults += 1
            first = self._failing_since is None
            if first:
                self._failing_since, self._failed, self._seen = now, 0, set()
                self._reported = now
            self._failed += 1
            new = reason not in self._seen and len(self._seen) < 20
            self._seen.add(reason)
            summary = not new and now - self._reported >= FAULT_REPORT_INTERVAL
            if new or summary:
                self._reported = now
            failed, since = self._failed, now - (self._failing_since or now)
        policy = self.cfg.on_error
        # a known kind of failure: the message says it all, no traceback
        if new:
            log.error("greylist database failure (%s); on_error = %s", reason, policy)
        elif summary:
            log.error(
                "greylist database still failing (%s) after %.0f s; failed=%d on_error=%s",
                reason,
                since,
                failed,
                policy,
            )
        return Outcome(policy == "accept", f"database failure: {reason}", error=True)

    def _works(self) -> None:
        """The store answered: end a period of failures, if there was one."""
        if self._failing_since is not None:
            self._end_trouble()

    def _end_trouble(self) -> None:
        """Say once that the store works again."""
        with self._fault_lock:
            started, failed = self._failing_since, self._failed
            self._failing_since = None
        if started is None:  # another thread said it
            return
        log.warning(
            "greylist database works again after %.0f s; failed=%d on_error=%s",
            time.monotonic() - started,
            failed,
            self.cfg.on_error,
        )

    # -- decisions --------------------------------------------------------

    def check(self, client: str, sender: str, rcpt: str) -> Outcome:
        """Record this attempt and say whether it passes (never raises).

        A pass the store gave within the last :data:`PASS_MEMO` seconds is
        answered from memory: a busy sender's every message would otherwise
        wait for a transaction that only moves ``last_seen``."""
        sender, rcpt = normalize_sender(sender), rcpt.strip().strip("<>").lower()
        key = (client, sender, rcpt)
        now = self.clock()
        passes = self._passes
        for memo in (client, key):
            hit = passes.get(memo)
            if hit is not None and hit[0] > now:
                return Outcome(True, hit[1])
        outcome = self._guarded(lambda: self._check(client, sender, rcpt), write=True)
        if outcome.passed and not outcome.error:
            self._remember(client if outcome.reason in CLIENT_PASSES else key, now, outcome)
        return outcome

    def _remember(self, memo: str | tuple[str, str, str], now: float, outcome: Outcome) -> None:
        reason = outcome.reason if isinstance(memo, str) else "known triplet"
        with self._passes_lock:
            self._passes.pop(memo, None)  # re-inserted last: the dict stays oldest first
            self._passes[memo] = (now + PASS_MEMO, reason)
            while len(self._passes) > PASS_MEMO_SIZE:
                del self._passes[next(iter(self._passes))]

    def _forget(self, client: str) -> None:
        """Drop the remembered passes of a client key (an admin change here)."""
        with self._passes_lock:
            for memo in [
                m for m in self._passes if client in (m, m[0] if isinstance(m, tuple) else m)
            ]:
                del self._passes[memo]

    def _guarded(self, decide: Callable[[], Outcome], *, write: bool) -> Outcome:
        """Run a decision on the backend; a store failure follows on_error."""
        try:
            outcome = self.backend.guarded(decide, write=write)
        except StoreError as exc:
            return self._fault(exc)
        self._works()
        return outcome

    def _check(self, client: str, sender: str, rcpt: str) -> Outcome:
        cfg = self.cfg
        now = int(self.clock())
        key = (client, sender, rcpt)
        with self.backend.transaction() as db:
            row = db.execute(SQL_CLIENT, (client,)).fetchone()
            if row and (row[1] or (row[0] is not None and row[0] > now)):
                why = ALLOWED if row[1] else WHITELISTED
                self._count_pass(db, client, now)
                return Outcome(True, why)
            t = self._lock_triplet(db, key, now)
            if t is None:
                return Outcome(False, "first attempt", int(cfg.delay))
            first, last, passed_at = t
            if passed_at is not None:
                if now - last <= cfg.expire:
                    db.execute(SQL_TOUCH, (now, *key))
                    self._count_pass(db, client, now)
                    return Outcome(True, "known triplet")
                return self._restart(db, key, now, "passed triplet expired")
            elapsed = now - first
            if elapsed < cfg.delay:
                db.execute(SQL_TOUCH, (now, *key))
                wait = int(cfg.delay) - elapsed
                return Outcome(False, f"retry too early ({elapsed}s of {int(cfg.delay)}s)", wait)
            if elapsed > cfg.retry_window:
                return self._restart(db, key, now, "retry came after the retry window")
            db.execute(SQL_PASSED, (now, now, *key))
            self._count_pass(db, client, now)
            return Outcome(True, f"retried after {elapsed}s")

    def _lock_triplet(
        self, db: Tx, key: tuple[str, str, str], now: int
    ) -> tuple[int, int, int | None] | None:
        """The triplet as it was, locked for this transaction; None: this attempt created it.

        Two hosts seeing a new triplet at once: one INSERT wins, the other does
        nothing (ON CONFLICT), then finds the winner's row and waits for its lock.
        """
        select = SQL_TRIPLET + self.backend.for_update
        for _ in range(3):
            t = db.execute(select, key).fetchone()
            if t is not None:
                return (int(t[0]), int(t[1]), None if t[2] is None else int(t[2]))
            if db.execute(SQL_INSERT, (*key, now, now)).fetchone() is not None:
                return None
            # inserted by someone else since our SELECT (and maybe purged again): look again
        raise StoreError("a triplet kept appearing and vanishing under this decision")

    def _restart(self, db: Tx, key: tuple[str, str, str], now: int, why: str) -> Outcome:
        db.execute(SQL_RESTART, (now, now, *key))
        return Outcome(False, f"{why}; starting over", int(self.cfg.delay))

    def _count_pass(self, db: Tx, client: str, now: int) -> None:
        if self.cfg.auto_whitelist <= 0:
            return
        row = db.execute(SQL_COUNT_PASSES, (client, now)).fetchone()
        if row is not None and int(row[0]) >= self.cfg.auto_whitelist:
            db.execute(SQL_WHITELIST, (now + int(self.cfg.expire), client))

    def peek(self, client: str, sender: str, rcpt: str) -> Outcome:
        """What check() would say now, without recording anything (the dry-run)."""
        sender, rcpt = normalize_sender(sender), rcpt.strip().strip("<>").lower()
        return self._guarded(lambda: self._peek(client, sender, rcpt), write=False)

    def _peek(self, client: str, sender: str, rcpt: str) -> Outcome:
        now = int(self.clock())
        with self.backend.transaction(write=False) as db:
            row = db.execute(SQL_CLIENT, (client,)).fetchone()
            if row and (row[1] or (row[0] is not None and row[0] > now)):
                return Outcome(True, "client whitelisted")
            t = db.execute(SQL_TRIPLET, (client, sender, rcpt)).fetchone()
        if t is None:
            return Outcome(False, "first attempt", int(self.cfg.delay))
        first, last, passed_at = t
        if passed_at is not None and now - last <= self.cfg.expire:
            return Outcome(True, "known triplet")
        elapsed = now - first
        if passed_at is None and self.cfg.delay <= elapsed <= self.cfg.retry_window:
            return Outcome(True, f"a retry now would pass ({elapsed}s)")
        return Outcome(False, "would be deferred", max(0, int(self.cfg.delay) - elapsed))

    # -- housekeeping -----------------------------------------------------

    def purge(self, batches: int | None = None) -> int:
        """Delete expired rows in small batches; returns how many were deleted.

        One host at a time: while another host purges the same database, this
        returns 0 at once.
        """
        cfg = self.cfg
        sql = SQL_PURGE_TRIPLETS.format(lock=self.backend.skip_locked)
        deleted = 0
        done = 0
        with self.backend.expiry_lock() as mine:
            if not mine:
                log.debug("greylist: another host is purging %s", self.describe())
                return 0
            while batches is None or done < batches:
                now = int(self.clock())
                with self.backend.transaction(housekeeping=True) as db:
                    n = db.execute(
                        sql,
                        (now - int(cfg.retry_window), now - int(cfg.expire), cfg.purge_batch),
                    ).rowcount
                    db.execute(SQL_PURGE_CLIENTS, (now - int(cfg.expire), now))
                deleted += n
                done += 1
                if n < cfg.purge_batch:
                    break
        return deleted

    def start_purger(self) -> None:
        """Purge in the background every purge_interval."""

        def loop() -> None:
            while not self._stop.wait(self.cfg.purge_interval):
                try:
                    n = self.purge()
                    if n:
                        log.info("greylist: purged %d expired rows", n)
                except StoreError as exc:
                    self.faults += 1
                    log.error("greylist purge failed: %s", exc)  # noqa: TRY400

        self._purger = threading.Thread(target=loop, name="heloguard-greylist-purge", daemon=True)
        self._purger.start()

    def close(self) -> None:
        """Stop the purger and release the backend's connections."""
        self._stop.set()
        self.backend.close()

    # -- admin ------------------------------------------------------------

    def allow(self, key: str) -> None:
        """Whitelist a client part until deleted."""
        now = int(self.clock())
        with self.backend.transaction(housekeeping=True) as db:
            db.execute(SQL_ALLOW, (key, now))

    def delete(self, key: str) -> int:
        """Forget a client part entirely; returns the rows deleted."""
        self._forget(key)
        with self.backend.transaction(housekeeping=True) as db:
            n = db.execute("DELETE FROM triplets WHERE client = ?", (key,)).rowcount
            n += db.execute("DELETE FROM clients WHERE client = ?", (key,)).rowcount
        return n

    def rows(self, limit: int = 1000) -> list[tuple[object, ...]]:
        """Triplets, most recent first."""
        with self.backend.transaction(write=False, housekeeping=True) as db:
            return [
                tuple(r)
                for r in db.execute(
                    "SELECT client, sender, rcpt, first_seen, last_seen, passed_at, attempts "
                    "FROM triplets ORDER BY last_seen DESC LIMIT ?",
                    (limit,),
                ).fetchmany(limit)
            ]

    def stats(self) -> dict[str, int]:
        """Counts for `heloguard greylist stats`."""
        now = int(self.clock())
        with self.backend.transaction(write=False, housekeeping=True) as db:

            def one(sql: str, *args: object) -> int:
                return int(db.execute(sql, args).fetchone()[0])

            return {
                "triplets": one("SELECT count(*) FROM triplets"),
                "pending": one("SELECT count(*) FROM triplets WHERE passed_at IS NULL"),
                "passed": one("SELECT count(*) FROM triplets WHERE passed_at IS NOT NULL"),
                "clients": one("SELECT count(*) FROM clients"),
                "whitelisted": one("SELECT count(*) FROM clients WHERE whitelisted_until > ?", now),
                "allowed_by_admin": one("SELECT count(*) FROM clients WHERE allowed_by_admin = 1"),
            }

    def copy_from(self, source: Greylist, batch: int = 1000) -> tuple[int, int]:
        """Merge every row of another store into this one: (triplets, clients) copied.

        For a migration (SQLite to PostgreSQL) and safe to repeat: rows are
        merged, never duplicated, and a copy into a store in use is fine.
        Each batch is its own transaction.
        """
        counts: list[int] = []
        for select, merge in (
            (SQL_EXPORT_TRIPLETS, SQL_MERGE_TRIPLET),
            (SQL_EXPORT_CLIENTS, SQL_MERGE_CLIENT),
        ):
            n = 0
            with source.backend.transaction(write=False, housekeeping=True) as src:
                cursor = src.execute(select, ())
                while rows := cursor.fetchmany(batch):
                    with self.backend.transaction(housekeeping=True) as dst:
                        dst.executemany(merge, [tuple(r) for r in rows])
                    n += len(rows)
            counts.append(n)
        return counts[0], counts[1]
