"""heloguard behind a real Postfix and a real Sendmail, both started here.

Postfix presents each test client by XCLIENT (address, name, HELO, login);
Sendmail, which has no XCLIENT, gets connections that really come from the
test addresses, inside its own network namespace.  Both are configured from
the snippets in contrib/ (the Postfix main.cf lines and the Sendmail .mc),
so those snippets are tested too.  heloguard runs as ``heloguard serve``
with the test DNS server behind it; the MTAs do no DNS of their own that
matters (Postfix does none after XCLIENT; Sendmail's is refused at once).

With CI=true an MTA that cannot be set up fails these tests; elsewhere they
skip with the reason.
"""

from __future__ import annotations

import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from conftest import ROOT, run_cli
from dnsserver import DNSServer
from mta.common import MTASetupError, is_ci
from mta.postfix import PrivatePostfix, ensure_postfix
from mta.sendmail import PrivateSendmail
from mta.smtpclient import Transcript

pytestmark = pytest.mark.integration

CONTRIB = ROOT / "contrib"
CONTRIB_SOCKET = "unix:/run/heloguard/heloguard.sock"
BOT = {"addr": "103.245.153.249", "helo": "mail.digitaljunction.com.au"}
GOOD = {"addr": "64.71.1.10", "helo": "ukiah.firemountain.net"}
GOOD_V6 = {"addr": "2600:3c00::10", "helo": "ukiah.firemountain.net"}
MTAS = ["postfix", "sendmail"]


def contrib_main_cf(socket: str) -> dict[str, str]:
    """contrib/postfix/main.cf as settings, pointed at the test socket."""
    settings: dict[str, str] = {}
    for raw in (CONTRIB / "postfix" / "main.cf").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, _, value = line.partition("=")
        settings[key.strip()] = value.strip()
    assert settings["smtpd_milters"] == CONTRIB_SOCKET
    settings["smtpd_milters"] = socket
    return settings


def contrib_mc(socket: str) -> str:
    """contrib/sendmail/heloguard.mc, pointed at the test socket."""
    text = (CONTRIB / "sendmail" / "heloguard.mc").read_text()
    assert f"S={CONTRIB_SOCKET}" in text
    return text.replace(f"S={CONTRIB_SOCKET}", f"S={socket}")


@contextmanager
def mta(kind: str, socket: str, **extra: Any) -> Iterator[Any]:
    """A private Postfix or Sendmail whose milter is heloguard on ``socket``."""
    try:
        if kind == "postfix":
            cf = {**contrib_main_cf(socket), **extra.get("main_cf", {})}
            server: Any = PrivatePostfix(None, extra_main_cf=cf)
        else:
            server = PrivateSendmail(None, extra_mc=contrib_mc(socket))
        server.start()
    except MTASetupError as exc:
        if is_ci():
            raise
        pytest.skip(f"{kind} cannot be set up here: {exc}")
    try:
        yield server
    finally:
        server.stop()
        server.cleanup()


@pytest.fixture
def start_milter(start_milter: Any) -> Iterator[Callable[..., Any]]:
    """heloguard serve with its socket where the MTA's user can reach it.

    Postfix's smtpd runs as the user postfix: as on a real MX, the socket's
    folder must be searchable and the socket writable by its group.
    """
    folders: list[Path] = []
    try:
        ensure_postfix()  # the group must exist before heloguard chowns its socket
    except MTASetupError as exc:
        if is_ci():
            raise
        pytest.skip(f"postfix cannot be set up here: {exc}")

    def start(config: dict[str, Any] | None = None, **kw: Any) -> Any:
        cfg = {k: dict(v) for k, v in (config or {}).items()}
        cfg.setdefault("milter", {}).update(group="postfix", socket_mode="0660")
        folder = Path(tempfile.mkdtemp(prefix="hg-mta-"))
        folder.chmod(0o755)
        folders.append(folder)
        return start_milter(cfg, workdir=folder, **kw)

    yield start
    for folder in folders:
        shutil.rmtree(folder, ignore_errors=True)


