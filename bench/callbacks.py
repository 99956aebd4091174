"""In-process cost of each milter callback, heloguard beside a no-op pymilter class.

No libmilter and no threads here: a stand-in context object plays the MTA and
the callbacks are called exactly as the daemon's registration calls them
(``heloguard.daemon._register``: pymilter's ``negotiate_callback``,
``connect_callback``, ``close_callback`` and the lambdas for the rest), one
session after another on one thread.  So a figure here is the Python work of
a callback, pymilter's Python layer included, with nothing for libmilter, the
GIL hand-over between libmilter's threads or the kernel; ``bench/protocol.py``
measures those on the running daemon.

The load is the warm set of ``bench/protocol.py``: 200 clients (even numbers
bots with generic names, refused at HELO; odd numbers well-run servers, run
to RCPT), every DNS answer and every settled decision cached by a first pass.
Each callback is timed with ``time.perf_counter_ns`` around the call; the
figure is the median over all sessions, and the session total the median of
per-session sums.

Run alone: ``python bench/callbacks.py [--profile]`` (``--profile`` prints
cProfile's top functions for the heloguard sessions instead).
"""

from __future__ import annotations

import contextlib
import cProfile
import importlib.util
import logging
import pstats
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import protocol
from common import TESTS, median
from loadgen import Case

from dnsserver import DNSServer

SESSIONS = 4000
CALLBACKS = ("negotiate", "connect", "helo", "envfrom", "envrcpt", "close")


class Ctx:
    """What pymilter's ``milterContext`` offers a callback, without libmilter."""

    def __init__(self) -> None:
        self.priv: Any = None
        self.reply: tuple[str, ...] | None = None

    def getpriv(self) -> Any:
        return self.priv

    def setpriv(self, priv: Any) -> None:
        self.priv = priv

    def getsymval(self, name: str) -> str | None:
        return "mx" if name == "{daemon_name}" else None

    def setsymlist(self, stage: int, macros: str) -> None:
        pass

    def setreply(self, *args: str) -> None:
        self.reply = args


def _calls(factory: type) -> dict[str, Callable[..., Any]]:
    """The callables libmilter's callbacks run, as the daemon registers them."""
    import Milter

    Milter.factory = factory
    return {
        "negotiate": Milter.negotiate_callback,
        "connect": Milter.connect_callback,
        "helo": lambda ctx, host: ctx.getpriv().hello(host),
        "envfrom": lambda ctx, *b: ctx.getpriv().envfrom_bytes(*b),
        "envrcpt": lambda ctx, *b: ctx.getpriv().envrcpt_bytes(*b),
        "close": Milter.close_callback,
    }


def session(
    calls: dict[str, Callable[..., Any]], case: Case, times: dict[str, list[int]] | None
) -> str:
    """One SMTP session through the callbacks; stops at the first refusal as Postfix does."""
    import Milter

    ctx = Ctx()
    clock = time.perf_counter_ns
    outcome = "accept"
    family = socket.AF_INET6 if ":" in case.ip else socket.AF_INET
    steps: list[tuple[str, tuple[Any, ...]]] = [
        ("negotiate", ([0x1FF, 0x1FFFFF, 0, 0],)),
        ("connect", ("unknown", family, (case.ip, 25))),
        ("helo", (case.helo,)),
        ("envfrom", (f"<{case.sender}>".encode(),)),
        ("envrcpt", (f"<{case.rcpt}>".encode(),)),
    ]
    total = 0
    for name, args in steps:
        t0 = clock()
        rc = calls[name](ctx, *args)
        dt = clock() - t0
        total += dt
        if times is not None:
            times[name].append(dt)
        if rc in (Milter.REJECT, Milter.TEMPFAIL):
            outcome = "reject" if rc == Milter.REJECT else "tempfail"
            break
        if rc == Milter.ACCEPT:
            break
    t0 = clock()
    calls["close"](ctx)
    dt = clock() - t0
    total += dt
    if times is not None:
        times["close"].append(dt)
        times["session"].append(total)
    return outcome


@contextlib.contextmanager
def heloguard_class(
    dns: DNSServer, *, recorded: bool = False, extra: dict[str, Any] | None = None
) -> Iterator[type]:
    """HeloguardMilter on the embedded defaults, logging a line per decision to a file;
    ``recorded``: decision records ([log] decisions) and Prometheus counters on too."""
    from heloguard.adapter import HeloguardMilter, RuntimeHolder
    from heloguard.config import from_mapping
    from heloguard.daemon import setup_logging, stop_logging
    from heloguard.metrics import Metrics
    from heloguard.session import Runtime

    work = Path(tempfile.mkdtemp(prefix="hg-bench-cb-"))
    settings: dict[str, Any] = {"dns": {"nameservers": [dns.nameserver]}}
    if recorded:
        settings["log"] = {"decisions": str(work / "decisions.jsonl")}
    for section, values in (extra or {}).items():
        settings[section] = {k: str(v).replace("{work}", str(work)) for k, v in values.items()}
    config = from_mapping(settings)
    with (work / "decisions.log").open("w") as out:
        real_stderr, sys.stderr = sys.stderr, out
        try:
            setup_logging(config.log)  # its stream handler keeps this file
        finally:
            sys.stderr = real_stderr
        runtime = Runtime.build(config, metrics=Metrics() if recorded else None)
        HeloguardMilter.holder = RuntimeHolder(runtime)
        try:
            yield HeloguardMilter
        finally:
            runtime.resolver.close()
            stop_logging()
            logging.getLogger("heloguard").handlers.clear()


