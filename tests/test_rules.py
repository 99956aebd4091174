"""Table-driven tests of every rule's logic against canned DNS answers.

Each row: a label, the client address, the HELO, the DNS data, and the
expected outcome (and for failures the reply code).  Any question not in the
data is NXDOMAIN.  These run in milliseconds; the same rules are exercised
against a real DNS server in test_check_cli.py.
"""

from __future__ import annotations

from typing import Any

import pytest

from heloguard.rules import REGISTRY
from heloguard.rules.base import Outcome
from heloguard.rules.helo_ours import Options as OursOptions

from ruletable import FakeZone, Records, ctx, drive

BOT_IP = "103.245.153.249"
BOT_REV = "249.153.245.103.in-addr.arpa"
GOOD_IP = "64.71.1.10"
GOOD_REV = "10.1.71.64.in-addr.arpa"
V6_IP = "2600:3c00::10"
V6_REV = "0.1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.c.3.0.0.6.2.ip6.arpa"

GOOD: dict[tuple[str, str], Records] = {
    (GOOD_REV, "PTR"): ("ukiah.firemountain.net",),
    ("ukiah.firemountain.net", "A"): (GOOD_IP,),
    ("ukiah.firemountain.net", "AAAA"): (V6_IP,),
    (V6_REV, "PTR"): ("ukiah.firemountain.net",),
}
ESSAY: dict[tuple[str, str], Records] = {
    (BOT_REV, "PTR"): ("103-245-153-249.host.neural.net.au",),
    ("mail.digitaljunction.com.au", "A"): ("27.50.64.99",),
    ("mail.digitaljunction.com.au", "AAAA"): "NODATA",
}

