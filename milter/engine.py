"""The engine: runs the rules of a stage and turns their findings into a verdict.

How a phase is evaluated (a phase is what the milter decides at one SMTP
command: connect and helo rules at HELO, mail rules at MAIL FROM, rcpt rules
at RCPT TO):

1. Rules are ordered cheapest first: by cost, then stage, then their place in
   the registry.  Rules whose action is ``off`` are not run at all.
2. Rules of cost 0 (no DNS) run first.  If one of them rejects, the phase
   ends there and no DNS question is asked (unless an allow list, dnswl, is
   configured: its hit would exempt the client, so it is asked first).
3. The other rules run side by side in rounds.  Each round, every unfinished
   rule names the questions it needs next; the engine unites them, asks each
   distinct question once (in parallel, all under the phase's time budget)
   and hands every rule exactly the answers it asked for.  So the wall time is
   the depth of the longest lookup chain, not the number of lookups, and a
   PTR that four rules need is asked once.
4. After each round, if a finished rule rejects, the phase stops (unless
   ``evaluate_all``, which the dry-run uses to show every clue).
5. A rule's ``fail`` that saw a TEMP answer becomes ``tempfail``: a permanent
   rejection never rests on a temporary DNS failure.
6. Each rule's action (reject, tempfail, warn) is applied to its finding, then
   the global mode (enforce, soft, warn).  The verdict is reject if any rule's
   effect is reject, else tempfail if any is, else accept; its reply is that of
   the first rule, in evaluation order, with the deciding effect.

Everything here is deterministic given the DNS answers: the rounds depend only
on what the rules ask, never on the order in which answers arrive.  The engine
does no I/O itself; it asks a :class:`DnsSource` (the live resolver, or the
answers recorded in a decision, for replay).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from enum import StrEnum
from typing import Any, Protocol

from heloguard.answers import Answer, Origin, Query, Status
from heloguard.config import Action, Config, Mode
from heloguard.logfmt import printable
from heloguard.names import registered_domain, registered_domain_icann
from heloguard.resolver import Resolver
from heloguard.rules import REGISTRY
from heloguard.rules.base import Answers, Check, Context, Outcome, Reply, Result, Rule, Stage

log = logging.getLogger("heloguard.engine")

INTERNAL_ERROR = Reply(451, "4.3.0", "Temporary local problem; try again later")
# A phase that did not finish in time (the daemon is overloaded): defer, never refuse.
OVERDUE = Reply(451, "4.4.3", "Temporary problem checking your host; try again later")
# What a rule short-circuited before it finished reports (one shared value).
NOT_EVALUATED = Result(Outcome.SKIP, "not evaluated: the session was already rejected")


class Verdict(StrEnum):
    """The answer heloguard gives the MTA."""

    ACCEPT = "accept"
    TEMPFAIL = "tempfail"
    REJECT = "reject"


class Effect(StrEnum):
    """What one rule's finding does, after its action."""

    NONE = "none"
    REJECT = "reject"
    TEMPFAIL = "tempfail"
    WARN = "warn"  # would have rejected or deferred; logged only


class DnsSource(Protocol):
    """Where the engine gets answers: the live resolver or a recording."""

    def now(self) -> float:
        """The clock deadlines are measured on."""
        ...

    async def answer(self, queries: frozenset[Query], deadline: float) -> dict[Query, Answer]:
        """Answer every question, TEMP for those not answered by ``deadline``."""
        ...


class LiveDns:
    """Answers from the resolver, with some answers supplied by the caller.

    Supplied answers (the dry-run's ``--ptr``) are used as they are and never
    asked for.
    """

    def __init__(self, resolver: Resolver, supplied: Mapping[Query, Answer] | None = None) -> None:
        self.resolver = resolver
        self.supplied = dict(supplied or {})

    def now(self) -> float:
        """The resolver's clock."""
        return self.resolver.now()

    async def answer(self, queries: frozenset[Query], deadline: float) -> dict[Query, Answer]:
        """Supplied answers first, the rest from the resolver."""
        out = {q: self.supplied[q] for q in queries if q in self.supplied}
        rest = [q for q in sorted(queries) if q not in out]
        if rest:
            out.update(await self.resolver.lookup_many(rest, deadline))
        return out


