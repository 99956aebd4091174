"""Lookups that several rules share, as sub-checks (no I/O here either).

``client_names`` is forward-confirmed reverse DNS: PTR of the client address,
then the address record of each PTR name (the client's own family: an IPv6
address can never confirm an IPv4 client, so asking it would only add latency
and a chance of a spurious TEMP).  Rules that need it ``yield from`` it; the
engine merges identical questions, so fcrdns and helo_matches together still
ask each question once.

Trust: the PTR records come from the reverse zone of the client's address
block, which the client (or its ISP) controls; a PTR name is only believed
once its own forward zone points back at the client.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterable
from dataclasses import dataclass, field

from heloguard.answers import Answer, IPAddress, Query
from heloguard.names import hostname_problem, reverse_name
from heloguard.rules.base import Answers, Batch, Context, ask


@dataclass(frozen=True, slots=True)
class ClientNames:
    """What forward-confirmed reverse DNS found for the client."""

    ptr: Answer
    names: tuple[str, ...]  # PTR names tried (syntactically valid, capped)
    ignored: tuple[str, ...]  # PTR names not tried (invalid, or over the cap)
    verified: tuple[str, ...]  # names whose address records include the client
    forward: tuple[Answer, ...]  # the forward lookups made
    extra: Answers = field(default_factory=dict)  # answers to the caller's extra questions

    @property
    def uncertain(self) -> bool:
        """True when no name is verified and a lookup that could change that was TEMP."""
        if self.verified:
            return False
        return self.ptr.temp or any(a.temp for a in self.forward)


def ptr_name_problem(name: str) -> str:
    """Why a PTR name cannot be forward-confirmed ("" when it can be tried).

    PTR names are judged a little more leniently than HELO names: an underscore
    is tolerated, since it does no harm in a lookup and some operators use it.
    """
    return hostname_problem(name.replace("_", "x"))


def client_names(ctx: Context, max_names: int) -> Generator[Batch, Answers, ClientNames]:
    """PTR of the client, then forward confirmation of every usable PTR name."""
    return (yield from confirmed_names(ctx.client, max_names))


def confirmed_names(
    address: IPAddress,
    max_names: int,
    extra: Callable[[tuple[str, ...]], Iterable[Query]] | None = None,
) -> Generator[Batch, Answers, ClientNames]:
    """Forward-confirmed reverse DNS of any address (the client's, an MX host's).

    ``extra`` names further questions, made from the PTR names, to ask in the
    same round as the forward lookups (client_mx asks the MX of their domains
    there, so it stays two rounds deep).
    """
    ptr_q = Query.of(reverse_name(address), "PTR")
    family = "A" if address.version == 4 else "AAAA"
    answers = yield from ask(ptr_q)
    ptr = answers[ptr_q]
    if not ptr.ok:
        return ClientNames(ptr, (), (), (), ())
    usable = [n for n in ptr.records if not ptr_name_problem(n)]
    names = tuple(usable[:max_names])
    ignored = tuple(n for n in ptr.records if n not in names)
    if not names:
        return ClientNames(ptr, (), ignored, (), ())
    queries = [Query.of(n, family) for n in names]
    more = list(extra(names)) if extra is not None else []
    fwd = yield from ask(*queries, *more)
    verified = tuple(
        n for n, q in zip(names, queries, strict=True) if address in fwd[q].addresses()
    )
    found = tuple(fwd[q] for q in queries)
    return ClientNames(ptr, names, ignored, verified, found, {q: fwd[q] for q in more})
