"""Hostile input through the real milter path: HELO text, PTR names, zone contents.

One ``heloguard serve`` (libmilter, pymilter, the real daemon) takes 10,000
HELO arguments from a seeded generator, over many milter connections in
parallel, with the test DNS server behind it.  Every argument must get a
well-formed milter reply (never a crash or a dropped connection), the daemon
must still serve at the end, and its log must hold exactly one line per
decision, with the attacker's text escaped so that no line can be forged.

Then the client's own DNS turns hostile: PTR names with control bytes, CR/LF,
escaped dots, 63-byte labels, 255-byte names, hundreds of PTR records, CNAME
loops, and a DNS list whose TXT record carries CR/LF and ``%``.  The zones are
built here from raw label bytes (dnspython escapes them for the zone text), in
198.18.7.0/24 and ``hostile.test``, which no other test uses.
"""

from __future__ import annotations

import concurrent.futures
import random
import re
import string
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import dns.name
import pytest
from miltertest import MilterClient, MilterReply, run_session

from heloguard.logfmt import escape

from conftest import run_cli
from dnsserver import DNSServer

pytestmark = pytest.mark.integration

GOOD: dict[str, Any] = {"ip": "64.71.1.10", "helo": "ukiah.firemountain.net"}

# -- the hostile zones --------------------------------------------------------------

REVERSE = "7.18.198.in-addr.arpa."
FORWARD = "hostile.test."
LIST_ZONE = "hostile-bl.test."
SOA = (
    "@ 300 IN SOA ns.hostile.test. hm.hostile.test. 1 7200 900 1209600 300\n"
    "@ IN NS ns.hostile.test.\n"
)


def host(*labels: bytes) -> str:
    """A name under hostile.test from raw label bytes, as master-file text (escaped)."""
    return dns.name.Name((*labels, b"hostile", b"test", b"")).to_text()


LABEL63 = b"a" * 63
# 63+63+63+48 bytes of labels under hostile.test: 255 octets on the wire, 253 as text
MAX_WIRE = (b"b" * 63, b"c" * 63, b"d" * 63, b"e" * 48)
MANY = 300  # PTR records for one address: far beyond a UDP answer, so TCP

PTRS: dict[int, list[str]] = {
    1: [host(b"ctl\x00\x01\x08\x0b\x1b\x7f")],
    2: [host(b"x\r\nreject: HELO from fake[1.2.3.4]: 550 forged")],
    3: [host(b"mail.partner")],  # an escaped dot: one label that looks like two
    4: [host(LABEL63)],
    5: [host(*MAX_WIRE)],
    6: [host(f"many-{i:03d}-".encode() + b"p" * 40) for i in range(MANY)],
    7: [host(b"good7")],
    8: [host(b"%s%n%x"), host(b"$(reboot)"), host(b"`id`;rm -rf /"), host(b'"q"\'<b>=&|')],
    9: [host(b"\xc3\xa9t\xc3\xa9"), host(b"\xff\xfe\xfd")],
    10: ["198.18.7.10."],  # an address where a name belongs
    11: ["11.7.18.198.in-addr.arpa."],  # itself
    13: ["."],  # the root
    14: [host(b"\xff" * 63)],  # 63 octets on the wire, 252 characters as text
    15: [host(b"_under_score_")],
    17: [host(b"MiXeD")],
}
EXTRA_REVERSE = """\
12 IN CNAME 12.7.18.198.in-addr.arpa.
16 IN TXT "an address with no PTR, only text"
"""
FORWARD_RECORDS = f"""\
ns IN A 198.18.7.250
{host(LABEL63)} IN A 198.18.7.4
{host(*MAX_WIRE)} IN A 198.18.7.5
good7 IN A 198.18.7.7
mixed IN A 198.18.7.17
"""
LIST_RECORDS = """\
7.7.18.198 IN A 127.0.0.2
7.7.18.198 IN TXT "listed\\013\\010550 5.7.1 forged second line" " %s%n%% \\"q\\" \\255\\000"
"""


