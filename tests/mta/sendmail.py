"""A private, throw-away Sendmail 8.17 that hands every session to a milter.

    with PrivateSendmail("unix:/tmp/x/milter.sock") as sm:
        t = sm.session(addr="203.0.113.5", helo="bot.example.test",
                       mail_from="a@example.test", rcpt_to="b@example.test")

Debian's sendmail-bin conflicts with postfix, so it is never installed: its
packages are unpacked (``dpkg -x``) into a private root under ``.cache/``
(``ensure_sendmail``), and Sendmail runs from there with its own ``.cf``, built
from an ``.mc`` with that root's m4 and cf macros.

Sendmail has no XCLIENT, so a test presents a client address by really
connecting from it.  Sendmail runs inside new network, mount, UTS and PID
namespaces (``unshare``):

* network: only ``lo``, with ``local`` routes for every IPv4 and IPv6
  address, so a client socket created in that namespace
  (``netns.entered(sm.netns_path)``, done for you by ``session()``) can bind
  any test address (IPv6 also needs IP_FREEBIND) and connect to Sendmail on
  127.0.0.1 or ::1; Sendmail's peer address is then exactly that address.
  Nothing in there can reach any other network.
* UTS: host name ``mx.example.test`` (an unqualified one stalls start-up 60 s).
* mount: private ``/etc/hosts``, ``/etc/nsswitch.conf`` (hosts: files dns;
  a running nscd is hidden) and ``/etc/resolv.conf`` (``nameserver
  127.0.0.1``, 1 s timeout, 1 attempt: the client's PTR lookup fails at once,
  ``{client_resolve}`` = TEMP, unless a test runs a DNS server on 127.0.0.1:53
  *inside* the namespace), and a tiny private ``/dev`` whose ``/dev/log``
  leads to a syslog receiver in this process, so ``log()`` has Sendmail's log.
* PID: Sendmail is PID 1 there, so when it dies the kernel kills every child;
  ``unshare`` runs with ``--kill-child`` and ``setpriv --pdeathsig`` so even a
  killed test run leaves nothing behind.  When the last process is gone the
  namespaces are gone.

To let Sendmail resolve client addresses (its PTR lookup, ``{client_ptr}``,
``{client_resolve}`` and the connect hostname), run the test DNS server inside
the namespace on 127.0.0.1:53, e.g. ``with sm.in_netns(): dns =
DNSServer(zone_dir=..., host="127.0.0.1", port=53).start()`` (its sockets and
thread are created in there); tried: 103.245.153.249 then shows ``{client_ptr}``
= its PTR name and ``{client_resolve}`` = FORGED when the name has no A record.

Sendmail reaches the milter through the file system, so ``unix:`` milter
sockets work from anywhere; an ``inet:`` milter must listen inside the
namespace (start it with ``sm.ns_command([...])`` or create its socket under
``netns.entered(sm.netns_path)``).

Accepted mail goes to a ``devnull`` mailer (``sh -c 'cat >/dev/null'``) that
ruleset 0 picks for every recipient, with DeliveryMode=interactive: each message
is delivered (discarded) before the 250 after DATA, so the queue never grows.

Opt-in delivery (``mbox=PATH``): every recipient is then resolved to the
``local`` mailer as the user ``heloguard-mbox``, which the instance's alias
file (plain text; Sendmail reads it without a database) turns into
``PATH``, so Sendmail's own ``*file*`` mailer appends each message there with
its "From " separator line, as an mbox.  Sendmail writes files as its
DefaultUser (``daemon``) when the alias file belongs to root, so ``PATH`` is
created beforehand owned by that user, and its folder and those above must be
searchable by it.  Still delivered before the 250 after DATA.
"""

from __future__ import annotations

import fcntl
import os
import pwd
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import IO

from .common import (
    CACHE_DIR,
    SBIN_PATH,
    MTASetupError,
    apt_install,
    apt_run,
    pid_alive,
    tcp_listening,
    wait_until,
)
from .netns import entered
from .smtpclient import Transcript, run_session

