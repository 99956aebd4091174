"""[milter] cpus: the CPU list syntax, the choice, and the running daemon's threads."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pytest
from miltertest import run_session

from heloguard import cpus
from heloguard.config import ConfigError, load

from conftest import run_cli, write_toml

GOOD: dict[str, Any] = {"ip": "64.71.1.10", "helo": "ukiah.firemountain.net"}


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("0", {0}),
        ("3", {3}),
        ("2,3", {2, 3}),
        ("0-3", {0, 1, 2, 3}),
        ("0-2,6", {0, 1, 2, 6}),
        ("1, 4-5", {1, 4, 5}),
        ("5-5", {5}),
    ],
)
def test_cpu_list(spec: str, expected: set[int]) -> None:
    assert cpus.parse_list(spec) == expected


@pytest.mark.parametrize(
    ("spec", "why"),
    [
        ("", "expected"),
        ("x", "expected"),
        ("-1", "expected"),
        ("1-", "expected"),
        ("1,,2", "expected"),
        ("ONE", "expected"),
        ("3-1", "runs backwards"),
        ("0-99999999", "beyond"),
    ],
)
def test_bad_cpu_list(spec: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        cpus.validate(spec)


@pytest.mark.parametrize(
    ("spec", "allowed", "expected"),
    [
        ("one", {0, 1}, {1}),
        ("one", {0}, {0}),
        ("one", {2, 5, 7}, {7}),  # a cpuset or CPUAffinity= narrowed it first
        ("all", {0, 1}, None),
        ("0", {0, 1}, {0}),
        ("0-1", {0, 1, 2}, {0, 1}),
    ],
)
def test_choice(spec: str, allowed: set[int], expected: set[int] | None) -> None:
    assert cpus.choose(spec, frozenset(allowed)) == expected


def test_a_cpu_the_process_may_not_use_is_refused() -> None:
    why = r"CPU 4,9 is not among those this process may use \(0-3\)"
    with pytest.raises(ValueError, match=why):
        cpus.choose("2-4,9", frozenset({0, 1, 2, 3}))


@pytest.mark.parametrize(
    ("cpu_set", "text"),
    [({0}, "0"), ({0, 1, 2, 5}, "0-2,5"), ({1, 3, 4, 5, 9, 10}, "1,3-5,9-10")],
)
def test_format(cpu_set: set[int], text: str) -> None:
    assert cpus.format_list(frozenset(cpu_set)) == text
    assert cpus.parse_list(text) == cpu_set


def test_a_refused_affinity(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(pid: int, mask: object) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "sched_setaffinity", refuse)
    assert "but the system refused" in cpus.pin("one")  # the default starts anyway
    with pytest.raises(ValueError, match="cannot run on CPU 0"):
        cpus.pin("0")
    assert cpus.pin("all").startswith("on CPUs ")  # asks nothing of the system


def test_config_names_the_key(tmp_path: Path) -> None:
    path = write_toml(tmp_path / "h.toml", {"milter": {"cpus": "1-0"}})
    with pytest.raises(ConfigError, match=r"milter: cpus '1-0': range 1-0 runs backwards"):
        load(path)
    assert load(None).milter.cpus == "one"


# -- the daemon -----------------------------------------------------------------


def _thread_cpus(pid: int) -> dict[str, str]:
    """Each thread's name and allowed CPU list, from /proc.  A connection's thread
    ends with its connection (contrib/libmilter.py), so one may go while it is read."""
    out = {}
    for task in sorted(Path(f"/proc/{pid}/task").iterdir()):
        try:
            lines = (task / "status").read_text().splitlines()
        except (FileNotFoundError, ProcessLookupError):
            continue
        status = dict(line.split(":\t", 1) for line in lines if ":\t" in line)
        out[f"{task.name} {status['Name'].strip()}"] = status["Cpus_allowed_list"].strip()
    return out


OWN = frozenset(os.sched_getaffinity(0))


@pytest.mark.integration
@pytest.mark.parametrize(
    ("setting", "expected"),
    [
        (None, cpus.format_list(frozenset({max(OWN)}))),  # the default: one CPU
        ("all", cpus.format_list(OWN)),
        (str(min(OWN)), str(min(OWN))),
    ],
)
def test_every_thread_runs_where_cpus_says(
    start_milter: Any, setting: str | None, expected: str
) -> None:
    m = start_milter({"milter": {"cpus": setting}} if setting else None)
    # sessions make libmilter start its threads; all of them inherit the choice
    r = run_session(m.socket, **GOOD)
    assert r.refusal() is None and r.mail is not None and r.mail.code == "a", r
    threads = _thread_cpus(m.proc.pid)
    assert len(threads) >= 3, threads  # main, log writer, resolver at least
    assert set(threads.values()) == {expected}, threads
    assert re.search(rf"running on CPUs? {re.escape(expected)}\b", m.log()), m.log()


@pytest.mark.integration
def test_a_cpu_not_allowed_stops_the_start(tmp_path: Path) -> None:
    beyond = max(OWN) + 1
    path = write_toml(
        tmp_path / "h.toml",
        {"milter": {"socket": f"unix:{tmp_path}/h.sock", "cpus": str(beyond)}},
    )
    res = run_cli("serve", "--config", str(path), timeout=30)
    assert res.code == 78, res.stderr
    assert f"cpus '{beyond}': CPU {beyond} is not among those this process may use" in res.stderr
    assert not (tmp_path / "h.sock").exists()
