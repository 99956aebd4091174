"""The dry-run command line, end to end against the test DNS server.

These run the real ``heloguard check`` as a subprocess, as an admin would,
and read its JSON contract and exit status.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

from conftest import run_cli, write_toml
from dnsserver import DNSServer

pytestmark = pytest.mark.integration

ESSAY = ["--ip", "103.245.153.249", "--helo", "mail.digitaljunction.com.au"]
GOOD = ["--ip", "64.71.1.10", "--helo", "ukiah.firemountain.net"]
GOOD_V6 = ["--ip", "2600:3c00::10", "--helo", "ukiah.firemountain.net"]
CORP = ["--ip", "64.71.1.12", "--helo", "smtp.goodcorp.net"]  # two PTRs, HELO in same domain


def results(out: dict[str, Any]) -> dict[str, str]:
    return {r["rule"]: r["result"] for r in out["rules"]}


def test_essay_example_rejected_with_every_clue(cli: Any) -> None:
    res = cli("check", "--json", *ESSAY)
    assert res.code == 5, res.stderr
    out = res.json()
    assert out["verdict"] == "reject" and out["stage"] == "helo"
    # clue 2, the cheapest: a generic name (one PTR lookup) decides the reply
    assert out["reply"].startswith("550 5.7.1 ")
    assert "generic host name 103-245-153-249.host.neural.net.au" in out["reply"]
    assert out["rule"] == "generic"
    found = results(out)
    # clue 1: PTR name has no A record, so no FCrDNS
    assert found["fcrdns"] == "fail"
    fc = next(r for r in out["rules"] if r["rule"] == "fcrdns")
    assert {
        "name": "103-245-153-249.host.neural.net.au",
        "type": "A",
        "status": "NXDOMAIN",
    }.items() <= fc["evidence"][1].items()
    # clue 3: HELO is neither its name nor in its domain
    assert found["helo_matches"] == "fail"
    # clue 4: HELO resolves, to another address that has no PTR
    assert found["helo_resolves"] == "pass"
    assert found["helo_fcrdns"] == "fail"
    hf = next(r for r in out["rules"] if r["rule"] == "helo_fcrdns")
    assert any(
        e["name"] == "99.64.50.27.in-addr.arpa" and e["status"] == "NXDOMAIN"
        for e in hf["evidence"]
    )
    for r in out["rules"]:
        assert set(r) >= {"rule", "result", "action", "reason", "evidence", "elapsed_ms"}
        for e in r["evidence"]:
            assert set(e) >= {"name", "type", "status", "records", "ttl"}


def test_essay_example_human_transcript(cli: Any) -> None:
    res = cli("check", *ESSAY)
    assert res.code == 5
    text = res.stdout
    for expected in (
        "fcrdns",
        "FAIL",
        "103-245-153-249.host.neural.net.au/A NXDOMAIN",
        "99.64.50.27.in-addr.arpa/PTR NXDOMAIN",
        "verdict: reject at helo (rule generic)",
        "reply:   550 5.7.1",
        " ms]",
    ):
        assert expected in text, expected


@pytest.mark.parametrize("case", [GOOD, GOOD_V6, CORP], ids=["ipv4", "ipv6", "same-domain"])
def test_well_run_servers_accepted(cli: Any, case: list[str]) -> None:
    res = cli("check", "--json", *case)
    out = res.json()
    assert res.code == 0, out
    assert out["verdict"] == "accept" and out["reply"] is None
    assert set(results(out).values()) <= {"pass", "skip"}


def test_each_question_asked_once_per_decision(cli: Any, dns_server: DNSServer) -> None:
    res = cli("check", "--json", *ESSAY)
    assert res.code == 5
    asked = [(q.name, q.qtype) for q in dns_server.queries() if q.transport == "udp"]
    assert asked.count(("249.153.245.103.in-addr.arpa", "PTR")) == 1
    assert len(asked) == len(set(asked)), asked
    assert res.json()["dns_queries"] == len(set(asked))


GOOD_CHAIN = [
    ("10.1.71.64.in-addr.arpa", "PTR"),
    ("ukiah.firemountain.net", "A"),
    ("ukiah.firemountain.net", "AAAA"),
]


@pytest.mark.parametrize("kind", ["servfail", "drop", "refused"])
@pytest.mark.parametrize("target", GOOD_CHAIN, ids=[f"{n}/{t}" for n, t in GOOD_CHAIN])
def test_fault_on_a_good_path_never_rejects(
    cli: Any, dns_server: DNSServer, kind: str, target: tuple[str, str]
) -> None:
    dns_server.set_fault(target[0], kind, qtype=target[1])
    cfg = ["--config", str(write_config(dns_server, {"dns": {"timeout": 0.5, "budget": 2}}))]
    res = cli("check", "--json", *cfg, *GOOD)
    out = res.json()
    assert out["verdict"] in ("tempfail", "accept"), out
    assert res.code in (0, 4)
    if out["verdict"] == "tempfail":
        assert out["reply"].startswith("451 4.")


def test_servfail_on_ptr_zone_gives_451(cli: Any, dns_server: DNSServer) -> None:
    dns_server.set_fault("153.245.103.in-addr.arpa", "servfail")
    out = cli("check", "--json", *ESSAY).json()
    # HELO-side findings cannot reject without the client's verified names, and
    # fcrdns could not be decided: the bot is deferred, not refused.
    assert out["verdict"] == "tempfail"
    assert out["reply"].startswith("451 4.7.25 ")


def test_fault_on_any_essay_question_never_5xx_on_temp(cli: Any, dns_server: DNSServer) -> None:
    chain = [
        ("249.153.245.103.in-addr.arpa", "PTR"),
        ("103-245-153-249.host.neural.net.au", "A"),
        ("mail.digitaljunction.com.au", "A"),
        ("99.64.50.27.in-addr.arpa", "PTR"),
    ]
    for name, qtype in chain:
        dns_server.clear_faults()
        dns_server.set_fault(name, "servfail", qtype=qtype)
        out = cli("check", "--json", *ESSAY).json()
        if out["verdict"] == "reject":
            decider = next(r for r in out["rules"] if r["rule"] == out["rule"])
            assert all(e["status"] != "TEMP" for e in decider["evidence"]), (name, decider)
        else:
            assert out["verdict"] == "tempfail", out


def write_config(server: DNSServer, data: dict[str, Any], name: str = "heloguard.toml") -> Path:
    """A config file in a temporary folder."""
    folder = Path(tempfile.mkdtemp(prefix="hg-cfg-"))
    return write_toml(folder / name, data)


def test_silent_dns_server_gives_4xx_within_budget(dns_server: DNSServer) -> None:
    dns_server.set_fault(".", "drop")
    cfg = write_config(dns_server, {"dns": {"timeout": 5, "budget": 1.5}})
    started = time.monotonic()
    res = run_cli(
        "check", "--json", "--config", str(cfg), "--nameserver", dns_server.nameserver, *GOOD
    )
    took = time.monotonic() - started
    out = res.json()
    assert out["verdict"] == "tempfail" and res.code == 4
    assert out["reply"].startswith("451 ")
    # one stage budget plus process start-up, nowhere near the 5 s query timeout
    assert out["elapsed_ms"] < 2500, out["elapsed_ms"]
    assert took < 6


def test_dead_dns_server_gives_4xx() -> None:
    res = run_cli("check", "--json", "--nameserver", "127.0.0.1:9", *GOOD)
    assert res.code == 4 and res.json()["verdict"] == "tempfail"


def test_supplied_ptr_skips_the_lookup(cli: Any, dns_server: DNSServer) -> None:
    res = cli(
        "check", "--json", "--rules", "ptr", "--ip", "192.0.2.77", "--ptr", "mail.example.org"
    )
    out = res.json()
    assert out["verdict"] == "accept" and results(out) == {"ptr": "pass"}
    assert out["dns_sent"] == 0 and dns_server.queries() == []


def test_rules_flag_limits_evaluation(cli: Any) -> None:
    out = cli(
        "check",
        "--json",
        "--rules",
        "helo_syntax,helo_literal",
        "--ip",
        "192.0.2.1",
        "--helo",
        "[192.0.2.2]",
    ).json()
    assert [r["rule"] for r in out["rules"]] == ["helo_syntax", "helo_literal"]
    assert out["verdict"] == "reject" and out["rule"] == "helo_literal"


def test_batch(cli: Any) -> None:
    lines = [
        json.dumps({"id": 1, "ip": "103.245.153.249", "helo": "mail.digitaljunction.com.au"}),
        json.dumps({"id": "two", "ip": "64.71.1.10", "helo": "ukiah.firemountain.net"}),
        "this is not json",
        json.dumps({"id": 4, "helo": "no-ip.example"}),
        json.dumps({"id": 5, "ip": "not-an-address", "helo": "x.example"}),
        "",
        json.dumps(
            {"id": 7, "ip": "2600:3c00::10", "helo": "ukiah.firemountain.net", "label": "ignored"}
        ),
    ]
    res = cli("check", "--batch", "-", stdin="\n".join(lines) + "\n")
    assert res.code == 0, res.stderr
    out = res.lines()
    assert len(out) == 6
    assert out[0]["id"] == 1 and out[0]["verdict"] == "reject"
    assert out[1]["id"] == "two" and out[1]["verdict"] == "accept"
    assert "error" in out[2] and out[2]["line"] == 3
    assert out[3]["id"] == 4 and "error" in out[3]
    assert out[4]["id"] == 5 and "error" in out[4]
    assert out[5]["id"] == 7 and out[5]["verdict"] == "accept"


def test_batch_from_file_many_in_parallel(cli: Any, dns_server: DNSServer, tmp_path: Path) -> None:
    dns_server.latency = 0.05
    path = tmp_path / "cases.jsonl"
    path.write_text(
        "".join(
            json.dumps({"id": i, "ip": "64.71.1.10", "helo": "ukiah.firemountain.net"}) + "\n"
            for i in range(200)
        )
    )
    started = time.monotonic()
    res = cli("check", "--batch", str(path))
    took = time.monotonic() - started
    out = res.lines()
    assert [o["id"] for o in out] == list(range(200))
    assert {o["verdict"] for o in out} == {"accept"}
    # 200 sessions with 50 ms per answer would take 20 s one by one
    assert took < 10, took


@pytest.mark.parametrize(
    ("args", "code"),
    [
        (["check", "--ip", "not-an-ip", "--helo", "x.example"], 64),
        (["check", "--helo", "x.example"], 64),
        (["check", "--ip", "192.0.2.1", "--rules", "nosuchrule"], 64),
        (["check", "--bogus-flag"], 64),
        (["check", "--ip", "192.0.2.1", "--nameserver", "dns.example.com"], 64),
    ],
)
def test_usage_errors_exit_64(args: list[str], code: int) -> None:
    res = run_cli(*args)
    assert res.code == code, res.stderr
    assert "error" in res.stderr


@pytest.mark.parametrize(
    ("toml", "key"),
    [
        ("[dns]\ntimeuot = 2\n", "dns.timeuot"),
        ('[dns]\ntimeout = "soon"\n', "dns.timeout"),
        ('[policy]\nmode = "loud"\n', "policy.mode"),
        ('[rules.fcrdns]\naction = "maybe"\n', "rules.fcrdns.action"),
        ("[rules.fcrdns]\nmax_names = 0\n", "rules.fcrdns"),
        ('[rules.nosuch]\naction = "off"\n', "rules.nosuch"),
        ("[nosection]\nx = 1\n", "nosection"),
        ('[dns]\nnameservers = ["not-an-ip"]\n', "dns.nameservers[0]"),
        ("this is = = not toml", "TOML"),
    ],
)
def test_config_errors_exit_78_naming_the_key(tmp_path: Path, toml: str, key: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(toml)
    for command in (["check", "--ip", "192.0.2.1", "--helo", "x.example"], ["config", "check"]):
        res = run_cli(*command, "--config", str(path))
        assert res.code == 78, (command, res.stderr)
        assert key in res.stderr, res.stderr


def test_missing_config_file_is_an_error_but_no_config_is_fine(tmp_path: Path) -> None:
    res = run_cli("config", "check", "--config", str(tmp_path / "absent.toml"))
    assert res.code == 78 and "absent.toml" in res.stderr
    ok = run_cli("config", "check")
    assert ok.code == 0 and "[rules.fcrdns]" in ok.stdout and "embedded defaults" in ok.stdout


def test_example_config_in_contrib_is_valid() -> None:
    example = Path(__file__).resolve().parent.parent / "contrib" / "heloguard.toml"
    res = run_cli("config", "check", "--config", str(example))
    assert res.code == 0, res.stderr


def test_dry_run_honours_trusted_networks_and_exceptions(cli: Any, dns_server: DNSServer) -> None:
    """The dry-run gives the milter's verdict: the same gate and exceptions."""
    trusted = write_config(dns_server, {"milter": {"trusted_networks": ["103.245.153.0/24"]}})
    out = cli("check", "--json", "--config", str(trusted), *ESSAY).json()
    assert out["verdict"] == "accept" and out["exempt"].startswith("trusted network")
    assert out["rules"] == [] and out["dns_queries"] == 0
    names = write_config(
        dns_server, {"exceptions": {"names": ["firemountain.net", "neural.net.au"]}}
    )
    excused = cli(
        "check", "--json", "--config", str(names), "--ip", "64.71.1.10", "--helo", "wrong.example"
    )
    assert excused.code == 0 and "verified name ukiah.firemountain.net" in excused.json()["exempt"]
    spoofed = cli("check", "--json", "--config", str(names), *ESSAY)
    assert spoofed.code == 5, "an unconfirmed PTR name earns no exception"