TEST_DOMAIN = "example.test"

# Unpacked into the private root (sendmail-bin conflicts with postfix).
SENDMAIL_DEBS = ("sendmail-bin", "sendmail-base", "sendmail-cf", "libwrap0", "m4")
# Shared libraries sendmail-bin links against; ordinary packages that do not
# conflict with anything, so they are installed system-wide if missing.
SENDMAIL_LIB_PACKAGES = ("libdb5.3", "libldap-2.5-0", "libnsl2", "libsasl2-2", "libssl3")
# unshare, setpriv, mount (util-linux); ip (iproute2).
NAMESPACE_PACKAGES = ("util-linux", "iproute2")

SENDMAIL_BIN = Path("usr/libexec/sendmail/sendmail")
M4_BIN = Path("usr/bin/m4")
CF_DIR = Path("usr/share/sendmail/cf")
LIB_DIR = Path("usr/lib/x86_64-linux-gnu")
STAMP = ".heloguard-complete"
# the alias that leads to the mbox file (mbox=)
MBOX_ALIAS = "heloguard-mbox"
# whom Sendmail writes files as (confDEF_USER_ID, Sendmail's default 1:1)
FILE_USER = "daemon"

DEFAULT_MACROS_CONNECT = (
    "j",
    "_",
    "{daemon_name}",
    "{if_name}",
    "{if_addr}",
    "{client_addr}",
    "{client_name}",
    "{client_ptr}",
    "{client_resolve}",
)
DEFAULT_MACROS_HELO = (
    "{tls_version}",
    "{cipher}",
    "{cipher_bits}",
    "{cert_subject}",
    "{cert_issuer}",
)
DEFAULT_MACROS_ENVFROM = (
    "i",
    "{auth_type}",
    "{auth_authen}",
    "{auth_ssf}",
    "{auth_author}",
    "{mail_mailer}",
    "{mail_host}",
    "{mail_addr}",
)


def sendmail_root() -> Path:
    """Where the private Sendmail root lives ($HELOGUARD_SENDMAIL_ROOT overrides)."""
    env = os.environ.get("HELOGUARD_SENDMAIL_ROOT")
    return Path(env) if env else CACHE_DIR / "sendmail-root"


def _lib_env(root: Path) -> dict[str, str]:
    return dict(os.environ, LD_LIBRARY_PATH=str(root / LIB_DIR), PATH=SBIN_PATH)


def _root_ok(root: Path) -> bool:
    return (root / STAMP).exists() and (root / SENDMAIL_BIN).exists()


def ensure_sendmail(root: Path | None = None) -> Path:
    """Unpack Sendmail into a private root once; return the root (idempotent).

    ``apt-get download`` fetches SENDMAIL_DEBS (the installed apt lists decide
    the version; ``apt-get update`` is run once if that fails), ``dpkg -x``
    unpacks them into a staging directory, which is renamed into place when
    complete, so an interrupted run never leaves a half root.  The setgid bit
    is dropped from the sendmail binary: a setgid program ignores
    LD_LIBRARY_PATH, which it needs to find the private libwrap.
    """
    root = root or sendmail_root()
    if _root_ok(root):
        return root
    apt_install(NAMESPACE_PACKAGES)
    apt_install(SENDMAIL_LIB_PACKAGES)
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.parent / f".{root.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _root_ok(root):
            return root
        stage = Path(tempfile.mkdtemp(prefix=f".{root.name}-", dir=root.parent))
        try:
            debs = stage / "debs"
            debs.mkdir()
            os.chmod(stage, 0o755)
            os.chmod(debs, 0o777)  # apt-get download drops to user _apt
            apt_run(["download", "-qq", *SENDMAIL_DEBS], cwd=debs)
            files = sorted(debs.glob("*.deb"))
            if len(files) != len(SENDMAIL_DEBS):
                raise MTASetupError(f"apt-get download gave {files}, wanted {SENDMAIL_DEBS}")
            tree = stage / "root"
            for deb in files:
                subprocess.run(["dpkg-deb", "-x", str(deb), str(tree)], check=True)
            binary = tree / SENDMAIL_BIN
            os.chmod(binary, binary.stat().st_mode & 0o755)
            ldd = subprocess.run(
                ["ldd", str(binary)],
                capture_output=True,
                text=True,
                check=False,
                env=_lib_env(tree),
            )
            if "not found" in ldd.stdout or ldd.returncode != 0:
                raise MTASetupError(f"sendmail lacks shared libraries:\n{ldd.stdout}")
            (tree / STAMP).write_text("".join(f"{f.name}\n" for f in files))
            if root.exists():
                shutil.rmtree(root)
            tree.rename(root)
        finally:
            shutil.rmtree(stage, ignore_errors=True)
    return root


