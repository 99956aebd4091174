"""Greylisting: behaviour through delay, window and expiry (an injected clock),
keys that follow pools and networks, and a store that survives crashes and
reports every kind of database failure instead of dying.

The behaviour suite runs on both backends (the ``stores`` fixture is
parametrized): SQLite in a temporary file, and PostgreSQL in a fresh
database of a real server that the tests start themselves
(tests/pgserver.py; one cluster per test session).  Faults that belong to a
file (corrupt, read-only, full, locked) are SQLite's; PostgreSQL's own
(down, frozen, slow, shared by two hosts) are in test_greylist_pg.py.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from heloguard.config import Duration, GreylistConfig
from heloguard.greylist import (
    PASS_MEMO,
    READERS_MAX,
    SCHEMA_VERSION,
    Greylist,
    Outcome,
    SqliteBackend,
    admin_key,
    client_key,
    normalize_sender,
)

import pgserver

DAY = 86400
BACKENDS = ["sqlite", "postgresql"]


class Clock:
    def __init__(self) -> None:
        self.t = 1_700_000_000.0

    def __call__(self) -> float:
        return self.t


class Stores:
    """Makes greylist stores on one backend, all on the same database, and closes them."""

    def __init__(self, backend: str, tmp_path: Path) -> None:
        self.backend = backend
        self.server: pgserver.PgServer | None = None
        self.dsn = ""
        self.base: dict[str, Any] = {"database": str(tmp_path / "grey.sqlite")}
        if backend == "postgresql":
            self.server = pgserver.require()
            self.dsn = self.server.create_database()
            # a loaded test machine must not turn a slow decision into a failure here
            self.base = {"backend": "postgresql", "dsn": self.dsn, "db_timeout": 5.0}
        self.made: list[Greylist] = []

    def config(self, **kw: Any) -> GreylistConfig:
        return GreylistConfig(**{**self.base, **kw})

    def __call__(self, **kw: Any) -> tuple[Greylist, Clock]:
        clock = Clock()
        g = Greylist(self.config(**kw), clock=clock)
        self.made.append(g)
        return g, clock

    def sql(self, statement: str) -> list[tuple[Any, ...]]:
        """Run one statement on the store's database, outside heloguard."""
        if self.server is not None:
            with psycopg.connect(self.dsn, autocommit=True) as conn:
                cur = conn.execute(statement.encode())
                return list(cur.fetchall()) if cur.description else []
        conn2 = sqlite3.connect(self.base["database"], isolation_level=None)
        try:
            return list(conn2.execute(statement).fetchall())
        finally:
            conn2.close()

    def close(self) -> None:
        for g in self.made:
            g.close()
        if self.server is not None:
            self.server.drop_database(self.dsn)


@pytest.fixture(params=BACKENDS)
def stores(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Stores]:
    """Greylist stores on SQLite, then on PostgreSQL."""
    made = Stores(request.param, tmp_path)
    yield made
    made.close()


T = ("net:192.0.2.0/24", "alice@example.org", "bob@example.test")


def test_first_early_pass_known(stores: Stores) -> None:
    g, clock = stores()
    first = g.check(*T)
    assert not first.passed and first.reason == "first attempt" and first.retry_in == 300
    clock.t += 120
    early = g.check(*T)
    assert not early.passed and "too early" in early.reason and early.retry_in == 180
    clock.t += 200
    retried = g.check(*T)
    assert retried.passed and retried.reason.startswith("retried after 320s")
    clock.t += 10 * DAY
    assert g.check(*T).reason == "known triplet"
    assert g.faults == 0


def test_a_recent_pass_is_answered_without_the_store(stores: Stores) -> None:
    """Within PASS_MEMO of a pass the store is not asked again; after it, it is."""
    g, clock = stores()
    g.check(*T)
    clock.t += 400
    assert g.check(*T).passed
    attempts = stores.sql("SELECT attempts, last_seen FROM triplets")
    for _ in range(5):
        clock.t += 10
        again = g.check(*T)
        assert again.passed and again.reason == "known triplet"
    assert stores.sql("SELECT attempts, last_seen FROM triplets") == attempts, "nothing written"
    clock.t += PASS_MEMO
    assert g.check(*T).reason == "known triplet"
    (after,) = stores.sql("SELECT attempts, last_seen FROM triplets")
    assert after == (attempts[0][0] + 1, int(clock.t)), "past the memo the store is asked"


