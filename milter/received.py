"""Who handed us a message: the client in the Received header our own server wrote.

Pure text work, no I/O.  :func:`parse` reads one Received header in the forms
that Postfix, Sendmail, Exim, ZMailer and qmail write and returns the client it names:
the address, the reverse-DNS name the receiving server found (if any), the
HELO the client gave, and whether the receiver marked the name as forged.
:func:`ours` picks, from a message's Received headers (top first), the first
one written ``by`` one of our own host names: headers above it are our own
internal hops, headers below it are the sender's claims and never trusted.

The forms read (``HELO``, ``PTR`` and ``ADDR`` as the receiver wrote them):

- Postfix:  ``from HELO (PTR [ADDR])``, ``from HELO (unknown [ADDR])``,
  ``[IPv6:2001:db8::25]``, and with ``smtpd_client_port_logging`` ``[ADDR]:PORT``.
- Sendmail: ``from HELO (PTR [ADDR])``, ``from HELO ([ADDR])`` (no PTR),
  ``from HELO (ident@PTR [ADDR])``, ``(PTR [ADDR] (may be forged))``.
- Exim:     ``from PTR ([ADDR]:PORT helo=HELO)``, ``from PTR ([ADDR])`` (HELO
  the same as the name), ``from [ADDR] (port=PORT helo=HELO)`` (no verified name).
- ZMailer (vger.kernel.org): ``from PTR ([ADDR]:PORT "EHLO HELO" rhost-flags-...)``.
- qmail:    ``from PTR (HELO HELO) (ADDR)``, ``from unknown (HELO HELO) (ADDR)``,
  ``from PTR (ADDR)`` (HELO the same as the name).

Trust: every byte of a Received header below ours was written by someone
else, and even ours quotes the client's HELO: the parser never raises and
returns ``None`` for anything it cannot read.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from heloguard.answers import IPAddress

_SPACE = re.compile(r"\s+")
_ADDR = r"\[(?:IPv6:)?(?P<addr>[0-9A-Fa-f:.]+)\](?::(?P<port>\d+))?"
# The parenthesised part after "from X": what the receiver learned itself.
_POSTFIX_SENDMAIL = re.compile(
    r"^from\s+(?P<helo>\S+)\s+\((?:(?P<ident>[^\s@()]+)@)?(?:(?P<ptr>[^\s\[\]()]+)\s+)?"
    + _ADDR
    + r"(?P<forged>\s+\(may be forged\))?\)"
)
_EXIM_NAMED = re.compile(r"^from\s+(?P<ptr>[^\s\[\]()]+)\s+\(" + _ADDR + r"(?P<rest>[^)]*)\)")
_EXIM_BARE = re.compile(r"^from\s+" + _ADDR + r"\s+\((?P<rest>[^)]*)\)")
_EXIM_HELO = re.compile(r"(?:^|\s)helo=(?P<helo>\S+)")
_ZMAILER = re.compile(
    r"^from\s+(?P<ptr>[^\s\[\]()]+)\s+\(" + _ADDR + r'\s+"(?:EHLO|HELO)\s+(?P<helo>[^"]*)"'
)
_QMAIL = re.compile(
    r"^from\s+(?P<ptr>[^\s()]+)\s+(?:\(HELO\s+(?P<helo>[^)\s]*)\)\s+)?"
    r"\((?:[^@()\s]*@)?(?P<addr>[0-9A-Fa-f:.]+)\)"
)
_BY = re.compile(r"\bby\s+(?P<by>[^\s;()]+)", re.IGNORECASE)
# Exim's "from NAME ([ADDR])" reads like Sendmail's "from HELO ([ADDR])": its
# "with esmtp (Exim 4.96)" or "id 1abcDE-0001xY-Zz" tells them apart.
_EXIM_MARK = re.compile(r"\(Exim [0-9]|\bid \w{6}-\w{6}-\w{2,4}\b")
_UNKNOWN = frozenset({"unknown", "[unknown]"})


@dataclass(frozen=True, slots=True)
class Client:
    """The client one Received header names, as the receiving server saw it."""

    address: IPAddress
    helo: str | None  # what the client said (None when the header does not show it)
    ptr: str | None  # the reverse-DNS name the receiver found (None: none or not shown)
    forged: bool  # the receiver said "may be forged" (its forward check failed)
    by: str  # the receiving host
    form: str  # postfix-sendmail, exim, zmailer, qmail


def fold(header: str) -> str:
    """One line, runs of white space made one space (RFC 5322 unfolding and more)."""
    return _SPACE.sub(" ", header).strip()


def by_host(header: str) -> str:
    """The ``by`` host of a Received header, lower case ("" if none)."""
    m = _BY.search(fold(header))
    return m.group("by").lower().rstrip(".") if m else ""


def _address(text: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _name(text: str | None) -> str | None:
    if not text or text.lower() in _UNKNOWN or text.startswith("["):
        return None
    return text.lower().rstrip(".")


def parse(header: str) -> Client | None:
    """The client named by one Received header (``None`` when it names none we can read)."""
    text = fold(header)
    if text.lower().startswith("received:"):
        text = text[9:].strip()
    by = by_host(text)
    exim = _EXIM_MARK.search(text) is not None
    m = _ZMAILER.match(text)
    if m:
        addr = _address(m.group("addr"))
        if addr is None:
            return None
        return Client(addr, m.group("helo") or None, _name(m.group("ptr")), False, by, "zmailer")
    m = None if exim else _POSTFIX_SENDMAIL.match(text)
    if m:
        addr = _address(m.group("addr"))
        if addr is None:
            return None
        helo = m.group("helo")
        return Client(
            addr, helo, _name(m.group("ptr")), bool(m.group("forged")), by, "postfix-sendmail"
        )
    m = _QMAIL.match(text)
    if m:
        addr = _address(m.group("addr"))
        if addr is None:
            return None
        ptr = _name(m.group("ptr"))
        # qmail leaves (HELO ...) out when the HELO is the name it found
        return Client(addr, m.group("helo") or ptr, ptr, False, by, "qmail")
    m = _EXIM_NAMED.match(text) or _EXIM_BARE.match(text)
    if m:
        addr = _address(m.group("addr"))
        if addr is None:
            return None
        ptr = _name(m.groupdict().get("ptr"))
        h = _EXIM_HELO.search(m.group("rest"))
        # Exim leaves helo= out when it equals the verified name (or the literal).
        helo = h.group("helo") if h else (ptr or f"[{addr}]")
        return Client(addr, helo, ptr, False, by, "exim")
    return None


def _matches(host: str, ours: Iterable[str]) -> bool:
    for o in ours:
        if o.startswith("."):
            if host.endswith(o):
                return True
        elif host == o:
            return True
    return False


def ours(headers: Sequence[str], names: Sequence[str]) -> tuple[int, Client | None]:
    """The first header (top first) written by one of ``names``: (index, client).

    ``names`` are host names, or domains written with a leading dot (``.example.net``
    matches any host in it).  (-1, None) when no header was written by us;
    (i, None) when ours names no client we can read (a local submission, say).
    """
    wanted = [n.lower().rstrip(".") for n in names]
    for i, header in enumerate(headers):
        if _matches(by_host(header), wanted):
            return i, parse(header)
    return -1, None
