"""Configuration: one TOML file, validated whole at start.

The schema is the set of frozen dataclasses below; their field defaults are
the embedded defaults that apply when no file exists.  An unknown key or a
bad value is a :class:`ConfigError` naming the key (``heloguard`` exits 78).
Rule sections (``[rules.NAME]``) take ``action`` plus the options that the
rule module declares.

Durations accept seconds as numbers or strings such as ``"500ms"``, ``"3s"``,
``"5m"``, ``"2h"``, ``"2d"``.
"""

from __future__ import annotations

import dataclasses
import grp
import ipaddress
import os
import pwd
import re
import socket
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

from heloguard import cpus
from heloguard.resolver import ResolverSettings, parse_nameserver
from heloguard.rules import REGISTRY

DEFAULT_PATH = Path("/etc/heloguard/heloguard.toml")
EMBEDDED = "<embedded defaults>"


class ConfigError(Exception):
    """A configuration problem, naming the key at fault."""

    def __init__(self, key: str, reason: str, source: str = "") -> None:
        self.key = key
        self.reason = reason
        self.source = source
        where = f"{source}: " if source else ""
        super().__init__(f"{where}{key}: {reason}" if key else f"{where}{reason}")


class Action(StrEnum):
    """What a rule's failure does."""

    REJECT = "reject"
    TEMPFAIL = "tempfail"
    WARN = "warn"
    OFF = "off"


class Mode(StrEnum):
    """The global policy mode, applied after every rule's action."""

    ENFORCE = "enforce"
    WARN = "warn"  # log what would happen, accept everything
    SOFT = "soft"  # every 5xx becomes the matching 4xx


Duration = typing.NewType("Duration", float)
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}
# Longest duration accepted: ten years.  TOML allows inf, nan and 1e400; such a
# [dns] budget passed validation and then made every callback raise (a wait
# longer than threading.TIMEOUT_MAX overflows).
MAX_DURATION = 3650 * 86400.0


def parse_duration(value: object) -> float:
    """Seconds from a number or a string like "5m"."""
    if isinstance(value, bool):
        raise ValueError("expected a duration, got a boolean")  # noqa: TRY004 - reported as a bad value
    seconds: float | int | None = None
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError("a duration cannot be negative")
        seconds = value
    elif isinstance(value, str):
        m = _DURATION.match(value)
        if m:
            seconds = float(m.group(1)) * _UNITS[m.group(2)]
    if seconds is not None:
        if not seconds <= MAX_DURATION:  # also false for nan
            raise ValueError(f"a duration must be finite and at most 3650 days, got {value!r}")
        return float(seconds)
    raise ValueError(f'expected a duration such as 30, "500ms", "5m", got {value!r}')


def _host_name() -> str:
    # gethostname() never touches DNS (getfqdn() may, and may hang).
    return socket.gethostname().lower()


@dataclass(frozen=True, slots=True)
class DnsConfig:
    """[dns]: where and how heloguard asks."""

    nameservers: tuple[str, ...] = ()  # "HOST" or "HOST:PORT"; empty: /etc/resolv.conf
    timeout: Duration = Duration(2.0)  # per question, retries included
    budget: Duration = Duration(8.0)  # per stage, all rounds; under Sendmail's 10 s
    cache_size: int = 20000
    min_ttl: int = 5
    max_ttl: int = 86400
    negative_min_ttl: int = 5
    negative_max_ttl: int = 3600
    temp_ttl: int = 2
    # a settled decision on a client stands for its repeat sessions this long
    # (never longer than the smallest TTL it rests on); 0 turns reuse off
    reuse_decisions: Duration = Duration(60.0)

    def resolver_settings(self) -> ResolverSettings:
        """The resolver's view of this section."""
        return ResolverSettings(
            nameservers=tuple(parse_nameserver(ns) for ns in self.nameservers),
            timeout=self.timeout,
            cache_size=self.cache_size,
            min_ttl=self.min_ttl,
            max_ttl=self.max_ttl,
            negative_min_ttl=self.negative_min_ttl,
            negative_max_ttl=self.negative_max_ttl,
            temp_ttl=self.temp_ttl,
        )


@dataclass(frozen=True, slots=True)
class PolicyConfig:
    """[policy]: the global mode and who "we" are."""

    mode: Mode = Mode.ENFORCE
    myhostnames: tuple[str, ...] = ()  # empty: this host's name
    mydomains: tuple[str, ...] = ()
    myaddresses: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class LogConfig:
    """[log]: where decisions go."""

    destination: Literal["stderr", "syslog"] = "stderr"
    facility: str = "mail"
    syslog_socket: str = "/dev/log"
    level: Literal["debug", "info", "warning", "error"] = "info"
    passes: bool = True  # also log one line per accepted session
    decisions: str = ""  # append one JSON record per decision to this file (replayable)


