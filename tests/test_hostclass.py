"""The generic-name classifier: one row per encoding family and per hard case.

The labelled corpora (tests/data/generic/) measure it as a whole in
test_generic_corpus.py; these rows pin each behaviour so a change that
breaks one family shows which.
"""

from __future__ import annotations

import ipaddress

import pytest

from heloguard.hostclass import Patterns, classify
from heloguard.rules import REGISTRY
from heloguard.rules.base import Outcome
from heloguard.rules.generic import Options

from ruletable import FakeZone, ctx, drive

# (label, client address, name, generic?, kind of evidence)
ROWS = [
    # the address, in every encoding
    ("dashed forward", "103.245.153.249", "103-245-153-249.host.neural.net.au", True, "address"),
    ("dotted reversed", "1.2.3.4", "4.3.2.1.dynamic.isp-example.net", True, "address"),
    ("dashed reversed", "81.14.200.7", "7-200-14-81.cust.isp-example.at", True, "address"),
    ("zero padded", "81.14.2.7", "081-014-002-007.dsl.isp-example.fr", True, "address"),
    ("padded run together", "81.14.2.7", "host081014002007.isp-example.fr", True, "address"),
    ("ip and a serial", "81.14.200.7", "ip811420079.isp-example.pl", True, "opaque-id"),
    ("run together exact", "81.14.200.7", "c81142007.isp-example.pl", True, "address"),
    ("hex", "217.228.147.1", "pd9e49301.dip0.t-ipconnect.de", True, "address"),
    ("hex upper in a label", "217.228.147.1", "PD9E49301.DIP0.T-IPCONNECT.DE", True, "address"),
    ("decimal integer", "217.228.147.1", "3655635713.cust.isp-example.net", True, "address"),
    ("base 36", "84.12.200.7", "nbjuh3.clients.isp-example.net", True, "address"),
    ("last three octets", "81.14.200.7", "host-14-200-7.isp-example.it", True, "address"),
    ("last two with pool word", "81.14.200.7", "dyn-200-7.isp-example.it", True, "address"),
    ("octets in a word", "81.14.200.7", "ip81-14-200-7.isp-example.it", True, "address"),
    ("another address", "192.0.2.1", "81-14-200-7.static.isp-example.it", True, "address-like"),
    (
        "ipv6 hextets",
        "2001:4dd0:1234:5678::25",
        "2001-4dd0-1234-5678-0-0-0-25.dyn.isp-example.de",
        True,
        "address",
    ),
    ("ipv6 squeezed", "2a02:8108:1:2::25", "2a02-8108-1-2--25.isp-example.de", True, "address"),
    (
        "ipv6 full hex",
        "2a02:8108:1:2:3:4:5:6",
        "2a028108000100020003000400050006.cable.isp-example.de",
        True,
        "address",
    ),
    (
        "ipv6 interface id",
        "2a02:8108:1:2:3:4:5:6",
        "h0003000400050006.isp-example.de",
        True,
        "address",
    ),
    (
        "ipv6 embedded ipv4",
        "2002:5101:0e07::1",
        "81-1-14-7.sixtofour.isp-example.net",
        True,
        "address",
    ),
    (
        "ipv6 nibbles",
        "2a02:8108::",
        "0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.0.1.8.2.0.a.2.ip6.isp-example.net",
        True,
        "address",
    ),
    # words and provider shapes
    ("pool placeholder", "14.160.1.2", "static.vnpt.vn", True, "pool-word"),
    ("pool placeholder adsl", "27.64.1.2", "adsl.viettel.vn", True, "pool-word"),
    (
        "static does not make it real",
        "81.14.200.7",
        "static-81-14-200-7.isp-example.it",
        True,
        "address",
    ),
    ("cpe and mac", "81.14.200.7", "cpe-001a2b3c4d5e.cpe.isp-example.net", True, "pool-word"),
    ("mac alone", "81.14.200.7", "001a2b3c4d5e.isp-example.net", True, "opaque-id"),
    ("vm identifier", "5.189.1.2", "vmi123456.contaboserver.net", True, "opaque-id"),
    ("vps hex", "5.189.1.2", "vps-5f3a2b9c.vps.ovh.net", True, "opaque-id"),
    (
        "line identifier",
        "153.1.2.3",
        "p522356-ipngn1234osakakita.osaka.ocn.ne.jp",
        True,
        "opaque-id",
    ),
    ("pcp identifier", "126.1.2.3", "pcp058123009pcs.wakayama.isp-example.jp", True, "opaque-id"),
    # a provider's suffix alone is no evidence: its own relays live there too
    ("cloud suffix alone", "20.1.2.3", "myvm.westeurope.cloudapp.azure.com", False, "plain"),
    ("cloud suffix and a serial", "45.33.1.2", "li123-45.members.linode.com", True, "cloud"),
    (
        "hosting relay fleet",
        "173.201.193.104",
        "p3plsmtpa08-03.prod.phx3.secureserver.net",
        False,
        "role",
    ),
    ("fleet out", "72.167.218.215", "p3plwbeout03-03.prod.phx3.secureserver.net", False, "role"),
    ("ionos mout", "212.227.17.10", "mout.kundenserver.de", False, "role"),
    # four small numbers glued to letters are a fleet's serials, not an address
    # an opaque token after a short word (TELUS, tests/data/generic/pool_names.csv)
    (
        "word and random token",
        "2001:569:7bc3:ce00:a4b2:4936:f0f6:3eff",
        "node-1w7jr9qsv51tb41p80xpg7667.ipv6.telus.net",
        True,
        "opaque-id",
    ),
    # a pool root counts at the end of a short run only, not inside noise
    ("root in a short run", "198.51.100.7", "athedsl-4521.isp-example.net", True, "pool-word"),
    ("root in a long run", "198.51.100.7", "x-" + "p" * 40 + ".isp-example.net", False, "plain"),
    ("glued serials", "65.54.246.214", "bay0-omc3-s14.bay0.hotmail.com", False, "plain"),
    ("glued first octet", "198.51.100.7", "host10-1-2-3.isp-example.net", True, "address-like"),
    (
        "hosting shared server",
        "72.167.1.2",
        "p3plzcpnl0123.prod.phx3.secureserver.net",
        False,
        "plain",
    ),
    # words whose meaning depends on where they stand
    ("mx heads the name", "81.14.200.7", "mx2.isp-example.net", False, "role"),
    ("pop heads the name", "81.14.200.7", "pop3.isp-example.net", False, "role"),
    (
        "mx beside an address and a pool word",
        "171.5.12.34",
        "mx-ll-171.5.12-34.dynamic.3bb.co.th",
        True,
        "address",
    ),
    (
        "pop is a point of presence",
        "81.14.200.7",
        "200-7.pop1.cgnat.isp-example.br",
        True,
        "address",
    ),
    ("pop with octets", "81.14.200.7", "pop-81-14-200-7.isp-example.br", True, "address"),
    # octets in another order, partial octets beside a router word, hex tails
    ("byte swapped", "81.14.200.7", "14-81-7-200.isp-example.at", True, "address"),
    (
        "reversed in pairs",
        "79.56.12.34",
        "host34-12-dynamic.56-79-r.retail.telecomitalia.it",
        True,
        "address",
    ),
    ("two octets beside a bras", "81.14.200.7", "7-200.bras2.isp-example.ru", True, "address"),
    ("hex of the last three", "81.14.200.7", "dsl-0ec807.isp-example.fi", True, "address"),
    (
        "hex of the last two beside a pool word",
        "81.14.200.7",
        "c807.dyn.isp-example.fi",
        True,
        "address",
    ),
    (
        "eui-64 mac",
        "2a02:8108:1:2:21a:2bff:fe3c:4d5e",
        "cpe-00-1a-2b-3c-4d-5e.v6.isp-example.de",
        True,
        "address",
    ),
    ("ipv6 /64 prefix", "2a02:8108:1:2::7", "h2a02810800010002.v6.isp-example.de", True, "address"),
    (
        "role word and an address beside a pool word",
        "81.14.200.7",
        "mail-81-14-200-7.dynamic.isp-example.it",
        True,
        "address",
    ),
    ("ec2", "54.1.2.3", "ec2-54-1-2-3.compute-1.amazonaws.com", True, "address"),
    ("gcp", "35.1.2.3", "3.2.1.35.bc.googleusercontent.com", True, "address"),
    # real names, including the hard ones
    ("amazon ses", "54.240.8.12", "a8-12.smtp-out.amazonses.com", False, "role"),
    ("qq full address", "203.205.221.153", "out203-205-221-153.mail.qq.com", False, "role"),
    ("google", "209.85.128.172", "mail-yw1-f172.google.com", False, "role"),
    ("outlook", "40.107.1.2", "mail-am6eur05on2099.outbound.protection.outlook.com", False, "role"),
    ("facebook", "66.220.144.161", "66-220-144-161.mail-mxout.facebook.com", False, "role"),
    ("yahoo", "98.137.1.2", "sonic301-22.consmr.mail.bf2.yahoo.com", False, "role"),
    ("pool word in the registered domain", "81.14.200.7", "mail.dynamicsoft.com", False, "role"),
    ("pool word domain, no role word", "81.14.200.7", "www.dslreports.com", False, "plain"),
    ("hostpoint", "81.14.200.7", "smtp.hostpoint.ch", False, "role"),
    ("digits and a role", "81.14.200.7", "mx01.example.de", False, "role"),
    ("sendgrid whitelabel", "81.14.200.7", "o1.ptr1234.example.com", False, "plain"),
    ("apple", "17.58.1.2", "mr85p00im-ztdg06021101.me.com", False, "plain"),
    ("owner named vps", "81.14.200.7", "vps.myname.org", False, "plain"),
    ("plain server", "81.14.200.7", "server1.family-domain.de", False, "plain"),
    ("registered domain only", "81.14.200.7", "example.com", False, "plain"),
]


