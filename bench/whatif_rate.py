"""``heloguard whatif`` throughput: messages per second on a large mbox.

The mbox has 10,000 messages from 500 distinct clients (20 each), written
here in the form Postfix writes its Received header, ``by`` our host.  Half
of the clients are addresses of the test zones (tests/zones/, served by the
test DNS server on loopback, so every answer is local and cached after its
first question); the others are addresses of a served reverse zone with no PTR (NXDOMAIN).
These messages are benchmark input, not a sample of anybody's mail.

Measured: the whole command (``heloguard.whatif.run``: read the mbox with
the standard ``mailbox`` module, parse each message, judge each distinct
client once, keep every message's outcome), with no rate limit and with the
default one, median of three runs.
"""

from __future__ import annotations

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


def client(i: int) -> tuple[str, str, str]:
    """Client i: a known one in a new HELO variant, or an address with no PTR."""
    if i % 2 == 0:
        addr, helo, ptr = KNOWN[(i // 2) % len(KNOWN)]
        return addr, f"h{i}.{helo}", ptr
    # 103.245.153.0/24 is a zone of the test server: these have no PTR (NXDOMAIN)
    return f"103.245.153.{i % 240 + 2}", f"host{i}.bench.example", "unknown"


def write_mbox(path: Path) -> None:
    """MESSAGES messages, 20 per client."""
    with path.open("w", encoding="ascii") as fh:
        for n in range(MESSAGES):
            addr, helo, ptr = client(n % CLIENTS)
            fh.write(
                f"From sender{n}@example.org Sat Dec  5 10:00:00 2026\n"
                f"Return-Path: <sender{n % 97}@example.org>\n"
                f"Received: from {helo} ({ptr} [{addr}])\n"
                f"\tby {BY} (Postfix) with ESMTP id B{n:08d}\n"
                f"\tfor <user{n % 13}@bench.example>; Sat, 5 Dec 2026 10:{n % 60:02d}:00 +0000\n"
                f"From: Sender <sender{n % 97}@example.org>\n"
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
    rows = []
    with tempfile.TemporaryDirectory() as tmp, DNSServer(TESTS / "zones") as server:
        mbox = Path(tmp) / "bench.mbox"
        write_mbox(mbox)
        size = mbox.stat().st_size
        config = load(None)
        config = replace(config, dns=replace(config.dns, nameservers=(f"127.0.0.1:{server.port}",)))
        for label, rate in (("no limit", 1e9),):
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