_SOCKET = re.compile(r"^(unix|local):/.+$|^inet6?:\d{1,5}(@.+)?$")


@dataclass(frozen=True, slots=True)
class MilterConfig:
    """[milter]: how the daemon meets the MTA."""

    socket: str = "unix:/run/heloguard/heloguard.sock"  # or inet:PORT@HOST
    reject_stage: Literal["helo", "rcpt"] = "helo"  # decide at HELO; answer then, or at RCPT
    disconnect: bool = False  # answer 421 at HELO so the MTA drops the client at once
    failure_policy: Literal["tempfail", "accept"] = "tempfail"  # after an internal error
    trusted_networks: tuple[str, ...] = ()  # never judged (loopback never is)
    submission_daemons: tuple[str, ...] = ("ORIGINATING", "MSA", "submission", "smtps")
    user: str = ""  # drop privileges to this user after binding
    group: str = ""
    socket_mode: str = "0660"  # unix socket permissions
    timeout: Duration = Duration(600.0)  # libmilter's I/O timeout with the MTA
    cpus: str = "one"  # "one", "all" or a CPU list such as "2" or "0-3" (heloguard.cpus)

    def validate(self) -> None:
        """Socket syntax, networks, mode and CPU list."""
        if not _SOCKET.match(self.socket):
            raise ValueError(f"socket {self.socket!r}: expected unix:/path or inet:PORT@HOST")
        for net in self.trusted_networks:
            try:
                ipaddress.ip_network(net, strict=False)
            except ValueError:
                raise ValueError(f"trusted_networks: not a network: {net!r}") from None
        if self.user:
            try:
                pwd.getpwnam(self.user)
            except KeyError:
                raise ValueError(f"user {self.user!r} does not exist") from None
        if self.group:
            try:
                grp.getgrnam(self.group)
            except KeyError:
                raise ValueError(f"group {self.group!r} does not exist") from None
        if not re.fullmatch(r"0?[0-7]{3}", self.socket_mode):
            raise ValueError(f'socket_mode {self.socket_mode!r}: expected octal such as "0660"')
        cpus.validate(self.cpus)

    @property
    def mode_bits(self) -> int:
        """The socket mode as a number."""
        return int(self.socket_mode, 8)


@dataclass(frozen=True, slots=True)
class ExceptionsConfig:
    """[exceptions]: wanted senders whose DNS is broken, never judged.

    ``addresses``: addresses or networks.  ``names``: host or domain names,
    honoured only when the client's PTR name is forward-confirmed (a PTR
    record alone is written by whoever holds the address block, so it earns
    nothing).
    """

    addresses: tuple[str, ...] = ()
    names: tuple[str, ...] = ()
    # Files of further exceptions, one address, network or name per line
    # ("#" starts a comment); reloaded when they change, validated first.
    files: tuple[str, ...] = ()

    def validate(self) -> None:
        """Every address must parse; every name must be a host name."""
        for net in self.addresses:
            try:
                ipaddress.ip_network(net, strict=False)
            except ValueError:
                raise ValueError(f"addresses: not an address or network: {net!r}") from None
        for name in self.names:
            if "." not in name.strip(".") or " " in name:
                raise ValueError(f"names: not a host or domain name: {name!r}")


MAX_DB_TIMEOUT = 5.0  # [greylist] db_timeout: well inside the MTA's milter timeouts (10 s and more)


