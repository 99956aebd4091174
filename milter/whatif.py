"""``heloguard whatif``: what would heloguard have done to the mail I already got?

Reads mail already received (mbox, Maildir, single messages) or MTA logs
(:mod:`heloguard.mailread`), takes each message's client from the Received
header our own server wrote, and re-judges every distinct client once with
today's DNS through the same gate, engine and rules as ``heloguard check``:
questions in parallel, clients started at a bounded rate.  The verdict is the
one enforce mode would give (``[policy] mode`` only softens what reaches the
client), and ``greylist`` where the rules accept and the configured
greylisting would delay a first delivery.

Output: a terminal summary that lists first the refused messages that look
wanted (their sender's domain is one our users wrote to, or they reply to a
message one of us wrote), then the counts per verdict and rule and the sender
domains most affected; ``--json`` gives one ``check --json`` object per
message or session, with ``source`` and ``date``; ``--html FILE`` writes one
self-contained page (:mod:`heloguard.whatif_html`).

Trust: the input is other people's mail; the sender's own Received headers
are never read, and every text shown is escaped.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from heloguard.cli import CheckInput, UsageError, _decide, load_config
from heloguard.config import Config
from heloguard.engine import Decision, Engine, Verdict
from heloguard.gate import Gate
from heloguard.greylist import suspicious
from heloguard.logfmt import printable
from heloguard.mailread import Reading, Seen, read
from heloguard.names import registered_domain
from heloguard.render import decision_json
from heloguard.resolver import Resolver

DEFAULT_RATE = 20.0  # clients started per second
CONCURRENCY = 16
VERDICTS = ("accept", "greylist", "defer", "reject")
REFUSED = ("greylist", "defer", "reject")

Key = tuple[str, str | None, str | None]  # client address, HELO, the sender's domain


@dataclass(frozen=True, slots=True)
class Judged:
    """One message or session with the verdict its client gets today."""

    seen: Seen
    outcome: str  # accept, greylist, defer, reject
    rule: str  # the deciding rule ("" for accept)
    reply: str
    wanted: str  # why it looks wanted ("" if it does not)
    decision: Decision


@dataclass
class Result:
    """Everything the summary, the JSON and the page are made from."""

    judged: list[Judged] = field(default_factory=list)
    reading: Reading = field(default_factory=Reading)
    clients: int = 0
    dns_sent: int = 0
    seconds: float = 0.0
    by: tuple[str, ...] = ()
    since: datetime | None = None
    too_old: int = 0

    def counts(self) -> Counter[str]:
        """Messages per outcome."""
        return Counter(j.outcome for j in self.judged)

    def per_rule(self) -> Counter[str]:
        """Refused messages per deciding rule."""
        return Counter(j.rule for j in self.judged if j.outcome in REFUSED)

    def domains(self) -> Counter[str]:
        """Refused messages per sender domain."""
        return Counter(sender_domain(j.seen) for j in self.judged if j.outcome in REFUSED)

    def wanted(self) -> list[Judged]:
        """Refused messages that look wanted, oldest first."""
        hits = [j for j in self.judged if j.outcome in REFUSED and j.wanted]
        return sorted(hits, key=lambda j: j.seen.date or datetime.min.replace(tzinfo=UTC))


def sender_domain(seen: Seen) -> str:
    """The sender's domain: envelope first, then From:, "(none)" for the null sender."""
    for addr in (seen.sender, seen.from_addr):
        if addr and "@" in addr:
            return addr.rpartition("@")[2].lower()
    return "(none)"


def default_by(config: Config) -> tuple[str, ...]:
    """This host's names and the configured ``[policy] myhostnames``/``helo_ours`` names."""
    names = {socket.gethostname().lower(), *config.myhostnames}
    ours = config.rules.get("helo_ours")
    opts = getattr(ours, "options", None) if ours else None
    names.update(getattr(opts, "myhostnames", ()) or ())
    return tuple(sorted(n.lower().rstrip(".") for n in names if n))


# -- wanted mail ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Correspondence:
    """What the input shows of our own users' mail: whom they wrote to, which ids they wrote."""

    domains_written_to: frozenset[str]
    our_ids: frozenset[str]
    our_domains: frozenset[str]

    @classmethod
    def of(cls, reading: Reading, seen: Sequence[Seen], by: Sequence[str]) -> Correspondence:
        """From the messages our users wrote and the recipients of what we got."""
        ours = {a.rpartition("@")[2] for s in seen for a in s.rcpt if "@" in a}
        ours |= {registered_domain(n) or n for n in by if n}
        written_to: set[str] = set()
        for a in reading.authored:
            written_to |= {t.rpartition("@")[2] for t in a.to if "@" in t}
        return cls(
            frozenset(written_to - ours),
            frozenset(a.message_id for a in reading.authored if a.message_id),
            frozenset(ours),
        )

    def why_wanted(self, seen: Seen) -> str:
        """Why a message looks wanted ("" when it does not)."""
        domain = sender_domain(seen)
        if domain in self.domains_written_to:
            return f"our users wrote to {domain}"
        for ref in seen.refs:
            if ref in self.our_ids or ref.rpartition("@")[2].lower() in self.our_domains:
                return f"a reply to <{ref}>"
        return ""


