"""The PostgreSQL greylist backend against a real server (tests/pgserver.py).

The behaviour suite itself runs on both backends in test_greylist.py.  Here
is what only a shared, networked database has: several heloguard stores and
daemons on one database (a retry first seen by one MX passes on another,
and hosts deciding at the same moment agree), the database stopped, frozen
or slow in the middle of a run (each decision follows ``on_error`` within
``db_timeout``, and the store recovers by itself when the database is back,
with no restart), expiry by one host at a time (the advisory lock), the
schema's migration, the admin commands, and the copy from SQLite.

One cluster per test session, a fresh database per test.  No timing is
asserted; a decision that waited for a frozen database would hang the test,
so that one runs under a watchdog.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from miltertest import run_session

from heloguard.config import ConfigError, Duration, GreylistConfig, from_mapping
from heloguard.greylist import SCHEMA_VERSION, Greylist, Outcome
from heloguard.greylist_pg import EXPIRY_LOCK

import pgserver
from conftest import run_cli, write_toml

DAY = 86400
T = ("net:192.0.2.0/24", "alice@example.org", "bob@example.test")
GOOD: dict[str, Any] = {"ip": "64.71.1.10", "helo": "ukiah.firemountain.net"}
# db_timeout where the database is not the subject: a loaded test machine must
# not turn a slow decision into a failure.  Where it is, the default (500 ms).
SLOW_OK = Duration(5.0)


class Clock:
    def __init__(self) -> None:
        self.t = 1_700_000_000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def pg() -> pgserver.PgServer:
    """The session's PostgreSQL server, running."""
    return pgserver.require()


@pytest.fixture
def pg_dsn(pg: pgserver.PgServer) -> Iterator[str]:
    """A fresh database for this test."""
    dsn = pg.create_database()
    yield dsn
    pg.start()  # a test that stopped the server may have failed before starting it again
    pg.drop_database(dsn)


StoreFactory = Callable[..., tuple[Greylist, Clock]]


@pytest.fixture
def store(pg_dsn: str) -> Iterator[StoreFactory]:
    """``store(**greylist_keys)``: a PostgreSQL greylist store on this test's database."""
    made: list[Greylist] = []

    def make(**kw: Any) -> tuple[Greylist, Clock]:
        clock = Clock()
        kw.setdefault("db_timeout", SLOW_OK)
        g = Greylist(GreylistConfig(backend="postgresql", dsn=pg_dsn, **kw), clock=clock)
        made.append(g)
        return g, clock

    yield make
    for g in made:
        g.close()


def sql(dsn: str, statement: str, *args: object) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        cur = conn.execute(statement.encode(), args)
        return list(cur.fetchall()) if cur.description else []


def until_it_works(g: Greylist, *triplet: str) -> Outcome:
    """Decide until the store works again (it recovers by itself; no deadline is a result)."""
    deadline = time.monotonic() + 60
    while True:
        outcome = g.check(*triplet)
        if not outcome.error:
            return outcome
        assert time.monotonic() < deadline, f"the store did not recover: {outcome.reason}"
        time.sleep(0.1)


# -- configuration ------------------------------------------------------------------


def test_postgresql_without_a_dsn_is_a_config_error_naming_the_key() -> None:
    with pytest.raises(ConfigError) as err:
        from_mapping({"greylist": {"backend": "postgresql"}})
    assert err.value.key == "greylist.dsn"
    assert "required" in str(err.value)