@dataclass(frozen=True, slots=True)
class GreylistConfig:
    """[greylist]: present means greylisting is on.

    ``backend`` picks the store: ``"sqlite"`` (``database``, a file of this
    host's own) or ``"postgresql"`` (``dsn``, one database that every MX host
    shares; ``db_timeout`` bounds each decision, ``pool_size`` the connections).
    """

    backend: Literal["sqlite", "postgresql"] = "sqlite"
    database: str = "/var/lib/heloguard/greylist.sqlite"  # SQLite only
    dsn: str = ""  # PostgreSQL only: a libpq connection string or URI
    db_timeout: Duration = Duration(0.5)  # PostgreSQL only: the longest a decision waits for it
    pool_size: int = 8  # PostgreSQL only: connections per heloguard process, at most
    delay: Duration = Duration(300.0)
    retry_window: Duration = Duration(2 * 86400.0)
    expire: Duration = Duration(35 * 86400.0)
    auto_whitelist: int = 5  # passes before the whole client is whitelisted (0: never)
    policy: Literal["suspicious", "all"] = "suspicious"
    ipv4_mask: int = 24
    ipv6_mask: int = 64
    on_error: Literal["accept", "tempfail"] = "accept"
    busy_timeout: Duration = Duration(2.0)
    purge_interval: Duration = Duration(600.0)
    purge_batch: int = 1000

    def validate(self) -> None:
        """Masks and durations that make sense."""
        if not 8 <= self.ipv4_mask <= 32 or not 16 <= self.ipv6_mask <= 128:
            raise ValueError("ipv4_mask must be 8..32 and ipv6_mask 16..128")
        if self.retry_window <= self.delay:
            raise ValueError("retry_window must be longer than delay")
        if self.purge_batch < 1:
            raise ValueError("purge_batch must be at least 1")
        if not 0 < self.db_timeout <= MAX_DB_TIMEOUT:
            raise ConfigError(
                "greylist.db_timeout",
                f"must be more than 0 and at most {MAX_DB_TIMEOUT:g} s: the MTA waits for the "
                "milter meanwhile",
            )
        if self.pool_size < 1:
            raise ConfigError("greylist.pool_size", "must be at least 1")
        if self.backend == "postgresql":
            self._check_postgresql()

    def _check_postgresql(self) -> None:
        """A dsn is required and must parse; psycopg must be installed."""
        if not self.dsn.strip():
            raise ConfigError(
                "greylist.dsn",
                'required with backend = "postgresql": a libpq connection string such as '
                '"host=db.example.net dbname=heloguard user=heloguard"',
            )
        try:
            from psycopg import ProgrammingError
            from psycopg.conninfo import conninfo_to_dict
        except ImportError:
            raise ConfigError(
                "greylist.backend",
                '"postgresql" needs the Python package psycopg: '
                "pip install 'heloguard[postgresql]'",
            ) from None
        try:
            conninfo_to_dict(self.dsn)
        except ProgrammingError as exc:
            raise ConfigError(
                "greylist.dsn", f"not a libpq connection string: {' '.join(str(exc).split())}"
            ) from None


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    """[metrics]: a Prometheus endpoint, off unless ``listen`` is set."""

    listen: str = ""  # "127.0.0.1:9523"; keep it on loopback

    def validate(self) -> None:
        """HOST:PORT."""
        if self.listen:
            host, _, port = self.listen.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(
                    f"listen {self.listen!r}: expected HOST:PORT, such as 127.0.0.1:9523"
                )


@dataclass(frozen=True, slots=True)
class RuleConfig:
    """[rules.NAME]: the action on failure and the rule's own options."""

    action: Action
    options: Any


