"""Spoofing: what a client can claim, and what it earns for it (nothing).

* A PTR record is written by whoever holds the address block.  A PTR that
  names an excepted partner earns the exception only when the partner's own
  forward zone points back at the client; a look-alike name, a name with the
  partner's domain in the middle, an escaped dot or a HELO earns nothing.
* DNS list answers that are error codes (127.255.255.x, 127.0.0.1 "query
  refused", 127.0.1.255, anything outside 127/8) never list and never
  allow-list a client, whatever the filter.
* A response is used only for the question asked: records stuffed into the
  additional section are never cached (a reverse zone cannot plant the
  forward answer that would confirm it), an answer section about another name
  is ignored, and a response to another question is dropped.

The zones live in 198.18.8.0/24 and under ``partner.test`` and friends, which
no other test uses; the spoofing faults are tests/dnsserver.py's
``additional``, ``foreign_answer`` and ``wrong_question``.
"""

from __future__ import annotations

import re
import textwrap
from pathlib import Path
from typing import Any

import dns.exception
import dns.message
import dns.query
import dns.rdatatype
import pytest
from miltertest import MilterReply, run_session

from heloguard.answers import Query, Status
from heloguard.resolver import Resolver

from dnsserver import DNSServer

pytestmark = pytest.mark.integration

SOA = (
    "@ 300 IN SOA ns.partner.test. hm.partner.test. 1 7200 900 1209600 300\n"
    "@ IN NS ns.partner.test.\n"
)
ZONES = {
    "partner.test.": "mail IN A 198.18.8.1\nwww IN A 198.18.8.1\n",
    "evilpartner.test.": "mail IN A 198.18.8.67\n",
    "evil.test.": "mail.partner.test IN A 198.18.8.68\n",
    # the label "mail.partner" under test: its text form ends in ".partner.test"
    "mail\\.partner.test.": "@ IN A 198.18.8.72\n",
    "8.18.198.in-addr.arpa.": textwrap.dedent(
        """\
        1 IN PTR mail.partner.test.
        66 IN PTR mail.partner.test.
        67 IN PTR mail.evilpartner.test.
        68 IN PTR mail.partner.test.evil.test.
        69 IN PTR mail.partner.test.
        70 IN PTR mail.partner.test.
        71 IN PTR mail.partner.test.
        72 IN PTR mail\\.partner.test.
        73 IN PTR MAIL.PARTNER.TEST.
        74 IN PTR mail.partner.test.
        """
    ),
    # DNS lists that answer only with error codes
    "err-bl.test.": textwrap.dedent(
        """\
        10.1.71.64 IN A 127.0.0.1
        11.1.71.64 IN A 127.255.255.253
        1.8.18.198 IN A 127.255.255.254
        """
    ),
    "err-wl.test.": textwrap.dedent(
        """\
        249.153.245.103 IN A 127.255.255.254
        66.8.18.198 IN A 127.0.0.1
        67.8.18.198 IN A 127.255.255.0
        68.8.18.198 IN A 192.0.2.1
        """
    ),
}
PARTNER = {"exceptions": {"names": ["partner.test"]}}
GOOD: dict[str, Any] = {"ip": "64.71.1.10", "helo": "ukiah.firemountain.net"}


@pytest.fixture
def spoof_dns(dns_server: DNSServer) -> DNSServer:
    """The session's DNS server, also serving this module's zones."""
    for origin, records in ZONES.items():
        dns_server.add_zone_text(origin, "$TTL 300\n" + SOA + records)
    return dns_server


def helo_reply(m: Any, ip: str, helo: str = "mail.partner.test") -> MilterReply:
    r = run_session(m.socket, ip=ip, helo=helo)
    assert r.helo is not None
    return r.helo


def excepted(m: Any, ip: str) -> bool:
    """True when the log says this client was spared by a name exception."""
    return any(
        f"[{ip}]" in line and "exception partner.test" in line for line in m.log().splitlines()
    )


# -- name exceptions need forward confirmation ---------------------------------------


CLAIMS = {
    66: "PTR names the partner; its forward zone points elsewhere",
    67: "a look-alike domain, forward-confirmed",
    68: "the partner's name inside another domain, forward-confirmed",
    72: "an escaped dot: the label 'mail.partner', forward-confirmed, text ends .partner.test",
    73: "the partner's name in capitals",
}