def reverse_zone() -> str:
    lines = [f"{last} IN PTR {target}" for last, targets in PTRS.items() for target in targets]
    return "$TTL 300\n" + SOA + "\n".join(lines) + "\n" + EXTRA_REVERSE


@pytest.fixture
def hostile_dns(dns_server: DNSServer) -> DNSServer:
    """The session's DNS server, also serving the hostile zones (same content every time)."""
    dns_server.add_zone_text(REVERSE, reverse_zone())
    dns_server.add_zone_text(FORWARD, "$TTL 300\n" + SOA + FORWARD_RECORDS)
    dns_server.add_zone_text(LIST_ZONE, "$TTL 300\n" + SOA + LIST_RECORDS)
    return dns_server


# -- what a valid answer and a clean log look like ------------------------------------

REPLY = re.compile(r"^([45])\d\d \1\.\d{1,3}\.\d{1,3} [\x20-\x7e]+\Z")
LOG_PREFIX = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} heloguard\[(\d+)\]: (.*)\Z")
DECISION = re.compile(
    r"^(reject|tempfail|pass|warn|skip|greylist): (CONNECT|HELO|MAIL|RCPT) "
    r"from [!-~]+\[[0-9a-f.:]+\]: [\x20-\x7e]*\Z"
)
STATUS = re.compile(
    r"^(running as root: .*|heloguard \S+ listening on \S+|misconfiguration \(rule \w+\): .*"
    r'|running on CPUs? [\d,-]+( of [\d,-]+)? \(cpus = "[\w,-]+"\))\Z'
)
# pymilter's report of a HELO that is not UTF-8, written through heloguard's log
PYMILTER_DECODE = re.compile(
    r"^pymilter could not call back: UnicodeDecodeError: 'utf-8' codec can't decode bytes? "
    r"(0x[0-9a-f]{2} )?in position \d+(-\d+)?: [a-z ]+; answered per \[milter\] failure_policy\Z"
)
BANNER = re.compile(r"^heloguard: (listening on|Postfix main\.cf: ) ?\S.*\Z")


def assert_valid_reply(reply: MilterReply | None, what: object) -> None:
    """A milter reply the MTA can use: a step code, and for a reply a well-formed SMTP line."""
    assert reply is not None, what
    assert reply.code in ("c", "a", "y", "t", "r"), (what, reply)
    if reply.code == "y":
        assert REPLY.match(reply.text), (what, reply)
        assert "%" not in reply.text.replace("%%", ""), (what, reply)  # libmilter's rule


def log_messages(log: str) -> tuple[list[str], int]:
    """The daemon's own messages, checked line by line; and pymilter's decode errors.

    Every line is a heloguard log line (the timestamp prefix, then a decision,
    a known status message or pymilter's report of a HELO that is not UTF-8,
    all printable ASCII), or the start-up banner.
    """
    messages: list[str] = []
    decode_errors = 0
    for line in log.split("\n")[:-1]:  # the file ends with a newline
        assert "\r" not in line, line
        found = LOG_PREFIX.match(line)
        if found is None:
            assert BANNER.match(line), f"a line heloguard did not write: {line!r}"
            continue
        message = found.group(2)
        if PYMILTER_DECODE.match(message):
            decode_errors += 1
            continue
        assert DECISION.match(message) or STATUS.match(message), line
        messages.append(message)
    return messages, decode_errors


def helo_fields(messages: list[str]) -> list[str]:
    """The ``helo=<...>`` field of every HELO decision line."""
    out = []
    for message in messages:
        if " HELO from " in message.split(";", 1)[0]:
            found = re.search(r" helo=<([^<>]*)>", message)
            assert found is not None, message
            out.append(found.group(1))
    return out


def seen_by_heloguard(helo: str | bytes) -> str | None:
    """What heloguard's callback gets: up to the first NUL (libmilter's C string),
    and only if that is UTF-8 (pymilter answers anything else itself)."""
    raw = helo.encode() if isinstance(helo, str) else helo
    try:
        return raw.split(b"\0", 1)[0].decode("utf-8")
    except UnicodeDecodeError:
        return None


# -- 10,000 HELO arguments ------------------------------------------------------------

