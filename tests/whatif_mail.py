"""Mail really delivered by the tests' own Postfix and Sendmail, for ``heloguard whatif``.

``deliver_mail(dest, dns)`` runs a private Postfix (clients presented by
XCLIENT) and a private Sendmail (clients that really connect from their
addresses, inside its network namespace, with the test zones served on
127.0.0.1:53 in there so Sendmail does its own PTR and forward lookups), sends
the small set of messages in ``POSTFIX_MESSAGES`` and ``SENDMAIL_MESSAGES``
with no milter (this is mail already accepted), waits until the MTAs have
delivered them, and copies what they wrote into ``dest``:

* ``postfix_maildir``: the Maildir virtual(8) delivered into (alice@example.test);
* ``postfix_mbox``: the mbox virtual(8) wrote for bob@example.test;
* ``sendmail_mbox``: the mbox Sendmail's ``*file*`` mailer wrote (every recipient);
* ``postfix_log``: Postfix's maillog, with ``warn:`` lines for every RCPT
  (``check_client_access static:{WARN ...}``) and a ``reject:`` line for the
  client in ``REJECTED`` (a texthash ``check_client_access`` table), each
  with ``helo=<...>``;
* ``sendmail_log``: Sendmail's syslog lines (tag ``sm-mta``, as Debian's),
  ``relay=NAME [ADDR]`` per message (these syslog(3) lines carry no host name
  field: the receiver in tests/mta/sendmail.py writes them as they arrive);
* ``sent_folder``: the Sent folder of "our" user alice@example.test.  Not MTA
  output: a mail client writes this, so it is written here with ``mailbox``;
  it has no Received header, which is how ``whatif`` tells what our users wrote.
  Two messages that arrive are replies to it, and one comes from a domain
  it wrote to.

Both Postfix and Sendmail call themselves ``mx.example.test`` (``BY``) in the
Received headers they write; pass that as ``whatif --by``.

``Sent.name`` is what the receiving MTA was told or found: the XCLIENT NAME
for Postfix (``[UNAVAILABLE]`` for none; Postfix then writes ``unknown``), and
for Sendmail the PTR name the test zones give (``None`` for none).  Note that
the essay bot's PTR name has no address record in the zones, so a real Postfix
would have written ``unknown`` for it; XCLIENT NAME makes Postfix take the
name as verified, while Sendmail, doing its own lookups, writes it with
"(may be forged)".
"""

from __future__ import annotations

import email.utils
import mailbox
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import dns.reversename

from dnsserver import DNSServer
from mta.common import wait_until
from mta.postfix import TEST_DOMAIN, PrivatePostfix
from mta.sendmail import PrivateSendmail, ipv6_available
from mta.smtpclient import Transcript

ZONES = Path(__file__).resolve().parent / "zones"
BY = "mx.example.test"
ALICE = f"alice@{TEST_DOMAIN}"  # Postfix: the Maildir
BOB = f"bob@{TEST_DOMAIN}"  # Postfix: the mbox
REJECTED = "64.71.4.4"  # Postfix's check_client_access table REJECTs it
REJECT_TEXT = "no mail from out.listedcorp.net, heloguard whatif test"
WARN_TEXT = "heloguard whatif test"


@dataclass(frozen=True)
class Authored:
    """A message our user wrote (in the Sent folder)."""

    from_addr: str
    to: str
    message_id: str
    date: str
    subject: str


@dataclass(frozen=True)
class Sent:
    """One message a test client sent, and what became of it.

    ``mailbox``: which output holds it (``postfix_maildir``, ``postfix_mbox``,
    ``sendmail_mbox``), ``None`` if the MTA refused it (it is then only in
    the log).  ``queue_id`` is the MTA's id from its reply to the final dot
    (the ``id`` in the Received header it wrote), ``reply`` that reply, or the
    refusal.
    """

    label: str
    mta: str
    addr: str
    name: str | None
    helo: str
    mail_from: str
    rcpt: str
    message_id: str
    date: str
    subject: str
    in_reply_to: str | None = None
    references: tuple[str, ...] = ()
    mailbox: str | None = None
    queue_id: str = ""
    reply: str = ""

    @property
    def delivered(self) -> bool:
        return self.mailbox is not None


@dataclass(frozen=True)
class DeliveredMail:
    """Where the delivered mail and the logs are, and what was sent."""

    root: Path
    postfix_maildir: Path
    postfix_mbox: Path
    sendmail_mbox: Path
    postfix_log: Path
    sendmail_log: Path
    sent_folder: Path
    sent: tuple[Sent, ...]
    authored: tuple[Authored, ...]
    by: str = BY

    def delivered(self, mailbox_name: str) -> list[Sent]:
        return [s for s in self.sent if s.mailbox == mailbox_name]


