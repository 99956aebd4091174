"""A private, throw-away Postfix instance that hands every session to a milter.

    with PrivatePostfix("unix:/tmp/x/milter.sock") as pf:
        t = pf.session(addr="192.0.2.25", name="mail.example.test",
                       helo="mail.example.test", mail_from="a@example.test",
                       rcpt_to="b@example.test")

The instance lives in a temporary directory (main.cf, master.cf, queue, data,
maillog), listens on 127.0.0.1:<free port>, runs nothing chrooted, discards every
message it accepts, and lets 127.0.0.0/8 use XCLIENT so a test can present any
client address, name and SASL login.  It never waits on DNS: its own names are
fixed in main.cf, smtp/lmtp would use the native resolver (nothing is delivered
anyway), and after XCLIENT smtpd does no client lookups (mta-facts.md).

Mail to any address in ``example.test`` (``TEST_DOMAIN``) is accepted from any
client: the domain is in ``mydestination`` and ``local_recipient_maps`` is empty.
Mail to other domains is relayed only for mynetworks (127.0.0.0/8, i.e. a
session that did not XCLIENT) and SASL-authenticated clients.

Opt-in delivery (``deliver_to=DIR``): mail for ``TEST_DOMAIN`` is then
delivered for real by virtual(8) instead of discarded: into the Maildir
``DIR/Maildir/`` (``PrivatePostfix.maildir``), except for the addresses in
``mbox_recipients``, each of which gets an mbox file ``DIR/<local part>.mbox``
(``PrivatePostfix.mbox_path(addr)``).  The files belong to ``deliver_user``
(virtual(8) never delivers as root: ``virtual_minimum_uid`` is at least 1), so
DIR and every folder above it must be searchable by that user: not under
pytest's 0700 ``tmp_path``.  Everything else is still discarded.

``map_files`` (name -> text) are written into the instance's directory before
start, so ``extra_main_cf`` can name them as
``texthash:$config_directory/NAME`` (texthash needs no postmap), e.g. a
``check_client_access`` table that REJECTs one test address.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType

from .common import (
    REPO,
    SBIN_PATH,
    MTASetupError,
    apt_install,
    descendants,
    free_port,
    kill_all,
    pid_alive,
    wait_until,
)
from .smtpclient import Transcript, run_session

TEST_DOMAIN = "example.test"

POSTFIX_PACKAGES = ("postfix",)
# Cyrus SASL plug-ins: not needed for XCLIENT LOGIN (the milter sees {auth_authen}
# with smtpd_sasl_auth_enable = no), only when a test turns SASL on, which also
# makes a LOGIN= client count as permit_sasl_authenticated.
SASL_PACKAGES = ("libsasl2-modules",)
PRESEED = ("postfix postfix/main_mailer_type select No configuration",)

# What the milter is shown, per stage (Postfix parameter milter_<stage>_macros).
DEFAULT_MILTER_MACROS: dict[str, str] = {
    "connect": (
        "j {daemon_name} {daemon_addr} v _ "
        "{client_addr} {client_port} {client_name} {client_ptr} {client_resolve}"
    ),
    "helo": "{tls_version} {cipher} {cipher_bits} {cert_subject} {cert_issuer}",
    "mail": "i {auth_type} {auth_authen} {auth_author} {mail_addr} {mail_host} {mail_mailer}",
    "rcpt": "i {rcpt_addr} {rcpt_host} {rcpt_mailer}",
}

MASTER_CF = """\
# service type  private unpriv  chroot  wakeup  maxproc command + args
{listen} inet  n       -       n       -       -       smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""

# Added to MASTER_CF only when the instance delivers (deliver_to).
MASTER_CF_VIRTUAL = """\
virtual   unix  -       n       n       -       -       virtual
"""
MAILDIR_NAME = "Maildir"