def test_a_ptr_claim_alone_earns_nothing(start_milter: Any, spoof_dns: DNSServer) -> None:
    m = start_milter(PARTNER)
    # the control: the partner's verified name excuses HELOs that would be refused
    assert helo_reply(m, "198.18.8.1", "x").code == "a"  # helo_syntax
    assert helo_reply(m, "198.18.8.1", "wrong.partner-less.invalid").code == "a"
    m.wait_for("exception partner.test (verified name mail.partner.test)")
    for last, how in CLAIMS.items():
        ip = f"198.18.8.{last}"
        for helo in ("mail.partner.test", "x"):  # a plausible HELO, and one that fails at once
            reply = helo_reply(m, ip, helo)
            assert reply.smtp_code == 550, (how, helo, reply)
        assert not excepted(m, ip), how
    asked = {q.name for q in spoof_dns.queries()}
    assert not [n for n in asked if "\\" in n], "a name with an escaped dot is never looked up"


def test_additional_section_cannot_plant_the_forward_confirmation(
    start_milter: Any, spoof_dns: DNSServer
) -> None:
    """The client's reverse zone answers its PTR with, in the additional section,
    the A record that would confirm it.  heloguard asks the partner's zone itself."""
    spoof_dns.set_fault(
        "69.8.18.198.in-addr.arpa",
        "additional",
        qtype="PTR",
        records=["mail.partner.test. 86400 IN A 198.18.8.69"],
    )
    m = start_milter(PARTNER)
    spoof_dns.reset_log()
    reply = helo_reply(m, "198.18.8.69")
    assert reply.smtp_code == 550 and "5.7.25" in reply.text, reply
    assert spoof_dns.count("mail.partner.test", "A") >= 1, "the forward question was asked"
    assert not excepted(m, "198.18.8.69")


def test_a_forward_answer_about_another_name_confirms_nothing(
    start_milter: Any, spoof_dns: DNSServer
) -> None:
    spoof_dns.set_fault(
        "mail.partner.test",
        "foreign_answer",
        qtype="A",
        records=[
            "evil.test. 300 IN A 198.18.8.70",
            "mail.partner.test. 300 IN AAAA ::ffff:198.18.8.70",  # the right name, wrong type
        ],
    )
    m = start_milter(PARTNER)
    reply = helo_reply(m, "198.18.8.70")  # the HELO's own lookup gets the same answer
    assert reply.smtp_code == 550, reply
    assert not excepted(m, "198.18.8.70")


def test_a_response_to_another_question_is_dropped(start_milter: Any, spoof_dns: DNSServer) -> None:
    """The forward lookup is answered as if it had asked about www.partner.test;
    dnspython drops it, the question times out, and that is a 4xx, never an
    exception and never a 5xx."""
    spoof_dns.set_fault(
        "mail.partner.test",
        "wrong_question",
        qtype="A",
        records=[
            "www.partner.test. 300 IN A 198.18.8.71",
            "mail.partner.test. 300 IN A 198.18.8.71",
        ],
    )
    m = start_milter(PARTNER)
    reply = helo_reply(m, "198.18.8.71")
    assert reply.smtp_code == 451 and reply.text.startswith("451 4."), reply
    assert not excepted(m, "198.18.8.71")


def test_a_failing_forward_lookup_defers_even_the_partner(
    start_milter: Any, spoof_dns: DNSServer
) -> None:
    spoof_dns.set_fault("mail.partner.test", "servfail", qtype="A")
    m = start_milter(PARTNER)
    reply = helo_reply(m, "198.18.8.74")
    assert reply.smtp_code == 451, reply
    assert not excepted(m, "198.18.8.74")


def test_the_helo_and_the_mtas_names_are_never_evidence(
    start_milter: Any, spoof_dns: DNSServer
) -> None:
    """A bot that HELOs as the partner, with the MTA's macros saying the same."""
    m = start_milter(PARTNER)
    from miltertest import MilterClient

    with MilterClient(m.socket) as c:
        c.negotiate()
        c.connect(
            "103.245.153.249",
            hostname="mail.partner.test",
            macros={"{daemon_name}": "mx", "{client_name}": "mail.partner.test"},
        )
        reply = c.helo("mail.partner.test")
        c.quit()
    assert reply is not None and reply.smtp_code == 550, reply
    assert not excepted(m, "103.245.153.249")


