"""The pymilter adapter: libmilter callbacks in, :class:`~heloguard.session.Session` steps out.

Nothing is decided here.  Each callback takes the MTA's arguments, asks the
session, and turns its step into a libmilter reply (``setreply`` plus a
return code).  libmilter calls back on many threads, one callback at a time
per connection; the session of a connection lives on this object.

Negotiation: heloguard uses connect, helo, envfrom and envrcpt; every other
callback (data, headers, body, unknown commands) is declined, so the MTA
never sends them, and connect is marked no-reply (it never refuses: a
connect-time reply loses its text in both MTAs).  A MAIL step of ACCEPT
(nothing left to judge at RCPT) is libmilter's accept-this-message.  pymilter 1.0.5's
``@symlist`` passes bytes where its C layer wants str, and its ``negotiate``
swallows the TypeError and gives up negotiating altogether; ``negotiate``
below asks for the macros itself, with str arguments.

Failures: any exception in a callback is logged with its traceback and
answered per ``[milter] failure_policy`` (451 4.3.0, or accept); the daemon
keeps serving.  HELO and addresses that are not valid UTF-8 never reach
these methods: pymilter answers them 451 4.3.0 itself.
"""

from __future__ import annotations

import logging
import socket
import threading
from typing import Any, ClassVar

import Milter

from heloguard.logfmt import reply_text
from heloguard.session import Act, Runtime, Session, Step

log = logging.getLogger("heloguard.milter")

# The macros heloguard reads, per stage (Postfix and Sendmail send only these).
CONNECT_MACROS = "{daemon_name}"
ENVFROM_MACROS = "{auth_authen}"

_RETURN = {
    Act.CONTINUE: int(Milter.CONTINUE),
    Act.ACCEPT: int(Milter.ACCEPT),
    Act.REJECT: int(Milter.REJECT),
    Act.TEMPFAIL: int(Milter.TEMPFAIL),
}


class RuntimeHolder:
    """The current runtime; a reload swaps it, sessions keep the one they started with."""

    def __init__(self, runtime: Runtime) -> None:
        self._lock = threading.Lock()
        self._runtime = runtime

    @property
    def current(self) -> Runtime:
        """The runtime new connections get (reading one attribute needs no lock)."""
        return self._runtime

    def swap(self, runtime: Runtime) -> Runtime:
        """Install a new runtime and return the old one."""
        with self._lock:
            old, self._runtime = self._runtime, runtime
            return old


class HeloguardMilter(Milter.Base):  # type: ignore[misc]  # pymilter has no type hints
    """One instance per SMTP connection."""

    holder: ClassVar[RuntimeHolder]

    def __init__(self) -> None:
        self.session: Session | None = None
        self.failure_policy = self.holder.current.config.milter.failure_policy

    # -- negotiation --------------------------------------------------------

    def negotiate(self, opts: list[int]) -> int:
        """Decline unused callbacks, mark connect no-reply, ask for our macros."""
        try:
            actions, protocol, _, _ = opts
            self._actions = actions
            if actions & Milter.SETSYMLIST:
                # str arguments: the pymilter 1.0.5 @symlist path passes bytes and fails
                self._ctx.setsymlist(Milter.M_CONNECT, CONNECT_MACROS)
                self._ctx.setsymlist(Milter.M_ENVFROM, ENVFROM_MACROS)
            opts[0] = actions & Milter.SETSYMLIST  # we change no message: no other action
            opts[1] = self._protocol = protocol & ~self.protocol_mask()
            opts[2] = opts[3] = 0
        except Exception:
            log.exception("negotiation failed; continuing with the MTA's defaults")
            return int(Milter.ALL_OPTS)
        return int(Milter.CONTINUE)

    # -- callbacks ----------------------------------------------------------

    @Milter.noreply  # type: ignore[untyped-decorator]  # pymilter has no type hints
    def connect(self, hostname: str, family: int, hostaddr: Any) -> int:
        """The MTA tells us who connected; ``hostname`` is not evidence."""
        try:
            self.session = Session(self.holder.current)
            self.failure_policy = self.session.rt.config.milter.failure_policy
            address = None
            if family in (socket.AF_INET, socket.AF_INET6) and isinstance(hostaddr, tuple):
                address = str(hostaddr[0])
            self.session.connect(address, self._macro("{daemon_name}"))
        except Exception:
            log.exception("connect callback failed")
            self.session = None
        return int(Milter.CONTINUE)

    def hello(self, hostname: str) -> int:
        """HELO/EHLO: the verdict."""
        try:
            return self._answer(self._session().helo(hostname))
        except Exception:  # noqa: BLE001 - logged there; a callback never crashes the daemon
            return self._failed("HELO")

    def envfrom(self, sender: str, *params: str) -> int:
        """MAIL FROM."""
        try:
            auth = self._macro("{auth_authen}")
            return self._answer(self._session().mail(_strip(sender), auth))
        except Exception:  # noqa: BLE001 - logged there; a callback never crashes the daemon
            return self._failed("MAIL")

    def envrcpt(self, recipient: str, *params: str) -> int:
        """RCPT TO."""
        try:
            return self._answer(self._session().rcpt(_strip(recipient)))
        except Exception:  # noqa: BLE001 - logged there; a callback never crashes the daemon
            return self._failed("RCPT")

    def eom(self) -> int:
        """End of message: nothing to do (heloguard never reads DATA)."""
        return int(Milter.CONTINUE)

    def abort(self) -> int:
        """The message was aborted (RSET or a refused command)."""
        if self.session is not None:
            self.session.abort()
        return int(Milter.CONTINUE)

    def close(self) -> int:
        """The connection ended: free the session."""
        if self.session is not None:
            self.session.close()
        self.session = None
        return int(Milter.CONTINUE)

    # -- helpers ------------------------------------------------------------

    def _macro(self, name: str) -> str | None:
        try:
            value = self.getsymval(name)
        except Exception:  # noqa: BLE001 - no context, or the MTA did not send it
            return None
        return str(value) if value else None

    def _session(self) -> Session:
        if self.session is None:
            raise RuntimeError("no session (connect failed or was not called)")
        return self.session

    def _answer(self, step: Step) -> int:
        """The libmilter return code of a step, its reply set first."""
        r = step.reply
        if r is not None:
            self.setreply(str(r.code), r.status, reply_text(r.text))
        return _RETURN[step.act]

    def _failed(self, stage: str) -> int:
        """A callback raised: log it, answer per the failure policy."""
        log.exception("%s callback failed; failure policy %s", stage, self.failure_policy)
        if self.failure_policy == "accept":
            return int(Milter.CONTINUE)
        try:
            self.setreply("451", "4.3.0", "Temporary local problem; try again later")
        except Exception:
            log.exception("setreply failed")
        return int(Milter.TEMPFAIL)


def _strip(address: str) -> str:
    address = address.strip()
    if address.startswith("<") and address.endswith(">"):
        return address[1:-1]
    return address
