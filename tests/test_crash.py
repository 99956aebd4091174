"""Crashes and exceptions: the MTA is never left hanging, nothing committed is lost.

* kill -9 of ``heloguard serve`` while a real Postfix (configured from
  contrib/postfix/main.cf: ``milter_default_action = tempfail``) hands it
  sessions from 8 concurrent clients: while heloguard is dead Postfix defers
  by itself (4xx, nothing delivered, nothing refused for good); the greylist
  database passes ``PRAGMA integrity_check`` and holds every triplet whose
  greylisting reply reached a client before the kill; a restarted heloguard
  opens it cleanly and lets a retry of such a triplet through.
* Exceptions injected into a running daemon (in a rule's first call, in a
  rule after its DNS answers, in a MAIL-stage rule, in the greylist store,
  in the connect callback; and a decision-records file on a full disk) are
  logged with their traceback and answered per ``[milter] failure_policy``,
  under concurrent load, and the daemon keeps serving everyone else.
"""

from __future__ import annotations

import shutil
import sqlite3
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from miltertest import SessionResult, run_session

from mta.common import MTASetupError, is_ci
from mta.postfix import PrivatePostfix, contrib_main_cf, ensure_postfix
from mta.smtpclient import Transcript

pytestmark = pytest.mark.integration

GOOD: dict[str, Any] = {"ip": "64.71.1.10", "helo": "ukiah.firemountain.net"}
BOT: dict[str, Any] = {"ip": "103.245.153.249", "helo": "mail.digitaljunction.com.au"}


def contrib_settings(socket: str) -> dict[str, str]:
    """contrib/postfix/main.cf as settings, pointed at ``socket``."""
    settings = contrib_main_cf()
    assert settings["milter_default_action"] == "tempfail", "the snippet's default action"
    settings["smtpd_milters"] = socket
    return settings


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A folder Postfix's smtpd (user postfix) can enter: the socket and the database."""
    try:
        ensure_postfix()  # the group postfix must exist before heloguard chowns its socket
    except MTASetupError as exc:
        if is_ci():
            raise
        pytest.skip(f"postfix cannot be set up here: {exc}")
    folder = Path(tempfile.mkdtemp(prefix="hg-crash-"))
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def smtp(pf: PrivatePostfix, rcpt: str) -> Transcript:
    """One SMTP session through Postfix from the well-run client (XCLIENT)."""
    return pf.session(
        addr=GOOD["ip"],
        name="[UNAVAILABLE]",
        helo=GOOD["helo"],
        mail_from="rsk@gsp.org",
        rcpt_to=rcpt,
        timeout=30,
    )


def first_refusal(t: Transcript) -> tuple[str, int, str] | None:
    """(verb, code, text) of the first 4xx/5xx reply, None when nothing was refused."""
    for step in t.steps:
        if step.verb != "QUIT" and step.reply is not None and step.reply.failed:
            return step.verb, step.reply.code, step.reply.text
    return None


