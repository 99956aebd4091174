"""The rule contract: what a rule declares, what it is given, what it returns.

A rule is a module in ``rules/`` that exports ``RULE``, a :class:`Rule`
naming its config word, the SMTP stage whose inputs it needs, its cost (0: no
DNS; 1: one round of lookups; 2 and up: chained rounds), its options and its
``check`` function.

``check(ctx, opts)`` does no I/O.  A rule that needs no DNS (cost 0) simply
returns a :class:`Result`.  A rule that needs DNS is a generator.  It yields a batch
(a frozenset of :class:`~heloguard.answers.Query`) and is sent back the
answers to exactly that batch; it may do so several times (one yield per
round of dependent lookups) and finally returns a :class:`Result`:

* ``pass``     the check holds;
* ``fail``     it does not, and the facts are certain: carries a 5xx reply;
* ``tempfail`` it could not be decided because a lookup it needs was TEMP:
               carries a 4xx reply;
* ``skip``     it does not apply (no input, an address literal...).

Rules never see exceptions from DNS: a TEMP answer is a value, and a rule
that would fail on facts it could not get returns ``tempfail`` instead.  The
engine checks this too (a ``fail`` whose rule saw any TEMP answer is turned
into a ``tempfail``), so a permanent rejection never rests on a TEMP answer.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass, field
from enum import IntEnum, StrEnum
from functools import lru_cache
from types import MappingProxyType
from typing import Any, Generic, TypeVar

from heloguard.answers import Answer, IPAddress, Query
from heloguard.names import Helo, reverse_name

Batch = frozenset[Query]
Answers = Mapping[Query, Answer]


class Stage(IntEnum):
    """SMTP stages, in the order the MTA reaches them."""

    CONNECT = 0
    HELO = 1
    MAIL = 2
    RCPT = 3

    @property
    def word(self) -> str:
        """The lower-case name used in config, logs and JSON."""
        return self.name.lower()

    @classmethod
    def parse(cls, text: str) -> Stage:
        """Parse ``connect``, ``helo``, ``mail`` or ``rcpt``."""
        return cls[text.upper()]


class Outcome(StrEnum):
    """What a rule found."""

    PASS = "pass"  # noqa: S105 - an outcome, not a password
    FAIL = "fail"
    TEMPFAIL = "tempfail"
    SKIP = "skip"


@dataclass(frozen=True, slots=True)
class Reply:
    """An SMTP reply: code, enhanced status code (RFC 3463) and text."""

    code: int
    status: str
    text: str

    def __str__(self) -> str:
        return f"{self.code} {self.status} {self.text}"

    @property
    def permanent(self) -> bool:
        """True for 5xx replies."""
        return self.code >= 500

    def temporary(self, text: str | None = None) -> Reply:
        """The matching 4xx reply (550 5.7.25 -> 451 4.7.25), optionally with a new text."""
        if not self.permanent:
            return self if text is None else Reply(self.code, self.status, text)
        return Reply(451, "4" + self.status[1:], self.text if text is None else text)


# One read-only empty mapping for every finding without facts: a kept decision
# holds a Result per rule, and an empty dict each would be most of their size.
NO_FACTS: Mapping[str, Any] = MappingProxyType({})


def _no_facts() -> Mapping[str, Any]:
    return NO_FACTS


@dataclass(frozen=True, slots=True)
class Result:
    """A rule's finding, with the reasoning a mail admin needs to see."""

    outcome: Outcome
    reason: str
    reply: Reply | None = None
    notes: tuple[str, ...] = ()
    # Facts other stages may use (for example the verified client names).
    facts: Mapping[str, Any] = field(default_factory=_no_facts)
    # A fail that holds whatever TEMP answers the rule also saw (a DNSBL listing
    # while another list timed out).  Otherwise the engine defers such a fail.
    certain: bool = False
    # A fail whose defects are all configured as warnings: logged, never refused.
    warn_only: bool = False
    # Misconfigurations worth a loud log line and a counter (a DNSBL error code).
    alerts: tuple[str, ...] = ()
    # Non-empty: the client is exempt from every rule (a DNSWL hit), and why.
    exempt: str = ""


