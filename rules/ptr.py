"""ptr: the client address has a PTR record.

Checks:   PTR of the client address (in-addr.arpa / ip6.arpa) returns a name.
Stage:    connect (needs only the address); its verdict is given at HELO.
Cost:     1 (one lookup, shared with fcrdns).
Replies:  pass when at least one PTR record exists;
          fail 550 5.7.25 when the reverse name does not exist or has no PTR
          (RFC 7372: reverse DNS validation failed);
          tempfail 451 4.7.25 when the lookup was TEMP (SERVFAIL, timeout).
Trust:    the PTR record is written by whoever controls the address block; a
          PTR alone proves nothing about the name (fcrdns checks that), only
          that someone set reverse DNS at all.
"""

from __future__ import annotations

from heloguard.answers import Query
from heloguard.rules.base import (
    Check,
    Context,
    NoOptions,
    Reply,
    Rule,
    Stage,
    ask,
    failed,
    passed,
    tempfailed,
)

REPLY = Reply(
    550,
    "5.7.25",
    "Client host [{ip}] rejected: no reverse DNS (PTR) record; "
    "a mail server needs a PTR record naming it",
)


def check(ctx: Context, _opts: NoOptions) -> Check:
    """Fail if the client address has no PTR record."""
    q = Query.of(ctx.reverse, "PTR")
    answers = yield from ask(q)
    ptr = answers[q]
    reply = Reply(REPLY.code, REPLY.status, REPLY.text.format(ip=ctx.client))
    if ptr.ok:
        return passed(f"PTR {', '.join(ptr.records[:5])}")
    if ptr.temp:
        temp = Reply(
            451, "4.7.25", f"Client host [{ctx.client}]: reverse DNS lookup failed; try again later"
        )
        return tempfailed(temp, f"PTR lookup failed temporarily ({ptr.reason})")
    return failed(reply, f"no PTR record ({ptr.status})")


RULE = Rule("ptr", Stage.CONNECT, 1, NoOptions, check, __doc__ or "")
