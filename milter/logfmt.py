"""Escaping attacker-controlled text for log lines and SMTP replies.

HELO arguments, PTR names and addresses are written by the client.  In a log
line, a CR, LF or other control byte could forge a second line, and a space or
``>`` could forge a field; in an SMTP reply, libmilter drops a text with a
lone ``%`` and fails on CR/LF.  :func:`escape` makes any string safe for a
log field; :func:`for_reply` makes it safe inside a reply text.
"""

from __future__ import annotations

import re

_SAFE = frozenset(chr(c) for c in range(0x21, 0x7F)) - {"\\", "<", ">", "[", "]", "="}
# Fast paths: a text with none of these is returned as it is.
_ESCAPE_NEEDED = re.compile(r"[^!-~]|[\\<>\[\]=]")
_PRINTABLE_NEEDED = re.compile(r"[^ -~]|\\")
_NOT_PRINTABLE_ASCII = re.compile(r"[^ -~]")  # each such character becomes "?" in a reply

# Access keys embedded in DNS list zone names (KEY.zen.dq.spamhaus.net): they
# must never reach a reply, a log line or a JSON record.
_SECRETS: set[str] = set()


def register_secret(secret: str) -> None:
    """Keep ``secret`` out of everything heloguard prints."""
    if len(secret) >= 8:
        _SECRETS.add(secret.lower())


def redact(text: str) -> str:
    """``text`` with every registered secret replaced by ``<key>``."""
    for secret in _SECRETS:
        if secret in text.lower():
            text = re.sub(re.escape(secret), "<key>", text, flags=re.IGNORECASE)
    return text


def escape(text: str, limit: int = 512) -> str:
    """Printable ASCII kept; everything else as ``\\xNN`` / ``\\uNNNN``; cut at ``limit``."""
    text = redact(text)
    if len(text) <= limit and not _ESCAPE_NEEDED.search(text):
        return text
    out: list[str] = []
    size = 0
    for ch in text:
        if ch in _SAFE:
            piece = ch
        elif ord(ch) < 0x100:
            piece = f"\\x{ord(ch):02x}"
        elif ord(ch) < 0x10000:
            piece = f"\\u{ord(ch):04x}"
        else:
            piece = f"\\U{ord(ch):08x}"
        size += len(piece)
        if size > limit:
            out.append("...")
            break
        out.append(piece)
    return "".join(out)


def printable(text: str, limit: int = 512) -> str:
    """For human transcripts: like :func:`escape` but spaces and brackets kept."""
    text = redact(text)
    if len(text) <= limit and not _PRINTABLE_NEEDED.search(text):
        return text
    out: list[str] = []
    for ch in text[:limit]:
        if 0x20 <= ord(ch) < 0x7F and ch != "\\":
            out.append(ch)
        elif ord(ch) < 0x100:
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(f"\\u{ord(ch):04x}" if ord(ch) < 0x10000 else f"\\U{ord(ch):08x}")
    return "".join(out) + ("..." if len(text) > limit else "")


def for_reply(text: str, limit: int = 100) -> str:
    """Attacker text shown inside an SMTP reply: printable ASCII only, short."""
    cleaned = _NOT_PRINTABLE_ASCII.sub("?", redact(text))
    return cleaned if len(cleaned) <= limit else cleaned[: limit - 3] + "..."


def reply_text(text: str) -> str:
    """A whole reply text made safe for libmilter's smfi_setreply (``%`` doubled)."""
    return _NOT_PRINTABLE_ASCII.sub("?", redact(text)).replace("%", "%%")
