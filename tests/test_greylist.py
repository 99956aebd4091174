"""Greylisting: behaviour through delay, window and expiry (an injected clock),
keys that follow pools and networks, and a store that survives crashes and
reports every kind of database failure instead of dying.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from heloguard.config import GreylistConfig
from heloguard.greylist import Greylist, admin_key, client_key, normalize_sender

DAY = 86400


class Clock:
    def __init__(self) -> None:
        self.t = 1_700_000_000.0

    def __call__(self) -> float:
        return self.t


def store(tmp_path: Path, **kw: object) -> tuple[Greylist, Clock]:
    clock = Clock()
    cfg = GreylistConfig(database=str(tmp_path / "grey.sqlite"), **kw)  # type: ignore[arg-type]
    return Greylist(cfg, clock=clock), clock


T = ("net:192.0.2.0/24", "alice@example.org", "bob@example.test")


def test_first_early_pass_known(tmp_path: Path) -> None:
    g, clock = store(tmp_path)
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


def test_retry_after_the_window_starts_over(tmp_path: Path) -> None:
    g, clock = store(tmp_path)
    g.check(*T)
    clock.t += 2 * DAY + 1
    late = g.check(*T)
    assert not late.passed and "after the retry window" in late.reason
    clock.t += 301
    assert g.check(*T).passed


def test_passed_triplet_expires_after_35_days(tmp_path: Path) -> None:
    g, clock = store(tmp_path, auto_whitelist=0)
    g.check(*T)
    clock.t += 400
    assert g.check(*T).passed
    clock.t += 35 * DAY + 1
    again = g.check(*T)
    assert not again.passed and "expired" in again.reason


def test_auto_whitelist_after_n_passes_counted_hourly(tmp_path: Path) -> None:
    g, clock = store(tmp_path, auto_whitelist=3)
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


def test_admin_allow_and_delete(tmp_path: Path) -> None:
    g, _ = store(tmp_path)
    key = admin_key("192.0.2.77", g.cfg)
    assert key == "net:192.0.2.0/24"
    g.allow(key)
    assert g.check(key, "x@example.org", "y@example.test").passed
    assert g.delete(key) >= 1
    assert not g.check(key, "x@example.org", "y@example.test").passed
    assert admin_key("example.com", g.cfg) == "domain:example.com"


def test_purge_in_batches_keeps_the_table_bounded(tmp_path: Path) -> None:
    g, clock = store(tmp_path, purge_batch=7)
    for i in range(50):
        g.check("net:192.0.2.0/24", "s@example.org", f"r{i}@example.test")
    clock.t += 2 * DAY + 10  # never retried: stale after the retry window
    g.check("net:198.51.100.0/24", "fresh@example.org", "r@example.test")
    assert g.purge(batches=1) == 7
    assert g.purge() == 43
    assert g.stats()["triplets"] == 1


def test_schema_versioned_and_newer_refused(tmp_path: Path) -> None:
    g, _ = store(tmp_path)
    g.check(*T)
    conn = sqlite3.connect(tmp_path / "grey.sqlite")
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 1
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.execute("PRAGMA user_version = 99")
    conn.close()
    fresh = Greylist(g.cfg)
    outcome = fresh.check(*T)
    assert outcome.error and outcome.passed  # on_error accept
    assert "newer" in outcome.reason


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


def test_read_only_database(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    g, _ = store(tmp_path)
    g.check(*T)  # create it
    ro = Greylist(GreylistConfig(database=f"file:{tmp_path / 'grey.sqlite'}?mode=ro"))
    outcome = ro.check("net:198.51.100.0/24", "a@example.org", "b@example.test")
    assert outcome.error and outcome.passed
    assert "readonly" in outcome.reason.replace("-", "").lower() or "read-only" in outcome.reason


def test_full_database(tmp_path: Path) -> None:
    g, _ = store(tmp_path)
    g.check(*T)
    conn = g._conn()
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    conn.execute(f"PRAGMA max_page_count = {pages + 2}")
    outcomes = [
        g.check("net:192.0.2.0/24", "a@example.org", f"{'x' * 200}{i}@example.test")
        for i in range(200)
    ]
    assert any(o.error and "full" in o.reason for o in outcomes)
    assert all(o.passed for o in outcomes if o.error), "accept without greylisting by default"


def test_locked_database(tmp_path: Path) -> None:
    g, _ = store(tmp_path, busy_timeout=0.2)
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


WRITER = textwrap.dedent(
    """
    import sys
    from heloguard.config import GreylistConfig
    from heloguard.greylist import Greylist
    g = Greylist(GreylistConfig(database=sys.argv[1]))
    n = sys.argv[2]
    i = 0
    while True:
        o = g.check(f"net:10.{n}.0.0/24", "w@example.org", f"r{i}@example.test")
        if not o.error:
            print(i, flush=True)  # committed
        i += 1
    """
)


def test_kill_9_under_concurrent_writes_keeps_committed_rows(tmp_path: Path) -> None:
    db = tmp_path / "grey.sqlite"
    Greylist(GreylistConfig(database=str(db))).connect().close()
    env = dict(os.environ, PYTHONSAFEPATH="1")
    writers = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, str(db), str(n)],
            stdout=subprocess.PIPE,
            env=env,
            text=True,
        )
        for n in range(4)
    ]
    time.sleep(2.0)
    for w in writers:
        w.send_signal(signal.SIGKILL)
    committed: dict[int, list[int]] = {}
    for n, w in enumerate(writers):
        out, _ = w.communicate()
        committed[n] = [int(x) for x in out.split()]
    assert sum(len(v) for v in committed.values()) > 50, "the writers made progress"
    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    for n, done in committed.items():
        senders = {
            row[0]
            for row in conn.execute(
                "SELECT rcpt FROM triplets WHERE client = ?", (f"net:10.{n}.0.0/24",)
            )
        }
        missing = [i for i in done if f"r{i}@example.test" not in senders]
        assert not missing, f"writer {n} lost committed rows {missing[:5]}"
    conn.close()
    g = Greylist(GreylistConfig(database=str(db)))
    assert (
        g.check("net:192.0.2.0/24", "after@example.org", "r@example.test").reason == "first attempt"
    )


def test_store_logs_once_per_failure(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, "heloguard.greylist")
    g = Greylist(GreylistConfig(database=str(tmp_path / "missing-dir" / "x" / "g.sqlite")))
    assert not g.check(*T).error  # the folder is created