# -- judging -------------------------------------------------------------------------


def client_key(seen: Seen) -> Key:
    """What a client is judged on: its address, its HELO, and its sender's domain.

    The MAIL-stage rules ask about the sender's domain only, so two senders of
    one domain from one client are one judgement.
    """
    sender = seen.sender
    domain = sender.rpartition("@")[2].lower() if sender and "@" in sender else sender
    return (str(seen.client), seen.helo, domain)


def _input(seen: Seen) -> CheckInput:
    return CheckInput(ip=str(seen.client), helo=seen.helo, sender=seen.sender)


def outcome_of(decision: Decision, config: Config) -> str:
    """accept, greylist, defer or reject, as enforce mode would answer the first delivery."""
    if decision.enforced is Verdict.REJECT:
        return "reject"
    if decision.enforced is Verdict.TEMPFAIL:
        return "defer"
    grey = config.greylist
    if (
        grey is not None
        and not decision.exempt
        and (grey.policy != "suspicious" or suspicious(decision))
    ):
        return "greylist"
    return "accept"


async def _judge(
    engine: Engine,
    res: Resolver,
    keys: Sequence[Key],
    inputs: dict[Key, CheckInput],
    rate: float,
    tick: Callable[[], None],
) -> dict[Key, Decision]:
    gate = Gate.from_config(engine.config)
    sem = asyncio.Semaphore(CONCURRENCY)
    loop = asyncio.get_running_loop()
    interval = 1.0 / rate if rate > 0 else 0.0
    next_start = loop.time()

    async def one(key: Key) -> tuple[Key, Decision]:
        nonlocal next_start
        async with sem:
            now = loop.time()
            wait, next_start = next_start - now, max(now, next_start) + interval
            if wait > 0:
                await asyncio.sleep(wait)
            decision = await _decide(engine, res, inputs[key], None, gate)
        tick()
        return key, decision

    return dict(await asyncio.gather(*(one(k) for k in keys)))


