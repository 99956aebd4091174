"""Decisions as text: the dry-run's human transcript and its JSON object.

The JSON object is a contract that other tools and tests rely on::

    {"verdict": "reject", "stage": "helo", "reply": "550 5.7.25 ...",
     "rule": "fcrdns", "mode": "enforce", "enforced": "reject",
     "rules": [{"rule": "fcrdns", "stage": "connect", "result": "fail",
                "action": "reject", "effect": "reject", "reason": "...",
                "reply": "550 5.7.25 ...", "notes": [...],
                "evidence": [{"name": ..., "type": "PTR", "status": "OK",
                              "records": [...], "ttl": 3600, ...}],
                "elapsed_ms": 51.2}, ...],
     "dns_queries": 5, "dns_sent": 5, "elapsed_ms": 103.0}

``result`` is what the rule found, ``action`` what the configuration does with
a failure, ``effect`` what that came to.  For an accept, ``reply`` is null.
"""

from __future__ import annotations

from typing import Any

from heloguard.engine import Decision, Effect, RuleReport, Verdict
from heloguard.logfmt import printable
from heloguard.rules.base import Outcome


def rule_json(r: RuleReport) -> dict[str, Any]:
    """One rule's report as a JSON-ready dict."""
    out: dict[str, Any] = {
        "rule": r.rule,
        "stage": r.stage.word,
        "result": str(r.result.outcome),
        "action": str(r.action),
        "effect": str(r.effect),
        "reason": r.result.reason,
        "reply": str(r.reply) if r.reply else None,
        "evidence": [a.to_json() for a in r.lookups],
        "elapsed_ms": round(r.elapsed * 1000, 1),
    }
    if r.result.notes:
        out["notes"] = list(r.result.notes)
    if r.error:
        out["error"] = True
    return out


def decision_json(d: Decision) -> dict[str, Any]:
    """A decision as the dry-run's JSON object."""
    return {
        "verdict": str(d.verdict),
        "stage": d.stage.word,
        "reply": str(d.reply) if d.reply else None,
        "rule": d.rule,
        "mode": str(d.mode),
        "enforced": str(d.enforced),
        "enforced_reply": str(d.enforced_reply) if d.enforced_reply else None,
        "rules": [rule_json(r) for r in d.reports],
        "dns_queries": d.dns_queries,
        "dns_sent": d.dns_sent,
        "elapsed_ms": round(d.elapsed * 1000, 1),
        **({"exempt": d.exempt} if d.exempt else {}),
    }


_MARK = {
    Outcome.PASS: "pass",
    Outcome.FAIL: "FAIL",
    Outcome.TEMPFAIL: "TEMPFAIL",
    Outcome.SKIP: "skip",
}


def decision_text(d: Decision, header: str = "") -> str:
    """The human transcript: each rule, its evidence and time, then the reply."""
    lines: list[str] = []
    if header:
        lines.append(header)
    width = max((len(r.rule) for r in d.reports), default=8)
    for r in d.reports:
        mark = _MARK[r.result.outcome]
        effect = "" if r.effect is Effect.NONE else f"  -> {r.effect} (action={r.action})"
        lines.append(
            f"  {r.rule:<{width}}  {mark:<8}  {printable(r.result.reason, 300)}"
            f"  [{r.elapsed * 1000:.1f} ms]{effect}"
        )
        for note in r.result.notes:
            lines.append(f"  {'':<{width}}            note: {printable(note, 300)}")
        for a in r.lookups:
            lines.append(
                f"  {'':<{width}}            dns: {printable(a.summary(), 300)} [{a.origin}]"
            )
    lines.append(
        f"verdict: {d.verdict} at {d.stage.word}" + (f" (rule {d.rule})" if d.rule else "")
    )
    if d.verdict is not d.enforced:
        lines.append(f"  mode {d.mode}: enforce would {d.enforced}: {d.enforced_reply}")
    lines.append(f"reply:   {d.reply}" if d.reply else "reply:   (none: the session goes on)")
    lines.append(
        f"dns:     {d.dns_queries} questions, {d.dns_sent} sent to a nameserver, "
        f"{d.elapsed * 1000:.0f} ms"
    )
    return "\n".join(lines)


EXIT_FOR_VERDICT = {Verdict.ACCEPT: 0, Verdict.TEMPFAIL: 4, Verdict.REJECT: 5}
