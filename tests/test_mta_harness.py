"""Proof that tests/mta drives a milter end to end through a real Postfix and Sendmail.

A tiny pymilter milter (ProbeMilter, below) runs in a subprocess (libmilter runs
once per process), logs every callback with what the MTA told it, and rejects at
HELO when the name is bot.example.test.  The same checks run through Postfix
(client identity by XCLIENT) and Sendmail (client identity by a socket really
bound to that address in Sendmail's private network namespace).

Gating: with CI=true every setup failure fails the tests; elsewhere they skip,
with the reason, only when an MTA cannot be set up (not root, no apt...).
Run alone: ``PYTHONSAFEPATH=1 .venv/bin/pytest -q tests/test_mta_harness.py``.
"""

from __future__ import annotations

import ipaddress
import itertools
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import Milter
import pytest

# tests/ has no __init__.py: make tests/mta importable as the package "mta".
_TESTS = str(Path(__file__).resolve().parent)
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)

from mta.common import MTASetupError, is_ci, wait_until  # noqa: E402
from mta.postfix import PrivatePostfix  # noqa: E402
from mta.sendmail import PrivateSendmail, ipv6_available  # noqa: E402
from mta.smtpclient import Transcript  # noqa: E402

pytestmark = pytest.mark.integration

REJECT_HELO = "bot.example.test"
MACROS = (
    "j",
    "_",
    "{daemon_name}",
    "{client_addr}",
    "{client_name}",
    "{client_ptr}",
    "{client_resolve}",
    "{auth_type}",
    "{auth_authen}",
    "{mail_addr}",
    "i",
)


# --------------------------------------------------------------------------
# The milter (runs in a subprocess: python tests/test_mta_harness.py --probe-milter)
# --------------------------------------------------------------------------
class ProbeMilter(Milter.Base):  # type: ignore[misc]  # pymilter is untyped
    """Logs each callback as a JSON line; rejects HELO bot.example.test at HELO."""

    logfile = ""
    _ids = itertools.count(1)
    _lock = threading.Lock()

    def __init__(self) -> None:
        self.sid = next(self._ids)

    def _log(self, cb: str, **fields: Any) -> None:
        macros = {m: v for m in MACROS if (v := self.getsymval(m)) is not None}
        record = {"sid": self.sid, "cb": cb, "macros": macros, **fields}
        with self._lock, open(self.logfile, "a", encoding="utf-8") as out:
            out.write(json.dumps(record) + "\n")

    def connect(self, hostname: str, family: int, hostaddr: Any) -> int:
        addr = list(hostaddr) if isinstance(hostaddr, tuple) else hostaddr
        self._log("connect", hostname=hostname, family=int(family), hostaddr=addr)
        return Milter.CONTINUE  # type: ignore[no-any-return]

    def hello(self, hostname: str) -> int:
        self._log("helo", helo=hostname)
        if hostname == REJECT_HELO:
            self.setreply("550", "5.7.1", "test reject")
            return Milter.REJECT  # type: ignore[no-any-return]
        return Milter.CONTINUE  # type: ignore[no-any-return]

    def envfrom(self, mailfrom: str, *params: str) -> int:
        self._log("envfrom", mailfrom=mailfrom)
        return Milter.CONTINUE  # type: ignore[no-any-return]

    def envrcpt(self, rcpt: str, *params: str) -> int:
        self._log("envrcpt", rcpt=rcpt)
        return Milter.CONTINUE  # type: ignore[no-any-return]

    def eom(self) -> int:
        self._log("eom")
        return Milter.CONTINUE  # type: ignore[no-any-return]

    def close(self) -> int:
        self._log("close")
        return Milter.CONTINUE  # type: ignore[no-any-return]


def run_probe_milter(sock: str, logfile: str) -> None:
    ProbeMilter.logfile = logfile
    Milter.factory = ProbeMilter
    os.umask(0o000)  # Postfix's smtpd runs as user postfix and must connect
    Milter.runmilter("probe", f"unix:{sock}", 30)


# --------------------------------------------------------------------------
# Test-side handle on the milter process and its log
# --------------------------------------------------------------------------
Record = dict[str, Any]


