"""Greylist decisions per second with 1,000,000 rows in the table, and bytes per row.

1. A database is filled with 1,000,000 triplets (one transaction, bulk).
2. Bytes per row: the file size after a WAL checkpoint, over the rows.
3. The store alone: Greylist.check() from 4 threads (as libmilter's workers
   call it), a mix of known and new triplets, for a few seconds.
4. Through the milter: ``heloguard serve`` with that database and
   ``policy = "all"`` (enforcing, then in warn mode), driven over the milter
   protocol by 8 concurrent sessions, each of 1, 10 or 30 recipients (as many
   greylist decisions a session), with
   the DNS answers cached after the first session.
Target: at least 2,000 decisions per second on this 2-core machine.
"""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ROOT, TESTS, rcpt_replies, synthetic_triplet

from heloguard.config import Duration, GreylistConfig
from heloguard.greylist import SCHEMA_VERSION, Greylist

from dnsserver import DNSServer

ROWS = 1_000_000
SECONDS = 4.0


def fill(path: Path, rows: int) -> float:
    """Create the database with ``rows`` triplets; returns seconds taken."""
    Greylist(GreylistConfig(database=str(path))).connect().close()
    conn = sqlite3.connect(path, isolation_level=None)
    started = time.perf_counter()
    now = int(time.time())
    conn.execute("BEGIN")
    conn.executemany(
        "INSERT INTO triplets (client, sender, rcpt, first_seen, last_seen, passed_at, attempts) "
        "VALUES (?,?,?,?,?,?,?)",
        (synthetic_triplet(i, now) for i in range(rows)),
    )
    conn.execute("COMMIT")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    conn.close()
    return time.perf_counter() - started


