"""The MTA side of the milter protocol (version 6), for tests and benchmarks.

It speaks to a milter exactly as Postfix and Sendmail do: option
negotiation, macros, connect, helo, mail, rcpt, abort, quit.  It records
what the milter negotiated (declined callbacks, no-reply steps, requested
macros) so tests can check it, and every reply.
"""

from __future__ import annotations

import contextlib
import socket
import struct
from dataclasses import dataclass, field

# Protocol flags (libmilter mfdef.h).
P_NOCONNECT = 0x1
P_NOHELO = 0x2
P_NOMAIL = 0x4
P_NORCPT = 0x8
P_NOBODY = 0x10
P_NOHDRS = 0x20
P_NOEOH = 0x40
P_NR_HDR = 0x80
P_NOUNKNOWN = 0x100
P_NODATA = 0x200
P_SKIP = 0x400
P_RCPT_REJ = 0x800
P_NR_CONN = 0x1000
P_NR_HELO = 0x2000
P_NR_MAIL = 0x4000
P_NR_RCPT = 0x8000
P_NR_DATA = 0x10000
P_NR_UNKN = 0x20000
P_NR_EOH = 0x40000
P_NR_BODY = 0x80000
P_HDR_LEADSPC = 0x100000
ALL_PROTOCOL = 0x1FFFFF
ACT_SETSYMLIST = 0x100
ALL_ACTIONS = 0x1FF

STAGES = {0: "connect", 1: "helo", 2: "mail", 3: "rcpt", 4: "data", 5: "eom", 6: "eoh"}


@dataclass(frozen=True)
class MilterReply:
    """One reply from the milter: a code letter and, for 'y', the SMTP reply."""

    code: str  # c continue, a accept, r reject, t tempfail, y reply code, d discard, ...
    text: str = ""

    @property
    def smtp_code(self) -> int | None:
        """The SMTP code of a 'y' reply (or the default for r/t)."""
        if self.code == "y" and self.text[:3].isdigit():
            return int(self.text[:3])
        return {"r": 550, "t": 451}.get(self.code)

    @property
    def refuses(self) -> bool:
        """True for a rejection or a deferral."""
        return self.code in ("r", "t", "y")


@dataclass
class Negotiated:
    """What the milter answered to option negotiation."""

    version: int
    actions: int
    protocol: int
    macros: dict[str, str] = field(default_factory=dict)

    def declines(self, flag: int) -> bool:
        """True when the protocol flag (a P_NO* or P_NR_*) was kept by the milter."""
        return bool(self.protocol & flag)


