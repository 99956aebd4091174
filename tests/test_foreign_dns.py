"""The dry-run against a DNS server nobody in this project wrote zones for.

A fresh random world (see foreign_dns.generate_scenario) is served by Debian's
NSD, a third-party authoritative server, and the real ``heloguard check``
command line judges its clients.  So the verdicts cannot lean on the
project's own zones (tests/zones/) nor on its own server (tests/dnsserver.py).

Each failure message carries the scenario's seed; ``FOREIGN_DNS_SEED=N``
replays that world.  Under CI (``CI=true``) NSD must install and start; on a
developer's machine the module is skipped only when NSD cannot be installed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from foreign_dns import (
    NSDServer,
    NSDUnavailable,
    Scenario,
    ask_all,
    ensure_nsd,
    generate_scenario,
)

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent
IN_CI = os.environ.get("CI") == "true"


@dataclass
class Run:
    """One run of ``heloguard check --json``."""

    code: int
    out: dict[str, Any]
    command: list[str]
    stderr: str
    took: float

    def results(self) -> dict[str, str]:
        return {r["rule"]: r["result"] for r in self.out["rules"]}

    def temp_answers(self) -> list[str]:
        """Questions answered TEMP: none should be, every name asked is in a served zone."""
        return [
            f"{e['name']}/{e['type']}"
            for r in self.out["rules"]
            for e in r["evidence"]
            if e["status"] == "TEMP"
        ]

    def show(self) -> str:
        return (
            f"$ {' '.join(self.command)}\nexit {self.code} after {self.took:.2f} s\n"
            f"{json.dumps(self.out, indent=1)}\nstderr: {self.stderr}"
        )


def check(nameserver: str, ip: str, helo: str) -> Run:
    """The real command line, as an admin would run it."""
    command = [
        sys.executable,
        "-m",
        "heloguard.cli",
        "check",
        "--json",
        "--nameserver",
        nameserver,
        "--ip",
        ip,
        "--helo",
        helo,
    ]
    started = time.monotonic()
    proc = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(os.environ, PYTHONSAFEPATH="1"),
        cwd=ROOT,
        check=False,
    )
    took = time.monotonic() - started
    try:
        out = json.loads(proc.stdout)
    except json.JSONDecodeError:
        pytest.fail(
            f"$ {' '.join(command)}\nexit {proc.returncode}, stdout is not JSON:\n"
            f"{proc.stdout}\nstderr: {proc.stderr}"
        )
    assert isinstance(out, dict), proc.stdout
    return Run(proc.returncode, out, command, proc.stderr, took)


@pytest.fixture(scope="module")
def scenario() -> Scenario:
    """A new random world for this run (FOREIGN_DNS_SEED replays one)."""
    return generate_scenario()


@pytest.fixture(scope="module")
def nsd_binary() -> str:
    """NSD, installed if need be; under CI a failure to install fails."""
    try:
        return ensure_nsd()
    except NSDUnavailable as exc:
        if IN_CI:
            pytest.fail(f"CI=true and NSD could not be installed: {exc}")
        pytest.skip(f"NSD (Debian package nsd) is not installed and cannot be installed: {exc}")


@pytest.fixture(scope="module")
def nsd(nsd_binary: str, scenario: Scenario) -> Iterator[NSDServer]:
    """NSD serving the scenario's zones on loopback (a failure to start always fails)."""
    try:
        server = NSDServer(scenario.zones, nsd=nsd_binary).start()
    except (RuntimeError, OSError) as exc:
        pytest.fail(f"NSD did not start\n{scenario.describe()}\n{exc}")
    try:
        yield server
    finally:
        server.stop()


def judge(nsd: NSDServer, scenario: Scenario, key: str) -> tuple[Run, str]:
    """Run the dry-run for one case; also return the context for failure messages."""
    case = scenario.cases[key]
    run = check(nsd.nameserver, case.ip, case.helo)
    why = f"{scenario.describe(key)}\n{run.show()}"
    assert not run.temp_answers(), f"TEMP answers {run.temp_answers()}\n{why}"
    return run, why


def test_nsd_answers_as_the_zones_say(nsd: NSDServer, scenario: Scenario) -> None:
    """NSD gives every answer the scenario was built on (else blame the zones, not heloguard)."""
    problems = ask_all(nsd, scenario.expectations)
    assert not problems, f"{scenario.describe()}\n" + "\n".join(problems)


def test_bot_rejected(nsd: NSDServer, scenario: Scenario) -> None:
    run, why = judge(nsd, scenario, "bot")
    assert run.code == 5, why
    assert run.out["verdict"] == "reject", why
    assert run.out["reply"].startswith("550 5.7."), why  # generic (5.7.1) or fcrdns (5.7.25)
    found = run.results()
    assert found.get("fcrdns") == "fail", why
    assert found.get("helo_matches") == "fail", why


@pytest.mark.parametrize("key", ["ipv4", "ipv6", "same-domain"])
def test_well_run_server_accepted(nsd: NSDServer, scenario: Scenario, key: str) -> None:
    run, why = judge(nsd, scenario, key)
    assert run.code == 0, why
    assert run.out["verdict"] == "accept", why
    assert run.out["reply"] is None, why
    assert run.out["rules"], why
    assert set(run.results().values()) <= {"pass", "skip"}, why


def test_helo_that_does_not_resolve_rejected(nsd: NSDServer, scenario: Scenario) -> None:
    run, why = judge(nsd, scenario, "nohost")
    assert run.code == 5, why
    assert run.out["verdict"] == "reject", why
    assert run.out["rule"] == "helo_resolves", why
    assert run.results().get("helo_resolves") == "fail", why


def test_stopped_nsd_gives_4xx_never_5xx(nsd_binary: str, scenario: Scenario) -> None:
    """A DNS server that has gone away defers the client: 451, exit 4, promptly."""
    case = scenario.cases["ipv4"]
    try:
        server = NSDServer(scenario.zones, nsd=nsd_binary).start()
    except (RuntimeError, OSError) as exc:
        pytest.fail(f"NSD did not start\n{scenario.describe()}\n{exc}")
    try:
        alive = check(server.nameserver, case.ip, case.helo)
        assert alive.code == 0, f"{scenario.describe('ipv4')}\n{alive.show()}"
    finally:
        server.stop()
    assert not server.running
    run = check(server.nameserver, case.ip, case.helo)
    why = f"{scenario.describe('ipv4')}\n(NSD stopped)\n{run.show()}"
    assert run.code == 4, why
    assert run.out["verdict"] == "tempfail", why
    assert run.out["reply"].startswith("451 "), why
    assert run.took < 15, why