# -- DNS list error codes --------------------------------------------------------------


def test_block_list_error_codes_never_list(start_milter: Any, spoof_dns: DNSServer) -> None:
    """127.0.0.1 (a refused query) and 127.255.255.x are errors: the clients pass,
    and each answer is logged as a misconfiguration.  Even a filter that admits
    every 127/8 answer does not count them."""
    for zone in ("err-bl.test", "err-bl.test=127.[0..255].[0..255].[0..255]"):
        m = start_milter({"rules": {"dnsbl": {"zones": [zone]}}})
        for ip, helo in (("64.71.1.10", GOOD["helo"]), ("64.71.1.11", "taos.firemountain.net")):
            r = run_session(m.socket, ip=ip, helo=helo)
            assert r.refusal() is None, (zone, ip, r)
        log = m.wait_for("answered 127.255.255.253")
        assert "err-bl.test answered 127.0.0.1 for 64.71.1.10" in log
        assert "misconfiguration (rule dnsbl)" in log


def test_allow_list_error_codes_never_exempt(start_milter: Any, spoof_dns: DNSServer) -> None:
    """A DNSWL hit would exempt the client from every check, even a HELO of "x"."""
    m = start_milter({"rules": {"dnswl": {"zones": ["err-wl.test"]}}})
    for ip in (
        "103.245.153.249",  # 127.255.255.254
        "198.18.8.66",  # 127.0.0.1
        "198.18.8.67",  # 127.255.255.0
        "198.18.8.68",  # outside 127/8
    ):
        reply = helo_reply(m, ip, "x")
        assert reply.smtp_code == 550 and "5.5.2" in reply.text, (ip, reply)
    for ip in ("103.245.153.249", "198.18.8.66", "198.18.8.67", "198.18.8.68"):
        log = m.wait_for(f" for {ip}:")  # the log is written a moment later
        assert re.search(
            rf"misconfiguration \(rule dnswl\): err-wl\.test answered \S+ for {ip}:", log
        )
    assert "allow-listed" not in log


# -- the resolver uses only the answer to the question asked ---------------------------


def test_stuffed_additional_records_are_never_cached(
    make_resolver: Any, spoof_dns: DNSServer
) -> None:
    spoof_dns.set_fault(
        "69.8.18.198.in-addr.arpa",
        "additional",
        qtype="PTR",
        records=[
            "mail.partner.test. 86400 IN A 198.18.8.69",
            "partner.test. 86400 IN NS ns.evil.test.",
            "69.8.18.198.in-addr.arpa. 86400 IN PTR mail.evil.test.",
        ],
    )
    res: Resolver = make_resolver()
    ptr = res.run(res.lookup(Query.of("69.8.18.198.in-addr.arpa", "PTR")))
    assert ptr.status is Status.OK and ptr.records == ("mail.partner.test",), ptr

    async def peek(q: Query) -> Any:
        return res.cached(q)

    for q in (Query.of("mail.partner.test", "A"), Query.of("partner.test", "NS")):
        assert res.run(peek(q)) is None, q
    spoof_dns.reset_log()
    fwd = res.run(res.lookup(Query.of("mail.partner.test", "A")))
    assert fwd.records == ("198.18.8.1",) and spoof_dns.count("mail.partner.test", "A") == 1


def test_an_answer_about_another_name_is_not_the_answer(
    make_resolver: Any, spoof_dns: DNSServer
) -> None:
    spoof_dns.set_fault(
        "www.partner.test",
        "foreign_answer",
        qtype="A",
        records=["mail.evil.test. 300 IN A 198.18.8.99"],
    )
    res: Resolver = make_resolver()
    got = res.run(res.lookup(Query.of("www.partner.test", "A")))
    assert got.status is Status.NODATA and got.records == (), got

    async def peek(q: Query) -> Any:
        return res.cached(q)

    assert res.run(peek(Query.of("mail.evil.test", "A"))) is None


