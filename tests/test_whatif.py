"""``heloguard whatif`` on mail the tests' own Postfix and Sendmail delivered.

The inputs are the real MTAs' output (tests/whatif_mail.py): a Maildir and
an mbox from Postfix, an mbox from Sendmail, both MTAs' logs, and alice's
Sent folder (what she wrote, as a mail client keeps it).  Bad inputs are made
from those same files: cut, corrupted, re-encoded, gzipped and truncated.
DNS answers come from the test DNS server serving tests/zones.
"""

from __future__ import annotations

import gzip
import os
import shutil
import struct
import subprocess
import zlib
from pathlib import Path
from typing import Any

import pytest

from whatif_mail import DeliveredMail

pytestmark = pytest.mark.integration

BOT = "103.245.153.249"
WELL_RUN = "64.71.1.10"


def whatif(cli: Any, mail: DeliveredMail, *args: str | Path, stdin: str | None = None) -> Any:
    return cli("whatif", "--by", mail.by, *map(str, args), stdin=stdin)


def records(cli: Any, mail: DeliveredMail, *paths: Path | str) -> list[dict[str, Any]]:
    out = whatif(cli, mail, "--json", *map(str, paths))
    assert out.code == 0, out.stderr
    return list(out.lines())


def by_ip(recs: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    found: dict[str, list[dict[str, Any]]] = {}
    for r in recs:
        found.setdefault(r["input"]["ip"], []).append(r)
    return found


def test_the_essay_cases_agree_with_check(cli: Any, delivered_mail: DeliveredMail) -> None:
    mail = delivered_mail
    recs = by_ip(records(cli, mail, mail.postfix_maildir, mail.sendmail_mbox))
    for ip, verdict in ((BOT, "reject"), (WELL_RUN, "accept")):
        assert ip in recs, f"no message from {ip}"
        for r in recs[ip]:
            assert r["whatif"]["outcome"] == verdict, r
            inp = r["input"]
            check = cli("check", "--json", "--ip", ip, "--helo", inp["helo"], "--from", inp["from"])
            assert check.code in (0, 5), check.stderr
            expected = check.json()
            assert r["verdict"] == expected["verdict"] == verdict
            assert r["rule"] == expected["rule"]
            assert r["reply"] == expected["reply"]
            # the same object as check --json, plus where the message came from
            assert set(expected) <= set(r)
            assert r["source"] and r["date"]
    assert recs[BOT][0]["rule"] == "generic"


def test_every_delivered_message_is_judged_once_per_client(
    cli: Any, delivered_mail: DeliveredMail
) -> None:
    mail = delivered_mail
    for box in ("postfix_maildir", "postfix_mbox", "sendmail_mbox"):
        recs = records(cli, mail, getattr(mail, box))
        sent = mail.delivered(box)
        assert len(recs) == len(sent), box
        assert sorted(r["input"]["ip"] for r in recs) == sorted(s.addr for s in sent)
        assert all(r["whatif"]["kind"] == "message" for r in recs)
    summary = whatif(cli, mail, mail.postfix_mbox)
    assert "would: accept 1  greylist 0  defer 0  reject 1" in summary.stdout
    assert "DNS is today's, not the day the mail came" in summary.stdout


def test_refused_mail_that_looks_wanted_comes_first(
    cli: Any, delivered_mail: DeliveredMail
) -> None:
    mail = delivered_mail
    out = whatif(cli, mail, mail.postfix_maildir, mail.sent_folder)
    assert out.code == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("REFUSED BUT LOOKS WANTED (2)"), out.stdout
    head = "\n".join(lines[:8])
    assert "basicmark@victoriakasunic.com" in head
    assert "our users wrote to victoriakasunic.com" in head
    assert "a reply to <list-post.3@example.test>" in head
    assert "refused, by rule:" in out.stdout
    assert "victoriakasunic.com" in out.stdout.split("sender domains most affected:")[1]
    # without alice's Sent folder, only the reply to her list post still looks wanted
    alone = whatif(cli, mail, mail.postfix_maildir)
    assert alone.stdout.startswith("REFUSED BUT LOOKS WANTED (1)"), alone.stdout


def test_postfix_and_sendmail_logs(cli: Any, delivered_mail: DeliveredMail) -> None:
    mail = delivered_mail
    recs = records(cli, mail, mail.postfix_log)
    assert recs and all(r["whatif"]["kind"] == "log" for r in recs)
    log = mail.postfix_log.read_text()
    logged = [
        line for line in log.splitlines() if ": warn: RCPT" in line or ": reject: RCPT" in line
    ]
    assert len(recs) == len(logged)
    bot = [r for r in recs if r["input"]["ip"] == BOT]
    assert bot and bot[0]["input"]["helo"] == "mail.digitaljunction.com.au"
    assert bot[0]["whatif"]["outcome"] == "reject"
    assert all(r["source"].startswith(f"{mail.postfix_log}:") for r in recs)
    summary = whatif(cli, mail, mail.postfix_log)
    assert "Postfix session with no reject:/warn: line" in summary.stdout
    sm = records(cli, mail, mail.sendmail_log)
    assert {r["input"]["ip"] for r in sm} >= {BOT, WELL_RUN}
    assert all("helo" not in r["input"] for r in sm), "Sendmail logs carry no HELO"


def test_no_received_header_of_ours_says_which_hosts_it_saw(
    cli: Any, delivered_mail: DeliveredMail
) -> None:
    out = cli("whatif", "--by", "mx.elsewhere.example", str(delivered_mail.postfix_maildir))
    assert out.code == 0, out.stderr
    assert "no Received header was written by mx.elsewhere.example" in out.stdout
    assert "mx.example.test (" in out.stdout
    assert "would: accept 0  greylist 0  defer 0  reject 0" in out.stdout


def test_bad_inputs_are_counted_never_fatal(
    cli: Any, delivered_mail: DeliveredMail, tmp_path: Path
) -> None:
    mail = delivered_mail
    good = mail.sendmail_mbox.read_bytes()
    n = len(mail.delivered("sendmail_mbox"))
    # a corrupt mbox: garbage before the first "From " line, a message cut in two
    corrupt = tmp_path / "corrupt.mbox"
    cut = good[: good.rindex(b"\nFrom ") + 200]
    corrupt.write_bytes(b"\x00\xff garbage\r\n" + good + b"\n" + cut)
    # a truncated gzip of a real mbox
    truncated = tmp_path / "mail.mbox.gz"
    truncated.write_bytes(gzip.compress(good)[: len(gzip.compress(good)) * 2 // 3])
    # a real log with garbage lines among its own
    log = tmp_path / "mail.log"
    log.write_bytes(
        b"\xff\xfe\x00 not a log line\n"
        + mail.postfix_log.read_bytes()
        + b"postfix/smtpd[1]: NOQUEUE: reject: RCPT from x[not-an-address]: 554\n"
        + os.urandom(300)
        + b"\n"
    )
    # a real message with an encoded and a non-UTF-8 header
    source = next((mail.postfix_maildir / "new").iterdir(), None) or next(
        (mail.postfix_maildir / "cur").iterdir()
    )
    msg = source.read_bytes().replace(
        b"\nFrom: ", b"\nSubject: caf\xe9 \xff\xfe\nX-Name: =?iso-8859-1?q?J=F6rg?=\nFrom: ", 1
    )
    encoded = tmp_path / "one.eml"
    encoded.write_bytes(msg)
    not_a_maildir = tmp_path / "plain-dir"
    not_a_maildir.mkdir()
    out = whatif(
        cli,
        mail,
        str(corrupt),
        str(truncated),
        str(log),
        str(encoded),
        str(not_a_maildir),
        str(tmp_path / "missing.mbox"),
    )
    assert out.code == 0, out.stderr
    assert "Traceback" not in out.stderr
    text = out.stdout
    assert "truncated or corrupt gzip" in text
    assert "log line with no usable client address" in text
    assert "a directory that is not a Maildir" in text
    assert "no such file" in text
    recs = records(cli, mail, corrupt, log, encoded)
    from_corrupt = [r for r in recs if r["source"].startswith(f"{corrupt}#")]
    assert len(from_corrupt) >= n, "every intact message of the corrupt mbox is read"
    logged = [r for r in recs if r["source"].startswith(f"{log}:")]
    assert len(logged) == len(records(cli, mail, mail.postfix_log))
    assert [r for r in recs if r["source"] == str(encoded)], "the re-encoded message is read"


def test_standard_input_and_since(cli: Any, delivered_mail: DeliveredMail) -> None:
    mail = delivered_mail
    mbox = mail.postfix_mbox.read_text(encoding="utf-8", errors="surrogateescape")
    out = whatif(cli, mail, "--json", "-", stdin=mbox)
    assert out.code == 0, out.stderr
    recs = list(out.lines())
    assert len(recs) == len(mail.delivered("postfix_mbox"))
    assert {r["source"] for r in recs} == {"-#1", "-#2"}
    later = whatif(cli, mail, "--since", "2999-01-01", str(mail.postfix_mbox))
    assert "(older than --since: 2)" in later.stdout
    bad = whatif(cli, mail, "--since", "yesterday", str(mail.postfix_mbox))
    assert bad.code == 64 and "--since" in bad.stderr


def _png_pixels(png: bytes) -> bytes:
    """The decompressed image data of a PNG (enough to tell a blank page from a drawn one)."""
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    pos, data = 8, b""
    while pos < len(png):
        (length,) = struct.unpack(">I", png[pos : pos + 4])
        kind = png[pos + 4 : pos + 8]
        if kind == b"IDAT":
            data += png[pos + 8 : pos + 8 + length]
        pos += 12 + length
    return zlib.decompress(data)


def test_html_page_in_a_real_browser(
    cli: Any, delivered_mail: DeliveredMail, tmp_path: Path
) -> None:
    chromium = shutil.which("chromium")
    if chromium is None:
        if os.environ.get("CI") == "true":
            pytest.fail("CI=true: chromium is not installed (make deps-test installs it)")
        pytest.skip("chromium is not installed")
    mail = delivered_mail
    page = tmp_path / "whatif.html"
    out = whatif(cli, mail, "--html", str(page), mail.postfix_maildir, mail.sendmail_mbox)
    assert out.code == 0, out.stderr
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
    ]
    dom = subprocess.run(
        [chromium, *flags, "--dump-dom", page.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    # what the browser built from the page, not the file's text
    assert "<h1>heloguard what-if</h1>" in dom
    assert dom.count('data-rule="generic"') >= 1, "a bar for the generic rule"
    assert "Refused but looks wanted" in dom and "victoriakasunic.com" in dom
    assert "<script" not in dom, "the page runs nothing"
    shot = tmp_path / "whatif.png"
    subprocess.run(
        [chromium, *flags, "--window-size=1000,1400", f"--screenshot={shot}", page.as_uri()],
        capture_output=True,
        timeout=120,
        check=True,
    )
    pixels = _png_pixels(shot.read_bytes())
    assert len(set(pixels)) > 20, "the screenshot shows a drawn page, not a blank one"
