"""fcrdns: forward-confirmed reverse DNS for the client address.

Checks:   some PTR name of the client address resolves back to that address.
          Every PTR name is tried (up to ``max_names``), in parallel; names
          that are not valid host names are ignored.  Only the client's own
          family is asked (A for IPv4, AAAA for IPv6): the other can never
          confirm it.
Stage:    connect (needs only the address); its verdict is given at HELO.
Cost:     2 (PTR, then the forward lookups).
Replies:  pass when a name is confirmed (the confirmed names are the client's
          verified names, used by helo_matches and later rules);
          fail 550 5.7.25 when no PTR name resolves back (RFC 7372);
          tempfail 451 4.7.25 when no name is confirmed and a lookup that could
          have confirmed one was TEMP.
Trust:    PTR records come from the client's reverse zone and the forward
          records from zones the PTR names point at, both possibly hostile: a
          name counts only when its forward zone agrees.  Hostile PTR names
          (control bytes, overlong labels, addresses) are ignored, never
          looked up.
Options:  max_names (default 10).
"""

from __future__ import annotations

from dataclasses import dataclass

from heloguard.rules.base import Check, Context, Reply, Rule, Stage, failed, passed, tempfailed
from heloguard.rules.lookups import client_names


@dataclass(frozen=True, slots=True)
class Options:
    """Options of the fcrdns rule."""

    max_names: int = 10  # PTR names tried at most

    def validate(self) -> None:
        """Reject nonsensical values."""
        if not 1 <= self.max_names <= 64:
            raise ValueError("max_names must be between 1 and 64")


def check(ctx: Context, opts: Options) -> Check:
    """Fail if no PTR name of the client resolves back to its address."""
    found = yield from client_names(ctx, opts.max_names)
    notes = tuple(f"ignored PTR name {n}" for n in found.ignored[:5])
    if found.verified:
        return passed(f"verified name {found.verified[0]}", notes=notes, verified=found.verified)
    if found.ptr.temp:
        reason = f"PTR lookup failed temporarily ({found.ptr.reason})"
    elif not found.ptr.ok:
        reason = f"no PTR record ({found.ptr.status})"
    elif not found.names:
        reason = "no PTR name is a valid host name"
    else:
        shown = ", ".join(found.names[:3])
        reason = f"PTR name {shown} does not resolve back to {ctx.client}"
        if found.uncertain:
            reason = f"PTR name {shown} could not be confirmed now (lookup failed temporarily)"
    if found.uncertain:
        text = f"Client host [{ctx.client}]: cannot verify your reverse DNS now; try again later"
        return tempfailed(Reply(451, "4.7.25", text), reason, notes=notes)
    text = (
        f"Client host [{ctx.client}] rejected: {reason}; "
        "a mail server needs forward-confirmed reverse DNS"
    )
    return failed(Reply(550, "5.7.25", text), reason, notes=notes)


RULE = Rule("fcrdns", Stage.CONNECT, 2, Options, check, __doc__ or "")
