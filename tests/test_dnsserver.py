"""Tests for tests/dnsserver.py, the authoritative DNS server the test suite runs.

dnspython is the client throughout: dns.query for single packets, the async
resolver where resolver behaviour matters (TCP fallback, CNAME chains,
concurrency), and raw sockets for malformed and pipelined traffic.
"""

from __future__ import annotations

import asyncio
import os
import re
import select
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import dns.asyncresolver
import dns.exception
import dns.flags
import dns.message
import dns.nameserver
import dns.opcode
import dns.query
import dns.rcode
import dns.rdatatype
import dns.resolver
import dns.zone
import pytest

# The tests folder is no package and PYTHONSAFEPATH keeps it off sys.path.
sys.path.insert(0, str(Path(__file__).parent))
from dnsserver import DNSServer, QueryRecord

DNSSERVER_PY = Path(__file__).parent / "dnsserver.py"

# 20 distinct TXT strings of 200 bytes: about 4 KB, beyond any UDP limit we allow.
BIG_TXT = "\n".join(f'big IN TXT "{i:02d}{"x" * 198}"' for i in range(20))
# 3 strings of 250 bytes: over 512 bytes, under 1232.
MEDIUM_TXT = "\n".join(f'medium IN TXT "{i}{"y" * 249}"' for i in range(3))

ZONE = f"""\
$TTL 300
@        3600 IN SOA   ns1 hostmaster 2024010101 7200 900 1209600 60
@             IN NS    ns1
ns1           IN A     192.0.2.53
www       600 IN A     192.0.2.10
www           IN AAAA  2001:db8::10
@             IN MX    10 mail
mail          IN A     192.0.2.25
@             IN TXT   "v=spf1 -all"
alias         IN CNAME www
chain1        IN CNAME chain2
chain2        IN CNAME alias
loop1         IN CNAME loop2
loop2         IN CNAME loop1
self          IN CNAME self
dangling      IN CNAME missing
external      IN CNAME host.elsewhere.invalid.
torev         IN CNAME 10.2.0.192.in-addr.arpa.
a.b.deep      IN A     192.0.2.99
*.wild        IN A     192.0.2.77
{MEDIUM_TXT}
{BIG_TXT}
"""

REV = """\
$TTL 300
@   300 IN SOA ns1.example.test. hostmaster.example.test. 1 7200 900 1209600 120
@       IN NS  ns1.example.test.
10      IN PTR www.example.test.
25      IN PTR mail.example.test.
"""

# A child zone served next to its parent: SOA TTL (30) below its minimum (600).
SUB = """\
@    30 IN SOA ns1.example.test. hostmaster.example.test. 1 7200 900 1209600 600
host 45 IN A   192.0.2.200
"""


@pytest.fixture
def server() -> Iterator[DNSServer]:
    with DNSServer() as srv:
        srv.add_zone_text("example.test.", ZONE)
        srv.add_zone_text("2.0.192.in-addr.arpa.", REV)
        srv.add_zone_text("sub.example.test.", SUB)
        yield srv


def udp(
    srv: DNSServer,
    name: str,
    rdtype: str = "A",
    timeout: float = 2.0,
    use_edns: int | None = None,
    payload: int | None = None,
) -> dns.message.Message:
    query = dns.message.make_query(name, rdtype, use_edns=use_edns, payload=payload)
    return dns.query.udp(query, srv.host, port=srv.port, timeout=timeout)


def tcp(srv: DNSServer, name: str, rdtype: str = "A", timeout: float = 2.0) -> dns.message.Message:
    query = dns.message.make_query(name, rdtype)
    return dns.query.tcp(query, srv.host, port=srv.port, timeout=timeout)


def resolver_for(srv: DNSServer) -> dns.asyncresolver.Resolver:
    resolver = dns.asyncresolver.Resolver(configure=False)
    resolver.nameservers = [dns.nameserver.Do53Nameserver(srv.host, srv.port)]
    resolver.timeout = 2.0
    resolver.lifetime = 4.0
    return resolver