@pytest.mark.parametrize(("label", "ip", "name", "generic", "kind"), ROWS, ids=[r[0] for r in ROWS])
def test_classify(label: str, ip: str, name: str, generic: bool, kind: str) -> None:
    v = classify(name, ipaddress.ip_address(ip))
    assert v.generic is generic, (label, v)
    assert v.kind == kind, (label, v)
    assert v.evidence, "every verdict says why"


def test_admin_patterns() -> None:
    patterns = Patterns.compile(
        extra=[r"\.badhosting\.example$"], exceptions=[r"^mail7\.partner\.example$"]
    )
    assert classify("srv.badhosting.example", None, patterns).generic
    assert classify("srv.badhosting.example", None, patterns).kind == "extra"
    assert not classify("mail7.partner.example", None, patterns).generic
    v = classify(
        "81-14-200-7.dyn.partner.example", None, Patterns.compile(exceptions=[r"dyn\.partner"])
    )
    assert not v.generic and v.kind == "exception"


def test_hostile_names_never_raise() -> None:
    for name in [
        "",
        ".",
        "..",
        "a" * 300,
        "\x00\r\n",
        "é.example.com",
        "[::1]",
        "1.2.3.4",
        "-.-.-",
        "%s%n",
    ]:
        classify(name, ipaddress.ip_address("192.0.2.1"))
        classify(name, None)