def store_rate(path: Path, threads: int = 4) -> float:
    """Decisions per second of Greylist.check() alone."""
    g = Greylist(GreylistConfig(database=str(path), delay=Duration(1.0)))
    stop = time.monotonic() + SECONDS
    counts = [0] * threads

    def work(n: int) -> None:
        rnd = random.Random(n)
        while time.monotonic() < stop:
            i = rnd.randrange(ROWS * 2)  # half known triplets, half new ones
            g.check(
                f"net:10.{i % 250}.{(i // 250) % 250}.0/24",
                f"sender{i % 5000}@example{i % 997}.org",
                f"user{i}@example.test",
            )
            counts[n] += 1
        g.close()

    workers = [threading.Thread(target=work, args=(n,)) for n in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return sum(counts) / SECONDS


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def milter_rate(
    path: Path, sessions: int = 8, rcpts: int = 10, *, warn: bool = False
) -> tuple[float, int, float]:
    """Decisions per second through heloguard serve: (rate, errors, daemon CPU per decision);
    with ``warn``, in warn mode, where each decision only reads the store (a peek)."""
    work = Path(tempfile.mkdtemp(prefix="hg-bench-grey-"))
    with DNSServer(TESTS / "zones") as dns:
        cfg = work / "heloguard.toml"
        cfg.write_text(
            f'[dns]\nnameservers = ["{dns.nameserver}"]\n'
            f'[milter]\nsocket = "unix:{work}/m.sock"\n'
            f'[log]\npasses = false\nlevel = "warning"\n'
            f'[greylist]\ndatabase = "{path}"\npolicy = "all"\n'
            + ('[policy]\nmode = "warn"\n' if warn else "")
        )
        env = dict(os.environ, PYTHONSAFEPATH="1")
        proc = subprocess.Popen(
            [sys.executable, "-m", "heloguard.cli", "serve", "--config", str(cfg)],
            stderr=subprocess.PIPE,
            env=env,
            cwd=ROOT,
            text=True,
        )
        try:
            while not (work / "m.sock").exists():
                time.sleep(0.05)
            time.sleep(0.3)
            cpu0 = cpu_seconds(proc.pid)
            codes, errors = rcpt_replies([f"unix:{work}/m.sock"], sessions, rcpts, SECONDS)
            cpu = cpu_seconds(proc.pid) - cpu0
            total = codes["y"] + codes["t"] + codes["c"]
            return total / SECONDS, errors, cpu / max(total, 1)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()


def run() -> str:
    """Run and return the markdown section."""
    folder = Path(tempfile.mkdtemp(prefix="hg-bench-grey-db-"))
    db = folder / "grey.sqlite"
    fill_s = fill(db, ROWS)
    size = db.stat().st_size
    direct = store_rate(db)
    split = {r: milter_rate(db, rcpts=r) for r in (1, 10, 30)}
    peeks = {r: milter_rate(db, rcpts=r, warn=True) for r in (1, 10)}
    through, errors, per = split[10]
    marginal = (split[30][2] * 30 - split[10][2] * 10) / 20
    return "\n".join(
        [
            "## Greylisting with 1,000,000 rows (`bench/greylist_rate.py`)",
            "",
            "Target: at least 2,000 greylist decisions per second on this 2-core machine.",
            "",
            "| measure | figure |",
            "|---|---|",
            f"| rows in the table | {ROWS:,} (filled in {fill_s:.1f} s) |",
            f"| database size | {size / 1e6:.1f} MB, {size / ROWS:.0f} bytes per row "
            "(keys and index included) |",
            f"| Greylist.check() alone, 4 threads | {direct:,.0f} decisions/s |",
            "| through heloguard serve (milter protocol, 8 sessions x 10 RCPT) "
            f"| {through:,.0f} decisions/s ({errors} connection errors) |",
            f"| heloguard's own CPU per decision through the milter | {per * 1e6:.0f} us "
            f"(so one core sustains about {1 / per:,.0f} decisions/s) |",
            "",
            "By recipients per session (8 concurrent sessions, the same 1,000,000-row table):",
            "",
            "| RCPT per session | greylist decisions/s | daemon CPU per decision "
            "| daemon CPU per session |",
            "|---|---|---|---|",
            *(
                f"| {r} | {rate:,.0f} | {cpu * 1e6:.0f} us | {cpu * r * 1e3:.2f} ms |"
                for r, (rate, _err, cpu) in split.items()
            ),
            *(
                f"| {r}, warn mode (reads only) | {rate:,.0f} | {cpu * 1e6:.0f} us "
                f"| {cpu * r * 1e3:.2f} ms |"
                for r, (rate, _err, cpu) in peeks.items()
            ),
            "",
            f"**Target {'met' if split[1][0] >= 2000 else 'met from 10 recipients per session'}"
            f"{'' if split[1][0] >= 2000 else '; not when every decision is a session of its own'}"
            ".**  The store's marginal cost per decision (the difference between the 10- and",
            f"30-recipient rows) is {marginal * 1e6:.0f} us of daemon CPU; each session also",
            "carries fixed CPU (libmilter's callbacks, the connect, HELO and MAIL phases), so",
            f"one-recipient traffic runs at {split[1][0]:,.0f} decisions/s on this machine.",
            "SQLite decisions go to one committer thread, which runs every decision queued",
            "meanwhile in one transaction and answers each caller after the COMMIT (group",
            "commit): with hundreds of libmilter threads, one writer in batches beats each",
            "thread holding SQLite's lock across its statements (docs/security.md, the soak).",
            "In warn mode a decision only reads (what greylisting would say); reads take an",
            "idle connection and give it back, since pymilter's thread state per milter",
            "connection made a thread-local connection one per session.  At most 32 are open",
            "at once; in a burst of hundreds of connections a read waits for one.",
            "",
            "The load generator (Python, in the same 2-core machine) competes with the daemon for",
            "the CPU, so the end-to-end figure is a floor; the CPU per decision is what the daemon",
            "itself needs.",
        ]
    )


if __name__ == "__main__":
    print(run())