FORGED = "reject: HELO from fake[1.2.3.4]: 550 5.7.1 forged; helo=<x> rule=generic"
LINE_BREAKS = ["\n", "\r", "\r\n", "\n\n", "\x85", "\u2028", "\u2029", "\x0b", "\x0c", "\x1c"]
IDN = [
    "bücher.hostile.test",
    "mail.пример.испытание",
    "例え.テスト",
    "".join(chr(ord(c) + 0xFEE0) for c in "mail.example.com"),  # fullwidth, with U+FF0E dots
    "straße.de",
    "mail.\u202eliamg.com",
    "a\u0301.hostile.test",
    "\u200d.hostile.test",
    "\U0001f4e7.hostile.test",
    "-ü.hostile.test",
    "xn--zz.hostile.test",
    "xn--bcher-kva.hostile.test",
    "١٠٣.٢٤٥.١٥٣.٢٤٩",
    "mail.\ufeffexample.com",
]
PERCENT = [
    "%s%s%s%n",
    "%(asctime)s",
    "{0}{1!r}",
    "%",
    "%%",
    "mail%example.com",
    "%x%x%x%x",
    "%-99999d",
]
SHELL = [
    "$(reboot)",
    "`id`",
    "; rm -rf / ;",
    "| nc evil 25",
    "&& curl x",
    "> /etc/passwd",
    "${IFS}",
]
QUOTES = ['"', "'", "`", '\\"', "\\", "''", '"mail.example.com"', "'; DROP TABLE x; --"]
LITERALS = [
    "[]",
    "[ ]",
    "[1.2.3]",
    "[1.2.3.4.5]",
    "[256.1.1.1]",
    "[1.2.3.4",
    "1.2.3.4]",
    "[[1.2.3.4]]",
    "[64.71.1.10]",
    "[103.245.153.249]",
    "[IPv6:2600:3c00::10]",
    "[IPv6:::ffff:64.71.1.10]",
    "[IPv6:zzzz::1]",
    "[IPv6:1:2:3:4:5:6:7:8:9]",
    "[IPv6:2600:3c00::10%eth0]",
    "[IPv6:::1%\nreject: x]",
    "[tag:content]",
    "[::1]",
    "[١٠٣.٢٤٥.١٥٣.٢٤٩]",
    "[01.02.03.04]",
    "[0x40.0x47.1.10]",
    "[1.2.3.4\n]",
    "64.71.1.10",
    "2600:3c00::10",
]
INVALID_UTF8 = [
    b"\xff",
    b"\xfe",
    b"\xc0\xaf",
    b"\xed\xa0\x80",
    b"\x80",
    b"\xe2\x82",
    b"\xf8\x88\x80\x80\x80",
]


def ldh(rng: random.Random, size: int) -> str:
    return "".join(rng.choice(string.ascii_lowercase + string.digits) for _ in range(size))


def valid_name(rng: random.Random) -> str:
    labels = [ldh(rng, rng.randint(1, 20)) for _ in range(rng.randint(1, 3))]
    return ".".join([*labels, rng.choice(["hostile.test", "firemountain.net", "example.invalid"])])


def insert(rng: random.Random, text: str, piece: str) -> str:
    at = rng.randint(0, len(text))
    return text[:at] + piece + text[at:]


def g_overlong(rng: random.Random) -> str:
    kind = rng.randrange(3)
    if kind == 0:
        return "a" * rng.randint(254, 4000) + ".hostile.test"
    if kind == 1:
        return ".".join(["x" * 63] * rng.randint(5, 60))
    return ldh(rng, rng.randint(256, 8000))


def g_control(rng: random.Random) -> str:
    text = valid_name(rng)
    for _ in range(rng.randint(1, 4)):
        text = insert(rng, text, chr(rng.choice([*range(0x20), 0x7F])))
    return text


def g_crlf(rng: random.Random) -> str:
    return valid_name(rng) + rng.choice(LINE_BREAKS) + FORGED


def g_non_utf8(rng: random.Random) -> bytes:
    raw = valid_name(rng).encode()
    at = rng.randint(0, len(raw))
    return raw[:at] + rng.choice(INVALID_UTF8) + raw[at:]