def send(server: Any, client: dict[str, str], *, login: str | None = None, **kw: Any) -> Transcript:
    """One SMTP session from ``client`` through the MTA, as far as it is allowed."""
    args: dict[str, Any] = {
        "addr": client["addr"],
        "helo": client["helo"],
        "mail_from": kw.pop("mail_from", "basicmark@victoriakasunic.com"),
        "rcpt_to": kw.pop("rcpt_to", "postmaster@example.test"),
    }
    if isinstance(server, PrivatePostfix):
        args["name"] = "[UNAVAILABLE]"
        if login:
            args["login"] = login
    elif login:
        raise AssertionError("Sendmail has no XCLIENT LOGIN")
    transcript: Transcript = server.session(**args, **kw)
    return transcript


@pytest.mark.parametrize("kind", MTAS)
def test_essay_bot_refused_at_mail_from_before_data(kind: str, start_milter: Any) -> None:
    m = start_milter()
    with mta(kind, m.socket) as server:
        t = send(server, BOT)
    ehlo = t.reply("EHLO")
    assert ehlo is not None and ehlo.code == 250, t
    assert t.rejected_at == "MAIL", t
    mail = t.reply("MAIL")
    assert mail is not None and mail.code == 550, t
    assert (
        "5.7.1" in mail.text and "generic host name 103-245-153-249.host.neural.net.au" in mail.text
    )
    assert not t.reached_data
    m.wait_for("reject: HELO from 103-245-153-249.host.neural.net.au[103.245.153.249]")


@pytest.mark.parametrize("client", [GOOD, GOOD_V6], ids=["ipv4", "ipv6"])
@pytest.mark.parametrize("kind", MTAS)
def test_well_run_server_delivers(kind: str, client: dict[str, str], start_milter: Any) -> None:
    m = start_milter()
    with mta(kind, m.socket) as server:
        t = send(server, client)
    assert t.delivered, t
    m.wait_for(f"pass: HELO from ukiah.firemountain.net[{client['addr']}]")


@pytest.mark.parametrize("kind", MTAS)
def test_servfail_on_ptr_zone_defers(kind: str, start_milter: Any, dns_server: DNSServer) -> None:
    dns_server.set_fault("153.245.103.in-addr.arpa", "servfail")
    m = start_milter()
    with mta(kind, m.socket) as server:
        t = send(server, BOT)
    mail = t.reply("MAIL")
    assert mail is not None and mail.code == 451 and "4.7.25" in mail.text, t
    assert not t.reached_data


@pytest.mark.parametrize("kind", MTAS)
def test_trusted_network_never_judged(kind: str, start_milter: Any, dns_server: DNSServer) -> None:
    m = start_milter({"milter": {"trusted_networks": ["103.245.153.0/24"]}})
    with mta(kind, m.socket) as server:
        dns_server.reset_log()
        t = send(server, BOT)
    assert t.delivered, t
    assert not any(q.name.endswith("103.in-addr.arpa") for q in dns_server.queries())
    m.wait_for("skip: CONNECT from unknown[103.245.153.249]: trusted network 103.245.153.0/24")


@pytest.mark.parametrize("kind", MTAS)
def test_seed_example_with_reject_stage_rcpt(kind: str, start_milter: Any) -> None:
    m = start_milter({"milter": {"reject_stage": "rcpt"}})
    with mta(kind, m.socket) as server:
        t = send(server, BOT, rcpt_to="victim@example.test")
    mail, rcpt = t.reply("MAIL"), t.reply("RCPT")
    assert mail is not None and mail.code == 250, t
    assert rcpt is not None and rcpt.code == 550 and "5.7.1" in rcpt.text, t
    assert not t.reached_data
    m.wait_for("to=<victim@example.test>")


