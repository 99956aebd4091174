"""Shared bits for the benchmarks: the machine description and the test DNS server."""

from __future__ import annotations

import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TESTS = ROOT / "tests"
# the libmilter pymilter is linked to (a thread per connection, contrib/libmilter.py;
# the Makefile builds it into the virtualenv)
LIBMILTER = Path(sys.prefix) / "lib" / "libmilter"
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))


def machine() -> str:
    """One line describing where the figures were measured."""
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f", {kb / 1024 / 1024:.0f} GiB RAM"
    except (OSError, ValueError, IndexError):
        pass
    git = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    dirty = subprocess.run(
        # this run rewrites docs/benchmarks.md itself: that is not a change
        [
            "git",
            "-C",
            str(ROOT),
            "status",
            "--porcelain",
            "--untracked-files=no",
            "--",
            ".",
            ":!docs/benchmarks.md",
        ],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    if git and dirty:
        git += " with uncommitted changes"
    return (
        f"{cpu}, {os.cpu_count()} cores{mem}; Python {platform.python_version()} "
        f"on {platform.system()} {platform.release()}; heloguard at {git or 'unknown'}"
    )


def pct(values: list[float], q: float) -> float:
    """The q-th percentile (0-100) by nearest rank."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = max(0, min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1))))
    return ordered[k]


def median(values: list[float]) -> float:
    """The median."""
    return statistics.median(values) if values else float("nan")


def rcpt_replies(
    sockets: list[str], sessions: int, rcpts: int, seconds: float
) -> tuple[Counter[str], int]:
    """``sessions`` threads, each running whole milter sessions of ``rcpts``
    recipients (the same well-run client, a new recipient each time) against
    ``sockets`` in turn for ``seconds``: the RCPT reply codes, and the sessions
    that failed with a connection error."""
    from miltertest import MilterClient

    codes: list[Counter[str]] = [Counter() for _ in range(sessions)]
    errors = [0] * sessions
    stop = time.monotonic() + seconds

    def run(n: int) -> None:
        i = 0
        while time.monotonic() < stop:
            try:
                with MilterClient(sockets[n % len(sockets)]) as c:
                    c.negotiate()
                    c.connect("64.71.1.10", macros={"{daemon_name}": "mx"})
                    c.helo("ukiah.firemountain.net")
                    c.mail("rsk@gsp.org", macros={"{auth_authen}": ""})
                    for _ in range(rcpts):
                        r = c.rcpt(f"bench{n}x{i}@example.test")
                        i += 1
                        if r is not None:
                            codes[n][r.code] += 1
                    c.quit()
            except OSError:
                errors[n] += 1

    threads = [threading.Thread(target=run, args=(n,)) for n in range(sessions)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(codes, Counter()), sum(errors)


def synthetic_triplet(i: int, now: int) -> tuple[object, ...]:
    """Row ``i`` of the greylist benchmarks' million-row table: 62,500 networks,
    5,000 senders, every recipient new; two rows in three have passed."""
    return (
        f"net:10.{i % 250}.{(i // 250) % 250}.0/24",
        f"sender{i % 5000}@example{i % 997}.org",
        f"user{i}@example.test",
        now - 3600,
        now - 60,
        now - 60 if i % 3 else None,
        2,
    )


def cell_table(
    corner: str,
    rows: list[str],
    cells: list[tuple[str, int]],
    per: dict[tuple[str, int], dict[str, float]],
    digits: int,
    hide_below: float | None = None,
) -> list[str]:
    """Markdown: a figure per row and per (filter, concurrency) cell, then the cells'
    totals in bold; a row under ``hide_below`` in every cell is left out."""
    lines = [
        f"| {corner} | " + " | ".join(f"{label} at {conc}" for label, conc in cells) + " |",
        "|---|" + "---|" * len(cells),
    ]
    for row in rows:
        if hide_below is not None and all(per[k].get(row, 0.0) < hide_below for k in cells):
            continue
        figures = " | ".join(f"{per[k].get(row, 0.0):.{digits}f}" for k in cells)
        lines.append(f"| {row} | {figures} |")
    totals = " | ".join(f"**{sum(per[k].values()):.{digits}f}**" for k in cells)
    lines.append(f"| **all** | {totals} |")
    return lines


def perf_usable(args: list[str], what: str) -> str:
    """Empty when ``perf ARGS -- true`` runs here, else why perf cannot ``what``."""
    perf = shutil.which("perf")
    if perf is None:
        return "perf is not installed"
    probe = subprocess.run([perf, *args, "--", "true"], capture_output=True, text=True, check=False)
    if probe.returncode != 0:
        return f"perf cannot {what}: {probe.stderr.strip().splitlines()[-1:]}"
    return ""
