"""``heloguard serve``: the milter daemon, and ``heloguard reload``.

Start-up is a fixed sequence: config (validated whole; exit 78 if bad) ->
logging -> resolver and rules -> bind the socket (as the starting user, so a
root-started daemon can bind under /run) -> socket mode and group -> drop
privileges to ``[milter] user``/``group`` -> watch the config for changes ->
``milter.main()``.  It runs in the foreground as one process and never
forks; a service manager daemonizes it.

Signals: libmilter blocks SIGHUP, SIGINT and SIGTERM in every thread and
handles them in its own signal thread; all three stop the milter (a Python
signal handler never runs while libmilter holds the main thread).  So
SIGHUP does *not* reload.  To reload, change the config file: it is checked
every 2 seconds, validated first, and swapped in only when valid (a bad file
is logged and the running configuration kept).  ``heloguard reload``
validates the file and touches it, for a reload on demand.  Connections in
progress finish under the configuration they started with.
"""

from __future__ import annotations

import argparse
import errno
import grp
import logging
import logging.handlers
import os
import pwd
import signal
import socket
import stat
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import milter

from heloguard import cpus, logsink
from heloguard.config import DEFAULT_PATH, Config, ConfigError, GreylistConfig, LogConfig, load
from heloguard.greylist import Greylist, StoreError, admin_key
from heloguard.logfmt import printable
from heloguard.logsink import LineFormatter, LogWriter
from heloguard.resolver import parse_nameserver

if TYPE_CHECKING:
    from heloguard.adapter import RuntimeHolder
    from heloguard.session import Runtime

log = logging.getLogger("heloguard")

NAME = "heloguard"
WATCH_INTERVAL = 2.0


def setup_logging(cfg: LogConfig) -> None:
    """One handler on the ``heloguard`` logger: stderr, or syslog's mail facility.

    The records go through a queue to one writer thread (:mod:`heloguard.logsink`),
    so a libmilter callback never waits on the log's I/O.
    """
    # One line per decision on a busy MX: skip the record fields no format
    # here uses (the caller's file and line, thread and multiprocessing names).
    logging._srcfile = None  # the logging HOWTO's advice
    logging.logThreads = False
    logging.logMultiprocessing = False
    root = logging.getLogger("heloguard")
    root.setLevel(cfg.level.upper())
    root.propagate = False
    handler, fallback = _log_target(cfg)
    old = _LOG_WRITER.pop() if _LOG_WRITER else None
    writer = LogWriter(handler)
    _LOG_WRITER.append(writer)
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(writer.handler)
    logsink.install(writer)
    if old is not None:
        old.stop()  # what it still holds is written first
    if fallback:
        root.warning(fallback)


def stop_logging() -> None:
    """Write every queued log line (the daemon is stopping)."""
    for writer in _LOG_WRITER:
        writer.stop()


_LOG_WRITER: list[LogWriter] = []  # the one in use (a reload replaces it)


def _log_target(cfg: LogConfig) -> tuple[logging.Handler, str]:
    """The handler that writes the lines, and a warning to log if syslog failed."""
    handler: logging.Handler
    fallback = ""
    if cfg.destination == "syslog":
        try:
            _probe_syslog(cfg.syslog_socket)
            facility = logging.handlers.SysLogHandler.facility_names[cfg.facility]
            handler = logging.handlers.SysLogHandler(address=cfg.syslog_socket, facility=facility)
            handler.setFormatter(LineFormatter(f"{NAME}[{os.getpid()}]: ", stamped=False))
        except (OSError, KeyError) as exc:
            fallback = f"syslog unavailable ({exc}); logging to stderr"
        else:
            return handler, ""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(LineFormatter(f"{NAME}[{os.getpid()}]: ", stamped=True))
    return handler, fallback


def _probe_syslog(path: str) -> None:
    """Raise OSError unless a syslog daemon listens on ``path``.

    SysLogHandler itself no longer fails when the socket is missing (it fails
    on every message instead), so heloguard checks before it relies on it.
    """
    for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
        probe = socket.socket(socket.AF_UNIX, kind)
        try:
            probe.connect(path)
        except OSError as exc:
            if exc.errno != errno.EPROTOTYPE:
                raise
            continue
        finally:
            probe.close()
        return
    raise OSError(f"nothing listens on {path}")


def postfix_socket(spec: str) -> str:
    """The same socket in Postfix's ``smtpd_milters`` syntax."""
    if spec.startswith(("unix:", "local:")):
        return "unix:" + spec.split(":", 1)[1]
    kind, _, rest = spec.partition(":")
    port, _, host = rest.partition("@")
    return f"inet:{host or '127.0.0.1'}:{port}" if kind == "inet" else f"inet6:[{host}]:{port}"


