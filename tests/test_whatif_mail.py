"""The ``whatif`` test inputs are what the real MTAs wrote (tests/whatif_mail.py).

Run with ``-s`` to see the top Received header of every delivered message.
"""

from __future__ import annotations

import ipaddress
import mailbox
import re
from email.message import Message
from pathlib import Path

import pytest

from whatif_mail import BY, REJECT_TEXT, REJECTED, WARN_TEXT, DeliveredMail, Sent

pytestmark = pytest.mark.integration

# "by mx.example.test (Postfix) with ESMTP id 6AD1820C4A4" /
# "by mx.example.test (8.17.1.9/8.17.1.9) with ESMTP id 6B5G97Kx000022"
BY_LINE = {
    "postfix": re.compile(rf"\bby {re.escape(BY)} \(Postfix\) with ESMTP id (\w+)\b"),
    "sendmail": re.compile(rf"\bby {re.escape(BY)} \(8\.[\d.]+/8\.[\d.]+\) with ESMTP id (\w+)\b"),
}
# "from HELO (NAME [ADDR])" or, Sendmail without a PTR, "from HELO ([ADDR])"
FROM_PART = re.compile(
    r"^from (?P<helo>\S+) \((?:(?P<name>[^\s\[\]()]+) )?\[(?:IPv6:)?(?P<addr>[0-9A-Fa-f:.]+)\]"
    r"(?P<forged> \(may be forged\))?\)"
)


def unfold(header: str) -> str:
    return re.sub(r"\s+", " ", header).strip()


def read_maildir(path: Path) -> list[Message]:
    box = mailbox.Maildir(path, create=False)
    return [box[key] for key in box.keys()]  # noqa: SIM118 (a Mailbox is not a Mapping)


def read_mbox(path: Path) -> list[Message]:
    box = mailbox.mbox(path, create=False)
    try:
        return [box[key] for key in box.keys()]  # noqa: SIM118
    finally:
        box.close()


def by_message_id(found: list[Message]) -> dict[str, Message]:
    out = {str(m["Message-ID"]): m for m in found}
    assert len(out) == len(found), "Message-IDs repeat"
    return out


def expected_name(s: Sent) -> str | None:
    """The client name the MTA writes in its Received header."""
    if s.mta == "postfix":
        return "unknown" if s.name in (None, "[UNAVAILABLE]") else s.name
    return s.name  # Sendmail: its own PTR lookup; no name when there is no PTR


def check_top_received(s: Sent, msg: Message) -> str:
    received = msg.get_all("Received") or []
    assert len(received) == 1, (s.label, received)  # no hop before the MTA's own
    top = unfold(str(received[0]))
    by = BY_LINE[s.mta].search(top)
    assert by is not None and by.group(1) == s.queue_id, (s.label, s.queue_id, top)
    m = FROM_PART.match(top)
    assert m is not None, (s.label, top)
    assert m["helo"] == s.helo, (s.label, top)
    assert ipaddress.ip_address(m["addr"]) == ipaddress.ip_address(s.addr), (s.label, top)
    assert m["name"] == expected_name(s), (s.label, top)
    # Sendmail found the bot's PTR name has no address record; XCLIENT NAME is believed
    assert bool(m["forged"]) == (s.mta == "sendmail" and s.label == "essay bot"), (s.label, top)
    assert f"for <{s.rcpt}>;" in top, (s.label, top)
    return str(received[0])


def check_message(s: Sent, msg: Message) -> None:
    assert str(msg["Date"]) == s.date
    assert str(msg["From"]) == f"<{s.mail_from}>"
    assert str(msg["Return-Path"]) == f"<{s.mail_from}>"
    assert msg["In-Reply-To"] == s.in_reply_to
    if s.mta == "postfix":
        assert str(msg["Delivered-To"]) == s.rcpt
    payload = msg.get_payload()
    assert isinstance(payload, str)
    # an mbox writer escapes a body line that starts "From "; a Maildir keeps it
    escaped = isinstance(msg, mailbox.mboxMessage)
    assert ("\n>From the test" in payload) == escaped, payload
    assert ("\nFrom the test" in payload) == (not escaped), payload


def test_mta_delivered_mail(delivered_mail: DeliveredMail) -> None:
    mail = delivered_mail
    outputs: dict[str, list[Message]] = {
        "postfix_maildir": read_maildir(mail.postfix_maildir),
        "postfix_mbox": read_mbox(mail.postfix_mbox),
        "sendmail_mbox": read_mbox(mail.sendmail_mbox),
    }
    print()
    for name, found in outputs.items():
        want = mail.delivered(name)
        assert want, name
        got = by_message_id(found)
        assert sorted(got) == sorted(s.message_id for s in want), name
        print(f"== {name}: {len(found)} messages")
        for s in want:
            header = check_top_received(s, got[s.message_id])
            check_message(s, got[s.message_id])
            print(f"-- {s.mta} {s.label} ({s.addr}, HELO {s.helo}):\nReceived: {header}")

    # what the what-if can find wanted: replies to alice's mail, a domain she wrote to
    ours = {a.message_id for a in mail.authored}
    assert any(s.in_reply_to in ours and s.name == "[UNAVAILABLE]" for s in mail.sent)
    assert any(
        s.delivered and s.mail_from.endswith("@victoriakasunic.com") for s in mail.sent
    ) and any(a.to.endswith("@victoriakasunic.com") for a in mail.authored)
    sent_folder = read_mbox(mail.sent_folder)
    assert sorted(str(m["Message-ID"]) for m in sent_folder) == sorted(ours)
    assert all(m["Received"] is None for m in sent_folder)

    # Postfix's log: a warn: line for every RCPT, a reject: line for REJECTED
    log = mail.postfix_log.read_text()
    warn = [line for line in log.splitlines() if " warn: RCPT from " in line]
    reject = [line for line in log.splitlines() if " reject: RCPT from " in line]
    print("== postfix log\n" + "\n".join([*warn, *reject]))
    postfix_sent = [s for s in mail.sent if s.mta == "postfix"]
    assert len(warn) == len(postfix_sent), warn
    for s in postfix_sent:
        mine = [
            line
            for line in warn
            if f"[{s.addr}]: {WARN_TEXT};" in line
            and f"from=<{s.mail_from}> to=<{s.rcpt}> proto=ESMTP helo=<{s.helo}>" in line
        ]
        assert len(mine) == 1, (s.label, warn)
        assert re.search(r" postfix/smtpd\[\d+\]: NOQUEUE: warn: RCPT from ", mine[0]), mine
    assert len(reject) == 1, reject
    refused = next(s for s in postfix_sent if not s.delivered)
    assert refused.addr == REJECTED and refused.reply.startswith("554 5.7.1"), refused
    line = reject[0]
    assert f"{refused.name}[{REJECTED}]: 554 5.7.1" in line and REJECT_TEXT in line, line
    assert f"helo=<{refused.helo}>" in line and f"to=<{refused.rcpt}>" in line, line

    # Sendmail's log: one relay= line per message, tagged as Debian's sm-mta
    sm_log = mail.sendmail_log.read_text()
    for s in mail.delivered("sendmail_mbox"):
        assert re.search(rf"sm-mta\[\d+\]: {s.queue_id}: from=<{s.mail_from}>,.* relay=", sm_log)