# -- what is sent ------------------------------------------------------------------

_NOW = datetime.now(UTC).replace(microsecond=0)


def _date(days: float) -> str:
    return email.utils.format_datetime(_NOW - timedelta(days=days))


AUTHORED = (
    Authored(ALICE, "rsk@gsp.org", f"<lunch.1@{TEST_DOMAIN}>", _date(3), "lunch on Friday?"),
    Authored(
        ALICE,
        "sales@victoriakasunic.com",
        f"<quote.2@{TEST_DOMAIN}>",
        _date(2.5),
        "a quote for 40 chairs",
    ),
    Authored(
        ALICE,
        "discuss@lists.example.org",
        f"<list-post.3@{TEST_DOMAIN}>",
        _date(2),
        "anyone running heloguard?",
    ),
)
_LUNCH, _QUOTE, _LIST_POST = (a.message_id for a in AUTHORED)

ESSAY_BOT = {
    "addr": "103.245.153.249",
    "name": "103-245-153-249.host.neural.net.au",
    "helo": "mail.digitaljunction.com.au",
    "mail_from": "basicmark@victoriakasunic.com",
}
WELL_RUN = {
    "addr": "64.71.1.10",
    "name": "ukiah.firemountain.net",
    "helo": "ukiah.firemountain.net",
    "mail_from": "rsk@gsp.org",
}
WELL_RUN_V6 = {**WELL_RUN, "addr": "2600:3c00::10"}
NO_PTR = {  # 64.50.27.in-addr.arpa has no PTR for 99; its HELO name's A record is 27.50.64.99
    "addr": "27.50.64.99",
    "name": "[UNAVAILABLE]",
    "helo": "mail.digitaljunction.com.au",
    "mail_from": "jo@digitaljunction.com.au",
}


def _sent(label: str, mta: str, client: dict[str, str], rcpt: str, n: int, **kw: str) -> Sent:
    domain = client["mail_from"].rpartition("@")[2]
    refs: tuple[str, ...] = (kw["in_reply_to"],) if "in_reply_to" in kw else ()
    return Sent(
        label=label,
        mta=mta,
        addr=client["addr"],
        name=client["name"],
        helo=client["helo"],
        mail_from=client["mail_from"],
        rcpt=rcpt,
        message_id=f"<{mta}.{n}.{label.replace(' ', '-')}@{domain}>",
        date=_date(1 - n / 24),
        subject=kw.get("subject", label),
        in_reply_to=kw.get("in_reply_to"),
        references=refs,
        mailbox=kw.get("mailbox"),
    )


POSTFIX_MESSAGES = (
    # the essay's bot, from the domain alice asked for a quote
    _sent(
        "essay bot",
        "postfix",
        ESSAY_BOT,
        ALICE,
        1,
        subject="Re: a quote for 40 chairs",
        mailbox="postfix_maildir",
    ),
    _sent(
        "well-run server",
        "postfix",
        WELL_RUN,
        ALICE,
        2,
        subject="Re: lunch on Friday?",
        in_reply_to=_LUNCH,
        mailbox="postfix_maildir",
    ),
    # a reply to alice's list post, from a client without a PTR
    _sent(
        "no ptr reply",
        "postfix",
        NO_PTR,
        ALICE,
        3,
        subject="Re: anyone running heloguard?",
        in_reply_to=_LIST_POST,
        mailbox="postfix_maildir",
    ),
    _sent("well-run ipv6", "postfix", WELL_RUN_V6, BOB, 4, mailbox="postfix_mbox"),
    _sent("essay bot to bob", "postfix", ESSAY_BOT, BOB, 5, mailbox="postfix_mbox"),
    _sent(
        "rejected client",
        "postfix",
        {
            "addr": REJECTED,
            "name": "out.listedcorp.net",
            "helo": "out.listedcorp.net",
            "mail_from": "news@listedcorp.net",
        },
        ALICE,
        6,
    ),
)

SENDMAIL_MESSAGES = (
    _sent("essay bot", "sendmail", ESSAY_BOT, ALICE, 1, mailbox="sendmail_mbox"),
    _sent(
        "well-run server",
        "sendmail",
        WELL_RUN,
        ALICE,
        2,
        in_reply_to=_LUNCH,
        mailbox="sendmail_mbox",
    ),
    _sent(
        "no ptr reply",
        "sendmail",
        NO_PTR,
        ALICE,
        3,
        in_reply_to=_LIST_POST,
        mailbox="sendmail_mbox",
    ),
    _sent("well-run ipv6", "sendmail", WELL_RUN_V6, ALICE, 4, mailbox="sendmail_mbox"),
)