def socket_path(spec: str) -> Path | None:
    """The file of a unix socket, or None."""
    if spec.startswith(("unix:", "local:")):
        return Path(spec.split(":", 1)[1])
    return None


def secure_socket(spec: str, mode: int, group: str) -> None:
    """Set the unix socket's mode and group (after binding, before dropping privileges)."""
    path = socket_path(spec)
    if path is None or not path.exists():
        return
    if group:
        os.chown(path, -1, grp.getgrnam(group).gr_gid)
    os.chmod(path, mode)


def drop_privileges(user: str, group: str) -> None:
    """Become ``user`` (and ``group``), or warn when staying root."""
    if not user:
        if os.geteuid() == 0:
            log.warning("running as root: set [milter] user to drop privileges after binding")
        return
    pw = pwd.getpwnam(user)
    gid = grp.getgrnam(group).gr_gid if group else pw.pw_gid
    if os.geteuid() == 0:
        os.setgroups([])
        os.setgid(gid)
        os.setuid(pw.pw_uid)
    elif os.geteuid() != pw.pw_uid:
        raise PermissionError(f"cannot become {user}: not started as root")
    os.umask(0o007)
    log.info("running as %s:%s", user, group or grp.getgrgid(gid).gr_name)


def hand_over(paths: list[Path], user: str, group: str) -> None:
    """Give the files heloguard writes to the user it is about to become.

    They were created (or exist) as root; after the privilege drop the daemon
    must still write them, and SQLite must be able to create its -wal and
    -shm files beside the database.  Folders heloguard created are handed
    over too; a folder that already existed is only checked, and a warning
    says when the user could not write in it.
    """
    if not user or os.geteuid() != 0:
        return
    pw = pwd.getpwnam(user)
    gid = grp.getgrnam(group).gr_gid if group else pw.pw_gid
    for path in paths:
        folder = path.parent
        if not folder.exists():
            folder.mkdir(parents=True, exist_ok=True)
            os.chown(folder, pw.pw_uid, gid)
        for f in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
            if f.exists():
                os.chown(f, pw.pw_uid, gid)
        st = folder.stat()
        writable = (
            (st.st_uid == pw.pw_uid and st.st_mode & 0o200)
            or (st.st_gid == gid and st.st_mode & 0o020)
            or st.st_mode & 0o002
        )
        if not writable:
            log.warning(
                "%s is not writable by %s: %s cannot be recreated there after the privilege drop",
                folder,
                user,
                path.name,
            )


def warn_world_writable(*paths: Path | None) -> None:
    """Log a warning for each file (or its folder) that anyone may write."""
    for p in paths:
        if p is None:
            continue
        for target in (p, p.parent):
            try:
                mode = target.stat().st_mode
            except OSError:
                continue
            if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                continue  # a device such as /dev/null
            if mode & stat.S_IWOTH and not (stat.S_ISDIR(mode) and mode & stat.S_ISVTX):
                log.warning(
                    "%s is world-writable: anyone could change heloguard's behaviour", target
                )