class Progress:
    """A one-line progress report on stderr, only on a terminal."""

    def __init__(self, stream: TextIO, enabled: bool) -> None:
        self.stream, self.enabled = stream, enabled
        self.read = self.judged = self.total = 0
        self._last = 0.0

    def show(self, force: bool = False) -> None:
        """Redraw at most ten times a second."""
        if not self.enabled:
            return
        now = time.monotonic()
        if not force and now - self._last < 0.1:
            return
        self._last = now
        if self.total:
            pct = self.judged * 100 // self.total
            bar = "#" * (pct // 4)
            text = f"judging clients [{bar:<25}] {self.judged}/{self.total}"
        else:
            text = f"reading: {self.read} messages or sessions"
        print(f"\r{text}", end="", file=self.stream, flush=True)

    def done(self) -> None:
        """End the line."""
        if self.enabled:
            print(file=self.stream)

    def tick_read(self) -> None:
        """One more item read."""
        self.read += 1
        self.show()

    def tick_judged(self) -> None:
        """One more client judged."""
        self.judged += 1
        self.show()


def run(
    config: Config,
    paths: Sequence[str],
    by: Sequence[str],
    since: datetime | None = None,
    rate: float = DEFAULT_RATE,
    progress: Progress | None = None,
    stdin: Any = None,
) -> Result:
    """Read, judge each distinct client once, and keep every message's outcome."""
    started = time.monotonic()
    progress = progress or Progress(sys.stderr, False)
    result = Result(by=tuple(by), since=since)
    seen: list[Seen] = []
    for item in read(paths, by, result.reading, stdin=stdin):
        progress.tick_read()
        if since is not None and item.date is not None and item.date < since:
            result.too_old += 1
            continue
        seen.append(item)
    inputs: dict[Key, CheckInput] = {}
    for item in seen:
        key = client_key(item)
        if key not in inputs:
            inputs[key] = _input(item)
    progress.total = len(inputs)
    engine = Engine(config)
    with Resolver(config.dns.resolver_settings()) as res:
        decisions = res.run(_judge(engine, res, list(inputs), inputs, rate, progress.tick_judged))
        result.dns_sent = sum(d.dns_sent for d in decisions.values())
    progress.show(force=True)
    progress.done()
    letters = Correspondence.of(result.reading, seen, by)
    for item in seen:
        d = decisions[client_key(item)]
        out = outcome_of(d, config)
        reply = d.enforced_reply
        result.judged.append(
            Judged(
                seen=item,
                outcome=out,
                rule=(d.rule or "")
                if out in ("reject", "defer")
                else ("greylist" if out == "greylist" else ""),
                reply=str(reply) if reply and out in ("reject", "defer") else "",
                wanted=letters.why_wanted(item),
                decision=d,
            )
        )
    result.clients = len(inputs)
    result.seconds = time.monotonic() - started
    return result


# -- output --------------------------------------------------------------------------


def record(j: Judged) -> dict[str, Any]:
    """One message or session: the ``check --json`` object plus where it came from."""
    out = decision_json(j.decision)
    out["input"] = _input(j.seen).to_json()
    out["source"] = j.seen.source
    out["date"] = j.seen.date.isoformat() if j.seen.date else None
    out["whatif"] = {"outcome": j.outcome, "wanted": j.wanted or None, "kind": j.seen.kind}
    return out


def _row(j: Judged) -> str:
    s = j.seen
    when = s.date.strftime("%Y-%m-%d") if s.date else "(no date)"
    who = printable(s.sender or s.from_addr or "<>", 60)
    return (
        f"  {when}  {who}  client [{s.client}] helo={printable(s.helo or '(none)', 60)}\n"
        f"      {j.outcome} by {j.rule}: {printable(j.reply, 160)}\n"
        f"      looks wanted: {j.wanted}; {printable(s.source, 120)}"
    )


def summary(result: Result) -> str:
    """The terminal summary."""
    r = result.reading
    counts = result.counts()
    out: list[str] = []
    wanted = result.wanted()
    if wanted:
        out += [f"REFUSED BUT LOOKS WANTED ({len(wanted)}):", *(_row(j) for j in wanted[:50])]
        if len(wanted) > 50:
            out.append(f"  ... and {len(wanted) - 50} more (see --json or --html)")
        out.append("")
    out += [
        f"read: {r.messages} messages, {r.log_lines} log lines ({r.sessions} sessions); "
        f"judged {len(result.judged)} of them: {result.clients} distinct clients, "
        f"{result.dns_sent} DNS questions, {result.seconds:.1f} s",
        "DNS is today's, not the day the mail came: a client whose DNS changed since "
        "may be judged differently than it would have been then.",
        "would: " + "  ".join(f"{v} {counts.get(v, 0)}" for v in VERDICTS),
    ]
    if result.too_old:
        out.append(f"(older than --since: {result.too_old})")
    rules = result.per_rule()
    if rules:
        out += ["", "refused, by rule:", *(f"  {n:>7}  {k}" for k, n in rules.most_common())]
    domains = result.domains()
    if domains:
        out += [
            "",
            "sender domains most affected:",
            *(f"  {n:>7}  {printable(k, 80)}" for k, n in domains.most_common(10)),
        ]
    if r.unusable:
        out += [
            "",
            "not used:",
            *(f"  {n:>7}  {k}" for k, n in sorted(r.unusable.items(), key=lambda kv: -kv[1])),
        ]
    if r.by_seen:
        hosts = ", ".join(f"{printable(h, 60)} ({n})" for h, n in r.by_seen.most_common(8))
        out += [
            "",
            f"no Received header was written by {', '.join(result.by) or '(no --by)'}; "
            f"the headers' by hosts were: {hosts}; name ours with --by",
        ]
    return "\n".join(out)


def _since(text: str | None) -> datetime | None:
    if text is None:
        return None
    try:
        d = datetime.fromisoformat(text)
    except ValueError:
        raise UsageError(f"--since {text!r}: not a date (YYYY-MM-DD)") from None
    return d if d.tzinfo else d.replace(tzinfo=UTC)


def cmd_whatif(args: argparse.Namespace) -> int:
    """``heloguard whatif``."""
    config = load_config(args.config, args.nameserver or ())
    by = tuple(n.lower().rstrip(".") for n in (args.by or ())) or default_by(config)
    if args.rate <= 0:
        raise UsageError("--rate must be positive")
    since = _since(args.since)
    show = sys.stderr.isatty() and not args.json
    stdin = sys.stdin.buffer if "-" in args.paths else None
    result = run(config, args.paths, by, since, args.rate, Progress(sys.stderr, show), stdin)
    if args.json:
        for j in result.judged:
            sys.stdout.write(json.dumps(record(j)) + "\n")
    else:
        print(summary(result))
    if args.html:
        from heloguard.whatif_html import page

        Path(args.html).write_text(page(result), encoding="utf-8")
        if not args.json:
            print(f"\npage written: {args.html}")
    return 0


def add_command(sub: Any, common: Callable[[argparse.ArgumentParser], None]) -> None:
    """The ``whatif`` subcommand."""
    p = sub.add_parser("whatif", help="what heloguard would have done to mail already received")
    common(p)
    p.add_argument(
        "--by",
        metavar="NAME",
        action="append",
        help="a host name of our own server, as it writes Received headers (repeatable; "
        ".domain for any host in it; default: this host and [policy] myhostnames)",
    )
    p.add_argument("--json", action="store_true", help="one JSON object per message or session")
    p.add_argument("--html", metavar="FILE", help="write a self-contained HTML page")
    p.add_argument("--since", metavar="DATE", help="only mail received on or after DATE")
    p.add_argument(
        "--rate",
        metavar="N",
        type=float,
        default=DEFAULT_RATE,
        help=f"clients judged per second at most (default {DEFAULT_RATE:g})",
    )
    p.add_argument(
        "paths", nargs="+", metavar="PATH", help="mbox, Maildir, message or log file; - for stdin"
    )
    p.set_defaults(func=cmd_whatif)