class RecordedDns:
    """Answers from a recording; a question not recorded is TEMP."""

    def __init__(
        self, answers: Iterable[Answer], clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.answers = {a.query: replace(a, origin=Origin.SUPPLIED) for a in answers}
        self._clock = clock

    def now(self) -> float:
        """The wall clock (recordings have no deadline to speak of)."""
        return self._clock()

    async def answer(self, queries: frozenset[Query], deadline: float) -> dict[Query, Answer]:
        """The recorded answer, or TEMP when there is none."""
        return {
            q: self.answers.get(q, Answer(q, Status.TEMP, reason="not in the record"))
            for q in queries
        }


@dataclass(frozen=True, slots=True)
class RuleReport:
    """One rule's part in a decision."""

    rule: str
    stage: Stage
    result: Result
    action: Action
    effect: Effect
    reply: Reply | None  # the reply this rule would give (after its action)
    lookups: tuple[Answer, ...]
    elapsed: float
    error: bool = False


@dataclass(slots=True)
class Decision:
    """The verdict on a session at one point, with everything that led to it."""

    verdict: Verdict
    stage: Stage
    reply: Reply | None
    rule: str | None  # the rule whose reply it is
    mode: Mode
    enforced: Verdict  # what enforce mode would have done (differs in warn/soft)
    enforced_reply: Reply | None
    reports: list[RuleReport] = field(default_factory=list)
    answers: dict[Query, Answer] = field(default_factory=dict)
    elapsed: float = 0.0
    exempt: str = ""  # why the client is not judged (trusted, exception...), if so
    reused: bool = False  # taken from a recent identical decision: nothing was asked
    overdue: str = ""  # not finished in time (overload): why; deferred, rests on no facts
    # Text made from this decision's facts (its log lines), kept for its repeats:
    # the repeat copy the decision cache keeps has it, shared by every repeat;
    # a decision made afresh has none.
    texts: dict[tuple[object, ...], str] | None = None

    def reuse(self, *, whole: bool = True) -> Decision:
        """The copy standing for every repeat of this decision: no DNS sent, no time
        taken.  The decision cache keeps this one copy and hands it to each repeat
        (building one per repeat cost a callback about 1.8 us); it is read-only.

        ``whole=False`` keeps only what a repeat session reads (see
        :class:`_Repeat`): for a decision nothing writes out whole (no decision
        records) and no later phase takes findings from (not the connect stage's)."""
        return _Repeat(self, whole)

    def exempted(self, reason: str) -> Decision:
        """This decision turned into an accept because the client is exempt."""
        self.verdict = self.enforced = Verdict.ACCEPT
        self.reply = self.enforced_reply = None
        self.rule = None
        self.exempt = reason
        return self

    @property
    def dns_queries(self) -> int:
        """Distinct DNS questions this decision used."""
        return len(self.answers)

    def tally(self) -> tuple[Tally, ...]:
        """What the counters count of each rule that ran: (rule, outcome, effect,
        alerts)."""
        return tuple(
            (r.rule, r.result.outcome, r.effect, len(r.result.alerts)) for r in self.reports
        )

    @property
    def dns_sent(self) -> int:
        """Questions that went to a nameserver for this decision."""
        if self.reused:
            return 0
        return sum(1 for a in self.answers.values() if a.origin is Origin.NETWORK)

    def report(self, rule: str) -> RuleReport | None:
        """The report of one rule, if it ran."""
        return next((r for r in self.reports if r.rule == rule), None)

    def facts(self, key: str) -> Any:
        """A fact a rule recorded (for example ``verified``), or None."""
        for r in self.reports:
            if key in r.result.facts:
                return r.result.facts[key]
        return None


class _Repeat(Decision):
    """The decision cache's one copy of a settled decision, shared by every repeat
    session on every libmilter thread, so nothing may change it: setting an
    attribute raises.  Its ``texts`` (log lines made once, for all repeats) is
    the one thing that grows.

    A slim copy (not ``whole``) keeps, of the rules' reports, those a repeat
    session reads: a report with an effect (the deciding rule, its evidence, a
    rule in warn mode) or with a fact in ``REPEAT_FACTS``; of the answers, those
    reports' lookups and the PTR answers (the client's name in the log line).
    The count of questions and the counters' tally are kept as numbers.  In the
    benchmark's memory scenario a whole copy held 3.2 KB on average, with 7.2
    reports of which a repeat reads 1.2.
    """

    __slots__ = ("_queries", "_tally")
    _queries: int
    _tally: tuple[Tally, ...]

    def __init__(self, fresh: Decision, whole: bool = True) -> None:
        for name in _DECISION_FIELDS:
            object.__setattr__(self, name, getattr(fresh, name))
        for name, value in (("elapsed", 0.0), ("reused", True), ("overdue", ""), ("texts", {})):
            object.__setattr__(self, name, value)
        object.__setattr__(self, "_queries", len(fresh.answers))
        object.__setattr__(self, "_tally", tuple(_TALLIES.setdefault(t, t) for t in fresh.tally()))
        if not whole:
            reports = [r for r in fresh.reports if _read_by_repeats(r)]
            looked = {a.query for r in reports for a in r.lookups}
            answers = {q: a for q, a in fresh.answers.items() if q in looked or q.rdtype == "PTR"}
            object.__setattr__(self, "reports", reports)
            object.__setattr__(self, "answers", answers)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"a repeat decision is shared by every repeat; {name} is read-only")

    @property
    def dns_queries(self) -> int:
        """Distinct DNS questions the decision used (a slim copy keeps fewer answers)."""
        return self._queries

    def tally(self) -> tuple[Tally, ...]:
        """The counters' tally of every rule that ran, kept when the copy was made."""
        return self._tally


