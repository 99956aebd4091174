"""The ``heloguard`` command line.

``heloguard check``    dry-run: evaluate the rules for one client (or a batch)
                       against live DNS and show every finding and the reply.
``heloguard config check``  validate a config file and print the effective config.
``heloguard whatif``   what the rules would have done to mail already received.

Exit status of ``check``: 0 accept, 4 tempfail, 5 reject (a batch exits 0
unless the command itself failed); 64 usage error; 78 configuration error.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, NoReturn, TextIO

from heloguard.answers import Answer, Origin, Query, Status
from heloguard.config import Config, ConfigError, load
from heloguard.engine import Decision, Engine, LiveDns, RecordedDns, Verdict
from heloguard.gate import Gate
from heloguard.names import parse_address, parse_helo, reverse_name
from heloguard.render import EXIT_FOR_VERDICT, decision_json, decision_text
from heloguard.resolver import Resolver, parse_nameserver
from heloguard.rules import REGISTRY
from heloguard.rules.base import Context, Stage

EX_USAGE = 64
EX_CONFIG = 78
BATCH_CONCURRENCY = 64
BATCH_CHUNK = 512

log = logging.getLogger("heloguard")


class UsageError(Exception):
    """A bad command line or a bad batch line."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EX_USAGE, f"{self.prog}: error: {message}\n")


@dataclass(frozen=True, slots=True)
class CheckInput:
    """One dry-run case: what the milter would learn from the MTA and the client."""

    ip: str
    helo: str | None = None
    ptr: tuple[str, ...] = ()
    sender: str | None = None
    rcpt: tuple[str, ...] = ()
    # A replayed record holds the sender as the milter saw it, brackets already
    # removed: taken as it is ("<x@ >" recorded as "x@ " must not lose its space).
    verbatim: bool = False

    def context(self) -> Context:
        """The rule context; raises UsageError on a bad address."""
        addr = parse_address(self.ip)
        if addr is None:
            raise UsageError(f"not an IP address: {self.ip!r}")
        helo = parse_helo(self.helo) if self.helo is not None else None
        sender = self.sender
        if sender is not None and not self.verbatim:
            sender = sender.strip()
            if sender.startswith("<") and sender.endswith(">"):
                sender = sender[1:-1]
        return Context(client=addr, helo=helo, sender=sender, recipients=self.rcpt)

    def supplied(self) -> dict[Query, Answer]:
        """Answers given on the command line instead of looked up (``--ptr``)."""
        if not self.ptr:
            return {}
        addr = parse_address(self.ip)
        if addr is None:
            return {}
        q = Query.of(reverse_name(addr), "PTR")
        names = tuple(sorted({n.rstrip(".").lower() for n in self.ptr}))
        return {q: Answer(q, Status.OK, names, ttl=0, origin=Origin.SUPPLIED, reason="--ptr")}

    def phases(self) -> list[list[Stage]]:
        """The phases the milter would go through for this input."""
        first = [Stage.CONNECT] + ([Stage.HELO] if self.helo is not None else [])
        phases = [first]
        if self.sender is not None:
            phases.append([Stage.MAIL])
        if self.rcpt:
            phases.append([Stage.RCPT])
        return phases

    def to_json(self) -> dict[str, Any]:
        """The input, echoed in batch output."""
        out: dict[str, Any] = {"ip": self.ip}
        if self.helo is not None:
            out["helo"] = self.helo
        if self.ptr:
            out["ptr"] = list(self.ptr)
        if self.sender is not None:
            out["from"] = self.sender
        if self.rcpt:
            out["rcpt"] = list(self.rcpt)
        return out


def _strings(value: object, key: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise UsageError(f"{key} must be a string or a list of strings")


def input_from_json(obj: object) -> CheckInput:
    """Parse one batch line (already decoded)."""
    if not isinstance(obj, dict):
        raise UsageError("each line must be a JSON object")
    ip = obj.get("ip")
    if not isinstance(ip, str):
        raise UsageError("ip is required and must be a string")
    helo = obj.get("helo")
    if helo is not None and not isinstance(helo, str):
        raise UsageError("helo must be a string")
    sender = obj.get("from")
    if sender is not None and not isinstance(sender, str):
        raise UsageError("from must be a string")
    inp = CheckInput(
        ip=ip,
        helo=helo,
        ptr=_strings(obj.get("ptr"), "ptr"),
        sender=sender,
        rcpt=_strings(obj.get("rcpt"), "rcpt"),
    )
    inp.context()  # validates the address
    return inp


def _parse_rules(text: str | None) -> list[str] | None:
    if text is None:
        return None
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in REGISTRY]
    if unknown or not names:
        raise UsageError(
            f"unknown rule {unknown[0] if unknown else '(none)'}; rules: {', '.join(REGISTRY)}"
        )
    return names


