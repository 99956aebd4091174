"""Who is never judged: loopback, trusted networks, the MTA's submission
service, and exceptions for wanted senders whose DNS is broken.

Everything here is known at connect except name exceptions, which need the
client's verified (forward-confirmed) names: a PTR record alone is written
by whoever holds the address block, so an unconfirmed PTR name never earns
an exception.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from heloguard.answers import IPAddress, normalize_name
from heloguard.config import Config

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def _networks(texts: Iterable[str]) -> tuple[IPNetwork, ...]:
    return tuple(ipaddress.ip_network(t, strict=False) for t in texts)


@dataclass(frozen=True, slots=True)
class Gate:
    """The rules for not judging a client at all."""

    trusted: tuple[IPNetwork, ...] = ()
    submission_daemons: frozenset[str] = frozenset()
    exception_networks: tuple[IPNetwork, ...] = ()
    exception_names: tuple[str, ...] = ()

    @classmethod
    def from_config(cls, config: Config) -> Gate:
        """Build the gate from ``[milter]`` and ``[exceptions]``."""
        return cls(
            trusted=_networks(config.milter.trusted_networks),
            submission_daemons=frozenset(config.milter.submission_daemons),
            exception_networks=_networks(config.exceptions.addresses),
            exception_names=tuple(normalize_name(n) for n in config.exceptions.names),
        )

    def skip_reason(self, client: IPAddress | None, daemon_name: str | None = None) -> str:
        """Why this connection is not judged ("" when it is)."""
        if client is None:
            return "no client IP address (local or unix-socket connection)"
        if client.is_loopback:
            return "loopback client"
        if daemon_name and daemon_name in self.submission_daemons:
            return f"submission service (daemon {daemon_name})"
        for net in self.trusted:
            if client in net:
                return f"trusted network {net}"
        for net in self.exception_networks:
            if client in net:
                return f"exception {net}"
        return ""

    def name_exception(self, verified: Sequence[str]) -> str:
        """The exception that a verified name earns ("" when none)."""
        for raw in verified:
            name = normalize_name(raw)
            for entry in self.exception_names:
                if name == entry or name.endswith("." + entry):
                    return f"exception {entry} (verified name {name})"
        return ""
