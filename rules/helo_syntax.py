"""helo_syntax: the HELO/EHLO argument is a valid FQDN or address literal.

Checks:   RFC 5321 4.1.1.1: the argument is the client's fully qualified
          domain name or an address literal (``[192.0.2.1]``,
          ``[IPv6:2001:db8::1]``).  Fails on: no HELO at all, an empty
          argument, a bare IP address without brackets, a single label,
          ``localhost``, a malformed literal or name (bad characters, empty or
          overlong labels, a numeric top-level label, a trailing dot).
          Internationalized names are judged in their A-label form.
Stage:    helo.
Cost:     0 (no DNS).
Replies:  pass for a valid name or literal; fail 550 5.5.2 naming the problem.
          It never tempfails.
Trust:    the whole argument is attacker-controlled; it is shown in replies
          and logs only escaped.
"""

from __future__ import annotations

from heloguard.logfmt import for_reply
from heloguard.names import HeloKind
from heloguard.rules.base import Context, NoOptions, Reply, Result, Rule, Stage, failed, passed


def check(ctx: Context, _opts: NoOptions) -> Result:
    """Fail if the HELO argument is not an FQDN or an address literal."""
    helo = ctx.helo
    if helo is None:
        reply = Reply(550, "5.5.1", "Send HELO or EHLO with your host name first (RFC 5321 4.1.4)")
        return failed(reply, "client sent no HELO/EHLO")
    if helo.kind in (HeloKind.FQDN, HeloKind.LITERAL):
        return passed(f"{helo.kind} {helo.name or helo.raw}")
    text = (
        f"Invalid HELO/EHLO argument <{for_reply(helo.raw)}>: {helo.problem}; "
        "send your fully qualified host name (RFC 5321 4.1.1.1)"
    )
    return failed(Reply(550, "5.5.2", text), f"{helo.kind}: {helo.problem}")


RULE = Rule("helo_syntax", Stage.HELO, 0, NoOptions, check, __doc__ or "")