Tally = tuple[str, Outcome, Effect, int]
# Facts a repeat session reads: the verified names (the client's name, name
# exceptions, the greylist key) and a DNS list's listing below its threshold
# (greylisting's suspicion).
REPEAT_FACTS = ("verified", "listed")
# One tuple per distinct (rule, outcome, effect, alerts): a handful per rule.
_TALLIES: dict[Tally, Tally] = {}


def _read_by_repeats(r: RuleReport) -> bool:
    facts = r.result.facts
    return r.effect is not Effect.NONE or any(k in facts for k in REPEAT_FACTS)


_DECISION_FIELDS = tuple(f.name for f in fields(Decision))


@dataclass(frozen=True, slots=True)
class _Entry:
    rule: Rule[Any]
    action: Action
    options: Any
    index: int

    @property
    def order(self) -> tuple[int, int, int]:
        return (self.rule.cost, int(self.rule.stage), self.index)


def _effect(result: Result, action: Action) -> tuple[Effect, Reply | None]:
    if result.warn_only and result.outcome in (Outcome.FAIL, Outcome.TEMPFAIL):
        return Effect.WARN, result.reply
    if result.outcome is Outcome.FAIL:
        if action is Action.REJECT:
            return Effect.REJECT, result.reply
        if action is Action.TEMPFAIL:
            return Effect.TEMPFAIL, result.reply.temporary() if result.reply else INTERNAL_ERROR
        return Effect.WARN, result.reply
    if result.outcome is Outcome.TEMPFAIL:
        if action is Action.WARN:
            return Effect.WARN, result.reply
        return Effect.TEMPFAIL, result.reply or INTERNAL_ERROR
    return Effect.NONE, None