class ProbeMilterProcess:
    def __init__(self) -> None:
        # Not under pytest's tmp dirs: those are 0700, and smtpd (user
        # postfix) must reach the socket.
        self.dir = Path(tempfile.mkdtemp(prefix="probe-milter-"))
        os.chmod(self.dir, 0o755)
        self.socket = self.dir / "milter.sock"
        self.logfile = self.dir / "milter.jsonl"
        self.logfile.touch()
        self._out = open(self.dir / "milter.out", "wb")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--probe-milter", str(self.socket), str(self.logfile)],
            stdout=self._out,
            stderr=subprocess.STDOUT,
            env=dict(os.environ, PYTHONSAFEPATH="1"),
        )
        try:
            wait_until(self._accepts, timeout=20, what="probe milter socket", alive=self._dead)
        except BaseException:
            self.stop()
            raise

    @property
    def spec(self) -> str:
        """The socket as both Postfix and Sendmail spell it."""
        return f"unix:{self.socket}"

    def _dead(self) -> str | None:
        if self.proc.poll() is None:
            return None
        return "milter exited: " + (self.dir / "milter.out").read_text(errors="replace")

    def _accepts(self) -> bool:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            try:
                s.connect(str(self.socket))
            except OSError:
                return False
            return True

    def stop(self) -> None:
        # SIGKILL: pymilter takes 5-10 s to exit on SIGTERM (mta-facts.md)
        self.proc.kill()
        self.proc.wait(timeout=10)
        self._out.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def mark(self) -> int:
        """Position in the log; records() after it are new."""
        return len(self.logfile.read_text().splitlines())

    def records(self, since: int = 0) -> list[Record]:
        lines = self.logfile.read_text().splitlines()[since:]
        return [json.loads(line) for line in lines if line.strip()]

    def session(self, since: int, addr: str, timeout: float = 10.0) -> list[Record]:
        """The callbacks of the (closed) milter session whose client was addr."""
        want = ipaddress.ip_address(addr)
        found: list[Record] = []

        def closed_session() -> bool:
            recs = self.records(since)
            sids = [
                r["sid"]
                for r in recs
                if r["cb"] == "connect"
                and isinstance(r["hostaddr"], list)
                and ipaddress.ip_address(r["hostaddr"][0]) == want
            ]
            if not sids:
                return False
            mine = [r for r in recs if r["sid"] == sids[-1]]
            if mine[-1]["cb"] != "close":
                return False
            found[:] = mine
            return True

        wait_until(closed_session, timeout=timeout, what=f"milter session from {addr}")
        return found


# --------------------------------------------------------------------------
# Fixtures: gated setup
# --------------------------------------------------------------------------
T = TypeVar("T")