def test_rule_judges_every_ptr_name() -> None:
    rule = REGISTRY["generic"]
    rev = "7.200.14.81.in-addr.arpa"
    both = FakeZone({(rev, "PTR"): ("81-14-200-7.dyn.isp-example.it", "mail.realco.example")})
    assert drive(rule, ctx("81.14.200.7"), both).outcome is Outcome.PASS, "one real name is enough"
    only = FakeZone({(rev, "PTR"): ("81-14-200-7.dyn.isp-example.it",)})
    result = drive(rule, ctx("81.14.200.7"), only)
    assert result.outcome is Outcome.FAIL and result.reply is not None
    assert str(result.reply).startswith("550 5.7.1 ")
    assert "81-14-200-7.dyn.isp-example.it" in result.reply.text
    assert drive(rule, ctx("81.14.200.7"), FakeZone({})).outcome is Outcome.SKIP
    temp = drive(rule, ctx("81.14.200.7"), FakeZone({(rev, "PTR"): "TEMP"}))
    assert temp.outcome is Outcome.TEMPFAIL and temp.reply is not None and temp.reply.code == 451


def test_helo_rule() -> None:
    rule = REGISTRY["generic_helo"]
    assert rule.default_action == "warn"
    bad = drive(rule, ctx("81.14.200.7", "81-14-200-7.dyn.isp-example.it"), FakeZone())
    assert bad.outcome is Outcome.FAIL and bad.reply is not None and bad.reply.code == 550
    assert (
        drive(rule, ctx("81.14.200.7", "mail.realco.example"), FakeZone()).outcome is Outcome.PASS
    )
    assert drive(rule, ctx("81.14.200.7", "[81.14.200.7]"), FakeZone()).outcome is Outcome.SKIP


def test_bad_pattern_is_a_config_error() -> None:
    with pytest.raises(ValueError, match="bad pattern"):
        Options(extra_patterns=("([unclosed",)).validate()