def body(s: Sent) -> str:
    """The message text: headers as a mail client writes them, and a line that an
    mbox writer must escape (">From ")."""
    head = [
        f"From: <{s.mail_from}>",
        f"To: <{s.rcpt}>",
        f"Subject: {s.subject}",
        f"Date: {s.date}",
        f"Message-ID: {s.message_id}",
    ]
    if s.in_reply_to:
        head.append(f"In-Reply-To: {s.in_reply_to}")
    if s.references:
        head.append(f"References: {' '.join(s.references)}")
    return "\n".join(
        [*head, "", f"{s.label}, sent by {s.addr}.", "From the test, with regards.", ""]
    )


def write_sent_folder(path: Path) -> None:
    """Alice's Sent folder, as her mail client keeps it (no Received header)."""
    box = mailbox.mbox(path)
    try:
        for a in AUTHORED:
            msg = mailbox.mboxMessage()
            msg["From"] = f"Alice <{a.from_addr}>"
            msg["To"] = f"<{a.to}>"
            msg["Subject"] = a.subject
            msg["Date"] = a.date
            msg["Message-ID"] = a.message_id
            msg.set_payload("Hello,\n\nwhat do you think?\n\nAlice\n")
            msg.set_from(a.from_addr, email.utils.parsedate_to_datetime(a.date).timetuple())
            box.add(msg)
        box.flush()
    finally:
        box.close()


# -- the MTAs ----------------------------------------------------------------------

# every RCPT logs a warn: line; the REJECTED client gets a reject: line too
POSTFIX_MAIN_CF = {
    "syslog_name": "postfix",  # as a real installation logs (not postfix-test)
    "smtpd_recipient_restrictions": (
        f"check_client_access static:{{WARN {WARN_TEXT}}}, "
        "check_client_access texthash:$config_directory/client_access, "
        "permit_mynetworks, reject_unauth_destination"
    ),
}
POSTFIX_MAP_FILES = {"client_access": f"{REJECTED}\tREJECT {REJECT_TEXT}\n"}


def _queue_id(t: Transcript) -> tuple[str, str]:
    """(queue id, reply text) of the reply to the final dot, or ("", first refusal)."""
    end = t.reply(".")
    if end is not None and 200 <= end.code < 300:
        words = end.text.split()
        # Postfix: "2.0.0 Ok: queued as 6AD1820C4A4"; Sendmail: "2.0.0 6B5G97Kx000022 Message..."
        qid = words[-1] if "queued as" in end.text else words[1]
        return qid, f"{end.code} {end.text}"
    for step in t.steps:
        if step.reply is not None and step.reply.failed:
            return "", f"{step.reply.code} {step.reply.text}"
    return "", str(t)


def _ptr(dns_server: DNSServer, addr: str) -> str | None:
    """The PTR name the test zones give addr (None if none)."""
    query = dns.message.make_query(dns.reversename.from_address(addr), dns.rdatatype.PTR)
    answer = dns.query.udp(query, dns_server.host, port=dns_server.port, timeout=2)
    if answer.rcode() != dns.rcode.NOERROR:
        return None
    for rrset in answer.answer:
        for rdata in rrset:
            return str(rdata).rstrip(".")
    return None


