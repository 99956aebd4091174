"""The resolver against a real DNS server on loopback (UDP and TCP).

Every DNS outcome must become a value; caching follows TTLs (RFC 2308 for
negatives) within bounds; identical questions in flight are sent once; only
the question asked is cached.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from heloguard.answers import Origin, Query, Status
from heloguard.resolver import Resolver, ResolverSettings, parse_nameserver

from dnsserver import DNSServer

pytestmark = pytest.mark.integration

GOOD_PTR = Query.of("10.1.71.64.in-addr.arpa", "PTR")


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def lookup(res: Resolver, q: Query) -> Any:
    return res.run(res.lookup(q), timeout=10)


def test_ok_nxdomain_nodata(make_resolver: Any) -> None:
    res = make_resolver()
    ok = lookup(res, GOOD_PTR)
    assert ok.status is Status.OK and ok.records == ("ukiah.firemountain.net",) and ok.ttl == 3600
    nx = lookup(res, Query.of("103-245-153-249.host.neural.net.au", "A"))
    assert nx.status is Status.NXDOMAIN and nx.ttl == 300  # min(SOA TTL 3600, minimum 300)
    nodata = lookup(res, Query.of("mail.digitaljunction.com.au", "AAAA"))
    assert nodata.status is Status.NODATA and nodata.ttl == 300
    ent = lookup(res, Query.of("153.245.103.in-addr.arpa", "A"))  # zone apex, no A
    assert ent.status is Status.NODATA


def test_mx_and_ipv6_records(make_resolver: Any) -> None:
    res = make_resolver()
    mx = lookup(res, Query.of("firemountain.net", "MX"))
    assert mx.records == ("10 taos.firemountain.net",)
    aaaa = lookup(res, Query.of("ukiah.firemountain.net", "AAAA"))
    assert aaaa.records == ("2600:3c00::10",)


@pytest.mark.parametrize(("kind", "reason"), [("servfail", "SERVFAIL"), ("refused", "REFUSED")])
def test_server_errors_are_temp(
    dns_server: DNSServer, make_resolver: Any, kind: str, reason: str
) -> None:
    dns_server.set_fault("1.71.64.in-addr.arpa", kind)
    a = lookup(make_resolver(), GOOD_PTR)
    assert a.status is Status.TEMP and reason in a.reason


def test_timeout_is_temp_within_timeout(dns_server: DNSServer, make_resolver: Any) -> None:
    dns_server.set_fault("1.71.64.in-addr.arpa", "drop")
    res = make_resolver(timeout=0.6)
    started = time.monotonic()
    a = lookup(res, GOOD_PTR)
    took = time.monotonic() - started
    assert a.status is Status.TEMP and "timeout" in a.reason
    assert took < 3.0, f"a dropped question took {took:.1f}s with a 0.6s timeout"


def test_truncated_udp_retried_over_tcp(dns_server: DNSServer, make_resolver: Any) -> None:
    dns_server.set_fault("ukiah.firemountain.net", "truncate")
    a = lookup(make_resolver(), Query.of("ukiah.firemountain.net", "A"))
    assert a.status is Status.OK and a.records == ("64.71.1.10",)
    transports = [r.transport for r in dns_server.queries() if r.name == "ukiah.firemountain.net"]
    assert transports == ["udp", "tcp"]


def test_name_outside_served_zones_is_temp(make_resolver: Any) -> None:
    # the test server REFUSEs names it is not authoritative for
    a = lookup(make_resolver(), Query.of("www.nowhere.invalid", "A"))
    assert a.status is Status.TEMP


def test_dead_server_is_temp(make_resolver: Any) -> None:
    res = make_resolver(nameservers=(("127.0.0.1", 9),), timeout=0.5)  # nothing listens there
    a = lookup(res, GOOD_PTR)
    assert a.status is Status.TEMP


def test_no_nameserver_is_temp() -> None:
    with Resolver(ResolverSettings(nameservers=())) as res:
        res._dns.nameservers = []
        a = lookup(res, GOOD_PTR)
    assert a.status is Status.TEMP and "no nameserver" in a.reason


def test_invalid_name_is_permanent_negative(make_resolver: Any) -> None:
    a = lookup(make_resolver(), Query.of("a" * 70 + ".example.com", "A"))
    assert a.status is Status.NXDOMAIN and "invalid name" in a.reason


def test_cache_follows_ttl_and_clamps(dns_server: DNSServer, make_resolver: Any) -> None:
    clock = Clock()
    res = make_resolver(clock=clock, max_ttl=600)
    first = lookup(res, GOOD_PTR)
    assert first.origin is Origin.NETWORK
    clock.t += 500
    again = lookup(res, GOOD_PTR)
    assert again.origin is Origin.CACHE and again.ttl == 100  # clamped to 600, 500 gone
    assert dns_server.count("10.1.71.64.in-addr.arpa", "PTR") == 1
    clock.t += 101
    third = lookup(res, GOOD_PTR)
    assert third.origin is Origin.NETWORK
    assert dns_server.count("10.1.71.64.in-addr.arpa", "PTR") == 2


def test_negative_answers_cached_for_soa_minimum(dns_server: DNSServer, make_resolver: Any) -> None:
    clock = Clock()
    res = make_resolver(clock=clock)
    q = Query.of("103-245-153-249.host.neural.net.au", "A")
    lookup(res, q)
    clock.t += 299
    assert lookup(res, q).origin is Origin.CACHE
    clock.t += 2
    assert lookup(res, q).origin is Origin.NETWORK
    assert dns_server.count("103-245-153-249.host.neural.net.au", "A") == 2


def test_temp_is_cached_only_briefly(dns_server: DNSServer, make_resolver: Any) -> None:
    clock = Clock()
    res = make_resolver(clock=clock, temp_ttl=2)
    dns_server.set_fault("1.71.64.in-addr.arpa", "servfail")
    assert lookup(res, GOOD_PTR).status is Status.TEMP
    assert lookup(res, GOOD_PTR).origin is Origin.CACHE
    dns_server.clear_faults()
    clock.t += 3
    healed = lookup(res, GOOD_PTR)
    assert healed.status is Status.OK, "a DNS hiccup must be forgotten within temp_ttl"


def test_identical_questions_in_flight_are_sent_once(
    dns_server: DNSServer, make_resolver: Any
) -> None:
    dns_server.latency = 0.2
    res = make_resolver()

    async def many() -> list[Any]:
        return list(await asyncio.gather(*(res.lookup(GOOD_PTR) for _ in range(50))))

    answers = res.run(many(), timeout=10)
    assert {a.status for a in answers} == {Status.OK}
    assert dns_server.count("10.1.71.64.in-addr.arpa", "PTR") == 1
    assert res.stats.merged == 49 and res.stats.sent == 1


def test_additional_records_are_never_cached(dns_server: DNSServer, make_resolver: Any) -> None:
    # The ukiah A answer also brings nothing else into the cache: asking the
    # AAAA afterwards must go to the network.
    res = make_resolver()
    lookup(res, Query.of("ukiah.firemountain.net", "A"))
    aaaa = lookup(res, Query.of("ukiah.firemountain.net", "AAAA"))
    assert aaaa.origin is Origin.NETWORK


def test_cname_answer_cached_under_the_question_only(
    dns_server: DNSServer, make_resolver: Any
) -> None:
    dns_server.add_zone_text(
        "cnames.example.net",
        "@ 3600 IN SOA ns. h. 1 7200 900 1209600 300\n"
        "alias 600 IN CNAME target\n"
        "target 3600 IN A 192.0.2.80\n",
    )
    res = make_resolver()
    a = lookup(res, Query.of("alias.cnames.example.net", "A"))
    assert a.status is Status.OK and a.records == ("192.0.2.80",)
    assert a.canonical == "target.cnames.example.net" and a.ttl == 600
    target = lookup(res, Query.of("target.cnames.example.net", "A"))
    assert target.origin is Origin.NETWORK, (
        "the CNAME target must not be cached from another answer"
    )


def test_cname_loop_is_temp_not_a_hang(dns_server: DNSServer, make_resolver: Any) -> None:
    dns_server.add_zone_text(
        "loop.example.net",
        "@ 3600 IN SOA ns. h. 1 7200 900 1209600 300\na IN CNAME b\nb IN CNAME a\n",
    )
    a = lookup(make_resolver(), Query.of("a.loop.example.net", "A"))
    assert a.status in (Status.TEMP, Status.NODATA, Status.NXDOMAIN)
    assert a.status is not Status.OK


def test_budget_turns_slow_answers_into_temp(dns_server: DNSServer, make_resolver: Any) -> None:
    dns_server.set_fault("1.71.64.in-addr.arpa", "delay", delay=1.0)
    res = make_resolver(timeout=4.0)  # one try may take 2 s: the answer arrives in time

    async def within_budget() -> Any:
        return await res.lookup_many(
            [GOOD_PTR, Query.of("ukiah.firemountain.net", "A")], res.now() + 0.4
        )

    started = time.monotonic()
    out = res.run(within_budget(), timeout=10)
    assert time.monotonic() - started < 1.2
    assert out[GOOD_PTR].status is Status.TEMP and out[GOOD_PTR].origin is Origin.BUDGET
    assert out[Query.of("ukiah.firemountain.net", "A")].status is Status.OK
    # the slow lookup went on in the background and filled the cache
    time.sleep(1.2)
    assert lookup(res, GOOD_PTR).origin is Origin.CACHE


def test_many_records(dns_server: DNSServer, make_resolver: Any) -> None:
    records = "".join(f"big IN A 192.0.2.{i}\n" for i in range(1, 101))
    dns_server.add_zone_text(
        "bigans.example.net", "@ 3600 IN SOA ns. h. 1 7200 900 1209600 300\n" + records
    )
    a = lookup(make_resolver(), Query.of("big.bigans.example.net", "A"))
    assert a.status is Status.OK and len(a.records) == 100


def test_ipv6_nameserver_and_port(make_resolver: Any) -> None:
    with DNSServer(host="::1") as v6:
        v6.add_zone_text(
            "v6ns.example.net", "@ 3600 IN SOA ns. h. 1 7200 900 1209600 300\nwww IN A 192.0.2.1\n"
        )
        res = make_resolver(nameservers=(parse_nameserver(v6.nameserver),))
        a = lookup(res, Query.of("www.v6ns.example.net", "A"))
    assert a.records == ("192.0.2.1",)


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ("127.0.0.1", ("127.0.0.1", 53)),
        ("127.0.0.1:5353", ("127.0.0.1", 5353)),
        ("[::1]:5353", ("::1", 5353)),
        ("::1", ("::1", 53)),
        ("2001:db8::53", ("2001:db8::53", 53)),
    ],
)
def test_parse_nameserver(text: str, parsed: tuple[str, int]) -> None:
    assert parse_nameserver(text) == parsed


@pytest.mark.parametrize(
    "bad", ["", "ns.example.com", "127.0.0.1:0", "127.0.0.1:99999", "[::1", "1.2.3.4:x"]
)
def test_parse_nameserver_rejects(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_nameserver(bad)


def test_a_warm_lookup_is_answered_in_the_calling_thread(make_resolver: Any) -> None:
    """The warm path: no hand-off to the loop thread when the cache has every answer."""
    import threading

    res = make_resolver()

    async def where() -> tuple[int, Status]:
        out = await res.lookup_many([GOOD_PTR], res.now() + 2)
        return threading.get_ident(), out[GOOD_PTR].status

    cold_thread, cold = res.run(where(), timeout=10, inline=True)
    assert cold is Status.OK
    assert cold_thread == res._loop_thread != threading.get_ident(), "a miss goes to the loop"
    fut = res.submit(where(), inline=True)
    assert fut.done(), "every answer cached: finished before submit returned"
    warm_thread, warm = fut.result()
    assert warm is Status.OK and warm_thread == threading.get_ident()
    # without inline, a coroutine runs on the loop as before
    loop_thread, _ = res.run(where(), timeout=10)
    assert loop_thread == res._loop_thread


def test_an_inline_lookup_that_hops_to_the_loop_still_times_out(
    dns_server: DNSServer, make_resolver: Any
) -> None:
    dns_server.set_fault("1.71.64.in-addr.arpa", "delay", delay=1.0)
    res = make_resolver(timeout=4.0)

    async def slow() -> Any:
        return await res.lookup_many([GOOD_PTR], res.now() + 5)

    with pytest.raises(TimeoutError):
        res.run(slow(), timeout=0.2, inline=True)
    time.sleep(1.2)  # the lookup went on in the background and filled the cache
    assert lookup(res, GOOD_PTR).origin is Origin.CACHE