def g_idn(rng: random.Random) -> str:
    return rng.choice(IDN)


def g_quotes(rng: random.Random) -> str:
    return insert(rng, valid_name(rng), rng.choice(QUOTES))


def g_percent(rng: random.Random) -> str:
    return insert(rng, valid_name(rng), rng.choice(PERCENT))


def g_shell(rng: random.Random) -> str:
    return rng.choice([insert(rng, valid_name(rng), rng.choice(SHELL)), rng.choice(SHELL)])


def g_literal(rng: random.Random) -> str:
    kind = rng.randrange(3)
    if kind == 0:
        return rng.choice(LITERALS)
    if kind == 1:
        return "[" + ".".join(str(rng.randint(0, 999)) for _ in range(rng.randint(2, 5))) + "]"
    groups = ":".join(f"{rng.randint(0, 0x1FFFF):x}" for _ in range(rng.randint(2, 9)))
    return f"[IPv6:{groups}]"


def g_labels(rng: random.Random) -> str:
    size = rng.choice([63, 64, 255])
    name = "m" * size + ".hostile.test"
    if rng.random() < 0.3:  # a 253-character name, the longest valid one, or one more
        name = ".".join(["n" * 63] * 3 + ["o" * rng.choice([48, 49])]) + ".hostile.test"
    return name


def g_valid(rng: random.Random) -> str:
    return rng.choice(
        [valid_name(rng), str(GOOD["helo"]), "localhost", "mailserver", "", " ", "\t"]
    )


GENERATORS: dict[str, Callable[[random.Random], str | bytes]] = {
    "overlong": g_overlong,
    "control": g_control,
    "crlf": g_crlf,
    "non_utf8": g_non_utf8,
    "idn": g_idn,
    "quotes": g_quotes,
    "percent": g_percent,
    "shell": g_shell,
    "literal": g_literal,
    "labels": g_labels,
    "valid": g_valid,
}


def g_mixed(rng: random.Random) -> str:
    parts = [GENERATORS[k](rng) for k in rng.sample(sorted(GENERATORS), 3)]
    return "".join(p if isinstance(p, str) else p.decode("utf-8", "replace") for p in parts)


GENERATORS["mixed"] = g_mixed


def hostile_helos(seed: int, count: int) -> list[tuple[str, str | bytes]]:
    """``count`` (category, argument) pairs, every category in turn."""
    rng = random.Random(seed)
    kinds = sorted(GENERATORS)
    return [(kinds[i % len(kinds)], GENERATORS[kinds[i % len(kinds)]](rng)) for i in range(count)]


# Clients: a good server, a bot, IPv6, hostile PTR names, a 63-byte verified name.
CLIENTS = [
    "64.71.1.10",
    "103.245.153.249",
    "2600:3c00::10",
    "64.71.1.66",
    "198.18.7.4",
    "198.18.7.2",
]
COUNT = 10_000
WORKERS = 4


def drive(socket: str, batch: list[tuple[str, list[str | bytes]]]) -> list[tuple[Any, Any]]:
    """One worker: a milter connection per item, several HELOs on it (as EHLO after STARTTLS)."""
    out: list[tuple[Any, Any]] = []
    for ip, helos in batch:
        with MilterClient(socket) as c:
            c.negotiate()
            c.connect(ip, macros={"{daemon_name}": "mx", "j": "mx.example.test"})
            out.extend((helo, c.helo(helo)) for helo in helos)
            c.quit()
    return out


