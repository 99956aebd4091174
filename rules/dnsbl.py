"""dnsbl and dnswl: the client address on DNS block and allow lists.

Checks:   dnsbl asks every configured zone for the client address (reversed
          octets, or reversed nibbles for IPv6) and adds the weights of the
          zones that list it; the client fails when the sum reaches
          ``threshold`` (postscreen-style scoring).  dnswl asks allow-list
          zones; a hit exempts the client from every other check.
          Zones: ``zone[=filter][*weight]``, as Postfix writes them
          (``zen.spamhaus.org=127.0.0.[2..11]``).  Error answers are never
          listings: 127.255.255.0/24 (252, 254, 255...), 127.0.0.1 (RFC 5782;
          a refused query), 127.0.1.255 and anything outside
          127.0.0.0/8 count as "not listed", and each is logged loudly as a
          misconfiguration (typically: a public resolver) and counted.
Stage:    connect (the answers are ready by HELO); verdict at HELO.
Cost:     1 (one question per zone, all in one round).
Replies:  dnsbl: pass when not listed (or no zone configured: skip);
          fail 554 5.7.1 "Service unavailable; client [ip] blocked using
          ZONE" (with the list's TXT reason when ``txt = true``); a zone that
          times out counts as not listed (``on_timeout = "ignore"``, default)
          or defers with 451 4.7.1 when it could have reached the threshold
          (``on_timeout = "tempfail"``).  A listing is certain: another zone's
          timeout never turns it into a deferral.
          dnswl: pass always; a hit exempts the client.
Trust:    the lists' answers come from their operators, not the client; but
          an answer can be wrong when the zone is queried through a public
          resolver (error codes) or the zone was parked (non-127 answers).
          Query keys embedded in a zone name never reach replies or logs.
Options:  zones (default none: nothing is asked), threshold (1), on_timeout,
          txt (false).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

from heloguard.answers import Query
from heloguard.lists import Reading, ZoneSpec, ip_query_name, parse_zone, read
from heloguard.logfmt import for_reply
from heloguard.rules.base import (
    Answers,
    Check,
    Context,
    Reply,
    Result,
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
    """Options of the dnsbl rule (and, without threshold, of dnswl)."""

    zones: tuple[str, ...] = ()
    threshold: int = 1
    on_timeout: Literal["ignore", "tempfail"] = "ignore"
    txt: bool = False

    def validate(self) -> None:
        """Every zone must parse."""
        for z in self.zones:
            parse_zone(z)
        if self.threshold < 1:
            raise ValueError("threshold must be at least 1")

    @property
    def specs(self) -> tuple[ZoneSpec, ...]:
        """The parsed zones."""
        return tuple(parse_zone(z) for z in self.zones)


# (what is asked about, for the reply: "client [192.0.2.1]"; the subject, for
# the misconfiguration reports; the zone; the question)
Asked = list[tuple[str, str, ZoneSpec, Query]]


def judge_lists(asked: Asked, answers: Answers, opts: Options, temp_text: str) -> Result:
    """Score the listings of several zones against the threshold (dnsbl and rhsbl).

    A listing that reaches the threshold is certain, whatever other zones did;
    a zone that did not answer counts as not listed, or defers when
    ``on_timeout = "tempfail"`` and it could have reached the threshold.
    """
    score, timeouts = 0, []
    hits: list[tuple[str, ZoneSpec, Query, Reading]] = []
    alerts: list[str] = []
    for what, subject, spec, q in asked:
        reading = read(answers[q], spec, subject)
        alerts += reading.errors
        if reading.temp:
            timeouts.append(spec)
        elif reading.listed:
            score += spec.weight
            hits.append((what, spec, q, reading))
    notes = tuple(f"{s.display} did not answer: counted as not listed" for s in timeouts)
    if hits and score >= opts.threshold:
        what, spec, q, _ = hits[0]
        text = f"Service unavailable; {what} blocked using {spec.display}"
        txt = answers.get(Query.of(q.name, "TXT")) if opts.txt else None
        if txt is not None and txt.ok and txt.records:
            text += f"; {for_reply(txt.records[0], 200)}"
        listed = ", ".join(
            f"{w} on {s.display}={','.join(map(str, r.listed))}" for w, s, _, r in hits
        )
        result = failed(Reply(554, "5.7.1", text), f"listed (score {score}): {listed}", notes=notes)
        return replace(result, alerts=tuple(alerts), certain=True)
    if (
        timeouts
        and opts.on_timeout == "tempfail"
        and score + sum(s.weight for s in timeouts) >= opts.threshold
    ):
        names = ", ".join(s.display for s in timeouts)
        deferred = tempfailed(
            Reply(451, "4.7.1", temp_text), f"{names} did not answer", notes=notes
        )
        return replace(deferred, alerts=tuple(alerts))
    why = f"score {score} below threshold {opts.threshold}" if hits else "not listed"
    return replace(passed(why, notes=notes, listed=bool(hits)), alerts=tuple(alerts))


def _ip_query(ctx: Context, spec: ZoneSpec) -> Query:
    return Query.of(ip_query_name(ctx.client, spec.zone), "A")


def check_dnsbl(ctx: Context, opts: Options) -> Check:
    """Fail if the client's listings reach the threshold."""
    specs = opts.specs
    if not specs:
        return skipped("no DNSBL zone configured")
    asked = [
        (
            f"client [{ctx.client}]",
            str(ctx.client),
            s,
            Query.of(ip_query_name(ctx.client, s.zone), "A"),
        )
        for s in specs
    ]
    txts = [Query.of(q.name, "TXT") for *_, q in asked] if opts.txt else []
    answers = yield from ask(*(q for *_, q in asked), *txts)
    temp = f"Client host [{ctx.client}]: DNS list lookup failed; try again later"
    return judge_lists(asked, answers, opts, temp)


def check_dnswl(ctx: Context, opts: Options) -> Check:
    """Exempt the client when an allow list lists it."""
    specs = opts.specs
    if not specs:
        return skipped("no DNSWL zone configured")
    queries = [Query.of(ip_query_name(ctx.client, s.zone), "A") for s in specs]
    answers = yield from ask(*queries)
    alerts: list[str] = []
    for spec, q in zip(specs, queries, strict=True):
        reading = read(answers[q], spec, str(ctx.client))
        alerts += reading.errors
        if reading.listed:
            codes = ",".join(map(str, reading.listed))
            found = passed(f"allow-listed by {spec.display} ({codes})")
            return _with(found, alerts, exempt=f"allow-listed by {spec.display}")
    return _with(passed("not allow-listed"), alerts)


def _with(result: Result, alerts: list[str], *, certain: bool = False, exempt: str = "") -> Result:
    return replace(result, alerts=tuple(alerts), certain=certain, exempt=exempt)


RULE = Rule("dnsbl", Stage.CONNECT, 1, Options, check_dnsbl, __doc__ or "")
WL_RULE = Rule("dnswl", Stage.CONNECT, 1, Options, check_dnswl, __doc__ or "", exempts=True)