def test_kill_9_under_load_then_restart(
    start_milter: Any, dns_server: Any, shared_dir: Path, tmp_path: Path
) -> None:
    socket = f"unix:{shared_dir / 'heloguard.sock'}"
    database = shared_dir / "grey.sqlite"
    config = {
        "milter": {"socket": socket, "group": "postfix", "socket_mode": "0660"},
        "greylist": {"database": str(database), "policy": "all", "delay": "1s"},
        "log": {"passes": False},
    }
    first_dir, second_dir = tmp_path / "first", tmp_path / "second"
    first_dir.mkdir()
    second_dir.mkdir()
    m = start_milter(config, workdir=first_dir)
    settings = {**contrib_settings(f"unix:{shared_dir / 'heloguard.sock'}")}
    try:
        pf = PrivatePostfix(None, extra_main_cf=settings).start()
    except MTASetupError as exc:
        if is_ci():
            raise
        pytest.skip(f"postfix cannot be set up here: {exc}")
    try:
        acked: set[str] = set()  # recipients whose greylisting reply reached the client
        # (started, ended, recipient, transcript or the client's exception)
        outcomes: list[tuple[float, float, str, Transcript | BaseException]] = []
        lock = threading.Lock()
        stop = threading.Event()

        def client(n: int) -> None:
            i = 0
            while not stop.is_set():
                rcpt = f"crash-{n}-{i}@example.test"
                i += 1
                started = time.monotonic()
                try:
                    t: Transcript | BaseException = smtp(pf, rcpt)
                except Exception as exc:  # recorded: the test fails on any
                    t = exc
                with lock:
                    outcomes.append((started, time.monotonic(), rcpt, t))
                    if isinstance(t, Transcript):
                        r = t.reply("RCPT")
                        if r is not None and r.code == 451 and "Greylisted" in r.text:
                            acked.add(rcpt.lower())

        workers = [threading.Thread(target=client, args=(n,)) for n in range(8)]
        for w in workers:
            w.start()
        deadline = time.monotonic() + 20
        while len(acked) < 60 and time.monotonic() < deadline:
            time.sleep(0.05)
        killed_at = time.monotonic()
        m.proc.kill()  # SIGKILL: no clean-up of any kind
        m.proc.wait(10)
        time.sleep(1.0)  # the load goes on against a dead milter
        stop.set()
        for w in workers:
            w.join(60)
        with lock:
            acked_before_kill = set(acked)
            done = list(outcomes)

        # Postfix decided alone meanwhile: deferrals only, nothing delivered or refused for good
        assert len(acked_before_kill) >= 60, len(acked_before_kill)
        errors = [(rcpt, t) for _, _, rcpt, t in done if not isinstance(t, Transcript)]
        assert not errors, errors[:3]
        transcripts = [(end, t) for _, end, _, t in done if isinstance(t, Transcript)]
        cut = [t for start, end, _, t in done if start < killed_at < end]
        assert cut, "no session was in flight when heloguard was killed"
        assert not any(t.delivered for _, t in transcripts), "a first attempt got through"
        refusals = [first_refusal(t) for _, t in transcripts]
        assert all(r is not None and 400 <= r[1] < 500 for r in refusals), [
            r for r in refusals if r is None or r[1] >= 500
        ][:3]
        after_kill = [
            first_refusal(t) for at, t in transcripts if at > killed_at + 0.2
        ]  # sessions begun after the kill (ended 0.2 s after it at least)
        by_postfix = [r for r in after_kill if r is not None and "Greylisted" not in r[2]]
        assert by_postfix, "no session was deferred by Postfix's default action"
        assert all(r[1] == 451 and "4.7.1" in r[2] for r in by_postfix), by_postfix[:3]
        assert "milter" in pf.log(), "Postfix logged nothing about the dead milter"

        # the database: intact, and nothing acknowledged is lost
        conn = sqlite3.connect(database)
        try:
            assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
            stored = {str(r) for (r,) in conn.execute("SELECT rcpt FROM triplets")}
        finally:
            conn.close()
        missing = acked_before_kill - stored
        assert not missing, (len(missing), sorted(missing)[:5])

        # restart on the same socket (left behind by the killed process) and database
        m2 = start_milter(config, workdir=second_dir)
        log = m2.wait_for("greylisting with")
        assert "unusable" not in log and "database failure" not in log, log
        time.sleep(1.1)  # the greylisting delay has passed for every acknowledged triplet
        retry = sorted(acked_before_kill)[0]
        again = smtp(pf, retry)
        assert again.delivered, again
        fresh = smtp(pf, "after-restart@example.test")
        rcpt = fresh.reply("RCPT")
        assert rcpt is not None and rcpt.code == 451 and "Greylisted" in rcpt.text, fresh
        m2.wait_for("greylist: retried after")
    finally:
        pf.stop()
        pf.cleanup()


# -- exceptions inside a running daemon ------------------------------------------

# Started as ``python -c FAULTY serve ...``: heloguard with faults injected for
# chosen clients, senders and recipients only.
FAULTY = """\
import dataclasses, sys
from heloguard.rules import REGISTRY
from heloguard import gate, greylist

def first_call(rule):  # raises when the rule is called
    def check(ctx, opts):
        if str(ctx.client) == "64.71.1.12":
            raise RuntimeError("injected fault: first call")
        return rule.check(ctx, opts)
    return check

def after_dns(rule):  # raises when the rule is handed its DNS answers
    def check(ctx, opts):
        gen = rule.check(ctx, opts)
        if str(ctx.client) != "64.71.2.1":
            return gen
        def wrapped():
            yield next(gen)
            raise RuntimeError("injected fault: after DNS")
        return wrapped()
    return check

def at_mail(rule):
    def check(ctx, opts):
        if ctx.sender == "boom@gsp.org":
            raise RuntimeError("injected fault: MAIL stage")
        return rule.check(ctx, opts)
    return check

for name, wrap in (("helo_resolves", first_call), ("fcrdns", after_dns), ("sender_mx", at_mail)):
    REGISTRY[name] = dataclasses.replace(REGISTRY[name], check=wrap(REGISTRY[name]))

check = greylist.Greylist.check
def grey_check(self, client, sender, rcpt):
    if rcpt == "boom@example.test":
        raise RuntimeError("injected fault: greylist store")
    return check(self, client, sender, rcpt)
greylist.Greylist.check = grey_check

skip_reason = gate.Gate.skip_reason
def gate_skip(self, client, daemon_name):
    if str(client) == "64.71.1.11":
        raise RuntimeError("injected fault: connect")
    return skip_reason(self, client, daemon_name)
gate.Gate.skip_reason = gate_skip

from heloguard.cli import main
sys.exit(main())
"""

