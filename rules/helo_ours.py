"""helo_ours: the client claims to be us.

Checks:   the HELO argument is one of our own host names or domains, or an
          address literal (or bare address) of one of our own addresses.
          Nobody else may call themselves by our name: bots often HELO with
          the name or address of the server they are talking to.
Stage:    helo.
Cost:     0 (no DNS).
Replies:  pass otherwise; skip when the client address is one of our own
          addresses (then it really is us); fail 550 5.7.1.  It never
          tempfails.
Trust:    the HELO argument is attacker-controlled; the lists come from
          ``[policy] myhostnames``, ``mydomains`` and ``myaddresses`` (the
          host's own name when none is configured).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from heloguard.answers import normalize_name
from heloguard.logfmt import for_reply
from heloguard.names import parse_address
from heloguard.rules.base import (
    Context,
    Reply,
    Result,
    Rule,
    Stage,
    failed,
    passed,
    skipped,
)


@dataclass(frozen=True, slots=True)
class Options:
    """Filled from [policy]; may also be set under [rules.helo_ours]."""

    myhostnames: tuple[str, ...] = ()
    mydomains: tuple[str, ...] = ()
    myaddresses: tuple[str, ...] = ()

    def validate(self) -> None:
        """Every address must parse."""
        for addr in self.myaddresses:
            ipaddress.ip_address(addr)


def check(ctx: Context, opts: Options) -> Result:
    """Fail if the HELO names one of our own names or addresses."""
    helo = ctx.helo
    if helo is None:
        return skipped("no HELO")
    ours = {a for a in (parse_address(x) for x in opts.myaddresses) if a is not None}
    if ctx.client in ours:
        return skipped("the client is one of our own addresses")
    names = {normalize_name(n) for n in (*opts.myhostnames, *opts.mydomains)}
    claim = ""
    if helo.name and helo.name in names:
        claim = f"our name {helo.name}"
    elif helo.address is not None and helo.address in ours:
        claim = f"our address {helo.address}"
    if not claim:
        return passed("HELO is not one of our names or addresses")
    text = f"You are not me: HELO {for_reply(helo.raw)} is our own name; send your own host name"
    return failed(Reply(550, "5.7.1", text), f"client claims {claim}")


RULE = Rule("helo_ours", Stage.HELO, 0, Options, check, __doc__ or "")