def load_config(path: str | None, nameservers: Sequence[str] = ()) -> Config:
    """Load the config and apply ``--nameserver`` overrides."""
    config = load(path)
    if nameservers:
        for ns in nameservers:
            try:
                parse_nameserver(ns)
            except ValueError as exc:
                raise UsageError(f"--nameserver {ns}: {exc}") from None
        config = replace(config, dns=replace(config.dns, nameservers=tuple(nameservers)))
    return config


async def _decide(
    engine: Engine, dns_resolver: Resolver, inp: CheckInput, only: list[str] | None, gate: Gate
) -> Decision:
    """What the milter would decide: the same gate, engine and exceptions."""
    ctx = inp.context()
    skip = gate.skip_reason(ctx.client)
    phases = inp.phases()
    if skip:
        return engine.exempt(skip, phases)
    source = LiveDns(dns_resolver, inp.supplied())
    decision = await engine.decide(ctx, source, phases, evaluate_all=True, only=only)
    if decision.verdict is not Verdict.ACCEPT:
        exception = gate.name_exception(decision.facts("verified") or ())
        if exception:
            decision.exempted(exception)
    return decision


def _batch_lines(stream: TextIO) -> Iterator[tuple[int, str]]:
    for number, line in enumerate(stream, 1):
        if line.strip():
            yield number, line


async def _run_chunk(
    engine: Engine, res: Resolver, chunk: list[tuple[int, str]], only: list[str] | None
) -> list[dict[str, Any]]:
    sem = asyncio.Semaphore(BATCH_CONCURRENCY)
    gate = Gate.from_config(engine.config)

    async def one(number: int, line: str) -> dict[str, Any]:
        ident: object = None
        try:
            obj = json.loads(line)
            if isinstance(obj, dict):
                ident = obj.get("id")
            inp = input_from_json(obj)
        except (json.JSONDecodeError, UsageError) as exc:
            err: dict[str, Any] = {"error": str(exc), "line": number}
            if ident is not None:
                err["id"] = ident
            return err
        async with sem:
            decision = await _decide(engine, res, inp, only, gate)
        out = decision_json(decision)
        out["input"] = inp.to_json()
        if ident is not None:
            out["id"] = ident
        return out

    return list(await asyncio.gather(*(one(n, line) for n, line in chunk)))


def _chunks(items: Iterable[tuple[int, str]], size: int) -> Iterator[list[tuple[int, str]]]:
    chunk: list[tuple[int, str]] = []
    for item in items:
        chunk.append(item)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def cmd_replay(args: argparse.Namespace, engine: Engine) -> int:
    """``heloguard check --replay FILE``: re-evaluate records from their own DNS answers."""
    from heloguard.records import RecordCutShort, ReplayError, answers_of, parse, phases_of

    path = Path(args.replay)
    lines = [
        (number, line)
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if line.strip()
    ]
    if not lines:
        raise UsageError(f"{path}: no record")
    code, differ, cut = 0, 0, 0
    for number, line in lines:
        try:
            rec = parse(line)
            inp = CheckInput(
                ip=str(rec["input"]["ip"]),
                helo=rec["input"].get("helo"),
                sender=rec["input"].get("from"),
                rcpt=tuple(rec["input"].get("rcpt") or ()),
                verbatim=True,
            )
            dns = RecordedDns(answers_of(rec))
            phases = phases_of(rec)
        except RecordCutShort as exc:
            # a daemon stopped mid-write (kill -9): the rest is still worth replaying
            print(f"heloguard: warning: {path}:{number}: {exc}, skipped", file=sys.stderr)
            cut += 1
            continue
        except (ReplayError, KeyError, TypeError) as exc:
            raise UsageError(f"{path}:{number}: {exc}") from None
        decision = asyncio.run(
            engine.decide(inp.context(), dns, phases, evaluate_all=bool(rec.get("evaluate_all")))
        )
        now = {
            "verdict": str(decision.verdict),
            "reply": str(decision.reply) if decision.reply else None,
        }
        then = {"verdict": rec.get("verdict"), "reply": rec.get("reply")}
        same = now == then
        differ += not same
        if args.json:
            out = decision_json(decision)
            out["input"] = inp.to_json()
            out["replay"] = {"line": number, "recorded": then, "identical": same}
            print(json.dumps(out))
        else:
            print(decision_text(decision, f"replay of {path}:{number}: client [{inp.ip}]"))
            verdict = "identical to the record" if same else f"DIFFERS from the record: {then}"
            print(f"replay:  {verdict}")
        code = EXIT_FOR_VERDICT[decision.verdict]
    if cut == len(lines):
        raise UsageError(f"{path}: no whole record")
    return 1 if differ else code


