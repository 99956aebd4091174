"""Bounded work and memory: hostile zone data never makes heloguard do unbounded work.

* Caps, each with zone data that exceeds it: PTR names tried per address
  (``max_names``), MX targets judged (``max_mx``), addresses per name
  (``max_addresses``), and CNAME depth (dnspython follows at most 15 links of
  a chain inside one answer, and heloguard never asks a question of its own
  to chase one: a longer chain, or a loop, is TEMP, so a 4xx).
* Answers of 100 records (over TCP after truncation), PTR names with odd
  bytes (never asked about).
* Per-connection state: after sessions that end by QUIT, by abort or by the
  MTA hanging up, no session object survives in the process, the daemon's
  ``heloguard_sessions_in_flight`` gauge is back to 0 and libmilter's
  per-connection threads are gone.
* The DNS cache and the decision cache stay within their sizes.
"""

from __future__ import annotations

import gc
import ipaddress
import socket
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from miltertest import MilterClient, run_session
from prometheus_client.parser import text_string_to_metric_families

from heloguard.answers import Answer, Query, Status
from heloguard.config import Mode, from_mapping
from heloguard.engine import Decision, LiveDns, Verdict
from heloguard.names import parse_helo
from heloguard.rules import REGISTRY
from heloguard.rules.base import Context, Stage
from heloguard.session import DecisionCache, Runtime, Session

import dnsserver
from dnsserver import DNSServer
from mta.common import free_port

pytestmark = pytest.mark.integration

ORIGIN = "hg-bounds.test"
SOA = f"@ IN SOA ns.{ORIGIN}. hostmaster.{ORIGIN}. 1 7200 900 1209600 300\n@ IN NS ns.{ORIGIN}.\n"
LONG_LABEL = "l" * 63
ODD_PTRS = [  # 64.71.9.3: one real name among hostile ones
    f"good.{ORIGIN}.",
    f"bad\\000name.{ORIGIN}.",
    f"a\\032b.{ORIGIN}.",
    f"caf\\195\\169.{ORIGIN}.",
    f"-lead.{ORIGIN}.",
    f"\\*.{ORIGIN}.",
    f"{LONG_LABEL}.{ORIGIN}.",
    f"_under.{ORIGIN}.",
    "64.71.9.3.",
    f"semi\\;colon.{ORIGIN}.",
    f"new\\010line.{ORIGIN}.",
]


def chain(prefix: str, links: int) -> str:
    """``links`` CNAMEs, prefix00 -> prefix01 -> ... -> the last, which has an address."""
    lines = [f"{prefix}{i:02d} IN CNAME {prefix}{i + 1:02d}" for i in range(links)]
    return "\n".join([*lines, f"{prefix}{links:02d} IN A 64.71.9.3"]) + "\n"


def zone_text() -> str:
    text = "$TTL 300\n" + SOA
    text += "n050.many IN A 64.71.9.2\n"  # only the 51st PTR name of 64.71.9.2 resolves back
    text += "good IN A 64.71.9.3\n"
    text += f"{LONG_LABEL} IN A 64.71.9.30\n_under IN A 64.71.9.31\n"
    text += "".join(f"bigmx IN MX {i} m{i:03d}.bigmx\n" for i in range(100))
    text += "".join(f"m{i:03d}.bigmx IN A 64.71.9.4\n" for i in range(100))
    text += "".join(f"wide IN A 64.71.10.{i}\n" for i in range(100))
    text += "widemx IN MX 10 wide\n"
    text += chain("c", 8) + chain("d", 15) + chain("e", 16)
    text += "loop1 IN CNAME loop2\nloop2 IN CNAME loop1\nself IN CNAME self\n"
    return text


def reverse_text() -> str:
    text = "$TTL 300\n" + SOA
    text += "".join(f"2 IN PTR n{i:03d}.many.{ORIGIN}.\n" for i in range(100))
    text += "".join(f"3 IN PTR {name}\n" for name in ODD_PTRS)
    text += f"4 IN PTR m000.bigmx.{ORIGIN}.\n"
    return text


@pytest.fixture(scope="module")
def bounds_dns(zones_server: DNSServer) -> DNSServer:
    zones_server.add_zone_text(f"{ORIGIN}.", zone_text())
    zones_server.add_zone_text("9.71.64.in-addr.arpa.", reverse_text())
    return zones_server


@pytest.fixture
def hostile(bounds_dns: DNSServer, dns_server: DNSServer) -> DNSServer:
    """The session's server with the hostile zones, faults and query log reset."""
    return dns_server


