"""DNS questions and answers as plain values.

Every DNS lookup heloguard makes ends as an :class:`Answer` whose status is one
of four values, never as an exception:

``OK``        the name has records of the type asked (``records`` holds them);
``NXDOMAIN``  the name does not exist (permanent);
``NODATA``    the name exists but has no records of that type (permanent);
``TEMP``      the question could not be answered now: SERVFAIL, REFUSED, a
              timeout, no nameserver, or the stage's time budget ran out.

Rules judge these values; the engine guarantees that a permanent rejection
never rests on a ``TEMP`` answer.  Names are kept in lower case without the
trailing dot, in dnspython's escaped text form, so odd bytes in an attacker's
zone arrive as ``\\DDD`` escapes and never as raw control characters.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from enum import StrEnum

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class Status(StrEnum):
    """The four outcomes of a DNS question."""

    OK = "OK"
    NXDOMAIN = "NXDOMAIN"
    NODATA = "NODATA"
    TEMP = "TEMP"

    @property
    def permanent_negative(self) -> bool:
        """True for NXDOMAIN and NODATA: the data is known not to exist."""
        return self in (Status.NXDOMAIN, Status.NODATA)


class Origin(StrEnum):
    """Where an answer came from, for the evidence and the statistics."""

    NETWORK = "network"  # asked a nameserver for it
    CACHE = "cache"  # answered from the cache
    MERGED = "merged"  # joined an identical question already in flight
    SUPPLIED = "supplied"  # given by the caller (dry-run --ptr, a replayed record)
    BUDGET = "budget"  # the stage budget ran out before it was answered


RDTYPES = ("A", "AAAA", "PTR", "MX", "TXT", "CNAME", "NS", "SOA")


def normalize_name(name: str) -> str:
    """Lower-case a domain name and drop the trailing dot."""
    return name.rstrip(".").lower() if name != "." else "."


@dataclass(frozen=True, slots=True, order=True)
class Query:
    """A DNS question: the name (normalized) and the record type."""

    name: str
    rdtype: str

    @classmethod
    def of(cls, name: str, rdtype: str) -> Query:
        """Build a query, normalizing the name."""
        return cls(normalize_name(name), rdtype.upper())

    def __str__(self) -> str:
        return f"{self.name}/{self.rdtype}"


@dataclass(frozen=True, slots=True)
class Answer:
    """The answer to one :class:`Query`, as a value."""

    query: Query
    status: Status
    records: tuple[str, ...] = ()
    ttl: int = 0
    reason: str = ""  # for TEMP: SERVFAIL, REFUSED, timeout...; free text
    canonical: str | None = None  # target name when a CNAME chain was followed
    origin: Origin = Origin.NETWORK
    elapsed: float = field(default=0.0, compare=False)

    @property
    def ok(self) -> bool:
        """True when the name has records of the type asked."""
        return self.status is Status.OK

    @property
    def temp(self) -> bool:
        """True when the question could not be answered now."""
        return self.status is Status.TEMP

    def addresses(self) -> tuple[IPAddress, ...]:
        """The A/AAAA records as address objects (malformed ones dropped)."""
        out: list[IPAddress] = []
        for rec in self.records:
            try:
                out.append(ipaddress.ip_address(rec))
            except ValueError:
                continue
        return tuple(out)

    def summary(self) -> str:
        """One short line: ``name/TYPE STATUS records ttl=N``."""
        head = f"{self.query} {self.status}"
        if self.records:
            shown = ",".join(self.records[:8])
            more = f",+{len(self.records) - 8}" if len(self.records) > 8 else ""
            head += f" {shown}{more}"
        if self.canonical:
            head += f" cname={self.canonical}"
        if self.reason:
            head += f" ({self.reason})"
        return f"{head} ttl={self.ttl}"

    def to_json(self) -> dict[str, object]:
        """The answer as a JSON-ready dict (the shape of the evidence)."""
        out: dict[str, object] = {
            "name": self.query.name,
            "type": self.query.rdtype,
            "status": str(self.status),
            "records": list(self.records),
            "ttl": self.ttl,
            "origin": str(self.origin),
        }
        if self.reason:
            out["reason"] = self.reason
        if self.canonical:
            out["canonical"] = self.canonical
        return out

    @classmethod
    def from_json(cls, data: dict[str, object]) -> Answer:
        """Rebuild an answer recorded by :meth:`to_json`."""
        records = data.get("records", [])
        if not isinstance(records, list):
            raise TypeError("records must be a list")
        canonical = data.get("canonical")
        return cls(
            query=Query.of(str(data["name"]), str(data["type"])),
            status=Status(str(data["status"])),
            records=tuple(str(r) for r in records),
            ttl=int(str(data.get("ttl", 0))),
            reason=str(data.get("reason", "")),
            canonical=str(canonical) if canonical else None,
            origin=Origin.SUPPLIED,
        )
