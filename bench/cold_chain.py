"""Cold-cache latency of one HELO decision, against DNS with added latency.

The essay's example needs five distinct DNS questions in a chain two deep
(PTR of the client, then the A record of its PTR name; A and AAAA of the HELO
name, then the PTR of its address).  With every answer delayed by 50 ms, the
engine should take about two round trips (~100 ms), not five (~250 ms): that
is the point of asking each round's questions together.

Each run uses a fresh resolver (an empty cache).  Measured in-process, so the
figure is the decision's own time, not Python's start-up.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import TESTS, median, pct

from heloguard.config import from_mapping
from heloguard.engine import Engine, LiveDns
from heloguard.names import parse_address, parse_helo
from heloguard.resolver import Resolver, ResolverSettings
from heloguard.rules.base import Context, Stage

from dnsserver import DNSServer

LATENCY = 0.050
RUNS = 30
CASES = {
    "essay bot (reject)": ("103.245.153.249", "mail.digitaljunction.com.au"),
    "well-run server (accept)": ("64.71.1.10", "ukiah.firemountain.net"),
}


def one(server: DNSServer, engine: Engine, ip: str, helo: str) -> tuple[float, int, str]:
    settings = ResolverSettings(nameservers=((server.host, server.port),), timeout=2.0)
    addr = parse_address(ip)
    assert addr is not None
    ctx = Context(client=addr, helo=parse_helo(helo))
    with Resolver(settings) as res:
        started = time.perf_counter()
        decision = res.run(
            engine.decide(ctx, LiveDns(res), [[Stage.CONNECT, Stage.HELO]], evaluate_all=True),
            timeout=30,
        )
        took = time.perf_counter() - started
    return took, decision.dns_sent, str(decision.verdict)


def run() -> str:
    """Run the benchmark and return its markdown section."""
    engine = Engine(from_mapping({}))
    rows = []
    with DNSServer(TESTS / "zones") as server:
        server.latency = LATENCY
        for label, (ip, helo) in CASES.items():
            one(server, engine, ip, helo)  # warm Python, not DNS (each run has a new cache)
            times, sent, verdict = [], 0, ""
            for _ in range(RUNS):
                took, sent, verdict = one(server, engine, ip, helo)
                times.append(took)
            rtts = median(times) / LATENCY
            sequential = sent * LATENCY * 1000
            rows.append(
                f"| {label} | {verdict} | {sent} | {sequential:.0f} ms "
                f"| {median(times) * 1000:.0f} ms | {pct(times, 90) * 1000:.0f} ms "
                f"| {rtts:.2f} |"
            )
    return "\n".join(
        [
            "## Cold-cache HELO decision with 50 ms DNS latency (`bench/cold_chain.py`)",
            "",
            f"Every DNS answer delayed by {LATENCY * 1000:.0f} ms by the test DNS server on "
            "loopback;",
            f"a fresh resolver (empty cache) for each of {RUNS} runs; all rules evaluated "
            "(dry-run mode).",
            "Target: wall time close to the depth of the lookup chain (2 round trips = 100 ms),",
            "not to the number of lookups.",
            "",
            "| case | verdict | DNS questions sent | if asked one by one | median | p90 "
            "| round trips (median / 50 ms) |",
            "|---|---|---|---|---|---|---|",
            *rows,
        ]
    )


if __name__ == "__main__":
    print(run())
