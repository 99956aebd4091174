"""``heloguard report``: what heloguard did, from its decision records or its log.

Input: decision records (the JSON lines of ``[log] decisions``) or heloguard's
log lines (stderr or syslog, one decision per line), in any mix, from files
or standard input.  Output: counts per rule, result and effect; the networks
(/24, /64) and HELO names most often refused; what warn mode would have
refused; and greylist outcomes (delayed, passed on retry, never retried).
On a terminal, large inputs show a progress bar on stderr.
"""

from __future__ import annotations

import ipaddress
import json
import re
import sys
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

# verb: STAGE from name[addr]: detail; key=value ...
_LINE = re.compile(
    r"\b(?P<verb>reject|tempfail|warn|pass|skip|greylist): (?P<stage>CONNECT|HELO|MAIL|RCPT) from "
    r"(?P<name>\S*)\[(?P<addr>[^\]]*)\]: (?P<detail>.*?);(?P<fields>(?: \S+=\S*)*)\s*$"
)
_FIELD = re.compile(r"(\w+)=(<[^>]*>|\S+)")


@dataclass
class Report:
    """The counts."""

    decisions: int = 0
    verdicts: Counter[str] = field(default_factory=Counter)
    rules: Counter[tuple[str, str, str]] = field(default_factory=Counter)  # rule, result, effect
    refused_nets: Counter[str] = field(default_factory=Counter)
    refused_helos: Counter[str] = field(default_factory=Counter)
    deciding: Counter[str] = field(default_factory=Counter)
    would_refuse: Counter[str] = field(default_factory=Counter)  # warn mode: rule -> count
    delayed: set[str] = field(default_factory=set)
    passed_retry: set[str] = field(default_factory=set)
    unreadable: int = 0

    @property
    def never_retried(self) -> int:
        """Greylisted triplets that never came back (as far as the input shows)."""
        return len(self.delayed - self.passed_retry)

    def to_json(self) -> dict[str, Any]:
        """The report as a JSON-ready dict."""
        return {
            "decisions": self.decisions,
            "verdicts": dict(self.verdicts),
            "rules": [
                {"rule": r, "result": res, "effect": eff, "count": n}
                for (r, res, eff), n in sorted(self.rules.items())
            ],
            "deciding_rules": dict(self.deciding),
            "top_refused_networks": self.refused_nets.most_common(10),
            "top_refused_helos": self.refused_helos.most_common(10),
            "warn_mode_would_refuse": dict(self.would_refuse),
            "greylist": {
                "delayed": len(self.delayed),
                "passed_on_retry": len(self.passed_retry),
                "never_retried": self.never_retried,
            },
            "unreadable_lines": self.unreadable,
        }


def network(addr: str) -> str:
    """The /24 or /64 an address belongs to."""
    try:
        ip = ipaddress.ip_address(addr)
    except ValueError:
        return addr
    return str(ipaddress.ip_network(f"{ip}/{24 if ip.version == 4 else 64}", strict=False))


def add_record(rep: Report, rec: dict[str, Any]) -> None:
    """Count one decision record."""
    rep.decisions += 1
    verdict = str(rec.get("verdict"))
    rep.verdicts[verdict] += 1
    for r in rec.get("rules", []):
        rep.rules[(str(r.get("rule")), str(r.get("result")), str(r.get("effect")))] += 1
    inp = rec.get("input", {})
    if verdict in ("reject", "tempfail"):
        rep.refused_nets[network(str(inp.get("ip")))] += 1
        if inp.get("helo") is not None:
            rep.refused_helos[str(inp.get("helo"))] += 1
        if rec.get("rule"):
            rep.deciding[str(rec["rule"])] += 1
    enforced = rec.get("enforced")
    if enforced in ("reject", "tempfail") and verdict != enforced:
        rep.would_refuse[str(rec.get("rule") or _first_effect(rec))] += 1


def _first_effect(rec: dict[str, Any]) -> str:
    for r in rec.get("rules", []):
        if r.get("effect") in ("reject", "tempfail"):
            return str(r.get("rule"))
    return "?"


