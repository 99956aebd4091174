"""sender_mx and client_mx: the mail hosts of the sender's domain are real ones.

Checks:   sender_mx looks at the domain of MAIL FROM (the null sender <> is
          never judged): it must have an MX, or an A/AAAA record as the
          implicit MX (RFC 5321 5.1); a null MX (RFC 7505) refuses all mail.
          Each MX target (in preference order, up to ``max_mx``, in parallel)
          must not be a CNAME (RFC 2181 10.3), must resolve, must resolve to
          public addresses (not RFC 1918, loopback, link-local, documentation
          or other reserved space), and must have forward-confirmed reverse
          DNS (one of its addresses has a PTR name that resolves back to it).
          client_mx applies the CNAME check to the client itself when one of
          its verified names is an MX of its own registered domain ("if also
          an MX").
          Every defect found makes the result ``fail``; its severity decides
          what that does.  Fatal by default: ``null_mx``, ``no_domain``,
          ``no_mail_host`` (neither MX nor A/AAAA, or no MX target resolves)
          and ``private_only`` (the MX targets resolve only to non-public
          addresses).  Warnings by default: ``cname``, ``no_fcrdns`` and
          ``unresolvable`` (one target of several).  ``strict = true`` (the
          essay's profile) makes every defect fatal.
Stage:    sender_mx: mail.  client_mx: connect (verdict at HELO).
Cost:     sender_mx 4 (MX, addresses, PTR, forward confirmation); client_mx 2
          (PTR, then forward confirmation and MX together).
Replies:  pass; skip (null sender, no sender, no verified name);
          fail: 550 5.7.27 null MX; 550 5.1.8 for a domain without mail hosts,
          with private-only, CNAME or unresolvable MX hosts; 550 5.7.25 for an
          MX without FCrDNS; when every defect is a warning, the failure is
          logged ("would reject") and the mail accepted.
          tempfail 451 4.4.3 when a lookup that a fatal check needs was TEMP;
          a TEMP that could only change a warning never defers mail.
Trust:    the sender domain is attacker-chosen, and so are its zones; a bot
          can name any domain, which is why this judges the domain's DNS, not
          the client.  Reverse zones of MX addresses belong to whoever holds
          those addresses.
Options:  max_mx (10), max_addresses (4 per MX host), strict (false).
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass, field, replace

from heloguard.answers import Answer, IPAddress, Query, Status
from heloguard.logfmt import for_reply
from heloguard.names import hostname_problem, registered_domain, to_ascii
from heloguard.rules.base import (
    Answers,
    Batch,
    Check,
    Context,
    Reply,
    Result,
    Rule,
    Stage,
    ask,
    failed,
    lockstep,
    passed,
    skipped,
    tempfailed,
)
from heloguard.rules.lookups import confirmed_names

FATAL = frozenset({"null_mx", "no_domain", "no_mail_host", "private_only"})


@dataclass(frozen=True, slots=True)
class Options:
    """Options of sender_mx and client_mx."""

    max_mx: int = 10  # MX targets judged at most
    max_addresses: int = 4  # addresses per MX target whose FCrDNS is checked
    strict: bool = False  # every defect fatal (the essay's profile)

    def validate(self) -> None:
        """Reject nonsensical values."""
        if not 1 <= self.max_mx <= 50 or not 1 <= self.max_addresses <= 16:
            raise ValueError("max_mx must be 1..50 and max_addresses 1..16")

    def fatal(self, defect: str) -> bool:
        """Whether this defect refuses mail."""
        return self.strict or defect in FATAL


@dataclass(slots=True)
class Defect:
    """One thing wrong with the sender domain's mail hosts."""

    kind: str
    reply: Reply
    reason: str


@dataclass(slots=True)
class TargetReport:
    """What was found about one MX target."""

    host: str
    cname: str | None = None
    addresses: tuple[IPAddress, ...] = ()
    resolved: bool = False
    uncertain_address: bool = False  # an A/AAAA lookup was TEMP
    fcrdns: bool | None = None  # None: not checked
    uncertain_fcrdns: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def public(self) -> tuple[IPAddress, ...]:
        return tuple(a for a in self.addresses if a.is_global)


def _sender_domain(sender: str) -> str | None:
    domain = sender.rsplit("@", 1)[1].strip().rstrip(".")
    ascii_name = to_ascii(domain)
    if not ascii_name or hostname_problem(ascii_name):
        return None
    return ascii_name


