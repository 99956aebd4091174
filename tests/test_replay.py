"""Decision records and offline replay: the same DNS facts, the same verdict.

A daemon records every decision ([log] decisions) while a set of cases runs
through it (bots, well-run servers, DNS faults, lists, sender MX defects);
then ``heloguard check --replay`` re-evaluates every record from its own DNS
answers, with no DNS server at all, and must reach the identical verdict
and reply.
"""

from __future__ import annotations

import errno
import json
from pathlib import Path
from typing import Any, cast

import pytest
from miltertest import run_session

from conftest import run_cli, write_toml
from dnsserver import DNSServer

pytestmark = pytest.mark.integration

MX = "mxcases.example.net"
CASES: list[dict[str, Any]] = [
    {"ip": "103.245.153.249", "helo": "mail.digitaljunction.com.au"},
    {"ip": "64.71.1.10", "helo": "ukiah.firemountain.net"},
    {"ip": "2600:3c00::10", "helo": "ukiah.firemountain.net"},
    {"ip": "64.71.1.12", "helo": "smtp.goodcorp.net"},
    {"ip": "64.71.1.10", "helo": "64.71.1.10"},
    {"ip": "64.71.1.10", "helo": "[64.71.1.11]"},
    {"ip": "64.71.1.10", "helo": "nohost.firemountain.net"},
    {"ip": "64.71.1.66", "helo": "localhost"},
    {"ip": "64.71.1.10", "helo": "ukiah.firemountain.net", "sender": f"x@nullmx.{MX}"},
    {"ip": "64.71.1.10", "helo": "ukiah.firemountain.net", "sender": f"x@privmx.{MX}"},
    {
        "ip": "64.71.1.10",
        "helo": "ukiah.firemountain.net",
        "sender": "basicmark@victoriakasunic.com",
    },
    {"ip": "2600:3c00::66", "helo": "ukiah.firemountain.net"},
]
CONFIG = {
    "rules": {"dnsbl": {"zones": ["bl.test=127.0.0.[2..4]"]}, "rhsbl": {"zones": ["dbl.test"]}}
}


def test_every_recorded_decision_replays_identically(
    start_milter: Any, dns_server: DNSServer, tmp_path: Path
) -> None:
    records = tmp_path / "decisions.jsonl"
    m = start_milter({**CONFIG, "log": {"decisions": str(records)}})
    for case in CASES:
        run_session(
            m.socket, ip=case["ip"], helo=case["helo"], sender=case.get("sender", "rsk@gsp.org")
        )
    dns_server.set_fault("3.71.64.in-addr.arpa", "servfail")  # not asked before: not cached
    run_session(m.socket, ip="64.71.3.3", helo="mx.flaky.example.net")
    dns_server.clear_faults()
    m.log()  # records are written by the log writer, with the lines
    lines = records.read_text().splitlines()
    assert len(lines) >= len(CASES) + 1
    verdicts = {json.loads(line)["verdict"] for line in lines}
    assert verdicts == {"accept", "reject", "tempfail"}, "the recorded cases cover every verdict"
    config = write_toml(tmp_path / "replay.toml", CONFIG)
    # replay with no DNS server at all: a nameserver nobody answers on
    res = run_cli(
        "check",
        "--json",
        "--config",
        str(config),
        "--nameserver",
        "127.0.0.1:9",
        "--replay",
        str(records),
    )
    assert res.code in (0, 4, 5), res.stderr
    replays = res.lines()
    assert len(replays) == len(lines)
    for rec_line, out in zip(lines, replays, strict=True):
        rec = json.loads(rec_line)
        assert out["replay"]["identical"], (
            rec["input"],
            rec["verdict"],
            out["verdict"],
            out["reply"],
        )
        assert out["dns_sent"] == 0


