"""DNS faults on every lookup of every rule: never a 5xx resting on a temporary
failure, and every MTA callback answered within its DNS budget.

The matrix: for each rule, a scenario in which only that rule is on (so the
questions it asks are exactly its own), run once without faults to find
every question it asks, then once per question and fault kind with the
fault injected on just that question (name and type) by the test DNS
server.  Each run is a real :class:`~heloguard.session.Session` (the object
the milter adapter drives: connect, HELO, MAIL) with a fresh resolver talking
to the DNS server over the loopback, so caching, merging, budgets and the
connect-time prefetch are all in play.

For the temporary faults (SERVFAIL, REFUSED, a dropped packet: a timeout)
each run checks that

* the fault really hit: the faulted question's answer is TEMP;
* no other answer is TEMP (the fault was on just that question);
* no reply is a 5xx, unless the scenario names the question as one whose
  loss leaves a certain rejection standing (a DNS-list listing by another
  zone: a fact that does not rest on the lost answer);
* every refusal that does stand has no TEMP answer among the deciding
  rule's lookups, unless its finding is marked certain;
* every callback returned within ``[dns] budget`` plus a margin (a
  correctness bound well below the callback's own hard limit, budget + 2 s,
  not a performance figure).

For truncation, the question must be asked again over TCP and the verdict
and the answer must be those of the run without faults.

Further down: NXDOMAIN versus NODATA, a resolver that is down (refusing, or
silent) through the real daemon, and a fault on every question at once.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import pytest
from miltertest import MilterClient, run_session

from heloguard.answers import Answer, Origin, Query, Status
from heloguard.config import from_mapping
from heloguard.engine import Decision, Effect, Engine, RecordedDns, Verdict
from heloguard.names import parse_helo, reverse_name
from heloguard.rules import REGISTRY
from heloguard.rules.base import Context, Stage
from heloguard.session import Act, Runtime, Session, Step

from dnsserver import DNSServer

pytestmark = pytest.mark.integration

TEMP_FAULTS = ("servfail", "refused", "drop")
HELO_PHASE = [[Stage.CONNECT, Stage.HELO]]
MARGIN = 1.0  # seconds over the budget a callback may take (the hard limit is budget + 2)
FAST = {"timeout": 2.0, "budget": 3.0}  # SERVFAIL, REFUSED, truncation: answered at once
# a dropped packet: the resolver would wait 2 s, the budget cuts it at 0.25 s
SLOW = {"timeout": 2.0, "budget": 0.25}

# A host that is an MX of its own domain through a CNAME (client_mx, strict).
MATRIX_ORIGIN = "hg-matrix.test."
MATRIX_ZONE = """\
$TTL 300
@ IN SOA ns.hg-matrix.test. hostmaster.hg-matrix.test. 1 7200 900 1209600 300
@ IN NS ns
@ IN MX 10 mx1
mx1 IN CNAME host1
host1 IN A 64.71.8.1
"""
MATRIX_REVERSE_ORIGIN = "8.71.64.in-addr.arpa."
MATRIX_REVERSE = """\
$TTL 300
@ IN SOA ns.hg-matrix.test. hostmaster.hg-matrix.test. 1 7200 900 1209600 300
@ IN NS ns.hg-matrix.test.
1 IN PTR mx1.hg-matrix.test.
"""

BOT = ("103.245.153.249", "mail.digitaljunction.com.au")
GOOD = ("64.71.1.10", "ukiah.firemountain.net")


@dataclass(frozen=True)
class Scenario:
    """One rule (with any helper it needs) on one client, and what it gives without faults."""

    id: str
    rules: Mapping[str, Mapping[str, Any]]  # the rules that are on, with their options
    ip: str
    helo: str
    sender: str | None = None
    baseline: Act = Act.REJECT
    # questions ("name/TYPE") whose loss leaves a certain rejection standing
    keeps_reject: frozenset[str] = field(default_factory=frozenset)


def sc(
    id: str,
    rules: Mapping[str, Mapping[str, Any]],
    client: tuple[str, str],
    sender: str | None = None,
    baseline: Act = Act.REJECT,
    keeps_reject: tuple[str, ...] = (),
) -> Scenario:
    return Scenario(id, rules, client[0], client[1], sender, baseline, frozenset(keeps_reject))


ON: dict[str, Any] = {"action": "reject"}
BL = {"action": "reject", "zones": ["bl.test", "bl2.test"]}
SCENARIOS = [
    sc("ptr-missing", {"ptr": ON}, ("101.0.77.12", "mail.victoriakasunic.com")),
    sc("generic-bot", {"generic": ON}, BOT),
    sc("fcrdns-bot", {"fcrdns": ON}, BOT),
    sc("fcrdns-good", {"fcrdns": ON}, GOOD, baseline=Act.CONTINUE),
    # two PTR names: a stale one (NXDOMAIN) and one that confirms
    sc(
        "fcrdns-two-names", {"fcrdns": ON}, ("64.71.1.12", "relay.goodcorp.net"), None, Act.CONTINUE
    ),
    # listed by both lists, one is enough: losing either leaves the other's listing
    sc(
        "dnsbl-either",
        {"dnsbl": BL},
        BOT,
        keeps_reject=(
            "249.153.245.103.bl.test/A",
            "249.153.245.103.bl2.test/A",
        ),
    ),
    sc("dnsbl-both-needed", {"dnsbl": {**BL, "threshold": 2, "on_timeout": "tempfail"}}, BOT),
    # the TXT record only words the reply: the listing stands without it
    sc(
        "dnsbl-txt",
        {"dnsbl": {**BL, "zones": ["bl.test"], "txt": True}},
        BOT,
        keeps_reject=("249.153.245.103.bl.test/TXT",),
    ),
    # an allow-listed client whose PTR names are all hostile (fcrdns would refuse it)
    sc(
        "dnswl-exempts",
        {"dnswl": {"zones": ["wl.test"]}, "fcrdns": ON},
        ("64.71.1.66", "mail.example-hostile.net"),
        baseline=Act.ACCEPT,
    ),
    sc("helo_resolves-missing", {"helo_resolves": ON}, ("64.71.1.10", "nohost.firemountain.net")),
    sc("helo_resolves-good", {"helo_resolves": ON}, GOOD, baseline=Act.CONTINUE),
    sc("helo_matches-bot", {"helo_matches": ON}, BOT),
    sc("helo_matches-good", {"helo_matches": ON}, GOOD, baseline=Act.CONTINUE),
    sc("helo_fcrdns-bot", {"helo_fcrdns": ON}, BOT),
    # the HELO domain is listed: certain whatever happens to the client's names
    sc(
        "rhsbl-helo-domain",
        {"rhsbl": {**ON, "zones": ["dbl.test"]}},
        BOT,
        keeps_reject=(
            "249.153.245.103.in-addr.arpa/PTR",
            "103-245-153-249.host.neural.net.au/A",
        ),
    ),
    # the client's verified domain is listed; the HELO domain is not
    sc(
        "rhsbl-client-domain",
        {"rhsbl": {**ON, "zones": ["dbl.test"]}},
        ("64.71.4.4", "ukiah.firemountain.net"),
        keeps_reject=("firemountain.net.dbl.test/A",),
    ),
    sc(
        "client_mx-cname",
        {"client_mx": {**ON, "strict": True}},
        ("64.71.8.1", "mx1.hg-matrix.test"),
    ),
    sc(
        "rhsbl_sender",
        {"rhsbl_sender": {**ON, "zones": ["dbl.test"]}},
        GOOD,
        "basicmark@victoriakasunic.com",
    ),
    sc("sender_mx-null", {"sender_mx": ON}, GOOD, "x@nullmx.mxcases.example.net"),
    sc("sender_mx-no-domain", {"sender_mx": ON}, GOOD, "x@nosuch.mxcases.example.net"),
    sc("sender_mx-private", {"sender_mx": ON}, GOOD, "x@privmx.mxcases.example.net"),
    sc("sender_mx-implicit", {"sender_mx": ON}, GOOD, "x@nomail.mxcases.example.net"),
    sc(
        "sender_mx-strict-fcrdns",
        {"sender_mx": {**ON, "strict": True}},
        GOOD,
        "basicmark@victoriakasunic.com",
    ),
    sc(
        "sender_mx-strict-cname",
        {"sender_mx": {**ON, "strict": True}},
        GOOD,
        "x@cnamemx.mxcases.example.net",
    ),
    # Nothing is left for RCPT (no RCPT rule, no greylist), so the milter
    # accepts the whole message at MAIL instead of continuing.
    sc("sender_mx-good", {"sender_mx": ON}, GOOD, "rsk@gsp.org", Act.ACCEPT),
]


@pytest.fixture(scope="module")
def matrix_dns(zones_server: DNSServer) -> DNSServer:
    zones_server.add_zone_text(MATRIX_ORIGIN, MATRIX_ZONE)
    zones_server.add_zone_text(MATRIX_REVERSE_ORIGIN, MATRIX_REVERSE)
    return zones_server


def config(s: Scenario, dns_server: DNSServer, dns: Mapping[str, float]) -> dict[str, Any]:
    rules: dict[str, Any] = {name: {"action": "off"} for name in REGISTRY}
    rules.update({name: dict(opts) for name, opts in s.rules.items()})
    return {"dns": {"nameservers": [dns_server.nameserver], **dns}, "rules": rules}


@dataclass
class Run:
    """One session of a scenario: its steps, the time of each callback, its decisions."""

    steps: list[tuple[str, Step, float]]
    decisions: list[Decision]

    @property
    def final(self) -> Step:
        """The first refusal (as the MTA would answer it), else the last step."""
        return next((st for _, st, _ in self.steps if st.refuses), self.steps[-1][1])

    def answers(self) -> dict[Query, Answer]:
        out: dict[Query, Answer] = {}
        for d in self.decisions:
            for q, a in d.answers.items():
                out.setdefault(q, a)
        return out

    def codes(self) -> list[int]:
        return [st.reply.code for _, st, _ in self.steps if st.reply is not None]


def run(s: Scenario, dns_server: DNSServer, dns: Mapping[str, float]) -> Run:
    rt = Runtime.build(from_mapping(config(s, dns_server, dns)))
    try:
        session = Session(rt)
        session.connect(s.ip, "mx")
        steps: list[tuple[str, Step, float]] = []
        started = time.monotonic()
        step = session.helo(s.helo)
        steps.append(("HELO", step, time.monotonic() - started))
        if s.sender is not None and step.act is Act.CONTINUE:
            started = time.monotonic()
            step = session.mail(s.sender)
            steps.append(("MAIL", step, time.monotonic() - started))
        decisions = [d for d in (session.helo_decision, session.mail_decision) if d is not None]
        session.close()
        return Run(steps, decisions)
    finally:
        rt.resolver.close()


def check_refusals_rest_on_facts(r: Run, where: str) -> None:
    """A refusal that stands has no TEMP answer behind it, unless its finding is certain."""
    for d in r.decisions:
        for rep in d.reports:
            if rep.effect is not Effect.REJECT:
                continue
            temp = [a for a in rep.lookups if a.temp]
            assert not temp or rep.result.certain, (where, rep.rule, rep.result.reason, temp)
    for stage, step, _ in r.steps:
        if step.reply is not None:
            assert str(step.reply.code)[0] == step.reply.status[0], (where, stage, step.reply)
            if step.act is Act.TEMPFAIL:
                assert step.reply.code < 500, (where, stage, step.reply)


def check_budget(r: Run, budget: float, where: str) -> None:
    for stage, _, took in r.steps:
        assert took <= budget + MARGIN, f"{where}: {stage} took {took:.2f}s, budget {budget}s"


@pytest.mark.parametrize("s", SCENARIOS, ids=[s.id for s in SCENARIOS])
def test_every_fault_on_every_lookup(s: Scenario, matrix_dns: DNSServer) -> None:
    dns_server = matrix_dns
    dns_server.clear_faults()
    base = run(s, dns_server, FAST)
    assert base.final.act is s.baseline, (s.id, base.final, base.steps)
    questions = base.answers()
    assert questions, f"{s.id}: the scenario asks no DNS question"
    assert not any(a.temp for a in questions.values()), (s.id, questions)
    for name in s.keeps_reject:
        assert any(str(q) == name for q in questions), (s.id, "not asked", name)
    try:
        for q, before in sorted(questions.items()):
            where = f"{s.id} {q}"
            for kind in TEMP_FAULTS:
                dns_server.clear_faults()
                dns_server.set_fault(q.name, kind, qtype=q.rdtype)
                dns = SLOW if kind == "drop" else FAST
                r = run(s, dns_server, dns)
                got = r.answers()
                assert q in got and got[q].temp, (where, kind, "the fault did not hit", got.get(q))
                # a lost packet may use up the budget: later rounds are then TEMP too
                others = [
                    a
                    for a in got.values()
                    if a.temp
                    and a.query != q
                    and not (kind == "drop" and a.origin is Origin.BUDGET)
                ]
                assert not others, (where, kind, "TEMP beyond the faulted question", others)
                check_budget(r, dns["budget"], f"{where} {kind}")
                check_refusals_rest_on_facts(r, f"{where} {kind}")
                if str(q) not in s.keeps_reject:
                    assert r.final.act is not Act.REJECT, (where, kind, r.final)
                    assert all(c < 500 for c in r.codes()), (where, kind, r.steps)
                elif kind != "drop":  # a lost packet may starve the listing's own round
                    assert r.final.act is Act.REJECT, (where, kind, r.final)
            # truncation: asked again over TCP, and the same answer and verdict
            dns_server.clear_faults()
            dns_server.reset_log()
            dns_server.set_fault(q.name, "truncate", qtype=q.rdtype)
            r = run(s, dns_server, FAST)
            asked = [x for x in dns_server.queries() if (x.name, x.qtype) == (q.name, q.rdtype)]
            assert {x.transport for x in asked} == {"udp", "tcp"}, (where, asked)
            after = r.answers()[q]
            assert (after.status, after.records) == (before.status, before.records), where
            assert r.final == base.final, (where, "truncate", r.final, base.final)
    finally:
        dns_server.clear_faults()


def test_matrix_covers_every_rule_that_asks_dns() -> None:
    """Each rule with DNS lookups (cost > 0) is the subject of a scenario."""
    asking = {name for name, rule in REGISTRY.items() if rule.cost > 0}
    covered = {name for s in SCENARIOS for name in s.rules}
    assert asking <= covered, asking - covered


# -- an allow list that does not answer ----------------------------------------


def test_unanswered_allow_list_defers_instead_of_refusing() -> None:
    """dnswl's hit would exempt the client: when dnswl cannot answer, a refusal
    decided beside it is deferred (a fault must not become a 5xx).  Fails
    without the engine's allow-list guard: fcrdns's 550 stood."""
    client = ipaddress.ip_address("64.71.1.66")
    ctx = Context(client=client, helo=parse_helo("mail.example-hostile.net"))
    ptr = Answer(Query.of(reverse_name(client), "PTR"), Status.OK, ("64.71.1.66",), ttl=300)
    wl = Query.of("66.1.71.64.wl.test", "A")
    rules: dict[str, Any] = {name: {"action": "off"} for name in REGISTRY}
    rules.update(dnswl={"zones": ["wl.test"]}, fcrdns={"action": "reject"})
    engine = Engine(from_mapping({"rules": rules}))

    def decide(listing: Answer) -> Decision:
        return asyncio.run(engine.decide(ctx, RecordedDns([ptr, listing]), HELO_PHASE))

    refused = decide(Answer(wl, Status.NXDOMAIN, ttl=300))
    assert refused.verdict is Verdict.REJECT and refused.rule == "fcrdns"
    listed = decide(Answer(wl, Status.OK, ("127.0.10.2",), ttl=300))
    assert listed.verdict is Verdict.ACCEPT and listed.exempt
    deferred = decide(Answer(wl, Status.TEMP, reason="SERVFAIL"))
    assert deferred.verdict is Verdict.TEMPFAIL, deferred
    assert deferred.reply is not None and str(deferred.reply).startswith("451 4.7.25 ")
    report = deferred.report("fcrdns")
    assert report is not None and report.effect is Effect.TEMPFAIL
    assert any("dnswl" in note and "TEMP" in note for note in report.result.notes)


# -- NXDOMAIN versus NODATA: permanent facts, told apart -----------------------


def test_nxdomain_and_nodata_are_permanent_and_told_apart(dns_server: DNSServer) -> None:
    s = sc("nx", {"helo_resolves": ON}, ("64.71.1.10", "nohost.firemountain.net"))
    r = run(s, dns_server, FAST)
    assert r.final.act is Act.REJECT and r.final.reply is not None
    assert "A NXDOMAIN, AAAA NXDOMAIN" in r.final.reply.text
    # taos exists but the HELO name asked has only an MX: NODATA for A and AAAA
    s = sc("nodata", {"helo_resolves": ON}, ("64.71.1.10", "gsp.org"))
    r = run(s, dns_server, FAST)
    assert r.final.act is Act.REJECT and r.final.reply is not None
    assert "A NODATA, AAAA NODATA" in r.final.reply.text
    # a forced NXDOMAIN is a fact; a SERVFAIL on the same question is not
    s = sc("forced", {"fcrdns": ON}, GOOD, baseline=Act.CONTINUE)
    dns_server.set_fault("ukiah.firemountain.net", "nxdomain", qtype="A")
    assert run(s, dns_server, FAST).final.act is Act.REJECT
    dns_server.set_fault("ukiah.firemountain.net", "servfail", qtype="A")
    assert run(s, dns_server, FAST).final.act is Act.TEMPFAIL


# -- every question at once, with the default rules -----------------------------


@pytest.mark.parametrize("kind", TEMP_FAULTS)
def test_default_rules_with_every_question_failing(dns_server: DNSServer, kind: str) -> None:
    """All default rules (lists configured), every question faulted: 4xx, in time."""
    cfg: dict[str, Any] = {
        "dns": {"nameservers": [dns_server.nameserver], **(SLOW if kind == "drop" else FAST)},
        "rules": {
            "dnsbl": {"zones": ["bl.test"]},
            "rhsbl": {"zones": ["dbl.test"]},
            "dnswl": {"zones": ["wl.test"]},
        },
    }
    dns_server.set_fault(".", kind)
    for ip, helo in (BOT, GOOD, ("2600:3c00::10", "ukiah.firemountain.net")):
        rt = Runtime.build(from_mapping(cfg))
        try:
            s = Session(rt)
            s.connect(ip, "mx")
            started = time.monotonic()
            step = s.helo(helo)
            took = time.monotonic() - started
            assert step.act is Act.TEMPFAIL and step.reply is not None, (ip, step)
            assert step.reply.code == 451, (ip, step.reply)
            assert took <= cfg["dns"]["budget"] + MARGIN, (ip, took)
            assert s.helo_decision is not None and s.helo_decision.verdict is Verdict.TEMPFAIL
        finally:
            rt.resolver.close()


# -- a resolver that is down, through the real daemon -------------------------


@pytest.fixture
def silent_nameserver() -> Iterator[str]:
    """A UDP port that takes every question and never answers (TCP: refused)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    try:
        yield f"127.0.0.1:{sock.getsockname()[1]}"
    finally:
        sock.close()


