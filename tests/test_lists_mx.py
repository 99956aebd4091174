"""Sender-domain MX sanity, DNSBL, RHSBL and DNSWL through the real dry-run.

The zones bl.test, bl2.test (DNSBLs), wl.test (a DNSWL), dbl.test (an RHSBL)
and mxcases.example.net (one sender domain per MX defect) are in
tests/zones/.  The same cases go through Postfix and Sendmail in
test_mta.py.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import pytest

from conftest import write_toml
from dnsserver import DNSServer

pytestmark = pytest.mark.integration

BOT = ["--ip", "103.245.153.249", "--helo", "mail.digitaljunction.com.au"]
GOOD = ["--ip", "64.71.1.10", "--helo", "ukiah.firemountain.net"]
DNSBL = {"rules": {"dnsbl": {"zones": ["bl.test=127.0.0.[2..4]"]}}}
RHSBL = {"rules": {"rhsbl": {"zones": ["dbl.test=127.0.1.[2..99]"]}}}


def config(data: dict[str, Any]) -> str:
    folder = Path(tempfile.mkdtemp(prefix="hg-lists-"))
    return str(write_toml(folder / "heloguard.toml", data))


def check(
    cli: Any, data: dict[str, Any], *args: str, rules: str | None = None
) -> tuple[int, dict[str, Any], str]:
    extra = ["--rules", rules] if rules else []
    res = cli("check", "--json", "--config", config(data), *extra, *args)
    return res.code, res.json(), res.stderr


def result(out: dict[str, Any], rule: str) -> dict[str, Any]:
    return next(r for r in out["rules"] if r["rule"] == rule)


# -- DNSBL --------------------------------------------------------------------


def test_dnsbl_listed(cli: Any) -> None:
    code, out, _ = check(cli, DNSBL, *BOT, rules="dnsbl")
    assert (
        code == 5
        and out["reply"]
        == "554 5.7.1 Service unavailable; client [103.245.153.249] blocked using bl.test"
    )


def test_dnsbl_txt_reason(cli: Any) -> None:
    data = {"rules": {"dnsbl": {"zones": ["bl.test=127.0.0.[2..4]"], "txt": True}}}
    code, out, _ = check(cli, data, *BOT, rules="dnsbl")
    assert code == 5 and "103.245.153.249 is a known bot" in out["reply"]


def test_dnsbl_not_listed_and_filtered_out(cli: Any) -> None:
    for ip in ("64.71.1.10", "64.71.1.5"):  # .5 answers 127.0.0.10: outside the filter
        code, out, stderr = check(cli, DNSBL, "--ip", ip, rules="dnsbl")
        assert code == 0 and result(out, "dnsbl")["result"] == "pass", (ip, out)
        assert "misconfiguration" not in stderr


@pytest.mark.parametrize("last", ["252", "254", "255", "201", "202"])
def test_dnsbl_error_codes_never_listings(cli: Any, last: str) -> None:
    data = {"rules": {"dnsbl": {"zones": ["bl.test"]}}}  # no filter: only errors stand between
    code, out, stderr = check(cli, data, "--ip", f"64.71.1.{last}", rules="dnsbl")
    assert code == 0 and result(out, "dnsbl")["result"] == "pass", out
    assert "misconfiguration (rule dnsbl)" in stderr and "not a listing" in stderr


@pytest.mark.parametrize(
    ("on_timeout", "code", "verdict"), [("ignore", 0, "accept"), ("tempfail", 4, "tempfail")]
)
def test_dnsbl_timeout(
    cli: Any, dns_server: DNSServer, on_timeout: str, code: int, verdict: str
) -> None:
    dns_server.set_fault("bl.test", "drop")
    data = {
        "dns": {"timeout": 0.5, "budget": 2},
        "rules": {"dnsbl": {"zones": ["bl.test"], "on_timeout": on_timeout}},
    }
    got, out, _ = check(cli, data, *BOT, rules="dnsbl")
    assert got == code and out["verdict"] == verdict
    if verdict == "tempfail":
        assert out["reply"].startswith("451 4.7.1 ")


def test_dnsbl_ipv6(cli: Any) -> None:
    code, out, _ = check(cli, DNSBL, "--ip", "2600:3c00::66", rules="dnsbl")
    assert code == 5 and "blocked using bl.test" in out["reply"]


def test_dnsbl_weights_and_threshold(cli: Any) -> None:
    data = {"rules": {"dnsbl": {"zones": ["bl.test=127.0.0.[2..4]", "bl2.test"], "threshold": 2}}}
    code, out, _ = check(cli, data, *BOT, rules="dnsbl")  # listed on both: 1 + 1
    assert code == 5 and "score 2" in result(out, "dnsbl")["reason"]
    code, out, _ = check(cli, data, "--ip", "2600:3c00::66", rules="dnsbl")  # only bl.test
    assert code == 0 and "below threshold" in result(out, "dnsbl")["reason"]


def test_dnswl_exempts_from_every_check(cli: Any) -> None:
    data = {"rules": {"dnswl": {"zones": ["wl.test"]}}}
    hostile = ["--ip", "64.71.1.66", "--helo", "localhost"]  # would fail helo_syntax and fcrdns
    code, out, _ = check(cli, {}, *hostile)
    assert code == 5
    code, out, _ = check(cli, data, *hostile)
    assert code == 0 and out["verdict"] == "accept" and "allow-listed by wl.test" in out["exempt"]


# -- RHSBL --------------------------------------------------------------------


def test_rhsbl_helo_domain(cli: Any) -> None:
    code, out, _ = check(cli, RHSBL, *BOT, rules="rhsbl")
    assert code == 5
    expected = "554 5.7.1 Service unavailable; helo domain <digitaljunction.com.au>"
    assert out["reply"] == expected + " blocked using dbl.test"


def test_rhsbl_verified_ptr_domain(cli: Any) -> None:
    code, out, _ = check(
        cli, RHSBL, "--ip", "64.71.4.4", "--helo", "out.listedcorp.net", rules="rhsbl"
    )
    assert code == 5 and "listedcorp.net" in out["reply"]


def test_rhsbl_sender_domain(cli: Any) -> None:
    code, out, _ = check(
        cli, RHSBL, *GOOD, "--from", "basicmark@victoriakasunic.com", rules="rhsbl_sender"
    )
    assert code == 5
    expected = "554 5.7.1 Service unavailable; sender domain <victoriakasunic.com>"
    assert out["reply"] == expected + " blocked using dbl.test"


def test_rhsbl_error_code_is_not_a_listing(cli: Any) -> None:
    code, _, stderr = check(
        cli, RHSBL, *GOOD, "--from", "x@badcode.example.net", rules="rhsbl_sender"
    )
    assert code == 0 and "127.0.1.255" in stderr and "not a listing" in stderr


def test_rhsbl_clean(cli: Any) -> None:
    code, _, _ = check(cli, RHSBL, *GOOD, "--from", "rsk@gsp.org", rules="rhsbl,rhsbl_sender")
    assert code == 0


# -- sender MX ----------------------------------------------------------------

MX = "mxcases.example.net"


@pytest.mark.parametrize(
    ("sender", "strict", "code", "reply", "defects"),
    [
        ("rsk@gsp.org", False, 0, None, None),
        (f"x@amx.{MX}", False, 0, None, None),  # no MX: the A record is the implicit MX
        (f"x@nullmx.{MX}", False, 5, "550 5.7.27 ", "null_mx"),
        (f"x@privmx.{MX}", False, 5, "550 5.1.8 ", "private_only"),
        (f"x@nomail.{MX}", False, 5, "550 5.1.8 ", "no_mail_host"),
        (f"x@nosuch.{MX}", False, 5, "550 5.1.8 ", "no_domain"),
        (f"x@cnamemx.{MX}", False, 0, None, "cname"),  # a warning by default
        (f"x@cnamemx.{MX}", True, 5, "550 5.1.8 ", "cname"),  # the strict profile
        ("basicmark@victoriakasunic.com", False, 0, None, "no_fcrdns"),  # the essay's fifth clue
        ("basicmark@victoriakasunic.com", True, 5, "550 5.7.25 ", "no_fcrdns"),
        (f"x@twomx.{MX}", False, 0, None, "unresolvable"),
    ],
)
def test_sender_mx(
    cli: Any, sender: str, strict: bool, code: int, reply: str | None, defects: str | None
) -> None:
    data = {"rules": {"sender_mx": {"strict": strict}}}
    got, out, _ = check(cli, data, *GOOD, "--from", sender, rules="sender_mx")
    r = result(out, "sender_mx")
    assert got == code, out
    if reply:
        assert out["reply"].startswith(reply), out["reply"]
    if defects:
        assert r["result"] == "fail" and defects in r["reason"], r
        if code == 0:
            assert r["effect"] == "warn", "a warning-level defect is logged, not refused"
    else:
        assert r["result"] == "pass", r


def test_null_sender_never_judged(cli: Any) -> None:
    code, out, _ = check(cli, {}, *GOOD, "--from", "<>", rules="sender_mx")
    assert code == 0 and result(out, "sender_mx")["result"] == "skip"


@pytest.mark.parametrize(("strict", "code"), [(False, 0), (True, 4)])
def test_temp_on_an_mx_ptr_defers_only_when_it_matters(
    cli: Any, dns_server: DNSServer, strict: bool, code: int
) -> None:
    dns_server.set_fault("77.0.101.in-addr.arpa", "servfail")
    data = {"rules": {"sender_mx": {"strict": strict}}}
    got, out, _ = check(
        cli, data, *GOOD, "--from", "basicmark@victoriakasunic.com", rules="sender_mx"
    )
    assert got == code, out
    if code == 4:
        assert out["reply"].startswith("451 4.4.3 ")


def test_temp_on_the_mx_lookup_defers(cli: Any, dns_server: DNSServer) -> None:
    dns_server.set_fault("victoriakasunic.com", "servfail", qtype="MX")
    got, out, _ = check(
        cli, {}, *GOOD, "--from", "basicmark@victoriakasunic.com", rules="sender_mx"
    )
    assert got == 4 and out["reply"].startswith("451 4.4.3 ")


def test_mx_evidence_per_target_in_the_transcript(cli: Any) -> None:
    res = cli("check", *GOOD, "--from", "basicmark@victoriakasunic.com")
    assert "mail.victoriakasunic.com: 101.0.77.12 has no PTR (NXDOMAIN)" in res.stdout
    assert "victoriakasunic.com/MX OK 10 mail.victoriakasunic.com" in res.stdout
    res = cli("check", *GOOD, "--from", "rsk@gsp.org")
    assert "taos.firemountain.net: 64.71.1.11 has FCrDNS (taos.firemountain.net)" in res.stdout


def test_client_mx(cli: Any) -> None:
    # taos.firemountain.net is the MX of firemountain.net and not a CNAME
    code, out, _ = check(
        cli, {}, "--ip", "64.71.1.11", "--helo", "taos.firemountain.net", rules="client_mx"
    )
    assert code == 0 and result(out, "client_mx")["result"] == "pass"
    code, out, _ = check(cli, {}, *GOOD, rules="client_mx")
    assert result(out, "client_mx")["result"] == "skip"
