"""The engine: cheapest first, one question once, rounds, short-circuit,
the TEMP guard, actions, modes, and rules that crash.

Answers come from a recording (no network); a counting source checks how
many rounds and questions the engine used.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import Any

import pytest

from heloguard.answers import Answer, Query, Status
from heloguard.config import Action, Mode, from_mapping
from heloguard.engine import Decision, Engine, RecordedDns, Verdict
from heloguard.rules import REGISTRY
from heloguard.rules.base import Check, Context, NoOptions, Outcome, Reply, Rule, Stage, ask, failed

from ruletable import ctx

HELO_PHASE = [[Stage.CONNECT, Stage.HELO]]


def A(name: str, rdtype: str, *records: str, status: Status = Status.OK) -> Answer:
    return Answer(Query.of(name, rdtype), status if not records else Status.OK, records, ttl=300)


ESSAY = [
    A("249.153.245.103.in-addr.arpa", "PTR", "103-245-153-249.host.neural.net.au"),
    A("103-245-153-249.host.neural.net.au", "A", status=Status.NXDOMAIN),
    A("mail.digitaljunction.com.au", "A", "27.50.64.99"),
    A("mail.digitaljunction.com.au", "AAAA", status=Status.NODATA),
    A("99.64.50.27.in-addr.arpa", "PTR", status=Status.NXDOMAIN),
]
GOOD = [
    A("10.1.71.64.in-addr.arpa", "PTR", "ukiah.firemountain.net"),
    A("ukiah.firemountain.net", "A", "64.71.1.10"),
    A("ukiah.firemountain.net", "AAAA", "2600:3c00::10"),
    A(
        "0.1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.c.3.0.0.6.2.ip6.arpa",
        "PTR",
        "ukiah.firemountain.net",
    ),
]


class CountingDns(RecordedDns):
    """A recording that also counts rounds and every question asked."""

    def __init__(self, answers: list[Answer]) -> None:
        super().__init__(answers)
        self.rounds: list[frozenset[Query]] = []

    async def answer(self, queries: frozenset[Query], deadline: float) -> dict[Query, Answer]:
        self.rounds.append(queries)
        return await super().answer(queries, deadline)


def decide(
    config: dict[str, Any], answers: list[Answer], ip: str, helo: str | None, **kw: Any
) -> tuple[Decision, CountingDns]:
    engine = Engine(from_mapping(config))
    src = CountingDns(answers)
    d = asyncio.run(engine.decide(ctx(ip, helo), src, kw.pop("phases", HELO_PHASE), **kw))
    return d, src


def test_essay_rejected_by_fcrdns_with_reply() -> None:
    d, _ = decide({}, ESSAY, "103.245.153.249", "mail.digitaljunction.com.au", evaluate_all=True)
    assert d.verdict is Verdict.REJECT
    assert d.rule == "generic"  # the cheapest failing rule gives the reply
    assert d.reply is not None and str(d.reply).startswith("550 5.7.1 ")
    found = {r.rule: r.result.outcome for r in d.reports}
    assert found["fcrdns"] is Outcome.FAIL
    assert found["helo_matches"] is Outcome.FAIL
    assert found["helo_fcrdns"] is Outcome.FAIL  # the fourth clue, visible (warn by default)
    assert found["ptr"] is Outcome.PASS
    assert d.stage is Stage.HELO


def test_well_run_server_accepted() -> None:
    d, _ = decide({}, GOOD, "64.71.1.10", "ukiah.firemountain.net")
    assert d.verdict is Verdict.ACCEPT and d.reply is None and d.rule is None
    assert all(r.result.outcome in (Outcome.PASS, Outcome.SKIP) for r in d.reports)


def test_each_question_asked_once_and_two_rounds() -> None:
    d, src = decide({}, ESSAY, "103.245.153.249", "mail.digitaljunction.com.au", evaluate_all=True)
    asked = [q for r in src.rounds for q in r]
    assert len(asked) == len(set(asked)), "a question was asked in two rounds"
    # PTR of the client is needed by ptr, fcrdns and helo_matches: once.
    assert asked.count(Query.of("249.153.245.103.in-addr.arpa", "PTR")) == 1
    assert len(src.rounds) == 2, "the lookup chain is two deep"
    assert d.dns_queries == len(asked)


def test_pure_rules_first_no_dns_when_syntax_rejects() -> None:
    d, src = decide({}, GOOD, "64.71.1.10", "localhost")
    assert d.verdict is Verdict.REJECT and d.rule == "helo_syntax"
    assert src.rounds == [], "a HELO syntax rejection must not cost a DNS question"


def test_short_circuit_after_round_and_evaluate_all_runs_everything() -> None:
    quick, src_quick = decide({}, ESSAY, "103.245.153.249", "mail.digitaljunction.com.au")
    full, src_full = decide(
        {}, ESSAY, "103.245.153.249", "mail.digitaljunction.com.au", evaluate_all=True
    )
    assert quick.verdict is full.verdict is Verdict.REJECT
    assert quick.rule == full.rule == "generic"
    assert str(quick.reply) == str(full.reply)
    # the short-circuited run stopped after the round in which fcrdns failed
    assert len(src_quick.rounds) <= len(src_full.rounds)


def test_temp_never_gives_5xx() -> None:
    temp_ptr = [
        a if a.query.rdtype != "PTR" else replace(a, status=Status.TEMP, records=()) for a in ESSAY
    ]
    d, _ = decide({}, temp_ptr, "103.245.153.249", "mail.digitaljunction.com.au", evaluate_all=True)
    assert d.verdict is Verdict.TEMPFAIL
    assert d.reply is not None and d.reply.code == 451 and d.reply.status.startswith("4.")
    for r in d.reports:
        assert r.reply is None or r.reply.code < 500 or r.result.outcome is Outcome.FAIL
        if r.result.outcome is Outcome.FAIL:
            assert not any(a.temp for a in r.lookups), (
                f"{r.rule} failed permanently on a TEMP answer"
            )


def test_missing_answer_is_temp_not_absent() -> None:
    d, _ = decide({}, [], "64.71.1.10", "ukiah.firemountain.net")
    assert d.verdict is Verdict.TEMPFAIL


def _bad_rule() -> Rule[NoOptions]:
    def check(c: Context, _o: NoOptions) -> Check:
        answers = yield from ask(
            Query.of("ukiah.firemountain.net", "A"), Query.of("nothere.example", "A")
        )
        del answers
        return failed(Reply(550, "5.7.1", "careless"), "fails regardless")

    return Rule(
        "careless",
        Stage.HELO,
        1,
        NoOptions,
        check,
        "careless: fails on anything\nStage Replies Trust",
    )


def test_engine_guard_defers_a_fail_that_saw_temp() -> None:
    rule = _bad_rule()
    engine = Engine(from_mapping({}), {"careless": rule})
    src = RecordedDns([A("ukiah.firemountain.net", "A", "64.71.1.10")])  # second question: TEMP
    d = asyncio.run(engine.decide(ctx("64.71.1.10", "x.example"), src, HELO_PHASE))
    report = d.report("careless")
    assert report is not None and report.result.outcome is Outcome.TEMPFAIL
    assert d.verdict is Verdict.TEMPFAIL and d.reply is not None and d.reply.code == 451
    assert any("TEMP" in n for n in report.result.notes)


def _crashing_rule() -> Rule[NoOptions]:
    def check(c: Context, _o: NoOptions) -> Check:
        yield frozenset({Query.of("ukiah.firemountain.net", "A")})
        raise ZeroDivisionError("bug")

    return Rule("crashy", Stage.HELO, 1, NoOptions, check, "crashy\nStage Replies Trust")


@pytest.mark.parametrize(
    ("policy", "verdict"), [("tempfail", Verdict.TEMPFAIL), ("accept", Verdict.ACCEPT)]
)
def test_rule_exception_follows_failure_policy(
    policy: str, verdict: Verdict, caplog: pytest.LogCaptureFixture
) -> None:
    engine = Engine(from_mapping({}), {"crashy": _crashing_rule()}, on_error=policy)
    d = asyncio.run(engine.decide(ctx("64.71.1.10", "x.example"), RecordedDns(GOOD), HELO_PHASE))
    assert d.verdict is verdict
    report = d.report("crashy")
    assert report is not None and report.error
    assert "ZeroDivisionError" in caplog.text


ACTION_CASES = [
    ("reject", "enforce", Verdict.REJECT, "550 5.7.1"),
    ("tempfail", "enforce", Verdict.TEMPFAIL, "451 4.7.1"),
    ("warn", "enforce", Verdict.ACCEPT, None),
    ("reject", "soft", Verdict.TEMPFAIL, "451 4.7.1"),
    ("reject", "warn", Verdict.ACCEPT, None),
]


@pytest.mark.parametrize(("action", "mode", "verdict", "reply"), ACTION_CASES)
def test_actions_and_modes(action: str, mode: str, verdict: Verdict, reply: str | None) -> None:
    rules = {name: {"action": action} for name in ("ptr", "generic", "fcrdns", "helo_matches")}
    config = {"policy": {"mode": mode}, "rules": rules}
    d, _ = decide(
        config, ESSAY, "103.245.153.249", "mail.digitaljunction.com.au", evaluate_all=True
    )
    assert d.verdict is verdict
    if reply is not None:
        assert d.reply is not None and str(d.reply).startswith(reply + " ")
    fc = d.report("fcrdns")
    assert fc is not None and fc.result.outcome is Outcome.FAIL, (
        "the finding is shown whatever the action"
    )
    assert fc.action is Action(action)
    if reply is None:
        assert d.reply is None
    if mode == "warn":
        assert d.enforced is Verdict.REJECT and d.enforced_reply is not None


def test_off_rules_do_not_run() -> None:
    config = {"rules": {name: {"action": "off"} for name in REGISTRY}}
    d, src = decide(config, ESSAY, "103.245.153.249", "mail.digitaljunction.com.au")
    assert d.reports == [] and src.rounds == [] and d.verdict is Verdict.ACCEPT


def test_helo_matches_rejects_when_fcrdns_only_defers() -> None:
    """A rule that only defers does not soften another rule's certain failure."""
    config = {"rules": {"fcrdns": {"action": "tempfail"}, "generic": {"action": "off"}}}
    d, _ = decide(
        config, ESSAY, "103.245.153.249", "mail.digitaljunction.com.au", evaluate_all=True
    )
    assert d.verdict is Verdict.REJECT and d.rule == "helo_matches"


def test_only_named_rules() -> None:
    d, src = decide({}, ESSAY, "103.245.153.249", "mail.digitaljunction.com.au", only=["ptr"])
    assert [r.rule for r in d.reports] == ["ptr"]
    assert [set(r) for r in src.rounds] == [{Query.of("249.153.245.103.in-addr.arpa", "PTR")}]


def test_first_phase_that_refuses_decides() -> None:
    phases = [[Stage.CONNECT, Stage.HELO], [Stage.MAIL]]
    d, _ = decide({}, ESSAY, "103.245.153.249", "mail.digitaljunction.com.au", phases=phases)
    assert d.stage is Stage.HELO and d.verdict is Verdict.REJECT


def test_decisions_are_repeatable() -> None:
    outs = set()
    for _ in range(5):
        d, _src = decide(
            {}, ESSAY, "103.245.153.249", "mail.digitaljunction.com.au", evaluate_all=True
        )
        outs.add((d.verdict, str(d.reply), tuple((r.rule, r.result.outcome) for r in d.reports)))
    assert len(outs) == 1


def test_mode_default_is_enforce() -> None:
    assert from_mapping({}).policy.mode is Mode.ENFORCE