class Engine:
    """Evaluates the configured rules; safe to share between threads and sessions."""

    def __init__(
        self,
        config: Config,
        rules: Mapping[str, Rule[Any]] | None = None,
        *,
        on_error: str = "tempfail",
    ) -> None:
        self.config = config
        self.on_error = on_error
        self.alerts: Counter[str] = Counter()  # misconfigurations seen, by rule
        registry = rules if rules is not None else REGISTRY
        entries = []
        for index, (name, rule) in enumerate(registry.items()):
            rcfg = config.rules.get(name)
            action = rcfg.action if rcfg else Action(rule.default_action)
            options = rcfg.options if rcfg else rule.options()
            if action is not Action.OFF:
                entries.append(_Entry(rule, action, options, index))
        self._entries = sorted(entries, key=lambda e: e.order)
        self._stages = frozenset(e.rule.stage for e in self._entries)
        # load both Public Suffix Lists now, not in the middle of a session
        registered_domain("warm.example.com")
        registered_domain_icann("warm.example.com")

    def has_rules(self, stage: Stage) -> bool:
        """True when some enabled rule runs at ``stage`` (a set lookup, for the warm path)."""
        return stage in self._stages

    def rules_for(self, stages: Iterable[Stage], only: Iterable[str] | None = None) -> list[str]:
        """Names of the rules a phase would run, in evaluation order."""
        wanted = set(stages)
        names = set(only) if only is not None else None
        return [
            e.rule.name
            for e in self._entries
            if e.rule.stage in wanted and (names is None or e.rule.name in names)
        ]

    async def decide(
        self,
        ctx: Context,
        dns: DnsSource,
        phases: Sequence[Sequence[Stage]],
        *,
        evaluate_all: bool = False,
        only: Iterable[str] | None = None,
        budget: float | None = None,
        reuse: Decision | None = None,
    ) -> Decision:
        """Evaluate phases in order; the first phase that does not accept decides.

        ``reuse``: an earlier decision on the same client (the connect-time
        prefetch) whose findings stand for the rules it evaluated.

        Each phase has its own time budget (``[dns] budget`` unless given).
        With ``evaluate_all`` every rule of every phase runs (the dry-run).
        """
        started = time.monotonic()
        reports: list[RuleReport] = []
        answers: dict[Query, Answer] = {}
        deciding: Decision | None = None
        for stages in phases:
            phase = await self._phase(ctx, dns, stages, evaluate_all, only, budget, reuse)
            reports.extend(phase.reports)
            for q, a in phase.answers.items():
                answers.setdefault(q, a)
            if phase.exempt:  # a DNSWL hit: the other checks are skipped
                deciding = phase
                break
            if deciding is None and phase.enforced is not Verdict.ACCEPT:
                deciding = phase
                if not evaluate_all:
                    break
        last_stage = max((s for p in phases for s in p), default=Stage.HELO)
        if deciding is None:
            deciding = self._combine([], max(last_stage, Stage.HELO))
        deciding.reports = reports
        deciding.answers = answers
        deciding.elapsed = time.monotonic() - started
        return deciding

    def overdue(self, reason: str, phases: Sequence[Sequence[Stage]]) -> Decision:
        """The decision for a phase that did not finish in time: a deferral (in warn
        mode only logged), never a refusal, since it rests on no DNS facts."""
        last = max((s for p in phases for s in p), default=Stage.HELO)
        decision = self._combine([], max(last, Stage.HELO))
        decision.enforced, decision.enforced_reply = Verdict.TEMPFAIL, OVERDUE
        if self.config.policy.mode is not Mode.WARN:
            decision.verdict, decision.reply = Verdict.TEMPFAIL, OVERDUE
        decision.overdue = reason
        return decision

    def exempt(self, reason: str, phases: Sequence[Sequence[Stage]]) -> Decision:
        """The decision for a client that is not judged at all."""
        last = max((s for p in phases for s in p), default=Stage.HELO)
        decision = self._combine([], max(last, Stage.HELO))
        return decision.exempted(reason)

    def _combine(self, reports: list[RuleReport], stage: Stage) -> Decision:
        verdict, reply, rule = Verdict.ACCEPT, None, None
        for wanted, verdict_if in (
            (Effect.REJECT, Verdict.REJECT),
            (Effect.TEMPFAIL, Verdict.TEMPFAIL),
        ):
            first = next((r for r in reports if r.effect is wanted), None)
            if first is not None:
                verdict, reply, rule = verdict_if, first.reply, first.rule
                break
        mode = self.config.policy.mode
        final, final_reply = verdict, reply
        if mode is Mode.WARN:
            final, final_reply = Verdict.ACCEPT, None
        elif mode is Mode.SOFT and verdict is Verdict.REJECT:
            final = Verdict.TEMPFAIL
            final_reply = reply.temporary() if reply else INTERNAL_ERROR
        return Decision(
            verdict=final,
            stage=stage,
            reply=final_reply,
            rule=rule if final is not Verdict.ACCEPT else None,
            mode=mode,
            enforced=verdict,
            enforced_reply=reply,
            reports=reports,
        )

    async def _phase(
        self,
        ctx: Context,
        dns: DnsSource,
        stages: Sequence[Stage],
        evaluate_all: bool,
        only: Iterable[str] | None,
        budget: float | None,
        reuse: Decision | None = None,
    ) -> Decision:
        wanted = set(stages)
        names = set(only) if only is not None else None
        entries = [
            e
            for e in self._entries
            if e.rule.stage in wanted and (names is None or e.rule.name in names)
        ]
        # The verdict of connect-stage rules is given at HELO (a connect-time
        # reject loses its text in both Postfix and Sendmail).
        stage = max(max(wanted, default=Stage.HELO), Stage.HELO)
        seconds = budget if budget is not None else self.config.dns.budget
        phase = _Phase(ctx, entries, evaluate_all, self.on_error)
        if reuse is not None:
            phase.adopt(reuse)
        await phase.run(dns, dns.now() + seconds)
        reports = phase.reports()
        for r in reports:
            if r.rule in phase.adopted:
                continue  # logged and counted when it was first found
            for alert in r.result.alerts:
                self.alerts[r.rule] += 1
                log.warning("misconfiguration (rule %s): %s", r.rule, printable(alert, 400))
        unanswered = _unanswered_allow_list(entries, reports)
        if unanswered:  # its hit would have exempted the client: refuse nothing for good
            reports = [_deferred(r, unanswered) for r in reports]
        decision = self._combine(reports, stage)
        decision.answers = phase.answers
        exempt = next((r for r in reports if r.result.exempt), None)
        if exempt is not None:
            decision.exempted(f"{exempt.rule}: {exempt.result.exempt}")
        return decision