# (label, rule, ip, helo, zone data, outcome, reply code or None)
CASES: list[tuple[str, str, str, str | None, dict[Any, Any], Outcome, int | None]] = [
    # ptr
    ("ptr present", "ptr", GOOD_IP, "x.example", GOOD, Outcome.PASS, None),
    ("ptr nxdomain", "ptr", GOOD_IP, "x.example", {}, Outcome.FAIL, 550),
    ("ptr nodata", "ptr", GOOD_IP, "x.example", {(GOOD_REV, "PTR"): "NODATA"}, Outcome.FAIL, 550),
    (
        "ptr servfail",
        "ptr",
        GOOD_IP,
        "x.example",
        {(GOOD_REV, "PTR"): "TEMP"},
        Outcome.TEMPFAIL,
        451,
    ),
    ("ptr ipv6", "ptr", V6_IP, "x.example", GOOD, Outcome.PASS, None),
    # fcrdns
    ("fcrdns confirmed", "fcrdns", GOOD_IP, None, GOOD, Outcome.PASS, None),
    ("fcrdns ipv6 confirmed", "fcrdns", V6_IP, None, GOOD, Outcome.PASS, None),
    ("fcrdns essay: ptr name has no A", "fcrdns", BOT_IP, None, ESSAY, Outcome.FAIL, 550),
    ("fcrdns no ptr", "fcrdns", GOOD_IP, None, {}, Outcome.FAIL, 550),
    (
        "fcrdns ptr temp",
        "fcrdns",
        GOOD_IP,
        None,
        {(GOOD_REV, "PTR"): "TEMP"},
        Outcome.TEMPFAIL,
        451,
    ),
    (
        "fcrdns forward temp",
        "fcrdns",
        GOOD_IP,
        None,
        {(GOOD_REV, "PTR"): ("ukiah.firemountain.net",), ("ukiah.firemountain.net", "A"): "TEMP"},
        Outcome.TEMPFAIL,
        451,
    ),
    (
        "fcrdns forward points elsewhere",
        "fcrdns",
        GOOD_IP,
        None,
        {
            (GOOD_REV, "PTR"): ("ukiah.firemountain.net",),
            ("ukiah.firemountain.net", "A"): ("64.71.1.99",),
        },
        Outcome.FAIL,
        550,
    ),
    (
        "fcrdns second of two names confirms",
        "fcrdns",
        GOOD_IP,
        None,
        {
            (GOOD_REV, "PTR"): ("stale.example.net", "ukiah.firemountain.net"),
            ("ukiah.firemountain.net", "A"): (GOOD_IP,),
        },
        Outcome.PASS,
        None,
    ),
    (
        "fcrdns one name confirms despite another TEMP",
        "fcrdns",
        GOOD_IP,
        None,
        {
            (GOOD_REV, "PTR"): ("stale.example.net", "ukiah.firemountain.net"),
            ("stale.example.net", "A"): "TEMP",
            ("ukiah.firemountain.net", "A"): (GOOD_IP,),
        },
        Outcome.PASS,
        None,
    ),
    (
        "fcrdns hostile ptr names are not looked up",
        "fcrdns",
        GOOD_IP,
        None,
        {(GOOD_REV, "PTR"): ("bad\\000name.example.net", "64.71.1.10", "localhost")},
        Outcome.FAIL,
        550,
    ),
    (
        "fcrdns ipv6 client ignores A records",
        "fcrdns",
        V6_IP,
        None,
        {(V6_REV, "PTR"): ("ukiah.firemountain.net",), ("ukiah.firemountain.net", "A"): (GOOD_IP,)},
        Outcome.FAIL,
        550,
    ),
    # helo_syntax
    ("syntax fqdn", "helo_syntax", GOOD_IP, "ukiah.firemountain.net", {}, Outcome.PASS, None),
    ("syntax literal", "helo_syntax", GOOD_IP, "[64.71.1.10]", {}, Outcome.PASS, None),
    ("syntax bare ip", "helo_syntax", GOOD_IP, "64.71.1.10", {}, Outcome.FAIL, 550),
    ("syntax single label", "helo_syntax", GOOD_IP, "ukiah", {}, Outcome.FAIL, 550),
    ("syntax localhost", "helo_syntax", GOOD_IP, "localhost", {}, Outcome.FAIL, 550),
    ("syntax garbage", "helo_syntax", GOOD_IP, "!!!", {}, Outcome.FAIL, 550),
    ("syntax no helo", "helo_syntax", GOOD_IP, None, {}, Outcome.FAIL, 550),
    ("syntax bad literal", "helo_syntax", GOOD_IP, "[1.2.3.256]", {}, Outcome.FAIL, 550),
    # helo_literal
    ("literal matches", "helo_literal", GOOD_IP, "[64.71.1.10]", {}, Outcome.PASS, None),
    ("literal v6 matches", "helo_literal", V6_IP, "[IPv6:2600:3c00:0::10]", {}, Outcome.PASS, None),
    ("literal other address", "helo_literal", GOOD_IP, "[64.71.1.11]", {}, Outcome.FAIL, 550),
    ("literal v4 for v6 client", "helo_literal", V6_IP, "[64.71.1.10]", {}, Outcome.FAIL, 550),
    (
        "literal skips names",
        "helo_literal",
        GOOD_IP,
        "ukiah.firemountain.net",
        {},
        Outcome.SKIP,
        None,
    ),
    # helo_resolves
    ("resolves a", "helo_resolves", GOOD_IP, "ukiah.firemountain.net", GOOD, Outcome.PASS, None),
    (
        "resolves aaaa only",
        "helo_resolves",
        GOOD_IP,
        "v6.example.net",
        {("v6.example.net", "AAAA"): ("2001:db8::1",), ("v6.example.net", "A"): "NODATA"},
        Outcome.PASS,
        None,
    ),
    (
        "resolves a despite aaaa temp",
        "helo_resolves",
        GOOD_IP,
        "ukiah.firemountain.net",
        {("ukiah.firemountain.net", "A"): (GOOD_IP,), ("ukiah.firemountain.net", "AAAA"): "TEMP"},
        Outcome.PASS,
        None,
    ),
    (
        "resolves nxdomain",
        "helo_resolves",
        GOOD_IP,
        "nonexistent.example.net",
        {},
        Outcome.FAIL,
        550,
    ),
    (
        "resolves temp",
        "helo_resolves",
        GOOD_IP,
        "flaky.example.net",
        {("flaky.example.net", "A"): "TEMP"},
        Outcome.TEMPFAIL,
        451,
    ),
    ("resolves skips literal", "helo_resolves", GOOD_IP, "[64.71.1.10]", {}, Outcome.SKIP, None),
    ("resolves skips bare ip", "helo_resolves", GOOD_IP, "64.71.1.10", {}, Outcome.SKIP, None),
    # helo_matches
    (
        "matches verified name",
        "helo_matches",
        GOOD_IP,
        "ukiah.firemountain.net",
        GOOD,
        Outcome.PASS,
        None,
    ),
    (
        "matches by forward address (no ptr)",
        "helo_matches",
        GOOD_IP,
        "mx.example.net",
        {("mx.example.net", "A"): (GOOD_IP,)},
        Outcome.PASS,
        None,
    ),
    (
        "matches same registered domain",
        "helo_matches",
        GOOD_IP,
        "smtp.firemountain.net",
        {**GOOD, ("smtp.firemountain.net", "A"): ("64.71.2.1",)},
        Outcome.PASS,
        None,
    ),
    (
        "matches not across a public suffix",
        "helo_matches",
        "192.0.2.10",
        "mail.other.co.uk",
        {
            ("10.2.0.192.in-addr.arpa", "PTR"): ("out.example.co.uk",),
            ("out.example.co.uk", "A"): ("192.0.2.10",),
            ("mail.other.co.uk", "A"): ("192.0.2.99",),
        },
        Outcome.FAIL,
        550,
    ),
    (
        "matches same domain needs a verified name",
        "helo_matches",
        BOT_IP,
        "mail.neural.net.au",
        {**ESSAY, ("mail.neural.net.au", "A"): ("103.245.153.1",)},
        Outcome.FAIL,
        550,
    ),
    (
        "matches essay",
        "helo_matches",
        BOT_IP,
        "mail.digitaljunction.com.au",
        ESSAY,
        Outcome.FAIL,
        550,
    ),
    (
        "matches ptr temp",
        "helo_matches",
        BOT_IP,
        "mail.digitaljunction.com.au",
        {**ESSAY, (BOT_REV, "PTR"): "TEMP"},
        Outcome.TEMPFAIL,
        451,
    ),
    ("matches skips literal", "helo_matches", GOOD_IP, "[64.71.1.10]", GOOD, Outcome.SKIP, None),
    (
        "matches ipv6 verified",
        "helo_matches",
        V6_IP,
        "ukiah.firemountain.net",
        GOOD,
        Outcome.PASS,
        None,
    ),
    # helo_fcrdns
    ("helo fcrdns ok", "helo_fcrdns", GOOD_IP, "ukiah.firemountain.net", GOOD, Outcome.PASS, None),
    (
        "helo fcrdns essay",
        "helo_fcrdns",
        BOT_IP,
        "mail.digitaljunction.com.au",
        ESSAY,
        Outcome.FAIL,
        550,
    ),
    (
        "helo fcrdns ptr temp",
        "helo_fcrdns",
        BOT_IP,
        "mail.digitaljunction.com.au",
        {**ESSAY, ("99.64.50.27.in-addr.arpa", "PTR"): "TEMP"},
        Outcome.TEMPFAIL,
        451,
    ),
    (
        "helo fcrdns skips unresolvable",
        "helo_fcrdns",
        GOOD_IP,
        "nope.example.net",
        {},
        Outcome.SKIP,
        None,
    ),
]