def test_a_changed_answer_is_reported(
    start_milter: Any, dns_server: DNSServer, tmp_path: Path
) -> None:
    records = tmp_path / "decisions.jsonl"
    m = start_milter({"log": {"decisions": str(records)}})
    run_session(m.socket, ip="64.71.1.10", helo="ukiah.firemountain.net")
    m.log()  # records are written by the log writer, with the lines
    rec = json.loads(records.read_text().splitlines()[0])
    assert rec["verdict"] == "accept"
    for answer in rec["answers"]:
        if answer["type"] == "PTR":
            answer["status"], answer["records"] = "NXDOMAIN", []
    tampered = tmp_path / "tampered.jsonl"
    tampered.write_text(json.dumps(rec) + "\n")
    res = run_cli("check", "--replay", str(tampered))
    assert res.code == 1 and "DIFFERS from the record" in res.stdout


def test_replay_rejects_garbage(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text("not json\n")
    res = run_cli("check", "--replay", str(bad))
    assert res.code == 64 and "not a JSON record" in res.stderr


def test_a_record_cut_short_is_skipped_and_the_rest_replayed(
    start_milter: Any, tmp_path: Path
) -> None:
    """kill -9 mid-write leaves the last record cut short: the replay warns and goes on,
    and every cut point of a real record (escapes included) reads as cut short, not garbage."""
    from heloguard.records import RecordCutShort, parse

    records = tmp_path / "decisions.jsonl"
    m = start_milter({"log": {"decisions": str(records)}})
    run_session(m.socket, ip="64.71.1.10", helo="ukiah.firemountain.net")
    run_session(m.socket, ip="64.71.1.10", helo="b\u00fccher\x01.hostile.test")
    m.log()
    lines = records.read_text().splitlines()
    whole, hostile = lines[0], lines[-1]
    assert "\\u00fc" in hostile and "\\u0001" in hostile, hostile
    for cut in range(1, len(hostile)):
        with pytest.raises(RecordCutShort):
            parse(hostile[:cut])
    torn = tmp_path / "torn.jsonl"
    torn.write_text(f"{hostile[:1805]}\n{whole}\n{hostile[:-9]}")
    res = run_cli("check", "--json", "--replay", str(torn))
    assert res.code == 0, res.stderr
    assert [r["replay"]["line"] for r in res.lines()] == [2]
    assert f"{torn}:1: record cut short after 1805 characters, skipped" in res.stderr
    assert f"{torn}:3: record cut short after {len(hostile) - 9} characters" in res.stderr
    torn.write_text(whole[:100])
    res = run_cli("check", "--replay", str(torn))
    assert res.code == 64 and "no whole record" in res.stderr


def test_the_writer_ends_a_line_cut_short_before_the_next_record(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from heloguard.records import RecordsUnwritable, RecordWriter

    path = tmp_path / "decisions.jsonl"
    path.write_text('{"verdict":"accept"}\n{"verdict":"rej')
    with caplog.at_level("WARNING", logger="heloguard"):
        writer = RecordWriter(path)
    writer.write({"verdict": "accept", "input": {}})
    writer.close()
    assert path.read_text().splitlines() == [
        '{"verdict":"accept"}',
        '{"verdict":"rej',
        '{"verdict":"accept","input":{}}',
    ]
    assert "cut short" in caplog.text

    class HalfFull:  # a disk that fills up in the middle of a line
        def __init__(self, fh: Any) -> None:
            self.fh = fh

        def write(self, text: str) -> int:
            self.fh.write(text[: len(text) // 2])
            self.fh.flush()
            raise OSError(errno.ENOSPC, "No space left on device")

    writer = RecordWriter(path)
    real, writer._fh = writer._fh, cast(Any, HalfFull(writer._fh))
    writer.write({"verdict": "reject", "input": {}})
    with pytest.raises(RecordsUnwritable):
        writer.check()
    writer._fh = real
    writer.write({"verdict": "tempfail", "input": {}})
    writer.close()
    writer.check()  # written again: no longer failed
    assert path.read_text().splitlines()[-2:] == [
        '{"verdict":"reje',  # the first half of the line the disk took
        '{"verdict":"tempfail","input":{}}',
    ], "the record after a failed write starts on a line of its own"
    path.write_text('{"verdict":"accept"}\n')
    RecordWriter(path).close()
    assert path.read_text() == '{"verdict":"accept"}\n', "a whole file is left as it is"