def ipv6_available() -> bool:
    """Does the kernel do IPv6 (so a new network namespace gets ::1)?"""
    return socket.has_ipv6 and Path("/proc/net/if_inet6").exists()


def _macro_list(macros: Sequence[str]) -> str:
    return "``" + ", ".join(macros) + "''"


class _SyslogReceiver:
    """A /dev/log stand-in: a unix datagram socket whose messages go to a file."""

    def __init__(self, path: Path, logfile: Path) -> None:
        self.path = path
        self.logfile = logfile
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        os.chmod(path, 0o666)
        self.sock.settimeout(0.1)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="sendmail-syslog", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        with open(self.logfile, "a", encoding="utf-8") as out:
            while not self._stop.is_set():
                try:
                    data = self.sock.recv(65536)
                except TimeoutError:
                    continue
                except OSError:
                    return
                line = data.decode("utf-8", "replace").rstrip("\n\0")
                if line.startswith("<") and ">" in line[:5]:
                    line = line.split(">", 1)[1]  # drop the <priority>
                with self._lock:
                    out.write(line + "\n")
                    out.flush()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self.sock.close()


class PrivateSendmail:
    """A Sendmail daemon of its own, in private namespaces and a temporary directory.

    ``milter``: the socket in Sendmail syntax, with or without ``S=``
    (``unix:/path`` or ``inet:PORT@127.0.0.1``; an inet milter must listen
    inside the namespace), or ``None`` for no milter.  ``milter_flags`` is
    the ``F=`` value, which decides what happens when the milter is down: ""
    carries on as if there were no milter, "T" answers 451 4.3.2 at MAIL FROM,
    "R" a 554 banner.  ``milter_timeouts`` is the ``T=`` value.  The three
    macro lists replace Sendmail's defaults for those stages (the defaults here
    add the ``{client_*}`` macros at connect; ENVFROM has ``{auth_authen}``).
    ``nameservers`` go into the private resolv.conf, ``hosts`` (name -> address)
    into the private /etc/hosts; ``extra_mc`` is appended to the .mc before the
    mailer and rule sections.  ``mbox``: ``None`` (the default) discards every
    message; a path delivers every accepted message into that mbox file (see
    the module docstring).  ``log_tag`` is the syslog tag (``-L``): ``sm-mta``
    is what Debian's sendmail logs as.

    Start it from a thread that outlives it (pytest's main thread): it dies
    with the thread that started it (PR_SET_PDEATHSIG).
    """

    def __init__(
        self,
        milter: str | None,
        *,
        milter_flags: str = "",
        milter_timeouts: str = "S:10s;R:10s;E:5m",
        macros_connect: Sequence[str] = DEFAULT_MACROS_CONNECT,
        macros_helo: Sequence[str] = DEFAULT_MACROS_HELO,
        macros_envfrom: Sequence[str] = DEFAULT_MACROS_ENVFROM,
        hostname: str = "mx.example.test",
        port: int = 25,
        ipv6: bool | None = None,
        nameservers: Sequence[str] = ("127.0.0.1",),
        hosts: Mapping[str, str] | None = None,
        extra_mc: str = "",
        mbox: str | os.PathLike[str] | None = None,
        log_tag: str = "sm-test",
        root: Path | None = None,
        directory: str | os.PathLike[str] | None = None,
        start_timeout: float = 30.0,
    ) -> None:
        if milter is not None and not milter.startswith("S="):
            milter = "S=" + milter
        self.milter = milter
        self.milter_flags = milter_flags
        self.milter_timeouts = milter_timeouts
        self.macros_connect = tuple(macros_connect)
        self.macros_helo = tuple(macros_helo)
        self.macros_envfrom = tuple(macros_envfrom)
        self.hostname = hostname
        self.port = port
        self.ipv6 = ipv6_available() if ipv6 is None else ipv6
        self.nameservers = tuple(nameservers)
        self.hosts = dict(hosts or {})
        self.extra_mc = extra_mc
        self.mbox = Path(mbox) if mbox is not None else None
        self.log_tag = log_tag
        self._root = root
        self._own_dir = directory is None
        self.dir = Path(directory) if directory else Path(tempfile.mkdtemp(prefix="sm-"))
        self.start_timeout = start_timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self._syslog: _SyslogReceiver | None = None
        self._stderr: IO[bytes] | None = None

    # -- configuration --------------------------------------------------------
    @property
    def root(self) -> Path:
        if self._root is None:
            self._root = ensure_sendmail()
        return self._root

    def mc(self) -> str:
        d = self.dir
        helpfile = self.root / "etc/mail/helpfile"
        lines = [
            "divert(-1)dnl",
            "divert(0)dnl",
            "VERSIONID(`heloguard test instance')dnl",
            "OSTYPE(`linux')dnl",
            f"define(`confDOMAIN_NAME', `{self.hostname}')dnl",
            f"define(`QUEUE_DIR', `{d / 'queue'}')dnl",
            f"define(`STATUS_FILE', `{d / 'statistics'}')dnl",
            f"define(`ALIAS_FILE', `{d / 'aliases' if self.mbox is not None else ''}')dnl",
            f"define(`HELP_FILE', `{helpfile}')dnl",
            f"define(`confPID_FILE', `{d / 'sendmail.pid'}')dnl",
            f"define(`confHOSTS_FILE', `{d / 'hosts'}')dnl",
            f"define(`confSERVICE_SWITCH_FILE', `{d / 'service.switch'}')dnl",
            "define(`confDONT_PROBE_INTERFACES', `True')dnl",
            # milter sockets and test directories live under the sticky /tmp
            "define(`confDONT_BLAME_SENDMAIL', `TrustStickyBit')dnl",
            "define(`confTO_IDENT', `0')dnl",
            "define(`confDELIVERY_MODE', `interactive')dnl",
            # a busy CI runner must not make Sendmail queue or refuse
            "define(`confQUEUE_LA', `1000')dnl",
            "define(`confREFUSE_LA', `1000')dnl",
            "define(`confDELAY_LA', `0')dnl",
            "define(`confMIN_FREE_BLOCKS', `0')dnl",
            "define(`confCONNECTION_RATE_THROTTLE', `0')dnl",
            "define(`confCHECK_ALIASES', `False')dnl",
            "define(`confLOG_LEVEL', `14')dnl",
            "define(`confMILTER_LOG_LEVEL', `14')dnl",
            f"define(`confMILTER_MACROS_CONNECT', {_macro_list(self.macros_connect)})dnl",
            f"define(`confMILTER_MACROS_HELO', {_macro_list(self.macros_helo)})dnl",
            f"define(`confMILTER_MACROS_ENVFROM', {_macro_list(self.macros_envfrom)})dnl",
            "FEATURE(`nocanonify')dnl",
            # no "451 4.1.8 Domain of sender address does not resolve"
            "FEATURE(`accept_unresolvable_domains')dnl",
            "FEATURE(`no_default_msa')dnl",
            f"DAEMON_OPTIONS(`Family=inet, Name=MTA-v4, Addr=127.0.0.1, Port={self.port}')dnl",
        ]
        if self.ipv6:
            lines.append(
                f"DAEMON_OPTIONS(`Family=inet6, Name=MTA-v6, Addr=::1, Port={self.port}')dnl"
            )
        lines.append(f"LOCAL_DOMAIN(`{TEST_DOMAIN}')dnl")
        if self.milter is not None:
            spec = [self.milter]
            if self.milter_flags:
                spec.append(f"F={self.milter_flags}")
            if self.milter_timeouts:
                spec.append(f"T={self.milter_timeouts}")
            lines.append(f"INPUT_MAIL_FILTER(`test', `{', '.join(spec)}')dnl")
        if self.extra_mc:
            lines.append(self.extra_mc.rstrip("\n"))
        lines += [
            "MAILER_DEFINITIONS",
            # A= must hold $u, or Sendmail speaks SMTP to the program
            "Mdevnull,\tP=/bin/sh, F=lsDFM, A=sh -c /bin/cat>/dev/null $u",
            "LOCAL_RULE_0",
        ]
        if self.mbox is None:
            lines.append("R$+\t\t$#devnull $: $1")
        else:
            # any user@host to the alias; what the alias gives (the file) to local,
            # which hands a "/path" recipient to the *file* mailer
            lines += [f"R$+ < @ $+ >\t$#local $: {MBOX_ALIAS}", "R$+\t\t$#local $: $1"]
        return "\n".join(lines) + "\n"

    def write_config(self) -> None:
        d = self.dir
        d.mkdir(parents=True, exist_ok=True)
        os.chmod(d, 0o755)
        (d / "queue").mkdir(mode=0o700, exist_ok=True)
        (d / "statistics").touch()
        (d / "sendmail.mc").write_text(self.mc())
        root = self.root
        res = subprocess.run(
            [
                str(root / M4_BIN),
                f"-D_CF_DIR_={root / CF_DIR}/",
                str(root / CF_DIR / "m4/cf.m4"),
                str(d / "sendmail.mc"),
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        if res.returncode != 0 or "ERROR" in res.stderr:
            raise MTASetupError(f"m4 failed to build sendmail.cf:\n{res.stderr}")
        (d / "sendmail.cf").write_text(res.stdout)
        hosts = {"127.0.0.1": f"{self.hostname} localhost", "::1": "localhost ip6-localhost"}
        for name, addr in self.hosts.items():
            hosts[addr] = f"{hosts[addr]} {name}" if addr in hosts else name
        (d / "hosts").write_text("".join(f"{a}\t{n}\n" for a, n in hosts.items()))
        (d / "resolv.conf").write_text(
            "".join(f"nameserver {ns}\n" for ns in self.nameservers)
            + "options timeout:1 attempts:1\n"
        )
        # Sendmail's own host-map lookups ($[ $], MX): files only.  The client PTR
        # and FCrDNS lookups go through glibc (nsswitch + the private resolv.conf).
        (d / "service.switch").write_text("hosts\tfiles\naliases\tfiles\n")
        (d / "nsswitch.conf").write_text(
            "passwd:\tfiles\ngroup:\tfiles\nshadow:\tfiles\nhosts:\tfiles dns\n"
        )
        (d / "start.sh").write_text(self._start_script())
        if self.mbox is not None:
            self._write_mbox_delivery()

    def _write_mbox_delivery(self) -> None:
        """The alias to the mbox, and the mbox itself, owned by the file-writing user."""
        mbox = self.mbox
        assert mbox is not None
        if any(c in str(mbox) for c in ' \t\n,:#"') or not mbox.is_absolute():
            raise MTASetupError(f"mbox {mbox}: want an absolute path without blanks, ',' or ':'")
        user = pwd.getpwnam(FILE_USER)
        mbox.parent.mkdir(parents=True, exist_ok=True)
        for folder in (mbox.parent, *mbox.parent.parents):
            if not folder.stat().st_mode & 0o001:
                raise MTASetupError(
                    f"mbox {mbox}: {folder} is not searchable by others, so Sendmail, "
                    f"writing files as {FILE_USER}, cannot reach it"
                )
        mbox.touch()
        os.chown(mbox, user.pw_uid, user.pw_gid)
        os.chmod(mbox, 0o600)
        (self.dir / "aliases").write_text(f"{MBOX_ALIAS}: {mbox}\n")

    def _start_script(self) -> str:
        d = shlex.quote(str(self.dir))
        lib = shlex.quote(str(self.root / LIB_DIR))
        binary = shlex.quote(str(self.root / SENDMAIL_BIN))
        v6 = "ip -6 route add local ::/0 dev lo" if self.ipv6 else ":"
        return f"""\
set -e
D={d}
ip link set lo up
ip route add local 0.0.0.0/0 dev lo
{v6}
hostname {shlex.quote(self.hostname)}
for f in hosts resolv.conf nsswitch.conf; do
    if [ -e /etc/$f ]; then
        mount --bind "$D/$f" /etc/$f
    else
        echo "heloguard: no /etc/$f to cover; sendmail uses the host's" >&2
    fi
done
# glibc asks a running nscd before anything else: hide it, so lookups use the
# private files above.
for s in /run/nscd/socket /var/run/nscd/socket; do
    if [ -S "$s" ]; then mount --bind /dev/null "$s" || true; fi
done
# A private /dev (tmpfs) with the few device nodes sendmail opens, bound from
# the real /dev, and /dev/log leading to the test's syslog receiver.
private_dev() {{
    mkdir -p "$D/hostdev" && mount --bind /dev "$D/hostdev" || return 1
    mount -t tmpfs -o mode=755,size=64k heloguard-dev /dev || return 1
    for n in null zero random urandom; do
        [ -e "$D/hostdev/$n" ] || continue
        touch "/dev/$n" && mount --bind "$D/hostdev/$n" "/dev/$n" || {{ umount -l /dev; return 1; }}
    done
    ln -s /proc/self/fd /dev/fd
    ln -s "$D/log.sock" /dev/log
}}
private_dev || echo "heloguard: no private /dev/log; sendmail will not log" >&2
export LD_LIBRARY_PATH={lib}
exec {binary} -bD -C "$D/sendmail.cf" -L {shlex.quote(self.log_tag)}
"""

    # -- life cycle -----------------------------------------------------------
    @property
    def unshare_pid(self) -> int:
        if self.proc is None:
            raise RuntimeError("PrivateSendmail is not running")
        return self.proc.pid

    @property
    def netns_path(self) -> str:
        """The network namespace Sendmail listens in (for netns.entered)."""
        return f"/proc/{self.unshare_pid}/ns/net"

    @property
    def pid(self) -> int | None:
        """Sendmail's PID as this process sees it (PID 1 in its own namespace)."""
        try:
            kids = Path(f"/proc/{self.unshare_pid}/task/{self.unshare_pid}/children").read_text()
        except (OSError, RuntimeError):
            return None
        return int(kids.split()[0]) if kids.split() else None

    def _dead(self) -> str | None:
        if self.proc is not None and self.proc.poll() is not None:
            return f"sendmail exited with {self.proc.returncode}:\n{self.stderr()}{self.log()}"
        return None

    def _listening(self) -> bool:
        pid = self.unshare_pid
        v4 = tcp_listening(self.port, pid=pid)
        return v4 and (not self.ipv6 or tcp_listening(self.port, ipv6=True, pid=pid))

    def start(self) -> PrivateSendmail:
        """Build the .cf, start Sendmail in its namespaces, wait until it listens.

        On failure everything is stopped and removed again before the error
        (MTASetupError) propagates.
        """
        try:
            return self._start()
        except BaseException:
            self.cleanup()
            raise

    def _start(self) -> PrivateSendmail:
        if os.geteuid() != 0:
            raise MTASetupError("PrivateSendmail needs root (namespaces, mounts)")
        for tool in ("unshare", "setpriv", "ip", "mount"):
            if shutil.which(tool, path=SBIN_PATH) is None:
                apt_install(NAMESPACE_PACKAGES)
                break
        self.write_config()
        self._syslog = _SyslogReceiver(self.dir / "log.sock", self.dir / "maillog")
        self._stderr = open(self.dir / "stderr", "wb")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(
            [
                "setpriv",
                "--pdeathsig",
                "KILL",
                "unshare",
                "--net",
                "--uts",
                "--mount",
                "--propagation",
                "private",
                "--pid",
                "--fork",
                "--kill-child=SIGKILL",
                "sh",
                str(self.dir / "start.sh"),
            ],
            stdin=subprocess.DEVNULL,
            stdout=self._stderr,
            stderr=self._stderr,
            env=dict(os.environ, PATH=SBIN_PATH),
        )
        wait_until(
            self._listening,
            timeout=self.start_timeout,
            what=f"sendmail to listen on port {self.port}",
            alive=self._dead,
        )
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM Sendmail, then SIGKILL what is left; the namespaces go with it."""
        proc, self.proc = self.proc, None
        if proc is not None:
            sendmail = None
            try:
                kids = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
                sendmail = int(kids[0]) if kids else None
            except OSError:
                pass
            if sendmail is not None and pid_alive(sendmail):
                os.kill(sendmail, signal.SIGTERM)
            else:
                proc.terminate()  # unshare dies; --kill-child SIGKILLs Sendmail
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()  # --kill-child: SIGKILL to PID 1 empties the PID namespace
                proc.wait(timeout=timeout)
        if self._syslog is not None:
            # let the last datagrams arrive
            time.sleep(0.05)
            self._syslog.close()
            self._syslog = None
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None

    def cleanup(self) -> None:
        self.stop()
        if self._own_dir and os.environ.get("HELOGUARD_KEEP_MTA_DIRS") is None:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> PrivateSendmail:
        if self.proc is not None:  # already started: ``with X(...).start() as x:``
            return self
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cleanup()

    # -- use ------------------------------------------------------------------
    def session(
        self,
        *,
        addr: str,
        helo: str,
        mail_from: str,
        rcpt_to: str | Sequence[str],
        data: bool = True,
        body: str | bytes | None = None,
        timeout: float = 15.0,
    ) -> Transcript:
        """run_session() from client address addr (IPv4 or IPv6) to this Sendmail.

        The socket really comes from addr, so Sendmail's peer address, its
        ``{client_addr}`` and the milter's hostaddr are addr.  There is no way
        to choose the client name or a SASL login: Sendmail looks the name up
        itself (through the private resolv.conf).
        """
        return run_session(
            self.port,
            source_addr=addr,
            netns=self.netns_path,
            helo=helo,
            mail_from=mail_from,
            rcpt_to=rcpt_to,
            data=data,
            body=body,
            timeout=timeout,
        )

    def ns_command(self, argv: Sequence[str]) -> list[str]:
        """argv prefixed to run in Sendmail's network namespace (e.g. an inet milter)."""
        return ["nsenter", f"--net={self.netns_path}", "--", *argv]

    @contextmanager
    def in_netns(self) -> Iterator[None]:
        """Run a block with this thread in Sendmail's network namespace."""
        with entered(self.netns_path):
            yield

    # -- inspection -----------------------------------------------------------
    def log(self) -> str:
        """Sendmail's syslog lines so far ("" if it could not log)."""
        try:
            return (self.dir / "maillog").read_text(errors="replace")
        except OSError:
            return ""

    def stderr(self) -> str:
        try:
            return (self.dir / "stderr").read_text(errors="replace")
        except OSError:
            return ""
