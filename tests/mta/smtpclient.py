"""A small SMTP client on a raw socket that keeps every reply, for MTA tests.

smtplib hides replies (the EHLO reply, a 220 after XCLIENT, the one that ends
DATA) and raises where a test wants to look.  Here every command and its reply
become a ``Step``, and ``run_session`` plays one whole client conversation and
stops at the first 4xx/5xx to EHLO, MAIL or RCPT, so a test can say "rejected at
MAIL FROM, never reached DATA".

Two ways to present a client identity:

* Postfix: ``addr=``/``name=`` send ``XCLIENT`` (Postfix answers with a new
  220 banner, after which the client must EHLO again; NAME is always sent,
  because ADDR alone keeps the name ``localhost``).
* Sendmail (no XCLIENT): ``source_addr=`` binds the client socket to that
  address, inside the network namespace ``netns=`` where every address is
  local (``sendmail.PrivateSendmail.netns_path``).
"""

from __future__ import annotations

import ipaddress
import os
import socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from .netns import entered

# Linux <linux/in.h>; Python 3.11 does not export it.  Lets a socket bind an
# address that is not configured on any interface (needed for IPv6 test
# addresses, which a "local" route alone does not make bindable).
IP_FREEBIND = getattr(socket, "IP_FREEBIND", 15)

CRLF = b"\r\n"


class SMTPProtocolError(Exception):
    """The server sent something that is not an SMTP reply."""


class SMTPConnectionClosed(ConnectionError):
    """The server closed the connection before a complete reply."""


class SMTPTimeout(TimeoutError):
    """No (complete) reply in time; the message carries the transcript so far."""


@dataclass(frozen=True)
class Reply:
    """One SMTP reply: its code and the text of each line (after "NNN-"/"NNN ")."""

    code: int
    lines: list[str]

    @property
    def text(self) -> str:
        return "\n".join(self.lines)

    @property
    def ok(self) -> bool:
        """2xx or 3xx."""
        return 200 <= self.code < 400

    @property
    def failed(self) -> bool:
        """4xx or 5xx."""
        return self.code >= 400

    def __str__(self) -> str:
        if not self.lines:
            return str(self.code)
        return "\n".join(
            f"{self.code}{'-' if i < len(self.lines) - 1 else ' '}{line}"
            for i, line in enumerate(self.lines)
        )


@dataclass(frozen=True)
class Step:
    """A command the client sent and the reply (None: connection closed)."""

    command: str
    reply: Reply | None

    @property
    def verb(self) -> str:
        return self.command.split(" ", 1)[0].split(":", 1)[0].upper()


@dataclass
class Transcript:
    """What happened in one session, in order.

    ``steps[0]`` is the banner (command ``"<connect>"``).  The message text
    is recorded as one step with command ``"."`` whose reply is the verdict on
    the message.
    """

    steps: list[Step] = field(default_factory=list)

    def replies(self, verb: str) -> list[Reply]:
        """Every reply to commands with that verb ("EHLO", "MAIL", "RCPT", ".")."""
        verb = verb.upper()
        return [s.reply for s in self.steps if s.verb == verb and s.reply is not None]

    def reply(self, verb: str) -> Reply | None:
        """The last reply to a command with that verb, or None if never sent/answered."""
        found = self.replies(verb)
        return found[-1] if found else None

    @property
    def banner(self) -> Reply | None:
        return self.reply("<CONNECT>")

    @property
    def verbs(self) -> list[str]:
        return [s.verb for s in self.steps]

    @property
    def reached_data(self) -> bool:
        """The client got as far as sending DATA."""
        return "DATA" in self.verbs

    @property
    def delivered(self) -> bool:
        """The message was accepted (2xx after the final dot)."""
        end = self.reply(".")
        return end is not None and 200 <= end.code < 300

    @property
    def rejected_at(self) -> str | None:
        """Verb of the first command answered 4xx/5xx (QUIT excluded), if any."""
        for s in self.steps:
            if s.verb != "QUIT" and (s.reply is None or s.reply.failed):
                return s.verb
        return None

    def __str__(self) -> str:
        out = []
        for s in self.steps:
            if s.verb != "<CONNECT>":
                out.append(f">>> {s.command}")
            out.append("<<< " + (str(s.reply).replace("\n", "\n<<< ") if s.reply else "(closed)"))
        return "\n".join(out)