def log_uncaught(kind: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
    """``sys.excepthook`` while serving: through the log, as whole lines.

    pymilter reports what it cannot hand to a callback (a HELO or address that
    is not UTF-8) with PyErr_Print, which calls this hook.  Python's own hook
    writes to stderr in pieces, beside the log's handler and its lock, so a
    client sending such HELOs could split other clients' decision lines.
    """
    if not issubclass(kind, Exception):
        sys.__excepthook__(kind, exc, tb)
        return
    log.error(
        "pymilter could not call back: %s: %s; answered per [milter] failure_policy",
        kind.__name__,
        printable(str(exc), 300),
        exc_info=(kind, exc, tb) if tb is not None else None,
    )


# libmilter waits for these in its own signal thread (sigwait); every other
# thread must block them, or the kernel may deliver SIGTERM to a thread that
# does not, and the default action kills the process without a clean stop.
STOP_SIGNALS = {signal.SIGHUP, signal.SIGINT, signal.SIGTERM}


class ConfigWatcher(threading.Thread):
    """Reload the config when its file changes; keep the old one when the new one is bad."""

    def __init__(
        self,
        path: Path,
        apply: Callable[[Config], None],
        build: Callable[[Path], Config],
        interval: float = WATCH_INTERVAL,
        extra: tuple[str, ...] = (),
    ) -> None:
        super().__init__(name="heloguard-reload", daemon=True)
        self.path = path
        self.extra = extra  # exception files: watched too
        self.apply = apply
        self.build = build
        self.interval = interval
        self.stopped = threading.Event()
        self._seen = self._stamp()

    def _stamp(self) -> tuple[tuple[int, int, int] | None, ...]:
        stamps: list[tuple[int, int, int] | None] = []
        for p in (self.path, *map(Path, self.extra)):
            try:
                st = p.stat()
            except OSError:
                stamps.append(None)
                continue
            stamps.append((st.st_mtime_ns, st.st_size, st.st_ino))
        return tuple(stamps)

    def run(self) -> None:
        """Poll the file; on a change, validate and apply."""
        while not self.stopped.wait(self.interval):
            stamp = self._stamp()
            if stamp == self._seen:
                continue
            self._seen = stamp
            self.reload()

    def reload(self) -> bool:
        """Load, validate and apply the file now; True on success."""
        try:
            config = self.build(self.path)
        except ConfigError as exc:  # the message says it all; no traceback
            log.error("reload failed, keeping the running configuration: %s", exc)  # noqa: TRY400
            return False
        try:
            self.apply(config)
        except Exception:
            log.exception("reload failed, keeping the running configuration")
            return False
        self.extra = config.exceptions.files
        log.info("reloaded configuration from %s", self.path)
        return True


def _overrides(config: Config, args: argparse.Namespace) -> Config:
    grey_db = getattr(args, "greylist", None)
    if grey_db:
        base = config.greylist or GreylistConfig()
        config = replace(config, greylist=replace(base, backend="sqlite", database=grey_db))
    if args.socket:
        config = replace(config, milter=replace(config.milter, socket=args.socket))
        config.milter.validate()
    if args.nameserver:
        config = replace(config, dns=replace(config.dns, nameservers=tuple(args.nameserver)))
    return config


def serve(args: argparse.Namespace) -> int:
    """Run the milter until SIGTERM (or SIGHUP/SIGINT)."""
    from heloguard.adapter import HeloguardMilter, RuntimeHolder
    from heloguard.session import Runtime

    config_path = _config_path(args)
    config = _overrides(load(config_path), args)
    # before any thread starts (the log writer is the first): only libmilter's
    # signal thread may take SIGTERM
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    # before any thread starts too: every thread inherits the CPUs (heloguard.cpus)
    try:
        placed = cpus.pin(config.milter.cpus)
    except ValueError as exc:
        raise ConfigError("milter", str(exc), str(config_path or "")) from None
    setup_logging(config.log)
    log.info("running %s", placed)
    metrics = None
    if config.metrics.listen:
        from heloguard.metrics import Metrics

        metrics = Metrics()
        metrics.serve(config.metrics.listen)
        log.info("metrics on http://%s/metrics", config.metrics.listen)
    # folders for the state files first (created as root, handed to the user),
    # then the files themselves once the runtime has opened them
    hand_over(_state_files(config), config.milter.user, config.milter.group)
    holder = RuntimeHolder(Runtime.build(config, metrics=metrics))
    HeloguardMilter.holder = holder
    _start_greylist(holder.current)
    hand_over(_state_files(config), config.milter.user, config.milter.group)
    _bind(config, HeloguardMilter)
    # the files that steer it: config, exception lists, greylist database, decision records
    warn_world_writable(config_path, *map(Path, config.exceptions.files), *_state_files(config))
    drop_privileges(config.milter.user, config.milter.group)
    watcher = None
    if config_path is not None:
        watcher = ConfigWatcher(
            config_path, lambda new: _apply(holder, new, args), load, extra=config.exceptions.files
        )
        watcher.start()
    spec = config.milter.socket
    log.info("heloguard %s listening on %s", _version(), spec)
    print(f"heloguard: listening on {spec}", file=sys.stderr, flush=True)
    print(
        f"heloguard: Postfix main.cf:  smtpd_milters = {postfix_socket(spec)}",
        file=sys.stderr,
        flush=True,
    )
    sys.excepthook = log_uncaught
    try:
        milter.main()
    finally:
        if watcher is not None:
            watcher.stopped.set()
        holder.current.resolver.close()
        log.info("heloguard stopped")
        stop_logging()
    return 0


def _config_path(args: argparse.Namespace) -> Path | None:
    for ns in args.nameserver or ():
        try:
            parse_nameserver(ns)
        except ValueError as exc:
            raise ConfigError("--nameserver", str(exc)) from None
    if args.config:
        return Path(args.config)
    return DEFAULT_PATH if DEFAULT_PATH.exists() else None


def _apply(holder: RuntimeHolder, new: Config, args: argparse.Namespace) -> None:
    """Swap in a validated new configuration (a new resolver only if [dns] changed)."""
    from heloguard.session import Runtime

    new = _overrides(new, args)
    old = holder.current
    resolver = old.resolver if new.dns == old.config.dns else None
    fresh = Runtime.build(new, resolver, metrics=old.metrics)
    _start_greylist(fresh)
    holder.swap(fresh)
    if old.greylist is not None:
        old.greylist.close()
    if fresh.resolver is not old.resolver:
        # sessions still using the old resolver finish within one budget
        threading.Timer(old.wait + 5, old.resolver.close).start()
    setup_logging(new.log)


def _state_files(config: Config) -> list[Path]:
    """The files the daemon writes (greylist database, decision records)."""
    files = []
    grey = config.greylist
    if grey is not None and grey.backend == "sqlite" and not grey.database.startswith("file:"):
        files.append(Path(grey.database))
    if config.log.decisions:
        files.append(Path(config.log.decisions))
    return files


def _start_greylist(runtime: Runtime) -> None:
    """Open the greylist store now (a bad one is logged, not fatal) and start purging."""
    grey = runtime.greylist
    if grey is None:
        return
    try:
        grey.connect().close()
        log.info("greylisting with %s", grey.describe())
    except StoreError as exc:  # the message says it all
        log.error("greylist database unusable (%s); on_error = %s", exc, grey.cfg.on_error)  # noqa: TRY400
    grey.start_purger()


def _bind(config: Config, klass: type) -> None:
    """Register the callbacks and bind the socket, with its mode and group."""
    spec = config.milter.socket
    path = socket_path(spec)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
    milter.set_flags(milter.SETSYMLIST)
    policy = milter.CONTINUE if config.milter.failure_policy == "accept" else milter.TEMPFAIL
    milter.set_exception_policy(policy)
    _register(klass)
    milter.setconn(spec)
    milter.settimeout(int(config.milter.timeout))
    milter.opensocket(True)  # bind now, while we may still be root
    secure_socket(spec, config.milter.mode_bits, config.milter.group)


def _register(klass: type) -> None:
    """Wire libmilter's callbacks to ``klass`` instances (pymilter's runmilter, minus binding)."""
    import Milter

    Milter.factory = klass
    m = milter
    m.set_connect_callback(Milter.connect_callback)
    m.set_helo_callback(lambda ctx, host: ctx.getpriv().hello(host))
    m.set_envfrom_callback(lambda ctx, *b: ctx.getpriv().envfrom_bytes(*b))
    m.set_envrcpt_callback(lambda ctx, *b: ctx.getpriv().envrcpt_bytes(*b))
    m.set_header_callback(lambda ctx, f, v: ctx.getpriv().header_bytes(f, v))
    m.set_eoh_callback(lambda ctx: ctx.getpriv().eoh())
    m.set_body_callback(lambda ctx, chunk: ctx.getpriv().body(chunk))
    m.set_eom_callback(lambda ctx: ctx.getpriv().eom())
    m.set_abort_callback(lambda ctx: ctx.getpriv().abort())
    m.set_close_callback(Milter.close_callback)
    m.register(
        NAME,
        data=lambda ctx: ctx.getpriv().data(),
        unknown=lambda ctx, cmd: ctx.getpriv().unknown(cmd),
        negotiate=Milter.negotiate_callback,
    )


def _version() -> str:
    from heloguard import __version__

    return __version__


def _greylist_config(args: argparse.Namespace) -> GreylistConfig:
    """[greylist] of the config file, with --database or --dsn applied."""
    config = load(Path(args.config) if args.config else None)
    cfg = config.greylist or GreylistConfig()
    if args.database and args.dsn:
        raise ConfigError("--dsn", "give --database (SQLite) or --dsn (PostgreSQL), not both")
    if args.database:
        cfg = replace(cfg, backend="sqlite", database=args.database)
    if args.dsn:
        cfg = replace(cfg, backend="postgresql", dsn=args.dsn)
        try:
            cfg.validate()
        except ValueError as exc:
            raise ConfigError("--dsn", str(exc)) from None
    return cfg


def greylist_command(args: argparse.Namespace) -> int:
    """``heloguard greylist list|stats|allow|delete|purge|copy``, on either backend."""
    cfg = _greylist_config(args)
    store = Greylist(cfg)
    try:
        command = args.greylist_command
        if command == "stats":
            for k, v in store.stats().items():
                print(f"{k:18} {v}")
        elif command == "list":
            for client, sender, rcpt, _first, last, passed, attempts in store.rows():
                state = "passed" if passed else "pending"
                stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(int(str(last))))
                print(f"{stamp}  {state:7}  {client}  <{sender}> -> <{rcpt}>  attempts={attempts}")
        elif command == "purge":
            print(f"purged {store.purge()} expired rows")
        elif command == "allow":
            key = admin_key(args.client, cfg)
            store.allow(key)
            print(f"allowed {key}")
        elif command == "delete":
            key = admin_key(args.client, cfg)
            print(f"deleted {store.delete(key)} rows for {key}")
        elif command == "copy":
            return _greylist_copy(store, Path(args.source))
    except StoreError as exc:
        print(f"heloguard: greylist database error: {exc}", file=sys.stderr)
        return 1
    finally:
        store.close()
    return 0


