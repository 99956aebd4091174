"""Read mail already received, and MTA logs, into the clients that sent it.

For ``heloguard whatif``.  No DNS, no judging: this module turns paths into
:class:`Seen` items (one per message or per logged session) and counts what it
could not use, with the reason.  Messages come from an mbox file, a Maildir
(``cur/`` and ``new/``, and its Maildir++ subfolders), a single RFC 5322 file,
or standard input, through the standard ``mailbox`` and ``email`` modules;
``.gz`` files are opened with ``gzip``.  A message's client is the one named by
the Received header our own server wrote (:mod:`heloguard.received`).  Log
files are Postfix's (``reject:``/``warn:`` lines that carry ``helo=<...>``) and
Sendmail's (``relay=NAME [ADDR]`` lines, which carry no HELO).

Trust: every input byte may be hostile or broken (a corrupt mbox, a truncated
gzip, non-UTF-8 or encoded headers, garbage lines); each problem is counted
under a reason and reading goes on with the next item.
"""

from __future__ import annotations

import email
import email.policy
import email.utils
import gzip
import ipaddress
import mailbox
import os
import re
import shutil
import tempfile
import zlib
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from email.header import decode_header, make_header
from email.message import Message
from pathlib import Path
from typing import BinaryIO

from heloguard.answers import IPAddress
from heloguard.received import by_host, ours

MAX_MESSAGE = 50 * 1024 * 1024  # a bigger "message" in a single file is not read whole


@dataclass(frozen=True, slots=True)
class Seen:
    """One message or logged session, and the client our server saw."""

    source: str  # "file#N" (message N) or "file:L" (line L)
    date: datetime | None
    client: IPAddress
    helo: str | None
    ptr: str | None  # the reverse name our server wrote (information only, never evidence)
    sender: str | None  # envelope sender (Return-Path or the log's from=)
    rcpt: tuple[str, ...] = ()
    from_addr: str = ""  # the From: header's address
    message_id: str = ""
    refs: tuple[str, ...] = ()  # In-Reply-To and References
    kind: str = "message"  # message or log


@dataclass(frozen=True, slots=True)
class Authored:
    """A message our own users wrote (no Received header of ours names a client)."""

    from_addr: str
    to: tuple[str, ...]
    message_id: str


@dataclass
class Reading:
    """What reading found: the counts by reason, the hosts seen when ``--by`` matched none."""

    messages: int = 0
    log_lines: int = 0
    sessions: int = 0
    unusable: Counter[str] = field(default_factory=Counter)
    by_seen: Counter[str] = field(default_factory=Counter)
    authored: list[Authored] = field(default_factory=list)
    # Postfix smtpd sessions open in the log: process id -> a line of it was used
    smtpd_open: dict[str, bool] = field(default_factory=dict)

    def skip(self, reason: str) -> None:
        """Count one item that could not be used."""
        self.unusable[reason] += 1


# -- headers ---------------------------------------------------------------------


def header_text(msg: Message, name: str) -> str:
    """A header decoded to text, RFC 2047 words and bad bytes included ("" if absent)."""
    value = msg.get(name)
    if value is None:
        return ""
    if isinstance(value, str) and "=?" not in value:
        return value  # no encoded words: nothing to decode
    try:
        return str(make_header(decode_header(str(value))))
    except (UnicodeError, LookupError, ValueError, TypeError):
        return str(value).encode("utf-8", "replace").decode("utf-8")


def _all(msg: Message, name: str) -> list[str]:
    return [str(v) for v in (msg.get_all(name) or [])]


_ANGLE = re.compile(r"<([^<>\s\"@]+@[^<>\s\"]+)>\s*$")
_BARE = re.compile(r"^\s*([^<>\s\"@(),;:]+@[^<>\s\"(),;:]+)\s*$")


def _addr(text: str) -> str:
    """The address of a From:/Return-Path: value (the common forms without the full parser)."""
    m = _ANGLE.search(text) or _BARE.match(text)
    if m:
        return m.group(1).lower()
    return email.utils.parseaddr(text)[1].strip().lower()