# (subdirectory, owner, group, mode) of queue_directory: /etc/postfix/postfix-files,
# with the sticky/setgid bits Debian gives maildrop and public
QUEUE_LAYOUT: tuple[tuple[str, str, str, int], ...] = (
    ("", "root", "root", 0o755),
    ("pid", "root", "root", 0o755),
    ("maildrop", "postfix", "postdrop", 0o1730),
    ("public", "postfix", "postdrop", 0o2710),
    *(
        (sub, "postfix", "root", 0o700)
        for sub in (
            "active",
            "bounce",
            "corrupt",
            "defer",
            "deferred",
            "flush",
            "hold",
            "incoming",
            "private",
            "saved",
            "trace",
        )
    ),
)


def ensure_postfix() -> None:
    """Install Debian's postfix if missing, without configuring or starting it.

    Preseeds "No configuration" so the package installs non-interactively and
    leaves no system instance to configure; PrivatePostfix never uses
    /etc/postfix/main.cf.
    """
    apt_install(POSTFIX_PACKAGES, preseed=PRESEED)
    for tool in ("postfix", "postconf"):
        _tool(tool)


def _tool(name: str) -> str:
    """Absolute path of a Postfix command (a CI PATH may lack /usr/sbin)."""
    found = shutil.which(name, path=SBIN_PATH)
    if found is None:
        raise MTASetupError(f"{name} not found (is the postfix package installed?)")
    return found


def _main_cf_value(value: str | int | bool) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def contrib_main_cf() -> dict[str, str]:
    """contrib/postfix/main.cf (the milter lines we ship) as settings, without its
    ``smtpd_milters``: tests and benchmarks run Postfix the way the README says."""
    settings: dict[str, str] = {}
    for raw in (REPO / "contrib" / "postfix" / "main.cf").read_text().splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            settings[key.strip()] = value.strip()
    settings.pop("smtpd_milters", None)
    return settings


