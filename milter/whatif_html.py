"""The ``heloguard whatif --html`` page: one self-contained file, no script, no fetch.

The same tables as the terminal summary (refused mail that looks wanted
first, outcomes, rules, sender domains, what was not used) and an inline SVG
chart of refusals per rule over time, one bar per day (per week when the
input spans more than 120 days).  Every text from the input is escaped: it is
other people's mail.
"""

from __future__ import annotations

import html
from collections import Counter, defaultdict
from datetime import date, timedelta

from heloguard.whatif import REFUSED, VERDICTS, Judged, Result, sender_domain

# One colour per rule, in order of first appearance; enough for every rule.
PALETTE = (
    "#b2182b",
    "#2166ac",
    "#e08214",
    "#1b7837",
    "#762a83",
    "#8c510a",
    "#01665e",
    "#c51b7d",
    "#4d4d4d",
    "#7fbc41",
    "#35978f",
    "#d6604d",
)
CSS = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 2em; color: #222; }
h1 { font-size: 1.4em; } h2 { font-size: 1.1em; margin-top: 2em; }
table { border-collapse: collapse; margin: .5em 0; }
th, td { border: 1px solid #ccc; padding: .25em .6em; text-align: left; vertical-align: top; }
td { max-width: 32em; overflow-wrap: break-word; } td:first-child { white-space: nowrap; }
span.reply { font-size: 85%; color: #444; }
th { background: #f2f2f2; } td.n { text-align: right; font-variant-numeric: tabular-nums; }
.note { color: #555; } .wanted { background: #fff4e5; }
code { font-size: 90%; }
"""


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _table(head: list[str], rows: list[list[str]], cls: str = "") -> str:
    """A table; cells are already escaped."""
    if not rows:
        return '<p class="note">None.</p>'
    attr = f' class="{cls}"' if cls else ""
    out = [f"<table{attr}><tr>" + "".join(f"<th>{_e(h)}</th>" for h in head) + "</tr>"]
    for r in rows:
        out.append(
            "<tr>"
            + "".join(f'<td class="n">{c}</td>' if c.isdigit() else f"<td>{c}</td>" for c in r)
            + "</tr>"
        )
    out.append("</table>")
    return "\n".join(out)


def _bucket(day: date, weekly: bool) -> date:
    return day - timedelta(days=day.weekday()) if weekly else day


def chart(judged: list[Judged]) -> str:
    """Stacked bars: refused messages per rule, per day (or week)."""
    dated = [j for j in judged if j.outcome in REFUSED and j.seen.date is not None]
    if not dated:
        return '<p class="note">No dated refusals to chart.</p>'
    days = [j.seen.date.date() for j in dated if j.seen.date]
    weekly = (max(days) - min(days)).days > 120
    counts: defaultdict[date, Counter[str]] = defaultdict(Counter)
    for j in dated:
        if j.seen.date:
            counts[_bucket(j.seen.date.date(), weekly)][j.rule] += 1
    rules = list(dict.fromkeys(j.rule for j in dated))
    colour = {r: PALETTE[i % len(PALETTE)] for i, r in enumerate(rules)}
    start, end = min(counts), max(counts)
    step = timedelta(days=7 if weekly else 1)
    buckets = []
    d = start
    while d <= end:
        buckets.append(d)
        d += step
    top = max(sum(c.values()) for c in counts.values())
    width, height, left, bottom = 760, 260, 40, 40
    bar = min(40.0, max(2.0, (width - left) / len(buckets) - 2))
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height + 30}" '
        f'role="img" aria-label="refusals per rule over time" id="chart">',
        f'<line x1="{left}" y1="{height - bottom}" x2="{width}" y2="{height - bottom}" '
        'stroke="#888"/>',
        f'<text x="4" y="14" font-size="11">{top}</text>',
        f'<text x="4" y="{height - bottom}" font-size="11">0</text>',
    ]
    scale = (height - bottom - 20) / top
    for i, b in enumerate(buckets):
        x = left + i * (bar + 2)
        y = float(height - bottom)
        for rule in rules:
            n = counts.get(b, Counter())[rule]
            if not n:
                continue
            h = n * scale
            y -= h
            parts.append(
                f'<rect x="{x:.1f}" y="{y:.1f}" width="{bar:.1f}" height="{h:.1f}" '
                f'fill="{colour[rule]}" data-rule="{_e(rule)}" data-count="{n}">'
                f"<title>{_e(b)} {_e(rule)}: {n}</title></rect>"
            )
    parts.append(
        f'<text x="{left}" y="{height - bottom + 16}" font-size="11">{_e(start)}</text>'
        f'<text x="{width - 80}" y="{height - bottom + 16}" font-size="11">{_e(end)}</text>'
    )
    for i, rule in enumerate(rules):
        x = left + (i % 6) * 120
        y = height - 8 + (i // 6) * 16
        parts.append(
            f'<rect x="{x}" y="{y - 9}" width="10" height="10" fill="{colour[rule]}"/>'
            f'<text x="{x + 14}" y="{y}" font-size="11">{_e(rule)}</text>'
        )
    parts.append("</svg>")
    unit = "week" if weekly else "day"
    return f'<p class="note">Refused messages per rule, one bar per {unit}.</p>' + "".join(parts)


def page(result: Result) -> str:
    """The whole page."""
    r = result.reading
    counts = result.counts()
    wanted = result.wanted()
    body = [
        "<h1>heloguard what-if</h1>",
        f'<p class="note">Read {r.messages} messages and {r.log_lines} log lines; judged '
        f"{len(result.judged)} messages or sessions from {result.clients} distinct clients "
        f"with {result.dns_sent} DNS questions in {result.seconds:.1f} s.  DNS is today's, "
        "not the day the mail came.</p>",
        "<h2>Refused but looks wanted</h2>",
    ]
    body.append(
        _table(
            ["date", "sender", "why wanted", "outcome", "rule", "client", "HELO", "reply"],
            [
                [
                    _e(j.seen.date.date() if j.seen.date else ""),
                    _e(j.seen.sender or j.seen.from_addr or "<>"),
                    _e(j.wanted),
                    _e(j.outcome),
                    _e(j.rule),
                    _e(j.seen.client),
                    _e(j.seen.helo or ""),
                    f'<span class="reply">{_e(j.reply)}</span>',
                ]
                for j in wanted
            ],
            "wanted",
        )
    )
    body += [
        "<h2>Outcomes</h2>",
        _table(["outcome", "messages"], [[_e(v), str(counts.get(v, 0))] for v in VERDICTS]),
        "<h2>Refusals over time</h2>",
        chart(result.judged),
        "<h2>Refused, by rule</h2>",
        _table(["rule", "messages"], [[_e(k), str(n)] for k, n in result.per_rule().most_common()]),
        "<h2>Sender domains most affected</h2>",
        _table(
            ["sender domain", "refused"],
            [[_e(k), str(n)] for k, n in result.domains().most_common(20)],
        ),
        "<h2>Not used</h2>",
        _table(["reason", "count"], [[_e(k), str(n)] for k, n in r.unusable.most_common()]),
        "<h2>Every refusal</h2>",
        _table(
            ["date", "source", "sender domain", "client", "outcome", "rule"],
            [
                [
                    _e(j.seen.date.isoformat() if j.seen.date else ""),
                    _e(j.seen.source),
                    _e(sender_domain(j.seen)),
                    _e(j.seen.client),
                    _e(j.outcome),
                    _e(j.rule),
                ]
                for j in result.judged
                if j.outcome in REFUSED
            ],
        ),
    ]
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        "<title>heloguard what-if</title>"
        f"<style>{CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    )
