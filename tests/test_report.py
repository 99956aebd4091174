"""heloguard report: exact counts on a known set of records and log lines."""
# ruff: noqa: E501 - the log lines below are verbatim test data

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from conftest import run_cli


def rec(
    ip: str,
    helo: str,
    verdict: str,
    rule: str | None,
    rules: list[tuple[str, str, str]],
    enforced: str | None = None,
) -> str:
    return json.dumps(
        {
            "format": 1,
            "verdict": verdict,
            "enforced": enforced or verdict,
            "rule": rule,
            "input": {"ip": ip, "helo": helo},
            "rules": [{"rule": r, "result": res, "effect": eff} for r, res, eff in rules],
            "answers": [],
        }
    )


RECORDS = [
    rec(
        "103.245.153.249",
        "mail.digitaljunction.com.au",
        "reject",
        "generic",
        [("generic", "fail", "reject"), ("fcrdns", "fail", "reject")],
    ),
    rec(
        "103.245.153.7",
        "mail.digitaljunction.com.au",
        "reject",
        "generic",
        [("generic", "fail", "reject")],
    ),
    rec(
        "64.71.1.10",
        "ukiah.firemountain.net",
        "accept",
        None,
        [("generic", "pass", "none"), ("fcrdns", "pass", "none")],
    ),
    rec("2600:3c00::99", "x.example", "tempfail", "ptr", [("ptr", "tempfail", "tempfail")]),
    rec(
        "198.51.100.3",
        "bot.example",
        "accept",
        None,
        [("fcrdns", "fail", "reject")],
        enforced="reject",
    ),
]
LOG = [
    "2026-11-28 10:00:00,000 heloguard[1]: reject: HELO from unknown[192.0.2.5]: 550 5.5.2 Invalid HELO; helo=<localhost> rule=helo_syntax dns=0/0 ms=0",
    "2026-11-28 10:00:01,000 heloguard[1]: greylist: RCPT from a.example[192.0.2.9]: 451 4.7.1 Greylisted: please try again in 300 seconds (first attempt); key=net:192.0.2.0/24 helo=<a.example> from=<x@a.example> to=<y@b.example>",
    "2026-11-28 10:00:02,000 heloguard[1]: greylist: RCPT from c.example[192.0.2.10]: 451 4.7.1 Greylisted: please try again in 300 seconds (first attempt); key=net:192.0.2.0/24 helo=<c.example> from=<z@c.example> to=<y@b.example>",
    "2026-11-28 10:06:01,000 heloguard[1]: pass: RCPT from a.example[192.0.2.9]: greylist: retried after 360s; key=net:192.0.2.0/24 helo=<a.example> from=<x@a.example> to=<y@b.example>",
    "2026-11-28 10:07:00,000 heloguard[1]: warn: HELO from b.example[192.0.2.77]: would reject: 550 5.7.1 ...; helo=<b.example> rule=helo_matches mode=warn dns=2/4 ms=3",
    "this line is not from heloguard",
]


def report(tmp_path: Path, *lines: str) -> dict[str, Any]:
    path = tmp_path / "input.log"
    path.write_text("\n".join(lines) + "\n")
    res = run_cli("report", "--json", str(path))
    assert res.code == 0, res.stderr
    out: dict[str, Any] = res.json()
    return out


def test_counts_from_records(tmp_path: Path) -> None:
    out = report(tmp_path, *RECORDS)
    assert out["decisions"] == 5
    assert out["verdicts"] == {"reject": 2, "accept": 2, "tempfail": 1}
    assert out["deciding_rules"] == {"generic": 2, "ptr": 1}
    assert out["top_refused_networks"][0] == ["103.245.153.0/24", 2]
    assert ["2600:3c00::/64", 1] in out["top_refused_networks"]
    assert out["top_refused_helos"][0] == ["mail.digitaljunction.com.au", 2]
    assert out["warn_mode_would_refuse"] == {"fcrdns": 1}
    rules = {(r["rule"], r["result"], r["effect"]): r["count"] for r in out["rules"]}
    assert rules[("generic", "fail", "reject")] == 2
    assert rules[("fcrdns", "fail", "reject")] == 2


def test_counts_from_log_lines(tmp_path: Path) -> None:
    out = report(tmp_path, *LOG)
    assert out["decisions"] == 2  # the helo_syntax reject and the warn
    assert out["verdicts"] == {"reject": 1, "accept": 1}
    assert out["deciding_rules"] == {"helo_syntax": 1}
    assert out["top_refused_helos"] == [["localhost", 1]]
    assert out["warn_mode_would_refuse"] == {"helo_matches": 1}
    assert out["greylist"] == {"delayed": 2, "passed_on_retry": 1, "never_retried": 1}
    assert out["unreadable_lines"] == 1


def test_human_report(tmp_path: Path) -> None:
    path = tmp_path / "mixed.log"
    path.write_text("\n".join([*RECORDS, *LOG]) + "\n")
    res = run_cli("report", str(path))
    assert res.code == 0
    assert "decisions: 7" in res.stdout
    assert "greylist: 2 delayed, 1 passed on retry, 1 never retried" in res.stdout
    assert "103.245.153.0/24" in res.stdout


def test_report_reads_the_daemons_own_log(start_milter: Any, tmp_path: Path) -> None:
    from miltertest import run_session

    records = tmp_path / "decisions.jsonl"
    m = start_milter({"log": {"decisions": str(records)}})
    run_session(m.socket, ip="103.245.153.249", helo="mail.digitaljunction.com.au")
    run_session(m.socket, ip="64.71.1.10", helo="ukiah.firemountain.net")
    run_session(m.socket, ip="64.71.1.10", helo="localhost")
    m.wait_for("rule=helo_syntax")
    from_log = run_cli("report", "--json", str(m.log_path)).json()
    from_records = run_cli("report", "--json", str(records)).json()
    assert from_log["verdicts"]["reject"] == from_records["verdicts"]["reject"] == 2
    assert (
        from_log["deciding_rules"]
        == from_records["deciding_rules"]
        == {"generic": 1, "helo_syntax": 1}
    )
