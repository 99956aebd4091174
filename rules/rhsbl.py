"""rhsbl and rhsbl_sender: the client's domains on right-hand-side block lists.

Checks:   rhsbl asks every configured zone for the registered domain of the
          HELO name and of each verified (forward-confirmed) PTR name;
          rhsbl_sender for the domain of MAIL FROM (never the null sender).
          Scoring, filters, error codes and timeouts exactly as for dnsbl
          (heloguard.lists): error answers (127.0.1.255 for an IP queried
          against a domain list, 127.255.255.0/24, 127.0.0.1, non-127 answers)
          are never listings; each is logged loudly and counted.
          rhsbl_sender uses the zones of [rules.rhsbl] unless given its own.
Stage:    rhsbl: helo (the PTR names are verified by then); rhsbl_sender: mail.
Cost:     rhsbl 3 (forward confirmation, then the lists); rhsbl_sender 1.
Replies:  pass when not listed (skip when no zone is configured or there is
          no domain to ask about); fail 554 5.7.1 "Service unavailable;
          <what> <domain> blocked using ZONE"; with on_timeout = "tempfail",
          451 4.7.1 when a zone that did not answer could have decided.
Trust:    the HELO and sender domains are attacker-chosen, which is fine: a
          listing is about the domain, whoever names it.  The PTR domain is
          judged only when forward-confirmed, so a client cannot get someone
          else's domain listed against itself by writing a PTR record.
Options:  zones, threshold, on_timeout, txt (as dnsbl).
"""

from __future__ import annotations

from collections.abc import Generator

from heloguard.answers import Query
from heloguard.lists import ZoneSpec
from heloguard.logfmt import for_reply
from heloguard.names import registered_domain, to_ascii
from heloguard.rules.base import (
    Answers,
    Batch,
    Check,
    Context,
    Rule,
    Stage,
    ask,
    both,
    skipped,
)
from heloguard.rules.dnsbl import Asked, Options, judge_lists
from heloguard.rules.lookups import client_names


def _ask_lists(
    domains: list[tuple[str, str]], specs: tuple[ZoneSpec, ...], txt: bool
) -> Generator[Batch, Answers, tuple[Asked, Answers]]:
    """Ask every zone about every (what, domain): the questions and their answers."""
    asked = [
        (f"{what} <{for_reply(d)}>", d, s, Query.of(f"{d}.{s.zone}", "A"))
        for what, d in domains
        for s in specs
    ]
    extra = [Query.of(q.name, "TXT") for *_, q in asked] if txt else []
    if not asked:
        return [], {}
    answers = yield from ask(*(q for *_, q in asked), *extra)
    return asked, answers


TEMP_TEXT = "DNS list lookup failed; try again later"


def check_domains(ctx: Context, opts: Options) -> Check:
    """Fail if the HELO domain or a verified PTR domain is listed."""
    specs = opts.specs
    if not specs:
        return skipped("no RHSBL zone configured")
    helo_domains: list[tuple[str, str]] = []
    if ctx.helo is not None and ctx.helo.is_name:
        reg = registered_domain(ctx.helo.name)
        if reg:
            helo_domains.append(("helo domain", reg))
    (helo_ask, helo_answers), found = yield from both(
        _ask_lists(helo_domains, specs, opts.txt), client_names(ctx, 10)
    )
    ptr_domains = sorted({d for d in (registered_domain(n) for n in found.verified) if d})
    ptr_domains = [d for d in ptr_domains if ("helo domain", d) not in helo_domains]
    wanted = [("client host domain", d) for d in ptr_domains]
    ptr_ask, ptr_answers = yield from _ask_lists(wanted, specs, opts.txt)
    if not helo_ask and not ptr_ask:
        return skipped("no HELO domain and no verified PTR name to ask about")
    return judge_lists(helo_ask + ptr_ask, {**helo_answers, **ptr_answers}, opts, TEMP_TEXT)


def check_sender(ctx: Context, opts: Options) -> Check:
    """Fail if the MAIL FROM domain is listed."""
    specs = opts.specs
    if not specs:
        return skipped("no RHSBL zone configured")
    if not ctx.sender or "@" not in ctx.sender:
        return skipped("null sender or no domain")
    domain = to_ascii(ctx.sender.rsplit("@", 1)[1].strip().rstrip("."))
    if not domain or "." not in domain:
        return skipped("sender domain is not a domain name")
    asked, answers = yield from _ask_lists([("sender domain", domain)], specs, opts.txt)
    return judge_lists(asked, answers, opts, TEMP_TEXT)


RULE = Rule("rhsbl", Stage.HELO, 3, Options, check_domains, __doc__ or "")
SENDER_RULE = Rule("rhsbl_sender", Stage.MAIL, 1, Options, check_sender, __doc__ or "")