def _greylist_copy(store: Greylist, path: Path) -> int:
    """Merge an SQLite greylist file into the configured store (a one-shot migration)."""
    if not path.is_file():
        print(f"heloguard: {path}: no such SQLite file", file=sys.stderr)
        return 1
    target = store.cfg
    if target.backend == "sqlite" and Path(target.database).resolve() == path.resolve():
        print(f"heloguard: {path} is the configured store itself", file=sys.stderr)
        return 1
    # read-only: the source is never changed, and may be in use by a running milter
    ro = replace(target, backend="sqlite", database=f"{path.resolve().as_uri()}?mode=ro")
    source = Greylist(ro)
    try:
        triplets, clients = store.copy_from(source)
    finally:
        source.close()
    print(f"copied {triplets} triplets and {clients} clients from {path} to {store.describe()}")
    return 0


def reload_command(args: argparse.Namespace) -> int:
    """Validate the config file, then touch it so the running daemon reloads it."""
    path = Path(args.config) if args.config else DEFAULT_PATH
    load(path)  # raises ConfigError (exit 78) when bad: the daemon would keep the old one
    now = time.time()
    os.utime(path, (now, now))
    print(
        f"heloguard: {path} is valid; the running daemon reloads it within {WATCH_INTERVAL:.0f} s"
    )
    return 0