def texts(message: dns.message.Message, section: str = "answer") -> list[str]:
    """Each RRset of a section as 'owner ttl type rdata...' (rdata sorted)."""
    out = []
    for rrset in getattr(message, section):
        rdatas = " ".join(sorted(rd.to_text() for rd in rrset))
        out.append(f"{rrset.name} {rrset.ttl} {dns.rdatatype.to_text(rrset.rdtype)} {rdatas}")
    return out


def rcode(message: dns.message.Message) -> str:
    return dns.rcode.to_text(message.rcode())


def recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("server closed the connection")
        data += chunk
    return data


def read_framed(sock: socket.socket) -> dns.message.Message:
    (length,) = struct.unpack("!H", recv_exact(sock, 2))
    return dns.message.from_wire(recv_exact(sock, length))


def framed(message: dns.message.Message) -> bytes:
    wire = message.to_wire()
    return struct.pack("!H", len(wire)) + wire


# --------------------------------------------------------------------- answers


def test_a_answer_is_authoritative_with_record_ttl(server: DNSServer) -> None:
    query = dns.message.make_query("www.example.test", "A")
    response = dns.query.udp(query, server.host, port=server.port, timeout=2)
    assert rcode(response) == "NOERROR"
    assert response.flags & dns.flags.AA
    assert response.id == query.id
    assert response.question == query.question
    assert texts(response) == ["www.example.test. 600 A 192.0.2.10"]
    assert response.authority == []


@pytest.mark.parametrize(
    ("name", "rdtype", "expected"),
    [
        ("www.example.test", "AAAA", "www.example.test. 300 AAAA 2001:db8::10"),
        ("example.test", "MX", "example.test. 300 MX 10 mail.example.test."),
        ("example.test", "TXT", 'example.test. 300 TXT "v=spf1 -all"'),
        ("10.2.0.192.in-addr.arpa", "PTR", "10.2.0.192.in-addr.arpa. 300 PTR www.example.test."),
        ("alias.example.test", "CNAME", "alias.example.test. 300 CNAME www.example.test."),
        ("host.sub.example.test", "A", "host.sub.example.test. 45 A 192.0.2.200"),
    ],
)
def test_record_types(server: DNSServer, name: str, rdtype: str, expected: str) -> None:
    response = udp(server, name, rdtype)
    assert rcode(response) == "NOERROR"
    assert texts(response) == [expected]


def test_nxdomain_has_soa_with_negative_ttl(server: DNSServer) -> None:
    response = udp(server, "nope.example.test", "A")
    assert rcode(response) == "NXDOMAIN"
    assert response.flags & dns.flags.AA
    assert response.answer == []
    # SOA TTL 3600, minimum 60: the negative TTL is the smaller.
    assert texts(response, "authority") == [
        "example.test. 60 SOA ns1.example.test. hostmaster.example.test. "
        "2024010101 7200 900 1209600 60"
    ]


def test_nodata_is_noerror_with_soa(server: DNSServer) -> None:
    response = udp(server, "www.example.test", "MX")
    assert rcode(response) == "NOERROR"
    assert response.answer == []
    assert [r.rdtype for r in response.authority] == [dns.rdatatype.SOA]
    assert response.authority[0].ttl == 60


def test_negative_ttl_uses_soa_ttl_when_below_minimum(server: DNSServer) -> None:
    # sub.example.test: SOA TTL 30, minimum 600.  Also shows the longest origin wins.
    response = udp(server, "nothing.sub.example.test", "A")
    assert rcode(response) == "NXDOMAIN"
    assert [(str(r.name), r.ttl) for r in response.authority] == [("sub.example.test.", 30)]
    reverse = udp(server, "99.2.0.192.in-addr.arpa", "PTR")
    assert rcode(reverse) == "NXDOMAIN"
    assert [(str(r.name), r.ttl) for r in reverse.authority] == [("2.0.192.in-addr.arpa.", 120)]