def measure(factory: type, cases: list[Case], sessions: int) -> dict[str, list[int]]:
    """Warm up on every case twice, then time ``sessions`` sessions."""
    calls = _calls(factory)
    with _negotiated(calls):
        for c in cases * 2:
            session(calls, c, None)
        times: dict[str, list[int]] = {k: [] for k in (*CALLBACKS, "session")}
        for i in range(sessions):
            session(calls, cases[i % len(cases)], times)
    return times


@contextlib.contextmanager
def _negotiated(calls: dict[str, Callable[..., Any]]) -> Iterator[None]:
    """negotiate_callback keeps the new object with setpriv; make it the ctx's private."""
    import Milter

    original = calls["negotiate"]

    def negotiate(ctx: Ctx, opts: list[int]) -> int:
        m = Milter.factory()
        m._setctx(ctx)
        ctx.setpriv(m)
        rc = m.negotiate(opts)
        # pymilter's _setctx calls ctx.setpriv itself; the line above keeps it
        # right for classes whose _setctx does not
        return int(rc)

    calls["negotiate"] = negotiate
    try:
        yield
    finally:
        calls["negotiate"] = original


def _noop_class() -> type:
    """The no-op filter class of ``bench/baseline/noop_pymilter.py``."""
    path = Path(__file__).resolve().parent / "baseline" / "noop_pymilter.py"
    spec = importlib.util.spec_from_file_location("noop_pymilter", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"bench: cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    noop: type = module.Noop
    return noop


def run() -> str:
    """Measure both classes and return the markdown section."""
    Noop = _noop_class()
    cases = [protocol.case(i) for i in range(200)]
    with DNSServer(TESTS / "zones") as dns:
        protocol.serve_clients(dns, 200)
        with heloguard_class(dns) as hg:
            hg_times = measure(hg, cases, SESSIONS)
        with heloguard_class(dns, recorded=True) as hg:
            rec_times = measure(hg, cases, SESSIONS)
    noop_times = measure(Noop, cases, SESSIONS)
    lines = [
        "## Each milter callback in-process (`bench/callbacks.py`)",
        "",
        "The callbacks called as the daemon registers them, one session after another",
        "on one thread, with a stand-in for libmilter's context: the Python work of each",
        "callback, pymilter's Python layer included; nothing for libmilter, the GIL",
        "hand-over between its threads or the kernel.  The warm set of",
        f"`bench/protocol.py` (200 clients, every answer cached), {SESSIONS:,} sessions;",
        "median microseconds per call (bots stop at HELO, so MAIL and RCPT are",
        "the servers' calls; heloguard accepts a server's message at MAIL, as",
        "nothing is left to judge at RCPT, and the MTA then calls no RCPT).",
        "The last column runs with decision records (`[log] decisions`) and the",
        "Prometheus counters on as well: both are queued for the log writer's",
        "thread, so the callback pays for the queueing only.",
        "",
        "| callback | no-op pymilter | heloguard | heloguard - no-op"
        " | heloguard, records and metrics on |",
        "|---|---|---|---|---|",
    ]
    for name in (*CALLBACKS, "session"):
        n, h, r = noop_times[name], hg_times[name], rec_times[name]
        label = "whole session" if name == "session" else f"`{name}`"
        nm = median([x / 1e3 for x in n])
        if not h:  # heloguard accepted the message at MAIL: the MTA calls no RCPT
            lines.append(f"| {label} | {nm:.1f} | not called | - | not called |")
            continue
        hm = median([x / 1e3 for x in h])
        rm = median([x / 1e3 for x in r])
        lines.append(f"| {label} | {nm:.1f} | {hm:.1f} | {hm - nm:+.1f} | {rm:.1f} |")
    return "\n".join(lines)


def profile() -> None:
    """cProfile's view of the warm heloguard sessions."""
    cases = [protocol.case(i) for i in range(200)]
    with DNSServer(TESTS / "zones") as dns:
        protocol.serve_clients(dns, 200)
        with heloguard_class(dns) as hg:
            calls = _calls(hg)
            with _negotiated(calls):
                for c in cases * 2:
                    session(calls, c, None)
                prof = cProfile.Profile()
                prof.enable()
                for i in range(SESSIONS):
                    session(calls, cases[i % len(cases)], None)
                prof.disable()
    pstats.Stats(prof).sort_stats("tottime").print_stats(35)


if __name__ == "__main__":
    if "--profile" in sys.argv:
        profile()
    else:
        print(run())