def test_ten_thousand_hostile_helos_get_valid_replies_and_clean_logs(
    start_milter: Any, hostile_dns: DNSServer
) -> None:
    helos = hostile_helos(seed=8, count=COUNT)
    assert {k for k, _ in helos} == set(GENERATORS)
    rng = random.Random(9)
    connections: list[tuple[str, list[str | bytes]]] = []
    rest = [h for _, h in helos]
    while rest:
        take = rng.randint(1, 8)
        connections.append((rng.choice(CLIENTS), rest[:take]))
        rest = rest[take:]
    m = start_milter()
    with concurrent.futures.ThreadPoolExecutor(WORKERS) as pool:
        parts = pool.map(
            drive, [m.socket] * WORKERS, [connections[i::WORKERS] for i in range(WORKERS)]
        )
        results = [r for part in parts for r in part]

    assert len(results) == COUNT
    for helo, reply in results:
        assert_valid_reply(reply, helo)
        if seen_by_heloguard(helo) is None:  # not UTF-8: pymilter answers, heloguard never sees it
            assert reply.text.startswith("451 4.3.0 "), (helo, reply)
    assert m.proc.poll() is None, "the daemon died"
    assert run_session(m.socket, **GOOD).refusal() is None, "the daemon must keep judging"

    seen = [s for s in (seen_by_heloguard(h) for h, _ in results) if s is not None]
    expected = Counter(escape(s, 255) for s in seen)
    deadline = time.monotonic() + 10
    while True:  # each line is written before its reply; allow for the file's buffering
        messages, decode_errors = log_messages(m.log())
        fields = helo_fields(messages)
        if len(fields) >= len(seen) + 1 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert decode_errors == COUNT - len(seen), "one pymilter report per non-UTF-8 HELO"
    assert len(fields) == len(seen) + 1, "exactly one decision line per HELO (and the last check)"
    fields.remove(escape(GOOD["helo"], 255))
    assert Counter(fields) == expected, "every HELO logged once, escaped, nothing else"
    for message in messages:
        assert not message.startswith("reject: HELO from fake"), message
        assert "Traceback" not in message and "callback failed" not in message, message
        for key in (" helo=<", " rule=", " evidence=", " dns="):
            assert message.count(key) <= 1, f"a forged {key.strip()} field: {message}"

    # The decision records carry the hostile text too: 1,000 of them, spread over
    # the run, replay offline to the identical verdict.  (conftest's teardown would
    # replay all 10,000, one at a time, for about ten seconds.)
    m.replayable = False
    records = (m.workdir / "decisions.jsonl").read_text().splitlines()
    assert len(records) == len(seen) + 2  # and the last check's HELO and MAIL
    sample = records[:: len(records) // 1000]
    (m.workdir / "sample.jsonl").write_text("\n".join(sample) + "\n")
    res = run_cli(
        *("check", "--json", "--config", str(m.config_path), "--nameserver", "127.0.0.1:9"),
        *("--replay", str(m.workdir / "sample.jsonl")),
    )
    replays = res.lines()
    assert res.code in (0, 4, 5) and len(replays) == len(sample), (res.code, res.stderr)
    assert all(r["replay"]["identical"] for r in replays), [r["replay"] for r in replays]


def test_a_helo_cannot_forge_log_fields_or_split_lines(start_milter: Any) -> None:
    """The reply quoted in a decision line carries the HELO with only unprintables
    replaced: its "=" must not make a field.  pymilter's report of a HELO that is
    not UTF-8 goes through the log too, one whole line, never spliced into another."""
    m = start_milter()
    forged = "x helo=<ukiah.firemountain.net> rule=none evidence=forged"
    r = run_session(m.socket, ip="103.245.153.249", helo=forged)
    assert r.helo is not None and r.helo.text.startswith("550 5.5.2 "), r.helo
    assert "helo=<ukiah" in r.helo.text, "the SMTP reply itself is unchanged"
    r = run_session(m.socket, ip="103.245.153.249", helo=b"\xffreject: HELO from fake")
    assert r.helo is not None and r.helo.text.startswith("451 4.3.0 "), r.helo
    messages, decode_errors = log_messages(m.wait_for("pymilter could not call back"))
    assert decode_errors == 1
    (line,) = [x for x in messages if x.startswith("reject: HELO from")]
    assert helo_fields([line]) == [escape(forged, 255)]
    assert line.count(" rule=") == 1 and " rule=helo_syntax " in line, line
    assert "evidence=forged" not in line


# -- hostile PTR names and zone contents ---------------------------------------------


def test_hostile_ptr_names_get_valid_replies_and_escaped_logs(
    start_milter: Any, hostile_dns: DNSServer
) -> None:
    m = start_milter()
    clients = [f"198.18.7.{last}" for last in (*sorted(PTRS), 12, 16)]
    for ip in clients:
        for helo in ("good7.hostile.test", f"[{ip}]"):
            r = run_session(m.socket, ip=ip, helo=helo)
            assert_valid_reply(r.helo, (ip, helo))
            assert r.helo is not None
            if r.helo.code == "c":
                assert_valid_reply(r.mail, (ip, helo))
                assert r.mail is not None
                if r.mail.code == "c":
                    assert_valid_reply(r.rcpt, (ip, helo))
    assert run_session(m.socket, **GOOD).refusal() is None
    messages, _ = log_messages(m.wait_for("pass: HELO from ukiah.firemountain.net[64.71.1.10]"))
    for ip in clients:
        lines = [x for x in messages if f"[{ip}]" in x]
        assert len(lines) >= 2, (ip, messages)
        for message in lines:
            assert re.match(r"^\w+: \w+ from [!-~]+\[", message), message
    assert not [x for x in messages if x.startswith("reject: HELO from fake")]


def test_what_hostile_ptr_names_earn(start_milter: Any, hostile_dns: DNSServer) -> None:
    """Names that are no host names are never looked up; a 63-byte label and a
    255-octet name are ordinary names; 300 PTR records cost at most max_names
    forward questions; a CNAME loop is a temporary failure, not a rejection."""
    m = start_milter()

    def helo_reply(last: int, helo: str = "good7.hostile.test") -> MilterReply:
        r = run_session(m.socket, ip=f"198.18.7.{last}", helo=helo)
        assert r.helo is not None
        return r.helo

    hostile_dns.reset_log()
    for last in (1, 2, 3, 8, 9, 10, 13, 14):
        reply = helo_reply(last)
        assert reply.smtp_code == 550 and "5.7.25" in reply.text, (last, reply)
    asked = [q for q in hostile_dns.queries() if q.qtype in ("A", "AAAA")]
    assert not [q for q in asked if "\\" in q.name or q.name[:1].isdigit()], asked

    for last, name in ((4, host(LABEL63)), (5, host(*MAX_WIRE)), (17, "mixed.hostile.test.")):
        assert helo_reply(last, name.rstrip(".")).code == "c", last
        m.wait_for(f"pass: HELO from {name.rstrip('.').lower()}[198.18.7.{last}]")

    hostile_dns.reset_log()
    reply = helo_reply(6)
    assert reply.smtp_code == 550 and "5.7.25" in reply.text
    ptr = [q for q in hostile_dns.queries() if q.qtype == "PTR"]
    assert "tcp" in {q.transport for q in ptr}, "300 PTR records do not fit in UDP"
    forward = {q.name for q in hostile_dns.queries() if q.qtype == "A"}
    assert len([n for n in forward if n.startswith("many-")]) <= 10

    loop = helo_reply(12)
    assert loop.smtp_code is not None and loop.smtp_code // 100 == 4, loop


def test_hostile_dnsbl_txt_cannot_split_the_reply(
    start_milter: Any, hostile_dns: DNSServer
) -> None:
    m = start_milter({"rules": {"dnsbl": {"zones": ["hostile-bl.test"], "txt": True}}})
    r = run_session(m.socket, ip="198.18.7.7", helo="good7.hostile.test")
    assert_valid_reply(r.helo, "dnsbl txt")
    assert r.helo is not None
    head = "554 5.7.1 Service unavailable; client [198.18.7.7] blocked using hostile-bl.test; "
    assert r.helo.text.startswith(head + "listed??550 5.7.1 forged second line"), r.helo
    assert "%%s%%n%%%%" in r.helo.text, r.helo  # every % doubled for libmilter
    messages, _ = log_messages(m.wait_for("reject: HELO from good7.hostile.test"))
    assert not any(x.startswith("550 5.7.1 forged") for x in messages)


def test_hostile_ptr_in_the_dry_run_transcript(cli: Any, hostile_dns: DNSServer) -> None:
    res = cli("check", "--ip", "198.18.7.2", "--helo", "x.hostile.test\r\n" + FORGED)
    assert res.code == 5, res.stderr
    assert "\r" not in res.stdout
    lines = res.stdout.split("\n")
    assert not [x for x in lines if x.startswith(("reject:", "550 5.7.1 forged"))], res.stdout
    assert all(re.fullmatch(r"[\x20-\x7e]*", x) for x in lines), res.stdout


def test_oversized_milter_command_drops_only_that_connection(start_milter: Any) -> None:
    """libmilter answers a 65,000-byte HELO; a command over 64 KiB (no MTA sends one)
    makes libmilter close that connection, and the daemon serves the next."""
    m = start_milter()
    r = run_session(m.socket, ip="64.71.1.10", helo="y" * 65_000)
    assert_valid_reply(r.helo, "65000 bytes")
    assert r.helo is not None and r.helo.text.startswith("550 5.5.2 ")
    with MilterClient(m.socket) as c, pytest.raises(ConnectionError):
        c.negotiate()
        c.connect("64.71.1.10", macros={"{daemon_name}": "mx"})
        c.helo("z" * 70_000)
    assert m.proc.poll() is None
    assert run_session(m.socket, **GOOD).refusal() is None


def test_replay_keeps_the_sender_as_the_milter_saw_it(start_milter: Any) -> None:
    """A decision record holds the sender with its brackets removed; the replay
    must not strip it again (conftest's teardown replays every record too)."""
    m = start_milter()
    for sender in ("x@ ", "<a@firemountain.net>", " y@gsp.org"):
        with MilterClient(m.socket) as c:
            c.negotiate()
            c.connect(GOOD["ip"], macros={"{daemon_name}": "mx"})
            c.helo(GOOD["helo"])
            assert_valid_reply(c.mail(sender, macros={"{auth_authen}": ""}), sender)
            c.quit()
    records = m.workdir / "decisions.jsonl"
    m.wait_for("from=<\\x20y@gsp.org>")
    res = run_cli(
        "check",
        "--json",
        "--config",
        str(m.config_path),
        "--replay",
        str(records),
        "--nameserver",
        "127.0.0.1:9",
    )
    replays = res.lines()
    assert len(replays) == len(records.read_text().splitlines()) == 6, res.stderr
    assert all(r["replay"]["identical"] for r in replays), [r["replay"] for r in replays]


SENDERS = [
    "a@b",
    "<>",
    "",
    "@",
    "user@",
    "@hostile.test",
    "x@[1.2.3.4]",
    "x@[IPv6:::1%\nreject: HELO from fake]",
    "x@hostile.test\r\nreject: MAIL from fake[1.2.3.4]: 550 forged",
    "x@%s%n.example",
    "x@$(reboot).example",
    "x@bücher.hostile.test",
    "x@" + "a" * 300 + ".hostile.test",
    '"quoted local"@hostile.test',
    "x@xn--zz.hostile.test",
    "x@\udcff.hostile.test",  # not UTF-8 on the wire (surrogateescape)
]


def test_hostile_mail_from_gets_valid_replies(start_milter: Any, hostile_dns: DNSServer) -> None:
    rng = random.Random(11)
    senders = SENDERS + [
        f"{ldh(rng, 5)}@{h.decode('utf-8', 'replace') if isinstance(h, bytes) else h}"
        for _, h in hostile_helos(seed=12, count=200)
    ]
    m = start_milter()
    replies = []
    with MilterClient(m.socket) as c:
        c.negotiate()
        c.connect(GOOD["ip"], macros={"{daemon_name}": "mx"})
        assert c.helo(GOOD["helo"]) == MilterReply("c")
        for sender in senders:
            replies.append((sender, c.mail(sender, macros={"{auth_authen}": ""})))
            c.abort()
        c.quit()
    for sender, reply in replies:
        assert_valid_reply(reply, sender)
    assert m.proc.poll() is None
    messages, _ = log_messages(m.log())
    assert not [
        x for x in messages if x.startswith(("reject: MAIL from fake", "reject: HELO from fake"))
    ]
