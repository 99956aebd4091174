"""Host names, HELO arguments and addresses: parsing and comparison, no I/O.

Everything here reads attacker-controlled text (the HELO argument, PTR names
from the client's own reverse zone), so each function accepts any string and
answers with a value; none raises on bad input.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from enum import StrEnum
from functools import lru_cache

from publicsuffixlist import PublicSuffixList

from heloguard.answers import IPAddress, normalize_name

# RFC 5321 4.1.2: sub-domain = Let-dig [Ldh-str]; a label is 1-63 octets.
# \Z, not $: "$" also matches before a final newline ("mail\n" would pass).
_LABEL = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\Z")
_ALL_DIGITS = re.compile(r"^[0-9]+\Z")
# A bare address written without brackets, as many bots do.  ASCII digits only
# (RFC 5321 Snum): ``\d`` would also match other scripts' digits (Arabic-Indic...).
_BARE_V4 = re.compile(r"^[0-9]{1,3}(?:\.[0-9]{1,3}){3}\Z")
MAX_NAME = 253  # text form of a 255-octet wire name without the trailing dot
LOCALHOST_NAMES = frozenset({"localhost", "localhost.localdomain", "localhost6"})


class HeloKind(StrEnum):
    """What a HELO argument is, syntactically."""

    FQDN = "fqdn"
    LITERAL = "literal"  # [1.2.3.4], [IPv6:...], a usable address literal
    BAD_LITERAL = "bad_literal"  # bracketed but not a valid address literal
    BARE_IP = "bare_ip"  # 1.2.3.4 without brackets
    SINGLE_LABEL = "single_label"
    LOCALHOST = "localhost"
    EMPTY = "empty"
    INVALID = "invalid"


@dataclass(frozen=True, slots=True)
class Helo:
    """A parsed HELO/EHLO argument."""

    raw: str
    kind: HeloKind
    name: str = ""  # normalized A-label form, for FQDN (and SINGLE_LABEL/LOCALHOST)
    address: IPAddress | None = None  # for LITERAL and BARE_IP
    problem: str = ""  # why it is not acceptable, for the evidence

    @property
    def is_name(self) -> bool:
        """True when the argument is a usable fully qualified domain name."""
        return self.kind is HeloKind.FQDN


def canonical_address(addr: IPAddress) -> IPAddress:
    """Turn an IPv4-mapped IPv6 address (::ffff:1.2.3.4) into plain IPv4."""
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def parse_address(text: str) -> IPAddress | None:
    """Parse an IPv4 or IPv6 address; None when it is not one."""
    try:
        return canonical_address(ipaddress.ip_address(text.strip()))
    except ValueError:
        return None


def reverse_name(addr: IPAddress) -> str:
    """The in-addr.arpa / ip6.arpa name of an address, without the trailing dot."""
    return canonical_address(addr).reverse_pointer.lower()


def to_ascii(name: str) -> str | None:
    """The A-label form of a (possibly internationalized) name, or None."""
    if name.isascii():
        return name.lower()
    try:
        return name.encode("idna").decode("ascii").lower()
    except (UnicodeError, ValueError):
        return None


def hostname_problem(name: str) -> str:
    """Why ``name`` is not a syntactically valid FQDN; "" when it is one.

    Valid means RFC 5321 4.1.2 Domain syntax in A-label form: at least two
    labels of letters, digits and inner hyphens, 1-63 octets each, at most
    253 characters, and a top-level label that is not all digits.
    """
    if not name:
        return "empty name"
    if len(name) > MAX_NAME:
        return f"name longer than {MAX_NAME} characters"
    labels = name.split(".")
    if len(labels) < 2:
        return "not fully qualified (a single label)"
    for label in labels:
        if not label:
            return "empty label"
        if len(label) > 63:
            return "label longer than 63 characters"
        if not _LABEL.match(label):
            return f"label {label[:63]!r} has characters outside letters, digits and hyphen"
    if _ALL_DIGITS.match(labels[-1]):
        return "top-level label is numeric"
    return ""


def is_hostname(name: str) -> bool:
    """True when ``name`` is a valid fully qualified host name."""
    return not hostname_problem(name)


def _parse_literal(raw: str) -> Helo:
    inner = raw[1:-1]
    if ":" in inner:
        tag, _, rest = inner.partition(":")
        if tag.lower() == "ipv6":
            if "%" in rest:  # ipaddress accepts a zone index (any text); RFC 5321 has none
                return Helo(raw, HeloKind.BAD_LITERAL, problem="malformed IPv6 address literal")
            try:
                v6 = ipaddress.IPv6Address(rest)
            except ValueError:
                return Helo(raw, HeloKind.BAD_LITERAL, problem="malformed IPv6 address literal")
            return Helo(raw, HeloKind.LITERAL, address=canonical_address(v6))
        return Helo(raw, HeloKind.BAD_LITERAL, problem="general address literal is not usable")
    if not _BARE_V4.match(inner):
        return Helo(raw, HeloKind.BAD_LITERAL, problem="malformed IPv4 address literal")
    try:
        v4 = ipaddress.IPv4Address(".".join(str(int(p)) for p in inner.split(".")))
    except ValueError:
        return Helo(raw, HeloKind.BAD_LITERAL, problem="malformed IPv4 address literal")
    return Helo(raw, HeloKind.LITERAL, address=v4)


def parse_helo(raw: str) -> Helo:
    """Classify a HELO/EHLO argument (RFC 5321 4.1.1.1: a domain or an address literal)."""
    text = raw.strip()
    if not text:
        return Helo(raw, HeloKind.EMPTY, problem="empty HELO argument")
    if text.startswith("[") and text.endswith("]"):
        return _parse_literal(text)
    if _BARE_V4.match(text) or (":" in text and parse_address(text) is not None):
        return Helo(
            raw,
            HeloKind.BARE_IP,
            address=parse_address(text),
            problem="bare IP address; an address must be a literal such as [192.0.2.1]",
        )
    ascii_name = to_ascii(text)
    if ascii_name is None:
        return Helo(raw, HeloKind.INVALID, problem="not a valid internationalized domain name")
    name = normalize_name(ascii_name) if ascii_name.endswith(".") else ascii_name
    if ascii_name.endswith("."):
        # RFC 5321 Domain syntax has no trailing dot; judge the name, note the dot.
        return Helo(raw, HeloKind.INVALID, name=name, problem="trailing dot is not allowed")
    if name in LOCALHOST_NAMES or name.endswith(".localhost"):
        return Helo(raw, HeloKind.LOCALHOST, name=name, problem="localhost is not a name")
    problem = hostname_problem(name)
    if problem.startswith("not fully qualified"):
        return Helo(raw, HeloKind.SINGLE_LABEL, name=name, problem=problem)
    if problem:
        return Helo(raw, HeloKind.INVALID, name=name, problem=problem)
    return Helo(raw, HeloKind.FQDN, name=name)


@lru_cache(maxsize=1)
def _psl() -> PublicSuffixList:
    return PublicSuffixList()


@lru_cache(maxsize=1)
def _psl_icann() -> PublicSuffixList:
    return PublicSuffixList(only_icann=True)


@lru_cache(maxsize=8192)
def registered_domain(name: str) -> str | None:
    """The registered domain of ``name`` by the Public Suffix List, or None.

    ``mail.example.co.uk`` gives ``example.co.uk``.  A name that is itself a
    public suffix (``co.uk``, or ``ec2-1-2-3-4.compute-1.amazonaws.com``, which
    the list's private section makes one) gives None: it shares no registered
    domain with anything.  An unknown top-level domain counts as a public
    suffix, so names in test and private zones still have a registered domain.
    """
    name = normalize_name(name)
    if not name or "." not in name:
        return None
    found = _psl().privatesuffix(name)
    return str(found) if found is not None else None


@lru_cache(maxsize=16384)
def registered_domain_icann(name: str) -> str | None:
    """The registered domain by the ICANN section of the list only.

    ``ec2-1-2-3-4.compute-1.amazonaws.com`` gives ``amazonaws.com`` here (the
    private section makes the whole name a public suffix), which is what the
    generic-name rule needs: the provider's own labels stay visible.
    """
    name = normalize_name(name)
    if not name or "." not in name:
        return None
    found = _psl_icann().privatesuffix(name)
    return str(found) if found is not None else None


def labels_left_of_registered(name: str) -> str:
    """The part of ``name`` left of its registered domain (ICANN list; "" if none)."""
    name = normalize_name(name)
    reg = registered_domain_icann(name)
    if reg is None or reg == name:
        return ""
    return name[: -(len(reg) + 1)]


def same_registered_domain(a: str, b: str) -> bool:
    """True when both names have the same, known registered domain."""
    ra = registered_domain(a)
    return ra is not None and ra == registered_domain(b)