def add_log_line(rep: Report, line: str) -> bool:
    """Count one log line; False when it is not a decision line."""
    m = _LINE.search(line)
    if not m:
        return False
    verb, addr = m["verb"], m["addr"]
    fields = dict(_FIELD.findall(m["fields"]))
    if verb == "greylist":
        rep.delayed.add(_triplet(fields))
        return True
    if verb == "pass" and "greylist: retried" in m["detail"]:
        rep.passed_retry.add(_triplet(fields))
    if verb == "skip" or (verb == "pass" and m["stage"] == "RCPT"):
        return True
    rep.decisions += 1
    verdict = {"reject": "reject", "tempfail": "tempfail"}.get(verb, "accept")
    rep.verdicts[verdict] += 1
    rule = fields.get("rule", "")
    if verb in ("reject", "tempfail"):
        rep.refused_nets[network(addr)] += 1
        if "helo" in fields:
            rep.refused_helos[fields["helo"].strip("<>")] += 1
        if rule:
            rep.deciding[rule] += 1
    if verb == "warn" and "would " in m["detail"]:
        rep.would_refuse[rule or "?"] += 1
    return True


def _triplet(fields: dict[str, str]) -> str:
    detail_key = fields.get("key", "")
    return f"{detail_key}|{fields.get('from', '')}|{fields.get('to', '')}"


def _lines(paths: list[str], progress: bool) -> Iterator[str]:
    sources: list[tuple[str, TextIO, int]] = []
    for p in paths or ["-"]:
        if p == "-":
            sources.append(("-", sys.stdin, 0))
        else:
            opened: TextIO = Path(p).open(encoding="utf-8", errors="replace")  # noqa: SIM115 - closed below
            sources.append((p, opened, Path(p).stat().st_size))
    total = sum(size for _, _, size in sources)
    done = 0
    shown = -1
    for _name, stream, _size in sources:
        try:
            for line in stream:
                done += len(line)
                if progress and total > 1_000_000:
                    pct = min(100, done * 100 // total)
                    if pct != shown:
                        bar = "#" * (pct // 4)
                        print(f"\r[{bar:<25}] {pct:3d}%", end="", file=sys.stderr, flush=True)
                        shown = pct
                yield line
        finally:
            if stream is not sys.stdin:
                stream.close()
    if progress and shown >= 0:
        print(file=sys.stderr)


def build(paths: list[str], progress: bool = False) -> Report:
    """Read everything and count."""
    rep = Report()
    for line in _lines(paths, progress):
        text = line.strip()
        if not text:
            continue
        if text.startswith("{"):
            try:
                rec = json.loads(text)
            except json.JSONDecodeError:
                rep.unreadable += 1
                continue
            if isinstance(rec, dict) and "verdict" in rec:
                add_record(rep, rec)
            else:
                rep.unreadable += 1
        elif not add_log_line(rep, text):
            rep.unreadable += 1
    return rep


def render(rep: Report) -> str:
    """The human report."""
    out = [
        f"decisions: {rep.decisions}  "
        + "  ".join(f"{k}={v}" for k, v in sorted(rep.verdicts.items()))
    ]
    if rep.rules:
        out += ["", "rule               result    effect    count"]
        out += [f"{r:<18} {res:<9} {eff:<9} {n}" for (r, res, eff), n in sorted(rep.rules.items())]
    sections: Iterable[tuple[str, list[tuple[str, int]]]] = (
        ("refused by rule", rep.deciding.most_common()),
        ("most refused networks", rep.refused_nets.most_common(10)),
        ("most refused HELO names", rep.refused_helos.most_common(10)),
        ("warn mode would have refused (by rule)", rep.would_refuse.most_common()),
    )
    for title, rows in sections:
        if rows:
            out += ["", f"{title}:", *(f"  {n:>7}  {k}" for k, n in rows)]
    if rep.delayed or rep.passed_retry:
        out += [
            "",
            f"greylist: {len(rep.delayed)} delayed, {len(rep.passed_retry)} passed on retry, "
            f"{rep.never_retried} never retried",
        ]
    if rep.unreadable:
        out += [
            "",
            f"({rep.unreadable} lines were neither decision records nor decision log lines)",
        ]
    return "\n".join(out)
