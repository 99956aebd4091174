"""DNS lists (DNSBL, RHSBL, DNSWL): zone specifications and reading their answers.

A zone is written as Postfix writes it: ``zone[=filter][*weight]``, for
example ``zen.spamhaus.org=127.0.0.[2..11]*2``.  A filter has four octets,
each a number, ``[n..m]``, or a list ``[2;4;10..11]``.  Without a filter, any
answer in 127.0.0.0/8 that is not an error code is a listing.

Answers that are errors, not listings, are never counted, whatever the
filter: ``127.255.255.252`` (typing error in the zone name),
``127.255.255.254`` (query through a public or unregistered resolver),
``127.255.255.255`` (too many queries), any other ``127.255.255.x`` (the
range Spamhaus reserves for error codes), ``127.0.0.1`` (RFC 5782 2.1: never a
listing; URIBL and others answer it for a refused query), ``127.0.1.255`` (an
IP address queried against a domain list), and anything outside 127.0.0.0/8
(a zone that expired and was parked, or a hijacked one).  Each is reported as a
misconfiguration for the log and the counters.

A zone name may embed an access key (``KEY.zen.dq.spamhaus.net``): the key
label is registered as a secret, and :func:`heloguard.logfmt.redact` keeps it
out of replies, logs and JSON.  The displayed name drops it.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from functools import lru_cache

from heloguard.answers import Answer, IPAddress
from heloguard.logfmt import register_secret

ERROR_CODES = frozenset(
    ipaddress.IPv4Address(a)
    for a in ("127.255.255.252", "127.255.255.254", "127.255.255.255", "127.0.1.255", "127.0.0.1")
)
ERROR_NET = ipaddress.IPv4Network("127.255.255.0/24")  # every code in it is an error
ERROR_MEANING = {
    ipaddress.IPv4Address("127.255.255.252"): "typing error in the zone name",
    ipaddress.IPv4Address("127.255.255.254"): "queried through a public or unregistered resolver",
    ipaddress.IPv4Address("127.255.255.255"): "too many queries",
    ipaddress.IPv4Address("127.0.1.255"): "an IP address queried against a domain list",
    ipaddress.IPv4Address("127.0.0.1"): "query refused (RFC 5782: 127.0.0.1 is never a listing)",
}
LOOPBACK_NET = ipaddress.IPv4Network("127.0.0.0/8")
_ZONE = re.compile(r"^([a-z0-9_.-]+?)(?:=([0-9.;\[\]]+))?(?:\*(-?\d+))?$")
_KEY_LABEL = re.compile(r"^[a-z0-9]{16,}$")

OctetSet = frozenset[int]


@dataclass(frozen=True, slots=True)
class ZoneSpec:
    """One list zone: where to ask, which answers count, with what weight."""

    zone: str
    display: str
    octets: tuple[OctetSet, ...] | None  # None: any non-error 127/8 answer
    weight: int = 1

    def matches(self, code: ipaddress.IPv4Address) -> bool:
        """True when ``code`` is a listing under this zone's filter."""
        if self.octets is None:
            return True
        return all(b in allowed for b, allowed in zip(code.packed, self.octets, strict=True))


def _octet(text: str) -> OctetSet:
    if text.startswith("[") and text.endswith("]"):
        out: set[int] = set()
        for item in text[1:-1].split(";"):
            lo, sep, hi = item.partition("..")
            if not lo.isdigit() or (sep and not hi.isdigit()):
                raise ValueError(f"bad octet range {item!r}")
            start, end = int(lo), int(hi) if sep else int(lo)
            if not 0 <= start <= end <= 255:
                raise ValueError(f"octet range {item!r} outside 0..255")
            out.update(range(start, end + 1))
        return frozenset(out)
    if not text.isdigit() or int(text) > 255:
        raise ValueError(f"bad octet {text!r}")
    return frozenset({int(text)})


def _display(zone: str) -> str:
    labels = zone.split(".")
    if len(labels) >= 3 and _KEY_LABEL.match(labels[0]):
        register_secret(labels[0])
        return ".".join(labels[1:])
    return zone


@lru_cache(maxsize=256)
def parse_zone(text: str) -> ZoneSpec:
    """Parse ``zone[=filter][*weight]``; ValueError naming the problem."""
    m = _ZONE.match(text.strip().lower())
    if not m or "." not in m.group(1):
        raise ValueError(f"bad list zone {text!r}: expected zone[=a.b.c.d][*weight]")
    zone, filt, weight = m.group(1).strip("."), m.group(2), m.group(3)
    if "." not in zone or "" in zone.split("."):  # ".", "bl." or "a..b" is no zone
        raise ValueError(f"bad list zone {text!r}: expected zone[=a.b.c.d][*weight]")
    octets = None
    if filt:
        parts = re.findall(r"\[[^\]]*\]|[^.\[\]]+", filt)
        if len(parts) != 4:
            raise ValueError(f"bad filter in {text!r}: four octets needed")
        octets = tuple(_octet(p) for p in parts)
    return ZoneSpec(zone, _display(zone), octets, int(weight) if weight else 1)


def ip_query_name(address: IPAddress, zone: str) -> str:
    """The DNSBL query name: reversed octets (IPv4) or nibbles (IPv6) under ``zone``."""
    if isinstance(address, ipaddress.IPv4Address):
        return ".".join(reversed(str(address).split("."))) + "." + zone
    nibbles = address.exploded.replace(":", "")
    return ".".join(reversed(nibbles)) + "." + zone


@dataclass(frozen=True, slots=True)
class Reading:
    """What one list answer means."""

    listed: tuple[ipaddress.IPv4Address, ...] = ()  # codes that count as listings
    errors: tuple[str, ...] = ()  # misconfiguration reports
    temp: bool = False


def read(answer: Answer, spec: ZoneSpec, subject: str) -> Reading:
    """Read a list's A answer for ``subject``: listings, error codes, or a failure."""
    if answer.temp:
        return Reading(temp=True)
    if not answer.ok:
        return Reading()
    listed: list[ipaddress.IPv4Address] = []
    errors: list[str] = []
    for code in answer.addresses():
        if not isinstance(code, ipaddress.IPv4Address) or code not in LOOPBACK_NET:
            errors.append(
                f"{spec.display} answered {code} for {subject}: outside 127.0.0.0/8, "
                "not a listing (an expired or hijacked zone?)"
            )
        elif code in ERROR_CODES or code in ERROR_NET:
            meaning = ERROR_MEANING.get(code, "an error code of the 127.255.255.0/24 range")
            errors.append(
                f"{spec.display} answered {code} for {subject}: {meaning}; "
                "an error code, not a listing"
            )
        elif spec.matches(code):
            listed.append(code)
    return Reading(tuple(listed), tuple(errors))