# (what, session arguments, where the fault strikes)
CASES: list[tuple[str, dict[str, Any], str]] = [
    ("rule, first call", {"ip": "64.71.1.12", "helo": "relay.goodcorp.net"}, "helo"),
    ("rule, after DNS", {"ip": "64.71.2.1", "helo": "smtp.goodcorp.net"}, "helo"),
    ("MAIL-stage rule", {**GOOD, "sender": "boom@gsp.org"}, "mail"),
    ("greylist store", {**GOOD, "rcpt": "boom@example.test"}, "rcpt"),
    ("connect callback", {"ip": "64.71.1.11", "helo": "taos.firemountain.net"}, "helo"),
]
TRACEBACKS = [
    "injected fault: first call",
    "injected fault: after DNS",
    "injected fault: MAIL stage",
    "injected fault: greylist store",
    "injected fault: connect",
]


def greylisted(r: SessionResult) -> bool:
    """Refused only by greylisting, at RCPT."""
    refusal = r.refusal()
    return refusal is r.rcpt and refusal is not None and "Greylisted" in refusal.text


def in_parallel(jobs: list[Callable[[], SessionResult]], workers: int = 16) -> list[Any]:
    with ThreadPoolExecutor(workers) as pool:
        futures = [pool.submit(job) for job in jobs]
        out: list[Any] = []
        for f in futures:
            try:
                out.append(f.result(timeout=60))
            except Exception as exc:  # kept: the test asserts there are none
                out.append(exc)
        return out


@pytest.mark.parametrize("policy", ["tempfail", "accept"])
def test_injected_exceptions_follow_failure_policy_under_load(
    start_milter: Any, tmp_path: Path, policy: str
) -> None:
    m = start_milter(
        {
            "milter": {"failure_policy": policy},
            "greylist": {"database": str(tmp_path / "g.sqlite"), "policy": "all"},
        },
        argv_prefix=[sys.executable, "-c", FAULTY],
    )

    def job(args: dict[str, Any]) -> Callable[[], SessionResult]:
        return lambda: run_session(m.socket, **args)

    rounds = 4
    jobs = [job(args) for _ in range(rounds) for _, args, _ in CASES]
    jobs += [job(GOOD) for _ in range(rounds)] + [job(BOT) for _ in range(rounds)]
    results = in_parallel(jobs)
    assert not [r for r in results if not isinstance(r, SessionResult)], results
    for i, r in enumerate(results[: rounds * len(CASES)]):
        what, _, where = CASES[i % len(CASES)]
        reply = getattr(r, where)
        assert reply is not None, (what, r)
        if policy == "tempfail":
            assert reply.smtp_code == 451 and "4.3.0" in reply.text, (what, reply)
            assert r.refusal() is reply, (what, r)
        else:  # the session goes on; greylisting (policy all) may still defer it
            assert reply.code == "c", (what, reply)
            assert r.refusal() is None or greylisted(r), (what, r)
    good = results[rounds * len(CASES) : rounds * len(CASES) + rounds]
    bots = results[rounds * len(CASES) + rounds :]
    assert all(greylisted(r) for r in good), good
    assert all(r.helo is not None and r.helo.smtp_code == 550 for r in bots), bots
    for text in TRACEBACKS:  # logged from many threads: in any order
        log = m.wait_for(text)
    assert log.count("Traceback") >= len(CASES), log
    assert m.proc.poll() is None, "the daemon must keep serving"
    after = run_session(m.socket, **BOT)
    assert after.helo is not None and after.helo.smtp_code == 550


@pytest.mark.parametrize("policy", ["tempfail", "accept"])
def test_full_disk_under_decision_records(start_milter: Any, policy: str) -> None:
    """Writing a decision record fails (ENOSPC): an internal error, answered per policy.

    Records are written by the log writer a moment after the decision, so the
    first session finds the disk full only after its HELO reply (its MAIL
    reply may or may not see the failure, depending on when the writer ran);
    from then on every judged session is answered per ``failure_policy``.
    """
    m = start_milter(
        {"milter": {"failure_policy": policy}, "log": {"decisions": "/dev/full"}},
    )
    first = run_session(m.socket, **GOOD)
    assert first.helo is not None and first.helo.code == "c", first
    m.wait_for("decision records: cannot write /dev/full: No space left on device")
    results = in_parallel([lambda: run_session(m.socket, **GOOD) for _ in range(8)])
    for r in results:
        assert isinstance(r, SessionResult), r
        if policy == "tempfail":
            assert r.helo is not None and r.helo.smtp_code == 451 and "4.3.0" in r.helo.text
        else:
            assert r.refusal() is None, r
    log = m.wait_for("HELO callback failed")
    assert "decision records: cannot write /dev/full: No space left on device" in log
    skip = run_session(m.socket, ip="127.0.0.1", helo="localhost")
    assert skip.refusal() is None, "a client that is not judged writes no record"
    assert m.proc.poll() is None
