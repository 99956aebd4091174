"""``heloguard whatif`` throughput: messages per second on a large mbox.

The mbox has 10,000 messages from 500 distinct clients (20 each), written
here in the form Postfix writes its Received header, ``by`` our host.  A
quarter of the clients are the essay's well-run server (one per sender
domain; a zone written here gives each domain the server's MX), a quarter
the essay's bot (one per HELO), both in the test zones (tests/zones/, served
by the test DNS server on loopback, so every answer is local and the
resolver's cache answers repeats); the other half are addresses of a served
reverse zone with no PTR (NXDOMAIN).  These messages are
benchmark input, not a sample of anybody's mail.

Measured: the whole command (``heloguard.whatif.run``: read the mbox with
the standard ``mailbox`` module, parse each message, judge each distinct
client once, keep every message's outcome): median of three runs with no
rate limit, and one run with the default limit.
"""

from __future__ import annotations

import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import TESTS

from heloguard import whatif
from heloguard.config import load

from dnsserver import DNSServer

MESSAGES = 10_000
CLIENTS = 500
BY = "mx.bench.example"

# (address, HELO, PTR as Postfix would write it) of clients the test zones know
KNOWN = [
    ("103.245.153.249", "mail.digitaljunction.com.au", "103-245-153-249.host.neural.net.au"),
    ("64.71.1.10", "ukiah.firemountain.net", "ukiah.firemountain.net"),
]


def client(i: int) -> tuple[str, str, str, str]:
    """Client i as (address, HELO, PTR, sender domain).

    A client is judged once per (address, HELO, sender domain), so the well-run
    server keeps its own HELO and differs by sender domain; the bot and the
    no-PTR addresses differ by HELO.
    """
    if i % 4 == 0:
        addr, helo, ptr = KNOWN[1]
        return addr, helo, ptr, f"d{i}.{SENDERS}"
    if i % 4 == 2:
        addr, helo, ptr = KNOWN[0]
        return addr, f"h{i}.{helo}", ptr, "example.org"
    # 103.245.153.0/24 is a zone of the test server: these have no PTR (NXDOMAIN)
    return f"103.245.153.{i % 240 + 2}", f"host{i}.bench.example", "unknown", "example.org"


SENDERS = "senders.bench.example"


def write_zones(folder: Path) -> None:
    """The test zones plus one of sender domains that all use the well-run server's MX."""
    for zone in (TESTS / "zones").glob("*.zone"):
        shutil.copy(zone, folder / zone.name)
    lines = [
        "$TTL 3600",
        f"@ IN SOA ns1.{SENDERS}. hostmaster.{SENDERS}. 1 7200 900 1209600 300",
        f"@ IN NS ns1.{SENDERS}.",
        *(f"d{i} IN MX 10 taos.firemountain.net." for i in range(0, CLIENTS, 4)),
    ]
    (folder / f"{SENDERS}.zone").write_text("\n".join(lines) + "\n")


def write_mbox(path: Path) -> None:
    """MESSAGES messages, 20 per client."""
    with path.open("w", encoding="ascii") as fh:
        for n in range(MESSAGES):
            addr, helo, ptr, domain = client(n % CLIENTS)
            fh.write(
                f"From sender{n}@{domain} Sat Dec  5 10:00:00 2026\n"
                f"Return-Path: <sender{n % 97}@{domain}>\n"
                f"Received: from {helo} ({ptr} [{addr}])\n"
                f"\tby {BY} (Postfix) with ESMTP id B{n:08d}\n"
                f"\tfor <user{n % 13}@bench.example>; Sat, 5 Dec 2026 10:{n % 60:02d}:00 +0000\n"
                f"From: Sender <sender{n % 97}@{domain}>\n"
                f"To: user{n % 13}@bench.example\n"
                f"Subject: message {n}\n"
                f"Message-ID: <m{n}@example.org>\n"
                f"Date: Sat, 5 Dec 2026 10:{n % 60:02d}:00 +0000\n"
                "\n"
                f"body of message {n}\n"
                "\n"
            )


def run_bench() -> list[str]:
    """The table rows."""
    with tempfile.TemporaryDirectory() as tmp:
        zones = Path(tmp) / "zones"
        zones.mkdir()
        write_zones(zones)
        return _measure(Path(tmp), zones)


def _measure(tmp: Path, zones: Path) -> list[str]:
    rows: list[str] = []
    with DNSServer(zones) as server:
        mbox = tmp / "bench.mbox"
        write_mbox(mbox)
        size = mbox.stat().st_size
        config = load(None)
        config = replace(config, dns=replace(config.dns, nameservers=(f"127.0.0.1:{server.port}",)))
        for label, rate in (
            ("no limit", 1e9),
            (f"default ({whatif.DEFAULT_RATE:g} clients/s)", whatif.DEFAULT_RATE),
        ):
            times, last = [], None
            for _ in range(3 if rate > 1000 else 1):
                started = time.perf_counter()
                last = whatif.run(config, [str(mbox)], [BY], rate=rate)
                times.append(time.perf_counter() - started)
            assert last is not None
            took = statistics.median(times)
            counts = last.counts()
            rows.append(
                f"| {label} | {len(last.judged):,} | {last.clients} | {last.dns_sent} "
                f"| {took:.2f} s | {len(last.judged) / took:,.0f} | "
                + ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
                + " |"
            )
    rows.insert(0, f"mbox: {MESSAGES:,} messages, {size / 1e6:.1f} MB, {CLIENTS} distinct clients.")
    return rows


def run() -> str:
    """The markdown section."""
    rows = run_bench()
    return "\n".join(
        [
            "## What-if on a large mbox (`bench/whatif_rate.py`)",
            "",
            "The whole `heloguard whatif` run (read, parse, judge each distinct client once,",
            "keep every message's outcome) against the test DNS server on loopback; median of",
            "three runs without a rate limit, one run with the default limit (clients judged per",
            "second, which then sets the pace: 500 clients at 20 a second is 25 s).",
            "",
            rows[0],
            "",
            "| rate | messages | clients | DNS questions sent | time | messages/s | outcomes |",
            "|---|---|---|---|---|---|---|",
            *rows[1:],
        ]
    )


if __name__ == "__main__":
    print(run())
