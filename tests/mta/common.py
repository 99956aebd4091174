"""Shared bits of the MTA harness: Debian packages, polling, ports, processes."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterable
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CACHE_DIR = Path(os.environ.get("HELOGUARD_TEST_CACHE", REPO / ".cache"))
SBIN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class MTASetupError(RuntimeError):
    """An MTA (or what it needs) could not be installed, configured or started."""


def is_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def deb_installed(package: str) -> bool:
    res = subprocess.run(
        ["dpkg-query", "-W", "-f=${Status}", package],
        capture_output=True,
        text=True,
        check=False,
    )
    return res.returncode == 0 and res.stdout.endswith("ok installed")


def _apt(
    args: list[str], timeout: float, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    # dpkg refuses to run without the sbin directories on PATH
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive", PATH=SBIN_PATH)
    return subprocess.run(
        ["apt-get", *args],
        capture_output=True,
        text=True,
        check=False,
        env=env,
        timeout=timeout,
        cwd=cwd,
    )


def apt_run(args: list[str], *, timeout: float = 600, cwd: Path | None = None) -> None:
    """apt-get ARGS; on failure run ``apt-get update`` once and retry (fresh machines)."""
    if os.geteuid() != 0:
        raise MTASetupError(f"apt-get {' '.join(args)}: needs root")
    if shutil.which("apt-get", path=SBIN_PATH) is None:
        raise MTASetupError("apt-get not found: not a Debian machine")
    res = _apt(args, timeout, cwd)
    if res.returncode != 0:
        upd = _apt(["update", "-qq"], timeout)
        if upd.returncode != 0:
            raise MTASetupError(f"apt-get update failed:\n{upd.stderr}")
        res = _apt(args, timeout, cwd)
    if res.returncode != 0:
        raise MTASetupError(f"apt-get {' '.join(args)} failed:\n{res.stdout}\n{res.stderr}")


def apt_install(packages: Iterable[str], *, preseed: Iterable[str] = ()) -> list[str]:
    """Install the Debian packages that are missing; returns those it installed."""
    missing = [p for p in packages if not deb_installed(p)]
    if not missing:
        return []
    lines = "".join(f"{line}\n" for line in preseed)
    if lines:
        subprocess.run(
            ["debconf-set-selections"],
            input=lines,
            text=True,
            check=True,
            env=dict(os.environ, PATH=SBIN_PATH),
        )
    apt_run(["install", "-y", "-qq", "--no-install-recommends", *missing])
    return missing


def wait_until(
    check: Callable[[], bool],
    *,
    timeout: float,
    what: str,
    interval: float = 0.02,
    alive: Callable[[], str | None] | None = None,
) -> None:
    """Poll check() until it is true; MTASetupError after timeout seconds.

    ``alive`` may return a reason string when waiting is pointless (the process
    died), which stops the wait at once.
    """
    deadline = time.monotonic() + timeout
    while True:
        if check():
            return
        if alive is not None and (dead := alive()) is not None:
            raise MTASetupError(f"while waiting for {what}: {dead}")
        if time.monotonic() > deadline:
            raise MTASetupError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)
        interval = min(interval * 1.5, 0.2)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on host right now (the usual small race applies)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def _tcp_listeners(proc_net: Path) -> set[tuple[str, int]]:
    """(hex address, port) pairs in LISTEN state from a /proc/.../net/tcp{,6} file."""
    found: set[tuple[str, int]] = set()
    try:
        rows = proc_net.read_text().splitlines()[1:]
    except OSError:
        return found
    for row in rows:
        cols = row.split()
        if len(cols) > 3 and cols[3] == "0A":  # TCP_LISTEN
            addr, port = cols[1].split(":")
            found.add((addr, int(port, 16)))
    return found


def tcp_listening(port: int, *, ipv6: bool = False, pid: int | str = "self") -> bool:
    """Is something listening on TCP port in the network namespace of process pid?

    Reads /proc/PID/net/tcp(6), so it opens no connection (an MTA would
    otherwise run a whole milter session for the probe).
    """
    table = Path(f"/proc/{pid}/net/{'tcp6' if ipv6 else 'tcp'}")
    return any(p == port for _, p in _tcp_listeners(table))


def descendants(pid: int) -> list[int]:
    """All live descendants of pid (children first), from /proc."""
    out: list[int] = []
    todo = [pid]
    while todo:
        parent = todo.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            try:
                kids = (task / "children").read_text().split()
            except OSError:
                continue
            for k in kids:
                out.append(int(k))
                todo.append(int(k))
    return out


def pid_alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    # a zombie has exited already; it only waits for its parent to reap it
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def kill_all(pids: Iterable[int], sig: signal.Signals = signal.SIGKILL) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
