"""A small authoritative DNS server for tests, built on dnspython only.

It answers real DNS packets over UDP and TCP on one loopback port, so real
resolvers (dnspython's, glibc's in Postfix) can talk to it.  It serves zones
from ``*.zone`` files and from zone text added at run time, and it can inject
faults (latency, SERVFAIL, REFUSED, dropped packets, forced truncation,
forced NXDOMAIN) per name and type, and spoofing faults that hand the client
records it did not ask for (``additional``, ``foreign_answer``,
``wrong_question``: see ``set_fault``).

In a test::

    with DNSServer(zone_dir=Path("tests/zones")) as dns_server:
        dns_server.add_zone_text("example.test.", ZONE_TEXT)
        dns_server.set_fault("slow.example.test", "delay", delay=0.3)
        resolver.nameservers = [
            dns.nameserver.Do53Nameserver(dns_server.host, dns_server.port)
        ]
        ...
        assert dns_server.count("slow.example.test", "A") == 1

The server runs its own asyncio loop on a daemon thread, so the test thread
may make blocking calls.  Every fault and the ``latency`` attribute can be
changed from the test thread at any time.

From a shell (for manual checks, benchmarks and MTA tests)::

    python tests/dnsserver.py --zones tests/zones --port 5353 \
        [--host 127.0.0.1] [--latency 0.05] [--faults faults.toml]

prints ``listening 127.0.0.1:5353`` and serves until SIGTERM or SIGINT.

Conventions:

* ``nameserver`` is ``"HOST:PORT"`` for IPv4 and ``"[HOST]:PORT"`` for IPv6
  (e.g. ``"[::1]:40123"``).
* Names in the query log, and the names ``count()`` takes, are lower case and
  without the trailing dot (``"www.example.test"``); the root is ``"."``.
* Zone names always answer as authoritative: delegations (NS below the
  origin) are not followed, DNAME is not implemented.  ``*`` wildcards are
  synthesised as in RFC 4592 (closest encloser, empty non-terminals block).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import socket
import struct
import sys
import threading
import time
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any, cast

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.node
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdataset
import dns.rdatatype
import dns.rrset
import dns.zone

__all__ = ["FAULT_KINDS", "DNSServer", "Fault", "QueryRecord", "main"]

log = logging.getLogger("dnsserver")

#: The fault kinds ``set_fault`` accepts.
FAULT_KINDS = frozenset(
    {
        "delay",
        "servfail",
        "refused",
        "drop",
        "truncate",
        "nxdomain",
        # spoofing faults; each takes ``records`` (master-file lines, absolute owner names)
        "additional",  # the normal answer, with the records stuffed into the additional section
        "foreign_answer",  # NOERROR whose answer section holds only the records (other names)
        "wrong_question",  # a response to another question: the first record's name and type
    }
)
#: The fault kinds that need ``records``.
RECORD_FAULTS = frozenset({"additional", "foreign_answer", "wrong_question"})

#: EDNS payload we advertise, and the largest UDP answer we ever send.
EDNS_PAYLOAD = 1232
#: UDP limit for clients without EDNS (RFC 1035).
CLASSIC_UDP_LIMIT = 512
#: How many CNAMEs one answer follows at most.
MAX_CNAME_CHAIN = 8

_HEADER = struct.Struct("!HHHHHH")
_LENGTH = struct.Struct("!H")
_MAX_MESSAGE = 65535
_QR_BYTE_MASK = 0x80  # QR flag as it appears in the third byte of the header
_FORMERR = 1


def _norm(name: str | dns.name.Name) -> str:
    """The query-log form of a name: lower case, no trailing dot, root is ``"."``."""
    if isinstance(name, str):
        name = dns.name.from_text(name)
    return name.to_text(omit_final_dot=True).lower()


@dataclass(frozen=True)
class QueryRecord:
    """One query the server received."""

    name: str  # lower case, no trailing dot
    qtype: str  # e.g. "A", "PTR"
    transport: str  # "udp" or "tcp"
    time: float  # time.monotonic() at receipt
    client: str  # "address:port" of the client


@dataclass
class Fault:
    """An injected fault, as ``faults()`` reports it."""

    name: dns.name.Name
    kind: str
    qtype: dns.rdatatype.RdataType | None
    delay: float
    remaining: int | None  # None: until cleared
    records: tuple[str, ...] = ()  # for the spoofing kinds: master-file lines


def _parse_records(lines: Iterable[str]) -> list[dns.rrset.RRset]:
    """RRsets from lines such as ``mail.example.test. 300 IN A 192.0.2.1`` (ValueError if bad)."""
    out: list[dns.rrset.RRset] = []
    for line in lines:
        parts = line.split(None, 4)
        if len(parts) != 5 or not parts[0].endswith("."):
            raise ValueError(f"record {line!r}: expected 'NAME. TTL CLASS TYPE RDATA'")
        name, ttl, rdclass, rdtype, rdata = parts
        try:
            out.append(dns.rrset.from_text(name, int(ttl), rdclass, rdtype, rdata))
        except (dns.exception.DNSException, ValueError) as exc:
            raise ValueError(f"record {line!r}: {exc}") from exc
    return out


class _ServedZone:
    """A zone prepared for answering: absolute names and the set of names that exist."""

    def __init__(self, zone: dns.zone.Zone) -> None:
        if zone.origin is None:
            raise ValueError("zone has no origin")
        if zone.rdclass != dns.rdataclass.IN:
            raise ValueError(f"zone {zone.origin}: only class IN is served")
        if zone.relativize:
            # Re-read with absolute names, so rdata (CNAME targets) is absolute too.
            zone = dns.zone.from_text(
                zone.to_text(relativize=False),
                origin=zone.origin,
                relativize=False,
                check_origin=False,
            )
        assert zone.origin is not None
        self.zone = zone
        self.origin: dns.name.Name = zone.origin
        soa = zone.get_rdataset(self.origin, dns.rdatatype.SOA)
        if soa is None or len(soa) == 0:
            raise ValueError(f"zone {self.origin} has no SOA record at its origin")
        self.soa: dns.rdataset.Rdataset = soa
        # Every name that exists: names with records, and their ancestors up to
        # the origin (the empty non-terminals).
        self.names: set[dns.name.Name] = {self.origin}
        for name, node in zone.nodes.items():
            if len(node.rdatasets) == 0:
                continue
            current = name
            while current != self.origin and current not in self.names:
                self.names.add(current)
                current = current.parent()

    def soa_rrset(self) -> dns.rrset.RRset:
        """The SOA for the authority section, with the negative-caching TTL (RFC 2308)."""
        ttl = min(self.soa.ttl, self.soa[0].minimum)
        return dns.rrset.from_rdata_list(self.origin, ttl, list(self.soa))

    def lookup(self, name: dns.name.Name) -> tuple[dns.node.Node | None, bool]:
        """The node answering ``name`` (exact or wildcard) and whether the name exists."""
        if name in self.names:
            node = self.zone.get_node(name)
            if node is not None and len(node.rdatasets) > 0:
                return node, True
            return None, True  # an empty non-terminal
        encloser = name.parent()
        while encloser not in self.names:
            encloser = encloser.parent()
        wildcard = self.zone.get_node(dns.name.Name((b"*", *encloser.labels)))
        if wildcard is not None and len(wildcard.rdatasets) > 0:
            return wildcard, True
        return None, False


def _origin_of_file(path: Path) -> str:
    """The zone origin for a file: its leading ``$ORIGIN``, else its name minus ``.zone``."""
    with path.open(encoding="utf-8") as f:
        for raw in f:
            line = raw.split(";", 1)[0].strip()
            if not line or line.upper().startswith("$TTL"):
                continue
            parts = line.split()
            if parts[0].upper() == "$ORIGIN" and len(parts) >= 2:
                return parts[1]
            break
    return path.name.removesuffix(".zone") + "."


def _formerr_for(data: bytes) -> bytes | None:
    """A bare FORMERR header for an unparsable query, or None when not worth answering."""
    if len(data) < _HEADER.size or data[2] & _QR_BYTE_MASK:
        return None
    (qid,) = _LENGTH.unpack_from(data, 0)
    opcode = (data[2] >> 3) & 0x0F
    flags = dns.flags.QR | (opcode << 11) | _FORMERR
    return _HEADER.pack(qid, flags, 0, 0, 0, 0)


class _UDPProtocol(asyncio.DatagramProtocol):
    def __init__(self, server: DNSServer) -> None:
        self.server = server
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # asyncio's selector datagram transport does not subclass DatagramTransport.
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        if self.transport is not None:
            self.server._on_udp(self.transport, data, addr)

    def error_received(self, exc: Exception) -> None:
        # ICMP errors for earlier answers (client went away): nothing to do.
        log.debug("udp error: %s", exc)


class DNSServer:
    """An authoritative DNS server on loopback, for tests.  See the module docstring."""

    def __init__(
        self,
        zone_dir: Path | None = None,
        zones: Iterable[dns.zone.Zone] = (),
        host: str = "127.0.0.1",
        port: int = 0,
        latency: float = 0.0,
    ) -> None:
        self.host = host
        self.port = port
        self._requested_port = port
        self._family = socket.AF_INET6 if ":" in host else socket.AF_INET
        #: Seconds added to every answer; may be changed at any time.
        self.latency = latency
        #: Packets that could not be parsed as DNS queries.
        self.malformed = 0
        self._lock = threading.Lock()
        self._zones: dict[dns.name.Name, _ServedZone] = {}
        self._faults: dict[tuple[dns.name.Name, dns.rdatatype.RdataType | None], Fault] = {}
        self._log: list[QueryRecord] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping: asyncio.Event | None = None
        # Loop-thread state for TCP: open connections, their handler tasks, delayed answers.
        self._tcp_writers: set[asyncio.StreamWriter] = set()
        self._tcp_handlers: set[asyncio.Task[Any]] = set()
        self._send_tasks: set[asyncio.Task[None]] = set()
        if zone_dir is not None:
            self.load_zone_dir(zone_dir)
        for zone in zones:
            self.add_zone(zone)

    # ------------------------------------------------------------------ zones

    def add_zone(self, zone: dns.zone.Zone) -> None:
        """Serve ``zone`` (replacing any zone with the same origin)."""
        served = _ServedZone(zone)
        with self._lock:
            self._zones = {**self._zones, served.origin: served}

    def add_zone_text(self, origin: str, text: str) -> None:
        """Serve a zone given as master-file text; relative names are relative to ``origin``."""
        zone = dns.zone.from_text(text, origin=origin, relativize=False, check_origin=False)
        self.add_zone(zone)

    def add_zone_file(self, path: Path) -> None:
        """Serve one zone file: origin from its leading ``$ORIGIN``, else its name minus .zone."""
        try:
            zone = dns.zone.from_file(
                str(path),
                origin=_origin_of_file(path),
                relativize=False,
                check_origin=False,
            )
            self.add_zone(zone)
        except (dns.exception.DNSException, ValueError) as exc:
            raise ValueError(f"{path}: {exc}") from exc

    def load_zone_dir(self, zone_dir: Path) -> None:
        """Serve every ``*.zone`` file in ``zone_dir``."""
        if not zone_dir.is_dir():
            raise FileNotFoundError(f"zone directory {zone_dir} does not exist")
        for path in sorted(zone_dir.glob("*.zone")):
            self.add_zone_file(path)

    def zone_origins(self) -> list[str]:
        """The origins served, in query-log form."""
        return sorted(_norm(origin) for origin in self._zones)

    def _find_zone(self, name: dns.name.Name) -> _ServedZone | None:
        """The closest enclosing zone: walk up from ``name`` (benchmarks serve thousands)."""
        zones = self._zones
        while True:
            served = zones.get(name)
            if served is not None:
                return served
            if len(name.labels) <= 1:  # the root
                return None
            name = name.parent()

    # ----------------------------------------------------------------- faults

    def set_fault(
        self,
        name: str,
        kind: str,
        qtype: str | None = None,
        delay: float = 0.0,
        count: int | None = None,
        records: Iterable[str] = (),
    ) -> None:
        """Inject a fault for ``name`` and every name below it.

        ``kind`` is one of ``FAULT_KINDS``; ``qtype`` None means every type;
        ``delay`` seconds pass before the (faulty or normal) answer; ``count``
        limits the fault to the next N queries it affects.  A fault set again
        for the same name and qtype replaces the earlier one.  Of several
        matching faults the one with the longest name wins, then one with a
        qtype over one without.  ``truncate`` does not affect TCP queries, and
        those do not use up its ``count``.

        The spoofing kinds take ``records``, master-file lines with absolute
        owner names (``"mail.example.test. 300 IN A 192.0.2.1"``):
        ``additional`` answers normally and adds them to the additional
        section; ``foreign_answer`` answers NOERROR with only them in the
        answer section; ``wrong_question`` answers as if asked about the
        first record's name and type (question section rewritten), with them
        in the answer section.
        """
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {kind!r}; expected one of {sorted(FAULT_KINDS)}")
        records = tuple(records)
        if (kind in RECORD_FAULTS) != bool(records):
            raise ValueError(f"fault kind {kind!r}: records are needed by {sorted(RECORD_FAULTS)}")
        _parse_records(records)
        if delay < 0:
            raise ValueError("delay must be >= 0")
        if count is not None and count < 1:
            raise ValueError("count must be >= 1 or None")
        rdtype = dns.rdatatype.from_text(qtype) if qtype is not None else None
        fault = Fault(dns.name.from_text(name), kind, rdtype, float(delay), count, records)
        with self._lock:
            self._faults[(fault.name, rdtype)] = fault

    def clear_faults(self) -> None:
        """Remove every fault (``latency`` is left alone)."""
        with self._lock:
            self._faults.clear()

    def faults(self) -> list[Fault]:
        """Copies of the faults in force."""
        with self._lock:
            return [
                Fault(f.name, f.kind, f.qtype, f.delay, f.remaining, f.records)
                for f in self._faults.values()
            ]

    def load_faults(self, path: Path | str) -> None:
        """Add the faults of a TOML file (and set ``latency`` if it has one).

        Format: an optional top-level ``latency = 0.05`` and ``[[fault]]``
        tables with ``name``, ``kind`` and optional ``qtype``, ``delay``,
        ``count``.
        """
        with Path(path).open("rb") as f:
            data = tomllib.load(f)
        unknown = set(data) - {"latency", "fault"}
        if unknown:
            raise ValueError(f"{path}: unknown keys {sorted(unknown)}")
        entries = data.get("fault", [])
        if not isinstance(entries, list):
            raise TypeError(f"{path}: 'fault' must be an array of tables ([[fault]])")
        allowed = {"name", "kind", "qtype", "delay", "count", "records"}
        for entry in entries:
            if not isinstance(entry, dict) or "name" not in entry or "kind" not in entry:
                raise ValueError(f"{path}: every [[fault]] needs 'name' and 'kind'")
            extra = set(entry) - allowed
            if extra:
                raise ValueError(f"{path}: unknown fault keys {sorted(extra)}")
            self.set_fault(
                str(entry["name"]),
                str(entry["kind"]),
                qtype=entry.get("qtype"),
                delay=float(entry.get("delay", 0.0)),
                count=entry.get("count"),
                records=entry.get("records", ()),
            )
        if "latency" in data:
            latency = float(data["latency"])
            if latency < 0:
                raise ValueError(f"{path}: latency must be >= 0")
            self.latency = latency

    def _take_fault(
        self, qname: dns.name.Name, qtype: dns.rdatatype.RdataType, transport: str
    ) -> Fault | None:
        """The fault for this query, using up one of its ``count``."""
        with self._lock:
            best: Fault | None = None
            best_rank = (-1, False)
            for fault in self._faults.values():
                if fault.qtype is not None and fault.qtype != qtype:
                    continue
                if not qname.is_subdomain(fault.name):
                    continue
                rank = (len(fault.name.labels), fault.qtype is not None)
                if rank > best_rank:
                    best, best_rank = fault, rank
            if best is None or (best.kind == "truncate" and transport == "tcp"):
                return None
            if best.remaining is not None:
                best.remaining -= 1
                if best.remaining <= 0:
                    del self._faults[(best.name, best.qtype)]
            return Fault(best.name, best.kind, best.qtype, best.delay, best.remaining, best.records)

    # ------------------------------------------------------------- query log

    def queries(self) -> list[QueryRecord]:
        """Every query received since start (or ``reset_log``), oldest first."""
        with self._lock:
            return list(self._log)

    def count(self, name: str, qtype: str | None = None) -> int:
        """How many queries for exactly ``name`` (any case, dot optional) and ``qtype``."""
        wanted = _norm(name)
        wanted_type = dns.rdatatype.to_text(dns.rdatatype.from_text(qtype)) if qtype else None
        with self._lock:
            return sum(
                1
                for q in self._log
                if q.name == wanted and (wanted_type is None or q.qtype == wanted_type)
            )

    def reset_log(self) -> None:
        """Forget the queries received so far."""
        with self._lock:
            self._log.clear()

    # ------------------------------------------------------------- answering

    def _process(self, data: bytes, transport: str, client: str) -> tuple[bytes | None, float]:
        """The wire answer to one packet (None: say nothing) and how long to wait first."""
        try:
            query = dns.message.from_wire(data)
        except Exception:  # any parse failure means a malformed packet
            self.malformed += 1
            return _formerr_for(data), 0.0
        if query.flags & dns.flags.QR:
            self.malformed += 1
            return None, 0.0  # a response: never answer those
        try:
            return self._answer_query(query, transport, client)
        except Exception:  # a bug here must not kill the server
            log.exception("internal error answering %s", query.question)
            response = dns.message.make_response(query, our_payload=EDNS_PAYLOAD)
            response.set_rcode(dns.rcode.SERVFAIL)
            return response.to_wire(), 0.0

    def _answer_query(
        self, query: dns.message.Message, transport: str, client: str
    ) -> tuple[bytes | None, float]:
        response = dns.message.make_response(query, our_payload=EDNS_PAYLOAD)
        if query.opcode() != dns.opcode.QUERY:
            response.set_rcode(dns.rcode.NOTIMP)
            return response.to_wire(), 0.0
        if len(query.question) != 1:
            response.set_rcode(dns.rcode.FORMERR)
            return response.to_wire(), 0.0
        question = query.question[0]
        qname, qtype = question.name, dns.rdatatype.RdataType(question.rdtype)
        record = QueryRecord(
            _norm(qname), dns.rdatatype.to_text(qtype), transport, time.monotonic(), client
        )
        with self._lock:
            self._log.append(record)

        fault = self._take_fault(qname, qtype, transport)
        delay = self.latency + (fault.delay if fault else 0.0)
        kind = fault.kind if fault else None
        if kind == "drop":
            return None, 0.0
        if kind == "servfail":
            response.set_rcode(dns.rcode.SERVFAIL)
        elif kind == "refused":
            response.set_rcode(dns.rcode.REFUSED)
        elif kind == "truncate":
            response.flags |= dns.flags.TC | dns.flags.AA
        elif kind == "nxdomain":
            response.flags |= dns.flags.AA
            response.set_rcode(dns.rcode.NXDOMAIN)
            served = self._find_zone(qname)
            if served is not None:
                response.authority.append(served.soa_rrset())
        elif kind in RECORD_FAULTS and fault is not None:
            self._spoof(kind, fault.records, qname, qtype, response)
        elif question.rdclass != dns.rdataclass.IN or qtype in (
            dns.rdatatype.AXFR,
            dns.rdatatype.IXFR,
        ):
            response.set_rcode(dns.rcode.REFUSED)
        else:
            self._resolve(qname, qtype, response)

        try:
            # An explicit size: by default dnspython caps at the client's EDNS payload.
            wire = response.to_wire(max_size=_MAX_MESSAGE)
        except dns.exception.TooBig:
            response.answer, response.authority, response.additional = [], [], []
            response.set_rcode(dns.rcode.SERVFAIL)
            wire = response.to_wire()
        if transport == "udp":
            limit = (
                min(max(query.payload, CLASSIC_UDP_LIMIT), EDNS_PAYLOAD)
                if query.edns >= 0
                else CLASSIC_UDP_LIMIT
            )
            if len(wire) > limit:
                response.answer, response.authority, response.additional = [], [], []
                response.flags |= dns.flags.TC
                wire = response.to_wire()
        return wire, delay

    def _spoof(
        self,
        kind: str,
        records: tuple[str, ...],
        qname: dns.name.Name,
        qtype: dns.rdatatype.RdataType,
        response: dns.message.Message,
    ) -> None:
        """Fill ``response`` for a spoofing fault (see ``set_fault``)."""
        rrsets = _parse_records(records)
        if kind == "additional":
            self._resolve(qname, qtype, response)
            response.additional.extend(rrsets)
            return
        response.flags |= dns.flags.AA
        response.answer.extend(rrsets)
        if kind == "wrong_question":
            first = rrsets[0]
            response.question = [dns.rrset.RRset(first.name, dns.rdataclass.IN, first.rdtype)]

    def _resolve(
        self, qname: dns.name.Name, qtype: dns.rdatatype.RdataType, response: dns.message.Message
    ) -> None:
        """Fill ``response`` from the zones, following CNAMEs within them."""
        served = self._find_zone(qname)
        if served is None:
            response.set_rcode(dns.rcode.REFUSED)
            return
        response.flags |= dns.flags.AA
        name = qname
        seen: set[dns.name.Name] = set()
        for _ in range(MAX_CNAME_CHAIN + 1):
            seen.add(name)
            node, exists = served.lookup(name)
            if node is None:
                if not exists:
                    response.set_rcode(dns.rcode.NXDOMAIN)
                response.authority.append(served.soa_rrset())
                return
            if qtype == dns.rdatatype.ANY:
                for rds in node.rdatasets:
                    response.answer.append(dns.rrset.from_rdata_list(name, rds.ttl, list(rds)))
                return
            if qtype != dns.rdatatype.CNAME:
                cname = node.get_rdataset(dns.rdataclass.IN, dns.rdatatype.CNAME)
                if cname is not None and len(cname) > 0:
                    response.answer.append(dns.rrset.from_rdata_list(name, cname.ttl, list(cname)))
                    target: dns.name.Name = cname[0].target
                    next_zone = self._find_zone(target)
                    if next_zone is None or target in seen:
                        return  # leaves our zones, or loops: the client takes it from here
                    served, name = next_zone, target
                    continue
            rds = node.get_rdataset(dns.rdataclass.IN, qtype)
            if rds is not None and len(rds) > 0:
                response.answer.append(dns.rrset.from_rdata_list(name, rds.ttl, list(rds)))
            else:
                response.authority.append(served.soa_rrset())
            return
        # Chain longer than MAX_CNAME_CHAIN: answer with what we have.

    # ------------------------------------------------------------ transports

    def _on_udp(
        self, transport: asyncio.DatagramTransport, data: bytes, addr: tuple[str | Any, int]
    ) -> None:
        wire, delay = self._process(data, "udp", f"{addr[0]}:{addr[1]}")
        if wire is None:
            return
        if delay > 0:
            assert self._loop is not None
            self._loop.call_later(delay, self._udp_send, transport, wire, addr)
        else:
            self._udp_send(transport, wire, addr)

    @staticmethod
    def _udp_send(
        transport: asyncio.DatagramTransport, wire: bytes, addr: tuple[str | Any, int]
    ) -> None:
        if not transport.is_closing():
            transport.sendto(wire, addr)

    async def _tcp_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._tcp_writers.add(writer)
        handler = asyncio.current_task()
        if handler is not None:
            self._tcp_handlers.add(handler)
        peer = writer.get_extra_info("peername")
        client = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        pending: set[asyncio.Task[None]] = set()
        try:
            while True:
                try:
                    (length,) = _LENGTH.unpack(await reader.readexactly(_LENGTH.size))
                    data = await reader.readexactly(length)
                except (asyncio.IncompleteReadError, ConnectionError):
                    break
                wire, delay = self._process(data, "tcp", client)
                if wire is None:
                    continue
                if delay > 0:
                    task = asyncio.create_task(self._tcp_send_later(writer, wire, delay))
                    pending.add(task)
                    task.add_done_callback(pending.discard)
                    self._send_tasks.add(task)
                    task.add_done_callback(self._send_tasks.discard)
                else:
                    self._tcp_write(writer, wire)
            if pending:  # the client finished sending; let delayed answers go out
                await asyncio.gather(*pending, return_exceptions=True)
        finally:
            for task in pending:
                task.cancel()
            self._tcp_writers.discard(writer)
            if handler is not None:
                self._tcp_handlers.discard(handler)
            writer.close()

    async def _tcp_send_later(
        self, writer: asyncio.StreamWriter, wire: bytes, delay: float
    ) -> None:
        await asyncio.sleep(delay)
        self._tcp_write(writer, wire)
        with contextlib.suppress(ConnectionError):
            await writer.drain()

    @staticmethod
    def _tcp_write(writer: asyncio.StreamWriter, wire: bytes) -> None:
        if not writer.is_closing():
            writer.write(_LENGTH.pack(len(wire)) + wire)

    # ------------------------------------------------------------- lifecycle

    @property
    def nameserver(self) -> str:
        """``"HOST:PORT"``, or ``"[HOST]:PORT"`` for IPv6."""
        if self._family == socket.AF_INET6:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"

    def _bind_once(self, port: int) -> tuple[socket.socket, socket.socket]:
        udp = socket.socket(self._family, socket.SOCK_DGRAM)
        tcp = socket.socket(self._family, socket.SOCK_STREAM)
        try:
            udp.bind((self.host, port))
            bound_port = udp.getsockname()[1]
            tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            tcp.bind((self.host, bound_port))
            tcp.listen(128)
        except BaseException:
            udp.close()
            tcp.close()
            raise
        return udp, tcp

    def _bind(self) -> tuple[socket.socket, socket.socket]:
        """UDP and TCP sockets on the same port (a free one when the port asked is 0)."""
        if self._requested_port != 0:
            return self._bind_once(self._requested_port)
        last_error: OSError | None = None
        for _ in range(64):
            try:
                return self._bind_once(0)
            except OSError as exc:  # the TCP side of that port was taken: next one
                last_error = exc
        raise OSError(f"no port free for both UDP and TCP on {self.host}") from last_error

    def start(self) -> DNSServer:
        """Bind, start serving on a daemon thread, and return self."""
        if self._thread is not None:
            raise RuntimeError("DNS server already started")
        udp, tcp = self._bind()
        self.port = udp.getsockname()[1]
        self._loop = asyncio.new_event_loop()
        self._stopping = asyncio.Event()
        ready = threading.Event()
        errors: list[BaseException] = []
        self._thread = threading.Thread(
            target=self._run,
            args=(udp, tcp, ready, errors),
            name=f"dnsserver-{self.port}",
            daemon=True,
        )
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("DNS server did not start")
        if errors:
            self._thread.join(1)
            self._thread = None
            raise RuntimeError("DNS server failed to start") from errors[0]
        return self

    def stop(self) -> None:
        """Stop serving, close the sockets and join the thread (no-op when not running)."""
        thread, loop, stopping = self._thread, self._loop, self._stopping
        if thread is None or loop is None or stopping is None:
            return
        if thread.is_alive():
            with contextlib.suppress(RuntimeError):  # the loop closed already
                loop.call_soon_threadsafe(stopping.set)
            thread.join(5)
        if thread.is_alive():
            raise RuntimeError("DNS server thread did not stop")
        self._thread = None
        self._loop = None

    def __enter__(self) -> DNSServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _run(
        self,
        udp: socket.socket,
        tcp: socket.socket,
        ready: threading.Event,
        errors: list[BaseException],
    ) -> None:
        loop = self._loop
        assert loop is not None
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._serve(udp, tcp, ready))
        except BaseException as exc:  # reported to start() or logged
            if not ready.is_set():
                errors.append(exc)
            else:
                log.exception("DNS server loop failed")
        finally:
            ready.set()
            try:
                loop.run_until_complete(loop.shutdown_asyncgens())
            finally:
                asyncio.set_event_loop(None)
                loop.close()

    async def _serve(self, udp: socket.socket, tcp: socket.socket, ready: threading.Event) -> None:
        loop = asyncio.get_running_loop()
        assert self._stopping is not None
        try:
            udp_transport, _ = await loop.create_datagram_endpoint(
                lambda: _UDPProtocol(self), sock=udp
            )
        except BaseException:
            udp.close()
            tcp.close()
            raise
        try:
            server = await asyncio.start_server(self._tcp_client, sock=tcp)
        except BaseException:
            udp_transport.close()
            tcp.close()
            raise
        ready.set()
        try:
            await self._stopping.wait()
        finally:
            server.close()
            udp_transport.close()
            for send_task in list(self._send_tasks):
                send_task.cancel()
            for writer in list(self._tcp_writers):
                writer.close()
            # Closing a connection ends its handler through EOF.  Cancelling the handler
            # instead makes Python 3.11's StreamReaderProtocol log a spurious traceback.
            handlers = list(self._tcp_handlers)
            if handlers:
                await asyncio.wait(handlers, timeout=1.0)
            others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in others:
                task.cancel()
            await asyncio.gather(*others, return_exceptions=True)
            try:
                await asyncio.wait_for(server.wait_closed(), 1.0)
            except TimeoutError:
                log.warning("TCP server did not close in time")
            await asyncio.sleep(0)  # let the transports' connection_lost run


# ------------------------------------------------------------------ command line


def main(argv: list[str] | None = None) -> int:
    """Serve zones until SIGTERM or SIGINT; print ``listening HOST:PORT`` once ready."""
    parser = argparse.ArgumentParser(description="Authoritative test DNS server.")
    parser.add_argument("--zones", type=Path, help="directory of *.zone files")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 (default) picks a free port")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds added to answers")
    parser.add_argument("--faults", type=Path, help="TOML file of faults")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING)

    try:
        server = DNSServer(zone_dir=args.zones, host=args.host, port=args.port)
        server.latency = args.latency
        if args.faults is not None:
            server.load_faults(args.faults)
    except (OSError, ValueError, TypeError) as exc:
        print(f"dnsserver: {exc}", file=sys.stderr)
        return 2

    # Block the signals before the server thread exists, so they reach sigwait below.
    # A Python handler first, so that a signal inherited as ignored is not discarded.
    stop_signals = {signal.SIGTERM, signal.SIGINT}

    def _no_op(signum: int, frame: FrameType | None) -> None:
        pass

    old_handlers = {signum: signal.signal(signum, _no_op) for signum in stop_signals}
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)
    try:
        try:
            server.start()
        except (OSError, RuntimeError) as exc:
            print(f"dnsserver: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
            return 2
        try:
            print(f"listening {server.nameserver}", flush=True)
            signal.sigwait(stop_signals)
        finally:
            server.stop()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        for signum, handler in old_handlers.items():
            signal.signal(signum, handler)
    return 0


if __name__ == "__main__":
    sys.exit(main())
