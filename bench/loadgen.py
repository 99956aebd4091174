"""A milter load generator: many MTA-side sessions in parallel, as Postfix drives them.

Each session is what an MTA sends for one SMTP connection that stops after
RCPT: option negotiation, connect (with ``{daemon_name}``), HELO, MAIL
(with ``{auth_authen}``), RCPT, QUIT, and it stops at the first refusal as
Postfix does.  Cases come from a JSON-lines file, one object a line::

    {"ip": "203.0.113.7", "helo": "bot.example", "sender": "a@b.example",
     "rcpt": "postmaster@example.test", "expect": "reject"}

(``sender``, ``rcpt`` and ``expect`` are optional).  ``concurrency``
sessions run at once, on one asyncio loop, round-robin over the cases.

The report: sessions per second, connect-to-verdict latency (from sending
CONNECT to the HELO reply, the moment the MTA knows the verdict) as p50 and
p99, verdict counts (accept / tempfail / reject, by the first refusing
reply), errors (a dropped connection or a protocol surprise), and, when the
milter's pid is given, its CPU time per session (user + system, from
``/proc``) and its peak resident size (``VmHWM``).

Run alone: ``python bench/loadgen.py SOCKET CASES.jsonl --concurrency 64
--sessions 5000 [--pid PID]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import struct
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

# Protocol (libmilter mfdef.h): everything an MTA offers, and the no-reply flags.
ALL_ACTIONS = 0x1FF
ALL_PROTOCOL = 0x1FFFFF
P_NR_CONN = 0x1000
P_NR_HELO = 0x2000
P_NR_MAIL = 0x4000
P_NR_RCPT = 0x8000
P_NOHELO = 0x2
P_NOMAIL = 0x4
P_NORCPT = 0x8


@dataclass(frozen=True)
class Case:
    """One client, as a JSON line gives it."""

    ip: str
    helo: str
    sender: str = "sender@example.org"
    rcpt: str = "postmaster@example.test"
    expect: str | None = None


def load_cases(path: Path) -> list[Case]:
    """Read a JSON-lines file of cases."""
    cases = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            cases.append(Case(**json.loads(line)))
        except (TypeError, ValueError) as e:
            raise SystemExit(f"{path}:{n}: not a case: {e}") from None
    if not cases:
        raise SystemExit(f"{path}: no cases")
    return cases


def _z(*items: str) -> bytes:
    return b"".join(item.encode("utf-8", "surrogateescape") + b"\0" for item in items)


def _packet(cmd: bytes, data: bytes = b"") -> bytes:
    return struct.pack("!I", len(data) + 1) + cmd + data


@dataclass
class Result:
    """What a run measured."""

    sessions: int = 0
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    verdicts: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    mismatches: int = 0
    cpu_seconds: float | None = None
    user_seconds: float | None = None  # the user part of cpu_seconds (the rest: system)
    peak_rss_kb: int | None = None

    @property
    def rate(self) -> float:
        """Sessions per second."""
        return self.sessions / self.seconds if self.seconds else 0.0

    @property
    def cpu_per_session(self) -> float | None:
        """The milter's CPU seconds per completed session."""
        if self.cpu_seconds is None or not self.sessions:
            return None
        return self.cpu_seconds / self.sessions

    def percentile(self, q: float) -> float:
        """Connect-to-verdict latency at percentile q (0-100), seconds; nearest rank."""
        ordered = sorted(self.latencies)
        if not ordered:
            return float("nan")
        return ordered[max(0, min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1))))]