def _family(address: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in address else socket.AF_INET


def xtext(value: str) -> str:
    """RFC 3461 xtext, as XCLIENT attribute values need."""
    return "".join(
        c if 33 <= ord(c) <= 126 and c not in "+=" else "".join(f"+{b:02X}" for b in c.encode())
        for c in value
    )


class SMTPSession:
    """One SMTP connection.  Every command and reply is appended to ``transcript``.

    ``host`` defaults to the loopback address of the family of ``source_addr``
    (``::1`` for an IPv6 source, else ``127.0.0.1``).  With ``source_addr`` the
    socket is bound to that address first (IP_FREEBIND, so any address that
    routes back locally will do); with ``netns`` the socket is created in that
    network namespace.
    """

    def __init__(
        self,
        host: str | None = None,
        port: int = 25,
        *,
        source_addr: str | None = None,
        netns: str | os.PathLike[str] | None = None,
        timeout: float = 15.0,
    ) -> None:
        if host is None:
            host = "::1" if source_addr and _family(source_addr) == socket.AF_INET6 else "127.0.0.1"
        family = _family(host)
        if source_addr is not None and _family(source_addr) != family:
            raise ValueError(f"source {source_addr} and server {host} differ in address family")
        self.transcript = Transcript()
        self.closed = False
        with entered(netns):
            sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            if source_addr is not None:
                sock.setsockopt(socket.IPPROTO_IP, IP_FREEBIND, 1)
                sock.bind((source_addr, 0))
            sock.connect((host, port))
        except BaseException:
            sock.close()
            raise
        self.sock = sock
        self._rfile = sock.makefile("rb")
        self.banner = self._record("<connect>")

    # -- wire ---------------------------------------------------------------
    def _read_reply(self) -> Reply:
        lines: list[str] = []
        code: int | None = None
        while True:
            raw = self._rfile.readline(4096)
            if not raw:
                raise SMTPConnectionClosed(
                    "connection closed" + (f" after {lines}" if lines else "")
                )
            line = raw.rstrip(b"\r\n").decode("utf-8", "replace")
            if len(line) < 3 or not line[:3].isdigit() or (len(line) > 3 and line[3] not in " -"):
                raise SMTPProtocolError(f"not an SMTP reply line: {line!r}")
            this = int(line[:3])
            if code is not None and this != code:
                raise SMTPProtocolError(f"reply code changed mid-reply: {line!r}")
            code = this
            lines.append(line[4:])
            if len(line) == 3 or line[3] == " ":
                return Reply(code, lines)

    def _record(self, command: str) -> Reply:
        try:
            reply = self._read_reply()
        except SMTPConnectionClosed:
            self.closed = True
            self.transcript.steps.append(Step(command, None))
            raise
        self.transcript.steps.append(Step(command, reply))
        return reply

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    # -- commands -----------------------------------------------------------
    def cmd(self, line: str) -> Reply:
        """Send one command line and return its reply."""
        if "\r" in line or "\n" in line:
            raise ValueError("one command line at a time")
        self.sock.sendall(line.encode("utf-8") + CRLF)
        return self._record(line)

    def xclient(
        self,
        addr: str,
        name: str = "[UNAVAILABLE]",
        helo: str | None = None,
        login: str | None = None,
        **attrs: str,
    ) -> Reply:
        """XCLIENT ADDR=... NAME=... [HELO=...] [LOGIN=...] (Postfix).

        An IPv6 ``addr`` gets the ``IPV6:`` prefix.  ``name`` may be a host
        name, ``[UNAVAILABLE]`` (resolve FAIL) or ``[TEMPUNAVAIL]`` (TEMP).
        Postfix answers with a new 220 banner: EHLO again afterwards.
        """
        ip = ipaddress.ip_address(addr)
        parts = [f"ADDR={'IPV6:' if ip.version == 6 else ''}{ip.compressed}", f"NAME={xtext(name)}"]
        if helo is not None:
            parts.append(f"HELO={xtext(helo)}")
        if login is not None:
            parts.append(f"LOGIN={xtext(login)}")
        parts += [f"{k.upper()}={xtext(v)}" for k, v in attrs.items()]
        return self.cmd("XCLIENT " + " ".join(parts))

    def ehlo(self, name: str) -> Reply:
        return self.cmd(f"EHLO {name}")

    def helo(self, name: str) -> Reply:
        return self.cmd(f"HELO {name}")

    def mail(self, addr: str, *params: str) -> Reply:
        return self.cmd(" ".join((f"MAIL FROM:<{addr}>", *params)))

    def rcpt(self, addr: str, *params: str) -> Reply:
        return self.cmd(" ".join((f"RCPT TO:<{addr}>", *params)))

    def data(self, body: str | bytes) -> Reply:
        """DATA, then (on 354) the message, dot-stuffed, then the final dot.

        Returns the reply that ends the transaction, or the reply to DATA if it
        was not 354.
        """
        reply = self.cmd("DATA")
        if reply.code != 354:
            return reply
        raw = body.encode("utf-8") if isinstance(body, str) else body
        lines = raw.replace(b"\r\n", b"\n").split(b"\n")
        if lines and lines[-1] == b"":
            lines.pop()
        out = b"".join((b"." + ln if ln.startswith(b".") else ln) + CRLF for ln in lines)
        self.sock.sendall(out + b"." + CRLF)
        return self._record(".")

    def quit(self) -> Reply | None:
        """QUIT and close; tolerant of a server that already hung up."""
        reply: Reply | None = None
        if not self.closed:
            try:
                reply = self.cmd("QUIT")
            except OSError:
                reply = None
        self.close()
        return reply

    def close(self) -> None:
        self.closed = True
        self._rfile.close()
        self.sock.close()

    def __enter__(self) -> SMTPSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.quit()


def default_body(mail_from: str, rcpt_to: Sequence[str], subject: str = "heloguard test") -> str:
    return (
        f"From: <{mail_from}>\n"
        f"To: {', '.join(f'<{r}>' for r in rcpt_to)}\n"
        f"Subject: {subject}\n"
        "Date: Thu, 01 Jan 2026 00:00:00 +0000\n"
        "Message-ID: <test@heloguard.example.test>\n"
        "\n"
        "test message\n"
        ".a line that needs dot-stuffing\n"
    )


def run_session(
    port: int,
    *,
    helo: str,
    mail_from: str,
    rcpt_to: str | Iterable[str],
    addr: str | None = None,
    name: str | None = None,
    login: str | None = None,
    data: bool = True,
    body: str | bytes | None = None,
    host: str | None = None,
    source_addr: str | None = None,
    netns: str | os.PathLike[str] | None = None,
    timeout: float = 15.0,
) -> Transcript:
    """Play one client session and return its transcript.

    banner -> [XCLIENT, if ``addr``] -> EHLO -> MAIL -> RCPT... -> [DATA] -> QUIT,
    stopping (then QUIT) at the first reply >= 400 to anything before DATA.
    ``addr``/``name``/``login`` go into XCLIENT (Postfix); ``name`` defaults to
    ``[UNAVAILABLE]``.  For Sendmail pass ``source_addr`` and ``netns`` instead.
    A server that hangs up ends the session early (the last step's reply is
    None); it is not an exception.
    """
    recipients = [rcpt_to] if isinstance(rcpt_to, str) else list(rcpt_to)
    if addr is None and (name is not None or login is not None):
        raise ValueError("name= and login= only go with addr= (XCLIENT)")
    session = SMTPSession(host, port, source_addr=source_addr, netns=netns, timeout=timeout)
    try:
        if session.banner.code != 220:
            return session.transcript
        if addr is not None:
            reply = session.xclient(
                addr, name if name is not None else "[UNAVAILABLE]", login=login
            )
            if reply.code != 220:
                return session.transcript
        if session.ehlo(helo).failed or session.mail(mail_from).failed:
            return session.transcript
        for rcpt in recipients:
            if session.rcpt(rcpt).failed:
                return session.transcript
        if data:
            session.data(body if body is not None else default_body(mail_from, recipients))
    except SMTPConnectionClosed:
        pass
    except TimeoutError as exc:
        raise SMTPTimeout(f"no reply within {timeout:g}s; so far:\n{session.transcript}") from exc
    finally:
        session.quit()
    return session.transcript