def _addrs(msg: Message, *names: str) -> tuple[str, ...]:
    values = [header_text(msg, n) for n in names]
    found = email.utils.getaddresses([v for v in values if v])
    return tuple(a.lower() for _, a in found if "@" in a)


_MSGID = re.compile(r"<([^<>\s]+)>")


def _date(msg: Message, received: str) -> datetime | None:
    for text in (received.rpartition(";")[2], header_text(msg, "Date")):
        try:
            d = email.utils.parsedate_to_datetime(text.strip())
        except (TypeError, ValueError, IndexError):
            continue
        if d is not None:
            return d if d.tzinfo else d.replace(tzinfo=UTC)
    return None


def from_message(msg: Message, source: str, by: Sequence[str], reading: Reading) -> Seen | None:
    """The client of one message, or None (counted in ``reading``)."""
    reading.messages += 1
    received = _all(msg, "Received")
    index, client = ours(received, by)
    from_addr = _addr(header_text(msg, "From"))
    message_id = next(iter(_MSGID.findall(header_text(msg, "Message-ID"))), "")
    if index < 0:
        if not received or all(by_host(h) == "" for h in received):
            # nothing of ours and nobody's Received: written here, by our users
            to = _addrs(msg, "To", "Cc")
            reading.authored.append(Authored(from_addr, to, message_id))
            reading.skip("written by a local user (no Received header)")
            return None
        for h in received[:3]:
            reading.by_seen[by_host(h) or "(no by)"] += 1
        reading.skip("no Received header written by one of our hosts (--by)")
        return None
    if client is None:
        reading.skip("our Received header names no client (a local submission?)")
        return None
    refs = tuple(
        _MSGID.findall(header_text(msg, "In-Reply-To") + " " + header_text(msg, "References"))
    )
    sender = header_text(msg, "Return-Path")
    rcpt = _FOR.search(received[index])
    return Seen(
        source=source,
        date=_date(msg, received[index]),
        client=client.address,
        helo=client.helo,
        ptr=client.ptr,
        sender=_addr(sender) if sender else None,
        rcpt=(rcpt.group(1).lower(),) if rcpt else (),
        from_addr=from_addr,
        message_id=message_id,
        refs=refs,
    )


_FOR = re.compile(r"\bfor\s+<([^<>\s]+)>", re.IGNORECASE)


# -- logs --------------------------------------------------------------------------

# Postfix: "NOQUEUE: reject: RCPT from name[addr]: 554 ...; from=<a> to=<b> proto=ESMTP helo=<h>"
_POSTFIX = re.compile(
    r"postfix[\w.-]*(?:/[\w.-]+)*/smtpd\[(?P<pid>\d+)\]: (?:\w+: )?"
    r"(?P<verb>reject|warn|reject_warning): "
    r"(?P<stage>[A-Z]+) from (?P<name>[^\s\[]*)\[(?P<addr>[^\]]+)\]"
)
_SMTPD_SESSION = re.compile(
    r"postfix[\w.-]*(?:/[\w.-]+)*/smtpd\[(?P<pid>\d+)\]: (?P<what>connect|disconnect) from "
)
_FIELDS = re.compile(r"\b(from|to|helo)=<([^>]*)>")
# Sendmail: "sm-mta[123]: QID: from=<a>, size=1, ..., relay=name [addr]" (no HELO in the log)
_SENDMAIL = re.compile(
    r"(?:sendmail|sm-mta)\[\d+\]: (?P<qid>\w+): from=<?(?P<from>[^,>]*)>?,.*?"
    r"relay=(?:(?P<name>[^\s\[,]+) )?\[(?:IPv6:)?(?P<addr>[0-9A-Fa-f:.]+)\]"
)
_SYSLOG_DATE = re.compile(
    r"^(?P<iso>\d{4}-\d\d-\d\dT[\d:.]+(?:Z|[+-]\d\d:?\d\d)?)|^(?P<bsd>\w{3} [ \d]\d [\d:]{8})"
)