@dataclass(frozen=True, slots=True)
class Config:
    """The whole validated configuration."""

    dns: DnsConfig = field(default_factory=DnsConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    log: LogConfig = field(default_factory=LogConfig)
    milter: MilterConfig = field(default_factory=MilterConfig)
    exceptions: ExceptionsConfig = field(default_factory=ExceptionsConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    greylist: GreylistConfig | None = None  # present in the file: greylisting on
    rules: Mapping[str, RuleConfig] = field(default_factory=dict)
    extra: Mapping[str, Any] = field(default_factory=dict)  # sections owned by later modules
    source: str = EMBEDDED

    def rule(self, name: str) -> RuleConfig:
        """The settings of one rule."""
        return self.rules[name]

    @property
    def myhostnames(self) -> tuple[str, ...]:
        """Our own names, for helo_ours (defaults to this host's name)."""
        return self.policy.myhostnames or (_host_name(),)


# Sections that later modules add: name -> dataclass.  Kept here so that
# validation is complete; modules register with register_section().
_SECTIONS: dict[str, type[Any]] = {
    "dns": DnsConfig,
    "policy": PolicyConfig,
    "log": LogConfig,
    "milter": MilterConfig,
    "exceptions": ExceptionsConfig,
    "metrics": MetricsConfig,
}


def register_section(name: str, schema: type[Any]) -> None:
    """Let a module own a top-level section (for example ``[milter]``)."""
    _SECTIONS[name] = schema


def _convert(key: str, value: object, hint: Any) -> Any:
    """Check and convert one value against a type hint."""
    origin = get_origin(hint)
    if hint is Duration:
        return Duration(parse_duration(value))
    if hint is bool:
        if not isinstance(value, bool):
            raise ValueError(f"expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"expected an integer, got {value!r}")
        if value < 0:
            raise ValueError("must not be negative")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ValueError(f"expected a string, got {value!r}")
        return value
    if isinstance(hint, type) and issubclass(hint, StrEnum):
        try:
            return hint(value) if isinstance(value, str) else hint("\0")
        except ValueError:
            choices = ", ".join(f'"{m.value}"' for m in hint)
            raise ValueError(f"expected one of {choices}, got {value!r}") from None
    if origin is Literal:
        if value not in get_args(hint):
            choices = ", ".join(f'"{c}"' for c in get_args(hint))
            raise ValueError(f"expected one of {choices}, got {value!r}")
        return value
    if origin is tuple:
        inner = get_args(hint)[0]
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            raise ValueError(f"expected a list, got {value!r}")
        return tuple(_convert(f"{key}[{i}]", v, inner) for i, v in enumerate(value))
    if origin in (typing.Union, types.UnionType):
        args = [a for a in get_args(hint) if a is not type(None)]
        if value is None:
            return None
        return _convert(key, value, args[0])
    raise TypeError(f"no converter for {hint!r} at {key}")


def build_section(schema: type[Any], table: Mapping[str, object], prefix: str) -> Any:
    """Build a frozen dataclass from a TOML table, rejecting unknown keys."""
    if not isinstance(table, Mapping):
        raise ConfigError(prefix, "expected a table")
    hints = get_type_hints(schema)
    names = {f.name for f in dataclasses.fields(schema)}
    kwargs: dict[str, Any] = {}
    for key, value in table.items():
        full = f"{prefix}.{key}"
        if key not in names:
            known = ", ".join(sorted(names)) or "none"
            raise ConfigError(full, f"unknown key (known keys: {known})")
        try:
            kwargs[key] = _convert(full, value, hints[key])
        except ValueError as exc:
            raise ConfigError(full, str(exc)) from None
    try:
        obj = schema(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(prefix, str(exc)) from None
    check = getattr(obj, "validate", None)
    if callable(check):
        try:
            check()
        except ValueError as exc:
            raise ConfigError(prefix, str(exc)) from None
    return obj


def _build_rules(table: Mapping[str, object]) -> dict[str, RuleConfig]:
    if not isinstance(table, Mapping):
        raise ConfigError("rules", "expected a table of [rules.NAME] sections")
    unknown = set(table) - set(REGISTRY)
    if unknown:
        name = sorted(unknown)[0]
        raise ConfigError(f"rules.{name}", f"no such rule (rules: {', '.join(REGISTRY)})")
    out: dict[str, RuleConfig] = {}
    for name, rule in REGISTRY.items():
        section = table.get(name, {})
        if not isinstance(section, Mapping):
            raise ConfigError(f"rules.{name}", "expected a table")
        section = dict(section)
        raw_action = section.pop("action", rule.default_action)
        try:
            action = Action(raw_action)
        except ValueError:
            choices = ", ".join(f'"{a.value}"' for a in Action)
            raise ConfigError(
                f"rules.{name}.action", f"expected one of {choices}, got {raw_action!r}"
            ) from None
        options = build_section(rule.options, section, f"rules.{name}")
        out[name] = RuleConfig(action=action, options=options)
    return out


def _check_addresses(policy: PolicyConfig) -> None:
    for i, addr in enumerate(policy.myaddresses):
        try:
            ipaddress.ip_address(addr)
        except ValueError:
            raise ConfigError(f"policy.myaddresses[{i}]", f"not an IP address: {addr!r}") from None


def _fill_helo_ours(rules: dict[str, RuleConfig], policy: PolicyConfig) -> None:
    """helo_ours takes who "we" are from [policy] unless its own section says."""
    entry = rules.get("helo_ours")
    if entry is None:
        return
    opts = entry.options
    if opts.myhostnames or opts.mydomains or opts.myaddresses:
        return
    filled = dataclasses.replace(
        opts,
        myhostnames=policy.myhostnames or (_host_name(),),
        mydomains=policy.mydomains,
        myaddresses=policy.myaddresses,
    )
    rules["helo_ours"] = RuleConfig(entry.action, filled)


def read_exception_file(path: str) -> tuple[list[str], list[str]]:
    """Addresses/networks and names from one exceptions file (ConfigError names file:line)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError("exceptions.files", f"cannot read {path}: {exc}") from None
    addresses: list[str] = []
    names: list[str] = []
    for number, raw in enumerate(text.splitlines(), 1):
        entry = raw.split("#", 1)[0].strip().lower()
        if not entry:
            continue
        try:
            ipaddress.ip_network(entry, strict=False)
        except ValueError:
            if "." not in entry.strip(".") or not re.fullmatch(r"[a-z0-9.-]+", entry):
                raise ConfigError(
                    "exceptions.files",
                    f"{path}:{number}: not an address, network or name: {entry!r}",
                ) from None
            names.append(entry.strip("."))
        else:
            addresses.append(entry)
    return addresses, names


def _merge_exception_files(exc: ExceptionsConfig) -> ExceptionsConfig:
    addresses, names = list(exc.addresses), list(exc.names)
    for path in exc.files:
        more_addresses, more_names = read_exception_file(path)
        addresses += more_addresses
        names += more_names
    return dataclasses.replace(exc, addresses=tuple(addresses), names=tuple(names))


def _fill_rhsbl_sender(rules: dict[str, RuleConfig]) -> None:
    """rhsbl_sender asks the zones of [rules.rhsbl] unless given its own."""
    own, base = rules.get("rhsbl_sender"), rules.get("rhsbl")
    if own is None or base is None or own.options.zones:
        return
    filled = dataclasses.replace(
        own.options,
        zones=base.options.zones,
        threshold=base.options.threshold,
        on_timeout=base.options.on_timeout,
        txt=base.options.txt,
    )
    rules["rhsbl_sender"] = RuleConfig(own.action, filled)


def from_mapping(data: Mapping[str, object], source: str = EMBEDDED) -> Config:
    """Validate a parsed TOML document into a :class:`Config`."""
    try:
        sections: dict[str, Any] = {}
        for key in data:
            if key not in ("rules", "greylist") and key not in _SECTIONS:
                known = ", ".join(sorted([*_SECTIONS, "greylist", "rules"]))
                raise ConfigError(key, f"unknown section (sections: {known})")
        for name, schema in _SECTIONS.items():
            table = data.get(name, {})
            if not isinstance(table, Mapping):
                raise ConfigError(name, "expected a table")
            sections[name] = build_section(schema, table, name)
        dns_cfg: DnsConfig = sections.pop("dns")
        for i, ns in enumerate(dns_cfg.nameservers):
            try:
                parse_nameserver(ns)
            except ValueError as exc:
                raise ConfigError(f"dns.nameservers[{i}]", str(exc)) from None
        if dns_cfg.timeout <= 0 or dns_cfg.budget <= 0:
            raise ConfigError(
                "dns.timeout" if dns_cfg.timeout <= 0 else "dns.budget", "must be > 0"
            )
        policy: PolicyConfig = sections.pop("policy")
        _check_addresses(policy)
        rules_table = data.get("rules", {})
        rules = _build_rules(rules_table if isinstance(rules_table, Mapping) else {})
        _fill_helo_ours(rules, policy)
        _fill_rhsbl_sender(rules)
        greylist = None
        if "greylist" in data:
            table = data["greylist"]
            if not isinstance(table, Mapping):
                raise ConfigError("greylist", "expected a table")
            greylist = build_section(GreylistConfig, table, "greylist")
        return Config(
            greylist=greylist,
            dns=dns_cfg,
            policy=policy,
            log=sections.pop("log"),
            milter=sections.pop("milter"),
            exceptions=_merge_exception_files(sections.pop("exceptions")),
            metrics=sections.pop("metrics"),
            rules=rules,
            extra=sections,
            source=source,
        )
    except ConfigError as exc:
        if not exc.source:
            raise ConfigError(exc.key, exc.reason, source) from None
        raise


def load(path: str | os.PathLike[str] | None = None) -> Config:
    """Load and validate a config file.

    With no path, ``/etc/heloguard/heloguard.toml`` is read when it exists and
    the embedded defaults apply when it does not (that is not an error).
    """
    if path is None:
        if not DEFAULT_PATH.exists():
            return from_mapping({})
        path = DEFAULT_PATH
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError("", f"cannot read: {exc.strerror or exc}", str(p)) from None
    except UnicodeDecodeError:
        raise ConfigError("", "not UTF-8 text", str(p)) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("", f"TOML syntax error: {exc}", str(p)) from None
    return from_mapping(data, str(p))


def with_overrides(config: Config, **changes: Any) -> Config:
    """A copy of ``config`` with top-level sections replaced."""
    return dataclasses.replace(config, **changes)
