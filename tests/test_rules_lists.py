"""Table tests of the list and MX rules against canned answers (no network)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from heloguard.answers import Answer, Query, Status
from heloguard.config import from_mapping
from heloguard.engine import Engine, RecordedDns, Verdict
from heloguard.rules import REGISTRY
from heloguard.rules.base import Outcome, Stage
from heloguard.rules.dnsbl import Options as ListOptions
from heloguard.rules.sender_mx import Options as MxOptions

from ruletable import FakeZone, Records, ctx, drive

GOOD_MX: dict[tuple[str, str], Records] = {
    ("good.example", "MX"): ("10 mx.good.example",),
    ("mx.good.example", "A"): ("64.71.1.11",),
    ("mx.good.example", "AAAA"): "NODATA",
    ("11.1.71.64.in-addr.arpa", "PTR"): ("mx.good.example",),
}

MX_CASES: list[tuple[str, dict[tuple[str, str], Records], bool, Outcome, bool]] = [
    # label, zone data, strict, outcome, warn_only
    ("well run", GOOD_MX, False, Outcome.PASS, False),
    ("null mx", {("good.example", "MX"): ("0 .",)}, False, Outcome.FAIL, False),
    ("mx temp", {("good.example", "MX"): "TEMP"}, False, Outcome.TEMPFAIL, False),
    (
        "private only",
        {**GOOD_MX, ("mx.good.example", "A"): ("10.0.0.5", "192.168.1.2")},
        False,
        Outcome.FAIL,
        False,
    ),
    (
        "no fcrdns warns",
        {**GOOD_MX, ("11.1.71.64.in-addr.arpa", "PTR"): "NXDOMAIN"},
        False,
        Outcome.FAIL,
        True,
    ),
    (
        "no fcrdns strict",
        {**GOOD_MX, ("11.1.71.64.in-addr.arpa", "PTR"): "NXDOMAIN"},
        True,
        Outcome.FAIL,
        False,
    ),
    (
        "ptr temp, only a warning depends on it",
        {**GOOD_MX, ("11.1.71.64.in-addr.arpa", "PTR"): "TEMP"},
        False,
        Outcome.PASS,
        False,
    ),
    (
        "ptr temp, strict",
        {**GOOD_MX, ("11.1.71.64.in-addr.arpa", "PTR"): "TEMP"},
        True,
        Outcome.TEMPFAIL,
        False,
    ),
    (
        "implicit mx",
        {
            ("good.example", "MX"): "NODATA",
            ("good.example", "A"): ("64.71.1.11",),
            ("good.example", "AAAA"): "NODATA",
            ("11.1.71.64.in-addr.arpa", "PTR"): ("good.example",),
        },
        False,
        Outcome.PASS,
        False,
    ),
    ("no domain", {}, False, Outcome.FAIL, False),
]


@pytest.mark.parametrize(
    ("label", "data", "strict", "outcome", "warn_only"), MX_CASES, ids=[c[0] for c in MX_CASES]
)
def test_sender_mx(
    label: str, data: dict[Any, Any], strict: bool, outcome: Outcome, warn_only: bool
) -> None:
    c = ctx("64.71.1.10", "ukiah.firemountain.net", sender="someone@good.example")
    result = drive(REGISTRY["sender_mx"], c, FakeZone(data), MxOptions(strict=strict))
    assert result.outcome is outcome, (label, result)
    assert result.warn_only is warn_only


def test_sender_mx_asks_many_targets_in_parallel() -> None:
    hosts = tuple(f"{10 * i} mx{i}.good.example" for i in range(1, 8))
    data: dict[tuple[str, str], Records] = {("good.example", "MX"): hosts}
    zone = FakeZone(data)
    drive(
        REGISTRY["sender_mx"], ctx("64.71.1.10", sender="x@good.example"), zone, MxOptions(max_mx=5)
    )
    asked_a = [q for q in zone.asked if q.rdtype == "A"]
    assert len(asked_a) == 5, "capped at max_mx"


def test_dnsbl_listing_is_certain_despite_another_zones_timeout() -> None:
    data: dict[tuple[str, str], Records] = {
        ("249.153.245.103.bl.test", "A"): ("127.0.0.2",),
        ("249.153.245.103.slow.test", "A"): "TEMP",
    }
    opts = ListOptions(zones=("bl.test", "slow.test"))
    result = drive(REGISTRY["dnsbl"], ctx("103.245.153.249"), FakeZone(data), opts)
    assert result.outcome is Outcome.FAIL and result.certain


def test_dnswl_holds_the_short_circuit() -> None:
    """A cheap rule's rejection waits for the allow list, whose hit exempts the client."""
    config = from_mapping({"rules": {"dnswl": {"zones": ["wl.test"]}}})
    engine = Engine(config)
    answers = [Answer(Query.of("66.1.71.64.wl.test", "A"), Status.OK, ("127.0.10.2",), ttl=60)]
    decision = asyncio.run(
        engine.decide(
            ctx("64.71.1.66", "localhost"), RecordedDns(answers), [[Stage.CONNECT, Stage.HELO]]
        )
    )
    assert decision.verdict is Verdict.ACCEPT and "allow-listed by wl.test" in decision.exempt
    without = asyncio.run(
        Engine(from_mapping({})).decide(
            ctx("64.71.1.66", "localhost"), RecordedDns(answers), [[Stage.CONNECT, Stage.HELO]]
        )
    )
    assert without.verdict is Verdict.REJECT