def _log_date(line: str, year: int) -> datetime | None:
    m = _SYSLOG_DATE.match(line)
    if not m:
        return None
    try:
        if m.group("iso"):
            d = datetime.fromisoformat(m.group("iso").replace("Z", "+00:00"))
            return d if d.tzinfo else d.replace(tzinfo=UTC)
        return datetime.strptime(f"{year} {m.group('bsd')}", "%Y %b %d %H:%M:%S").replace(
            tzinfo=UTC
        )
    except ValueError:
        return None


def _ip(text: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(text.removeprefix("IPv6:"))
    except ValueError:
        return None


def from_log_line(line: str, source: str, reading: Reading, year: int) -> Seen | None:
    """A session from one log line, or None (only lines of an MTA's smtpd are counted)."""
    reading.log_lines += 1
    m = _POSTFIX.search(line)
    if m:
        reading.smtpd_open[m.group("pid")] = True
        fields = dict(_FIELDS.findall(line))
        addr = _ip(m.group("addr"))
        if addr is None:
            reading.skip("log line with no usable client address")
            return None
        reading.sessions += 1
        name = m.group("name")
        return Seen(
            source=source,
            date=_log_date(line, year),
            client=addr,
            helo=fields.get("helo") or None,
            ptr=None if name in ("", "unknown") else name.lower(),
            sender=fields.get("from"),
            rcpt=(fields["to"].lower(),) if fields.get("to") else (),
            kind="log",
        )
    m = _SENDMAIL.search(line)
    if m:
        addr = _ip(m.group("addr"))
        if addr is None or addr.is_loopback:
            reading.skip("log line with no usable client address")
            return None
        reading.sessions += 1
        name = m.group("name")
        return Seen(
            source=source,
            date=_log_date(line, year),
            client=addr,
            helo=None,
            ptr=name.lower() if name else None,
            sender=m.group("from") or "",
            kind="log",
        )
    m = _SMTPD_SESSION.search(line)
    if m:
        pid = m.group("pid")
        if m.group("what") == "connect":
            reading.smtpd_open[pid] = False
        elif reading.smtpd_open.pop(pid, True) is False:
            reading.skip("Postfix session with no reject:/warn: line (the only ones with helo=)")
    return None


# -- paths -------------------------------------------------------------------------


def _open(path: Path) -> BinaryIO:
    if path.suffix == ".gz":
        return gzip.open(path, "rb")  # type: ignore[return-value]
    return path.open("rb")


# A "From " separator line followed by a header: an mbox, even after some garbage.
_MBOX_FROM = re.compile(rb"(?m)^From \S+ [^\n]*\n[\x21-\x39\x3b-\x7e]+:")


def _sniff(head: bytes) -> str:
    """mbox, message or log, from the first bytes of a file."""
    if head.startswith(b"From ") or _MBOX_FROM.search(head):
        return "mbox"
    first = head.split(b"\n", 1)[0]
    if re.match(rb"^[\x21-\x39\x3b-\x7e]+:", first) and not _SYSLOG_DATE.match(
        first.decode("latin-1")
    ):
        return "message"
    return "log"


def _head(path: Path) -> bytes:
    try:
        with _open(path) as fh:
            return fh.read(4096)
    except (OSError, EOFError, zlib.error):
        return b""


def _messages_mbox(path: Path, reading: Reading) -> Iterator[tuple[str, Message]]:
    """Messages of an mbox (a .gz one is unpacked to a temporary file first)."""
    tmp: str | None = None
    target = path
    if path.suffix == ".gz":
        fd, tmp = tempfile.mkstemp(prefix="heloguard-whatif-", suffix=".mbox")
        try:
            with os.fdopen(fd, "wb") as out, gzip.open(path, "rb") as src:
                shutil.copyfileobj(src, out)
        except (OSError, EOFError, zlib.error):
            reading.skip("truncated or corrupt gzip (read up to the damage)")
        target = Path(tmp)
    try:
        box = mailbox.mbox(target, create=False)
        try:
            for n, key in enumerate(box.iterkeys(), 1):
                try:
                    msg = box.get_message(key)
                except (OSError, ValueError, UnicodeError, email.errors.MessageError):
                    reading.skip("unreadable message in an mbox")
                    continue
                yield f"{path}#{n}", msg
        finally:
            box.close()
    except (OSError, mailbox.Error):
        reading.skip("unreadable mbox")
    finally:
        if tmp:
            Path(tmp).unlink(missing_ok=True)


def _messages_maildir(path: Path, reading: Reading) -> Iterator[tuple[str, Message]]:
    """Messages of a Maildir and of its Maildir++ subfolders."""
    try:
        box = mailbox.Maildir(path, factory=None, create=False)
        folders = [path, *(path / f".{f}" for f in box.list_folders())]
    except (OSError, mailbox.Error):
        reading.skip("unreadable Maildir")
        return
    for folder in folders:
        try:
            sub = mailbox.Maildir(folder, factory=None, create=False)
            keys = sorted(sub.iterkeys())
        except (OSError, mailbox.Error):
            reading.skip("unreadable Maildir folder")
            continue
        for key in keys:
            try:
                msg = sub.get_message(key)
            except (OSError, KeyError, ValueError, UnicodeError, email.errors.MessageError):
                reading.skip("unreadable message in a Maildir")
                continue
            yield f"{folder}/{key}", msg


def _message_file(path: Path, reading: Reading) -> Iterator[tuple[str, Message]]:
    try:
        with _open(path) as fh:
            data = fh.read(MAX_MESSAGE)
    except (OSError, EOFError, zlib.error):
        reading.skip("unreadable or truncated file")
        return
    yield str(path), email.message_from_bytes(data, policy=email.policy.compat32)


def _log_lines(path: Path, reading: Reading) -> Iterator[tuple[str, str]]:
    try:
        with _open(path) as fh:
            for n, raw in enumerate(fh, 1):
                yield f"{path}:{n}", raw.decode("utf-8", "replace")
    except (OSError, EOFError, zlib.error):
        reading.skip("truncated or corrupt gzip (read up to the damage)")


def _spool_stdin(stream: BinaryIO) -> Path:
    fd, tmp = tempfile.mkstemp(prefix="heloguard-whatif-stdin-")
    with os.fdopen(fd, "wb") as out:
        shutil.copyfileobj(stream, out)
    return Path(tmp)


def _named(seen: Seen, path: Path, text: str) -> Seen:
    """The source as the user named it ("-" for standard input, not the spool file)."""
    if str(path) == text:
        return seen
    return replace(seen, source=text + seen.source[len(str(path)) :])


def read(
    paths: Sequence[str], by: Sequence[str], reading: Reading, stdin: BinaryIO | None = None
) -> Iterator[Seen]:
    """Every usable message or logged session of ``paths`` (``-`` is standard input)."""
    year = datetime.now(UTC).year
    for text in paths:
        spooled: Path | None = None
        path = Path(text)
        if text == "-":
            if stdin is None:
                reading.skip("no standard input")
                continue
            spooled = path = _spool_stdin(stdin)
        try:
            if path.is_dir():
                if not ((path / "cur").is_dir() or (path / "new").is_dir()):
                    reading.skip("a directory that is not a Maildir")
                    continue
                for source, msg in _messages_maildir(path, reading):
                    seen = from_message(msg, source, by, reading)
                    if seen:
                        yield seen
                continue
            if not path.exists():
                reading.skip("no such file")
                continue
            kind = _sniff(_head(path))
            if kind == "log":
                for source, line in _log_lines(path, reading):
                    seen = from_log_line(line, source, reading, year)
                    if seen:
                        yield _named(seen, path, text)
                continue
            messages = (
                _messages_mbox(path, reading) if kind == "mbox" else _message_file(path, reading)
            )
            for source, msg in messages:
                seen = from_message(msg, source, by, reading)
                if seen:
                    yield _named(seen, path, text)
        finally:
            if spooled is not None:
                spooled.unlink(missing_ok=True)
