"""The session state machine without an MTA, and its decision cache."""

from __future__ import annotations

import ipaddress
import logging
import re
import time
from pathlib import Path
from typing import Any

import pytest

from heloguard.answers import Answer, Query, Status
from heloguard.config import from_mapping
from heloguard.engine import Decision, Verdict
from heloguard.greylist import client_key
from heloguard.logfmt import escape
from heloguard.rules.base import Stage
from heloguard.session import HELO_STAGES, Act, DecisionCache, DecisionLine, Runtime, Session

from dnsserver import DNSServer

pytestmark = pytest.mark.integration


def runtime(dns_server: DNSServer, **extra: Any) -> Runtime:
    return Runtime.build(
        from_mapping({"dns": {"nameservers": [dns_server.nameserver], "timeout": 1}, **extra})
    )


def session(rt: Runtime, ip: str, helo: str) -> tuple[Session, Act]:
    s = Session(rt)
    s.connect(ip, "mx")
    return s, s.helo(helo).act


def test_repeat_sessions_reuse_a_settled_decision(dns_server: DNSServer) -> None:
    rt = runtime(dns_server)
    try:
        one, first = session(rt, "103.245.153.249", "mail.digitaljunction.com.au")
        assert one.prefetch is not None
        one.prefetch.result(timeout=10)  # the connect-stage lookups may outlast the HELO verdict
        asked = len(dns_server.queries())
        _, second = session(rt, "103.245.153.249", "mail.digitaljunction.com.au")
        assert first is second is Act.REJECT
        assert rt.decisions.hits == 2, "the connect-stage findings and the HELO verdict"
        assert len(dns_server.queries()) == asked, "a cached decision asks nothing"
        _, other = session(rt, "103.245.153.249", "other.example.net")
        assert other is Act.REJECT  # another HELO is another decision
    finally:
        rt.resolver.close()


def test_a_reused_decision_says_so_in_the_log(
    dns_server: DNSServer, caplog: pytest.LogCaptureFixture
) -> None:
    rt = runtime(dns_server)
    try:
        with caplog.at_level(logging.INFO, logger="heloguard.decisions"):
            session(rt, "103.245.153.249", "mail.digitaljunction.com.au")
            time.sleep(0.2)
            session(rt, "103.245.153.249", "mail.digitaljunction.com.au")
        first, second = [r.getMessage() for r in caplog.records if "reject: HELO" in r.getMessage()]
        assert re.search(r" dns=[1-9]\d*/\d+ ms=\d+$", first), first
        assert second.endswith(" ms=0") and " dns=0/" in second, second
    finally:
        rt.resolver.close()


