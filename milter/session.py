"""One SMTP session as heloguard sees it, independent of the MTA front end.

The milter adapter feeds a :class:`Session` the MTA's events (connect, HELO,
MAIL, RCPT) and turns each :class:`Step` it returns into a libmilter reply;
tests drive the same class directly.  Everything here is decided from the
client address and heloguard's own DNS lookups: the host name and macros the
MTA passes (``{client_name}``, ``{client_resolve}``, XCLIENT names) are never
evidence.

The course of a session:

* connect: if the client is not judged at all (loopback, a trusted network,
  the submission service, an address exception) the session is marked so.
  Otherwise the lookups that need only the address (PTR, forward
  confirmation) start now, so they are done or under way when HELO comes.
* HELO: the connect and helo rules are evaluated and the verdict is given:
  at once (``reject_stage = "helo"``: Postfix and Sendmail answer it at the
  next command, MAIL FROM, so no DATA is ever transferred), or kept until the
  first RCPT (``reject_stage = "rcpt"``: the log names the recipients, and a
  client that authenticates meanwhile is spared).  ``disconnect = true``
  turns a refusal at HELO into 421, which makes the MTA drop the client.
* MAIL: an authenticated client (``{auth_authen}``) is never judged; a
  client that skipped HELO is judged now, with no HELO.  An accepted MAIL
  with nothing left for RCPT (no RCPT-stage rule, no greylisting, no kept
  verdict) answers ACCEPT, which for MAIL means this message only: the MTA
  calls no RCPT for it and comes back at the next MAIL.
* RCPT: a kept verdict is answered, for every recipient.

One log line per decision, in the shape Postfix admins grep::

    reject: HELO from 103-245-153-249.host.neural.net.au[103.245.153.249]: 550 5.7.25 ...;
    helo=<mail.digitaljunction.com.au> rule=fcrdns evidence=...

with every attacker-controlled string escaped.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum

from heloguard.answers import IPAddress, Query
from heloguard.config import Config, Mode
from heloguard.engine import Decision, Effect, Engine, LiveDns, Verdict
from heloguard.gate import Gate
from heloguard.greylist import Greylist, client_key, greylist_reply, suspicious
from heloguard.logfmt import escape, printable
from heloguard.logsink import defer, later
from heloguard.metrics import Metrics
from heloguard.names import parse_address, parse_helo, reverse_name
from heloguard.records import RecordWriter, record
from heloguard.resolver import Resolver
from heloguard.rules.base import Context, Reply, Stage

log = logging.getLogger("heloguard.decisions")

HELO_PHASE = [[Stage.CONNECT, Stage.HELO]]
CONNECT_STAGES = (Stage.CONNECT,)
HELO_STAGES = (Stage.CONNECT, Stage.HELO)
MAIL_PHASE = [[Stage.MAIL]]


@dataclass(frozen=True, slots=True)
class SeenClient:
    """What a connecting address gives before any DNS: parsed once per address."""

    address: IPAddress | None
    text: str  # the address as log lines and keys show it
    ptr_query: Query | None
    skip: str  # why it is not judged ("" when it is)


class ClientMemo:
    """Recent connecting addresses, parsed and gated (bounded; a reload starts afresh:
    the gate's networks belong to one configuration)."""

    SIZE = 4096

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seen: dict[tuple[str | None, str | None], SeenClient] = {}

    def get(self, address: str | None, daemon_name: str | None, gate: Gate) -> SeenClient:
        """The parsed client for ``address`` as daemon ``daemon_name`` saw it."""
        key = (address, daemon_name)
        seen = self._seen.get(key)
        if seen is not None:
            return seen
        client = parse_address(address) if address else None
        seen = SeenClient(
            client,
            str(client) if client is not None else "unknown",
            Query.of(reverse_name(client), "PTR") if client is not None else None,
            gate.skip_reason(client, daemon_name),
        )
        with self._lock:
            self._seen[key] = seen
            while len(self._seen) > self.SIZE:
                del self._seen[next(iter(self._seen))]
        return seen


class Act(StrEnum):
    """What to tell the MTA."""

    CONTINUE = "continue"  # go on, call me at the next stage
    ACCEPT = "accept"  # go on, and don't call me again for this connection
    REJECT = "reject"
    TEMPFAIL = "tempfail"


@dataclass(frozen=True, slots=True)
class Step:
    """heloguard's answer to one MTA event."""

    act: Act
    reply: Reply | None = None

    @property
    def refuses(self) -> bool:
        """True for a rejection or a deferral."""
        return self.act in (Act.REJECT, Act.TEMPFAIL)


CONTINUE = Step(Act.CONTINUE)
ACCEPT = Step(Act.ACCEPT)


class DecisionCache:
    """Recent phase decisions per client, for repeat sessions (bots retrying,
    servers sending many messages).

    The same DNS facts always give the same verdict, and the resolver answers
    the same within a TTL; so a decision is kept for the smallest TTL among
    the answers it used (at most ``[dns] reuse_decisions``), and only a settled one:
    no TEMP answer, no deferral, no internal error.  Bounded in size; a
    reload builds a new runtime and so an empty cache.
    """

    MAX_AGE = 60.0
    SIZE = 4096

    def __init__(
        self, clock: Callable[[], float] = time.monotonic, max_age: float = MAX_AGE
    ) -> None:
        self.max_age = max_age
        self._lock = threading.Lock()  # for writers; a read is one dict lookup
        self._cache: dict[tuple[object, ...], tuple[Decision, float]] = {}
        self._clock = clock
        self.hits = 0

    def get(self, key: tuple[object, ...]) -> Decision | None:
        """The cached decision's repeat (``Decision.reuse``, shared by every repeat:
        read-only), or None.  No lock: ``dict.get`` is atomic."""
        found = self._cache.get(key)
        if found is None or found[1] <= self._clock():
            return None
        self.hits += 1  # a statistic: a lost increment under a race does no harm
        return found[0]

    def put(self, key: tuple[object, ...], decision: Decision, *, whole: bool = True) -> None:
        """Keep a settled decision for the smallest TTL it rests on; ``whole``:
        every report and answer (``Decision.reuse``)."""
        if decision.verdict is Verdict.TEMPFAIL or any(r.error for r in decision.reports):
            return
        if any(a.temp for a in decision.answers.values()):
            return
        ttls = [a.ttl for a in decision.answers.values()]
        age = min([self.max_age, *ttls])
        if age <= 0:
            return
        entry = (decision.reuse(whole=whole), self._clock() + age)
        with self._lock:
            cache = self._cache
            cache.pop(key, None)  # a refreshed entry goes to the young end
            cache[key] = entry
            while len(cache) > self.SIZE:  # the oldest go first (insertion order)
                del cache[next(iter(cache))]


@dataclass(slots=True)
class Runtime:
    """What every session of one configuration shares; replaced whole on reload."""

    config: Config
    engine: Engine
    resolver: Resolver
    gate: Gate
    greylist: Greylist | None = None
    decisions: DecisionCache = field(default_factory=DecisionCache)
    clients: ClientMemo = field(default_factory=ClientMemo)
    records: RecordWriter | None = None
    metrics: Metrics | None = None

    @classmethod
    def build(
        cls, config: Config, resolver: Resolver | None = None, metrics: Metrics | None = None
    ) -> Runtime:
        """Build the runtime for a configuration (a new resolver unless given)."""
        res = resolver or Resolver(config.dns.resolver_settings()).start()
        if metrics is not None:
            res.on_answer = metrics.dns_answer
            res.on_cache_hit = metrics.cache_hits.inc
            metrics.watch_cache(res.cache_size)
        engine = Engine(config, on_error=config.milter.failure_policy)
        grey = Greylist(config.greylist) if config.greylist is not None else None
        records = RecordWriter(config.log.decisions) if config.log.decisions else None
        return cls(
            metrics=metrics,
            records=records,
            config=config,
            engine=engine,
            resolver=res,
            gate=Gate.from_config(config),
            greylist=grey,
            decisions=DecisionCache(max_age=float(config.dns.reuse_decisions)),
        )

    @property
    def wait(self) -> float:
        """How long a callback waits for a phase: the DNS budget and a margin."""
        return self.config.dns.budget + 2.0


@dataclass(slots=True)
class Session:
    """The state of one SMTP connection."""

    rt: Runtime
    client: IPAddress | None = None
    skip: str = ""
    helo_raw: str | None = None
    helo_decision: Decision | None = None
    mail_decision: Decision | None = None
    pending: Decision | None = None  # a verdict kept for the first RCPT
    pending_stage: str = ""
    auth: str = ""
    sender: str | None = None
    recipients: list[str] = field(default_factory=list)
    prefetch: concurrent.futures.Future[Decision] | None = None
    known_connect: Decision | None = None  # a repeat client's connect-stage findings
    grey_key: str = ""
    counted: bool = False  # counted in sessions_in_flight
    callback_deadline: float = 0.0  # when this callback's DNS budget runs out
    addr: str = "unknown"  # the client address as text, once
    ptr_query: Query | None = None  # the PTR question of the client address, once

    # -- events -----------------------------------------------------------

    def connect(self, address: str | None, daemon_name: str | None = None) -> Step:
        """The client connected; start the lookups its address allows."""
        seen = self.rt.clients.get(address, daemon_name, self.rt.gate)
        self.client, self.skip = seen.address, seen.skip
        self.addr, self.ptr_query = seen.text, seen.ptr_query
        if self.rt.metrics is not None:
            self.rt.metrics.in_flight.inc()
            self.counted = True
        if self.skip:
            self._log("skip", "CONNECT", None, self.skip)
            return CONTINUE
        if self.client is None:  # skip_reason covers it; keeps the type checker honest
            return CONTINUE
        key = (CONNECT_STAGES, self.addr, None, None)  # self._key([[Stage.CONNECT]])
        known = self.rt.decisions.get(key)
        if known is not None:  # a repeat client: its connect-stage findings still stand
            self.known_connect = known
            return CONTINUE
        self.prefetch = self.rt.resolver.submit(
            self.rt.engine.decide(
                Context(client=self.client),
                LiveDns(self.rt.resolver),
                [[Stage.CONNECT]],
                evaluate_all=True,
            ),
            inline=True,
        )
        decisions = self.rt.decisions

        def keep(done: concurrent.futures.Future[Decision]) -> None:
            if not done.cancelled() and done.exception() is None:
                decisions.put(key, done.result(), whole=True)  # later phases adopt it

        self.prefetch.add_done_callback(keep)
        return CONTINUE

    def helo(self, argument: str) -> Step:
        """The client said HELO/EHLO: judge it."""
        self._new_callback()
        self.helo_raw = argument
        if self.skip:
            return ACCEPT  # not judged: nothing later applies either
        decision = self._decide(HELO_PHASE)
        self.helo_decision = decision
        if decision.exempt:  # a DNSWL hit: not judged any further
            self.skip = decision.exempt
            self._log("pass", "HELO", decision, decision.exempt, spared=True)
            return ACCEPT
        return self._verdict(decision, "HELO")

    def mail(self, sender: str, auth: str | None = None) -> Step:
        """MAIL FROM: spare authenticated clients; judge the sender (and a HELO-less client)."""
        self._new_callback()
        self.sender = sender
        self.recipients = []
        if self.skip:
            return CONTINUE
        if auth:
            self.auth = auth
            if self.pending is not None:
                self._log(
                    "pass", "MAIL", self.pending, f"authenticated as {auth}; spared", spared=True
                )
                self.pending = None
            return CONTINUE
        if self.helo_decision is None:
            self.helo_decision = self._decide(HELO_PHASE)
            if self.helo_decision.exempt:
                self.skip = self.helo_decision.exempt
                return CONTINUE
            step = self._verdict(self.helo_decision, "MAIL")
            if step.refuses or self.skip:
                return step
        if self.pending is not None:
            return CONTINUE  # the kept verdict is answered at RCPT
        if self.rt.engine.has_rules(Stage.MAIL):
            self.mail_decision = self._decide(MAIL_PHASE)
            step = self._verdict(self.mail_decision, "MAIL")
            if step is not CONTINUE or self.pending is not None:
                return step
        return self._after_mail()

    def _after_mail(self) -> Step:
        """An accepted MAIL: CONTINUE when RCPT has work (its rules, greylisting),
        else ACCEPT, which for MAIL means this message only: the MTA spares
        itself and us the RCPT callbacks, and calls MAIL again for the next
        message of the connection."""
        if self.rt.greylist is not None or self.rt.engine.has_rules(Stage.RCPT):
            return CONTINUE
        return ACCEPT

    def rcpt(self, recipient: str) -> Step:
        """RCPT TO: answer a kept verdict, or judge the recipient stage."""
        self._new_callback()
        self.recipients.append(recipient)
        if self.skip or self.auth:
            return CONTINUE
        if self.pending is not None:
            return self._refuse(self.pending, "RCPT")
        if self.rt.engine.has_rules(Stage.RCPT):
            decision = self._decide([[Stage.RCPT]])
            if decision.verdict is not Verdict.ACCEPT:
                return self._refuse(decision, "RCPT")
            self._log_accept(decision, "RCPT")
        return self._greylist(recipient)

    def _greylist(self, recipient: str) -> Step:
        """Greylisting, for the clients the policy aims at."""
        grey = self.rt.greylist
        if grey is None or self.client is None or self.rt.config.greylist is None:
            return CONTINUE
        cfg = self.rt.config.greylist
        suspicion = suspicious(self.helo_decision, self.mail_decision)
        if cfg.policy == "suspicious" and not suspicion:
            return CONTINUE
        verified = tuple(self.helo_decision.facts("verified") or ()) if self.helo_decision else ()
        if self.rt.gate.name_exception(verified):
            return CONTINUE  # a name exception is never greylisted, whatever the rules said
        if not self.grey_key:  # once per session: it classifies the client's name
            self.grey_key = client_key(self.client, verified, cfg)
        key = self.grey_key
        if self.rt.config.policy.mode is Mode.WARN:
            # warn mode refuses nothing: say what greylisting would do, record nothing
            would = grey.peek(key, self.sender or "", recipient)
            if not would.passed:
                detail = f"would greylist: {greylist_reply(would, cfg.delay)}; key={key}"
                self._log("warn", "RCPT", None, detail, name_from=self.helo_decision)
            return CONTINUE
        outcome = grey.check(key, self.sender or "", recipient)
        if self.rt.metrics is not None:
            label = "error" if outcome.error else ("passed" if outcome.passed else "delayed")
            later(self.rt.metrics.greylisted, label)
        detail = f"{outcome.reason}; key={key}" + (f"; {suspicion}" if suspicion else "")
        if outcome.passed:
            if outcome.reason.startswith("retried") or outcome.error:
                self._log(
                    "pass",
                    "RCPT",
                    None,
                    f"greylist: {detail}",
                    spared=True,
                    name_from=self.helo_decision,
                )
            return CONTINUE
        reply = greylist_reply(outcome, cfg.delay)
        self._log("greylist", "RCPT", None, f"{reply}; {detail}", name_from=self.helo_decision)
        return Step(Act.TEMPFAIL, reply)

    def abort(self) -> None:
        """The current message was aborted (RSET): forget its envelope."""
        self.sender = None
        self.recipients = []

    def close(self) -> None:
        """The connection ended."""
        self.prefetch = None
        if self.counted and self.rt.metrics is not None:
            self.rt.metrics.in_flight.dec()
            self.counted = False

    # -- helpers ----------------------------------------------------------

    def _context(self) -> Context:
        if self.client is None:
            raise RuntimeError("no client address in a judged session")
        helo = parse_helo(self.helo_raw) if self.helo_raw is not None else None
        return Context(client=self.client, helo=helo, sender=self.sender)

    def _key(self, phases: list[list[Stage]]) -> tuple[object, ...]:
        if phases is HELO_PHASE:  # the common case, without building the tuple
            return (HELO_STAGES, self.addr, self.helo_raw, None)
        stages = tuple(s for p in phases for s in p)
        sender = self.sender if Stage.MAIL in stages or Stage.RCPT in stages else None
        helo = self.helo_raw if Stage.HELO in stages else None
        return (stages, self.addr, helo, sender)

    def _decide(self, phases: list[list[Stage]]) -> Decision:
        key = self._key(phases)
        decision = self.rt.decisions.get(key)
        if decision is None:
            decision = self._evaluate(phases)
            # Kept whole only when records write every repeat out (the connect
            # stage's findings always are: see ``connect``).
            self.rt.decisions.put(key, decision, whole=self.rt.records is not None)
        # Counting and recording happen on the log writer's thread; the
        # callback only queues the decision and the inputs it was made on.
        if self.rt.metrics is not None:
            later(self.rt.metrics.decided, decision)
        records = self.rt.records
        if records is not None and self.client is not None and not decision.overdue:
            later(
                _write_record,
                records,
                decision,
                self.addr,
                self.helo_raw,
                self.sender,
                tuple(self.recipients),
                phases,
                time.time(),
            )
            records.check()  # a full disk: this decision cannot be kept either
        return decision

    def _evaluate(self, phases: list[list[Stage]]) -> Decision:
        reuse = self.known_connect
        pre = self.prefetch
        if pre is not None and pre.done() and not pre.cancelled() and pre.exception() is None:
            reuse = pre.result()  # the connect-stage findings, made while the client said hello
        budget = self._budget()
        coro = self.rt.engine.decide(
            self._context(), LiveDns(self.rt.resolver), phases, reuse=reuse, budget=budget
        )
        wait = budget + 2.0
        try:
            return self.rt.resolver.run(coro, timeout=wait, inline=True)
        except concurrent.futures.TimeoutError:
            # The DNS budget bounds the lookups; only a daemon short of CPU gets here.
            stage = "+".join(s.name for p in phases for s in p)
            why = f"no {stage} decision after {wait:.1f} s: overloaded"
            log.warning("overload: client [%s]: %s; deferring", self.addr, why)
            return self.rt.engine.overdue(why, phases)

    def _budget(self) -> float:
        """DNS time left for this MTA callback: one [dns] budget per callback, shared
        by every phase it evaluates (a client that skips HELO gets the HELO and
        MAIL phases in one MAIL callback), so no callback outlasts the MTA's
        milter timeout.  A phase left with nothing still gets a moment, and
        whatever it could not ask is TEMP: a 4xx, never a 5xx."""
        now = time.monotonic()
        if self.callback_deadline <= now:
            self.callback_deadline = now + self.rt.config.dns.budget
        return max(0.2, self.callback_deadline - now)

    def _new_callback(self) -> None:
        self.callback_deadline = 0.0

    def _verified(self, decision: Decision) -> tuple[str, ...]:
        verified = decision.facts("verified")
        if verified is None and self.rt.gate.exception_names:
            # fcrdns did not run (an earlier rule decided): ask it now, from the cache.
            budget = self._budget()  # the same callback: the same DNS budget
            coro = self.rt.engine.decide(
                self._context(),
                LiveDns(self.rt.resolver),
                [[Stage.CONNECT]],
                only=["fcrdns"],
                budget=budget,
            )
            found = self.rt.resolver.run(coro, timeout=budget + 2.0, inline=True)
            verified = found.facts("verified")
        return tuple(verified or ())

    def _verdict(self, decision: Decision, stage: str) -> Step:
        if decision.verdict is not Verdict.ACCEPT:
            exception = self.rt.gate.name_exception(self._verified(decision))
            if exception:
                # The decision itself is left as the rules made it: it is shared
                # (the decision cache) and recorded as made; the session is spared.
                self._log("pass", stage, decision, exception, spared=True)
                self.skip = exception
                return ACCEPT
        if decision.verdict is Verdict.ACCEPT:
            self._log_accept(decision, stage)
            return CONTINUE
        if self.rt.config.milter.reject_stage == "rcpt":
            self.pending, self.pending_stage = decision, stage
            return CONTINUE
        return self._refuse(decision, stage)

    def _refuse(self, decision: Decision, stage: str) -> Step:
        reply = decision.reply
        if reply is None:
            raise RuntimeError(f"a {decision.verdict} decision without a reply")
        act = Act.REJECT if decision.verdict is Verdict.REJECT else Act.TEMPFAIL
        if stage == "HELO" and self.rt.config.milter.disconnect:
            # 421 makes the MTA drop the client; libmilter wants 4xx with TEMPFAIL
            reply = Reply(421, "4" + reply.status[1:], reply.text)
            act = Act.TEMPFAIL
        self._log(str(decision.verdict), stage, decision, _unfielded(str(reply)))
        return Step(act, reply)

    def _log_accept(self, decision: Decision, stage: str) -> None:
        if decision.enforced is not Verdict.ACCEPT:  # warn mode
            detail = f"would {decision.enforced}: {_unfielded(str(decision.enforced_reply))}"
            self._log("warn", stage, decision, detail)
            return
        warned = [r.rule for r in decision.reports if r.effect is Effect.WARN]
        if warned:
            self._log("warn", stage, decision, "accepted; rules in warn mode failed", warned=warned)
        elif self.rt.config.log.passes:
            self._log("pass", stage, decision, "")

    def _log(
        self,
        what: str,
        stage: str,
        decision: Decision | None,
        detail: str,
        *,
        spared: bool = False,
        warned: list[str] | None = None,
        name_from: Decision | None = None,
    ) -> None:
        level = logging.INFO
        if what == "skip" or (what == "pass" and not spared):
            level = logging.DEBUG if not self.rt.config.log.passes else logging.INFO
        if not log.isEnabledFor(level):
            return
        defer(log, level, DecisionLine(self, what, stage, decision, detail, warned, name_from))


def _write_record(
    records: RecordWriter,
    decision: Decision,
    client: str,
    helo: str | None,
    sender: str | None,
    rcpt: tuple[str, ...],
    phases: list[list[Stage]],
    when: float,
) -> None:
    """Build and append one decision record (on the log writer's thread)."""
    records.write(
        record(
            decision,
            client=client,
            helo=helo,
            sender=sender,
            rcpt=list(rcpt),
            phases=phases,
            when=when,
        )
    )


TEXTS_KEPT = 4  # line texts kept per repeated decision (and its PTR name): a few senders


class DecisionLine:
    """One decision's log line, its text made when it is written.

    The callback only gathers what the line shows (a session changes
    afterwards: its sender, its recipients); ``str()`` builds the text, in
    the log writer's thread (:func:`heloguard.logsink.defer`).  The deciding
    rule is taken now: a name exception later turns the decision into an
    accept in place.  A repeat of a settled decision makes the same text from
    the same inputs, so the text is kept on the decision (``Decision.texts``,
    at most ``TEXTS_KEPT`` per decision) under every input it shows, and a
    repeat client's line costs a lookup instead of escaping and formatting.
    """

    __slots__ = (
        "addr",
        "decision",
        "detail",
        "helo",
        "helo_decision",
        "name_from",
        "ptr_query",
        "rcpt",
        "rule",
        "sender",
        "stage",
        "warned",
        "what",
    )

    def __init__(
        self,
        session: Session,
        what: str,
        stage: str,
        decision: Decision | None,
        detail: str,
        warned: list[str] | None,
        name_from: Decision | None,
    ) -> None:
        self.what = what
        self.stage = stage
        self.decision = decision
        self.detail = detail
        self.warned = warned
        self.name_from = name_from
        self.helo_decision = session.helo_decision
        self.ptr_query = session.ptr_query
        self.addr = session.addr
        self.helo = session.helo_raw
        self.sender = session.sender
        self.rcpt = session.recipients[-1] if session.recipients else None
        self.rule: str | None = None
        if decision is not None:
            rule = decision.rule
            if rule is None and decision.enforced_reply is not None:
                rule = _enforced_rule(decision)
            self.rule = "overload" if decision.overdue else (rule or None)

    def _ptr_name(self, decision: Decision | None) -> str:
        if decision is None or self.ptr_query is None:
            return "unknown"
        texts = decision.texts if decision.reused else None
        if texts is None:
            return _name_in(decision, self.ptr_query)
        key = (self.ptr_query,)  # beside the line texts, which are longer keys
        name = texts.get(key)
        if name is None:
            name = texts[key] = _name_in(decision, self.ptr_query)
        return name

    def __str__(self) -> str:
        name = self._ptr_name(self.decision or self.name_from)
        if name == "unknown" and self.helo_decision is not None:  # MAIL/RCPT decisions
            name = self._ptr_name(self.helo_decision)
        decision = self.decision
        texts = decision.texts if decision is not None and decision.reused else None
        if texts is None:
            return self._text(name)
        # A repeat of a settled decision: the same inputs make the same line,
        # without the time it took (none) and the questions sent (none).
        key = (
            name,
            self.what,
            self.stage,
            self.addr,
            self.helo,
            self.sender,
            self.rcpt,
            self.detail,
            self.rule,
            tuple(self.warned) if self.warned else None,
        )
        text = texts.get(key)
        if text is None:
            text = self._text(name)
            if len(texts) < TEXTS_KEPT:
                texts[key] = text
        return text

    def _text(self, ptr_name: str) -> str:
        decision, stage, detail = self.decision, self.stage, self.detail
        name = escape(ptr_name, 255)
        parts = [
            f"{self.what}: {stage} from {name}[{self.addr}]: "
            f"{printable(detail, 600) if detail else 'ok'};"
        ]
        if self.helo is not None:
            parts.append(f"helo=<{escape(self.helo, 255)}>")
        if stage in ("MAIL", "RCPT") and self.sender is not None:
            parts.append(f"from=<{escape(self.sender, 255)}>")
        if stage == "RCPT" and self.rcpt is not None:
            parts.append(f"to=<{escape(self.rcpt, 255)}>")
        if decision is not None:
            rule = self.rule
            if rule:
                parts.append(f"rule={rule}")
            if self.warned:
                parts.append(f"warn={','.join(self.warned)}")
            if decision.mode is not Mode.ENFORCE:
                parts.append(f"mode={decision.mode}")
            evidence = _evidence(decision, rule)
            if evidence:
                parts.append(f"evidence={evidence}")
            parts.append(
                f"dns={decision.dns_sent}/{decision.dns_queries} ms={decision.elapsed * 1000:.0f}"
            )
        return " ".join(parts)


def _name_in(decision: Decision, ptr_query: Query) -> str:
    """The client's name as ``decision`` knew it: verified, else the first PTR record."""
    verified = decision.facts("verified")
    if verified:
        return str(verified[0])
    ptr = decision.answers.get(ptr_query)
    if ptr is not None and ptr.ok and ptr.records:
        return ptr.records[0]
    return "unknown"


def _unfielded(reply: str) -> str:
    """A reply as the log line shows it.  It quotes the client's text (a HELO, a
    sender) with only the unprintable replaced, so an "=" there could forge a
    ``helo=<...>``/``rule=`` field ahead of the real ones: "=" shows as "?"."""
    return reply.replace("=", "?")


def _enforced_rule(decision: Decision) -> str | None:
    for r in decision.reports:
        if r.effect is not Effect.NONE:
            return r.rule
    return None


def _evidence(decision: Decision, rule: str | None) -> str:
    """The deciding rule's DNS answers, compact; names and records escaped."""
    if rule is None:
        return ""
    report = decision.report(rule)
    if report is None:
        return ""
    items = []
    for a in report.lookups:
        item = f"{escape(a.query.name, 255)}/{a.query.rdtype}={a.status}"
        if a.records:
            item += ":" + "+".join(escape(r, 255) for r in a.records[:3])
        items.append(item)
    text = ",".join(items) or escape(report.result.reason, 300)
    return text if len(text) <= 600 else text[:597] + "..."