def _mx_hosts(mx: Answer, limit: int) -> tuple[list[str], bool]:
    """MX targets in preference order, and whether it is a null MX."""
    pairs = []
    for rec in mx.records:
        pref, _, host = rec.partition(" ")
        pairs.append((int(pref) if pref.isdigit() else 65535, host.strip()))
    hosts = [h for _, h in sorted(pairs) if h not in (".", "")]
    null = not hosts and any(h in (".", "") for _, h in pairs)
    return list(dict.fromkeys(hosts))[:limit], null


def _target(host: str, opts: Options, check_cname: bool) -> Generator[Batch, Answers, TargetReport]:
    """Resolve one MX target, then the FCrDNS of its addresses."""
    report = TargetReport(host)
    qa, qaaaa = Query.of(host, "A"), Query.of(host, "AAAA")
    answers = yield from ask(qa, qaaaa)
    a, aaaa = answers[qa], answers[qaaaa]
    if check_cname:
        report.cname = a.canonical or aaaa.canonical
    report.addresses = (*a.addresses(), *aaaa.addresses())
    report.resolved = bool(report.addresses)
    report.uncertain_address = not report.resolved and (a.temp or aaaa.temp)
    public = report.public[: opts.max_addresses]
    if not public:
        return report
    found = yield from lockstep(*(confirmed_names(addr, 10) for addr in public))
    report.fcrdns = any(f.verified for f in found)
    report.uncertain_fcrdns = not report.fcrdns and any(f.uncertain for f in found)
    for addr, f in zip(public, found, strict=True):
        if f.verified:
            report.notes.append(f"{host}: {addr} has FCrDNS ({f.verified[0]})")
        elif f.ptr.ok:
            report.notes.append(
                f"{host}: {addr} PTR {', '.join(f.ptr.records[:2])} does not resolve back"
            )
        else:
            report.notes.append(f"{host}: {addr} has no PTR ({f.ptr.status})")
    return report


def _judge(domain: str, reports: list[TargetReport], opts: Options, who: str) -> Result:
    d = for_reply(domain)
    defects: list[Defect] = []
    uncertain_fatal = False
    uncertain_warn = False
    for r in reports:
        h = for_reply(r.host)
        if r.cname:
            defects.append(
                Defect(
                    "cname",
                    Reply(
                        550,
                        "5.1.8",
                        f"{who}: MX host {h} of {d} is a CNAME "
                        f"(to {for_reply(r.cname)}); RFC 2181 10.3",
                    ),
                    f"MX {r.host} is a CNAME to {r.cname}",
                )
            )
        if not r.resolved:
            if r.uncertain_address:
                uncertain_fatal = True
            elif len(reports) > 1:
                defects.append(
                    Defect(
                        "unresolvable",
                        Reply(550, "5.1.8", f"{who}: MX host {h} of {d} does not resolve"),
                        f"MX {r.host} does not resolve",
                    )
                )
        if r.fcrdns is False:
            if r.uncertain_fcrdns:
                if opts.fatal("no_fcrdns"):
                    uncertain_fatal = True
                else:
                    uncertain_warn = True
            else:
                defects.append(
                    Defect(
                        "no_fcrdns",
                        Reply(
                            550,
                            "5.7.25",
                            f"{who}: MX host {h} of {d} has no forward-confirmed reverse DNS",
                        ),
                        f"MX {r.host} has no FCrDNS",
                    )
                )
    resolved = [r for r in reports if r.resolved]
    if not resolved and not any(r.uncertain_address for r in reports):
        defects.append(
            Defect(
                "no_mail_host",
                Reply(550, "5.1.8", f"{who}: no MX host of {d} resolves"),
                "no MX host resolves",
            )
        )
    elif resolved and not any(r.public for r in resolved):
        if any(r.uncertain_address for r in reports):
            uncertain_fatal = True
        else:
            shown = ", ".join(str(a) for r in resolved for a in r.addresses[:2])
            defects.append(
                Defect(
                    "private_only",
                    Reply(
                        550,
                        "5.1.8",
                        f"{who}: the mail hosts of {d} resolve only to non-public addresses",
                    ),
                    f"MX hosts resolve only to non-public addresses ({shown})",
                )
            )
    notes = tuple(n for r in reports for n in r.notes)
    return _outcome(defects, uncertain_fatal, uncertain_warn, notes, opts, d)