@pytest.mark.parametrize("name", ["deep.example.test", "b.deep.example.test"])
def test_empty_non_terminal_is_nodata(server: DNSServer, name: str) -> None:
    response = udp(server, name, "A")
    assert rcode(response) == "NOERROR"
    assert response.answer == []
    assert [r.rdtype for r in response.authority] == [dns.rdatatype.SOA]
    # A sibling with no descendants really does not exist.
    assert rcode(udp(server, "c.deep.example.test", "A")) == "NXDOMAIN"


def test_outside_served_zones_is_refused(server: DNSServer) -> None:
    response = udp(server, "www.example.org", "A")
    assert rcode(response) == "REFUSED"
    assert not response.flags & dns.flags.AA
    assert response.answer == []
    assert rcode(udp(server, ".", "NS")) == "REFUSED"


def test_edns_is_echoed_with_our_payload(server: DNSServer) -> None:
    with_edns = udp(server, "www.example.test", "A", use_edns=0, payload=4096)
    assert with_edns.edns == 0
    assert with_edns.payload == 1232
    without = udp(server, "www.example.test", "A")
    assert without.edns == -1


def test_wildcard_synthesises_records(server: DNSServer) -> None:
    assert texts(udp(server, "x.wild.example.test")) == ["x.wild.example.test. 300 A 192.0.2.77"]
    assert texts(udp(server, "y.x.wild.example.test")) == [
        "y.x.wild.example.test. 300 A 192.0.2.77"
    ]
    nodata = udp(server, "x.wild.example.test", "MX")
    assert rcode(nodata) == "NOERROR"
    assert nodata.answer == []
    # The closest encloser itself exists (an empty non-terminal): no wildcard for it.
    assert udp(server, "wild.example.test").answer == []


def test_non_query_opcode_is_notimp(server: DNSServer) -> None:
    query = dns.message.make_query("example.test", "SOA")
    query.set_opcode(dns.opcode.NOTIFY)
    response = dns.query.udp(query, server.host, port=server.port, timeout=2)
    assert rcode(response) == "NOTIMP"


# ---------------------------------------------------------------------- CNAMEs


def test_cname_is_followed_within_zone(server: DNSServer) -> None:
    response = udp(server, "alias.example.test", "A")
    assert rcode(response) == "NOERROR"
    assert texts(response) == [
        "alias.example.test. 300 CNAME www.example.test.",
        "www.example.test. 600 A 192.0.2.10",
    ]


def test_cname_chain_and_resolver_canonical_name(server: DNSServer) -> None:
    response = udp(server, "chain1.example.test", "A")
    assert [dns.rdatatype.to_text(r.rdtype) for r in response.answer] == [
        "CNAME",
        "CNAME",
        "CNAME",
        "A",
    ]

    async def resolve() -> dns.resolver.Answer:
        return await resolver_for(server).resolve("chain1.example.test", "A")

    answer = asyncio.run(resolve())
    assert str(answer.canonical_name) == "www.example.test."
    assert [rd.to_text() for rd in answer] == ["192.0.2.10"]


def test_cname_across_zones(server: DNSServer) -> None:
    assert texts(udp(server, "torev.example.test", "PTR")) == [
        "torev.example.test. 300 CNAME 10.2.0.192.in-addr.arpa.",
        "10.2.0.192.in-addr.arpa. 300 PTR www.example.test.",
    ]


def test_cname_to_missing_and_external_names(server: DNSServer) -> None:
    dangling = udp(server, "dangling.example.test", "A")
    assert rcode(dangling) == "NXDOMAIN"  # RFC 6604: rcode of the last name
    assert texts(dangling) == ["dangling.example.test. 300 CNAME missing.example.test."]
    assert [r.rdtype for r in dangling.authority] == [dns.rdatatype.SOA]

    external = udp(server, "external.example.test", "A")
    assert rcode(external) == "NOERROR"
    assert texts(external) == ["external.example.test. 300 CNAME host.elsewhere.invalid."]
    assert external.authority == []