@pytest.mark.parametrize("down", ["refusing", "silent"])
def test_resolver_down_defers_every_stage_in_time(
    start_milter: Any, silent_nameserver: str, down: str
) -> None:
    nameserver = "127.0.0.1:9" if down == "refusing" else silent_nameserver
    budget = 1.0
    # the per-question timeout (0.5 s) is within the budget: the resolver's own timeout
    m = start_milter(
        {
            "dns": {"nameservers": [nameserver], "timeout": 0.5, "budget": budget},
            # a client without HELO is refused for that alone (a fact): judge its DNS instead
            "rules": {"helo_syntax": {"action": "warn"}},
        }
    )
    for ip, helo in (BOT, GOOD):
        with MilterClient(m.socket) as c:
            c.negotiate()
            c.connect(ip, macros={"{daemon_name}": "mx"})
            started = time.monotonic()
            reply = c.helo(helo)
            took = time.monotonic() - started
        assert reply is not None and reply.smtp_code == 451, (down, ip, reply)
        assert took <= budget + MARGIN, (down, ip, took)
    # a client that skips HELO: the HELO and MAIL phases share one callback's budget
    with MilterClient(m.socket) as c:
        c.negotiate()
        c.connect(GOOD[0], macros={"{daemon_name}": "mx"})
        started = time.monotonic()
        reply = c.mail("rsk@gsp.org", macros={"{auth_authen}": ""})
        took = time.monotonic() - started
    assert reply is not None and reply.smtp_code == 451, reply
    assert took <= budget + MARGIN, took
    log = m.log()
    assert "Traceback" not in log, log
    assert "tempfail: HELO from" in log


def test_dns_recovers_after_the_fault(start_milter: Any, dns_server: DNSServer) -> None:
    """A TEMP answer is forgotten after temp_ttl: the next session is judged on facts."""
    dns_server.set_fault("153.245.103.in-addr.arpa", "refused")
    m = start_milter({"dns": {"temp_ttl": 1}})
    first = run_session(m.socket, ip=BOT[0], helo=BOT[1])
    assert first.helo is not None and first.helo.smtp_code == 451, first
    dns_server.clear_faults()
    time.sleep(1.2)
    second = run_session(m.socket, ip=BOT[0], helo=BOT[1])
    assert second.helo is not None and second.helo.smtp_code == 550, second
