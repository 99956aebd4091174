"""heloguard.rules: one module per rule, and the registry that lists them.

The registry is an explicit, ordered mapping, not a plugin scan: a daemon
started as root loads only the code listed here.  Its order breaks ties
between rules of the same cost.
"""

from __future__ import annotations

from typing import Any

from heloguard.rules import (
    dnsbl,
    fcrdns,
    generic,
    helo_fcrdns,
    helo_literal,
    helo_matches,
    helo_ours,
    helo_resolves,
    helo_syntax,
    ptr,
    rhsbl,
    sender_mx,
)
from heloguard.rules.base import Rule

REGISTRY: dict[str, Rule[Any]] = {
    r.name: r
    for r in (
        helo_syntax.RULE,
        helo_literal.RULE,
        helo_ours.RULE,
        generic.HELO_RULE,
        dnsbl.WL_RULE,
        ptr.RULE,
        generic.RULE,
        dnsbl.RULE,
        helo_resolves.RULE,
        fcrdns.RULE,
        helo_matches.RULE,
        helo_fcrdns.RULE,
        rhsbl.RULE,
        sender_mx.CLIENT_RULE,
        rhsbl.SENDER_RULE,
        sender_mx.RULE,
    )
}
