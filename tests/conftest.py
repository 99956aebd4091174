"""Shared fixtures: the test DNS server on loopback, resolvers pointed at it,
and a runner for the real ``heloguard`` command line.

tests/ is not a package and PYTHONSAFEPATH keeps it off sys.path, so the
helper modules here (dnsserver, mta/...) are made importable explicitly.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

from heloguard.resolver import Resolver, ResolverSettings  # noqa: E402

from dnsserver import DNSServer  # noqa: E402

ZONES = TESTS / "zones"
HELOGUARD = [sys.executable, "-m", "heloguard.cli"]


@pytest.fixture(scope="session")
def zones_server() -> Iterator[DNSServer]:
    """One DNS server for the session, serving tests/zones/ on loopback."""
    with DNSServer(ZONES) as server:
        yield server


@pytest.fixture
def dns_server(zones_server: DNSServer) -> Iterator[DNSServer]:
    """The session's DNS server, with faults, latency and the query log reset."""
    zones_server.clear_faults()
    zones_server.latency = 0.0
    zones_server.reset_log()
    yield zones_server
    zones_server.clear_faults()
    zones_server.latency = 0.0


@pytest.fixture
def make_resolver(dns_server: DNSServer) -> Iterator[Any]:
    """A factory of fresh resolvers (empty caches) pointed at the test server."""
    made: list[Resolver] = []

    def factory(**kw: Any) -> Resolver:
        kw.setdefault("nameservers", ((dns_server.host, dns_server.port),))
        kw.setdefault("timeout", 1.0)
        clock = kw.pop("clock", None)
        res = Resolver(ResolverSettings(**kw), **({"clock": clock} if clock else {}))
        made.append(res.start())
        return res

    yield factory
    for res in made:
        res.close()


@dataclass
class CliResult:
    """What a run of the real command line gave."""

    code: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        return json.loads(self.stdout)

    def lines(self) -> list[Any]:
        return [json.loads(line) for line in self.stdout.splitlines() if line.strip()]


def run_cli(*args: str, stdin: str | None = None, timeout: float = 60) -> CliResult:
    """Run ``heloguard ARGS`` as a subprocess, as an admin would."""
    env = dict(os.environ, PYTHONSAFEPATH="1")
    proc = subprocess.run(
        [*HELOGUARD, *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=ROOT,
        check=False,
    )
    return CliResult(proc.returncode, proc.stdout, proc.stderr)


@pytest.fixture
def cli(dns_server: DNSServer) -> Any:
    """``cli(*args)`` runs ``heloguard`` with ``--nameserver`` set to the test server."""

    def call(command: str, *args: str, stdin: str | None = None, timeout: float = 60) -> CliResult:
        return run_cli(
            command, "--nameserver", dns_server.nameserver, *args, stdin=stdin, timeout=timeout
        )

    return call
