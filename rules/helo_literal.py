"""helo_literal: an address literal in HELO must be the client's own address.

Checks:   when the HELO argument is an address literal (``[192.0.2.1]`` or
          ``[IPv6:2001:db8::1]``), it equals the address the client connects
          from (IPv4-mapped IPv6 addresses compare as IPv4).
Stage:    helo.
Cost:     0 (no DNS).
Replies:  pass when the literal matches; skip when the HELO is not a literal;
          fail 550 5.7.1 when it names another address.  It never tempfails.
          Rejecting on this is stricter than RFC 5321 4.1.4, which says a
          server MUST NOT refuse mail only because the EHLO does not match the
          address; set ``action = "warn"`` to follow the RFC.
Trust:    the literal is attacker-controlled; the client address is not.
"""

from __future__ import annotations

from heloguard.logfmt import for_reply
from heloguard.names import HeloKind
from heloguard.rules.base import (
    Context,
    NoOptions,
    Reply,
    Result,
    Rule,
    Stage,
    failed,
    passed,
    skipped,
)


def check(ctx: Context, _opts: NoOptions) -> Result:
    """Fail if an address literal names an address other than the client's."""
    helo = ctx.helo
    if helo is None or helo.kind is not HeloKind.LITERAL or helo.address is None:
        return skipped("HELO is not an address literal")
    if helo.address == ctx.client:
        return passed(f"literal {helo.raw} is the client address")
    text = (
        f"HELO address literal {for_reply(helo.raw)} is not your address [{ctx.client}]; "
        "send your own host name or address"
    )
    return failed(Reply(550, "5.7.1", text), f"literal {helo.address} is not {ctx.client}")


RULE = Rule("helo_literal", Stage.HELO, 0, NoOptions, check, __doc__ or "")
