"""Throughput with the filter and the load generator on separate cores.

``bench/protocol.py`` runs the load generator beside the filter on the same two
cores, so at 256 connections every filter, the C one included, loses about the
same share of its rate, and that share says more about the generator than about
the filter.  Here the filter is pinned to one core (``taskset -c 1``) and the
generator to the other, so a filter's rate is what one core lets it do.  The
warm set of ``bench/protocol.py``, measured by its ``throughput_rows`` (each
filter at concurrency 8, 64 and 256 back to back, round after round).
heloguard runs twice: with a decision line per session (the default) and
with ``[log] level = "warning"`` (no decision lines), which tells what the log
writer's thread costs the libmilter threads when they share one core with it.

Run alone: ``python bench/pinned.py``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import protocol
from common import TESTS, median

from dnsserver import DNSServer

QUIET = "heloguard, no decision lines"


@contextlib.contextmanager
def started(specs: list[protocol.Spec], work: Path) -> Iterator[list[protocol.Filter]]:
    """The filters of ``specs`` running (their argv pins them to core 1), with this
    process, the load generator, on core 0 until they stop."""
    own = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {0})  # the generator (and the test DNS server, idle here)
    try:
        with contextlib.ExitStack() as stack:
            yield [
                stack.enter_context(protocol.running(label, argv, sock, work / f"{sock.stem}.log"))
                for label, argv, sock in specs
            ]
    finally:
        os.sched_setaffinity(0, own)


def run() -> str:
    """Measure and return the markdown section."""
    head = [
        "## Filter and load generator on separate cores (`bench/pinned.py`)",
        "",
        "The filter pinned to core 1, the load generator to core 0; otherwise as",
        "the warm table of `bench/protocol.py` (200 clients, every answer cached).",
        f"{protocol.THROUGHPUT_ROUNDS} rounds, each filter's cells at 8, 64 and 256 back to back"
        " (`protocol.throughput_rows`);",
        "sessions per second, median (range), and the filter's CPU per session (`/proc` times).",
        "",
    ]
    if len(os.sched_getaffinity(0)) < 2 or shutil.which("taskset") is None:
        return "\n".join([*head, "Not measured: needs two cores and taskset (util-linux)."])
    work = Path(tempfile.mkdtemp(prefix="hg-bench-pin-"))
    cases = [protocol.case(i) for i in range(200)]
    with DNSServer(TESTS / "zones") as dns:
        protocol.serve_clients(dns, 200)
        hg_argv, hg_sock = protocol.heloguard(work, dns, "loud")
        quiet_argv, quiet_sock = protocol.heloguard(
            work, dns, "quiet", '[log]\nlevel = "warning"\n'
        )
        pin = ["taskset", "-c", "1"]
        specs = [
            *((label, [*pin, *argv], sock) for label, argv, sock in protocol.noop_filters(work)),
            ("heloguard", [*pin, *hg_argv], hg_sock),
            (QUIET, [*pin, *quiet_argv], quiet_sock),
        ]
        with started(specs, work) as filters:
            measured = protocol.throughput_rows(filters, cases)
    shutil.rmtree(work, ignore_errors=True)
    kept = {label: protocol.kept_at_top(measured, label) for label, _, _ in specs}
    shares = "; ".join(f"{label} {median(k):.2f}" for label, k in kept.items())
    lines = [
        *head,
        *protocol.throughput_table(measured),
        "",
        f"- Rate at 256 over the best at 8 or 64, median of the rounds: {shares}.  "
        "The two heloguard rows differ only in the decision line each session "
        "queues for the log writer's thread, which formats and writes them on the "
        "same core as libmilter's threads.",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    print(run())
