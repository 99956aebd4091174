"""The Prometheus endpoint: exact counters after a known set of sessions."""

from __future__ import annotations

import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from miltertest import run_session
from prometheus_client.parser import text_string_to_metric_families

from mta.common import free_port

pytestmark = pytest.mark.integration


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def test_counters_after_known_sessions(start_milter: Any, tmp_path: Path) -> None:
    port = free_port()
    m = start_milter(
        {
            "metrics": {"listen": f"127.0.0.1:{port}"},
            "greylist": {"database": str(tmp_path / "g.sqlite"), "policy": "all"},
        }
    )
    m.wait_for("metrics on http://")
    run_session(
        m.socket, ip="103.245.153.249", helo="mail.digitaljunction.com.au"
    )  # refused at HELO
    run_session(m.socket, ip="64.71.1.10", helo="ukiah.firemountain.net")  # greylisted at RCPT
    run_session(m.socket, ip="64.71.1.10", helo="ukiah.firemountain.net")  # again: too early
    time.sleep(0.3)  # let libmilter run the close callbacks
    got = scrape(port)

    def value(name: str, **labels: str) -> float:
        return got.get((name, tuple(sorted(labels.items()))), 0.0)

    assert value("heloguard_decisions_total", stage="helo", verdict="reject") == 1
    assert value("heloguard_decisions_total", stage="helo", verdict="accept") == 2
    assert value("heloguard_decisions_total", stage="mail", verdict="accept") == 2
    assert (
        value("heloguard_rule_results_total", rule="generic", result="fail", effect="reject") == 1
    )
    assert value("heloguard_rule_results_total", rule="fcrdns", result="pass", effect="none") == 2
    assert value("heloguard_greylist_total", outcome="delayed") == 2
    assert value("heloguard_sessions_in_flight") == 0
    sent = sum(v for (n, _), v in got.items() if n == "heloguard_dns_queries_total")
    assert sent > 0 and value("heloguard_dns_query_seconds_count") == sent
    assert value("heloguard_dns_cache_hits_total") > 0
    assert value("heloguard_dns_cache_entries") > 0