def test_generic_rule_needs_no_dns_with_ptr_given(cli: Any, dns_server: DNSServer) -> None:
    lines = [
        {"id": "bot", "ip": "103.245.153.249", "ptr": "103-245-153-249.host.neural.net.au"},
        {"id": "ses", "ip": "54.240.8.12", "ptr": "a8-12.smtp-out.amazonses.com"},
        {"id": "v6", "ip": "2a02:8108:1:2::25", "ptr": "2a02-8108-1-2--25.dyn.isp-example.de"},
    ]
    res = cli(
        "check",
        "--batch",
        "-",
        "--rules",
        "generic",
        stdin="".join(json.dumps(x) + "\n" for x in lines),
    )
    out = {o["id"]: o for o in res.lines()}
    assert out["bot"]["verdict"] == "reject" and out["bot"]["reply"].startswith("550 5.7.1 ")
    assert out["ses"]["verdict"] == "accept"
    assert out["v6"]["verdict"] == "reject"
    assert "hextets" in out["v6"]["rules"][0]["reason"]
    assert all(o["dns_sent"] == 0 for o in out.values())
    assert dns_server.queries() == [], "with --ptr given, classifying costs no DNS question"
    single = cli(
        "check",
        "--json",
        "--rules",
        "generic",
        "--ip",
        "54.240.8.12",
        "--ptr",
        "a8-12.smtp-out.amazonses.com",
    )
    assert single.code == 0 and "mail-role word" in single.json()["rules"][0]["reason"]


def test_generic_patterns_from_config(cli: Any, dns_server: DNSServer) -> None:
    cfg = write_config(
        dns_server,
        {
            "rules": {
                "generic": {
                    "extra_patterns": [r"\.badhost\.example$"],
                    "exceptions": [r"^dsl-7\.partner\.example$"],
                }
            }
        },
    )
    bad = cli(
        "check",
        "--json",
        "--config",
        str(cfg),
        "--rules",
        "generic",
        "--ip",
        "192.0.2.5",
        "--ptr",
        "srv.badhost.example",
    )
    assert bad.code == 5 and "extra pattern" in bad.json()["rules"][0]["reason"]
    spared = cli(
        "check",
        "--json",
        "--config",
        str(cfg),
        "--rules",
        "generic",
        "--ip",
        "192.0.2.5",
        "--ptr",
        "dsl-7.partner.example",
    )
    assert spared.code == 0 and "exception" in spared.json()["rules"][0]["reason"]
    broken = write_config(dns_server, {"rules": {"generic": {"extra_patterns": ["(unclosed"]}}})
    res = cli("check", "--config", str(broken), "--ip", "192.0.2.5", "--helo", "x.example")
    assert res.code == 78 and "rules.generic" in res.stderr
