"""Prometheus metrics, served on loopback when ``[metrics] listen`` is set.

Counters and gauges (prometheus_client, on a registry of heloguard's own):

* ``heloguard_decisions_total{stage,verdict}``: decisions made;
* ``heloguard_rule_results_total{rule,result,effect}``: each rule's findings;
* ``heloguard_dns_queries_total{type,status}`` and
  ``heloguard_dns_query_seconds`` (a histogram): questions that went to a
  nameserver;
* ``heloguard_dns_cache_hits_total``, ``heloguard_dns_cache_entries``;
* ``heloguard_greylist_total{outcome}``: delayed, passed, error;
* ``heloguard_list_errors_total{rule}``: DNS list error codes (misconfigurations);
* ``heloguard_sessions_in_flight``.

The endpoint listens on 127.0.0.1 unless configured otherwise: metrics
describe your mail traffic and are nobody else's business.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from heloguard.answers import Answer
from heloguard.engine import Decision


class Metrics:
    """The metric families, on a registry of their own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.decisions = Counter(
            "heloguard_decisions", "Decisions made", ["stage", "verdict"], registry=r
        )
        self.rules = Counter(
            "heloguard_rule_results",
            "Findings of each rule",
            ["rule", "result", "effect"],
            registry=r,
        )
        self.dns = Counter(
            "heloguard_dns_queries",
            "DNS questions sent to a nameserver",
            ["type", "status"],
            registry=r,
        )
        self.dns_seconds = Histogram(
            "heloguard_dns_query_seconds",
            "Time to answer a DNS question",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0),
            registry=r,
        )
        self.cache_hits = Counter(
            "heloguard_dns_cache_hits", "Answers served from the cache", registry=r
        )
        self.cache_entries = Gauge(
            "heloguard_dns_cache_entries", "Answers in the cache", registry=r
        )
        self.greylist = Counter("heloguard_greylist", "Greylist outcomes", ["outcome"], registry=r)
        self.list_errors = Counter(
            "heloguard_list_errors",
            "DNS list error codes seen (not listings)",
            ["rule"],
            registry=r,
        )
        self.in_flight = Gauge("heloguard_sessions_in_flight", "SMTP sessions open", registry=r)

    def decided(self, decision: Decision) -> None:
        """Count a decision and its findings."""
        self.decisions.labels(decision.stage.word, str(decision.verdict)).inc()
        for rule, outcome, effect, alerts in decision.tally():
            self.rules.labels(rule, str(outcome), str(effect)).inc()
            if alerts:
                self.list_errors.labels(rule).inc(alerts)

    def greylisted(self, outcome: str) -> None:
        """Count a greylist outcome (delayed, passed, error)."""
        self.greylist.labels(outcome).inc()

    def dns_answer(self, answer: Answer) -> None:
        """Count a question that went to a nameserver."""
        self.dns.labels(answer.query.rdtype, str(answer.status)).inc()
        self.dns_seconds.observe(answer.elapsed)

    def watch_cache(self, size: Callable[[], int]) -> None:
        """Report the cache's size when scraped."""
        self.cache_entries.set_function(lambda: float(size()))

    def serve(self, listen: str) -> None:
        """Serve /metrics on HOST:PORT in a daemon thread."""
        host, _, port = listen.rpartition(":")
        start_http_server(int(port), addr=host.strip("[]") or "127.0.0.1", registry=self.registry)
