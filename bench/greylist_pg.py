"""Greylist decisions per second with two heloguard processes on one PostgreSQL.

The PostgreSQL backend is for several MX hosts sharing one database; this
measures two heloguard processes deciding on one server at once.

1. A throwaway PostgreSQL cluster (tests/pgserver.py: Debian's binaries, a
   temporary folder, loopback, no fsync) gets 1,000,000 triplets (COPY).
2. The store alone: two processes, each calling Greylist.check() from 4
   threads (as libmilter's workers do), a mix of known and new triplets
   over the whole table, for a few seconds.  One process alone for
   comparison.
3. Through the milter: two ``heloguard serve`` on that database with
   ``policy = "all"``, driven over the milter protocol by 8 concurrent
   sessions (4 per daemon), with the DNS answers cached after the first
   session; CPU per decision of both daemons and of PostgreSQL.

Everything (both heloguards, PostgreSQL, the load generator) shares this
machine's cores, so the rates are floors; the CPU per decision is what each
part needs.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import psycopg
from common import ROOT, TESTS, rcpt_replies, synthetic_triplet
from greylist_rate import cpu_seconds

from heloguard.config import GreylistConfig
from heloguard.greylist import Greylist

import pgserver
from dnsserver import DNSServer

ROWS = 1_000_000
SECONDS = 4.0
THREADS = 4

WORKER = textwrap.dedent(
    """
    import json, random, sys, threading, time
    from heloguard.config import Duration, GreylistConfig
    from heloguard.greylist import Greylist
    cfg, rows = json.loads(sys.argv[1]), int(sys.argv[2])
    seconds, seed = float(sys.argv[3]), int(sys.argv[4])
    g = Greylist(GreylistConfig(**cfg, delay=Duration(1.0)))
    g.connect().close()
    print("ready", flush=True)
    sys.stdin.readline()  # start together
    stop = time.monotonic() + seconds
    counts, errors = [0] * 4, [0] * 4
    def work(n):
        rnd = random.Random(seed * 10 + n)
        while time.monotonic() < stop:
            i = rnd.randrange(rows * 2)  # half known triplets, half new ones
            o = g.check(
                f"net:10.{i % 250}.{(i // 250) % 250}.0/24",
                f"sender{i % 5000}@example{i % 997}.org",
                f"user{i}@example.test",
            )
            counts[n] += not o.error  # a decision that followed on_error is not one
            errors[n] += o.error
    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(json.dumps({"decisions": sum(counts), "errors": sum(errors)}), flush=True)
    g.close()
    """
)


def fill(dsn: str, rows: int) -> tuple[float, int]:
    """Create the schema and COPY ``rows`` triplets in; (seconds, bytes on disk)."""
    g = Greylist(GreylistConfig(backend="postgresql", dsn=dsn))
    g.connect().close()
    g.close()
    now = int(time.time())
    started = time.perf_counter()
    with psycopg.connect(dsn) as conn:
        with (
            conn.cursor() as cur,
            cur.copy(
                "COPY triplets (client, sender, rcpt, first_seen, last_seen, passed_at, attempts) "
                "FROM STDIN"
            ) as copy,
        ):
            for i in range(rows):
                copy.write_row(synthetic_triplet(i, now))
        conn.commit()
        conn.autocommit = True
        conn.execute("VACUUM ANALYZE triplets")
        row = conn.execute("SELECT pg_total_relation_size('triplets')").fetchone()
    return time.perf_counter() - started, int(row[0]) if row else 0


def server_cpu(server: pgserver.PgServer) -> dict[int, float]:
    """CPU seconds so far of every PostgreSQL process."""
    out: dict[int, float] = {}
    for pid in server.pids():
        try:
            out[pid] = cpu_seconds(pid)
        except (OSError, IndexError, ValueError):
            continue
    return out


def spent(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU seconds spent between two snapshots (processes started meanwhile count whole)."""
    return sum(t - before.get(pid, 0.0) for pid, t in after.items())


def store_rate(dsn: str, processes: int) -> tuple[float, int]:
    """Decisions per second of Greylist.check() in ``processes`` processes of 4 threads."""
    cfg = json.dumps({"backend": "postgresql", "dsn": dsn})
    env = dict(os.environ, PYTHONSAFEPATH="1")
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, cfg, str(ROWS), str(SECONDS), str(n)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            text=True,
        )
        for n in range(processes)
    ]
    for p in procs:
        assert p.stdout is not None
        assert p.stdout.readline().strip() == "ready"
    for p in procs:
        assert p.stdin is not None
        p.stdin.write("go\n")
        p.stdin.flush()
    decisions = errors = 0
    for p in procs:
        out, _ = p.communicate(timeout=120)
        result = json.loads(out.strip().splitlines()[-1])
        decisions += result["decisions"]
        errors += result["errors"]
    return decisions / SECONDS, errors