class MilterClient:
    """One milter session over a unix or TCP socket."""

    def __init__(self, address: str, timeout: float = 30.0) -> None:
        if address.startswith(("unix:", "local:")):
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(timeout)
            self.sock.connect(address.split(":", 1)[1])
        else:  # inet:PORT@HOST
            port, _, host = address.split(":", 1)[1].partition("@")
            self.sock = socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout)
        self.negotiated: Negotiated | None = None

    def close(self) -> None:
        """Close the socket."""
        with contextlib.suppress(OSError):
            self.sock.close()

    def __enter__(self) -> MilterClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- wire -----------------------------------------------------------------

    def _send(self, cmd: str, data: bytes = b"") -> None:
        self.sock.sendall(struct.pack("!I", len(data) + 1) + cmd.encode() + data)

    def _recv_exact(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionError("milter closed the connection")
            buf += chunk
        return buf

    def _recv(self) -> tuple[str, bytes]:
        (length,) = struct.unpack("!I", self._recv_exact(4))
        body = self._recv_exact(length)
        return chr(body[0]), body[1:]

    def _reply(self) -> MilterReply:
        while True:
            code, data = self._recv()
            if code == "p":  # progress: keep waiting
                continue
            return MilterReply(code, data.rstrip(b"\0").decode("utf-8", "replace"))

    @staticmethod
    def _z(*items: str | bytes) -> bytes:
        out = b""
        for item in items:
            out += (
                item.encode("utf-8", "surrogateescape") if isinstance(item, str) else item
            ) + b"\0"
        return out

    # -- protocol steps ---------------------------------------------------------

    def negotiate(self, actions: int = ALL_ACTIONS, protocol: int = ALL_PROTOCOL) -> Negotiated:
        """SMFIC_OPTNEG: offer everything, as a current MTA does."""
        self._send("O", struct.pack("!III", 6, actions, protocol))
        code, data = self._recv()
        if code != "O":
            raise ConnectionError(f"unexpected negotiation reply {code!r}")
        version, acts, proto = struct.unpack("!III", data[:12])
        macros: dict[str, str] = {}
        rest = data[12:]
        while len(rest) >= 4:
            (stage,) = struct.unpack("!I", rest[:4])
            text, _, rest = rest[4:].partition(b"\0")
            macros[STAGES.get(stage, str(stage))] = text.decode()
        self.negotiated = Negotiated(version, acts, proto, macros)
        return self.negotiated

    def macros(self, cmd: str, values: dict[str, str]) -> None:
        """SMFIC_MACRO for the command that follows."""
        data = cmd.encode()
        for k, v in values.items():
            data += self._z(k, v)
        self._send("D", data)

    def _expect_reply(self, flag: int) -> bool:
        return not (self.negotiated and self.negotiated.protocol & flag)

    def connect(
        self,
        address: str,
        hostname: str = "unknown",
        port: int = 25,
        macros: dict[str, str] | None = None,
    ) -> MilterReply | None:
        """SMFIC_CONNECT; None when the milter negotiated no reply."""
        if macros:
            self.macros("C", macros)
        family = b"6" if ":" in address else b"4"
        self._send("C", self._z(hostname) + family + struct.pack("!H", port) + self._z(address))
        return self._reply() if self._expect_reply(P_NR_CONN) else None

    def helo(self, name: str | bytes, macros: dict[str, str] | None = None) -> MilterReply | None:
        """SMFIC_HELO."""
        if macros:
            self.macros("H", macros)
        self._send("H", self._z(name))
        return self._reply() if self._expect_reply(P_NR_HELO) else None

    def mail(self, sender: str, macros: dict[str, str] | None = None) -> MilterReply | None:
        """SMFIC_MAIL."""
        if macros:
            self.macros("M", macros)
        self._send("M", self._z(f"<{sender}>"))
        return self._reply() if self._expect_reply(P_NR_MAIL) else None

    def rcpt(self, recipient: str, macros: dict[str, str] | None = None) -> MilterReply | None:
        """SMFIC_RCPT."""
        if macros:
            self.macros("R", macros)
        self._send("R", self._z(f"<{recipient}>"))
        return self._reply() if self._expect_reply(P_NR_RCPT) else None

    def abort(self) -> None:
        """SMFIC_ABORT (no reply)."""
        self._send("A")

    def quit(self) -> None:
        """SMFIC_QUIT: the session ends (no reply)."""
        with contextlib.suppress(OSError):
            self._send("Q")


@dataclass
class SessionResult:
    """What one scripted session got back."""

    connect: MilterReply | None = None
    helo: MilterReply | None = None
    mail: MilterReply | None = None
    rcpt: MilterReply | None = None

    def refusal(self) -> MilterReply | None:
        """The first reply that refused (as the MTA would answer it)."""
        for r in (self.connect, self.helo, self.mail, self.rcpt):
            if r is not None and r.refuses:
                return r
        return None


def run_session(
    address: str,
    *,
    ip: str,
    helo: str | bytes,
    sender: str = "rsk@gsp.org",
    rcpt: str = "postmaster@example.test",
    daemon_name: str = "mx",
    auth: str | None = None,
    stop_at_refusal: bool = True,
) -> SessionResult:
    """A whole session as an MTA would drive it (stops at the first refusal, like Postfix)."""
    out = SessionResult()
    with MilterClient(address) as c:
        c.negotiate()
        out.connect = c.connect(ip, macros={"{daemon_name}": daemon_name, "j": "mx.example.test"})
        if out.connect is not None and out.connect.code in ("r", "t", "y", "a"):
            c.quit()
            return out
        out.helo = c.helo(helo)
        if stop_at_refusal and out.helo is not None and out.helo.code in ("r", "t", "y", "a"):
            c.quit()
            return out
        mail_macros = {"{auth_authen}": auth} if auth else {"{auth_authen}": ""}
        out.mail = c.mail(sender, macros=mail_macros)
        if stop_at_refusal and out.mail is not None and out.mail.refuses:
            c.quit()
            return out
        if out.mail is not None and out.mail.code == "a":
            # accept for this message: an MTA sends this milter nothing more of it
            c.quit()
            return out
        out.rcpt = c.rcpt(rcpt)
        c.quit()
    return out