def test_a_remembered_pass_lasts_at_most_pass_memo_after_a_delete(stores: Stores) -> None:
    """Another process (the admin command) deletes the client: this daemon may pass it
    for at most PASS_MEMO more; a delete through this daemon's own store is at once."""
    g, clock = stores()
    admin, _ = stores()
    g.check(*T)
    clock.t += 400
    assert g.check(*T).passed
    assert admin.delete(T[0]) >= 1
    clock.t += PASS_MEMO - 1
    assert g.check(*T).passed, "remembered"
    clock.t += 2
    assert g.check(*T).reason == "first attempt", "the memo ran out: the store decides"
    clock.t += 400
    assert g.check(*T).passed
    assert g.delete(T[0]) >= 1
    assert g.check(*T).reason == "first attempt", "a delete here forgets at once"


def test_retry_after_the_window_starts_over(stores: Stores) -> None:
    g, clock = stores()
    g.check(*T)
    clock.t += 2 * DAY + 1
    late = g.check(*T)
    assert not late.passed and "after the retry window" in late.reason
    clock.t += 301
    assert g.check(*T).passed


def test_passed_triplet_expires_after_35_days(stores: Stores) -> None:
    g, clock = stores(auto_whitelist=0)
    g.check(*T)
    clock.t += 400
    assert g.check(*T).passed
    clock.t += 35 * DAY + 1
    again = g.check(*T)
    assert not again.passed and "expired" in again.reason


def test_auto_whitelist_after_n_passes_counted_hourly(stores: Stores) -> None:
    g, clock = stores(auto_whitelist=3)
    client = "domain:bigsender.example"
    for i in range(3):
        triplet = (client, f"news{i}@bigsender.example", "bob@example.test")
        g.check(*triplet)
        clock.t += 400
        assert g.check(*triplet).passed
        # more passes within the hour do not count
        assert g.check(*triplet).passed
        clock.t += 3600
    fresh = g.check(client, "someone-new@bigsender.example", "carol@example.test")
    assert fresh.passed and "whitelisted" in fresh.reason
    assert g.stats()["whitelisted"] == 1
    assert stores.sql("SELECT passes FROM clients") == [(4,)], "the whitelisted pass counts too"


def test_sender_and_recipient_are_normalized_in_the_key(stores: Stores) -> None:
    g, clock = stores()
    g.check("net:192.0.2.0/24", "<Bounce+1234@Example.ORG>", "<Bob@Example.TEST>")
    clock.t += 400
    retry = g.check("net:192.0.2.0/24", "bounce+9876@example.org", "bob@example.test")
    assert retry.passed, retry


def test_peek_records_nothing(stores: Stores) -> None:
    g, clock = stores()
    assert g.peek(*T).reason == "first attempt"
    assert g.stats()["triplets"] == 0
    g.check(*T)
    assert not g.peek(*T).passed
    clock.t += 400
    assert g.peek(*T).passed and "would pass" in g.peek(*T).reason
    assert g.stats()["pending"] == 1, "peek passed nothing"
    assert g.check(*T).passed


def test_pool_sender_retrying_from_another_address_passes() -> None:
    """Outlook-style: the retry comes from another address of the verified domain."""
    cfg = GreylistConfig()
    a = client_key(
        ipaddress.ip_address("40.107.1.2"),
        ("mail-am6eur05on2099.outbound.protection.outlook.com",),
        cfg,
    )
    b = client_key(
        ipaddress.ip_address("52.100.9.9"),
        ("mail-db8eur05on2111.outbound.protection.outlook.com",),
        cfg,
    )
    assert a == b == "domain:outlook.com"