def add_commands(
    sub: argparse._SubParsersAction[Any],
    common: Callable[[argparse.ArgumentParser], None],
) -> None:
    """Add ``serve`` and ``reload`` to the command line."""
    srv = sub.add_parser("serve", help="run the milter (foreground; never forks)")
    common(srv)
    srv.add_argument(
        "--socket", metavar="SPEC", help="unix:/path or inet:PORT@HOST (overrides [milter] socket)"
    )
    srv.add_argument(
        "--greylist",
        metavar="DB",
        help="greylist with this SQLite file (overrides [greylist] backend and database)",
    )
    srv.set_defaults(func=serve)
    grey = sub.add_parser(
        "greylist", help="inspect and manage the greylist (works while the milter runs)"
    )
    grey.add_argument(
        "--config", metavar="FILE", help="config file (default /etc/heloguard/heloguard.toml)"
    )
    grey.add_argument(
        "--database",
        metavar="PATH",
        help="this SQLite file (overrides [greylist] backend and database)",
    )
    grey.add_argument(
        "--dsn",
        metavar="DSN",
        help="this PostgreSQL database (overrides [greylist] backend and dsn)",
    )
    gsub = grey.add_subparsers(dest="greylist_command", required=True)
    gsub.add_parser("list", help="the most recent triplets").set_defaults(func=greylist_command)
    gsub.add_parser("stats", help="counts").set_defaults(func=greylist_command)
    gsub.add_parser("purge", help="delete expired rows now").set_defaults(func=greylist_command)
    for verb, text in (("allow", "never greylist this client"), ("delete", "forget this client")):
        p = gsub.add_parser(verb, help=text)
        p.add_argument("client", metavar="ADDR|CIDR|DOMAIN")
        p.set_defaults(func=greylist_command)
    cp = gsub.add_parser(
        "copy", help="merge an SQLite greylist file into the configured store (migration)"
    )
    cp.add_argument("--from", dest="source", metavar="PATH", required=True, help="the SQLite file")
    cp.set_defaults(func=greylist_command)
    rel = sub.add_parser("reload", help="validate the config file and make the daemon reload it")
    rel.add_argument(
        "--config", metavar="FILE", help="config file (default /etc/heloguard/heloguard.toml)"
    )
    rel.set_defaults(func=reload_command)