def cmd_check(args: argparse.Namespace) -> int:
    """``heloguard check``."""
    only = _parse_rules(args.rules)
    config = load_config(args.config, args.nameserver or ())
    engine = Engine(config)
    if args.replay is not None:
        return cmd_replay(args, engine)
    with Resolver(config.dns.resolver_settings()) as res:
        if args.batch is not None:
            stream = sys.stdin if args.batch == "-" else open(args.batch, encoding="utf-8")  # noqa: SIM115
            with stream:
                for chunk in _chunks(_batch_lines(stream), BATCH_CHUNK):
                    for out in res.run(_run_chunk(engine, res, chunk, only)):
                        sys.stdout.write(json.dumps(out, sort_keys=False) + "\n")
                    sys.stdout.flush()
            return 0
        if args.ip is None:
            raise UsageError("--ip is required (or --batch)")
        inp = CheckInput(
            ip=args.ip,
            helo=args.helo,
            ptr=tuple(args.ptr or ()),
            sender=getattr(args, "from"),
            rcpt=tuple(args.rcpt or ()),
        )
        inp.context()
        limit = config.dns.budget * len(inp.phases()) + 5
        gate = Gate.from_config(config)
        decision = res.run(_decide(engine, res, inp, only, gate), timeout=limit)
    if args.json:
        out = decision_json(decision)
        out["input"] = inp.to_json()
        print(json.dumps(out, indent=None))
    else:
        header = f"heloguard check: client [{inp.ip}]" + (
            f" helo={inp.helo!r}" if inp.helo is not None else ""
        )
        print(decision_text(decision, header))
    return EXIT_FOR_VERDICT[decision.verdict]


def cmd_report(args: argparse.Namespace) -> int:
    """``heloguard report``: counts from decision records or log lines."""
    from heloguard import report

    rep = report.build(args.files, progress=sys.stderr.isatty() and not args.json)
    print(json.dumps(rep.to_json()) if args.json else report.render(rep))
    return 0


def cmd_config_check(args: argparse.Namespace) -> int:
    """``heloguard config check``: validate and print the effective config."""
    from heloguard.configdump import dump

    config = load_config(args.config, args.nameserver or ())
    print(dump(config), end="")
    print(f"# {config.source}: OK", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for the man page and tests)."""
    parser = _Parser(
        prog="heloguard", description="Turn spam bots away at EHLO time from DNS facts."
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--config", metavar="FILE", help="config file (default /etc/heloguard/heloguard.toml)"
        )
        p.add_argument(
            "--nameserver",
            metavar="HOST[:PORT]",
            action="append",
            help="nameserver to ask instead of the config's (repeatable)",
        )

    check = sub.add_parser("check", help="dry-run the rules for one client")
    common(check)
    check.add_argument("--ip", metavar="ADDR", help="client address")
    check.add_argument("--helo", metavar="NAME", help="HELO/EHLO argument")
    check.add_argument(
        "--ptr", metavar="NAME", action="append", help="use this PTR name instead of looking it up"
    )
    check.add_argument("--from", metavar="ADDR", help="MAIL FROM address (<> for the null sender)")
    check.add_argument(
        "--rcpt", metavar="ADDR", action="append", help="RCPT TO address (repeatable)"
    )
    check.add_argument("--rules", metavar="R1,R2", help="evaluate only these rules")
    check.add_argument(
        "--json", action="store_true", help="one JSON object instead of the transcript"
    )
    check.add_argument("--batch", metavar="FILE|-", help="JSON lines in, JSON lines out")
    check.add_argument(
        "--replay",
        metavar="FILE",
        help="re-evaluate decision records (from [log] decisions) from their own DNS answers",
    )
    check.set_defaults(func=cmd_check)

    config = sub.add_parser("config", help="configuration tools")
    csub = config.add_subparsers(dest="config_command", required=True, parser_class=_Parser)
    ccheck = csub.add_parser("check", help="validate and print the effective configuration")
    common(ccheck)
    ccheck.set_defaults(func=cmd_config_check)

    rep = sub.add_parser("report", help="counts from decision records or heloguard's log lines")
    rep.add_argument(
        "files", nargs="*", metavar="FILE", help="records or log files (default: stdin)"
    )
    rep.add_argument("--json", action="store_true", help="one JSON object")
    rep.set_defaults(func=cmd_report)

    from heloguard import daemon, whatif

    daemon.add_commands(sub, common)
    whatif.add_command(sub, common)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``heloguard`` command."""
    logging.basicConfig(level=logging.WARNING, format="heloguard: %(levelname)s: %(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.func(args)
    except UsageError as exc:
        print(f"heloguard: error: {exc}", file=sys.stderr)
        return EX_USAGE
    except ConfigError as exc:
        print(f"heloguard: configuration error: {exc}", file=sys.stderr)
        return EX_CONFIG
    except OSError as exc:
        print(f"heloguard: error: {exc}", file=sys.stderr)
        return EX_USAGE if args.command == "check" else 1
    return code


if __name__ == "__main__":
    # ``python -m heloguard.cli`` runs this file as __main__; the commands in other
    # modules import heloguard.cli, so run that module's main, whose UsageError
    # is the one they raise.
    from heloguard.cli import main as canonical_main

    sys.exit(canonical_main())
