"""Where a warm session's CPU goes, native code and kernel included, heloguard beside
the no-op filters.

``bench/callbacks.py`` times our Python per callback in-process, and
``bench/syscalls.py`` counts system calls; neither says how the CPU of the
running daemon divides between libmilter, pymilter, the interpreter, Python's
GIL and the kernel.  Here each filter runs under ``perf record`` (``cpu-clock``
samples on every thread, with kernel call chains), switched on for the
measured sessions only (``-D -1 --control``, as ``bench/syscalls.py`` does):
the warm set of ``bench/protocol.py`` at concurrency 8 and 256, the load
generator on the same two cores, and heloguard on both CPUs like the no-op
filters (``[milter] cpus = "all"``; its default is one).  Each sample is put
in one place by the code it was taken in:

- in the kernel: by the system call it is under (``futex`` is lock
  hand-over, most of it Python's GIL passing between libmilter's threads;
  ``poll`` and the socket reads and writes are libmilter's I/O; ``clone3``,
  ``mmap``, ``munmap``, ``mprotect`` and thread exit are libmilter's
  threads coming and going, one per connection), or as the scheduler and interrupts when under none;
- in user space: by library (libmilter; pymilter's C extension; the GIL's own
  functions in libpython; libc's locks and condition variables, which the GIL
  is built on; the rest of libpython and libc, which is Python code running:
  pymilter's Python layer and, under heloguard, ours).

A fourth filter, heloguard started through
``bench/baseline/heloguard_no_macros.py``, asks the MTA for no macros: the
difference is what heloguard's two ``setsymlist`` calls cost.

Sampling at ``FREQ`` Hz, a cell's figure is microseconds per session, summed
over ``ROUNDS`` rounds; it is a profile, not the CPU benchmark (that is
``bench/protocol.py`` and ``bench/syscalls.py``).  Needs ``perf`` that may
record (root, or ``kernel.perf_event_paranoid`` at most 1).  Run alone:
``python bench/native.py``.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import loadgen
import protocol
import syscalls
from common import TESTS, cell_table, perf_usable

from dnsserver import DNSServer

CONCURRENCY = (8, 256)
ROUNDS = 2
FREQ = 4000

# the places a sample is put, in the order the table shows them
KERNEL_CALLS = {
    "futex": "kernel: futex (GIL and lock hand-over)",
    "poll": "kernel: poll (libmilter waits for a command)",
    "read": "kernel: socket reads and writes",
    "write": "kernel: socket reads and writes",
    "writev": "kernel: socket reads and writes",
    "clone3": "kernel: threads started and ended",
    "mmap": "kernel: threads started and ended",
    "munmap": "kernel: threads started and ended",
    "mprotect": "kernel: threads started and ended",
    "madvise": "kernel: threads started and ended",
    "exit": "kernel: threads started and ended",
    "set_robust_list": "kernel: threads started and ended",
    "rseq": "kernel: threads started and ended",
}
OTHER_CALL = "kernel: other system calls"
NO_CALL = "kernel: scheduler, interrupts, page faults"
LIBMILTER = "libmilter"
PYMILTER_C = "pymilter's C extension"
GIL = "libpython: the GIL's own functions"
LOCKS = "libc: locks and condition variables"
PYTHON = "Python code running (interpreter, objects, libc)"
OTHER = "other"
NO_MACROS = "heloguard, no macro request"  # bench/baseline/heloguard_no_macros.py
ROWS = [
    PYTHON,
    GIL,
    LOCKS,
    PYMILTER_C,
    LIBMILTER,
    *dict.fromkeys(KERNEL_CALLS.values()),
    OTHER_CALL,
    NO_CALL,
    OTHER,
]
GIL_SYMBOLS = (
    "take_gil",
    "drop_gil",
    "PyEval_AcquireThread",
    "PyEval_ReleaseThread",
    "PyEval_RestoreThread",
    "PyEval_SaveThread",
    "PyGILState_",
    "_PyThread_cond_",
    "PyCOND_",
    "PyMUTEX_",
)
LOCK_SYMBOLS = (
    "pthread_cond_",
    "pthread_mutex_",
    "__pthread_mutex",
    "___pthread_cond",
    "__lll_",
    "futex",
)


def _syscall(symbol: str) -> str | None:
    """``futex`` of ``__x64_sys_futex`` (and of the other spellings of a syscall entry)."""
    for prefix in ("__x64_sys_", "__ia32_sys_", "__se_sys_", "__do_sys_", "ksys_"):
        if symbol.startswith(prefix):
            return symbol[len(prefix) :]
    return None


def place(frames: list[tuple[str, str]]) -> str:
    """Where one sample goes; ``frames`` are (symbol, library), the leaf first."""
    if not frames:
        return OTHER
    symbol, dso = frames[0]
    if dso.startswith("[kernel"):
        for sym, lib in frames:
            if not lib.startswith("[kernel"):
                break
            call = _syscall(sym)
            if call is not None:
                return KERNEL_CALLS.get(call, OTHER_CALL)
        return NO_CALL
    lib = Path(dso).name
    if lib.startswith("libmilter"):
        return LIBMILTER
    if lib.startswith("milter.cpython"):
        return PYMILTER_C
    if lib.startswith(("libpython", "python")):
        return GIL if symbol.startswith(GIL_SYMBOLS) else PYTHON
    if lib.startswith(("libc.so", "libpthread")):
        return LOCKS if symbol.startswith(LOCK_SYMBOLS) else PYTHON
    return OTHER


def frame(line: str) -> tuple[str, str]:
    """``(symbol, library)`` of a ``perf script`` call-chain line."""
    text = line.strip()
    lib = ""
    if text.endswith(")") and " (" in text:
        text, lib = text[:-1].rsplit(" (", 1)
    parts = text.split(None, 1)
    symbol = parts[1] if len(parts) > 1 else ""
    symbol = symbol.split("+0x", 1)[0]
    return symbol, lib


def profile(script: str) -> Counter[str]:
    """Nanoseconds per place over the samples of ``perf script`` output."""
    out: Counter[str] = Counter()
    for block in script.split("\n\n"):
        lines = [line for line in block.splitlines() if line.strip()]
        if not lines:
            continue
        head = lines[0].split()
        try:
            period = int(head[0])
        except (IndexError, ValueError):
            continue
        out[place([frame(line) for line in lines[1:]])] += period
    return out


def measure(c: syscalls.Counted, cases: list[loadgen.Case], conc: int) -> tuple[Counter[str], int]:
    """Nanoseconds per place of ``c`` over the measured sessions, and those sessions."""
    loadgen.run(f"unix:{c.sock}", cases, concurrency=16, sessions=len(cases) * 2)
    c.control("enable")
    r = loadgen.run(f"unix:{c.sock}", cases, concurrency=conc, sessions=protocol.sessions_for(conc))
    c.control("disable")
    c.stop()
    script = subprocess.run(
        ["perf", "script", "-i", str(c.out), "-F", "period,ip,sym,dso"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    return profile(script), r.sessions


def run() -> str:
    """Profile every filter at each concurrency and return the markdown section."""
    head = [
        "## Where the CPU goes, native code and kernel (`bench/native.py`)",
        "",
        f"`perf record` at {FREQ} Hz (`cpu-clock`, every thread, kernel call chains) on each",
        "filter for the measured sessions only: the warm set of `bench/protocol.py`,",
        f"{ROUNDS} rounds pooled, the filters in alternating order.  Microseconds of CPU per",
        "session by where the sample was taken: a system call's kernel time under",
        "the call, user time by library; the GIL's own functions and libc's locks",
        "beside the Python code that runs between them.",
        "",
    ]
    why = perf_usable(["record", "-e", "cpu-clock", "-g", "-o", "/dev/null"], "record")
    if why:
        return "\n".join([*head, f"Not measured: {why}."])
    work = Path(tempfile.mkdtemp(prefix="hg-bench-native-"))
    cases = [protocol.case(i) for i in range(200)]
    totals: dict[tuple[str, int], Counter[str]] = {}
    sessions: Counter[tuple[str, int]] = Counter()
    with DNSServer(TESTS / "zones") as dns:
        protocol.serve_clients(dns, 200)
        filters: list[protocol.Spec] = [
            *protocol.noop_filters(work),
            # on both CPUs, like the no-op filters beside it
            ("heloguard", *protocol.heloguard(work, dns, "hg", milter=protocol.ALL_CPUS)),
        ]
        argv, sock = protocol.heloguard(work, dns, "hg-nomacros", milter=protocol.ALL_CPUS)
        asks_none = [sys.executable, str(protocol.HERE / "baseline" / "heloguard_no_macros.py")]
        filters.append((NO_MACROS, [*asks_none, *argv[argv.index("serve") :]], sock))
        record = ["record", "-e", "cpu-clock", "-F", str(FREQ), "-g", "-q"]
        for n_round in range(ROUNDS):
            for conc in CONCURRENCY:
                for label, argv, sock in filters if n_round % 2 == 0 else filters[::-1]:
                    with syscalls.counted(label, argv, sock, work, record) as c:
                        got, n = measure(c, cases, conc)
                    totals.setdefault((label, conc), Counter()).update(got)
                    sessions[(label, conc)] += n
                    sock.unlink(missing_ok=True)
    shutil.rmtree(work, ignore_errors=True)
    cells = [(label, conc) for conc in CONCURRENCY for label, _, _ in filters]
    per = {k: {p: ns / 1000 / max(sessions[k], 1) for p, ns in totals[k].items()} for k in cells}
    lines = [*head, *cell_table("where", ROWS, cells, per, digits=1, hide_below=0.05)]
    lines.append("")
    lines.extend(_reading(per))
    return "\n".join(lines)


HAND_OVER = (GIL, LOCKS, KERNEL_CALLS["futex"])


def _part(d: dict[str, float], rows: tuple[str, ...] | list[str]) -> float:
    return sum(d.get(r, 0.0) for r in rows)


def _reading(per: dict[tuple[str, int], dict[str, float]]) -> list[str]:
    """What the table says, in figures from it."""
    kernel = [r for r in ROWS if r.startswith("kernel")]
    out = []
    for conc in CONCURRENCY:
        c, py, hg = (per[(f, conc)] for f in ("no-op C (libmilter)", "no-op pymilter", "heloguard"))
        own = sum(py.values()) - sum(c.values())
        ours = sum(hg.values()) - sum(py.values())
        out.append(
            f"- At {conc}: pymilter's own cost (the no-op pymilter less the no-op C) "
            f"{own:.0f} us per session, {_part(py, HAND_OVER) - _part(c, HAND_OVER):.0f} us "
            f"of it lock hand-over (the GIL's functions, libc's locks, futex); heloguard's "
            f"over the no-op pymilter {ours:.0f} us: Python code "
            f"{_part(hg, [PYTHON]) - _part(py, [PYTHON]):+.0f}, hand-over "
            f"{_part(hg, HAND_OVER) - _part(py, HAND_OVER):+.0f}.  Kernel time: "
            f"{_part(c, kernel):.0f} (C), {_part(py, kernel):.0f} (pymilter), "
            f"{_part(hg, kernel):.0f} us (heloguard)."
        )
        quiet = per[(NO_MACROS, conc)]
        out.append(
            f"- At {conc}: asking for `{{daemon_name}}` and `{{auth_authen}}` (two `setsymlist`"
            f" calls in `negotiate`, pymilter's C lets go of the GIL around each) costs "
            f"{sum(hg.values()) - sum(quiet.values()):.0f} us per session, "
            f"{_part(hg, HAND_OVER) - _part(quiet, HAND_OVER):+.0f} of it hand-over.  "
            "heloguard keeps asking: the submission and authenticated-sender spares must "
            "not depend on the MTA's `milter_*_macros`."
        )
    return out


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        print(run())