def decide(
    server: DNSServer,
    rules: dict[str, dict[str, Any]],
    ip: str,
    helo: str | None = None,
    sender: str | None = None,
    phases: list[list[Stage]] | None = None,
) -> Decision:
    """One decision by the engine with only ``rules`` on, against the test server."""
    table: dict[str, Any] = {name: {"action": "off"} for name in REGISTRY}
    table.update(rules)
    config = from_mapping(
        {"dns": {"nameservers": [server.nameserver], "timeout": 2, "budget": 5}, "rules": table}
    )
    rt = Runtime.build(config)
    try:
        ctx = Context(
            client=ipaddress.ip_address(ip),
            helo=parse_helo(helo) if helo is not None else None,
            sender=sender,
        )
        coro = rt.engine.decide(ctx, LiveDns(rt.resolver), phases or [[Stage.CONNECT, Stage.HELO]])
        return rt.resolver.run(coro, timeout=10)
    finally:
        rt.resolver.close()


def asked(server: DNSServer, rdtype: str, suffix: str) -> list[str]:
    return sorted(
        {q.name for q in server.queries() if q.qtype == rdtype and q.name.endswith(suffix)}
    )


# -- caps -------------------------------------------------------------------


@pytest.mark.parametrize("max_names", [10, 3])
def test_ptr_names_are_capped(hostile: DNSServer, max_names: int) -> None:
    d = decide(hostile, {"fcrdns": {"max_names": max_names}}, "64.71.9.2", "x.example.net")
    ptr = d.answers[Query.of("2.9.71.64.in-addr.arpa", "PTR")]
    assert ptr.ok and len(ptr.records) == 100
    assert {q.transport for q in hostile.queries() if q.qtype == "PTR"} == {"udp", "tcp"}
    tried = asked(hostile, "A", f"many.{ORIGIN}")
    assert tried == [f"n{i:03d}.many.{ORIGIN}" for i in range(max_names)]
    # the one name that would confirm is past the cap: not tried, so not verified
    report = d.report("fcrdns")
    assert report is not None and d.verdict is Verdict.REJECT, report
    assert len(report.lookups) == 1 + max_names


@pytest.mark.parametrize("max_mx", [10, 2])
def test_mx_targets_are_capped(hostile: DNSServer, max_mx: int) -> None:
    d = decide(
        hostile,
        {"sender_mx": {"max_mx": max_mx}},
        "64.71.1.10",
        "ukiah.firemountain.net",
        sender=f"someone@bigmx.{ORIGIN}",
        phases=[[Stage.MAIL]],
    )
    mx = d.answers[Query.of(f"bigmx.{ORIGIN}", "MX")]
    assert mx.ok and len(mx.records) == 100
    expected = [f"m{i:03d}.bigmx.{ORIGIN}" for i in range(max_mx)]  # the most preferred
    assert asked(hostile, "A", f"bigmx.{ORIGIN}") == expected
    assert asked(hostile, "AAAA", f"bigmx.{ORIGIN}") == expected
    assert d.verdict is Verdict.ACCEPT, d.report("sender_mx")


def test_addresses_per_name_are_capped(hostile: DNSServer) -> None:
    d = decide(
        hostile,
        {"helo_fcrdns": {"action": "reject", "max_addresses": 4}},
        "64.71.1.10",
        f"wide.{ORIGIN}",
    )
    wide = d.answers[Query.of(f"wide.{ORIGIN}", "A")]
    assert wide.ok and len(wide.records) == 100
    assert len(asked(hostile, "PTR", "10.71.64.in-addr.arpa")) == 4
    hostile.reset_log()
    decide(
        hostile,
        {"sender_mx": {"max_addresses": 2}},
        "64.71.1.10",
        "ukiah.firemountain.net",
        sender=f"someone@widemx.{ORIGIN}",
        phases=[[Stage.MAIL]],
    )
    assert len(asked(hostile, "PTR", "10.71.64.in-addr.arpa")) == 2


@pytest.mark.parametrize(
    ("head", "links", "temp"),
    [
        ("c00", 8, False),
        ("d00", 15, False),
        ("e00", 16, True),
        ("loop1", 0, True),
        ("self", 0, True),
    ],
    ids=["8-links", "15-links", "16-links", "loop", "self-loop"],
)
def test_cname_depth_is_capped(
    hostile: DNSServer, monkeypatch: pytest.MonkeyPatch, head: str, links: int, temp: bool
) -> None:
    # let the test server put the whole chain in one answer, as a recursive resolver does
    monkeypatch.setattr(dnsserver, "MAX_CNAME_CHAIN", 40)
    helo = f"{head}.{ORIGIN}"
    d = decide(hostile, {"helo_resolves": {"action": "reject"}}, "64.71.1.10", helo)
    a = d.answers[Query.of(helo, "A")]
    if temp:
        assert a.status is Status.TEMP, a
        assert d.verdict is Verdict.TEMPFAIL and d.reply is not None and d.reply.code == 451
    else:
        assert a.ok and a.records == ("64.71.9.3",), a
        assert a.canonical == f"{head[0]}{links:02d}.{ORIGIN}"
        assert d.verdict is Verdict.ACCEPT
    # heloguard asked only the head of the chain: it never chases a CNAME itself
    names = {q.name for q in hostile.queries() if q.name.endswith(ORIGIN)}
    assert names == {helo}, names


