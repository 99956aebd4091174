"""Soak: many sessions against ``heloguard serve`` with random DNS faults.

``make soak`` (not part of CI).  What it does:

1. A test DNS server runs in a child process (``soak.py --serve-dns``) with a
   zone of its own: 1,024 well-run clients (forward-confirmed PTR names made
   of letters, HELO with that name), 1,024 bots (generic PTR names that do
   not resolve), a sender domain whose MX is clean.  Every record has a TTL
   of 30 s, so answers keep expiring and being asked again, and the server
   answers about 5 % of all questions with a fault picked at random: SERVFAIL,
   REFUSED, a dropped packet or a truncated answer (TCP retry).
2. ``heloguard serve`` runs with the default rules, greylisting on for
   everyone (``policy = "all"``: a SQLite write at every RCPT) and the
   metrics endpoint.
3. An asyncio load generator runs ``--sessions`` (50,000) milter sessions,
   ``--concurrency`` (256) at a time: 70 % whole sessions (connect, HELO,
   MAIL, RCPT, QUIT), 10 % aborted after MAIL, 10 % where the MTA hangs up
   after HELO, 10 % where it hangs up right after connect.
4. It samples the daemon's resident size (VmRSS) every second.

It reports the sessions, the duration, the errors (a session the load
generator could not complete; a 5xx for a well-run client, which only a
fault could explain; a daemon log line with a traceback, a failed callback
or a resolver error; the daemon gone), the resident size after the warm-up
(``--warmup`` sessions, 10,000) and at the end, and the growth between the
two.  Exit status 1 when there was any error or the growth is over 10 %.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import re
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import dns.name
import dns.rdatatype
from common import ROOT, TESTS, machine

from dnsserver import DNSServer, Fault

ORIGIN = "soak.test"
CLIENTS = 1024  # of each kind
TTL = 30
FAULT_KINDS = ("servfail", "refused", "drop", "truncate")
SENDER = f"news@{ORIGIN}"
# daemon log lines that count as errors
DAEMON_ERRORS = re.compile(
    r"Traceback|callback failed|resolver error|raised|database failure|unusable|did not stop"
)

# Protocol (libmilter mfdef.h)
ALL_ACTIONS = 0x1FF
ALL_PROTOCOL = 0x1FFFFF
P_NR_CONN, P_NR_HELO, P_NR_MAIL, P_NR_RCPT = 0x1000, 0x2000, 0x4000, 0x8000
P_NOHELO, P_NOMAIL, P_NORCPT = 0x2, 0x4, 0x8


# -- the DNS side ------------------------------------------------------------------


def letters(i: int) -> str:
    """A name part made of letters only (digits would make the name look generated)."""
    out = ""
    for _ in range(3):
        i, r = divmod(i, 26)
        out += chr(ord("a") + r)
    return out


def good_client(i: int) -> tuple[str, str]:
    """(address, name) of well-run client i: 64.72.0.0 - 64.72.3.255."""
    return f"64.72.{i // 256}.{i % 256}", f"mx-{letters(i)}.{ORIGIN}"


def bot_client(i: int) -> str:
    """Address of bot i: 64.72.4.0 - 64.72.7.255."""
    return f"64.72.{4 + i // 256}.{i % 256}"


def zones() -> dict[str, str]:
    """Origin -> zone text."""
    head = (
        f"$TTL {TTL}\n@ IN SOA ns.{ORIGIN}. hostmaster.{ORIGIN}. 1 7200 900 1209600 {TTL}\n"
        f"@ IN NS ns.{ORIGIN}.\n"
    )
    forward = [head, f"@ IN MX 10 {good_client(0)[1]}.\n"]
    reverse = {f"{o}.72.64.in-addr.arpa.": [head] for o in range(8)}
    for i in range(CLIENTS):
        ip, name = good_client(i)
        forward.append(f"{name}. IN A {ip}\n")
        octets = ip.split(".")
        reverse[f"{octets[2]}.72.64.in-addr.arpa."].append(f"{octets[3]} IN PTR {name}.\n")
        bot = bot_client(i).split(".")
        generic = f"{bot[0]}-{bot[1]}-{bot[2]}-{bot[3]}.dyn.{ORIGIN}."
        reverse[f"{bot[2]}.72.64.in-addr.arpa."].append(f"{bot[3]} IN PTR {generic}\n")
    out = {f"{ORIGIN}.": "".join(forward)}
    out.update({origin: "".join(text) for origin, text in reverse.items()})
    return out


class FaultyDNSServer(DNSServer):
    """The test DNS server, answering a share of all questions with a random fault."""

    def __init__(self, rate: float, zone_dir: Path) -> None:
        super().__init__(zone_dir=zone_dir)
        self.rate = rate
        self._random = random.Random(8)
        self.injected: Counter[str] = Counter()

    def _take_fault(
        self, qname: dns.name.Name, qtype: dns.rdatatype.RdataType, transport: str
    ) -> Fault | None:
        if transport == "udp" and self._random.random() < self.rate:
            kind = self._random.choice(FAULT_KINDS)
            self.injected[kind] += 1
            return Fault(qname, kind, None, 0.0, None)
        return super()._take_fault(qname, qtype, transport)


def serve_dns(rate: float) -> int:
    """Child process: serve the soak zones until stdin closes; report the faults injected."""
    server = FaultyDNSServer(rate, zone_dir=TESTS / "zones")
    for origin, text in zones().items():
        server.add_zone_text(origin, text)
    server.start()
    print(f"listening {server.nameserver}", flush=True)
    sys.stdin.read()  # the parent closes it when done
    print(json.dumps({"queries": len(server.queries()), "faults": server.injected}), flush=True)
    server.stop()
    return 0


# -- the milter side -----------------------------------------------------------------


def _z(*items: str) -> bytes:
    return b"".join(item.encode() + b"\0" for item in items)


def _packet(cmd: bytes, data: bytes = b"") -> bytes:
    return struct.pack("!I", len(data) + 1) + cmd + data


@dataclass
class Tally:
    """What the load generator saw."""

    done: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)

    def error(self, what: str, example: str) -> None:
        self.errors[what] += 1
        if len(self.examples) < 10:
            self.examples.append(f"{what}: {example}")


async def session(path: str, n: int, rnd: random.Random, tally: Tally) -> None:
    """One MTA-side session of a random kind, from a random client."""
    good = rnd.random() < 0.6
    i = rnd.randrange(CLIENTS)
    ip, name = good_client(i) if good else (bot_client(i), f"pc-{letters(i)}.bots.{ORIGIN}")
    kind = rnd.choices(("whole", "abort", "hangup-helo", "hangup-connect"), (70, 10, 10, 10))[0]
    reader, writer = await asyncio.open_unix_connection(path)
    protocol = 0

    async def reply() -> tuple[bytes, bytes]:
        while True:
            (length,) = struct.unpack("!I", await reader.readexactly(4))
            body = await reader.readexactly(length)
            if body[:1] != b"p":
                return body[:1], body[1:]

    async def step(packet: bytes, no_reply: int, declined: int) -> str:
        writer.write(packet)
        if protocol & (no_reply | declined):
            return "c"
        code, text = await reply()
        if code == b"y":
            smtp = text[:3].decode(errors="replace")
            if good and smtp.startswith("5"):
                tally.error("5xx for a well-run client", f"{ip} {text[:120]!r}")
            return smtp
        return code.decode()

    try:
        writer.write(_packet(b"O", struct.pack("!III", 6, ALL_ACTIONS, ALL_PROTOCOL)))
        code, data = await reply()
        if code != b"O":
            raise ConnectionError(f"negotiation reply {code!r}")
        protocol = struct.unpack("!III", data[:12])[2]
        macros = _packet(b"D", b"C" + _z("{daemon_name}", "mx", "j", "mx.example.test"))
        connect = _packet(b"C", _z("unknown") + b"4" + struct.pack("!H", 25) + _z(ip))
        outcome = await step(macros + connect, P_NR_CONN, 0)
        if kind == "hangup-connect":
            tally.outcomes["hung up at connect"] += 1
            return
        stage = "HELO"
        if outcome == "c":
            outcome = await step(_packet(b"H", _z(name)), P_NR_HELO, P_NOHELO)
        if kind == "hangup-helo":
            tally.outcomes["hung up after HELO"] += 1
            return
        if outcome == "c":
            stage = "MAIL"
            mail = _packet(b"D", b"M" + _z("{auth_authen}", "")) + _packet(b"M", _z(f"<{SENDER}>"))
            outcome = await step(mail, P_NR_MAIL, P_NOMAIL)
        if outcome == "c" and kind == "abort":
            writer.write(_packet(b"A"))
            outcome = "aborted"
        elif outcome == "c":
            stage = "RCPT"
            rcpt = _packet(b"R", _z(f"<user{n % 5000}@example.test>"))
            outcome = await step(rcpt, P_NR_RCPT, P_NORCPT)
        writer.write(_packet(b"Q"))
        await writer.drain()
        who = "good" if good else "bot"
        label = outcome if outcome in ("c", "aborted") else f"{outcome} at {stage}"
        tally.outcomes[f"{who}: {label}"] += 1
    finally:
        tally.done += 1
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def load(path: str, sessions: int, concurrency: int, tally: Tally) -> None:
    rnd = random.Random(1)
    counter = iter(range(sessions))

    async def worker() -> None:
        for n in counter:
            try:
                await asyncio.wait_for(session(path, n, rnd, tally), timeout=60)
            except (OSError, ConnectionError, asyncio.IncompleteReadError, TimeoutError) as exc:
                tally.error("session failed", f"{type(exc).__name__}: {exc}")

    await asyncio.gather(*(worker() for _ in range(concurrency)))


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def metric(port: int, name: str) -> float | None:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        for line in resp.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def run(sessions: int, concurrency: int, rate: float, warmup: int) -> int:
    work = Path(tempfile.mkdtemp(prefix="hg-soak-"))
    env = dict(os.environ, PYTHONSAFEPATH="1")
    dns = subprocess.Popen(
        [sys.executable, __file__, "--serve-dns", "--fault-rate", str(rate)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert dns.stdin is not None and dns.stdout is not None
    nameserver = dns.stdout.readline().split()[1]
    sock = work / "heloguard.sock"
    port = free_port()
    config = work / "heloguard.toml"
    config.write_text(
        f'[milter]\nsocket = "unix:{sock}"\n'
        f'[dns]\nnameservers = ["{nameserver}"]\ntimeout = 1\nbudget = 3\n'
        f'[log]\nlevel = "warning"\n'
        f'[metrics]\nlisten = "127.0.0.1:{port}"\n'
        f'[greylist]\ndatabase = "{work / "grey.sqlite"}"\npolicy = "all"\n'
    )
    log_path = work / "heloguard.log"
    with log_path.open("w") as log:
        daemon = subprocess.Popen(
            [sys.executable, "-m", "heloguard.cli", "serve", "--config", str(config)],
            stderr=log,
            stdout=log,
            env=env,
            cwd=ROOT,
        )
    try:
        deadline = time.monotonic() + 30
        while "listening on" not in log_path.read_text():
            if daemon.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"heloguard did not start:\n{log_path.read_text()}")
            time.sleep(0.1)
        tally = Tally()
        samples: list[tuple[float, int, int]] = []  # (seconds, sessions done, VmRSS kB)
        stop = threading.Event()
        started = time.monotonic()

        def sample() -> None:
            while not stop.wait(1.0):
                with contextlib.suppress(OSError, RuntimeError):
                    samples.append((time.monotonic() - started, tally.done, rss_kb(daemon.pid)))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        asyncio.run(load(str(sock), sessions, concurrency, tally))
        duration = time.monotonic() - started
        time.sleep(2)  # let libmilter finish the close callbacks
        stop.set()
        sampler.join()
        end_rss = rss_kb(daemon.pid)
        in_flight = metric(port, "heloguard_sessions_in_flight")
        alive = daemon.poll() is None
    finally:
        daemon.send_signal(signal.SIGKILL)
        daemon.wait()
        dns.stdin.close()
        dns_report = json.loads(dns.stdout.readline() or "{}")
        dns.wait(10)
    log_errors = [line for line in log_path.read_text().splitlines() if DAEMON_ERRORS.search(line)]
    after_warmup = next((rss for _, done, rss in samples if done >= warmup), None)
    peak = max((rss for *_, rss in samples), default=end_rss)
    growth = (end_rss - after_warmup) / after_warmup * 100 if after_warmup else float("nan")
    errors = sum(tally.errors.values()) + len(log_errors) + (0 if alive else 1)
    if in_flight != 0:
        errors += 1
    report = {
        "machine": machine(),
        "sessions": tally.done,
        "concurrency": concurrency,
        "duration_s": round(duration, 1),
        "sessions_per_s": round(tally.done / duration, 1),
        "fault_rate": rate,
        "dns_queries": dns_report.get("queries"),
        "dns_faults_injected": dns_report.get("faults"),
        "outcomes": dict(sorted(tally.outcomes.items())),
        "load_errors": dict(tally.errors),
        "error_examples": tally.examples,
        "daemon_error_lines": len(log_errors),
        "daemon_error_examples": log_errors[:5],
        "daemon_alive": alive,
        "sessions_in_flight_at_end": in_flight,
        "warmup_sessions": warmup,
        "rss_after_warmup_kb": after_warmup,
        "rss_peak_kb": peak,
        "rss_end_kb": end_rss,
        "rss_growth_pct": round(growth, 2),
        "errors": errors,
    }
    print(json.dumps(report, indent=2))
    ok = errors == 0 and growth <= 10.0
    print(f"soak: {'PASS' if ok else 'FAIL'} ({work})", file=sys.stderr)
    return 0 if ok else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--sessions", type=int, default=50_000)
    parser.add_argument("--concurrency", type=int, default=256)
    parser.add_argument("--fault-rate", type=float, default=0.05)
    parser.add_argument("--warmup", type=int, default=10_000)
    parser.add_argument("--serve-dns", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_dns:
        return serve_dns(args.fault_rate)
    return run(args.sessions, args.concurrency, args.fault_rate, args.warmup)


if __name__ == "__main__":
    sys.exit(main())
