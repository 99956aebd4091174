"""helo_resolves: the HELO name exists in DNS with an address.

Checks:   the HELO name has an A or an AAAA record (both asked in parallel;
          either one is enough).
Stage:    helo.
Cost:     1 (A and AAAA of the HELO name, shared with helo_matches and
          helo_fcrdns).
Replies:  pass when either family has an address; skip for address literals
          and for arguments that are not names (helo_syntax judges those);
          fail 550 5.7.1 when both are NXDOMAIN/NODATA;
          tempfail 451 4.4.3 when neither has an address and one was TEMP.
Trust:    the HELO name is attacker-chosen, and so may be its zone: a
          bot can name a host in a zone it controls.  Passing proves little;
          failing proves the name is not a mail server's.
"""

from __future__ import annotations

from heloguard.answers import Query
from heloguard.logfmt import for_reply
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
    skipped,
    tempfailed,
)


def check(ctx: Context, _opts: NoOptions) -> Check:
    """Fail if the HELO name has neither an A nor an AAAA record."""
    helo = ctx.helo
    if helo is None or not helo.is_name:
        return skipped("HELO is not a host name")
    qa, qaaaa = Query.of(helo.name, "A"), Query.of(helo.name, "AAAA")
    answers = yield from ask(qa, qaaaa)
    a, aaaa = answers[qa], answers[qaaaa]
    addrs = [*a.records, *aaaa.records] if a.ok or aaaa.ok else []
    if addrs:
        return passed(f"{helo.name} has address {', '.join(addrs[:4])}")
    text = f"HELO name {for_reply(helo.name)} does not resolve"
    if a.temp or aaaa.temp:
        reason = "address lookup failed temporarily"
        return tempfailed(Reply(451, "4.4.3", f"{text} now; try again later"), reason)
    reason = f"no A or AAAA record (A {a.status}, AAAA {aaaa.status})"
    return failed(Reply(550, "5.7.1", f"{text}: {reason}; send a host name that exists"), reason)


RULE = Rule("helo_resolves", Stage.HELO, 1, NoOptions, check, __doc__ or "")