@pytest.mark.parametrize("name", ["loop1.example.test", "self.example.test"])
def test_cname_loop_does_not_hang(server: DNSServer, name: str) -> None:
    response = udp(server, name, "A", timeout=1.0)
    assert rcode(response) == "NOERROR"
    assert all(r.rdtype == dns.rdatatype.CNAME for r in response.answer)
    assert 1 <= len(response.answer) <= 2

    async def resolve() -> None:
        await resolver_for(server).resolve(name, "A", lifetime=2.0)

    with pytest.raises(dns.exception.DNSException):
        asyncio.run(resolve())
    assert texts(udp(server, "www.example.test")) == ["www.example.test. 600 A 192.0.2.10"]


def test_long_cname_chain_is_cut_after_eight(server: DNSServer) -> None:
    lines = [f"c{i} IN CNAME c{i + 1}" for i in range(12)]
    server.add_zone_text(
        "chain.test.",
        "@ 300 IN SOA ns hm 1 2 3 4 5\n" + "\n".join(lines) + "\nc12 IN A 192.0.2.1\n",
    )
    full = udp(server, "c4.chain.test", "A")  # 8 CNAMEs then the address
    assert len(full.answer) == 9
    assert full.answer[-1].rdtype == dns.rdatatype.A
    cut = udp(server, "c0.chain.test", "A")  # 12 CNAMEs: more than we follow
    assert rcode(cut) == "NOERROR"
    assert all(r.rdtype == dns.rdatatype.CNAME for r in cut.answer)
    assert 8 <= len(cut.answer) <= 9


# ------------------------------------------------------------------ truncation


def test_udp_truncation_without_edns_and_tcp_full_answer(server: DNSServer) -> None:
    small = udp(server, "medium.example.test", "TXT")
    assert small.flags & dns.flags.TC
    assert small.answer == []
    assert str(small.question[0].name) == "medium.example.test."
    fits = udp(server, "medium.example.test", "TXT", use_edns=0, payload=1232)
    assert not fits.flags & dns.flags.TC
    assert len(fits.answer[0]) == 3


def test_udp_limit_is_capped_at_1232(server: DNSServer) -> None:
    big = udp(server, "big.example.test", "TXT", use_edns=0, payload=4096)
    assert big.flags & dns.flags.TC
    assert big.answer == []
    full = tcp(server, "big.example.test", "TXT")
    assert not full.flags & dns.flags.TC
    assert len(full.answer[0]) == 20

    async def resolve() -> dns.resolver.Answer:
        return await resolver_for(server).resolve("big.example.test", "TXT")

    assert len(asyncio.run(resolve())) == 20
    assert [q.transport for q in server.queries() if q.name == "big.example.test"][-2:] == [
        "udp",
        "tcp",
    ]


# ---------------------------------------------------------------------- faults


@pytest.mark.parametrize(("kind", "expected"), [("servfail", "SERVFAIL"), ("refused", "REFUSED")])
def test_fault_rcodes(server: DNSServer, kind: str, expected: str) -> None:
    server.set_fault("www.example.test", kind)
    assert rcode(udp(server, "www.example.test")) == expected
    assert rcode(tcp(server, "www.example.test")) == expected
    assert udp(server, "www.example.test").answer == []
    assert rcode(udp(server, "mail.example.test")) == "NOERROR"  # other names unaffected


def test_fault_nxdomain_for_existing_name(server: DNSServer) -> None:
    server.set_fault("www.example.test", "nxdomain")
    response = udp(server, "www.example.test")
    assert rcode(response) == "NXDOMAIN"
    assert response.answer == []
    assert [(str(r.name), r.ttl) for r in response.authority] == [("example.test.", 60)]


def test_fault_drop_times_out_then_clears(server: DNSServer) -> None:
    server.set_fault("www.example.test", "drop")
    with pytest.raises(dns.exception.Timeout):
        udp(server, "www.example.test", timeout=0.3)
    assert server.count("www.example.test", "A") == 1  # received, not answered
    server.clear_faults()
    assert server.faults() == []
    assert rcode(udp(server, "www.example.test")) == "NOERROR"