def test_authenticated_client_spared_with_rcpt_stage(start_milter: Any) -> None:
    """Postfix only: Sendmail has no XCLIENT, and its AUTH needs real SASL."""
    m = start_milter({"milter": {"reject_stage": "rcpt"}})
    with mta("postfix", m.socket) as server:
        spared = send(server, BOT, login="roaming-user")
        refused = send(server, BOT)
    assert spared.delivered, spared
    assert refused.rejected_at == "RCPT", refused
    m.wait_for("authenticated as roaming-user; spared")


@pytest.mark.parametrize(
    ("kind", "code", "status"), [("postfix", 451, "4.7.1"), ("sendmail", 451, "4.3.2")]
)
def test_milter_down_gives_the_mta_default_action(
    kind: str, code: int, status: str, tmp_path: Path
) -> None:
    """contrib's snippets ask for tempfail when heloguard is unreachable."""
    dead = f"unix:{tmp_path / 'nobody-listens.sock'}"
    with mta(kind, dead) as server:
        t = send(server, GOOD)
    mail = t.reply("MAIL")
    assert mail is not None and mail.code == code and status in mail.text, t
    assert not t.reached_data


CASES = [
    ("essay bot", BOT, {}),
    ("well-run v4", GOOD, {}),
    ("well-run v6", GOOD_V6, {}),
    ("same domain", {"addr": "64.71.1.12", "helo": "smtp.goodcorp.net"}, {}),
    ("bare ip helo", {"addr": "64.71.1.10", "helo": "64.71.1.10"}, {}),
    ("helo literal of another host", {"addr": "64.71.1.10", "helo": "[64.71.1.11]"}, {}),
    ("helo does not resolve", {"addr": "64.71.1.10", "helo": "nohost.firemountain.net"}, {}),
    ("ptr zone servfail", BOT, {"fault": ("153.245.103.in-addr.arpa", "servfail")}),
]


def _outcome(t: Transcript) -> str:
    if t.delivered:
        return "accept"
    mail = t.reply("MAIL")
    if mail is None or mail.code < 400:
        return f"unexpected: {t}"
    return "reject" if mail.code >= 500 else "tempfail"


@pytest.mark.parametrize(("label", "client", "setup"), CASES, ids=[c[0] for c in CASES])
def test_one_engine_three_front_ends(
    label: str,
    client: dict[str, str],
    setup: dict[str, Any],
    start_milter: Any,
    dns_server: DNSServer,
) -> None:
    """The dry-run, the Postfix path and the Sendmail path reach the same verdict."""
    if "fault" in setup:
        dns_server.set_fault(*setup["fault"])
    dry = run_cli(
        "check",
        "--json",
        "--nameserver",
        dns_server.nameserver,
        "--ip",
        client["addr"],
        "--helo",
        client["helo"],
    ).json()
    m = start_milter()
    seen = {"dry-run": dry["verdict"]}
    replies = {"dry-run": dry["reply"]}
    for kind in MTAS:
        with mta(kind, m.socket) as server:
            t = send(server, client)
        seen[kind] = _outcome(t)
        mail = t.reply("MAIL")
        replies[kind] = (
            f"{mail.code} {mail.text}" if mail is not None and mail.code >= 400 else None
        )
    assert len(set(seen.values())) == 1, (label, seen)
    if dry["reply"]:
        code = dry["reply"][:9]  # "550 5.7.25" style: the same code and status everywhere
        for kind in MTAS:
            assert replies[kind] is not None and re.sub(r"\s+", " ", replies[kind]).startswith(
                code
            ), (
                label,
                replies,
            )