def test_generic_or_unverified_clients_are_keyed_by_network() -> None:
    cfg = GreylistConfig()
    generic = client_key(ipaddress.ip_address("73.1.2.3"), ("c-73-1-2-3.hsd1.ca.comcast.net",), cfg)
    assert generic == "net:73.1.2.0/24"
    assert client_key(ipaddress.ip_address("73.1.2.3"), (), cfg) == "net:73.1.2.0/24"
    v6 = client_key(ipaddress.ip_address("2a02:8108:1:2:3:4:5:6"), (), cfg)
    assert v6 == "net:2a02:8108:1:2::/64"
    assert client_key(ipaddress.ip_address("2a02:8108:1:2:ffff::1"), (), cfg) == v6
    assert (
        client_key(ipaddress.ip_address("73.1.2.3"), (), GreylistConfig(ipv4_mask=32))
        == "net:73.1.2.3/32"
    )


@pytest.mark.parametrize(
    ("raw", "normal"),
    [
        ("Alice@Example.ORG", "alice@example.org"),
        ("<alice+news@example.org>", "alice@example.org"),
        ("prvs=1234abcd=bounce@example.org", "bounce@example.org"),
        ("bounce-1234-5678@lists.example.org", "bounce-#-#@lists.example.org"),
        ("", ""),
    ],
)
def test_sender_normalization(raw: str, normal: str) -> None:
    assert normalize_sender(raw) == normal


def test_admin_allow_and_delete(stores: Stores) -> None:
    g, _ = stores()
    key = admin_key("192.0.2.77", g.cfg)
    assert key == "net:192.0.2.0/24"
    g.allow(key)
    g.allow(key)  # twice is the same as once
    assert g.check(key, "x@example.org", "y@example.test").passed
    assert g.stats()["allowed_by_admin"] == 1
    assert g.delete(key) >= 1
    assert not g.check(key, "x@example.org", "y@example.test").passed
    assert admin_key("example.com", g.cfg) == "domain:example.com"


def test_rows_most_recent_first(stores: Stores) -> None:
    g, clock = stores()
    for i in range(3):
        g.check("net:192.0.2.0/24", "s@example.org", f"r{i}@example.test")
        clock.t += 10
    rows = g.rows(limit=2)
    assert [r[2] for r in rows] == ["r2@example.test", "r1@example.test"]
    assert rows[0][3:] == (1_700_000_020, 1_700_000_020, None, 1)


def test_purge_in_batches_keeps_the_table_bounded(stores: Stores) -> None:
    g, clock = stores(purge_batch=7)
    for i in range(50):
        g.check("net:192.0.2.0/24", "s@example.org", f"r{i}@example.test")
    clock.t += 2 * DAY + 10  # never retried: stale after the retry window
    g.check("net:198.51.100.0/24", "fresh@example.org", "r@example.test")
    assert g.purge(batches=1) == 7
    assert g.purge() == 43
    assert g.stats()["triplets"] == 1


def test_concurrent_first_attempts_agree(stores: Stores) -> None:
    """Eight threads see the same new triplets at once: each triplet is new exactly once."""
    g, _ = stores()
    g.connect().close()  # created and migrated first, as the daemon does at start
    triplets = [("net:192.0.2.0/24", "s@example.org", f"r{i}@example.test") for i in range(40)]
    results: list[list[str]] = [[] for _ in range(8)]
    start = threading.Barrier(8)

    def work(n: int) -> None:
        start.wait()
        results[n] = [g.check(*t).reason for t in triplets]

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(len(triplets)):
        reasons = [r[i] for r in results]
        assert reasons.count("first attempt") == 1, reasons
        assert all(r == "first attempt" or "too early" in r for r in reasons), reasons
    assert g.faults == 0
    assert stores.sql("SELECT sum(attempts) FROM triplets") == [(8 * len(triplets),)]


def test_schema_versioned_and_newer_refused(stores: Stores) -> None:
    g, _ = stores()
    g.check(*T)
    if stores.backend == "sqlite":
        assert stores.sql("PRAGMA user_version") == [(SCHEMA_VERSION,)]
        assert stores.sql("PRAGMA journal_mode") == [("wal",)]
        stores.sql("PRAGMA user_version = 99")
    else:
        assert stores.sql("SELECT version FROM heloguard_schema") == [(SCHEMA_VERSION,)]
        stores.sql("UPDATE heloguard_schema SET version = 99")
    fresh, _ = stores()
    outcome = fresh.check(*T)
    assert outcome.error and outcome.passed  # on_error accept
    assert "newer" in outcome.reason
    assert fresh.faults == 1