def test_fault_truncate_forces_tcp(server: DNSServer) -> None:
    server.set_fault("www.example.test", "truncate")
    over_udp = udp(server, "www.example.test", use_edns=0, payload=1232)
    assert over_udp.flags & dns.flags.TC
    assert over_udp.answer == []
    assert texts(tcp(server, "www.example.test")) == ["www.example.test. 600 A 192.0.2.10"]

    server.reset_log()

    async def resolve() -> dns.resolver.Answer:
        return await resolver_for(server).resolve("www.example.test", "A")

    answer = asyncio.run(resolve())
    assert [rd.to_text() for rd in answer] == ["192.0.2.10"]
    assert [q.transport for q in server.queries()] == ["udp", "tcp"]


def test_fault_delay(server: DNSServer) -> None:
    server.set_fault("www.example.test", "delay", delay=0.3)
    start = time.monotonic()
    response = udp(server, "www.example.test")
    elapsed = time.monotonic() - start
    assert elapsed >= 0.27
    assert texts(response) == ["www.example.test. 600 A 192.0.2.10"]


def test_fault_servfail_with_delay(server: DNSServer) -> None:
    server.set_fault("www.example.test", "servfail", delay=0.2)
    start = time.monotonic()
    response = tcp(server, "www.example.test")
    assert time.monotonic() - start >= 0.18
    assert rcode(response) == "SERVFAIL"


def test_fault_count_expires(server: DNSServer) -> None:
    server.set_fault("www.example.test", "servfail", count=2)
    results = [rcode(udp(server, "www.example.test")) for _ in range(3)]
    assert results == ["SERVFAIL", "SERVFAIL", "NOERROR"]
    assert server.faults() == []


def test_fault_truncate_count_is_used_by_udp_only(server: DNSServer) -> None:
    server.set_fault("www.example.test", "truncate", count=1)
    assert not tcp(server, "www.example.test").flags & dns.flags.TC
    assert udp(server, "www.example.test").flags & dns.flags.TC
    assert not udp(server, "www.example.test").flags & dns.flags.TC


def test_fault_suffix_match_covers_reverse_zone(server: DNSServer) -> None:
    server.set_fault("2.0.192.in-addr.arpa", "servfail", qtype="PTR")
    assert rcode(udp(server, "10.2.0.192.in-addr.arpa", "PTR")) == "SERVFAIL"
    assert rcode(udp(server, "25.2.0.192.in-addr.arpa", "PTR")) == "SERVFAIL"
    assert rcode(udp(server, "2.0.192.in-addr.arpa", "PTR")) == "SERVFAIL"
    # Another type at the same name is not affected.
    assert rcode(udp(server, "10.2.0.192.in-addr.arpa", "TXT")) == "NOERROR"


def test_fault_matching_is_case_insensitive_and_on_label_boundaries(server: DNSServer) -> None:
    server.set_fault("EXAMPLE.Test.", "refused")
    assert rcode(udp(server, "Www.example.TEST")) == "REFUSED"
    server.clear_faults()
    server.set_fault("w.example.test", "refused")  # a suffix of the text, not of the labels
    assert rcode(udp(server, "www.example.test")) == "NOERROR"


def test_most_specific_fault_wins(server: DNSServer) -> None:
    server.set_fault("example.test", "servfail")
    server.set_fault("www.example.test", "refused")
    server.set_fault("www.example.test", "nxdomain", qtype="AAAA")
    assert rcode(udp(server, "www.example.test", "A")) == "REFUSED"
    assert rcode(udp(server, "www.example.test", "AAAA")) == "NXDOMAIN"
    assert rcode(udp(server, "mail.example.test", "A")) == "SERVFAIL"
    assert len(server.faults()) == 3