def passed(reason: str, *, notes: tuple[str, ...] = (), **facts: Any) -> Result:
    """The check holds."""
    return Result(Outcome.PASS, reason, notes=notes, facts=facts or NO_FACTS)


def failed(reply: Reply, reason: str, *, notes: tuple[str, ...] = (), **facts: Any) -> Result:
    """The check does not hold, on certain facts."""
    return Result(Outcome.FAIL, reason, reply, notes=notes, facts=facts or NO_FACTS)


def tempfailed(reply: Reply, reason: str, *, notes: tuple[str, ...] = (), **facts: Any) -> Result:
    """The check could not be decided now (a 5xx reply is turned into its 4xx)."""
    return Result(Outcome.TEMPFAIL, reason, reply.temporary(), notes=notes, facts=facts or NO_FACTS)


@lru_cache(maxsize=128)
def skipped(reason: str) -> Result:
    """The check does not apply.  (Reasons are fixed texts: one shared value each.)"""
    return Result(Outcome.SKIP, reason)


@dataclass(frozen=True, slots=True)
class Context:
    """What is known about the SMTP session when a rule runs.

    ``client`` comes from the TCP connection (the MTA tells us); ``helo``,
    ``sender`` and ``recipients`` are whatever the client typed and are
    attacker-controlled.  Names the MTA itself resolved are deliberately absent:
    rules rest only on heloguard's own lookups.
    """

    client: IPAddress
    helo: Helo | None = None
    sender: str | None = None  # "" for the null sender <>
    recipients: tuple[str, ...] = ()

    @property
    def reverse(self) -> str:
        """The PTR query name of the client address."""
        return reverse_name(self.client)

    @property
    def family_rdtype(self) -> str:
        """``A`` for an IPv4 client, ``AAAA`` for IPv6."""
        return "A" if self.client.version == 4 else "AAAA"


Check = Generator[Batch, Answers, Result]
OptionsT = TypeVar("OptionsT")


@dataclass(frozen=True, slots=True)
class NoOptions:
    """For rules without options of their own."""


@dataclass(frozen=True, slots=True)
class Rule(Generic[OptionsT]):
    """What a rule module declares."""

    name: str
    stage: Stage
    cost: int
    options: type[OptionsT]
    check: Callable[[Context, OptionsT], Check | Result]
    doc: str
    default_action: str = "reject"
    # True for rules whose finding can exempt the client (dnswl): the engine
    # does not stop at a rejection until they have answered.
    exempts: bool = False

    @property
    def summary(self) -> str:
        """The first line of the rule's docstring."""
        return self.doc.strip().splitlines()[0] if self.doc.strip() else self.name


_PENDING: Any = object()
A = TypeVar("A")
B = TypeVar("B")


def lockstep(*checks: Generator[Batch, Answers, Any]) -> Generator[Batch, Answers, list[Any]]:
    """Run several checks side by side, one round of lookups at a time.

    Each round unites the batches of every unfinished check, so independent
    lookups travel together; each check is sent only the answers it asked
    for.  Returns the results in the order the checks were given.
    """
    results: list[Any] = [_PENDING] * len(checks)
    wanting: dict[int, Batch] = {}
    for i, gen in enumerate(checks):
        try:
            wanting[i] = next(gen)
        except StopIteration as stop:
            results[i] = stop.value
    while wanting:
        union: Batch = frozenset().union(*wanting.values())
        answers = yield union
        nxt: dict[int, Batch] = {}
        for i, batch in wanting.items():
            try:
                nxt[i] = checks[i].send({q: answers[q] for q in batch})
            except StopIteration as stop:
                results[i] = stop.value
        wanting = nxt
    return results


def both(
    first: Generator[Batch, Answers, A], second: Generator[Batch, Answers, B]
) -> Generator[Batch, Answers, tuple[A, B]]:
    """Run two sub-checks side by side and return both results."""
    one, two = yield from lockstep(first, second)
    return one, two


def ask(*queries: Query) -> Generator[Batch, Answers, Answers]:
    """Yield one batch and return its answers: ``answers = yield from ask(q1, q2)``."""
    answers = yield frozenset(queries)
    return answers
