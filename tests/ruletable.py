"""Drive a rule with canned DNS answers, no network: the rule-logic test kit.

``FakeZone`` maps (name, type) to records, or to a status such as TEMP; any
question not listed is NXDOMAIN.  ``drive`` runs a rule's check generator to
its result and records every question it asked.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from heloguard.answers import Answer, Query, Status
from heloguard.names import parse_address, parse_helo
from heloguard.rules.base import Context, Result, Rule

Records = tuple[str, ...] | str  # records, or a status name ("TEMP", "NODATA", ...)


@dataclass
class FakeZone:
    data: Mapping[tuple[str, str], Records] = field(default_factory=dict)
    asked: list[Query] = field(default_factory=list)

    def answer(self, q: Query) -> Answer:
        self.asked.append(q)
        value = self.data.get((q.name, q.rdtype))
        if value is None:
            return Answer(q, Status.NXDOMAIN, ttl=300)
        if isinstance(value, str):
            return Answer(q, Status(value), ttl=300, reason="injected" if value == "TEMP" else "")
        return Answer(q, Status.OK, tuple(value), ttl=3600)


def ctx(ip: str, helo: str | None = None, sender: str | None = None) -> Context:
    addr = parse_address(ip)
    assert addr is not None
    return Context(client=addr, helo=parse_helo(helo) if helo is not None else None, sender=sender)


def drive(rule: Rule[Any], context: Context, zone: FakeZone, options: Any = None) -> Result:
    opts = options if options is not None else rule.options()
    out = rule.check(context, opts)
    if isinstance(out, Result):
        return out
    try:
        batch = next(out)
        while True:
            batch = out.send({q: zone.answer(q) for q in sorted(batch)})
    except StopIteration as stop:
        result: Result = stop.value
        return result