@pytest.mark.parametrize(
    ("table", "key"),
    [
        ({"backend": "postgresql", "dsn": "host=db.example port"}, "greylist.dsn"),
        ({"backend": "mysql"}, "greylist.backend"),
        ({"db_timeout": "0s"}, "greylist.db_timeout"),
        ({"db_timeout": "30s"}, "greylist.db_timeout"),
        ({"pool_size": 0}, "greylist.pool_size"),
    ],
)
def test_bad_postgresql_settings_name_their_key(table: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as err:
        from_mapping({"greylist": table})
    assert err.value.key == key, err.value


def test_sqlite_users_never_import_psycopg(tmp_path: Path) -> None:
    code = textwrap.dedent(
        f"""
        import sys
        from heloguard.config import from_mapping
        from heloguard.greylist import Greylist
        import heloguard.session, heloguard.daemon, heloguard.cli
        cfg = from_mapping({{"greylist": {{"database": {str(tmp_path / "g.sqlite")!r}}}}})
        assert cfg.greylist is not None
        print(Greylist(cfg.greylist).check("net:192.0.2.0/24", "a@b.example", "c@d.example"))
        print(sorted(m for m in sys.modules if m.startswith("psycopg")))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONSAFEPATH="1"),
        timeout=60,
        check=True,
    ).stdout
    assert "first attempt" in out
    assert out.splitlines()[-1] == "[]", out


# -- the schema ---------------------------------------------------------------------


def test_hosts_starting_together_migrate_once(pg_dsn: str, store: StoreFactory) -> None:
    stores = [store()[0] for _ in range(4)]
    errors: list[BaseException] = []

    def start(g: Greylist) -> None:
        try:
            g.connect().close()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=start, args=(g,)) for g in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sql(pg_dsn, "SELECT version FROM heloguard_schema") == [(SCHEMA_VERSION,)]
    tables = sql(
        pg_dsn,
        "SELECT tablename FROM pg_tables WHERE schemaname = current_schema() ORDER BY 1",
    )
    assert tables == [("clients",), ("heloguard_schema",), ("triplets",)]


# -- several hosts, one database -------------------------------------------------------


def test_a_retry_first_seen_by_one_host_passes_on_another(store: StoreFactory) -> None:
    mx1, clock1 = store()
    mx2, clock2 = store()
    assert mx1.check(*T).reason == "first attempt"
    clock2.t = clock1.t + 120
    early = mx2.check(*T)
    assert not early.passed and "too early" in early.reason, "mx2 knows mx1's first attempt"
    clock2.t = clock1.t + 400
    assert mx2.check(*T).reason == "retried after 400s"
    clock1.t = clock2.t + 10
    assert mx1.check(*T).reason == "known triplet"


WORKER = textwrap.dedent(
    """
    import json, sys, threading
    from heloguard.config import GreylistConfig
    from heloguard.greylist import Greylist
    cfg, now, count = json.loads(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
    g = Greylist(GreylistConfig(**cfg), clock=lambda: now)
    g.connect().close()
    sys.stdin.readline()  # start together
    reasons = [[] for _ in range(4)]
    def work(n):
        for i in range(count):
            o = g.check("net:192.0.2.0/24", "s@example.org", f"r{i}@example.test")
            reasons[n].append("error: " + o.reason if o.error else o.reason)
    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(json.dumps(reasons))
    g.close()
    """
)


def test_two_processes_deciding_at_once_agree(pg_dsn: str) -> None:
    """Two heloguard processes, four threads each, the same new triplets at the same time."""
    cfg = json.dumps({"backend": "postgresql", "dsn": pg_dsn, "db_timeout": SLOW_OK})
    count = 100
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, cfg, "1700000000", str(count)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=dict(os.environ, PYTHONSAFEPATH="1"),
        )
        for _ in range(2)
    ]
    for p in procs:
        assert p.stdin is not None
        p.stdin.write("go\n")
        p.stdin.flush()
    results: list[list[str]] = []
    for p in procs:
        out, _ = p.communicate(timeout=120)
        assert p.returncode == 0
        results += json.loads(out)
    assert len(results) == 8
    errors = [r for rs in results for r in rs if r.startswith("error")]
    assert not errors, errors[:3]
    for i in range(count):
        reasons = [rs[i] for rs in results]
        assert reasons.count("first attempt") == 1, reasons
    assert sql(pg_dsn, "SELECT count(*), sum(attempts) FROM triplets") == [(count, 8 * count)]


def test_two_heloguard_daemons_share_one_database(start_milter: Any, pg_dsn: str) -> None:
    """A retry first seen by the first MX passes on the second (the milter protocol)."""
    grey = {"backend": "postgresql", "dsn": pg_dsn, "delay": "1s", "policy": "all"}
    config = {"greylist": {**grey, "db_timeout": "5s"}}
    mx1 = start_milter(config)
    mx2 = start_milter(config)
    assert "greylisting with PostgreSQL" in mx1.log()
    first = run_session(mx1.socket, **GOOD)
    assert first.rcpt is not None and first.rcpt.smtp_code == 451, first
    assert first.rcpt.text.startswith("451 4.7.1 Greylisted")
    time.sleep(1.2)  # the configured delay
    retry = run_session(mx2.socket, **GOOD)
    assert retry.rcpt is not None and retry.rcpt.code == "c", retry
    mx2.wait_for("greylist: retried after")


# -- the database stopped, frozen, slow ---------------------------------------------------


@pytest.mark.parametrize(("policy", "passed"), [("accept", True), ("tempfail", False)])
def test_database_stopped_and_started_mid_run(
    pg: pgserver.PgServer,
    store: StoreFactory,
    policy: str,
    passed: bool,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, "heloguard.greylist")
    g, clock = store(on_error=policy, db_timeout=0.5)
    assert g.check(*T).reason == "first attempt"
    pg.stop()
    try:
        down = [g.check(T[0], T[1], f"r{i}@example.test") for i in range(10)]
    finally:
        pg.start()
    assert all(o.error and o.passed is passed for o in down), down
    assert g.faults == 10
    clock.t += 400
    back = until_it_works(g, *T)
    assert back.reason == "retried after 400s", "the rows written before the stop are there"
    assert g.check(T[0], T[1], "new@example.test").reason == "first attempt"
    lines = [r.getMessage() for r in caplog.records if r.name == "heloguard.greylist"]
    failures = [m for m in lines if m.startswith("greylist database failure")]
    assert failures, lines
    assert len(failures) < 5, f"logged per kind of failure, not per decision: {failures}"
    assert all(f"on_error = {policy}" in m for m in failures)
    assert len([m for m in lines if "works again" in m]) == 1, lines


def test_database_crash_and_restart(pg: pgserver.PgServer, store: StoreFactory) -> None:
    """An immediate shutdown (as after a crash): in-flight connections die without a word."""
    g, _ = store(db_timeout=0.5)
    assert g.check(*T).reason == "first attempt"
    pg.stop(mode="immediate")
    try:
        assert g.check(*T).error
    finally:
        pg.start()
    assert "too early" in until_it_works(g, *T).reason


def test_frozen_database_never_holds_a_decision(pg: pgserver.PgServer, store: StoreFactory) -> None:
    """A server that accepts bytes and never answers: the decision follows on_error anyway."""
    g, _ = store(db_timeout=0.5)
    assert g.check(*T).reason == "first attempt"
    outcomes: list[Outcome] = []
    pg.freeze()
    try:
        watched = threading.Thread(
            target=lambda: outcomes.append(g.check(T[0], T[1], "frozen@example.test"))
        )
        watched.start()
        watched.join(60)
        assert not watched.is_alive(), "a decision waited for the frozen database"
        assert outcomes[0].error and outcomes[0].passed, outcomes
        assert "did not answer within 0.5 s" in outcomes[0].reason
    finally:
        pg.thaw()
    assert "too early" in until_it_works(g, *T).reason


def test_slow_database_lock_wait_follows_on_error(pg_dsn: str, store: StoreFactory) -> None:
    """Another session holds the table: the decision gives up instead of queueing behind it."""
    g, _ = store(db_timeout=0.2)
    assert g.check(*T).reason == "first attempt"
    with psycopg.connect(pg_dsn) as blocker:
        blocker.execute("LOCK TABLE triplets IN ACCESS EXCLUSIVE MODE")
        slow = g.check(*T)
        blocker.rollback()
    assert slow.error and slow.passed and "database failure" in slow.reason, slow
    assert "too early" in until_it_works(g, *T).reason


def test_daemon_keeps_serving_while_the_database_is_down(
    start_milter: Any, pg: pgserver.PgServer, pg_dsn: str
) -> None:
    """heloguard serve follows on_error while PostgreSQL is down, and greylists again after."""
    grey = {"backend": "postgresql", "dsn": pg_dsn, "delay": "1s", "policy": "all"}
    config = {"greylist": {**grey, "db_timeout": "2s"}}
    m = start_milter(config)
    first = run_session(m.socket, **GOOD, rcpt="first@example.test")
    assert first.rcpt is not None and first.rcpt.smtp_code == 451
    pg.stop()
    try:
        down = run_session(m.socket, **GOOD, rcpt="down@example.test")
        m.wait_for("greylist database failure")
    finally:
        pg.start()
    assert down.refusal() is None, "on_error = accept: mail flows without greylisting"
    deadline = time.monotonic() + 60
    for i in range(10_000):
        again = run_session(m.socket, **GOOD, rcpt=f"after{i}@example.test")
        assert again.rcpt is not None
        if again.rcpt.smtp_code == 451:
            break  # greylisting again, with the same daemon
        assert time.monotonic() < deadline, m.log()
        time.sleep(0.1)
    m.wait_for("greylist database works again")
    retry = run_session(m.socket, **GOOD, rcpt="first@example.test")
    assert retry.rcpt is not None and retry.rcpt.code == "c", "the first attempt was kept"


# -- expiry, one host at a time ---------------------------------------------------------


def test_expiry_is_done_by_one_host_at_a_time(pg_dsn: str, store: StoreFactory) -> None:
    mx1, clock1 = store()
    mx2, clock2 = store()
    for i in range(20):
        mx1.check("net:192.0.2.0/24", "s@example.org", f"r{i}@example.test")
    clock1.t = clock2.t = clock1.t + 3 * DAY  # all stale
    with psycopg.connect(pg_dsn, autocommit=True) as other_host:
        other_host.execute("SELECT pg_advisory_lock(%s)", (EXPIRY_LOCK,))
        assert mx1.purge() == 0, "another host holds the expiry lock"
        assert mx2.purge() == 0
        assert mx1.stats()["triplets"] == 20
        other_host.execute("SELECT pg_advisory_unlock(%s)", (EXPIRY_LOCK,))
    assert mx1.purge() == 20
    assert sql(pg_dsn, "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'") == [(0,)]
    mx2.check("net:198.51.100.0/24", "s@example.org", "r@example.test")
    clock2.t += 3 * DAY
    assert mx2.purge() == 1, "mx1 released the lock"


def test_purges_of_two_hosts_at_once_delete_each_row_once(store: StoreFactory) -> None:
    mx1, clock1 = store(purge_batch=50)
    mx2, clock2 = store(purge_batch=50)
    for i in range(500):
        mx1.check("net:192.0.2.0/24", "s@example.org", f"r{i}@example.test")
    clock1.t = clock2.t = clock1.t + 3 * DAY
    deleted: list[int] = []
    threads = [threading.Thread(target=lambda g=g: deleted.append(g.purge())) for g in (mx1, mx2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(deleted) == 500, deleted
    assert mx1.stats()["triplets"] == 0


# -- admin commands and the copy from SQLite --------------------------------------------


def test_admin_commands_work_against_postgresql(tmp_path: Path, pg_dsn: str) -> None:
    config = write_toml(
        tmp_path / "heloguard.toml", {"greylist": {"backend": "postgresql", "dsn": pg_dsn}}
    )
    g = Greylist(GreylistConfig(backend="postgresql", dsn=pg_dsn, db_timeout=SLOW_OK))
    g.check(*T)
    g.close()
    stats = run_cli("greylist", "--config", str(config), "stats")
    assert stats.code == 0, stats.stderr
    assert "triplets           1" in stats.stdout
    listed = run_cli("greylist", "--dsn", pg_dsn, "list")
    assert listed.code == 0 and "pending  net:192.0.2.0/24  <alice@example.org>" in listed.stdout
    allowed = run_cli("greylist", "--config", str(config), "allow", "203.0.113.9")
    assert allowed.stdout.strip() == "allowed net:203.0.113.0/24"
    assert sql(pg_dsn, "SELECT client FROM clients WHERE allowed_by_admin = 1") == [
        ("net:203.0.113.0/24",)
    ]
    deleted = run_cli("greylist", "--config", str(config), "delete", "192.0.2.1")
    assert deleted.stdout.strip() == "deleted 1 rows for net:192.0.2.0/24"
    purged = run_cli("greylist", "--config", str(config), "purge")
    assert purged.code == 0 and purged.stdout.strip() == "purged 0 expired rows"


def test_admin_command_with_the_database_down_exits_1(
    tmp_path: Path, pg: pgserver.PgServer
) -> None:
    dsn = f"host={pg.sockdir} port={pgserver.free_port()} dbname=nothing user=postgres"
    result = run_cli("greylist", "--dsn", dsn, "stats")
    assert result.code == 1
    assert "greylist database error: no connection to PostgreSQL" in result.stderr
    assert "\n" not in result.stderr.strip(), "one line"


def test_copy_from_sqlite_migrates_a_host(tmp_path: Path, pg_dsn: str) -> None:
    """One MX's SQLite store copied into the shared database: its retries pass there."""
    now = time.time()
    old_file = tmp_path / "greylist.sqlite"
    old = Greylist(GreylistConfig(database=str(old_file)), clock=lambda: now - 600)
    for i in range(30):
        old.check("net:192.0.2.0/24", "s@example.org", f"r{i}@example.test")
    old.allow("domain:partner.example")
    old.close()
    config = write_toml(
        tmp_path / "heloguard.toml", {"greylist": {"backend": "postgresql", "dsn": pg_dsn}}
    )
    before = old_file.read_bytes()
    copied = run_cli("greylist", "--config", str(config), "copy", "--from", str(old_file))
    assert copied.code == 0, copied.stderr
    assert copied.stdout.startswith("copied 30 triplets and 1 clients from ")
    assert "to PostgreSQL host=" in copied.stdout
    again = run_cli("greylist", "--config", str(config), "copy", "--from", str(old_file))
    assert again.stdout.startswith("copied 30 triplets and 1 clients"), "repeatable"
    assert old_file.read_bytes() == before, "the source is only read"
    g = Greylist(GreylistConfig(backend="postgresql", dsn=pg_dsn, db_timeout=SLOW_OK))
    try:
        assert g.stats()["triplets"] == 30
        retry = g.check("net:192.0.2.0/24", "s@example.org", "r7@example.test")
        assert retry.passed and retry.reason.startswith("retried after"), retry
        assert g.check("domain:partner.example", "a@partner.example", "b@example.test").passed
    finally:
        g.close()
    missing = run_cli("greylist", "--dsn", pg_dsn, "copy", "--from", str(tmp_path / "nope"))
    assert missing.code == 1 and "no such SQLite file" in missing.stderr