def test_a_repeat_logs_the_line_a_fresh_decision_would(
    dns_server: DNSServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Repeats of a settled decision reuse its line text (DecisionLine keeps it on
    the decision); each line must still be the one its own session makes: its
    sender, escaped, never a neighbour's."""
    rt = runtime(dns_server)
    plain, hostile = "a@firemountain.net", "x\x1b[31m\r\n@firemountain.net"
    senders = [plain, hostile, plain, hostile, plain]
    try:
        with caplog.at_level(logging.INFO, logger="heloguard.decisions"):
            for sender in senders:
                s, act = session(rt, "64.71.1.10", "ukiah.firemountain.net")
                assert act is Act.CONTINUE
                s.mail(sender)
                s.close()
                time.sleep(0.05)  # the connect-stage lookups finish: the next one reuses all
        lines = [r.getMessage() for r in caplog.records]
        helo = [ln for ln in lines if ln.startswith("pass: HELO ")]
        mail = [ln for ln in lines if ln.startswith("pass: MAIL ")]
        assert len(helo) == len(mail) == len(senders), lines
        for line, sender in zip(mail, senders, strict=True):
            assert line.startswith("pass: MAIL from ukiah.firemountain.net[64.71.1.10]: ok;")
            assert f" from=<{escape(sender, 255)}> " in line, line
            assert "\x1b" not in line and "\r" not in line
        asked = mail[0].rsplit(" dns=", 1)[1].split("/")[1].split()[0]  # questions used
        for line in (*helo[1:], *mail[2:]):  # repeats: nothing asked, no time taken
            assert line.endswith(f" dns=0/{asked} ms=0"), line
        assert len(set(helo[1:])) == 1
        # made afresh (the first repeat), then kept: the same text, and the same as
        # the original decision's line but for what the original asked
        assert mail[2] == mail[4]
        assert mail[0].rsplit(" dns=", 1)[0] == mail[4].rsplit(" dns=", 1)[0]
        assert mail[1].rsplit(" dns=", 1)[0] == mail[3].rsplit(" dns=", 1)[0]

        # one repeated decision; a kept line must never stand for a session that
        # differs from its own in any field the line shows
        repeat = rt.decisions.get((HELO_STAGES, "64.71.1.10", "ukiah.firemountain.net", None))
        assert repeat is not None and repeat.texts is not None
        s = Session(rt)
        s.connect("64.71.1.10", "mx")

        def make_line(**fields: Any) -> DecisionLine:
            f = {**base, **fields}
            s.addr, s.helo_raw, s.sender, s.recipients = (
                f["addr"],
                f["helo"],
                f["sender"],
                [f["rcpt"]],
            )
            made = DecisionLine(s, f["what"], f["stage"], repeat, f["detail"], f["warned"], None)
            if "rule" in fields:
                made.rule = fields["rule"]  # what an exception does to a repeat in place
            return made

        base: dict[str, Any] = {
            "what": "pass",
            "stage": "RCPT",
            "addr": "64.71.1.10",
            "helo": "ukiah.firemountain.net",
            "sender": plain,
            "rcpt": "<p@example.org>",
            "detail": "",
            "warned": None,
        }
        variants: list[dict[str, Any]] = [  # each changes one field the line shows
            {"what": "warn"},
            {"stage": "MAIL"},
            {"addr": "64.71.1.11"},
            {"helo": "ukiah.firemountain.net\x00"},
            {"sender": hostile},
            {"rcpt": "<q\x7f@example.org>"},
            {"detail": "accepted; rules in warn mode failed"},
            {"warned": ["generic"]},
            {"rule": "fcrdns"},
        ]
        for variant in variants:
            repeat.texts.clear()
            kept = str(make_line())
            assert repeat.texts and str(make_line()) == kept
            other = make_line(**variant)
            assert str(other) == other._text(other._ptr_name(repeat)) != kept, variant
    finally:
        rt.resolver.close()


def test_deferrals_are_never_cached(dns_server: DNSServer) -> None:
    dns_server.set_fault("153.245.103.in-addr.arpa", "servfail")
    rt = runtime(dns_server)
    try:
        _, first = session(rt, "103.245.153.249", "mail.digitaljunction.com.au")
        assert first is Act.TEMPFAIL
        dns_server.clear_faults()
        rt.resolver._cache.clear()  # as if temp_ttl had run out
        _, second = session(rt, "103.245.153.249", "mail.digitaljunction.com.au")
        assert second is Act.REJECT, "DNS recovered: the client is judged afresh"
        assert rt.decisions.hits == 0
    finally:
        rt.resolver.close()


def test_cache_lives_no_longer_than_the_smallest_ttl() -> None:
    now = [100.0]
    cache = DecisionCache(clock=lambda: now[0])
    d = Decision(
        Verdict.ACCEPT, Stage.HELO, None, None, from_mapping({}).policy.mode, Verdict.ACCEPT, None
    )
    d.answers = {
        Query.of("x.example", "A"): Answer(
            Query.of("x.example", "A"), Status.OK, ("192.0.2.1",), ttl=20
        )
    }
    cache.put(("k",), d)
    now[0] += 19
    assert cache.get(("k",)) is not None
    now[0] += 2
    assert cache.get(("k",)) is None
    d.answers = {Query.of("x.example", "A"): Answer(Query.of("x.example", "A"), Status.TEMP)}
    cache.put(("t",), d)
    assert cache.get(("t",)) is None, "a decision that saw a TEMP answer is not kept"


def test_every_repeat_gets_one_read_only_copy_apart_from_the_original() -> None:
    cache = DecisionCache(clock=lambda: 100.0)
    d = Decision(
        Verdict.ACCEPT, Stage.HELO, None, None, from_mapping({}).policy.mode, Verdict.ACCEPT, None
    )
    d.elapsed = 0.25
    cache.put(("k",), d)
    first, again = cache.get(("k",)), cache.get(("k",))
    assert first is again and first is not d, "one copy, made when it was kept"
    assert first is not None and first.reused and first.elapsed == 0.0 and first.texts == {}
    d.verdict, d.texts = Verdict.REJECT, {("line",): "x"}  # the first session goes on with d
    assert first.verdict is Verdict.ACCEPT and first.texts == {}
    with pytest.raises(AttributeError, match="shared by every repeat; verdict is read-only"):
        first.verdict = Verdict.REJECT
    with pytest.raises(AttributeError, match="is read-only"):
        first.exempted("a later exception")  # mends only a fresh decision
    assert first.verdict is Verdict.ACCEPT and first.exempt == ""
    first.texts[("line",)] = "made once for every repeat"  # the one thing that grows
    assert cache.hits == 2


def test_pool_sender_retry_from_another_address_passes(
    dns_server: DNSServer, tmp_path: Path
) -> None:
    """The first attempt comes from one address of a verified domain, the retry from another."""
    from heloguard.config import GreylistConfig
    from heloguard.greylist import Greylist

    now = [1_700_000_000.0]
    cfg = GreylistConfig(database=str(tmp_path / "g.sqlite"))
    g = Greylist(cfg, clock=lambda: now[0])
    first_key = client_key(ipaddress.ip_address("64.71.1.10"), ("ukiah.firemountain.net",), cfg)
    retry_key = client_key(ipaddress.ip_address("64.71.1.11"), ("taos.firemountain.net",), cfg)
    assert not g.check(first_key, "news@firemountain.net", "bob@example.test").passed
    now[0] += 600
    assert g.check(retry_key, "news@firemountain.net", "bob@example.test").passed


def test_a_decision_not_ready_in_time_is_deferred_not_a_crash(
    dns_server: DNSServer, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A daemon short of CPU: the phase outlives budget + margin.  That is a 4xx with
    its reason in the log, never an internal error, and never a refusal."""
    import concurrent.futures

    rt = runtime(dns_server)
    try:

        def starved(coro: Any, timeout: float | None = None, *, inline: bool = False) -> Any:
            coro.close()
            raise concurrent.futures.TimeoutError

        monkeypatch.setattr(rt.resolver, "run", starved)
        with caplog.at_level(logging.INFO, logger="heloguard"):
            s = Session(rt)
            s.connect("103.245.153.249", "mx")  # the prefetch goes by submit, unaffected
            step = s.helo("mail.digitaljunction.com.au")
        assert step.act is Act.TEMPFAIL
        assert step.reply is not None and (step.reply.code, step.reply.status) == (451, "4.4.3")
        lines = [r.getMessage() for r in caplog.records]
        assert any(line.startswith("overload: client [103.245.153.249]") for line in lines)
        decided = [line for line in lines if line.startswith("tempfail: HELO")]
        assert len(decided) == 1 and "rule=overload" in decided[0], decided
        assert not any("callback failed" in line or "Traceback" in line for line in lines)
        assert rt.decisions.get(s._key([[Stage.CONNECT, Stage.HELO]])) is None, "never cached"
    finally:
        rt.resolver.close()


# Each case: extra settings, client, HELO, sender (None: the session ends at HELO),
# and a reading the case exists to cover.
SLIM_CASES: list[tuple[str, dict[str, Any], str, str, str | None]] = [
    ("generic bot", {}, "103.245.153.249", "mail.digitaljunction.com.au", None),
    ("well-run server", {}, "64.71.1.10", "ukiah.firemountain.net", "a@firemountain.net"),
    (
        "a rule in warn mode",
        {"rules": {"generic": {"action": "warn"}}},
        "103.245.153.249",
        "mail.digitaljunction.com.au",
        "b@example.org",
    ),
    ("policy mode warn", {"policy": {"mode": "warn"}}, "103.245.153.249", "x.example", None),
    (
        "listed below the threshold",
        {"rules": {"dnsbl": {"zones": ["bl.test=127.0.0.[2..4]", "bl2.test"], "threshold": 2}}},
        "2600:3c00::66",
        "ukiah.firemountain.net",
        "c@firemountain.net",
    ),
]


def _sessions(rt: Runtime, ip: str, helo: str, sender: str | None) -> list[Session]:
    """The same client three times: a fresh decision, then two repeats."""
    done = []
    for _ in range(3):
        s = Session(rt)
        s.connect(ip, "mx")
        if s.prefetch is not None:
            s.prefetch.result(timeout=10)  # the connect stage finishes: the next one reuses all
        if s.helo(helo).act is Act.CONTINUE and sender is not None:
            s.mail(sender)
        s.close()
        done.append(s)
    return done


@pytest.mark.parametrize(("case", "extra", "ip", "helo", "sender"), SLIM_CASES)
def test_a_slim_repeat_reads_as_the_whole_one(
    dns_server: DNSServer,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    case: str,
    extra: dict[str, Any],
    ip: str,
    helo: str,
    sender: str | None,
) -> None:
    """Without decision records a repeat keeps only the reports and answers a
    repeat session reads; its log lines, counters, greylist suspicion and names
    must be those of a repeat kept whole (records on)."""
    from heloguard.greylist import suspicious
    from heloguard.metrics import Metrics

    seen: dict[str, tuple[list[str], list[tuple[str, dict[str, str], float]], list[Session]]] = {}
    for kind, records in (
        ("slim", {}),
        ("whole", {"log": {"decisions": str(tmp_path / "d.jsonl")}}),
    ):
        config = from_mapping(
            {"dns": {"nameservers": [dns_server.nameserver], "timeout": 1}, **extra, **records}
        )
        metrics = Metrics()
        rt = Runtime.build(config, metrics=metrics)
        caplog.clear()
        try:
            with caplog.at_level(logging.DEBUG, logger="heloguard.decisions"):
                sessions = _sessions(rt, ip, helo, sender)
            lines = [  # the time a fresh decision took differs from run to run
                re.sub(r" ms=\d+$", "", r.getMessage())
                for r in caplog.records
                if r.name == "heloguard.decisions"
            ]
            counts = [
                (s.name, s.labels, s.value)
                for m in metrics.registry.collect()
                if m.name in ("heloguard_rules", "heloguard_list_errors", "heloguard_decisions")
                for s in m.samples
                if s.name.endswith("_total")
            ]
            seen[kind] = (lines, counts, sessions)
        finally:
            rt.resolver.close()
            if rt.records is not None:
                rt.records.close()
    slim_lines, slim_counts, slim = seen["slim"]
    whole_lines, whole_counts, whole = seen["whole"]
    assert len(slim_lines) >= 3 and slim_lines == whole_lines, case
    assert slim_counts and slim_counts == whole_counts, case
    fresh, repeat = whole[0], slim[2]
    pairs = [(fresh.helo_decision, repeat.helo_decision, whole[2].helo_decision)]
    if sender is not None and fresh.mail_decision is not None:
        pairs.append((fresh.mail_decision, repeat.mail_decision, whole[2].mail_decision))
    for made, kept, whole_copy in pairs:
        assert made is not None and kept is not None and whole_copy is not None
        assert kept.reused and whole_copy.reused and not made.reused
        assert len(whole_copy.reports) == len(made.reports), "records on: kept whole"
        assert kept.tally() == made.tally() == whole_copy.tally()
        assert kept.dns_queries == made.dns_queries
        assert kept.facts("verified") == made.facts("verified")
        assert (kept.verdict, kept.reply, kept.rule, kept.enforced) == (
            made.verdict,
            made.reply,
            made.rule,
            made.enforced,
        )
    assert suspicious(repeat.helo_decision, repeat.mail_decision) == suspicious(
        fresh.helo_decision, fresh.mail_decision
    )
    if case == "listed below the threshold":
        assert suspicious(repeat.helo_decision, repeat.mail_decision).startswith(
            "suspicious: listed by dnsbl"
        )
    kept_reports = sum(len(d.reports) for _, d, _ in pairs if d is not None)
    made_reports = sum(len(d.reports) for d, _, _ in pairs if d is not None)
    assert kept_reports < made_reports, "the slim copy keeps fewer reports"
