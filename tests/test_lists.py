"""DNS list zone specifications and the reading of their answers (no network)."""

from __future__ import annotations

import ipaddress

import pytest

from heloguard.answers import Answer, Query, Status
from heloguard.lists import ip_query_name, parse_zone, read
from heloguard.logfmt import escape, redact


@pytest.mark.parametrize(
    ("text", "zone", "weight", "listed", "not_listed"),
    [
        ("zen.spamhaus.org", "zen.spamhaus.org", 1, ["127.0.0.2", "127.0.0.11", "127.1.2.3"], []),
        (
            "zen.spamhaus.org=127.0.0.[2..11]",
            "zen.spamhaus.org",
            1,
            ["127.0.0.2", "127.0.0.11"],
            ["127.0.0.12", "127.0.0.1"],
        ),
        (
            "bl.example=127.0.0.[2;4;10..11]*3",
            "bl.example",
            3,
            ["127.0.0.4", "127.0.0.10"],
            ["127.0.0.3"],
        ),
        ("bl.example=127.0.0.2*-2", "bl.example", -2, ["127.0.0.2"], ["127.0.0.3"]),
        ("BL.Example.=127.0.[0..1].2", "bl.example", 1, ["127.0.1.2", "127.0.0.2"], ["127.0.2.2"]),
    ],
)
def test_parse_zone(
    text: str, zone: str, weight: int, listed: list[str], not_listed: list[str]
) -> None:
    spec = parse_zone(text)
    assert spec.zone == zone and spec.weight == weight
    for code in listed:
        assert spec.matches(ipaddress.IPv4Address(code)), code
    for code in not_listed:
        assert not spec.matches(ipaddress.IPv4Address(code)), code


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "nodot",
        "bl.example=127.0.0",
        "bl.example=127.0.0.[300]",
        "bl.example=127.0.0.[5..2]",
        "bl.example*x",
        "bl example",
    ],
)
def test_parse_zone_rejects(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_zone(bad)


def test_query_names() -> None:
    assert (
        ip_query_name(ipaddress.ip_address("103.245.153.249"), "bl.test")
        == "249.153.245.103.bl.test"
    )
    v6 = ip_query_name(ipaddress.ip_address("2001:db8::1"), "bl.test")
    assert v6.startswith("1.0.0.0.0.0.0.0") and v6.endswith("8.b.d.0.1.0.0.2.bl.test")
    assert len(v6.split(".")) == 34


def answer(*codes: str, status: Status = Status.OK) -> Answer:
    return Answer(Query.of("x.bl.test", "A"), status, codes, ttl=60)


@pytest.mark.parametrize(
    "code",
    [
        "127.255.255.252",
        "127.255.255.254",
        "127.255.255.255",
        "127.0.1.255",
        "192.0.2.1",
        "10.0.0.2",
    ],
)
def test_error_codes_are_never_listings(code: str) -> None:
    spec = parse_zone("bl.test")  # no filter: any 127/8 would count
    r = read(answer(code), spec, "192.0.2.7")
    assert r.listed == () and len(r.errors) == 1 and not r.temp
    assert code in r.errors[0]


def test_listing_temp_and_absent() -> None:
    spec = parse_zone("bl.test=127.0.0.[2..11]")
    assert read(answer("127.0.0.2"), spec, "s").listed == (ipaddress.IPv4Address("127.0.0.2"),)
    assert read(answer("127.0.0.12"), spec, "s").listed == ()
    assert read(answer(status=Status.NXDOMAIN), spec, "s") == read(
        answer(status=Status.NODATA), spec, "s"
    )
    assert read(answer(status=Status.TEMP), spec, "s").temp
    mixed = read(answer("127.0.0.2", "127.255.255.254"), spec, "s")
    assert mixed.listed and mixed.errors


def test_query_key_never_printed() -> None:
    spec = parse_zone("abcdef0123456789abcd.zen.dq.spamhaus.net=127.0.0.[2..11]")
    assert spec.display == "zen.dq.spamhaus.net"
    leaked = "249.153.245.103.abcdef0123456789abcd.zen.dq.spamhaus.net/A=OK"
    assert "abcdef0123456789abcd" not in redact(leaked)
    assert "abcdef0123456789abcd" not in escape(leaked)
    assert "<key>" in redact(leaked)
