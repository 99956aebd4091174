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

The store is SQLite (stdlib sqlite3) in WAL mode with a busy timeout, one
connection per thread, every decision one ``BEGIN IMMEDIATE`` transaction,
so writes from many libmilter threads are safe and a crash loses at most the
decisions in flight.  The schema is versioned (``PRAGMA user_version``) and
migrated step by step.  Expired rows are purged in small batches.  When the
database is locked, read-only, full or corrupt, heloguard logs the fault and
follows ``on_error`` (``accept`` without greylisting, default, or
``tempfail``); the file is never deleted or rewritten.

The clock is injectable so tests travel through delay, window and expiry.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from heloguard.answers import IPAddress
from heloguard.config import GreylistConfig
from heloguard.engine import Decision, Effect
from heloguard.hostclass import classify
from heloguard.names import registered_domain
from heloguard.rules.base import Reply

log = logging.getLogger("heloguard.greylist")

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
SQL_CLIENT = (
    "SELECT passes, last_counted, whitelisted_until, allowed_by_admin FROM clients WHERE client=?"
)
SQL_TRIPLET = (
    "SELECT first_seen, last_seen, passed_at FROM triplets WHERE client=? AND sender=? AND rcpt=?"
)
SQL_INSERT = "INSERT INTO triplets (client, sender, rcpt, first_seen, last_seen) VALUES (?,?,?,?,?)"
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
PASS_COUNT_INTERVAL = 3600  # at most one pass per client per hour counts towards the whitelist


@dataclass(frozen=True, slots=True)
class Outcome:
    """What greylisting says about one recipient."""

    passed: bool
    reason: str
    retry_in: int = 0  # seconds until a retry can pass (for a deferral)
    error: bool = False  # the store failed; the verdict follows on_error


class StoreError(Exception):
    """The database could not be used (locked, read-only, full, corrupt...)."""


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
    for name in verified:
        domain = registered_domain(name)
        if domain and not classify(name, client).generic:
            return f"domain:{domain}"
    mask = cfg.ipv4_mask if client.version == 4 else cfg.ipv6_mask
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


# -- the store ------------------------------------------------------------------