class PrivatePostfix:
    """A Postfix instance of its own, in a temporary directory.

    ``milter``: Postfix syntax (``unix:/path`` or ``inet:127.0.0.1:PORT``), or
    ``None`` for no milter.  ``milter_macros`` maps a stage (connect, helo,
    mail, rcpt, data, end_of_header, end_of_data, unknown_command) to its macro
    list and replaces the default for that stage.  ``integrity_check=True``
    lets ``postfix start`` run its own checks (and create the queue), 2-3 s
    slower.  ``extra_main_cf`` is
    applied last and overrides anything (``milter_default_action``,
    ``milter_command_timeout``, ``smtpd_sasl_auth_enable``,
    ``smtpd_recipient_restrictions``...).  ``map_files`` are written into the
    instance directory (``texthash:$config_directory/NAME`` in main.cf).

    ``deliver_to``: ``None`` (the default) discards everything; a directory
    makes virtual(8) deliver mail for ``TEST_DOMAIN`` into the Maildir
    ``deliver_to/Maildir/`` and, for each address in ``mbox_recipients``, into
    the mbox ``deliver_to/<local part>.mbox``, as ``deliver_user`` (static
    uid/gid).  See the module docstring for the folder permissions.

    ``start()`` returns once a 220 banner came back: that probe is one session
    from 127.0.0.1 (milter: connect + close).  So is the first half of every
    XCLIENT session: the milter sees connect(127.0.0.1), close, then the
    presented client.  Defaults worth knowing (Postfix 3.7): with the milter
    unreachable, ``milter_default_action = tempfail`` gives 250 to EHLO and
    "451 4.7.1 Service unavailable - try again later" at MAIL FROM.
    """

    def __init__(
        self,
        milter: str | None,
        *,
        extra_main_cf: Mapping[str, str | int | bool] | None = None,
        milter_macros: Mapping[str, str] | None = None,
        port: int | None = None,
        directory: str | os.PathLike[str] | None = None,
        start_timeout: float = 30.0,
        integrity_check: bool = False,
        deliver_to: str | os.PathLike[str] | None = None,
        mbox_recipients: Sequence[str] = (),
        deliver_user: str = "nobody",
        map_files: Mapping[str, str] | None = None,
    ) -> None:
        self.milter = milter
        self.integrity_check = integrity_check
        self.extra_main_cf = dict(extra_main_cf or {})
        self.deliver_to = Path(deliver_to) if deliver_to is not None else None
        self.mbox_recipients = tuple(a.lower() for a in mbox_recipients)
        for addr in self.mbox_recipients:
            local, _, domain = addr.rpartition("@")
            if domain != TEST_DOMAIN or not local or "/" in local:
                raise ValueError(f"mbox recipient {addr!r}: want local@{TEST_DOMAIN}")
        if self.mbox_recipients and self.deliver_to is None:
            raise ValueError("mbox_recipients needs deliver_to")
        self.deliver_user = deliver_user
        self.map_files = dict(map_files or {})
        self.milter_macros = {**DEFAULT_MILTER_MACROS, **(milter_macros or {})}
        self.host = "127.0.0.1"
        self.port = port if port is not None else free_port(self.host)
        self._own_dir = directory is None
        self.dir = Path(directory) if directory else Path(tempfile.mkdtemp(prefix="pf-"))
        self.start_timeout = start_timeout
        self._master_pid: int | None = None
        self._started = False

    # -- configuration --------------------------------------------------------
    def main_cf(self) -> dict[str, str]:
        d = self.dir
        cf: dict[str, str] = {
            "compatibility_level": "3.6",
            "queue_directory": str(d / "queue"),
            "data_directory": str(d / "data"),
            "maillog_file": str(d / "maillog"),
            "maillog_file_prefixes": str(d),  # postfix refuses other paths silently
            "syslog_name": "postfix-test",
            "mail_owner": "postfix",
            "setgid_group": "postdrop",
            # who we are: fixed names, so nothing looks up the host name
            "myhostname": "mx.example.test",
            "mydomain": TEST_DOMAIN,
            "myorigin": "$myhostname",
            "inet_interfaces": "127.0.0.1",
            "inet_protocols": "all",  # else XCLIENT refuses IPv6 ADDR (501 Bad ADDR syntax)
            "mynetworks": "127.0.0.0/8",
            "mydestination": f"{TEST_DOMAIN}, $myhostname, localhost",
            "relay_domains": "",
            "local_recipient_maps": "",
            "alias_maps": "",
            "alias_database": "",
            "smtpd_relay_restrictions": "permit_mynetworks, permit_sasl_authenticated, "
            "reject_unauth_destination",
            "smtpd_authorized_xclient_hosts": "127.0.0.0/8",
            "in_flow_delay": "0",
            "smtpd_peername_lookup": "no",
            "smtp_host_lookup": "native",
            "lmtp_host_lookup": "native",
            "smtp_dns_support_level": "disabled",
            "biff": "no",
            "append_dot_mydomain": "no",
            "smtputf8_enable": "no",
            # whatever is accepted is thrown away
            "default_transport": "discard",
            "local_transport": "discard",
            "relay_transport": "discard",
            "virtual_transport": "discard",
            "notify_classes": "",
            "smtpd_milters": self.milter or "",
            "non_smtpd_milters": "",
            "milter_protocol": "6",
        }
        for stage, macros in self.milter_macros.items():
            cf[f"milter_{stage}_macros"] = macros
        if self.deliver_to is not None:
            user = pwd.getpwnam(self.deliver_user)
            cf.update(
                {
                    # a domain is either local or virtual, never both
                    "mydestination": "$myhostname, localhost",
                    "virtual_mailbox_domains": TEST_DOMAIN,
                    "virtual_mailbox_base": str(self.deliver_to),
                    "virtual_mailbox_maps": f"texthash:{d / 'vmailbox'}",
                    "virtual_uid_maps": f"static:{user.pw_uid}",
                    "virtual_gid_maps": f"static:{user.pw_gid}",
                    "virtual_minimum_uid": str(max(1, min(user.pw_uid, 100))),
                    "virtual_transport": "virtual",
                }
            )
        cf.update({k: _main_cf_value(v) for k, v in self.extra_main_cf.items()})
        return cf

    def write_config(self) -> None:
        d = self.dir
        d.mkdir(parents=True, exist_ok=True)
        os.chmod(d, 0o755)  # postfix daemons (user postfix) read main.cf here
        # The queue and data directories as postfix-files describes them, made
        # here because "post-install create-missing" (run by the integrity check
        # of "postfix start") takes 2-3 s; "quick-start" then skips that check.
        queue = d / "queue"
        for sub, owner, group, mode in QUEUE_LAYOUT:
            path = queue / sub if sub else queue
            path.mkdir(exist_ok=True)
            shutil.chown(path, owner, group)
            os.chmod(path, mode)
        data = d / "data"
        data.mkdir(exist_ok=True)
        shutil.chown(data, "postfix", "postfix")
        os.chmod(data, 0o700)
        if not self.integrity_check:
            (queue / "quick-start").touch()
        for name, text in self.map_files.items():
            if "/" in name or name in ("main.cf", "master.cf", "vmailbox"):
                raise ValueError(f"map file name {name!r}")
            (d / name).write_text(text)
            os.chmod(d / name, 0o644)
        master_cf = MASTER_CF.format(listen=f"{self.host}:{self.port}")
        if self.deliver_to is not None:
            self._write_delivery()
            master_cf += MASTER_CF_VIRTUAL
        (d / "main.cf").write_text("".join(f"{k} = {v}\n" for k, v in self.main_cf().items()))
        (d / "master.cf").write_text(master_cf)
        # postfix(1) re-reads a main.cf younger than about 2 s in 0.3 s steps
        # until it is older (seen with strace): date the files back.
        past = time.time() - 60
        for name in ("main.cf", "master.cf"):
            os.utime(d / name, (past, past))

    def _write_delivery(self) -> None:
        """virtual(8)'s mailbox map and base directory (owned by deliver_user)."""
        base = self.deliver_to
        assert base is not None
        user = pwd.getpwnam(self.deliver_user)
        base.mkdir(parents=True, exist_ok=True)
        os.chown(base, user.pw_uid, user.pw_gid)
        os.chmod(base, 0o755)
        for folder in base.resolve().parents:
            if not folder.stat().st_mode & 0o001:
                raise MTASetupError(
                    f"deliver_to {base}: {folder} is not searchable by others, so "
                    f"virtual(8), running as {self.deliver_user}, cannot reach it"
                )
        # the exact address wins over the @domain catch-all (virtual(5) lookup order)
        rows = [f"{addr}\t{addr.partition('@')[0]}.mbox" for addr in self.mbox_recipients]
        rows.append(f"@{TEST_DOMAIN}\t{MAILDIR_NAME}/")
        (self.dir / "vmailbox").write_text("".join(f"{row}\n" for row in rows))
        os.chmod(self.dir / "vmailbox", 0o644)

    # -- life cycle -----------------------------------------------------------
    def _postfix(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [_tool("postfix"), "-c", str(self.dir), *args],
            capture_output=True,
            text=True,
            check=False,
            timeout=timeout,
        )

    def _read_master_pid(self) -> int | None:
        try:
            return int((self.dir / "queue" / "pid" / "master.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def _banner(self) -> bool:
        try:
            with socket.create_connection((self.host, self.port), timeout=5) as s:
                s.settimeout(5)
                first = s.recv(512)
                s.sendall(b"QUIT\r\n")
                return first.startswith(b"220")
        except OSError:
            return False

    def start(self) -> PrivatePostfix:
        """Write the configuration, start the instance, wait for the 220 banner.

        On failure everything is stopped and removed again before the error
        (MTASetupError) propagates.
        """
        try:
            return self._start()
        except BaseException:
            self.cleanup()
            raise

    def _start(self) -> PrivatePostfix:
        ensure_postfix()
        if self.main_cf().get("smtpd_sasl_auth_enable") == "yes":
            # Cyrus SASL refuses to start without mechanism plug-ins
            apt_install(SASL_PACKAGES)
        self.write_config()
        res = self._postfix("start")
        if res.returncode != 0:
            raise MTASetupError(f"postfix start failed:\n{res.stderr}{self.log()}")
        self._started = True

        def dead() -> str | None:
            pid = self._master_pid or self._read_master_pid()
            self._master_pid = pid
            if pid is not None and not pid_alive(pid):
                return f"postfix master exited; maillog:\n{self.log()}"
            return None

        wait_until(self._banner, timeout=self.start_timeout, what="postfix 220", alive=dead)
        self._master_pid = self._read_master_pid()
        return self

    def stop(self, timeout: float = 15.0) -> None:
        """postfix stop, then make sure the master and all its children are gone."""
        if not self._started:
            return
        self._started = False
        master = self._master_pid or self._read_master_pid()
        procs = [master, *descendants(master)] if master else []
        self._postfix("stop", timeout=timeout)
        deadline = time.monotonic() + timeout
        while any(pid_alive(p) for p in procs) and time.monotonic() < deadline:
            time.sleep(0.05)
        kill_all(p for p in procs if pid_alive(p))

    def cleanup(self) -> None:
        self.stop()
        if self._own_dir and os.environ.get("HELOGUARD_KEEP_MTA_DIRS") is None:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> PrivatePostfix:
        if self._started:  # already started: ``with X(...).start() as x:``
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
        name: str | None = None,
        login: str | None = None,
        data: bool = True,
        body: str | bytes | None = None,
        timeout: float = 15.0,
    ) -> Transcript:
        """run_session() presenting client addr/name (and SASL login) by XCLIENT.

        ``name`` defaults to ``[UNAVAILABLE]`` (no PTR: resolve FAIL); with
        ``login`` the milter sees ``{auth_authen}`` = login and
        ``{auth_type}`` = XCLIENT at MAIL FROM.
        """
        return run_session(
            self.port,
            host=self.host,
            addr=addr,
            name=name,
            login=login,
            helo=helo,
            mail_from=mail_from,
            rcpt_to=rcpt_to,
            data=data,
            body=body,
            timeout=timeout,
        )

    # -- inspection -----------------------------------------------------------
    @property
    def maillog_path(self) -> Path:
        """The maillog file (``maillog_file``) that ``log()`` reads."""
        return self.dir / "maillog"

    @property
    def maildir(self) -> Path:
        """The Maildir that mail for TEST_DOMAIN goes to (needs ``deliver_to``)."""
        if self.deliver_to is None:
            raise RuntimeError("this PrivatePostfix discards its mail (no deliver_to)")
        return self.deliver_to / MAILDIR_NAME

    def mbox_path(self, addr: str) -> Path:
        """The mbox file of one of ``mbox_recipients``."""
        if self.deliver_to is None or addr.lower() not in self.mbox_recipients:
            raise KeyError(f"{addr} has no mbox here (mbox_recipients)")
        return self.deliver_to / f"{addr.lower().partition('@')[0]}.mbox"

    def log(self) -> str:
        """The instance's maillog so far ("" if none yet)."""
        try:
            return (self.dir / "maillog").read_text(errors="replace")
        except OSError:
            return ""

    def postconf(self, *names: str) -> dict[str, str]:
        """Effective parameter values (``postconf -c DIR -h`` style)."""
        res = subprocess.run(
            [_tool("postconf"), "-c", str(self.dir), *names],
            capture_output=True,
            text=True,
            check=True,
        )
        out: dict[str, str] = {}
        for line in res.stdout.splitlines():
            key, _, value = line.partition(" = ")
            out[key] = value
        return out