@pytest.mark.parametrize(
    ("label", "rule", "ip", "helo", "data", "outcome", "code"), CASES, ids=[c[0] for c in CASES]
)
def test_rule(
    label: str,
    rule: str,
    ip: str,
    helo: str | None,
    data: dict[Any, Any],
    outcome: Outcome,
    code: int | None,
) -> None:
    zone = FakeZone(data)
    result = drive(REGISTRY[rule], ctx(ip, helo), zone)
    assert result.outcome is outcome, (label, result)
    assert result.reason, "every finding says why"
    if code is None:
        assert result.reply is None
    else:
        assert result.reply is not None and result.reply.code == code, result.reply
        if outcome is Outcome.TEMPFAIL:
            assert result.reply.status.startswith("4.")
        else:
            assert result.reply.status.startswith("5.")


def test_fcrdns_replies_use_rfc7372_code() -> None:
    fail = drive(REGISTRY["fcrdns"], ctx(BOT_IP), FakeZone(ESSAY))
    assert fail.reply is not None and str(fail.reply).startswith("550 5.7.25 ")
    temp = drive(REGISTRY["fcrdns"], ctx(BOT_IP), FakeZone({(BOT_REV, "PTR"): "TEMP"}))
    assert temp.reply is not None and str(temp.reply).startswith("451 4.7.25 ")


def test_fcrdns_caps_names_and_asks_only_client_family() -> None:
    names = tuple(f"h{i}.example.net" for i in range(30))
    zone = FakeZone({(GOOD_REV, "PTR"): names})
    drive(REGISTRY["fcrdns"], ctx(GOOD_IP), zone)
    forward = [q for q in zone.asked if q.rdtype in ("A", "AAAA")]
    assert len(forward) == 10
    assert {q.rdtype for q in forward} == {"A"}


def test_fcrdns_hostile_names_never_asked() -> None:
    zone = FakeZone({(GOOD_REV, "PTR"): ("bad\\000name.example.net", "64.71.1.10", "localhost")})
    drive(REGISTRY["fcrdns"], ctx(GOOD_IP), zone)
    assert [q.rdtype for q in zone.asked] == ["PTR"]


@pytest.mark.parametrize(
    ("helo", "client", "outcome"),
    [
        ("mx.ours.example", "192.0.2.50", Outcome.FAIL),
        ("MX.OURS.EXAMPLE", "192.0.2.50", Outcome.FAIL),
        ("ours.example", "192.0.2.50", Outcome.FAIL),
        ("[198.51.100.25]", "192.0.2.50", Outcome.FAIL),
        ("198.51.100.25", "192.0.2.50", Outcome.FAIL),
        ("mail.sender.example", "192.0.2.50", Outcome.PASS),
        ("mx.ours.example", "198.51.100.25", Outcome.SKIP),  # it is us
    ],
)
def test_helo_ours(helo: str, client: str, outcome: Outcome) -> None:
    opts = OursOptions(
        myhostnames=("mx.ours.example",),
        mydomains=("ours.example",),
        myaddresses=("198.51.100.25",),
    )
    result = drive(REGISTRY["helo_ours"], ctx(client, helo), FakeZone(), opts)
    assert result.outcome is outcome
    if outcome is Outcome.FAIL:
        assert result.reply is not None and result.reply.code == 550


def test_replies_never_carry_raw_attacker_bytes() -> None:
    nasty = "bad\r\nname%s\x00.example.com"
    result = drive(REGISTRY["helo_syntax"], ctx(GOOD_IP, nasty), FakeZone())
    assert result.reply is not None
    text = str(result.reply)
    assert "\r" not in text and "\n" not in text and "\x00" not in text