def _outcome(
    defects: list[Defect],
    uncertain_fatal: bool,
    uncertain_warn: bool,
    notes: tuple[str, ...],
    opts: Options,
    domain: str,
) -> Result:
    fatal = [x for x in defects if opts.fatal(x.kind)]
    kinds = ",".join(sorted({x.kind for x in defects}))
    reasons = "; ".join(x.reason for x in defects)
    if fatal:
        return failed(fatal[0].reply, f"{kinds}: {reasons}", notes=notes, defects=kinds)
    if uncertain_fatal:
        reply = Reply(451, "4.4.3", f"Cannot check the mail hosts of {domain} now; try again later")
        return tempfailed(reply, "a lookup a fatal check needs failed temporarily", notes=notes)
    if defects:
        first = defects[0]
        result = failed(first.reply, f"{kinds} (warning): {reasons}", notes=notes, defects=kinds)
        return Result(
            result.outcome, result.reason, result.reply, result.notes, result.facts, warn_only=True
        )
    extra = (
        ("some FCrDNS lookups failed temporarily (only warnings depend on them)",)
        if uncertain_warn
        else ()
    )
    return passed("mail hosts look real", notes=notes + extra)


def check_sender(ctx: Context, opts: Options) -> Check:
    """Judge the MX hosts of the sender's domain."""
    if ctx.sender is None:
        return skipped("no MAIL FROM yet")
    if ctx.sender == "":
        return skipped("the null sender <> is never judged")
    if "@" not in ctx.sender:
        return skipped("sender without a domain")
    who = f"Sender address <{for_reply(ctx.sender, 120)}> rejected"
    domain = _sender_domain(ctx.sender)
    if domain is None:
        reply = Reply(550, "5.1.8", f"{who}: the domain is not a valid domain name")
        return failed(reply, "sender domain is not a valid domain name")
    q = Query.of(domain, "MX")
    answers = yield from ask(q)
    mx = answers[q]
    if mx.temp:
        reply = Reply(
            451,
            "4.4.3",
            f"Cannot look up the mail hosts of {for_reply(domain)} now; try again later",
        )
        return tempfailed(reply, f"MX lookup failed temporarily ({mx.reason})")
    if mx.status is Status.NXDOMAIN:
        reply = Reply(550, "5.1.8", f"{who}: domain {for_reply(domain)} does not exist")
        return failed(reply, "no_domain: the sender domain does not exist", defects="no_domain")
    hosts, null = _mx_hosts(mx, opts.max_mx) if mx.ok else ([], False)
    if null:
        reply = Reply(
            550, "5.7.27", f"{who}: domain {for_reply(domain)} accepts no mail (null MX, RFC 7505)"
        )
        return failed(reply, "null_mx: the sender domain publishes a null MX", defects="null_mx")
    implicit = not hosts
    if implicit:
        hosts = [domain]  # RFC 5321 5.1: the domain's own A/AAAA is the implicit MX
    reports = yield from lockstep(*(_target(h, opts, check_cname=not implicit) for h in hosts))
    if implicit and not any(r.resolved or r.uncertain_address for r in reports):
        reply = Reply(
            550, "5.1.8", f"{who}: domain {for_reply(domain)} has no MX and no address record"
        )
        return failed(reply, "no_mail_host: neither MX nor A/AAAA", defects="no_mail_host")
    return _judge(domain, list(reports), opts, who)


def check_client(ctx: Context, opts: Options) -> Check:
    """If the client is an MX of its own domain, that MX must not be a CNAME.

    Two rounds, the same depth as fcrdns: the PTR, then, together, the forward
    confirmation of each PTR name (shared with fcrdns) and the MX of each
    name's registered domain.  The CNAME check reads the forward answer's
    CNAME chain, so it costs no question of its own.
    """

    def mx_of_domains(names: tuple[str, ...]) -> list[Query]:
        return [
            Query.of(d, "MX") for d in sorted({registered_domain(n) or "" for n in names} - {""})
        ]

    found = yield from confirmed_names(ctx.client, 10, extra=mx_of_domains)
    if not found.verified:
        return skipped("no verified name (see fcrdns)")
    mine: list[str] = []
    for answer in found.extra.values():
        hosts, _ = _mx_hosts(answer, opts.max_mx) if answer.ok else ([], False)
        mine += [h for h in hosts if h in found.verified]
    if not mine:
        return skipped("the client is not an MX of its own domain")
    forward = dict(zip(found.names, found.forward, strict=True))
    for host in mine:
        target = forward[host].canonical
        if target:
            text = f"Your host {for_reply(host)} is an MX of its domain and a CNAME (RFC 2181 10.3)"
            result = failed(
                Reply(550, "5.1.8", text), f"MX {host} is a CNAME to {target}", defects="cname"
            )
            if not opts.fatal("cname"):
                return replace(result, warn_only=True)
            return result
    return passed(f"the client is an MX of its domain ({', '.join(mine)}), not a CNAME")


RULE = Rule("sender_mx", Stage.MAIL, 4, Options, check_sender, __doc__ or "")
CLIENT_RULE = Rule(
    "client_mx", Stage.CONNECT, 2, Options, check_client, __doc__ or "", default_action="warn"
)