def _reachable_dir(prefix: str) -> Path:
    """A fresh folder that the MTAs' delivery users (nobody, daemon) can reach."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    os.chmod(path, 0o755)
    return path


def _count_maildir(path: Path) -> int:
    return sum(1 for sub in ("new", "cur") if (path / sub).is_dir() for _ in (path / sub).iterdir())


def _count_mbox(path: Path) -> int:
    if not path.exists() or path.stat().st_size == 0:
        return 0
    return sum(1 for line in path.read_bytes().splitlines() if line.startswith(b"From "))


def _sessions_logged(log: str) -> int:
    """Postfix sessions that ended, not counting the start-up probe from 127.0.0.1."""
    return sum(
        1
        for line in log.splitlines()
        if "postfix/smtpd[" in line and ": disconnect from " in line and "[127.0.0.1]" not in line
    )


def run_postfix(work: Path, messages: Sequence[Sent]) -> tuple[list[Sent], PrivatePostfix]:
    """Send ``messages`` through a delivering Postfix; returns them with their outcome.

    The caller gets the (stopped) instance to copy its files from, and cleans it up.
    """
    pf = PrivatePostfix(
        None,
        deliver_to=work / "postfix-mail",
        mbox_recipients=[BOB],
        extra_main_cf=POSTFIX_MAIN_CF,
        map_files=POSTFIX_MAP_FILES,
        directory=work / "postfix",
    )
    pf.start()
    done: list[Sent] = []
    try:
        for s in messages:
            t = pf.session(
                addr=s.addr,
                name=s.name,
                helo=s.helo,
                mail_from=s.mail_from,
                rcpt_to=s.rcpt,
                body=body(s),
            )
            qid, reply = _queue_id(t)
            if s.delivered != bool(qid):
                raise AssertionError(f"postfix {s.label}: expected delivered={s.delivered}:\n{t}")
            done.append(replace(s, queue_id=qid, reply=reply))
        want_maildir = sum(1 for s in done if s.mailbox == "postfix_maildir")
        want_mbox = sum(1 for s in done if s.mailbox == "postfix_mbox")
        wait_until(
            lambda: (
                _count_maildir(pf.maildir) == want_maildir
                and _count_mbox(pf.mbox_path(BOB)) == want_mbox
                and all(f"{s.queue_id}: removed" in pf.log() for s in done if s.queue_id)
                and _sessions_logged(pf.log()) == len(done)
            ),
            timeout=20,
            what="postfix to deliver every message",
        )
    except BaseException:
        pf.cleanup()
        raise
    pf.stop()
    return done, pf


def run_sendmail(
    work: Path, messages: Sequence[Sent], dns_server: DNSServer
) -> tuple[list[Sent], PrivateSendmail]:
    """Send ``messages`` through a Sendmail that delivers into one mbox.

    Sendmail looks the clients up itself: the test zones are served on
    127.0.0.1:53 inside its network namespace for as long as it runs.
    """
    if not ipv6_available():
        messages = [s for s in messages if ":" not in s.addr]
    mbox = work / "sendmail-mail" / "alice.mbox"
    sm = PrivateSendmail(None, mbox=mbox, log_tag="sm-mta", directory=work / "sendmail")
    sm.start()
    done: list[Sent] = []
    try:
        with sm.in_netns():
            inside = DNSServer(ZONES, host="127.0.0.1", port=53).start()
        try:
            for s in messages:
                t = sm.session(
                    addr=s.addr, helo=s.helo, mail_from=s.mail_from, rcpt_to=s.rcpt, body=body(s)
                )
                qid, reply = _queue_id(t)
                if s.delivered != bool(qid):
                    raise AssertionError(
                        f"sendmail {s.label}: expected delivered={s.delivered}:\n{t}"
                    )
                done.append(replace(s, name=_ptr(dns_server, s.addr), queue_id=qid, reply=reply))
        finally:
            inside.stop()
        # interactive delivery: written before the 250; the log line comes by syslog
        wait_until(
            lambda: (
                _count_mbox(mbox) == len(done)
                and all(f"{s.queue_id}: done" in sm.log() for s in done)
            ),
            timeout=10,
            what="sendmail to deliver every message",
        )
    except BaseException:
        sm.cleanup()
        raise
    sm.stop()
    return done, sm


def deliver_mail(dest: Path, dns_server: DNSServer) -> DeliveredMail:
    """Run both MTAs, deliver the messages, copy the results into ``dest``.

    ``dns_server`` is the test zones' server (the PTR names recorded for the
    Sendmail messages are its answers).  The MTAs work in a folder of their
    own under /tmp (virtual(8) and Sendmail's file mailer write as nobody and
    daemon, who cannot enter pytest's 0700 folders), removed afterwards.
    """
    dest.mkdir(parents=True, exist_ok=True)
    work = _reachable_dir("whatif-mta-")
    pf: PrivatePostfix | None = None
    sm: PrivateSendmail | None = None
    try:
        postfix_sent, pf = run_postfix(work, POSTFIX_MESSAGES)
        sendmail_sent, sm = run_sendmail(work, SENDMAIL_MESSAGES, dns_server)
        out = DeliveredMail(
            root=dest,
            postfix_maildir=dest / "postfix" / "Maildir",
            postfix_mbox=dest / "postfix" / "bob.mbox",
            sendmail_mbox=dest / "sendmail" / "alice.mbox",
            postfix_log=dest / "postfix" / "maillog",
            sendmail_log=dest / "sendmail" / "maillog",
            sent_folder=dest / "alice-sent.mbox",
            sent=(*postfix_sent, *sendmail_sent),
            authored=AUTHORED,
        )
        out.postfix_log.parent.mkdir()
        out.sendmail_log.parent.mkdir()
        shutil.copytree(pf.maildir, out.postfix_maildir)
        shutil.copyfile(pf.mbox_path(BOB), out.postfix_mbox)
        shutil.copyfile(pf.maillog_path, out.postfix_log)
        assert sm.mbox is not None
        shutil.copyfile(sm.mbox, out.sendmail_mbox)
        shutil.copyfile(sm.dir / "maillog", out.sendmail_log)
        write_sent_folder(out.sent_folder)
        return out
    finally:
        for server in (pf, sm):
            if server is not None:
                server.cleanup()
        if os.environ.get("HELOGUARD_KEEP_MTA_DIRS") is None:
            shutil.rmtree(work, ignore_errors=True)
