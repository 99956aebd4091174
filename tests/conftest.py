"""Shared fixtures: the test DNS server on loopback, resolvers pointed at it,
and a runner for the real ``heloguard`` command line.

tests/ is not a package and PYTHONSAFEPATH keeps it off sys.path, so the
helper modules here (dnsserver, mta/...) are made importable explicitly.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

from heloguard.logsink import BATCH_WAIT  # noqa: E402
from heloguard.resolver import Resolver, ResolverSettings  # noqa: E402

from dnsserver import DNSServer  # noqa: E402
from whatif_mail import DeliveredMail, deliver_mail  # noqa: E402

ZONES = TESTS / "zones"
HELOGUARD = [sys.executable, "-m", "heloguard.cli"]


@pytest.fixture(scope="session")
def zones_server() -> Iterator[DNSServer]:
    """One DNS server for the session, serving tests/zones/ on loopback."""
    with DNSServer(ZONES) as server:
        yield server


@pytest.fixture(scope="session")
def delivered_mail(
    zones_server: DNSServer, tmp_path_factory: pytest.TempPathFactory
) -> DeliveredMail:
    """Mail really delivered by a private Postfix and Sendmail, and Postfix's log
    (tests/whatif_mail.py): a ``whatif_mail.DeliveredMail``.

    Needs root and the MTAs: with CI=true a setup failure fails, elsewhere it skips.
    """
    from mta.common import MTASetupError, is_ci

    reason = "needs root (a private Postfix and Sendmail)" if os.geteuid() != 0 else ""
    if not reason:
        try:
            return deliver_mail(tmp_path_factory.mktemp("whatif-mail"), zones_server)
        except (MTASetupError, OSError, subprocess.SubprocessError) as exc:
            reason = f"the MTAs could not be set up: {exc}"
    if is_ci():
        pytest.fail(f"CI=true: {reason}")
    pytest.skip(reason)


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


def toml_value(v: Any) -> str:
    """A TOML literal for a test config value."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return json.dumps(v)


def write_toml(path: Path, data: Mapping[str, Any]) -> Path:
    """Write a config: top-level tables, and nested tables such as [rules.fcrdns]."""
    lines: list[str] = []

    def table(name: str, body: Mapping[str, Any]) -> None:
        plain = {k: v for k, v in body.items() if not isinstance(v, Mapping)}
        lines.append(f"[{name}]")
        lines.extend(f"{k} = {toml_value(v)}" for k, v in plain.items())
        lines.append("")
        for k, v in body.items():
            if isinstance(v, Mapping):
                table(f"{name}.{k}", v)

    for name, body in data.items():
        table(name, body)
    path.write_text("\n".join(lines))
    return path


class MilterProcess:
    """A ``heloguard serve`` started by a test; its stderr is its log."""

    replayable: bool = True
    config_text: str = ""

    def __init__(
        self, workdir: Path, config: Mapping[str, Any], argv_prefix: list[str] | None = None
    ) -> None:
        self.workdir = workdir
        self.socket = f"unix:{workdir / 'heloguard.sock'}"
        milter_cfg = dict(config.get("milter", {}))
        milter_cfg.setdefault("socket", self.socket)
        self.socket = milter_cfg["socket"]
        full = {**config, "milter": milter_cfg}
        self.config_path = write_toml(workdir / "heloguard.toml", full)
        self.log_path = workdir / "heloguard.log"
        self._log = self.log_path.open("w")
        cmd = [*(argv_prefix or HELOGUARD), "serve", "--config", str(self.config_path)]
        self.proc = subprocess.Popen(
            cmd,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=dict(os.environ, PYTHONSAFEPATH="1"),
            cwd=ROOT,
        )
        self.wait_for("listening on", timeout=20)

    def log(self) -> str:
        """Everything the daemon logged so far.

        The daemon writes its log lines in batches, a moment after the decision
        (heloguard.logsink): wait until the file has been quiet for longer than
        a batch, so a line of a session that just ended is in.
        """
        size, deadline = -1, time.monotonic() + 3
        while True:
            now = self.log_path.stat().st_size
            if now == size or self.proc.poll() is not None or time.monotonic() > deadline:
                return self._read()
            size = now
            time.sleep(3 * BATCH_WAIT)

    def _read(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for(self, text: str, timeout: float = 10, start: int = 0) -> str:
        """Wait until ``text`` appears in the log (after offset ``start``)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            log = self._read()
            if text in log[start:]:
                return log
            if self.proc.poll() is not None:
                raise RuntimeError(f"heloguard exited with {self.proc.returncode}:\n{log}")
            time.sleep(0.05)
        raise TimeoutError(f"{text!r} not logged within {timeout}s:\n{self._read()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        """Stop the daemon and return its exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


@pytest.fixture
def start_milter(tmp_path: Path, dns_server: DNSServer) -> Iterator[Any]:
    """``start_milter(config_dict)`` runs heloguard serve against the test DNS server."""
    started: list[MilterProcess] = []

    def start(
        config: Mapping[str, Any] | None = None, workdir: Path | None = None, **kw: Any
    ) -> MilterProcess:
        cfg = {k: dict(v) for k, v in (config or {}).items()}
        dns_cfg = cfg.setdefault("dns", {})
        dns_cfg.setdefault("nameservers", [dns_server.nameserver])
        dns_cfg.setdefault("timeout", 1)
        dns_cfg.setdefault("budget", 3)
        if workdir is None:
            workdir = tmp_path / f"milter{len(started)}"
            workdir.mkdir()
        # every daemon a test starts records its decisions; teardown replays them
        cfg.setdefault("log", {}).setdefault("decisions", str(workdir / "decisions.jsonl"))
        proc = MilterProcess(workdir, cfg, **kw)
        proc.replayable = "argv_prefix" not in kw  # an injected fault is not in the record
        proc.config_text = proc.config_path.read_text()
        started.append(proc)
        return proc

    yield start
    # libmilter takes seconds to wind down after SIGTERM; a clean stop has its
    # own test (test_sigterm_exits_cleanly), so teardown just kills.
    for proc in started:
        proc.stop(signal.SIGKILL)
    for proc in started:
        assert_replays(proc)


def assert_replays(proc: MilterProcess) -> None:
    """Every decision the daemon recorded replays offline to the identical verdict.

    Skipped for a daemon whose config changed during the test (a reload test:
    its early records were made under the old config) or that ran with an
    injected fault.
    """
    records = proc.workdir / "decisions.jsonl"
    if not proc.replayable or not records.exists() or not records.read_text().strip():
        return
    if not proc.config_path.exists() or proc.config_path.read_text() != proc.config_text:
        return
    res = run_cli(
        "check",
        "--json",
        "--config",
        str(proc.config_path),
        "--nameserver",
        "127.0.0.1:9",
        "--replay",
        str(records),
    )
    if res.code == 78:
        return  # the test broke a file the config names, on purpose (a reload test)
    text = records.read_text()
    lines = [line for line in text.splitlines() if line.strip()]
    replays = res.lines()
    assert res.code in (0, 4, 5), ("replay failed", res.code, res.stderr)
    # teardown kills with SIGKILL, which can cut the record being written short;
    # only that one, the last line, may be skipped
    cut = res.stderr.count("record cut short")
    assert cut == 0 or (cut == 1 and not text.endswith("\n")), ("records cut short", res.stderr)
    assert len(replays) + cut == len(lines), ("replay skipped records", len(replays), len(lines))
    for out in replays:
        assert out["replay"]["identical"], ("a recorded decision replays differently", out)