def milter_rate(
    server: pgserver.PgServer, dsn: str, sessions: int = 8, rcpts: int = 10
) -> tuple[float, int, int, float, float]:
    """Through two heloguard serve on one database.

    Returns (decisions/s, connection errors, greylist errors, daemons' CPU per
    decision, PostgreSQL's CPU per decision).
    """
    work = Path(tempfile.mkdtemp(prefix="hg-bench-grey-pg-"))
    env = dict(os.environ, PYTHONSAFEPATH="1")
    with DNSServer(TESTS / "zones") as dns:
        procs: list[subprocess.Popen[str]] = []
        logs = []
        try:
            for n in range(2):
                cfg = work / f"heloguard{n}.toml"
                cfg.write_text(
                    f'[dns]\nnameservers = ["{dns.nameserver}"]\n'
                    # both on every CPU, as measured before [milter] cpus existed
                    f'[milter]\nsocket = "unix:{work}/m{n}.sock"\ncpus = "all"\n'
                    f'[log]\npasses = false\nlevel = "warning"\n'
                    f'[greylist]\nbackend = "postgresql"\ndsn = "{dsn}"\npolicy = "all"\n'
                )
                log = (work / f"heloguard{n}.log").open("w")
                logs.append(log)
                procs.append(
                    subprocess.Popen(
                        [sys.executable, "-m", "heloguard.cli", "serve", "--config", str(cfg)],
                        stderr=log,
                        env=env,
                        cwd=ROOT,
                        text=True,
                    )
                )
            for n in range(2):
                while not (work / f"m{n}.sock").exists():
                    time.sleep(0.05)
            time.sleep(0.5)
            cpu0 = [cpu_seconds(p.pid) for p in procs]
            pg0 = server_cpu(server)
            sockets = [f"unix:{work}/m{n}.sock" for n in range(2)]
            codes, errors = rcpt_replies(sockets, sessions, rcpts, SECONDS)
            cpu = sum(cpu_seconds(p.pid) - c0 for p, c0 in zip(procs, cpu0, strict=True))
            pg_cpu = spent(pg0, server_cpu(server))
            decisions = codes["y"] + codes["t"]  # first attempts, deferred
            failed = codes["c"]  # a pass here followed on_error
            total = max(decisions, 1)
            return decisions / SECONDS, errors, failed, cpu / total, pg_cpu / total
        finally:
            for p in procs:
                p.send_signal(signal.SIGKILL)
                p.wait()
            for log in logs:
                log.close()


def run() -> str:
    """Run and return the markdown section."""
    with pgserver.PgServer() as server:
        dsn = server.create_database("bench")
        fill_s, size = fill(dsn, ROWS)
        one, one_err = store_rate(dsn, 1)
        two, two_err = store_rate(dsn, 2)
        split = {r: milter_rate(server, dsn, rcpts=r) for r in (1, 10)}
        version = server.version()
    through, conn_errors, grey_errors, per, pg_per = split[10]
    cores = os.cpu_count() or 1
    return "\n".join(
        [
            "## Greylisting on PostgreSQL, two heloguard processes (`bench/greylist_pg.py`)",
            "",
            f"One PostgreSQL {version} (a throwaway cluster on this machine, loopback unix socket,",
            "no fsync) shared by two heloguard processes, as two MX hosts would share it.",
            "Everything (PostgreSQL, both heloguards, the load generator) runs on the same cores,",
            "so the rates are floors.",
            "",
            "| measure | figure |",
            "|---|---|",
            f"| rows in the table | {ROWS:,} (COPY and VACUUM ANALYZE in {fill_s:.1f} s) |",
            f"| table size | {size / 1e6:.0f} MB, {size / ROWS:.0f} bytes per row "
            "(keys and indexes included) |",
            f"| Greylist.check() alone, 1 process x {THREADS} threads | {one:,.0f} decisions/s "
            f"({one_err} errors) |",
            f"| Greylist.check() alone, 2 processes x {THREADS} threads | {two:,.0f} decisions/s "
            f"({two_err} errors) |",
            "| through two heloguard serve (milter protocol, 8 sessions x 10 RCPT) "
            f"| {through:,.0f} decisions/s ({conn_errors} connection errors, "
            f"{grey_errors} decisions that followed on_error) |",
            f"| both heloguards' CPU per decision through the milter | {per * 1e6:.0f} us |",
            f"| PostgreSQL's CPU per decision | {pg_per * 1e6:.0f} us |",
            "",
            "By recipients per session (8 concurrent sessions over the two daemons):",
            "",
            "| RCPT per session | greylist decisions/s | heloguard CPU per decision "
            "| PostgreSQL CPU per decision | decisions that followed on_error |",
            "|---|---|---|---|---|",
            *(
                f"| {r} | {rate:,.0f} | {cpu * 1e6:.0f} us | {pgc * 1e6:.0f} us | {bad} |"
                for r, (rate, _e, bad, cpu, pgc) in split.items()
            ),
            "",
            f"heloguard and PostgreSQL together need {(per + pg_per) * 1e6:.0f} us of CPU per "
            f"decision (10 RCPT per session): the {cores} cores of this machine, shared",
            f"with the load generator, bound the rate near {cores / (per + pg_per):,.0f}"
            " decisions/s, whatever the number of heloguard processes.",
            "",
            "A decision on PostgreSQL is four to seven statements on a pooled connection (BEGIN,",
            "the client row, the triplet row locked or inserted, its update, the pass count,",
            "COMMIT), each a round trip, run on a worker thread that the milter's thread waits",
            "for at most `db_timeout`.  Compare the SQLite figures above: SQLite is the faster",
            "store for one host; PostgreSQL is for sharing the greylist between MX hosts.",
        ]
    )


if __name__ == "__main__":
    print(run())