class _Conn:
    """One milter connection on the loop: send packets, read replies."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.protocol = 0

    async def reply(self) -> tuple[bytes, bytes]:
        while True:
            head = await self.reader.readexactly(4)
            (length,) = struct.unpack("!I", head)
            body = await self.reader.readexactly(length)
            if body[:1] != b"p":  # progress: keep waiting
                return body[:1], body[1:]

    def expects(self, no_reply: int, declined: int) -> bool:
        return not self.protocol & (no_reply | declined)


def verdict(code: bytes, text: bytes) -> str | None:
    """accept / tempfail / reject for a refusing reply; None for continue."""
    if code == b"y":
        return "reject" if text[:1] == b"5" else "tempfail"
    return {b"r": "reject", b"t": "tempfail", b"d": "reject"}.get(code)


async def _session(address: str, case: Case, result: Result) -> None:
    if address.startswith(("unix:", "local:")):
        reader, writer = await asyncio.open_unix_connection(address.split(":", 1)[1])
    else:
        port, _, host = address.split(":", 1)[1].partition("@")
        reader, writer = await asyncio.open_connection(host or "127.0.0.1", int(port))
    conn = _Conn(reader, writer)
    try:
        writer.write(_packet(b"O", struct.pack("!III", 6, ALL_ACTIONS, ALL_PROTOCOL)))
        code, data = await conn.reply()
        if code != b"O":
            raise ConnectionError(f"negotiation reply {code!r}")
        conn.protocol = struct.unpack("!III", data[:12])[2]
        family = b"6" if ":" in case.ip else b"4"
        started = time.perf_counter()
        writer.write(
            _packet(b"D", b"C" + _z("{daemon_name}", "mx", "j", "mx.example.test"))
            + _packet(b"C", _z("unknown") + family + struct.pack("!H", 25) + _z(case.ip))
        )
        outcome: str | None = None
        if conn.expects(P_NR_CONN, 0):
            outcome = verdict(*await conn.reply())
        if outcome is None:
            writer.write(_packet(b"H", _z(case.helo)))
            if conn.expects(P_NR_HELO, P_NOHELO):
                outcome = verdict(*await conn.reply())
        result.latencies.append(time.perf_counter() - started)
        if outcome is None:
            writer.write(
                _packet(b"D", b"M" + _z("{auth_authen}", ""))
                + _packet(b"M", _z(f"<{case.sender}>"))
            )
            if conn.expects(P_NR_MAIL, P_NOMAIL):
                code, text = await conn.reply()
                outcome = verdict(code, text)
                if code == b"a":  # accept this message: an MTA sends no RCPT to this filter
                    outcome = "accept"
        if outcome is None:
            writer.write(_packet(b"R", _z(f"<{case.rcpt}>")))
            if conn.expects(P_NR_RCPT, P_NORCPT):
                outcome = verdict(*await conn.reply())
        writer.write(_packet(b"Q"))
        await writer.drain()
        final = outcome or "accept"
        result.verdicts[final] += 1
        if case.expect is not None and case.expect != final:
            result.mismatches += 1
        result.sessions += 1
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far."""
    user, system = cpu_split(pid)
    return user + system


def cpu_split(pid: int) -> tuple[float, float]:
    """User and system CPU seconds of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def peak_rss_kb(pid: int) -> int | None:
    """The process's peak resident size (VmHWM), in KiB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


async def _run(
    address: str, cases: list[Case], concurrency: int, sessions: int, result: Result
) -> None:
    next_index = 0

    async def worker() -> None:
        nonlocal next_index
        while next_index < sessions:
            case = cases[next_index % len(cases)]
            next_index += 1
            try:
                await _session(address, case, result)
            except (OSError, asyncio.IncompleteReadError, ConnectionError) as e:
                result.errors[type(e).__name__] += 1

    await asyncio.gather(*(worker() for _ in range(concurrency)))


def run(
    address: str,
    cases: list[Case],
    *,
    concurrency: int,
    sessions: int,
    pid: int | None = None,
) -> Result:
    """Drive ``sessions`` sessions, ``concurrency`` at a time; measure the milter ``pid``."""
    result = Result()
    cpu0 = cpu_split(pid) if pid else None
    started = time.perf_counter()
    asyncio.run(_run(address, cases, concurrency, sessions, result))
    result.seconds = time.perf_counter() - started
    if pid is not None and cpu0 is not None:
        user, system = cpu_split(pid)
        result.user_seconds = user - cpu0[0]
        result.cpu_seconds = result.user_seconds + system - cpu0[1]
        result.peak_rss_kb = peak_rss_kb(pid)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("socket", help="unix:/path or inet:PORT@HOST")
    p.add_argument("cases", type=Path, help="JSON-lines file of cases")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--sessions", type=int, default=2000)
    p.add_argument("--pid", type=int, help="the milter's pid, to measure its CPU and memory")
    a = p.parse_args(argv)
    r = run(
        a.socket,
        load_cases(a.cases),
        concurrency=a.concurrency,
        sessions=a.sessions,
        pid=a.pid,
    )
    out = {
        "sessions": r.sessions,
        "seconds": round(r.seconds, 3),
        "sessions_per_second": round(r.rate, 1),
        "p50_ms": round(r.percentile(50) * 1e3, 3),
        "p99_ms": round(r.percentile(99) * 1e3, 3),
        "verdicts": dict(r.verdicts),
        "errors": dict(r.errors),
        "unexpected_verdicts": r.mismatches,
    }
    if r.cpu_per_session is not None:
        out["cpu_us_per_session"] = round(r.cpu_per_session * 1e6, 1)
        out["peak_rss_mb"] = round((r.peak_rss_kb or 0) / 1024, 1)
    json.dump(out, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
