"""Privileges: the user, groups and umask heloguard runs with, its socket, and
warnings about files anyone may write.

The tests start ``heloguard serve`` as root (as CI and this machine run
them) and look at the running process in /proc: every thread, since the
resolver's and the metrics server's threads start before the privilege drop.
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import signal
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from miltertest import run_session

from mta.common import free_port

pytestmark = pytest.mark.integration

GOOD: dict[str, Any] = {"ip": "64.71.1.10", "helo": "ukiah.firemountain.net"}
WARNING = "is world-writable: anyone could change heloguard's behaviour"


@pytest.fixture(autouse=True)
def needs_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("starting as root and dropping privileges needs root")


@pytest.fixture
def public_dir() -> Iterator[Path]:
    """A folder the unprivileged daemon can enter and read (its config lives there)."""
    folder = Path(tempfile.mkdtemp(prefix="hg-priv-"))
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def status_fields(pid: int | str, task: str | None = None) -> dict[str, list[str]]:
    path = Path(f"/proc/{pid}/task/{task}/status" if task else f"/proc/{pid}/status")
    out: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        key, _, value = line.partition(":")
        out[key] = value.split()
    return out


@pytest.mark.parametrize(
    ("user", "group", "mode"),
    [("nobody", "nogroup", "0660"), ("nobody", "", "0600"), ("daemon", "nogroup", "0666")],
    ids=["user-and-group", "primary-group", "other-user"],
)
def test_runs_as_the_configured_user_in_every_thread(
    start_milter: Any, public_dir: Path, user: str, group: str, mode: str
) -> None:
    pw = pwd.getpwnam(user)
    gid = grp.getgrnam(group).gr_gid if group else pw.pw_gid
    port = free_port()
    m = start_milter(
        {
            "milter": {"user": user, "group": group, "socket_mode": mode},
            "metrics": {"listen": f"127.0.0.1:{port}"},  # one more thread started as root
        },
        workdir=public_dir,
    )
    m.config_path.chmod(0o644)
    log = m.wait_for("running as")
    assert f"running as {user}:{group or grp.getgrgid(gid).gr_name}" in log
    tasks = sorted(p.name for p in Path(f"/proc/{m.proc.pid}/task").iterdir())
    assert len(tasks) >= 3, tasks  # libmilter, the resolver, the metrics server at least
    for task in tasks:
        st = status_fields(m.proc.pid, task)
        assert set(st["Uid"]) == {str(pw.pw_uid)}, (task, st["Uid"])  # real, effective, saved, fs
        assert set(st["Gid"]) == {str(gid)}, (task, st["Gid"])
        assert st["Groups"] == [], (task, st["Groups"])  # no supplementary group kept
        assert st["CapEff"] == ["0000000000000000"], (task, st["CapEff"])
        assert st["Umask"] == ["0007"], (task, st["Umask"])
    sock = Path(m.socket.split(":", 1)[1])
    sst = sock.stat()
    assert stat.S_ISSOCK(sst.st_mode)
    assert stat.S_IMODE(sst.st_mode) == int(mode, 8)
    if group:
        assert sst.st_gid == gid
    assert run_session(m.socket, **GOOD).refusal() is None, "it works unprivileged"


def test_privileges_cannot_be_regained(start_milter: Any, public_dir: Path) -> None:
    """The drop is for good: real and saved uid are the user too (checked in every thread
    above); and a file only root may read stays unreadable to the running daemon."""
    secret = public_dir / "root-only.toml"
    secret.write_text('[policy]\nmode = "warn"\n')
    secret.chmod(0o600)
    m = start_milter({"milter": {"user": "nobody", "group": "nogroup"}}, workdir=public_dir)
    m.config_path.chmod(0o644)
    m.wait_for("running as nobody:nogroup")
    offset = len(m.log())
    # point the running daemon at a config it may not read: the reload must fail
    m.config_path.write_text(m.config_path.read_text() + f'\n[exceptions]\nfiles = ["{secret}"]\n')
    m.wait_for("reload failed, keeping the running configuration", timeout=10, start=offset)
    assert "Permission denied" in m.log()[offset:]


def test_world_writable_files_are_warned_about(start_milter: Any, public_dir: Path) -> None:
    state = public_dir / "state"
    state.mkdir()
    lists = public_dir / "exceptions.txt"
    lists.write_text("192.0.2.0/24\n")
    database = state / "grey.sqlite"
    records = state / "decisions.jsonl"
    config = {
        "greylist": {"database": str(database)},
        "log": {"decisions": str(records)},
        "exceptions": {"files": [str(lists)]},
    }
    quiet = start_milter(config, workdir=public_dir)
    assert WARNING not in quiet.log(), quiet.log()
    quiet.stop(signal.SIGKILL)
    for f in (lists, database, records):
        f.chmod(0o666)
    loud = start_milter(config, workdir=public_dir)
    log = loud.wait_for(WARNING)
    for f in (lists, database, records):
        assert f"{f} {WARNING}" in log, (f, log)
    assert f"{loud.config_path} {WARNING}" not in log, "the config itself is not world-writable"
    loud.stop(signal.SIGKILL)
    # the config, and a folder anyone may write in (a file there can be replaced)
    for f in (lists, database, records):
        f.chmod(0o644)
    loud.config_path.chmod(0o666)
    state.chmod(0o777)
    again = start_milter(config, workdir=public_dir)
    log = again.wait_for(WARNING)
    assert f"{again.config_path} {WARNING}" in log, log
    assert f"{state} {WARNING}" in log, log
    assert f"{database} {WARNING}" not in log, log
    again.stop(signal.SIGKILL)
    state.chmod(0o1777)  # sticky, as /tmp: others cannot replace files they do not own
    again.config_path.chmod(0o644)
    last = start_milter(config, workdir=public_dir)
    assert WARNING not in last.log(), last.log()
