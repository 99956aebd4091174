"""Why libmilter's threads leave the CPU, at 64 and 256 connections, heloguard beside
the no-op filters, each filter on one CPU.

``bench/pinned.py`` shows every pymilter filter on one CPU losing more of its
rate from 64 to 256 connections than the no-op C filter does, and
``bench/syscalls.py`` counts the ``futex`` calls that grow with it.  Here each
filter runs on CPU 1 (``taskset``; the load generator on CPU 0) under
``perf record -e sched:sched_switch`` with DWARF call chains, attached after a
warm-up for the measured sessions only, and every time one of its threads leaves the CPU
is put in one place by its call chain:

- preempted: the thread could have run on (``prev_state`` R);
- waiting for the MTA: libmilter's ``poll`` for the next command;
- the GIL: Python's lock, in ``take_gil`` (pymilter's C takes it for every
  callback and lets go of it around each libmilter call);
- libmilter's pool lock, on Debian's build only: heloguard's libmilter
  (``contrib/libmilter.py``, measured here) gives each connection its own
  thread, but Debian's libmilter 8.17 is built with its worker pool
  (``worker.c``, compared in ``bench/pool.py``).  One thread polls every connection waiting for a
  command and hands a ready one to an idle worker, or starts a worker; a
  worker runs ``mi_engine`` until no next command is already waiting, then
  gives the connection back.  The pool's one mutex is taken by the poller
  while it walks the list of every connection (to build its poll set, and
  again for each ready one) and by each worker around each hand-over;
- an idle worker waiting in the pool for a command (``pthread_cond_timedwait``
  in libmilter);
- thread stacks and the memory map: glibc's cache of thread stacks, and
  ``mmap``/``munmap``/``madvise`` waiting for the process's memory map;
- other locks, and anything else.

Counts per session, one run per cell (a profile, not the throughput
benchmark).  Needs ``perf`` that may record tracepoints.  Run alone:
``python bench/waits.py``.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import loadgen
import protocol
from common import TESTS, cell_table, perf_usable
from native import frame

from dnsserver import DNSServer

CONCURRENCY = (64, 256)
SESSIONS = 3000  # per cell: every switch is recorded with its stack
ATTACH = 1.0  # seconds perf is given to attach before the sessions start
# a large buffer: a switch's sample carries its stack, and a lost sample is a switch
# not counted (`perf report --stats` showed none lost with it)
RECORD = ["perf", "record", "-q", "-e", "sched:sched_switch", "--call-graph", "dwarf,4096"]
RECORD += ["-m", "64M"]
FILTER_CPU, GENERATOR_CPU = 1, 0

PREEMPTED = "preempted (could have run on)"
POLL = "waiting for the MTA's next command (poll)"
GIL = "the GIL (take_gil)"
POOL_LOCK = "libmilter's pool lock (every command handed to a worker)"
IDLE = "an idle worker waiting for a command (libmilter's pool)"
STACKS = "thread stacks and the memory map (glibc, mmap, munmap, madvise)"
OTHER_LOCK = "other locks"
OTHER = "other"
ROWS = [PREEMPTED, POLL, GIL, POOL_LOCK, IDLE, STACKS, OTHER_LOCK, OTHER]
MEMORY_CALLS = ("mmap", "munmap", "madvise", "mprotect", "brk")


def place(state: str, frames: list[tuple[str, str]]) -> str:
    """Where one switch goes: the thread's state and its call chain, the leaf first."""
    if state.startswith("R"):
        return PREEMPTED
    kernel = [s for s, lib in frames if lib.startswith("[kernel")]
    user = [(s, lib) for s, lib in frames if not lib.startswith("[kernel")]
    if any(s.startswith("do_sys_poll") for s in kernel):
        return POLL
    if any(s.startswith(tuple(f"__x64_sys_{c}" for c in MEMORY_CALLS)) for s in kernel):
        return STACKS
    if not any(s.startswith(("futex_wait", "__x64_sys_futex")) for s in kernel):
        return OTHER
    if any("take_gil" in s for s, _ in user):
        return GIL
    if any(
        s.startswith(("__nptl_deallocate_stack", "allocate_stack", "__GI___nptl")) for s, _ in user
    ):
        return STACKS
    for (sym, _), (_, caller) in itertools.pairwise(user):
        if not Path(caller).name.startswith("libmilter"):
            continue
        if "pthread_mutex_lock" in sym:
            return POOL_LOCK
        if "pthread_cond_timedwait" in sym:
            return IDLE
    return OTHER_LOCK


