"""helo_matches: the HELO name belongs to the connecting host.

Checks:   the HELO name is (1) one of the client's verified names (its
          forward-confirmed PTR names), or (2) resolves to the client address,
          or (3) is a host in the same registered domain as a verified name,
          by the Public Suffix List (``mx2.example.co.uk`` matches a client
          verified as ``out.example.co.uk``; ``example.co.uk`` and ``other.co.uk``
          do not match, and neither do two default EC2 names).
Stage:    helo.
Cost:     2 (PTR of the client and A/AAAA of the HELO name, then forward
          confirmation of the PTR names; all shared with fcrdns and
          helo_resolves).
Replies:  pass on any of the three; skip for address literals and arguments
          that are not names;
          fail 550 5.7.1 when none holds;
          tempfail 451 4.7.1 when none holds and a lookup that could have made
          one hold was TEMP.
          Rejecting on this is stricter than RFC 5321 4.1.4 (a server MUST NOT
          refuse mail only because the EHLO does not match the address); the
          essay's policy is the default, ``action = "warn"`` follows the RFC.
Trust:    the HELO name and its zone are attacker-chosen; only the client's
          verified names and the address it connects from are trusted.
Options:  max_names (default 10, as fcrdns), same_domain (default true).
"""

from __future__ import annotations

from dataclasses import dataclass

from heloguard.answers import Query
from heloguard.logfmt import for_reply
from heloguard.names import registered_domain
from heloguard.rules.base import (
    Check,
    Context,
    Reply,
    Rule,
    Stage,
    ask,
    both,
    failed,
    passed,
    skipped,
    tempfailed,
)
from heloguard.rules.lookups import client_names


@dataclass(frozen=True, slots=True)
class Options:
    """Options of the helo_matches rule."""

    max_names: int = 10  # PTR names tried at most (keep equal to fcrdns's)
    same_domain: bool = True  # a host in the client's registered domain matches

    def validate(self) -> None:
        """Reject nonsensical values."""
        if not 1 <= self.max_names <= 64:
            raise ValueError("max_names must be between 1 and 64")


def check(ctx: Context, opts: Options) -> Check:
    """Fail if the HELO name is neither the client's name, address, nor domain."""
    helo = ctx.helo
    if helo is None or not helo.is_name:
        return skipped("HELO is not a host name")
    qfwd = Query.of(helo.name, ctx.family_rdtype)
    names_check = client_names(ctx, opts.max_names)
    # Both chains start in the same round: PTR(client) beside A/AAAA(HELO).
    fwd_answers, found = yield from both(ask(qfwd), names_check)
    fwd = fwd_answers[qfwd]
    if helo.name in found.verified:
        return passed(f"HELO is the verified name {helo.name}")
    if ctx.client in fwd.addresses():
        return passed(f"HELO name resolves to the client address {ctx.client}")
    helo_domain = registered_domain(helo.name)
    if opts.same_domain and helo_domain is not None:
        for name in found.verified:
            if registered_domain(name) == helo_domain:
                return passed(f"HELO is in {helo_domain}, as the verified name {name}")
    verified = ", ".join(found.verified[:3]) or "none"
    reason = (
        f"HELO name is not the client's verified name ({verified}), "
        f"does not resolve to {ctx.client}"
    )
    if opts.same_domain:
        reason += " and is not in the same registered domain"
    text = (
        f"HELO name {for_reply(helo.name)} does not belong to your address [{ctx.client}]; "
        "send your own fully qualified host name"
    )
    if found.uncertain or fwd.temp:
        return tempfailed(Reply(451, "4.7.1", text + " (lookup failed, try again later)"), reason)
    return failed(Reply(550, "5.7.1", text), reason)


RULE = Rule("helo_matches", Stage.HELO, 2, Options, check, __doc__ or "")