def test_a_response_to_another_question_times_out(make_resolver: Any, spoof_dns: DNSServer) -> None:
    spoof_dns.set_fault(
        "www.partner.test",
        "wrong_question",
        qtype="A",
        records=["other.partner.test. 300 IN A 198.18.8.99"],
    )
    res: Resolver = make_resolver(timeout=0.5)
    got = res.run(res.lookup(Query.of("www.partner.test", "A")))
    assert got.status is Status.TEMP and got.reason == "timeout", got


# -- the new fault kinds of the test DNS server ---------------------------------------


def ask(server: DNSServer, name: str, rdtype: str) -> dns.message.Message:
    query = dns.message.make_query(name, rdtype)
    return dns.query.udp(query, server.host, port=server.port, timeout=2)


def test_spoofing_faults_shape_the_response(spoof_dns: DNSServer) -> None:
    stuffed = "mail.partner.test. 300 IN A 198.18.8.69"
    spoof_dns.set_fault("www.partner.test", "additional", qtype="A", records=[stuffed])
    r = ask(spoof_dns, "www.partner.test", "A")
    assert [rr.to_text() for rr in r.answer] == ["www.partner.test. 300 IN A 198.18.8.1"]
    assert [rr.to_text() for rr in r.additional] == [stuffed]

    spoof_dns.set_fault("www.partner.test", "foreign_answer", qtype="A", records=[stuffed])
    r = ask(spoof_dns, "www.partner.test", "A")
    assert [rr.to_text() for rr in r.answer] == [stuffed] and r.rcode() == 0

    spoof_dns.set_fault("www.partner.test", "wrong_question", qtype="A", records=[stuffed])
    with pytest.raises(dns.query.BadResponse):
        ask(spoof_dns, "www.partner.test", "A")
    spoof_dns.clear_faults()
    r = ask(spoof_dns, "www.partner.test", "A")
    assert r.additional == [] and len(r.answer) == 1, "cleared: the normal answer again"


@pytest.mark.parametrize(
    ("kind", "records"),
    [
        ("additional", []),  # needs records
        ("servfail", ["x.test. 300 IN A 192.0.2.1"]),  # takes none
        ("additional", ["x.test 300 IN A 192.0.2.1"]),  # a relative name
        ("additional", ["x.test. 300 IN A not-an-address"]),
        ("additional", ["x.test. IN A 192.0.2.1"]),  # no TTL
    ],
)
def test_spoofing_faults_refuse_bad_records(
    spoof_dns: DNSServer, kind: str, records: list[str]
) -> None:
    with pytest.raises(ValueError, match="record"):
        spoof_dns.set_fault("www.partner.test", kind, records=records)
    assert spoof_dns.faults() == []


def test_spoofing_faults_load_from_toml(spoof_dns: DNSServer, tmp_path: Path) -> None:
    path = tmp_path / "faults.toml"
    path.write_text(
        "[[fault]]\n"
        'name = "www.partner.test"\n'
        'kind = "additional"\n'
        'qtype = "A"\n'
        'records = ["mail.partner.test. 300 IN A 198.18.8.69"]\n'
    )
    spoof_dns.load_faults(path)
    (fault,) = spoof_dns.faults()
    assert fault.kind == "additional" and fault.records == (
        "mail.partner.test. 300 IN A 198.18.8.69",
    )
    assert fault.qtype == dns.rdatatype.A
    r = ask(spoof_dns, "www.partner.test", "A")
    assert len(r.additional) == 1


def test_a_dnspython_udp_query_never_accepts_a_mismatched_question(spoof_dns: DNSServer) -> None:
    """What the resolver relies on: dnspython checks id and question (dns.message.is_response)."""
    spoof_dns.set_fault(
        "www.partner.test",
        "wrong_question",
        qtype="A",
        records=["www.partner.test.evil.test. 300 IN A 198.18.8.99"],
    )
    query = dns.message.make_query("www.partner.test", "A")
    with pytest.raises(dns.exception.Timeout):
        dns.query.udp(  # as dnspython's resolver asks (dns.nameserver.Do53Nameserver)
            query,
            spoof_dns.host,
            port=spoof_dns.port,
            timeout=0.5,
            ignore_unexpected=True,
            ignore_errors=True,
        )