def set_up(what: str, factory: Callable[[], T]) -> T:
    """factory(), or: fail under CI=true / skip elsewhere, saying why."""
    if os.geteuid() != 0:
        reason = f"{what}: needs root (apt, namespaces, a private MTA)"
    else:
        try:
            return factory()
        except (MTASetupError, OSError, subprocess.SubprocessError) as exc:
            reason = f"{what} could not be set up: {exc}"
    if is_ci():
        pytest.fail(f"CI=true: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def milter() -> Iterator[ProbeMilterProcess]:
    proc = set_up("probe milter", ProbeMilterProcess)
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def postfix(milter: ProbeMilterProcess) -> Iterator[PrivatePostfix]:
    with set_up("Postfix", lambda: PrivatePostfix(milter.spec).start()) as pf:
        yield pf


@pytest.fixture(scope="module")
def sendmail(milter: ProbeMilterProcess) -> Iterator[PrivateSendmail]:
    with set_up("Sendmail", lambda: PrivateSendmail(milter.spec).start()) as sm:
        yield sm


MTA = PrivatePostfix | PrivateSendmail


@pytest.fixture(params=["postfix", "sendmail"])
def mta(request: pytest.FixtureRequest) -> MTA:
    server: MTA = request.getfixturevalue(request.param)
    return server


def context(t: Transcript, server: MTA) -> str:
    """Assertion message: the transcript and the MTA's log tail."""
    return f"\n{t}\n--- {type(server).__name__} log ---\n{server.log()[-3000:]}"


def logged(server: MTA, text: str, timeout: float = 5.0) -> bool:
    """Does text show up in the MTA's log (written asynchronously) within timeout?"""
    try:
        wait_until(lambda: text in server.log(), timeout=timeout, what=repr(text))
    except MTASetupError:
        return False
    return True


# --------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------
def test_helo_reject_comes_back_at_mail_from(mta: MTA, milter: ProbeMilterProcess) -> None:
    """A HELO-stage 550 is answered at MAIL FROM, with the milter's text; no DATA."""
    since = milter.mark()
    t = mta.session(
        addr="103.245.153.249",
        helo=REJECT_HELO,
        mail_from="sender@example.test",
        rcpt_to="user@example.test",
    )
    ehlo, mail = t.reply("EHLO"), t.reply("MAIL")
    assert ehlo is not None and ehlo.code == 250, context(t, mta)
    assert mail is not None and mail.code == 550 and "test reject" in mail.text, context(t, mta)
    assert t.rejected_at == "MAIL" and not t.reached_data, context(t, mta)

    seen = milter.session(since, "103.245.153.249")
    assert [r["cb"] for r in seen] == ["connect", "helo", "close"]
    assert seen[1]["helo"] == REJECT_HELO


def test_clean_client_delivers(mta: MTA, milter: ProbeMilterProcess) -> None:
    """Control: an ordinary HELO goes through to 250 after the final dot, without delay."""
    since = milter.mark()
    started = time.monotonic()
    t = mta.session(
        addr="192.0.2.25",
        helo="mail.example.test",
        mail_from="sender@example.test",
        rcpt_to="user@example.test",
    )
    elapsed = time.monotonic() - started
    assert t.delivered, context(t, mta)
    assert t.rejected_at is None, context(t, mta)
    # a DNS wait (1 s resolver timeout in Sendmail's namespace) would show here
    assert elapsed < 2.0, f"session took {elapsed:.2f}s: something waited" + context(t, mta)

    seen = milter.session(since, "192.0.2.25")
    assert [r["cb"] for r in seen] == ["connect", "helo", "envfrom", "envrcpt", "eom", "close"]


@pytest.mark.parametrize(
    ("addr", "helo"),
    [("192.0.2.25", "mail.example.test"), ("2001:db8::25", "v6.example.test")],
)
def test_milter_sees_presented_client(
    mta: MTA, milter: ProbeMilterProcess, addr: str, helo: str
) -> None:
    """The milter is told the presented address (hostaddr and {client_addr}) and HELO."""
    if ":" in addr and not ipv6_available():
        pytest.skip("this kernel has no IPv6")
    since = milter.mark()
    t = mta.session(
        addr=addr, helo=helo, mail_from="sender@example.test", rcpt_to="user@example.test"
    )
    assert t.delivered, context(t, mta)
    seen = milter.session(since, addr)
    connect, hello = seen[0], seen[1]
    assert connect["cb"] == "connect" and hello["cb"] == "helo"
    assert ipaddress.ip_address(connect["hostaddr"][0]) == ipaddress.ip_address(addr)
    ip = ipaddress.ip_address(addr)
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    assert connect["family"] == family
    # {client_addr}: "IPv6:..." for IPv6; Sendmail writes it uncompressed
    client_addr = connect["macros"]["{client_addr}"]
    assert ipaddress.ip_address(client_addr.removeprefix("IPv6:")) == ip
    assert client_addr.startswith("IPv6:") == (ip.version == 6)
    assert hello["helo"] == helo


def stale_socket(path: Path) -> str:
    """A unix socket file nobody listens on: a crashed milter (ECONNREFUSED)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(str(path))
    return f"unix:{path}"


def test_postfix_milter_down_default_action(tmp_path: Path) -> None:
    """Postfix 3.7 milter_default_action = tempfail: 250 to EHLO, then 451 4.7.1 at MAIL."""
    spec = stale_socket(tmp_path / "down.sock")
    with set_up("Postfix", lambda: PrivatePostfix(spec).start()) as pf:
        t = pf.session(
            addr="192.0.2.25",
            name="mail.example.test",
            helo="mail.example.test",
            mail_from="sender@example.test",
            rcpt_to="user@example.test",
        )
        mail = t.reply("MAIL")
        assert t.reply("EHLO") is not None, context(t, pf)
        assert mail is not None and mail.code == 451, context(t, pf)
        assert mail.text.startswith("4.7.1 "), context(t, pf)
        assert not t.reached_data
        assert logged(pf, "warning: connect to Milter service"), pf.log()


@pytest.mark.parametrize(
    ("flags", "expect"),
    [("", "delivered"), ("T", "451 4.3.2")],
    ids=["no-F-continue", "F=T-tempfail"],
)
def test_sendmail_milter_down_default_action(tmp_path: Path, flags: str, expect: str) -> None:
    """Sendmail: no F= flag carries on as if the milter were absent; F=T gives 451 4.3.2."""
    spec = stale_socket(tmp_path / "down.sock")
    with set_up("Sendmail", lambda: PrivateSendmail(spec, milter_flags=flags).start()) as sm:
        t = sm.session(
            addr="192.0.2.25",
            helo="mail.example.test",
            mail_from="sender@example.test",
            rcpt_to="user@example.test",
        )
        if expect == "delivered":
            assert t.delivered, context(t, sm)
        else:
            mail = t.reply("MAIL")
            assert mail is not None, context(t, sm)
            assert f"{mail.code} {mail.text}".startswith(expect), context(t, sm)
            assert not t.reached_data
        assert logged(sm, "Milter (test): to error state"), sm.log()


@pytest.mark.parametrize("login", [None, "someone"], ids=["no-login", "login"])
def test_postfix_xclient_login_sets_auth_authen(
    postfix: PrivatePostfix, milter: ProbeMilterProcess, login: str | None
) -> None:
    """XCLIENT LOGIN=x shows the milter {auth_authen}=x at MAIL (no SASL setup needed)."""
    since = milter.mark()
    t = postfix.session(
        addr="198.51.100.7",
        name="[UNAVAILABLE]",
        helo="client.example.test",
        mail_from="sender@example.test",
        rcpt_to="user@example.test",
        login=login,
        data=False,
    )
    assert t.reply("RCPT") is not None, context(t, postfix)
    envfrom = next(r for r in milter.session(since, "198.51.100.7") if r["cb"] == "envfrom")
    assert envfrom["macros"].get("{auth_authen}") == login
    if login is not None:
        assert envfrom["macros"]["{auth_type}"] == "XCLIENT"


if __name__ == "__main__" and sys.argv[1:2] == ["--probe-milter"]:
    run_probe_milter(sys.argv[2], sys.argv[3])
