"""Property-based tests of everything that reads text an attacker or an admin writes.

HELO parsing and address literals (heloguard.names), the generic-name
classifier (heloguard.hostclass), log and reply escaping (heloguard.logfmt),
DNS list answers (heloguard.lists) and configuration parsing
(heloguard.config).  Each property holds for any input: nothing here may
raise on attacker text, and the admin's files either load into a sane
configuration or fail with a ConfigError that names the key.

The examples pinned with ``@example`` (and the regression tests at the end of
each part) are inputs that once got through.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import os
import re
import string
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from heloguard import logfmt
from heloguard.answers import Answer, Query, Status
from heloguard.config import (
    _SECTIONS,
    MAX_DURATION,
    Config,
    ConfigError,
    Duration,
    from_mapping,
    load,
    parse_duration,
    read_exception_file,
)
from heloguard.hostclass import Patterns, Verdict, classify
from heloguard.lists import ZoneSpec, parse_zone, read
from heloguard.logfmt import escape, for_reply, printable, redact, register_secret, reply_text
from heloguard.names import (
    MAX_NAME,
    HeloKind,
    canonical_address,
    hostname_problem,
    parse_address,
    parse_helo,
    registered_domain,
    same_registered_domain,
    to_ascii,
)
from heloguard.resolver import parse_nameserver
from heloguard.rules import REGISTRY
from heloguard.rules.base import Context, Outcome, Result

# No deadline: this machine has two cores and other tests run beside these.
# In CI the examples are derandomized, so a red run can be reproduced from its
# commit; locally every run explores new ones.
settings.register_profile(
    "heloguard-properties",
    deadline=None,
    max_examples=300,
    suppress_health_check=[HealthCheck.too_slow],
    derandomize=os.environ.get("CI") == "true",
)
PROFILE = settings.get_profile("heloguard-properties")
MANY = settings(PROFILE, max_examples=600)

PRINTABLE = re.compile(r"^[\x20-\x7e]*\Z")
GRAPHIC = re.compile(r"^[\x21-\x7e]*\Z")

# -- strategies ------------------------------------------------------------------

# Pieces of HELO arguments that parsers trip on, glued together at random.
FRAGMENTS = [
    "[",
    "]",
    "IPv6:",
    "ipv6:",
    "tag:",
    ":",
    "::",
    ".",
    "..",
    "%",
    "%s",
    "%n",
    "%%",
    "\n",
    "\r\n",
    "\r",
    "\x00",
    "\t",
    " ",
    "\\",
    '"',
    "'",
    "`",
    "$(id)",
    ";",
    "|",
    "<",
    ">",
    "=",
    "-",
    "_",
    "xn--",
    "localhost",
    "mail",
    "example",
    "com",
    "1",
    "255",
    "256",
    "0",
    "ffff",
    "db8",
    "2001",
    "192.0.2.1",
    "\u0661",  # ARABIC-INDIC DIGIT ONE
    "٣",
    "\uff11",  # FULLWIDTH DIGIT ONE
    "\uff0e",  # FULLWIDTH FULL STOP (an IDNA label separator)
    "ü",
    "ß",
    "\u202e",  # RIGHT-TO-LEFT OVERRIDE
    "\u200d",  # ZERO WIDTH JOINER
    "\ufeff",
    "\U0001f4e7",
    "a" * 63,
    "b" * 64,
    "c" * 255,
]
fragmented = st.lists(st.sampled_from(FRAGMENTS), max_size=12).map("".join)
hostile_text = st.one_of(st.text(max_size=300), fragmented)

LDH = string.ascii_lowercase + string.digits


@st.composite
def labels(draw: st.DrawFn, max_len: int = 63) -> str:
    """One valid LDH label: letters/digits at both ends, hyphens inside."""
    size = draw(st.integers(1, max_len))
    if size == 1:
        return draw(st.sampled_from(LDH))
    inner = draw(st.text(alphabet=LDH + "-", min_size=size - 2, max_size=size - 2))
    return draw(st.sampled_from(LDH)) + inner + draw(st.sampled_from(LDH))


@st.composite
def hostnames(draw: st.DrawFn) -> str:
    """A valid FQDN: 2+ labels, at most 253 characters, a top-level label not all digits."""
    tld = draw(labels(max_len=10).filter(lambda t: not t.isdigit()))
    names = [tld]
    for _ in range(draw(st.integers(1, 6))):
        label = draw(labels())
        if len(label) + 1 + len(".".join(names)) > MAX_NAME:
            break
        names.insert(0, label)
    return ".".join(names)


ipv4 = st.ip_addresses(v=4)
ipv6 = st.ip_addresses(v=6)
addresses = st.one_of(ipv4, ipv6)


def unescape(text: str) -> str:
    """Invert :func:`logfmt.escape` (without the truncation mark)."""
    out: list[str] = []
    i = 0
    while i < len(text):
        if text[i] != "\\":
            out.append(text[i])
            i += 1
            continue
        kind = text[i + 1]
        width = {"x": 2, "u": 4, "U": 8}[kind]
        out.append(chr(int(text[i + 2 : i + 2 + width], 16)))
        i += 2 + width
    return "".join(out)


def escaped_size(text: str) -> int:
    """How long escape() writes ``text`` when nothing is cut."""
    safe = set(map(chr, range(0x21, 0x7F))) - set("\\<>[]=")
    return sum(
        1 if ch in safe else 4 if ord(ch) < 0x100 else 6 if ord(ch) < 0x10000 else 10 for ch in text
    )


@contextmanager
def private_secrets() -> Iterator[None]:
    """Register secrets for one example without leaking them into other tests."""
    saved = set(logfmt._SECRETS)
    try:
        yield
    finally:
        logfmt._SECRETS.clear()
        logfmt._SECRETS.update(saved)


# -- HELO parsing and address literals ---------------------------------------------


@MANY
@given(hostile_text)
@example("mail\n.example.com")
@example("a.b\n.com")
@example("[1.2.3.4\n]")
@example("[١٠٣.٢٤٥.١٥٣.٢٤٩]")
@example("[IPv6:2001:db8::7%eth0]")
@example("[IPv6:::1%\nreject: HELO from x]")
def test_parse_helo_any_text_gives_a_consistent_kind(raw: str) -> None:
    helo = parse_helo(raw)
    assert helo.raw == raw
    assert isinstance(helo.kind, HeloKind)
    if helo.kind is HeloKind.FQDN:
        assert helo.name.isascii() and hostname_problem(helo.name) == ""
        assert re.fullmatch(r"[a-z0-9.-]{3,253}", helo.name), helo.name
        assert helo.address is None and helo.problem == ""
    elif helo.kind is HeloKind.LITERAL:
        text = raw.strip()
        assert text.startswith("[") and text.endswith("]") and text.isascii()
        assert helo.address is not None
        assert re.fullmatch(r"[0-9a-f:.]+", str(helo.address)), str(helo.address)
        assert helo.address == canonical_address(helo.address)
    else:
        assert helo.problem, helo
    if helo.address is not None and helo.kind is not HeloKind.BARE_IP:
        assert helo.kind is HeloKind.LITERAL


@given(ipv4)
def test_ipv4_literals_and_bare_addresses_round_trip(addr: ipaddress.IPv4Address) -> None:
    literal = parse_helo(f"[{addr}]")
    assert literal.kind is HeloKind.LITERAL and literal.address == addr
    bare = parse_helo(f" {addr} ")
    assert bare.kind is HeloKind.BARE_IP and bare.address == addr


@given(ipv6, st.sampled_from(["IPv6", "ipv6", "IPV6"]), st.booleans())
def test_ipv6_literals_round_trip(addr: ipaddress.IPv6Address, tag: str, exploded: bool) -> None:
    text = addr.exploded if exploded else str(addr)
    helo = parse_helo(f"[{tag}:{text}]")
    assert helo.kind is HeloKind.LITERAL
    assert helo.address == canonical_address(addr)


@given(ipv6, st.text(min_size=1, max_size=20))
def test_an_ipv6_zone_index_is_never_a_literal(addr: ipaddress.IPv6Address, zone: str) -> None:
    helo = parse_helo(f"[IPv6:{addr}%{zone}]")
    assert helo.kind is HeloKind.BAD_LITERAL, helo


@given(
    ipv4, st.sampled_from(["٠١٢٣٤٥٦٧٨٩", "".join(chr(0xFF10 + i) for i in range(10)), "०१२३४५६७८९"])
)
def test_non_ascii_digits_never_make_a_literal(addr: ipaddress.IPv4Address, digits: str) -> None:
    foreign = str(addr).translate(str.maketrans("0123456789", digits))
    assert parse_helo(f"[{foreign}]").kind is HeloKind.BAD_LITERAL


@given(hostnames(), st.sampled_from(["", " ", "\t", "  "]))
def test_valid_names_are_fqdns_whatever_the_case(name: str, pad: str) -> None:
    helo = parse_helo(pad + name.upper() + pad)
    assert helo.kind is HeloKind.FQDN, helo
    assert helo.name == name


@given(
    hostnames(),
    st.data(),
    st.sampled_from([c for c in map(chr, range(0x80)) if not (c.isalnum() or c in "-.")]),
)
def test_one_bad_character_spoils_a_name(name: str, data: st.DataObject, bad: str) -> None:
    # inside the name: str.strip() also strips \x1c-\x1f at the ends, harmlessly
    at = data.draw(st.integers(1, len(name) - 1))
    helo = parse_helo(name[:at] + bad + name[at:])
    assert helo.kind is not HeloKind.FQDN, helo


@given(st.sampled_from(["\n", "\r", "\x0b", "\x00", " ", "\t"]), hostnames(), st.data())
def test_whitespace_and_control_inside_a_name_spoil_it(
    bad: str, name: str, data: st.DataObject
) -> None:
    at = data.draw(st.integers(1, len(name) - 1))
    assert parse_helo(name[:at] + bad + name[at:]).kind is not HeloKind.FQDN


@given(hostile_text)
def test_name_helpers_never_raise(text: str) -> None:
    problem = hostname_problem(text)
    assert isinstance(problem, str)
    ascii_name = to_ascii(text)
    assert ascii_name is None or ascii_name.isascii()
    addr = parse_address(text)
    assert addr is None or addr == canonical_address(addr)
    reg = registered_domain(text)
    assert reg is None or isinstance(reg, str)
    assert isinstance(same_registered_domain(text, "example.com"), bool)


@pytest.mark.parametrize(
    ("raw", "kind"),
    [
        ("mail\n.example.com", HeloKind.INVALID),  # "$" matched before the newline
        ("[1.2.3.4\n]", HeloKind.BAD_LITERAL),
        ("[١٠٣.٢٤٥.١٥٣.٢٤٩]", HeloKind.BAD_LITERAL),  # \d matched Arabic-Indic digits
        ("[IPv6:2001:db8::7%eth0]", HeloKind.BAD_LITERAL),  # ipaddress takes a zone index
        ("[IPv6:::1%\nreject: x]", HeloKind.BAD_LITERAL),
    ],
)
def test_parser_regressions(raw: str, kind: HeloKind) -> None:
    assert parse_helo(raw).kind is kind


ADDR = ipaddress.ip_address("192.0.2.25")


@given(hostile_text)
def test_cost_zero_rules_answer_any_helo_with_a_sane_reply(raw: str) -> None:
    ctx = Context(client=ADDR, helo=parse_helo(raw))
    for rule in REGISTRY.values():
        if rule.cost != 0:
            continue
        result = rule.check(ctx, rule.options())
        assert isinstance(result, Result), rule.name
        if result.outcome is Outcome.FAIL:
            assert result.reply is not None and 500 <= result.reply.code < 600
            assert PRINTABLE.match(result.reply.text), (rule.name, result.reply.text)
            assert PRINTABLE.match(reply_text(result.reply.text))


# -- the generic-name classifier ------------------------------------------------------

KINDS = {
    "address",
    "address-like",
    "pool-word",
    "opaque-id",
    "cloud",
    "role",
    "extra",
    "exception",
    "plain",
}


@MANY
@given(hostile_text, st.one_of(st.none(), addresses))
def test_classify_never_raises(name: str, addr: ipaddress._BaseAddress | None) -> None:
    verdict = classify(name, addr)  # type: ignore[arg-type]
    assert isinstance(verdict, Verdict) and verdict.kind in KINDS
    assert isinstance(verdict.evidence, str)


@given(hostnames(), st.one_of(st.none(), addresses))
def test_classify_ignores_case_and_the_final_dot(
    name: str, addr: ipaddress._BaseAddress | None
) -> None:
    plain = classify(name, addr)  # type: ignore[arg-type]
    assert classify(name.upper() + ".", addr) == plain  # type: ignore[arg-type]


@given(ipv4, st.sampled_from(["-", ".", "_"]), st.sampled_from(["isp.example.net", "example.de"]))
def test_the_clients_own_octets_make_a_name_generic(
    addr: ipaddress.IPv4Address, sep: str, domain: str
) -> None:
    dashed = sep.join(str(addr).split("."))
    verdict = classify(f"host{sep}{dashed}.{domain}", addr)
    assert verdict.generic, verdict


@given(labels(), st.sampled_from(["com", "net", "co.uk", "com.au", "de"]), addresses)
def test_a_registered_domain_alone_is_never_generic(
    label: str, suffix: str, addr: ipaddress._BaseAddress
) -> None:
    assert not classify(f"{label}.{suffix}", addr).generic  # type: ignore[arg-type]


@given(hostile_text, st.one_of(st.none(), addresses))
def test_an_exception_pattern_always_wins(name: str, addr: ipaddress._BaseAddress | None) -> None:
    patterns = Patterns.compile(extra=[".*"], exceptions=[re.escape(name.rstrip(".").lower())])
    verdict = classify(name, addr, patterns)  # type: ignore[arg-type]
    assert not verdict.generic and verdict.kind == "exception"


# -- log and reply escaping ---------------------------------------------------------


@MANY
@given(hostile_text, st.integers(0, 600))
@example("x.example\r\nreject: HELO from fake[1.2.3.4]: 550 forged", 255)
@example("\\x0a", 512)
def test_escape_is_one_field_and_can_be_undone(text: str, limit: int) -> None:
    out = escape(text, limit)
    assert GRAPHIC.match(out), out  # no space, no CR/LF, no control or non-ASCII character
    assert not set(out) & set("<>[]="), out  # cannot close or open a field
    assert len(out) <= limit + 3
    plain = redact(text)
    if escaped_size(plain) <= limit:
        assert unescape(out) == plain  # nothing lost, nothing ambiguous
    else:
        assert out.endswith("...")
        assert plain.startswith(unescape(out[:-3]))


@given(hostile_text, st.integers(0, 600))
def test_printable_keeps_one_line(text: str, limit: int) -> None:
    out = printable(text, limit)
    assert PRINTABLE.match(out), out


@given(hostile_text, st.integers(4, 300))
def test_reply_texts_are_printable_and_percent_safe(text: str, limit: int) -> None:
    shown = for_reply(text, limit)
    assert PRINTABLE.match(shown) and len(shown) <= limit
    whole = reply_text(f"Invalid HELO/EHLO argument <{shown}>: {text}")
    assert PRINTABLE.match(whole)
    assert "%" not in whole.replace("%%", ""), whole  # libmilter drops a text with a lone %


@given(
    st.text(alphabet=string.ascii_letters + string.digits, min_size=8, max_size=40), hostile_text
)
def test_registered_secrets_never_appear(secret: str, text: str) -> None:
    with private_secrets():
        register_secret(secret)
        mixed = text + secret.swapcase() + text
        for out in (escape(mixed, 10_000), printable(mixed, 10_000), for_reply(mixed, 10_000)):
            assert secret.lower() not in out.lower()


# -- DNS list answers ---------------------------------------------------------------

FILTERS = [
    "bl.example",  # no filter: any 127/8 answer that is not an error
    "bl.example=127.[0..255].[0..255].[0..255]",  # a filter that lets everything through
    "bl.example=127.0.0.[0..255]*3",
    "bl.example=127.255.255.[0..255]",
]


# What is never a listing, written out here rather than taken from heloguard.lists:
# anything outside 127/8 (a parked or hijacked zone), Spamhaus's error range
# 127.255.255.0/24, 127.0.0.1 (RFC 5782 2.1; "query refused" at URIBL and
# others) and 127.0.1.255 (an IP address asked of a domain list).
NOT_LISTINGS = (
    ipaddress.IPv4Network("127.255.255.0/24"),
    ipaddress.IPv4Network("127.0.0.1/32"),
    ipaddress.IPv4Network("127.0.1.255/32"),
)


def list_answer(*codes: str) -> Answer:
    return Answer(Query.of("2.0.0.127.bl.example", "A"), Status.OK, tuple(codes), ttl=60)


@MANY
@given(ipv4, st.sampled_from(FILTERS))
@example(ipaddress.IPv4Address("127.0.0.1"), "bl.example")
@example(ipaddress.IPv4Address("127.255.255.253"), "bl.example")
@example(ipaddress.IPv4Address("127.255.255.254"), FILTERS[1])
def test_list_error_codes_are_never_listings(code: ipaddress.IPv4Address, zone: str) -> None:
    spec = parse_zone(zone)
    reading = read(list_answer(str(code)), spec, "192.0.2.1")
    is_error = code not in ipaddress.IPv4Network("127.0.0.0/8") or any(
        code in net for net in NOT_LISTINGS
    )
    if is_error:
        assert reading.listed == () and len(reading.errors) == 1, (code, reading)
    else:
        assert reading.errors == ()
        assert reading.listed == ((code,) if spec.matches(code) else ())


@pytest.mark.parametrize("text", [".", "bl.", ".bl", "a..b", "=127.0.0.2"])
def test_zones_without_two_labels_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="bad list zone"):
        parse_zone(text)


@pytest.mark.parametrize("code", ["127.0.0.1", "127.255.255.253", "127.255.255.0"])
def test_refused_and_reserved_codes_are_errors_not_listings(code: str) -> None:
    reading = read(list_answer(code, "127.0.0.2"), parse_zone("bl.example"), "192.0.2.1")
    assert reading.listed == (ipaddress.IPv4Address("127.0.0.2"),)
    assert len(reading.errors) == 1 and "not a listing" in reading.errors[0]


@given(hostile_text)
@example(".")
@example("bl.")
@example("a..b")
def test_zone_specs_parse_or_say_why(text: str) -> None:
    try:
        spec = parse_zone(text)
    except ValueError:
        return
    assert isinstance(spec, ZoneSpec) and "." in spec.zone
    assert all(spec.zone.split(".")), spec  # no empty label
    assert spec.octets is None or len(spec.octets) == 4


# -- configuration ------------------------------------------------------------------

toml_scalars = st.one_of(
    st.booleans(),
    st.integers(),
    st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=30),
    st.sampled_from(["5m", "500ms", "2d", "-1", "1e9", "inf", "nan", "0660", "unix:/x.sock"]),
)
toml_values = st.one_of(
    toml_scalars,
    st.lists(toml_scalars, max_size=3),
    st.dictionaries(st.sampled_from(["a", "zones", "action"]), toml_scalars, max_size=2),
)


def field_names(schema: type[Any]) -> list[str]:
    return [f.name for f in dataclasses.fields(schema)]


@st.composite
def config_tables(draw: st.DrawFn) -> dict[str, Any]:
    """A parsed TOML document: mostly known sections and keys, with hostile values."""
    doc: dict[str, Any] = {}
    for section, schema in _SECTIONS.items():
        if draw(st.booleans()):
            keys = [k for k in field_names(schema) if k != "files"]  # no file system here
            keys.append(draw(st.text(max_size=8)))
            table = draw(st.dictionaries(st.sampled_from(keys), toml_values, max_size=4))
            doc[section] = table
    if draw(st.booleans()):
        rules: dict[str, Any] = {}
        for name in draw(st.lists(st.sampled_from(sorted(REGISTRY)), max_size=3)):
            keys = ["action", *field_names(REGISTRY[name].options)]
            rules[name] = draw(st.dictionaries(st.sampled_from(keys), toml_values, max_size=3))
        doc["rules"] = rules
    if draw(st.booleans()):
        doc["greylist"] = draw(
            st.dictionaries(
                st.sampled_from(["delay", "retry_window", "expire", "ipv4_mask", "policy"]),
                toml_values,
                max_size=3,
            )
        )
    if draw(st.integers(0, 9)) == 0:
        doc[draw(st.text(max_size=8))] = draw(toml_values)
    return doc


def durations(section: Any) -> dict[str, float]:
    """The Duration fields of a config section, by name."""
    return {
        f.name: getattr(section, f.name)
        for f in dataclasses.fields(section)
        if f.type in (Duration, "Duration")
    }


def assert_sane(config: Config) -> None:
    """Every duration finite and bounded; the DNS budget and timeout positive."""
    found = {}
    for section in (config.dns, config.milter, config.greylist):
        if section is not None:
            found.update(
                {f"{type(section).__name__}.{k}": v for k, v in durations(section).items()}
            )
    assert "DnsConfig.budget" in found and "MilterConfig.timeout" in found  # the check checks
    for key, value in found.items():
        assert math.isfinite(value) and 0 <= value <= MAX_DURATION, (key, value)
    assert config.dns.budget > 0 and config.dns.timeout > 0


@PROFILE
@given(config_tables())
@example({"dns": {"budget": math.inf}})
@example({"dns": {"budget": math.nan}})
@example({"dns": {"timeout": 10**400}})
@example({"milter": {"timeout": 1e300}})
@example({"greylist": {"delay": "9" * 400}})
def test_config_loads_sane_or_names_the_problem(doc: dict[str, Any]) -> None:
    try:
        config = from_mapping(doc)
    except ConfigError as exc:
        assert str(exc)
        return
    assert_sane(config)


@pytest.mark.parametrize(
    "doc",
    [
        {"dns": {"budget": math.inf}},  # passed validation, then every callback raised
        {"dns": {"budget": math.nan}},
        {"dns": {"timeout": 1e400}},
        {"dns": {"budget": 10**12}},  # longer than threading.TIMEOUT_MAX
        {"milter": {"timeout": math.inf}},
        {"greylist": {"expire": 10**400}},
    ],
)
def test_non_finite_and_huge_durations_are_config_errors(doc: dict[str, Any]) -> None:
    with pytest.raises(ConfigError, match="finite"):
        from_mapping(doc)


@given(st.one_of(toml_values, st.text(max_size=20)))
@example(math.inf)
@example(10**400)
def test_durations_are_finite_or_rejected(value: object) -> None:
    try:
        seconds = parse_duration(value)
    except ValueError:
        return
    assert isinstance(seconds, float) and 0 <= seconds <= MAX_DURATION


@given(st.one_of(st.binary(max_size=400), fragmented.map(str.encode)))
@example(b"[dns]\nbudget = inf\n")
@example(b"[dns]\nbudget = nan\n")
@example(b"\xff\xfe[dns]")
@example(b"[milter]\ntimeout = 1e999\n")
def test_config_files_load_or_fail_with_a_config_error(content: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "heloguard.toml"
        path.write_bytes(content)
        try:
            config = load(path)
        except ConfigError as exc:
            assert str(path) in str(exc)
            return
        assert_sane(config)


@given(st.lists(st.one_of(hostile_text, st.sampled_from(["10.0.0.0/8", "Mail.Partner.Example."]))))
def test_exception_files_give_addresses_and_names_or_a_line_number(lines: list[str]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "exceptions.txt"
        path.write_text("\n".join(lines), encoding="utf-8", errors="surrogatepass")
        try:
            found_addresses, found_names = read_exception_file(str(path))
        except ConfigError as exc:
            assert str(path) in str(exc)
            return
    for entry in found_addresses:
        ipaddress.ip_network(entry, strict=False)
    for name in found_names:
        assert re.fullmatch(r"[a-z0-9.-]+", name) and "." in name and not name.endswith(".")


@given(hostile_text)
def test_nameservers_parse_or_say_why(text: str) -> None:
    try:
        host, port = parse_nameserver(text)
    except ValueError:
        return
    ipaddress.ip_address(host)
    assert 0 < port < 65536