def test_set_fault_validates(server: DNSServer) -> None:
    with pytest.raises(ValueError, match="unknown fault kind"):
        server.set_fault("www.example.test", "explode")
    with pytest.raises(ValueError, match="count"):
        server.set_fault("www.example.test", "drop", count=0)
    with pytest.raises(ValueError, match="delay"):
        server.set_fault("www.example.test", "delay", delay=-1)
    assert server.faults() == []


def test_load_faults_from_toml(server: DNSServer, tmp_path: Path) -> None:
    faults = tmp_path / "faults.toml"
    faults.write_text(
        "latency = 0.05\n"
        "[[fault]]\n"
        'name = "2.0.192.in-addr.arpa"\n'
        'kind = "servfail"\n'
        'qtype = "PTR"   # optional\n'
        "[[fault]]\n"
        'name = "mail.example.test"\n'
        'kind = "delay"\n'
        "delay = 0.1\n"
        "count = 1\n"
    )
    server.load_faults(faults)
    assert server.latency == pytest.approx(0.05)
    assert sorted((f.kind, f.delay, f.remaining) for f in server.faults()) == [
        ("delay", 0.1, 1),
        ("servfail", 0.0, None),
    ]
    assert rcode(udp(server, "10.2.0.192.in-addr.arpa", "PTR")) == "SERVFAIL"
    start = time.monotonic()
    udp(server, "mail.example.test")
    assert time.monotonic() - start >= 0.13  # latency + fault delay

    bad = tmp_path / "bad.toml"
    bad.write_text('[[fault]]\nname = "x.test"\nkind = "melt"\n')
    with pytest.raises(ValueError, match="unknown fault kind"):
        server.load_faults(bad)


def test_global_latency(server: DNSServer) -> None:
    server.latency = 0.25
    start = time.monotonic()
    assert rcode(udp(server, "www.example.test")) == "NOERROR"
    assert rcode(tcp(server, "nope.example.test")) == "NXDOMAIN"
    assert time.monotonic() - start >= 0.45


def test_delayed_queries_are_served_concurrently(server: DNSServer) -> None:
    server.set_fault("example.test", "delay", delay=0.3)

    async def resolve_all() -> list[dns.resolver.Answer]:
        resolver = resolver_for(server)
        return await asyncio.gather(
            *(resolver.resolve(f"q{i}.wild.example.test", "A") for i in range(20))
        )

    start = time.monotonic()
    answers = asyncio.run(resolve_all())
    elapsed = time.monotonic() - start
    assert [a[0].to_text() for a in answers] == ["192.0.2.77"] * 20
    assert elapsed >= 0.27
    assert elapsed < 3.0  # serially it would take 6 s
    assert len(server.queries()) >= 20


def test_tcp_delayed_answer_does_not_block_the_connection(server: DNSServer) -> None:
    server.set_fault("www.example.test", "delay", qtype="A", delay=0.4)
    slow = dns.message.make_query("www.example.test", "A")
    fast = dns.message.make_query("www.example.test", "AAAA")
    with socket.create_connection((server.host, server.port), timeout=3) as sock:
        sock.sendall(framed(slow) + framed(fast))
        first, second = read_framed(sock), read_framed(sock)
    assert (first.id, second.id) == (fast.id, slow.id)  # RFC 7766 allows reordering
    assert texts(second) == ["www.example.test. 600 A 192.0.2.10"]


# ------------------------------------------------------------------ transports


def test_tcp_two_queries_on_one_connection_with_partial_writes(server: DNSServer) -> None:
    first = dns.message.make_query("www.example.test", "A")
    second = dns.message.make_query("mail.example.test", "A")
    with socket.create_connection((server.host, server.port), timeout=3) as sock:
        sock.sendall(framed(first))
        assert read_framed(sock).id == first.id
        data = framed(second)
        for i in range(len(data)):  # one byte at a time, length prefix included
            sock.sendall(data[i : i + 1])
            time.sleep(0.001)
        response = read_framed(sock)
    assert response.id == second.id
    assert texts(response) == ["mail.example.test. 300 A 192.0.2.25"]
    assert [q.transport for q in server.queries()] == ["tcp", "tcp"]