def _unanswered_allow_list(entries: list[_Entry], reports: list[RuleReport]) -> str:
    """Why an allow list (dnswl) that found no hit could not be sure ("" if it could)."""
    exempting = {e.rule.name for e in entries if e.rule.exempts}
    for r in reports:
        if r.rule in exempting and not r.result.exempt:
            temp = next((a for a in r.lookups if a.temp), None)
            if temp is not None:
                return f"{r.rule}: {temp.query} was TEMP ({temp.reason})"
    return ""


def _deferred(report: RuleReport, why: str) -> RuleReport:
    """A rejection turned into a deferral: the allow list could have exempted the client."""
    if report.effect is not Effect.REJECT:
        return report
    note = f"deferred: {why}; a hit would have exempted the client"
    return replace(
        report,
        effect=Effect.TEMPFAIL,
        reply=report.reply.temporary() if report.reply else INTERNAL_ERROR,
        result=replace(report.result, notes=(*report.result.notes, note)),
    )


class _Phase:
    """The state of one phase's evaluation: live rules, findings, answers."""

    def __init__(
        self, ctx: Context, entries: list[_Entry], evaluate_all: bool, on_error: str
    ) -> None:
        self.ctx = ctx
        self.entries = entries
        self.evaluate_all = evaluate_all
        self.on_error = on_error
        self.started = time.monotonic()
        self.done: dict[str, RuleReport] = {}
        self.seen: dict[str, dict[Query, Answer]] = {e.rule.name: {} for e in entries}
        self.answers: dict[Query, Answer] = {}
        self.adopted: set[str] = set()

    def adopt(self, earlier: Decision) -> None:
        """Take over the findings of an earlier decision on the same client."""
        mine = {e.rule.name for e in self.entries}
        for r in earlier.reports:
            # a deferral is asked again: DNS may have recovered since connect
            settled = r.result.outcome in (Outcome.PASS, Outcome.FAIL)
            if r.rule in mine and not r.error and settled:
                self.done[r.rule] = r
                self.adopted.add(r.rule)
                for a in r.lookups:
                    self.answers.setdefault(a.query, a)

    def reports(self) -> list[RuleReport]:
        """Findings in evaluation order."""
        return [self.done[e.rule.name] for e in self.entries if e.rule.name in self.done]

    def rejected(self) -> bool:
        """True when a finished rule rejects and the phase may stop.

        Not while a rule that can exempt the client (dnswl) has yet to answer:
        its hit would skip every other check.
        """
        if self.evaluate_all:
            return False
        if any(e.rule.exempts and e.rule.name not in self.done for e in self.entries):
            return False
        return any(r.effect is Effect.REJECT for r in self.done.values())

    def finish(self, e: _Entry, result: Result, error: bool = False) -> None:
        """Record a rule's finding, applying the TEMP guard and its action."""
        lookups = list(self.seen[e.rule.name].values())
        temp = next((a for a in lookups if a.temp), None)
        if result.outcome is Outcome.FAIL and not result.certain and temp is not None:
            deferred = result.reply.temporary() if result.reply else INTERNAL_ERROR
            note = f"deferred: {temp.query} was TEMP ({temp.reason})"
            result = replace(
                result, outcome=Outcome.TEMPFAIL, reply=deferred, notes=(*result.notes, note)
            )
        effect, reply = _effect(result, e.action)
        if error and self.on_error == "accept":
            effect, reply = Effect.NONE, None
        self.done[e.rule.name] = RuleReport(
            rule=e.rule.name,
            stage=e.rule.stage,
            result=result,
            action=e.action,
            effect=effect,
            reply=reply,
            lookups=tuple(lookups),
            elapsed=time.monotonic() - self.started,
            error=error,
        )

    def crashed(self, e: _Entry, exc: BaseException) -> None:
        """A rule raised: log it with its traceback, answer per failure policy."""
        log.error("rule %s raised %r; answering per failure policy", e.rule.name, exc, exc_info=exc)
        reason = f"internal error: {type(exc).__name__}"
        self.finish(e, Result(Outcome.TEMPFAIL, reason, INTERNAL_ERROR), error=True)

    def start(self, e: _Entry) -> tuple[Check, frozenset[Query]] | None:
        """Call a rule; a generator that wants lookups is returned with its first batch."""
        try:
            out = e.rule.check(self.ctx, e.options)
            if isinstance(out, Result):
                self.finish(e, out)
                return None
            return out, next(out)
        except StopIteration as stop:
            self.finish(e, stop.value)
        except Exception as exc:  # noqa: BLE001 - a rule bug must not take the session down
            self.crashed(e, exc)
        return None

    async def run(self, dns: DnsSource, deadline: float) -> None:
        """Pure rules first, then rounds of lookups until every rule has a finding."""
        live: dict[str, tuple[_Entry, Check, frozenset[Query]]] = {}
        for pure_first in (True, False):
            for e in self.entries:
                if e.rule.name in self.done:
                    continue
                # rules of cost 0 always run (they are free): with adopted
                # findings, the first rejection in evaluation order must
                # still be the one a fresh evaluation finds
                if (e.rule.cost == 0) == pure_first and (pure_first or not self.rejected()):
                    started = self.start(e)
                    if started is not None:
                        live[e.rule.name] = (e, *started)
        while live and not self.rejected():
            union = frozenset().union(*(batch for _, _, batch in live.values()))
            answers = await dns.answer(union, deadline)
            for q, a in answers.items():
                self.answers.setdefault(q, a)  # the first answer says where it came from
            live = self._round(live, answers)
        for e, gen, _ in live.values():  # short-circuited: never finished
            gen.close()
            self.finish(e, NOT_EVALUATED)

    def _round(
        self,
        live: dict[str, tuple[_Entry, Check, frozenset[Query]]],
        answers: Answers,
    ) -> dict[str, tuple[_Entry, Check, frozenset[Query]]]:
        nxt: dict[str, tuple[_Entry, Check, frozenset[Query]]] = {}
        for name, (e, gen, batch) in live.items():
            got: Answers = {q: answers[q] for q in sorted(batch)}
            for q, a in got.items():
                self.seen[name].setdefault(q, a)
            try:
                nxt[name] = (e, gen, gen.send(got))
            except StopIteration as stop:
                self.finish(e, stop.value)
            except Exception as exc:  # noqa: BLE001 - a rule bug must not take the session down
                self.crashed(e, exc)
        return nxt