def test_ptr_names_with_odd_bytes_are_never_asked(hostile: DNSServer) -> None:
    d = decide(hostile, {"fcrdns": {"action": "reject"}}, "64.71.9.3", f"good.{ORIGIN}")
    ptr = d.answers[Query.of("3.9.71.64.in-addr.arpa", "PTR")]
    assert ptr.ok and len(ptr.records) == len(ODD_PTRS)
    for record in ptr.records:
        assert record.isprintable() and record.isascii(), record  # escaped as \DDD
    tried = set(asked(hostile, "A", ORIGIN))
    assert tried == {f"good.{ORIGIN}", f"{LONG_LABEL}.{ORIGIN}", f"_under.{ORIGIN}"}
    assert d.verdict is Verdict.ACCEPT
    assert d.facts("verified") == (f"good.{ORIGIN}",)


# -- caches ------------------------------------------------------------------


def test_dns_cache_stays_within_its_size(make_resolver: Callable[..., Any]) -> None:
    res = make_resolver(cache_size=20)
    queries = [Query.of(f"n{i:03d}.many.{ORIGIN}", "A") for i in range(100)]
    res.run(res.lookup_many(queries), timeout=20)
    assert 0 < res.cache_size() <= 20


def test_decision_cache_stays_within_its_size() -> None:
    cache = DecisionCache()
    q = Query.of("x.example", "A")

    def settled() -> Decision:
        d = Decision(Verdict.ACCEPT, Stage.HELO, None, None, Mode.ENFORCE, Verdict.ACCEPT, None)
        d.answers = {q: Answer(q, Status.OK, ("192.0.2.1",), ttl=300)}
        return d

    extra = 100
    for i in range(DecisionCache.SIZE + extra):
        cache.put(("client", i), settled())
    assert all(cache.get(("client", i)) is None for i in range(extra)), "the oldest went"
    kept = sum(cache.get(("client", i)) is not None for i in range(DecisionCache.SIZE + extra))
    assert kept == DecisionCache.SIZE


# -- per-connection state ----------------------------------------------------


def live_sessions() -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if isinstance(o, Session))


def test_sessions_leave_nothing_behind(dns_server: DNSServer) -> None:
    """Sessions closed at every stage, aborted or not: no Session object survives."""
    rt = Runtime.build(
        from_mapping({"dns": {"nameservers": [dns_server.nameserver], "timeout": 1}})
    )
    try:
        before = live_sessions()
        for i in range(60):
            s = Session(rt)
            s.connect(("64.71.1.10", "103.245.153.249", "127.0.0.1")[i % 3], "mx")
            if i % 4 > 0:
                s.helo("ukiah.firemountain.net")
            if i % 4 > 1:
                s.mail("rsk@gsp.org")
                s.abort()
            if i % 4 > 2:
                s.rcpt("postmaster@example.test")
            s.close()
            assert s.prefetch is None
            del s
        assert live_sessions() == before
    finally:
        rt.resolver.close()


def scrape_gauge(port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                return float(sample.value)
    raise AssertionError(f"{name} not exported")


def wait_until(check: Callable[[], bool], timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return check()


def test_daemon_frees_every_connection(start_milter: Any) -> None:
    port = free_port()
    m = start_milter({"metrics": {"listen": f"127.0.0.1:{port}"}})
    m.wait_for("metrics on http://")
    tasks = Path(f"/proc/{m.proc.pid}/task")

    def threads() -> int:
        return len(list(tasks.iterdir()))

    def in_flight() -> float:
        return scrape_gauge(port, "heloguard_sessions_in_flight")

    idle = threads()
    clients: list[MilterClient] = []
    for i in range(20):
        c = MilterClient(m.socket)
        c.negotiate()
        c.connect(("64.71.1.10", "103.245.153.249")[i % 2], macros={"{daemon_name}": "mx"})
        clients.append(c)
    assert wait_until(lambda: in_flight() == 20), in_flight()
    for i, c in enumerate(clients):
        kind = i % 4
        if kind == 0:
            c.quit()  # an orderly end
        elif kind == 1:
            c.helo("ukiah.firemountain.net")
            c.abort()
            c.quit()
        elif kind == 2:
            c.sock.shutdown(socket.SHUT_RDWR)  # the MTA hangs up without a word
        else:
            c.helo("ukiah.firemountain.net")
            c.mail("rsk@gsp.org", macros={"{auth_authen}": ""})
            c.abort()
        c.close()
    assert wait_until(lambda: in_flight() == 0), in_flight()
    for i in range(100):  # and after a run of whole sessions, refused ones among them
        ip, helo = (("64.71.1.10", "ukiah.firemountain.net"), ("103.245.153.249", "x.example"))[
            i % 2
        ]
        run_session(m.socket, ip=ip, helo=helo)
    assert wait_until(lambda: in_flight() == 0), in_flight()
    # libmilter's threads (a pool here, or one per connection) do not pile up either
    assert wait_until(lambda: threads() <= idle), (threads(), idle)
    assert m.proc.poll() is None
