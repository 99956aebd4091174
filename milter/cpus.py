"""Which CPUs the daemon runs on: ``[milter] cpus``.

heloguard's Python code runs under the interpreter's global lock, so the
daemon never does more than one CPU's worth of it, however many CPUs it may
use.  libmilter (as Debian builds it, with its worker pool) hands each MTA
command to one of its worker threads, and starts more while those are busy;
every callback passes the lock from one of those threads to the next.
Spread over several CPUs, each hand-over is a wake-up sent across CPUs, and
the threads' data moves between their caches; on one CPU it is a switch
between threads.  Measured with 256 connections on a two-CPU host
(``bench/protocol.py``, in ``docs/benchmarks.md``), heloguard spent 2.5 times
the CPU per session (260 against 104 us) when the kernel spread its threads
over both CPUs, and the no-op pymilter filter 2.1 times.  So the daemon
runs on one CPU unless told otherwise.

The setting, read once at start (changing it needs a restart):

- ``"one"`` (the default): one CPU, the highest-numbered one the process may
  use (``sched_getaffinity``: a systemd ``CPUAffinity=`` or a cpuset
  narrows the choice first).  Two daemons on one host should each get their
  own CPU list instead.
- ``"all"``: wherever the kernel schedules the threads (no affinity set).
- A CPU list in the syntax of ``taskset -c`` and systemd's ``CPUAffinity=``:
  ``"3"``, ``"2,3"``, ``"0-3,6"``.  Every CPU in it must be one the process
  may use, or the daemon does not start.

Applied in :func:`pin` before the daemon starts any thread: the threads
started later (the log writer, the resolver, libmilter's) inherit it.  No
input from the network reaches this module.
"""

from __future__ import annotations

import os
import re

ONE = "one"
ALL = "all"
_LIST = re.compile(r"^\d+(-\d+)?(,\d+(-\d+)?)*$")
MAX_CPU = 65535  # far above any host; keeps "0-999999999" from building a huge set


def parse_list(spec: str) -> frozenset[int]:
    """The CPUs of a list such as ``"0-3,6"``; ValueError if it is not one."""
    text = spec.replace(" ", "")
    if not _LIST.match(text):
        raise ValueError(f'cpus {spec!r}: expected "one", "all" or a CPU list such as "2" or "0-3"')
    cpus: set[int] = set()
    for part in text.split(","):
        first, _, last = part.partition("-")
        low, high = int(first), int(last or first)
        if low > high:
            raise ValueError(f"cpus {spec!r}: range {part} runs backwards")
        if high > MAX_CPU:
            raise ValueError(f"cpus {spec!r}: CPU {high} is beyond {MAX_CPU}")
        cpus.update(range(low, high + 1))
    return frozenset(cpus)


def validate(spec: str) -> None:
    """Syntax only: which CPUs exist is known where the daemon starts."""
    if spec not in (ONE, ALL):
        parse_list(spec)


def choose(spec: str, allowed: frozenset[int]) -> frozenset[int] | None:
    """The CPUs to run on, given those the process may use; None: leave it alone.

    ValueError when a listed CPU is not among ``allowed``.
    """
    if spec == ALL:
        return None
    if spec == ONE:
        return frozenset({max(allowed)})
    wanted = parse_list(spec)
    missing = sorted(wanted - allowed)
    if missing:
        raise ValueError(
            f"cpus {spec!r}: CPU {format_list(frozenset(missing))} is not among those "
            f"this process may use ({format_list(allowed)})"
        )
    return wanted


def format_list(cpus: frozenset[int]) -> str:
    """``{0, 1, 2, 5}`` as ``"0-2,5"``."""
    parts: list[str] = []
    run: list[int] = []
    for cpu in sorted(cpus):
        if run and cpu == run[-1] + 1:
            run.append(cpu)
            continue
        if run:
            parts.append(_run(run))
        run = [cpu]
    if run:
        parts.append(_run(run))
    return ",".join(parts)


def _run(run: list[int]) -> str:
    return str(run[0]) if len(run) == 1 else f"{run[0]}-{run[-1]}"


def pin(spec: str) -> str:
    """Apply ``spec`` to the calling thread (call it before any other starts);
    return what was done, for the start-up log line.  ValueError for a CPU the
    process may not use, or a list the system refuses or cannot set; the default
    ("one") runs on where it is when the system refuses, and says so."""
    if not hasattr(os, "sched_setaffinity"):
        if spec not in (ONE, ALL):
            raise ValueError(f"cpus {spec!r}: this system cannot set CPU affinity")
        return "on any CPU (this system cannot set CPU affinity)"
    allowed = frozenset(os.sched_getaffinity(0))
    cpus = choose(spec, allowed)
    if cpus is None:
        return f'on CPUs {format_list(allowed)} (cpus = "{spec}")'
    try:
        os.sched_setaffinity(0, cpus)
    except OSError as exc:  # a container may refuse it
        if spec != ONE:
            raise ValueError(
                f"cpus {spec!r}: cannot run on CPU {format_list(cpus)}: {exc}"
            ) from None
        return f'on CPUs {format_list(allowed)} (cpus = "one", but the system refused: {exc})'
    which = "CPU" if len(cpus) == 1 else "CPUs"
    return f'on {which} {format_list(cpus)} of {format_list(allowed)} (cpus = "{spec}")'