def test_inet_socket_with_postfix(start_milter: Any, dns_server: DNSServer) -> None:
    """A TCP milter socket (what a chrooted, unconfigured Postfix can reach)."""
    from heloguard.daemon import postfix_socket

    from mta.common import free_port

    port = free_port("127.0.0.1")
    spec = f"inet:{port}@127.0.0.1"
    m = start_milter({"milter": {"socket": spec}})
    assert postfix_socket(spec) == f"inet:127.0.0.1:{port}"
    m.wait_for(f"smtpd_milters = inet:127.0.0.1:{port}")
    with mta("postfix", postfix_socket(spec)) as server:
        bot, good = send(server, BOT), send(server, GOOD)
    mail = bot.reply("MAIL")
    assert mail is not None and mail.code == 550 and "5.7.1" in mail.text, bot
    assert good.delivered, good


# -- issue 5: lists and sender MX through the MTAs -------------------------------

OFF = {
    name: {"action": "off"}
    for name in (
        "helo_syntax",
        "helo_literal",
        "helo_ours",
        "generic_helo",
        "ptr",
        "generic",
        "helo_resolves",
        "fcrdns",
        "helo_matches",
        "helo_fcrdns",
        "client_mx",
    )
}
LISTS = {
    "rules": {
        **OFF,
        "sender_mx": {"action": "off"},
        "dnsbl": {"zones": ["bl.test=127.0.0.[2..4]"]},
        "rhsbl": {"zones": ["dbl.test=127.0.1.[2..99]"]},
    }
}
MXONLY = {"rules": {**OFF, "sender_mx": {"strict": False}}}
MXSTRICT = {"rules": {**OFF, "sender_mx": {"strict": True}}}
ALLOW = {"rules": {"dnswl": {"zones": ["wl.test"]}}}
MX = "mxcases.example.net"

LIST_CASES = [
    # label, config, client, sender, verdict, reply prefix
    (
        "dnsbl listed",
        LISTS,
        BOT,
        "rsk@gsp.org",
        "reject",
        "554 5.7.1 Service unavailable; client [103.245.153.249]",
    ),
    (
        "dnsbl error code",
        LISTS,
        {"addr": "64.71.1.254", "helo": "ukiah.firemountain.net"},
        "rsk@gsp.org",
        "accept",
        None,
    ),
    (
        "dnsbl ipv6",
        LISTS,
        {"addr": "2600:3c00::66", "helo": "ukiah.firemountain.net"},
        "rsk@gsp.org",
        "reject",
        "554 5.7.1",
    ),
    (
        "rhsbl helo domain",
        LISTS,
        {"addr": "64.71.1.10", "helo": "mail.digitaljunction.com.au"},
        "rsk@gsp.org",
        "reject",
        "554 5.7.1 Service unavailable; helo domain",
    ),
    (
        "rhsbl client domain",
        LISTS,
        {"addr": "64.71.4.4", "helo": "[64.71.4.4]"},
        "rsk@gsp.org",
        "reject",
        "554 5.7.1 Service unavailable; client host domain",
    ),
    (
        "rhsbl sender domain",
        LISTS,
        GOOD,
        "basicmark@victoriakasunic.com",
        "reject",
        "554 5.7.1 Service unavailable; sender domain",
    ),
    (
        "dnswl skips every check",
        ALLOW,
        {"addr": "64.71.1.66", "helo": "localhost"},
        "rsk@gsp.org",
        "accept",
        None,
    ),
    ("null mx", MXONLY, GOOD, f"x@nullmx.{MX}", "reject", "550 5.7.27"),
    ("cname mx warns", MXONLY, GOOD, f"x@cnamemx.{MX}", "accept", None),
    ("private mx", MXONLY, GOOD, f"x@privmx.{MX}", "reject", "550 5.1.8"),
    ("mx without fcrdns warns", MXONLY, GOOD, "basicmark@victoriakasunic.com", "accept", None),
    (
        "mx without fcrdns, strict",
        MXSTRICT,
        GOOD,
        "basicmark@victoriakasunic.com",
        "reject",
        "550 5.7.25",
    ),
    ("well-run sender domain", MXSTRICT, GOOD, "rsk@gsp.org", "accept", None),
]


