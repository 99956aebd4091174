"""A throwaway PostgreSQL server for tests: a cluster in a temporary folder.

It uses Debian's PostgreSQL binaries (the ``postgresql`` package: initdb and
postgres under /usr/lib/postgresql/VERSION/bin), never the system's cluster.
The cluster lives in a fresh temporary folder and listens on loopback only:
a unix socket in that folder and 127.0.0.1 on a free port, with ``trust``
authentication for the superuser ``postgres``.  It is tuned for tests, never
for data: no fsync (a crash of the server keeps every commit, in the page
cache; a crash of the machine would not).

initdb and postgres refuse to run as root.  Run as root (as CI is), the
folder is handed to the ``postgres`` user and both run as that user through
``setpriv``; run as anyone else, they run as that user.  The server is the
direct child of the test process (setpriv execs it) with a parent-death
signal, so a test run that dies does not leave it behind.

In a test::

    server = pgserver.shared()            # one cluster per test session
    dsn = server.create_database("t1")    # a fresh database per test
    server.stop()                         # fast shutdown (clients are cut off)
    server.start()                        # same folder, port and socket
    server.freeze(); server.thaw()        # SIGSTOP/SIGCONT every server process

``shared()`` raises :class:`Unavailable` when the binaries (or, as root, the
``postgres`` user) are missing; the tests turn that into a failure under
``CI=true`` and a skip elsewhere.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import psycopg

BINDIRS = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: int(p.parent.name))
SUPERUSER = "postgres"
IN_CI = os.environ.get("CI") == "true"


class Unavailable(RuntimeError):
    """PostgreSQL cannot be run here (binaries or the postgres user missing)."""


def bindir() -> Path:
    """The newest installed PostgreSQL's binaries (initdb and postgres)."""
    for d in reversed(BINDIRS):
        if (d / "initdb").exists() and (d / "postgres").exists():
            return d
    found = shutil.which("initdb")
    if found and shutil.which("postgres"):
        return Path(found).parent
    raise Unavailable(
        "PostgreSQL is not installed (no initdb/postgres under /usr/lib/postgresql/*/bin): "
        "apt-get install postgresql"
    )


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class PgServer:
    """One PostgreSQL cluster in a temporary folder, started and stopped at will."""

    def __init__(self) -> None:
        self.bin = bindir()
        self.as_root = os.geteuid() == 0
        if self.as_root:
            try:
                self.owner = pwd.getpwnam("postgres")
            except KeyError:
                raise Unavailable(
                    "running as root and there is no postgres user (Debian's postgresql "
                    "package creates it)"
                ) from None
        else:
            self.owner = pwd.getpwuid(os.geteuid())
        self.root = Path(tempfile.mkdtemp(prefix="hg-pg-"))
        self.data = self.root / "data"
        self.sockdir = self.root / "sock"
        self.log = self.root / "postgres.log"
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()
        self._count = 0
        self.root.chmod(0o755)
        self.sockdir.mkdir()
        if self.as_root:
            for p in (self.root, self.sockdir):
                os.chown(p, self.owner.pw_uid, self.owner.pw_gid)
        self._initdb()

    # -- running as the right user --------------------------------------------

    def _argv(self, *argv: str) -> list[str]:
        """argv run as the cluster's owner, killed if the test process dies."""
        prefix = ["setpriv", "--pdeathsig", "SIGKILL"]
        if self.as_root:
            prefix += ["--reuid", self.owner.pw_name, "--regid", str(self.owner.pw_gid)]
            prefix += ["--init-groups"]
        return [*prefix, "--", *argv]

    def _initdb(self) -> None:
        proc = subprocess.run(
            self._argv(
                str(self.bin / "initdb"),
                "-D",
                str(self.data),
                "-U",
                SUPERUSER,
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",
            ),
            capture_output=True,
            text=True,
            cwd=self.root,
            env=self._env(),
            timeout=120,
            check=False,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"initdb failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env["HOME"] = str(self.root)
        env["LC_ALL"] = "C"
        return env

    # -- life cycle -------------------------------------------------------------

    def start(self, timeout: float = 60) -> None:
        """Start postgres (same folder, port and socket as before) and wait until it answers."""
        if self.proc is not None and self.proc.poll() is None:
            return
        self._log = self.log.open("ab")
        self.proc = subprocess.Popen(
            self._argv(
                str(self.bin / "postgres"),
                "-D",
                str(self.data),
                "-p",
                str(self.port),
                "-k",
                str(self.sockdir),
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "fsync=off",
                "-c",
                "full_page_writes=off",
                "-c",
                "max_connections=200",
                "-c",
                "shared_buffers=64MB",
            ),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=self.root,
            env=self._env(),
        )
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"postgres exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                with psycopg.connect(self.dsn("postgres"), connect_timeout=2):
                    return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"postgres did not start:\n{self.tail()}") from None
                time.sleep(0.05)

    def stop(self, mode: str = "fast") -> None:
        """Stop the server: "fast" (SIGINT) disconnects clients, "immediate" (SIGQUIT) crashes."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        self.thaw()
        proc.send_signal(signal.SIGQUIT if mode == "immediate" else signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        self._log.close()
        self.proc = None

    def running(self) -> bool:
        """Whether postgres runs."""
        return self.proc is not None and self.proc.poll() is None

    def pids(self) -> list[int]:
        """postgres and every process it started."""
        if self.proc is None:
            return []
        top = self.proc.pid
        children: list[int] = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == top:
                children.append(int(stat.parent.name))
        return [top, *children]

    def freeze(self) -> None:
        """Stop every server process (SIGSTOP): connections stay open and nothing answers."""
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)

    def thaw(self) -> None:
        """Undo freeze()."""
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)

    def version(self) -> str:
        """The server's version, such as "15.14"."""
        with psycopg.connect(self.dsn("postgres")) as conn:
            row = conn.execute("SHOW server_version").fetchone()
        return str(row[0]).split()[0] if row else "unknown"

    def destroy(self) -> None:
        """Stop the server and remove its folder."""
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def tail(self, lines: int = 30) -> str:
        """The end of the server's log."""
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    # -- databases --------------------------------------------------------------

    def dsn(self, dbname: str, *, tcp: bool = False) -> str:
        """A libpq connection string for a database (unix socket, or TCP on loopback)."""
        host = "127.0.0.1" if tcp else str(self.sockdir)
        return f"host={host} port={self.port} dbname={dbname} user={SUPERUSER}"

    def create_database(self, prefix: str = "t") -> str:
        """A new empty database; returns its DSN."""
        with self._lock:
            self._count += 1
            name = f"{prefix}_{os.getpid()}_{self._count}"
        with psycopg.connect(self.dsn("postgres"), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}" TEMPLATE template0 STRATEGY file_copy')
        return self.dsn(name)

    def drop_database(self, dsn: str) -> None:
        """Drop a database made by create_database, disconnecting whoever is still in it."""
        name = dict(p.split("=", 1) for p in dsn.split())["dbname"]
        if not self.running():
            return
        with psycopg.connect(self.dsn("postgres"), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def __enter__(self) -> PgServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.destroy()


_shared: PgServer | None = None
_shared_error: str = ""


def shared() -> PgServer:
    """The test session's one server, started on first use and removed at exit."""
    global _shared, _shared_error  # noqa: PLW0603 - one cluster per test process
    if _shared_error:
        raise Unavailable(_shared_error)
    if _shared is None:
        try:
            server = PgServer()
        except Unavailable as exc:
            _shared_error = str(exc)
            raise
        atexit.register(server.destroy)
        _shared = server
    if not _shared.running():
        _shared.start()
    return _shared


def require() -> PgServer:
    """shared(), or: fail under CI=true (PostgreSQL must be there), skip elsewhere."""
    import pytest

    try:
        return shared()
    except Unavailable as exc:
        if IN_CI:
            pytest.fail(f"{exc}; CI=true requires the PostgreSQL tests to run")
        pytest.skip(str(exc))
