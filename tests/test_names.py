"""HELO parsing, host-name syntax, reverse names and registered domains."""

from __future__ import annotations

import ipaddress

import pytest

from heloguard.names import (
    HeloKind,
    hostname_problem,
    parse_address,
    parse_helo,
    registered_domain,
    reverse_name,
    same_registered_domain,
)

HELO_CASES = [
    # (label, argument, kind, normalized name or address)
    ("plain fqdn", "mail.example.com", HeloKind.FQDN, "mail.example.com"),
    ("upper case folded", "MAIL.Example.COM", HeloKind.FQDN, "mail.example.com"),
    ("surrounding space", "  mx.example.org ", HeloKind.FQDN, "mx.example.org"),
    (
        "digits and hyphens",
        "a8-12.smtp-out.amazonses.com",
        HeloKind.FQDN,
        "a8-12.smtp-out.amazonses.com",
    ),
    ("idn u-label", "mail.bücher.de", HeloKind.FQDN, "mail.xn--bcher-kva.de"),
    ("idn a-label", "mail.xn--bcher-kva.de", HeloKind.FQDN, "mail.xn--bcher-kva.de"),
    ("ipv4 literal", "[192.0.2.1]", HeloKind.LITERAL, "192.0.2.1"),
    ("ipv6 literal", "[IPv6:2001:db8::1]", HeloKind.LITERAL, "2001:db8::1"),
    ("ipv6 literal lower tag", "[ipv6:2001:DB8::1]", HeloKind.LITERAL, "2001:db8::1"),
    ("ipv4-mapped literal", "[IPv6:::ffff:192.0.2.7]", HeloKind.LITERAL, "192.0.2.7"),
    ("bare ipv4", "192.0.2.1", HeloKind.BARE_IP, "192.0.2.1"),
    ("bare ipv6", "2001:db8::1", HeloKind.BARE_IP, "2001:db8::1"),
    ("single label", "mailserver", HeloKind.SINGLE_LABEL, ""),
    ("localhost", "localhost", HeloKind.LOCALHOST, ""),
    ("localhost.localdomain", "LOCALHOST.localdomain", HeloKind.LOCALHOST, ""),
    ("empty", "", HeloKind.EMPTY, ""),
    ("only spaces", "   ", HeloKind.EMPTY, ""),
    ("trailing dot", "mail.example.com.", HeloKind.INVALID, ""),
    ("underscore", "mail_1.example.com", HeloKind.INVALID, ""),
    ("leading hyphen label", "-mail.example.com", HeloKind.INVALID, ""),
    ("trailing hyphen label", "mail-.example.com", HeloKind.INVALID, ""),
    ("empty label", "mail..example.com", HeloKind.INVALID, ""),
    ("numeric tld", "mail.example.123", HeloKind.INVALID, ""),
    ("overlong label", "a" * 64 + ".example.com", HeloKind.INVALID, ""),
    ("overlong name", ".".join(["a" * 60] * 5), HeloKind.INVALID, ""),
    ("spaces inside", "mail example.com", HeloKind.INVALID, ""),
    ("control byte", "mail\x00.example.com", HeloKind.INVALID, ""),
    ("crlf injection", "mail.example.com\r\nMAIL FROM:<x>", HeloKind.INVALID, ""),
    ("percent format", "%s%s%n.example.com", HeloKind.INVALID, ""),
    ("shell metachar", "$(reboot).example.com", HeloKind.INVALID, ""),
    ("quote", '"mail".example.com', HeloKind.INVALID, ""),
    ("v4 literal out of range", "[300.1.1.1]", HeloKind.BAD_LITERAL, ""),
    ("v4 literal short", "[1.2.3]", HeloKind.BAD_LITERAL, ""),
    ("v6 literal without tag", "[2001:db8::1]", HeloKind.BAD_LITERAL, ""),
    ("v6 literal malformed", "[IPv6:2001:db8:::1]", HeloKind.BAD_LITERAL, ""),
    ("general literal", "[x400:foo]", HeloKind.BAD_LITERAL, ""),
    ("empty brackets", "[]", HeloKind.BAD_LITERAL, ""),
    ("broken idn", "mail.\udcff.de", HeloKind.INVALID, ""),
]


@pytest.mark.parametrize(
    ("label", "raw", "kind", "value"), HELO_CASES, ids=[c[0] for c in HELO_CASES]
)
def test_parse_helo(label: str, raw: str, kind: HeloKind, value: str) -> None:
    helo = parse_helo(raw)
    assert helo.kind is kind, (label, helo)
    if kind is HeloKind.FQDN:
        assert helo.name == value
        assert not helo.problem
    elif kind in (HeloKind.LITERAL, HeloKind.BARE_IP):
        assert str(helo.address) == value
    else:
        assert helo.problem, "a refused argument must say why"


def test_leading_zero_literal_is_an_address() -> None:
    # RFC 5321 Snum is 1*3DIGIT: leading zeros are syntax, the value counts.
    assert parse_helo("[192.000.002.001]").address == ipaddress.ip_address("192.0.2.1")


@pytest.mark.parametrize(
    ("name", "ok"),
    [
        ("example.com", True),
        ("a.b", True),
        ("xn--bcher-kva.de", True),
        ("1.2.3.4", False),  # numeric top-level label
        ("1-2-3-4.example.com", True),
        ("example", False),
        ("", False),
        ("a" * 63 + ".com", True),
        ("a" * 64 + ".com", False),
    ],
)
def test_hostname_problem(name: str, ok: bool) -> None:
    assert (hostname_problem(name) == "") is ok


def test_reverse_names() -> None:
    assert reverse_name(ipaddress.ip_address("103.245.153.249")) == "249.153.245.103.in-addr.arpa"
    v6 = reverse_name(ipaddress.ip_address("2001:db8::25"))
    assert v6.endswith(".8.b.d.0.1.0.0.2.ip6.arpa")
    assert v6.startswith("5.2.0.0.")
    assert len(v6.split(".")) == 34
    # an IPv4-mapped client is judged as IPv4
    mapped = parse_address("::ffff:192.0.2.9")
    assert mapped is not None and reverse_name(mapped) == "9.2.0.192.in-addr.arpa"


@pytest.mark.parametrize(
    ("name", "domain"),
    [
        ("mail.example.com", "example.com"),
        ("mail.example.co.uk", "example.co.uk"),
        ("103-245-153-249.host.neural.net.au", "neural.net.au"),
        ("co.uk", None),
        ("com", None),
        ("mx.good.test", "good.test"),  # unknown TLD: last two labels
        ("ec2-1-2-3-4.compute-1.amazonaws.com", None),  # a public suffix itself (private section)
        ("MAIL.Example.COM.", "example.com"),
    ],
)
def test_registered_domain(name: str, domain: str | None) -> None:
    assert registered_domain(name) == domain


def test_same_registered_domain() -> None:
    assert same_registered_domain("mx1.example.co.uk", "out.example.co.uk")
    assert not same_registered_domain("example.co.uk", "other.co.uk")
    assert not same_registered_domain(
        "ec2-1-2-3-4.compute-1.amazonaws.com", "ec2-5-6-7-8.compute-1.amazonaws.com"
    )