@pytest.mark.parametrize(
    ("label", "config", "client", "sender", "verdict", "reply"),
    LIST_CASES,
    ids=[c[0] for c in LIST_CASES],
)
def test_lists_and_sender_mx_through_the_mtas(
    label: str,
    config: dict[str, Any],
    client: dict[str, str],
    sender: str,
    verdict: str,
    reply: str | None,
    start_milter: Any,
    dns_server: DNSServer,
    tmp_path: Path,
) -> None:
    from conftest import write_toml

    cfg = write_toml(tmp_path / "dry.toml", config)
    dry = run_cli(
        "check",
        "--json",
        "--config",
        str(cfg),
        "--nameserver",
        dns_server.nameserver,
        "--ip",
        client["addr"],
        "--helo",
        client["helo"],
        "--from",
        sender,
        "--rcpt",
        "postmaster@example.test",
    ).json()
    assert dry["verdict"] == verdict, (label, dry)
    m = start_milter(config)
    for kind in MTAS:
        with mta(kind, m.socket) as server:
            t = send(server, client, mail_from=sender)
        assert _outcome(t) == verdict, (label, kind, t)
        if reply:
            mail = t.reply("MAIL")
            assert mail is not None and f"{mail.code} {mail.text}".startswith(reply), (
                label,
                kind,
                t,
            )
            assert dry["reply"].startswith(reply)


@pytest.mark.parametrize(
    ("on_timeout", "verdict"), [("ignore", "accept"), ("tempfail", "tempfail")]
)
def test_dnsbl_timeout_through_postfix(
    on_timeout: str, verdict: str, start_milter: Any, dns_server: DNSServer
) -> None:
    dns_server.set_fault("bl.test", "drop")
    config = {
        "dns": {"timeout": 0.5, "budget": 2},
        "rules": {**OFF, "dnsbl": {"zones": ["bl.test"], "on_timeout": on_timeout}},
    }
    m = start_milter(config)
    with mta("postfix", m.socket) as server:
        t = send(server, BOT, mail_from="rsk@gsp.org")
    assert _outcome(t) == verdict, t
    mail = t.reply("MAIL")
    assert mail is not None and mail.code < 500, "a list that does not answer never gives a 5xx"


def test_greylist_through_postfix(start_milter: Any, tmp_path: Path) -> None:
    config = {
        "greylist": {"database": str(tmp_path / "grey.sqlite"), "delay": "2s", "policy": "all"}
    }
    m = start_milter(config)
    with mta("postfix", m.socket) as server:
        first = send(server, GOOD, mail_from="rsk@gsp.org")
        rcpt = first.reply("RCPT")
        assert rcpt is not None and rcpt.code == 451 and "Greylisted" in rcpt.text, first
        assert not first.reached_data
        time.sleep(2.2)
        retry = send(server, GOOD, mail_from="rsk@gsp.org")
    assert retry.delivered, retry


def test_contrib_xclient_test_script(start_milter: Any) -> None:
    """contrib/postfix/xclient-test.py, the README's Postfix test command, works."""
    import subprocess
    import sys

    m = start_milter()
    with mta("postfix", m.socket) as server:
        script = str(CONTRIB / "postfix" / "xclient-test.py")
        base = [sys.executable, script, "--port", str(server.port)]
        bot = subprocess.run(
            [*base, "--ip", BOT["addr"], "--helo", BOT["helo"]],
            capture_output=True,
            text=True,
            check=False,
        )
        good = subprocess.run(
            [*base, "--ip", GOOD["addr"], "--helo", GOOD["helo"], "--from", "rsk@gsp.org"],
            capture_output=True,
            text=True,
            check=False,
        )
    assert (
        bot.returncode == 5 and "550 5.7.1" in bot.stdout and "generic host name" in bot.stdout
    ), bot
    assert good.returncode == 0, good