def test_malformed_packets_are_ignored(server: DNSServer) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(0.3)
        sock.sendto(b"\x01", (server.host, server.port))  # too short: no answer
        # A header claiming one question, then garbage: FORMERR with the same id.
        sock.sendto(
            b"\x12\x34\x01\x00\x00\x01" + b"\x00" * 6 + b"\xff\xff\xff", server_addr(server)
        )
        reply = dns.message.from_wire(sock.recv(512))
        assert reply.id == 0x1234
        assert rcode(reply) == "FORMERR"
        # A response packet (QR set) must never be answered.
        response = dns.message.make_response(dns.message.make_query("www.example.test", "A"))
        sock.sendto(response.to_wire(), server_addr(server))
        with pytest.raises(TimeoutError):
            sock.recv(512)
    with socket.create_connection(server_addr(server), timeout=3) as conn:
        conn.sendall(b"\x00\x05garba")  # framed garbage, then a real query
        query = dns.message.make_query("www.example.test", "A")
        conn.sendall(framed(query))
        assert read_framed(conn).id == query.id
    assert server.malformed == 4
    assert rcode(udp(server, "www.example.test")) == "NOERROR"


def server_addr(srv: DNSServer) -> tuple[str, int]:
    return (srv.host, srv.port)


def test_same_port_for_udp_and_tcp_and_collision(server: DNSServer) -> None:
    assert server.nameserver == f"127.0.0.1:{server.port}"
    assert rcode(udp(server, "www.example.test")) == "NOERROR"
    assert rcode(tcp(server, "www.example.test")) == "NOERROR"
    with pytest.raises(OSError), DNSServer(port=server.port):
        pass


def test_ipv6_loopback() -> None:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback here")
    with DNSServer(host="::1") as srv:
        srv.add_zone_text("example.test.", ZONE)
        assert srv.nameserver == f"[::1]:{srv.port}"
        assert texts(udp(srv, "www.example.test")) == ["www.example.test. 600 A 192.0.2.10"]
        assert rcode(tcp(srv, "www.example.test", "AAAA")) == "NOERROR"
        assert {q.client.rsplit(":", 1)[0] for q in srv.queries()} == {"::1"}


def test_port_53_on_a_loopback_address() -> None:
    if os.geteuid() != 0:
        pytest.skip("binding port 53 needs root")
    host = f"127.53.{os.getpid() % 250 + 1}.{time.monotonic_ns() % 250 + 1}"
    with DNSServer(host=host, port=53) as srv:
        srv.add_zone_text("example.test.", ZONE)
        assert srv.nameserver == f"{host}:53"
        assert rcode(udp(srv, "www.example.test")) == "NOERROR"
        assert rcode(tcp(srv, "www.example.test")) == "NOERROR"


# ------------------------------------------------------------- zones and logs


def test_query_log(server: DNSServer) -> None:
    start = time.monotonic()
    udp(server, "WWW.Example.TEST.", "A")
    tcp(server, "www.example.test", "AAAA")
    end = time.monotonic()
    log = server.queries()
    assert [(q.name, q.qtype, q.transport) for q in log] == [
        ("www.example.test", "A", "udp"),
        ("www.example.test", "AAAA", "tcp"),
    ]
    assert all(isinstance(q, QueryRecord) and start <= q.time <= end for q in log)
    assert server.count("www.example.test.") == 2
    assert server.count("WWW.example.test", "aaaa") == 1
    assert server.count("mail.example.test") == 0
    server.reset_log()
    assert server.queries() == []


