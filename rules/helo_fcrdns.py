"""helo_fcrdns: the HELO name itself passes forward-confirmed reverse DNS.

Checks:   some address of the HELO name (A and AAAA, up to ``max_addresses``)
          has a PTR record naming the HELO name again.  This is the essay's
          fourth clue: ``mail.digitaljunction.com.au`` resolves, but to an
          address without a PTR, so it is not a mail server's name.
Stage:    helo.
Cost:     2 (A/AAAA of the HELO name, then PTR of each address; when the
          HELO name resolves to the client itself the PTR is the one fcrdns
          already asked).
Replies:  pass when one address points back; skip for address literals,
          arguments that are not names, and names that do not resolve (that
          is helo_resolves's finding, not this rule's);
          fail 550 5.7.25 when no address points back;
          tempfail 451 4.7.25 when none points back and a lookup was TEMP.
          Default action: warn.  Big senders (Outlook among them) HELO with a
          name in their own domain that is not itself FCrDNS-clean, and
          helo_matches already accepts a host of the client's own verified
          domain; set ``action = "reject"`` for the essay's strict profile.
Trust:    the HELO name, its zone and the reverse zones of its addresses may
          all be attacker-controlled; a pass here proves little on its own.
Options:  max_addresses (default 4).
"""

from __future__ import annotations

from dataclasses import dataclass

from heloguard.answers import Query
from heloguard.logfmt import for_reply
from heloguard.names import reverse_name
from heloguard.rules.base import (
    Check,
    Context,
    Reply,
    Rule,
    Stage,
    ask,
    failed,
    passed,
    skipped,
    tempfailed,
)


@dataclass(frozen=True, slots=True)
class Options:
    """Options of the helo_fcrdns rule."""

    max_addresses: int = 4  # addresses of the HELO name whose PTR is asked

    def validate(self) -> None:
        """Reject nonsensical values."""
        if not 1 <= self.max_addresses <= 32:
            raise ValueError("max_addresses must be between 1 and 32")


def check(ctx: Context, opts: Options) -> Check:
    """Fail if no address of the HELO name has a PTR naming it."""
    helo = ctx.helo
    if helo is None or not helo.is_name:
        return skipped("HELO is not a host name")
    qa, qaaaa = Query.of(helo.name, "A"), Query.of(helo.name, "AAAA")
    answers = yield from ask(qa, qaaaa)
    a, aaaa = answers[qa], answers[qaaaa]
    addresses = [*a.addresses(), *aaaa.addresses()][: opts.max_addresses]
    if not addresses:
        if a.temp or aaaa.temp:
            text = f"HELO name {for_reply(helo.name)} could not be checked now"
            return tempfailed(Reply(451, "4.7.25", text), "address lookup failed temporarily")
        return skipped("HELO name has no address (see helo_resolves)")
    ptr_queries = [Query.of(reverse_name(addr), "PTR") for addr in addresses]
    ptrs = yield from ask(*ptr_queries)
    for addr, q in zip(addresses, ptr_queries, strict=True):
        if helo.name in ptrs[q].records:
            return passed(f"{helo.name} -> {addr} -> {helo.name}")
    described = "; ".join(
        f"{addr} has {'PTR ' + ', '.join(ptrs[q].records[:2]) if ptrs[q].ok else 'no PTR'}"
        for addr, q in zip(addresses, ptr_queries, strict=True)
    )
    reason = f"no address of {helo.name} points back to it ({described})"
    text = (
        f"HELO name {for_reply(helo.name)} fails forward-confirmed reverse DNS: "
        "none of its addresses has a PTR record naming it"
    )
    if a.temp or aaaa.temp or any(ptrs[q].temp for q in ptr_queries):
        return tempfailed(Reply(451, "4.7.25", text), reason)
    return failed(Reply(550, "5.7.25", text), reason)


RULE = Rule("helo_fcrdns", Stage.HELO, 2, Options, check, __doc__ or "", default_action="warn")