def test_copy_merges_and_can_be_repeated(stores: Stores, tmp_path: Path) -> None:
    """A host's SQLite store copied into this one: what it knew holds here."""
    clock = Clock()
    old = Greylist(GreylistConfig(database=str(tmp_path / "old.sqlite")), clock=clock)
    old.check(*T)  # first attempt seen by the old store only
    known = ("domain:example.net", "x@example.net", "y@example.test")
    old.check(*known)
    clock.t += 400
    old.check(*known)  # passed there
    old.allow("domain:partner.example")
    g, gclock = stores()
    g.check("net:198.51.100.0/24", "own@example.org", "r@example.test")
    assert g.copy_from(old) == (2, 2)
    assert g.copy_from(old) == (2, 2), "a second copy merges"
    stats = g.stats()
    assert (stats["triplets"], stats["clients"], stats["allowed_by_admin"]) == (3, 2, 1)
    gclock.t = clock.t
    assert g.check(*T).passed, "the retry of an attempt first seen by the old store passes"
    assert g.check(*known).reason == "known triplet"
    assert g.check("domain:partner.example", "a@partner.example", "b@example.test").passed
    old.close()


# -- the store under faults ------------------------------------------------------


@pytest.mark.parametrize(("policy", "passed"), [("accept", True), ("tempfail", False)])
def test_corrupt_database_follows_the_policy(
    tmp_path: Path, policy: str, passed: bool, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "grey.sqlite"
    garbage = b"this is not a database" * 100
    path.write_bytes(garbage)
    g = Greylist(GreylistConfig(database=str(path), on_error=policy))  # type: ignore[arg-type]
    outcome = g.check(*T)
    assert outcome.error and outcome.passed is passed
    assert "greylist database failure" in caplog.text
    assert path.read_bytes() == garbage, "the file is never rewritten or deleted"


def sqlite_store(tmp_path: Path, **kw: Any) -> tuple[Greylist, Clock]:
    clock = Clock()
    cfg = GreylistConfig(database=str(tmp_path / "grey.sqlite"), **kw)
    return Greylist(cfg, clock=clock), clock


def test_read_only_database(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    g, _ = sqlite_store(tmp_path)
    g.check(*T)  # create it
    ro = Greylist(GreylistConfig(database=f"file:{tmp_path / 'grey.sqlite'}?mode=ro"))
    outcome = ro.check("net:198.51.100.0/24", "a@example.org", "b@example.test")
    assert outcome.error and outcome.passed
    assert "readonly" in outcome.reason.replace("-", "").lower() or "read-only" in outcome.reason


def test_reads_on_new_thread_states_share_connections(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """pymilter makes a Python thread state for every milter connection, and
    thread-local data is per thread state: a warn-mode read (peek) must not open
    a database connection per session.  A thread per read stands for that here."""
    g, _ = sqlite_store(tmp_path)
    g.check(*T)
    backend = g.backend
    assert isinstance(backend, SqliteBackend)
    opened: list[sqlite3.Connection] = []
    connect = backend.connect

    def counted() -> sqlite3.Connection:
        opened.append(connect())
        return opened[-1]

    monkeypatch.setattr(backend, "connect", counted)
    reasons: list[str] = []
    for _ in range(50):
        t = threading.Thread(target=lambda: reasons.append(g.peek(*T).reason))
        t.start()
        t.join()
    assert reasons == ["would be deferred"] * 50
    assert len(opened) == 1, "one read connection, taken and given back by every thread"
    g.close()
    with pytest.raises(sqlite3.ProgrammingError):
        opened[0].execute("SELECT 1")  # close() closed the idle reader


def _burst_of_peeks(
    g: Greylist, monkeypatch: pytest.MonkeyPatch, readers: int, late: bool
) -> tuple[list[str], list[sqlite3.Connection], list[Outcome]]:
    """``readers`` threads peek at once while every new read connection is held
    open until all ``READERS_MAX`` are; with ``late``, one more peek is made
    while they are held.  Returns the reasons, the connections opened and the
    late outcome."""
    backend = g.backend
    assert isinstance(backend, SqliteBackend)
    connect = backend.connect
    opened: list[sqlite3.Connection] = []
    hold = threading.Event()
    lock = threading.Lock()

    def held() -> sqlite3.Connection:
        conn = connect()
        with lock:
            opened.append(conn)
        hold.wait(10)
        return conn

    monkeypatch.setattr(backend, "connect", held)
    reasons: list[str] = []
    threads = [
        threading.Thread(target=lambda: reasons.append(g.peek(*T).reason)) for _ in range(readers)
    ]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 10
    while len(opened) < READERS_MAX and time.monotonic() < deadline:
        time.sleep(0.01)
    outcomes = [g.peek(*T)] if late else []
    hold.set()
    for t in threads:
        t.join()
    return reasons, opened, outcomes


def test_a_burst_of_reads_opens_at_most_readers_max(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Hundreds of milter connections reading at once share ``READERS_MAX``
    connections; the rest wait for one given back."""
    g, _ = sqlite_store(tmp_path)
    g.check(*T)
    reasons, opened, _ = _burst_of_peeks(g, monkeypatch, READERS_MAX + 20, late=False)
    assert len(opened) == READERS_MAX
    assert reasons == ["would be deferred"] * (READERS_MAX + 20)
    g.close()


def test_a_read_waiting_past_busy_timeout_is_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A read that finds every connection busy for busy_timeout is a store error
    (the caller's safe path), not one more connection."""
    g, _ = sqlite_store(tmp_path, busy_timeout=Duration(0.2))
    g.check(*T)
    reasons, opened, late = _burst_of_peeks(g, monkeypatch, READERS_MAX, late=True)
    assert len(opened) == READERS_MAX
    assert late[0].error and "read connections busy for 0.2 s" in late[0].reason
    assert reasons == ["would be deferred"] * READERS_MAX
    g.close()


def test_full_database(tmp_path: Path) -> None:
    g, _ = sqlite_store(tmp_path)
    g.check(*T)
    assert isinstance(g.backend, SqliteBackend)
    backend = g.backend

    def limit() -> None:  # on the committer's own connection, where decisions run
        conn = backend._conn()
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        conn.execute(f"PRAGMA max_page_count = {pages + 2}")

    backend.guarded(limit)
    outcomes = [
        g.check("net:192.0.2.0/24", "a@example.org", f"{'x' * 200}{i}@example.test")
        for i in range(200)
    ]
    assert any(o.error and "full" in o.reason for o in outcomes)
    assert all(o.passed for o in outcomes if o.error), "accept without greylisting by default"


def test_locked_database(tmp_path: Path) -> None:
    g, _ = sqlite_store(tmp_path, busy_timeout=0.2)
    g.check(*T)
    blocker = sqlite3.connect(tmp_path / "grey.sqlite", isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")
    try:
        started = time.monotonic()
        outcome = Greylist(g.cfg).check("net:198.51.100.0/24", "a@example.org", "b@example.test")
        assert outcome.error and outcome.passed and "locked" in outcome.reason
        assert time.monotonic() - started < 5
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()


def test_trouble_is_logged_once_and_its_end_too(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A locked database fails every decision: one log line when it starts, one when it ends."""
    caplog.set_level(logging.INFO, "heloguard.greylist")
    g, _ = sqlite_store(tmp_path, busy_timeout=0.05)
    g.check(*T)
    blocker = sqlite3.connect(tmp_path / "grey.sqlite", isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")
    outcomes = [
        g.check("net:198.51.100.0/24", "a@example.org", f"{i}@example.test") for i in range(5)
    ]
    blocker.execute("ROLLBACK")
    blocker.close()
    assert all(o.error and o.passed for o in outcomes)
    assert g.faults == 5
    assert not g.check("net:198.51.100.0/24", "a@example.org", "b@example.test").error
    lines = [r.getMessage() for r in caplog.records if r.name == "heloguard.greylist"]
    assert len([m for m in lines if m.startswith("greylist database failure")]) == 1, lines
    assert [m for m in lines if "works again" in m] == [
        next(m for m in lines if "works again" in m)
    ]
    assert any("failed=5 on_error=accept" in m for m in lines), lines


WRITER = textwrap.dedent(
    """
    import json, sys
    from heloguard.config import GreylistConfig
    from heloguard.greylist import Greylist
    g = Greylist(GreylistConfig(**json.loads(sys.argv[1])))
    n = sys.argv[2]
    i = 0
    while True:
        o = g.check(f"net:10.{n}.0.0/24", "w@example.org", f"r{i}@example.test")
        if not o.error:
            print(i, flush=True)  # committed
        i += 1
    """
)


def test_kill_9_under_concurrent_writes_keeps_committed_rows(stores: Stores) -> None:
    stores()[0].connect().close()
    env = dict(os.environ, PYTHONSAFEPATH="1")
    writers = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, json.dumps(stores.base), str(n)],
            stdout=subprocess.PIPE,
            env=env,
            text=True,
        )
        for n in range(4)
    ]
    committed: dict[int, list[int]] = {n: [] for n in range(len(writers))}

    def read(n: int, w: subprocess.Popen[str]) -> None:
        assert w.stdout is not None
        with w.stdout:
            for line in w.stdout:
                committed[n].append(int(line))

    readers = [threading.Thread(target=read, args=(n, w)) for n, w in enumerate(writers)]
    for r in readers:
        r.start()
    deadline = time.monotonic() + 60  # a loaded machine starts Python slowly
    while time.monotonic() < deadline and min(len(v) for v in committed.values()) < 20:
        time.sleep(0.05)
    time.sleep(0.2)  # and kill them in full flight
    for w in writers:
        w.send_signal(signal.SIGKILL)
    for w, r in zip(writers, readers, strict=True):
        w.wait()
        r.join()
    assert sum(len(v) for v in committed.values()) > 50, "the writers made progress"
    if stores.backend == "sqlite":
        assert stores.sql("PRAGMA integrity_check") == [("ok",)]
    rows = stores.sql("SELECT client, rcpt FROM triplets")
    for n, done in committed.items():
        rcpts = {rcpt for client, rcpt in rows if client == f"net:10.{n}.0.0/24"}
        missing = [i for i in done if f"r{i}@example.test" not in rcpts]
        assert not missing, f"writer {n} lost committed rows {missing[:5]}"
    g, _ = stores()
    assert (
        g.check("net:192.0.2.0/24", "after@example.org", "r@example.test").reason == "first attempt"
    )


def test_store_logs_once_per_failure(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, "heloguard.greylist")
    g = Greylist(GreylistConfig(database=str(tmp_path / "missing-dir" / "x" / "g.sqlite")))
    assert not g.check(*T).error  # the folder is created


@pytest.mark.parametrize(
    ("dsn", "shown"),
    [
        ("host=db user=hg password=s3cr3t dbname=grey", "host=db user=hg password=*** dbname=grey"),
        ("host=db password='a b\\' c' dbname=x", "host=db password=*** dbname=x"),
        ("postgresql://hg:s3cr3t@db.example/grey", "postgresql://hg:***@db.example/grey"),
        ("postgresql://hg@db/grey", "postgresql://hg@db/grey"),
    ],
)
def test_config_check_never_prints_a_database_password(dsn: str, shown: str) -> None:
    from heloguard.config import from_mapping
    from heloguard.configdump import dump

    text = dump(from_mapping({"greylist": {"backend": "postgresql", "dsn": dsn}}))
    assert f"dsn = {json.dumps(shown)}" in text
    assert "s3cr3t" not in text and "b\\' c" not in text


def test_the_committer_retires_when_idle_and_comes_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A store a reload replaced must not keep a thread; the next decision starts one."""
    import heloguard.greylist as greylist_module

    monkeypatch.setattr(greylist_module, "COMMITTER_IDLE", 0.2)
    g, _ = sqlite_store(tmp_path)
    assert isinstance(g.backend, SqliteBackend)
    assert not g.check(*T).passed  # first attempt: greylisted, through the committer
    committer = g.backend._committer
    assert committer is not None and committer.is_alive()
    committer.join(timeout=5)
    assert not committer.is_alive() and g.backend._committer is None, "retired when idle"
    again = g.check(*T)
    assert not again.passed and not again.error, "a new committer answered"
    g.close()
    assert g.backend._committer is None
    assert g.check(*T).error is False, "usable after close, as before"