def test_zone_dir_origins_and_missing_soa(tmp_path: Path) -> None:
    (tmp_path / "example.net.zone").write_text(
        "$TTL 120\n@ IN SOA ns hm 1 2 3 4 5\nwww IN A 198.51.100.1\n"
    )
    (tmp_path / "custom.zone").write_text(
        "; origin from the file, not its name\n$ORIGIN other.test.\n"
        "@ 60 IN SOA ns hm 1 2 3 4 5\nhost 60 IN A 198.51.100.2\n"
    )
    (tmp_path / "ignored.txt").write_text("not a zone")
    with DNSServer(zone_dir=tmp_path) as srv:
        assert srv.zone_origins() == ["example.net", "other.test"]
        assert texts(udp(srv, "www.example.net")) == ["www.example.net. 120 A 198.51.100.1"]
        assert texts(udp(srv, "host.other.test")) == ["host.other.test. 60 A 198.51.100.2"]
        with pytest.raises(ValueError, match="SOA"):
            srv.add_zone_text("nosoa.test.", "www 60 IN A 192.0.2.1\n")
    (tmp_path / "broken.test.zone").write_text("www 60 IN A 192.0.2.1\n")
    with pytest.raises(ValueError, match=r"broken\.test\.zone"):
        DNSServer(zone_dir=tmp_path)


def test_zone_objects_including_relativized_ones() -> None:
    zone = dns.zone.from_text(
        "@ 60 IN SOA ns hm 1 2 3 4 5\n@ IN NS ns\nns 60 IN A 192.0.2.5\nalias 60 IN CNAME ns\n",
        origin="direct.test.",
    )  # relativize=True: names and the CNAME target are stored relative
    with DNSServer(zones=[zone]) as srv:
        assert texts(udp(srv, "alias.direct.test")) == [
            "alias.direct.test. 60 CNAME ns.direct.test.",
            "ns.direct.test. 60 A 192.0.2.5",
        ]


def test_stop_is_quick_and_frees_the_port(server: DNSServer) -> None:
    server.set_fault("www.example.test", "delay", delay=5.0)
    conn = socket.create_connection(server_addr(server), timeout=3)
    conn.sendall(framed(dns.message.make_query("www.example.test", "A")))  # answer pending
    time.sleep(0.05)
    start = time.monotonic()
    server.stop()
    assert time.monotonic() - start < 1.0
    assert conn.recv(10) == b""  # the connection was closed, no answer
    conn.close()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as again:
        again.bind(server_addr(server))  # the UDP socket is really closed
    server.stop()  # a second stop is harmless


# ------------------------------------------------------------------------- CLI


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_cli_serves_and_exits_on_signal(tmp_path: Path, signum: signal.Signals) -> None:
    zones = tmp_path / "zones"
    zones.mkdir()
    (zones / "example.net.zone").write_text(
        "$TTL 120\n@ IN SOA ns hm 1 2 3 4 5\nwww IN A 198.51.100.1\n"
    )
    faults = tmp_path / "faults.toml"
    faults.write_text('[[fault]]\nname = "broken.example.net"\nkind = "servfail"\n')
    env = {**os.environ, "PYTHONSAFEPATH": "1"}
    command = [sys.executable, str(DNSSERVER_PY), "--zones", str(zones), "--faults", str(faults)]
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    ) as proc:
        try:
            assert proc.stdout is not None
            ready, _, _ = select.select([proc.stdout], [], [], 10)
            assert ready, "no 'listening' line within 10 s"
            line = proc.stdout.readline()
            match = re.fullmatch(r"listening 127\.0\.0\.1:(\d+)\n", line)
            assert match, line
            port = int(match.group(1))
            query = dns.message.make_query("www.example.net", "A")
            response = dns.query.udp(query, "127.0.0.1", port=port, timeout=2)
            assert [rd.to_text() for rd in response.answer[0]] == ["198.51.100.1"]
            broken = dns.message.make_query("broken.example.net", "A")
            response = dns.query.tcp(broken, "127.0.0.1", port=port, timeout=2)
            assert rcode(response) == "SERVFAIL"
            proc.send_signal(signum)
            _, stderr = proc.communicate(timeout=5)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert proc.returncode == 0
    assert "Traceback" not in stderr