def switches(script: str) -> Counter[str]:
    """Switches per place in ``perf script`` output of ``sched:sched_switch``."""
    out: Counter[str] = Counter()
    for block in script.split("\n\n"):
        lines = [line for line in block.splitlines() if line.strip()]
        if not lines or "prev_state=" not in lines[0]:
            continue
        state = lines[0].split("prev_state=", 1)[1].split()[0]
        out[place(state, [frame(line) for line in lines[1:]])] += 1
    return out


def measure(
    spec: protocol.Spec, work: Path, cases: list[loadgen.Case], conc: int
) -> dict[str, float]:
    """Switches per place and per session of the filter ``spec`` on CPU ``FILTER_CPU``,
    over ``SESSIONS`` sessions at ``conc`` after a warm-up.  perf attaches to the
    running filter (``-p``): started with it instead, under ``-D``, its call chains
    lost their libraries and the switches could not be placed."""
    label, argv, sock = spec
    out = work / f"{sock.stem}-{conc}.perf"
    pin = ["taskset", "-c", str(FILTER_CPU)]
    with protocol.running(label, [*pin, *argv], sock, work / f"{sock.stem}.log") as f:
        loadgen.run(f.socket, cases, concurrency=16, sessions=len(cases) * 2)
        perf = subprocess.Popen([*RECORD, "-p", str(f.pid), "-o", str(out)])
        time.sleep(ATTACH)
        r = loadgen.run(f.socket, cases, concurrency=conc, sessions=SESSIONS)
        perf.send_signal(signal.SIGINT)
        perf.wait(timeout=120)
    script = subprocess.run(
        ["perf", "script", "-i", str(out), "-F", "trace,ip,sym,dso"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    return {k: v / max(r.sessions, 1) for k, v in switches(script).items()}


def run() -> str:
    """Record every filter at each concurrency and return the markdown section."""
    head = [
        "## Why libmilter's threads wait, on one CPU (`bench/waits.py`)",
        "",
        f"Each filter on CPU {FILTER_CPU} (the load generator on CPU {GENERATOR_CPU}),"
        " under `perf record -e sched:sched_switch`",
        f"with DWARF call chains for {SESSIONS:,} sessions of the warm set of"
        " `bench/protocol.py`: every time",
        "one of its threads left the CPU, by why (its state and call chain); per session.",
        "The filters run on heloguard's libmilter (`contrib/libmilter.py`), a thread per",
        "connection that reads its own next command; the pool rows are Debian's build's",
        "(a poller hands each ready connection to a worker under one mutex,",
        "`bench/pool.py`): they count switches in its pool only.",
        "",
    ]
    why = perf_usable([*RECORD[1:], "-o", "/dev/null"], "record scheduler switches")
    if not why and (len(os.sched_getaffinity(0)) < 2 or shutil.which("taskset") is None):
        why = "needs two CPUs and taskset (util-linux)"
    if why:
        return "\n".join([*head, f"Not measured: {why}."])
    work = Path(tempfile.mkdtemp(prefix="hg-bench-waits-"))
    cases = [protocol.case(i) for i in range(200)]
    per: dict[tuple[str, int], dict[str, float]] = {}
    own = os.sched_getaffinity(0)
    with DNSServer(TESTS / "zones") as dns:
        protocol.serve_clients(dns, 200)
        filters = [
            *protocol.noop_filters(work),
            ("heloguard", *protocol.heloguard(work, dns, "hg")),
        ]
        os.sched_setaffinity(0, {GENERATOR_CPU})
        try:
            for conc in CONCURRENCY:
                for spec in filters:
                    per[(spec[0], conc)] = measure(spec, work, cases, conc)
        finally:
            os.sched_setaffinity(0, own)
    shutil.rmtree(work, ignore_errors=True)
    cells = [(label, conc) for conc in CONCURRENCY for label, _, _ in filters]
    lines = [*head, *cell_table("why", ROWS, cells, per, digits=2)]
    lines.append("")
    lines.extend(_reading(per))
    return "\n".join(lines)


def _reading(per: dict[tuple[str, int], dict[str, float]]) -> list[str]:
    """What the table says, in figures from it."""
    lo, hi = CONCURRENCY
    out = []
    for label in ("no-op C (libmilter)", "no-op pymilter", "heloguard"):
        a, b = per[(label, lo)], per[(label, hi)]
        grew = {row: b.get(row, 0.0) - a.get(row, 0.0) for row in ROWS}
        top = sorted(grew.items(), key=lambda kv: -kv[1])[:3]
        out.append(
            f"- {label}: {sum(a.values()):.1f} switches per session at {lo},"
            f" {sum(b.values()):.1f} at {hi}; most of the growth: "
            + ", ".join(f"{row} {d:+.2f}" for row, d in top)
            + "."
        )
    return out


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        print(run())