class Greylist:
    """The greylist store and its decisions."""

    def __init__(self, cfg: GreylistConfig, *, clock: Callable[[], float] = time.time) -> None:
        self.cfg = cfg
        self.clock = clock
        self._local = threading.local()
        self._purger: threading.Thread | None = None
        self._stop = threading.Event()
        self.faults = 0  # store failures seen (for the log and the metrics)

    # -- connections ------------------------------------------------------

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
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One BEGIN IMMEDIATE transaction; any database failure becomes StoreError."""
        try:
            conn = self._conn()
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            self._drop_conn()
            raise StoreError(str(exc)) from exc
        try:
            yield conn
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error:
                self._drop_conn()
            raise StoreError(str(exc)) from exc
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    # -- decisions --------------------------------------------------------

    def check(self, client: str, sender: str, rcpt: str) -> Outcome:
        """Record this attempt and say whether it passes (never raises)."""
        try:
            return self._check(client, normalize_sender(sender), rcpt.strip().strip("<>").lower())
        except StoreError as exc:
            self.faults += 1
            # a known kind of failure: the message says it all, no traceback
            log.error("greylist database failure (%s); on_error = %s", exc, self.cfg.on_error)  # noqa: TRY400
            return Outcome(self.cfg.on_error == "accept", f"database failure: {exc}", error=True)

    def _check(self, client: str, sender: str, rcpt: str) -> Outcome:
        cfg = self.cfg
        now = int(self.clock())
        key = (client, sender, rcpt)
        with self.transaction() as db:
            row = db.execute(SQL_CLIENT, (client,)).fetchone()
            if row and (row[3] or (row[2] is not None and row[2] > now)):
                why = (
                    "allowed by an admin" if row[3] else "client whitelisted after repeated passes"
                )
                self._count_pass(db, client, now, row)
                return Outcome(True, why)
            t = db.execute(SQL_TRIPLET, key).fetchone()
            if t is None:
                db.execute(SQL_INSERT, (*key, now, now))
                return Outcome(False, "first attempt", int(cfg.delay))
            first, last, passed_at = t
            if passed_at is not None:
                if now - last <= cfg.expire:
                    db.execute(SQL_TOUCH, (now, *key))
                    self._count_pass(db, client, now, row)
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
            self._count_pass(db, client, now, row)
            return Outcome(True, f"retried after {elapsed}s")

    def _restart(
        self, db: sqlite3.Connection, key: tuple[str, str, str], now: int, why: str
    ) -> Outcome:
        db.execute(SQL_RESTART, (now, now, *key))
        return Outcome(False, f"{why}; starting over", int(self.cfg.delay))

    def _count_pass(
        self, db: sqlite3.Connection, client: str, now: int, row: tuple[int, ...] | None
    ) -> None:
        if self.cfg.auto_whitelist <= 0:
            return
        if row is None:
            db.execute(
                "INSERT INTO clients (client, passes, last_counted) VALUES (?, 1, ?)", (client, now)
            )
            passes = 1
        elif now - row[1] >= PASS_COUNT_INTERVAL:
            passes = row[0] + 1
            db.execute(
                "UPDATE clients SET passes=?, last_counted=? WHERE client=?", (passes, now, client)
            )
        else:
            return
        if passes >= self.cfg.auto_whitelist:
            db.execute(
                "UPDATE clients SET whitelisted_until=? WHERE client=?",
                (now + int(self.cfg.expire), client),
            )

    def peek(self, client: str, sender: str, rcpt: str) -> Outcome:
        """What check() would say now, without recording anything (the dry-run)."""
        try:
            conn = self.connect()
        except StoreError as exc:
            return Outcome(self.cfg.on_error == "accept", f"database failure: {exc}", error=True)
        try:
            now = int(self.clock())
            sender, rcpt = normalize_sender(sender), rcpt.strip().strip("<>").lower()
            row = conn.execute(
                "SELECT whitelisted_until, allowed_by_admin FROM clients WHERE client=?", (client,)
            ).fetchone()
            if row and (row[1] or (row[0] is not None and row[0] > now)):
                return Outcome(True, "client whitelisted")
            t = conn.execute(SQL_TRIPLET, (client, sender, rcpt)).fetchone()
        except sqlite3.Error as exc:
            return Outcome(self.cfg.on_error == "accept", f"database failure: {exc}", error=True)
        finally:
            conn.close()
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
        """Delete expired rows in small batches; returns how many were deleted."""
        cfg = self.cfg
        deleted = 0
        done = 0
        while batches is None or done < batches:
            now = int(self.clock())
            with self.transaction() as db:
                cur = db.execute(
                    "DELETE FROM triplets WHERE (client, sender, rcpt) IN ("
                    " SELECT client, sender, rcpt FROM triplets"
                    " WHERE (passed_at IS NULL AND first_seen < ?) OR last_seen < ? LIMIT ?)",
                    (now - int(cfg.retry_window), now - int(cfg.expire), cfg.purge_batch),
                )
                n = cur.rowcount
                db.execute(
                    "DELETE FROM clients WHERE allowed_by_admin = 0 AND last_counted < ? "
                    "AND (whitelisted_until IS NULL OR whitelisted_until < ?)",
                    (now - int(cfg.expire), now),
                )
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
        """Stop the purger and close this thread's connection."""
        self._stop.set()
        self._drop_conn()

    # -- admin ------------------------------------------------------------

    def allow(self, key: str) -> None:
        """Whitelist a client part until deleted."""
        now = int(self.clock())
        with self.transaction() as db:
            db.execute(
                "INSERT INTO clients (client, passes, last_counted, allowed_by_admin) "
                "VALUES (?, 0, ?, 1) ON CONFLICT (client) DO UPDATE SET allowed_by_admin = 1",
                (key, now),
            )

    def delete(self, key: str) -> int:
        """Forget a client part entirely; returns the rows deleted."""
        with self.transaction() as db:
            n = db.execute("DELETE FROM triplets WHERE client = ?", (key,)).rowcount
            n += db.execute("DELETE FROM clients WHERE client = ?", (key,)).rowcount
        return n

    def rows(self, limit: int = 1000) -> list[tuple[object, ...]]:
        """Triplets, most recent first."""
        with self.transaction() as db:
            return list(
                db.execute(
                    "SELECT client, sender, rcpt, first_seen, last_seen, passed_at, attempts "
                    "FROM triplets ORDER BY last_seen DESC LIMIT ?",
                    (limit,),
                )
            )

    def stats(self) -> dict[str, int]:
        """Counts for `heloguard greylist stats`."""
        now = int(self.clock())
        with self.transaction() as db:

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
