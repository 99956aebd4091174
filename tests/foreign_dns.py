"""A third-party authoritative DNS server (NSD) serving zones made up at random.

heloguard's verdicts must not depend on the project's own test zones
(tests/zones/) nor on its own test DNS server (tests/dnsserver.py).  This
module supplies both halves of an independent check:

* :func:`ensure_nsd` installs Debian's ``nsd`` package when it is missing,
  without letting the packaged service start (or keep running) on port 53;
  :class:`NSDServer` runs ``nsd -d -c CONF`` in the foreground on a free
  loopback port (UDP and TCP), with every file it writes in a temporary folder,
  and stops it again.
* :func:`generate_scenario` makes a fresh set of zones from a seed: random
  registered domains under real public suffixes, random host labels, random
  public-looking IPv4 and IPv6 addresses, and the SMTP clients to judge (a bot,
  well-run IPv4 and IPv6 servers, a server HELOing as a sibling host of its own
  domain, and a client whose HELO name does not exist).

Use::

    scenario = generate_scenario()            # or generate_scenario(seed)
    ensure_nsd()
    with NSDServer(scenario.zones) as nsd:
        # heloguard check --nameserver nsd.nameserver --ip ... --helo ...
        ...

Every name heloguard asks about in a scenario lies inside a zone NSD serves
(otherwise NSD answers REFUSED, which heloguard rightly takes as a temporary
failure); :attr:`Scenario.expectations` lists those questions and the answers
the zones were written to give, so a test can check NSD agrees before it
blames heloguard.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import os
import random
import shutil
import signal
import socket
import string
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import dns.exception
import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype

# --------------------------------------------------------------------------
# Installing NSD

NSD_PACKAGE = "nsd"
POLICY_RC_D = Path("/usr/sbin/policy-rc.d")
INSTALL_LOCK = Path(tempfile.gettempdir()) / "heloguard-nsd-install.lock"
SYSTEM_PIDFILES = (Path("/run/nsd/nsd.pid"), Path("/var/run/nsd/nsd.pid"))
_SBIN = ("/usr/local/sbin", "/usr/sbin", "/sbin")


class NSDUnavailable(RuntimeError):
    """NSD is not installed and could not be installed here."""


def find_nsd() -> str | None:
    """The path of the ``nsd`` binary, or None (sbin is searched even off PATH)."""
    path = os.pathsep.join([os.environ.get("PATH", ""), *_SBIN])
    return shutil.which("nsd", path=path)


@contextlib.contextmanager
def _services_blocked() -> Iterator[None]:
    """While installing, make invoke-rc.d/deb-systemd-invoke refuse to start services.

    An existing policy-rc.d is left alone (a container's usually already says
    101); one written here is removed afterwards.
    """
    if POLICY_RC_D.exists():
        yield
        return
    text = "#!/bin/sh\n# written by heloguard's tests while installing nsd\nexit 101\n"
    POLICY_RC_D.write_text(text)
    POLICY_RC_D.chmod(0o755)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            if POLICY_RC_D.read_text() == text:
                POLICY_RC_D.unlink()


def _apt_get(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive", NEEDRESTART_MODE="l")
    env["PATH"] = os.pathsep.join([env.get("PATH", ""), *_SBIN])
    cmd = [
        "apt-get",
        "-q",
        "-y",
        "-o",
        "DPkg::Lock::Timeout=300",
        "-o",
        "Dpkg::Options::=--force-confdef",
        "-o",
        "Dpkg::Options::=--force-confold",
        *args,
    ]
    return subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, env=env, check=False
    )


def _pid_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    # "pid (comm) S ...": the state follows the last ')'
    return stat[stat.rfind(")") + 2 :][:1] not in ("Z", "X", "")


def _stop_system_nsd() -> None:
    """Stop and disable the packaged nsd service if installing it started one."""
    if Path("/run/systemd/system").is_dir() and shutil.which("systemctl"):
        subprocess.run(
            ["systemctl", "disable", "--now", "nsd.service"],
            capture_output=True,
            timeout=60,
            check=False,
        )
    pidfiles = list(SYSTEM_PIDFILES)
    checkconf = shutil.which("nsd-checkconf", path=os.pathsep.join(_SBIN))
    if checkconf and Path("/etc/nsd/nsd.conf").exists():  # what the init script reads
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            named = subprocess.run(
                [checkconf, "-o", "pidfile", "/etc/nsd/nsd.conf"],
                capture_output=True,
                text=True,
                timeout=10,
                check=False,
            ).stdout.strip()
            if named:
                pidfiles.insert(0, Path(named))
    for pidfile in pidfiles:
        try:
            pid = int(pidfile.read_text().split()[0])
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
        except (OSError, ValueError, IndexError):
            continue
        if comm != "nsd" and not comm.startswith("nsd:"):
            continue
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while _pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        update_rc_d = shutil.which("update-rc.d", path=os.pathsep.join(_SBIN))
        if update_rc_d:  # and not at boot either
            subprocess.run(
                [update_rc_d, "nsd", "disable"], capture_output=True, timeout=60, check=False
            )


def ensure_nsd(timeout: float = 900) -> str:
    """Install Debian's ``nsd`` package if missing; return the path of ``nsd``.

    Raises NSDUnavailable when it is missing and cannot be installed (not
    root, no apt-get, or apt-get failed).  The packaged service is kept from
    starting while installing (policy-rc.d exit 101), and if it started anyway
    it is stopped and disabled (systemctl under systemd, else through its
    pidfile and update-rc.d): only the instances :class:`NSDServer` starts
    may run.
    """
    found = find_nsd()
    if found:
        return found
    if os.geteuid() != 0:
        raise NSDUnavailable("nsd is not installed and installing it needs root")
    if shutil.which("apt-get") is None:
        raise NSDUnavailable("nsd is not installed and there is no apt-get to install it")
    INSTALL_LOCK.touch(exist_ok=True)
    with INSTALL_LOCK.open("r") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one installer at a time
        found = find_nsd()
        if found:
            return found
        install = ("install", "--no-install-recommends", NSD_PACKAGE)
        try:
            with _services_blocked():
                done = _apt_get(*install, timeout=timeout)
                if done.returncode != 0:  # perhaps stale package lists
                    _apt_get("update", timeout=timeout)
                    done = _apt_get(*install, timeout=timeout)
        except (OSError, subprocess.SubprocessError) as exc:
            raise NSDUnavailable(f"apt-get install {NSD_PACKAGE} failed: {exc}") from exc
        finally:
            _stop_system_nsd()
    found = find_nsd()
    if found is None:
        tail = (done.stdout + done.stderr).strip().splitlines()[-15:]
        raise NSDUnavailable(
            f"apt-get install {NSD_PACKAGE} failed (exit {done.returncode}):\n" + "\n".join(tail)
        )
    return found


# --------------------------------------------------------------------------
# Running NSD


def _free_port(host: str) -> int:
    """A port free for both UDP and TCP on ``host`` (racy, hence the retries)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
            tcp.bind((host, 0))
            port = int(tcp.getsockname()[1])
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                try:
                    udp.bind((host, port))
                except OSError:
                    continue
                return port
    raise OSError("no free UDP+TCP port found")


def zone_file_name(origin: str) -> str:
    """The file name a zone is written to."""
    return origin.strip(".").lower() + ".zone"


class NSDServer:
    """``nsd -d`` in the foreground on 127.0.0.1:PORT, serving the given zones.

    ``zones`` maps each origin (``"example.com"``) to its zone file text.
    Everything NSD writes (config, zone files, pidfile, xfrd state, zone list,
    log) stays in a temporary folder that is removed on stop.  Readiness is
    checked by asking every zone's SOA over UDP until each is answered with
    authority, under a deadline.
    """

    def __init__(
        self,
        zones: Mapping[str, str],
        host: str = "127.0.0.1",
        start_timeout: float = 15.0,
        nsd: str | None = None,
    ) -> None:
        if not zones:
            raise ValueError("NSD needs at least one zone")
        self.zones = {origin.strip(".").lower(): text for origin, text in zones.items()}
        self.host = host
        self.port = 0
        self.start_timeout = start_timeout
        self._nsd = nsd
        self._dir: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    # -- public -----------------------------------------------------------

    @property
    def nameserver(self) -> str:
        """``"127.0.0.1:PORT"``, as ``heloguard --nameserver`` takes it."""
        return f"{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        """True while the NSD process started here is alive."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def workdir(self) -> Path:
        """The temporary folder holding the config, zones and state."""
        if self._dir is None:
            raise RuntimeError("NSD is not started")
        return self._dir

    def log_text(self) -> str:
        """What NSD logged so far (for failure messages)."""
        if self._dir is None:
            return ""
        parts = []
        for name in ("nsd.log", "stderr.log"):
            with contextlib.suppress(OSError):
                parts.append((self._dir / name).read_text(errors="replace"))
        return "".join(parts)

    def query(
        self, name: str, rdtype: str, timeout: float = 1.0, tcp: bool = False
    ) -> dns.message.Message:
        """Ask this NSD one question (no recursion desired) and return the reply."""
        msg = dns.message.make_query(name, rdtype)
        msg.flags &= ~dns.flags.RD
        if tcp:
            return dns.query.tcp(msg, self.host, port=self.port, timeout=timeout)
        return dns.query.udp(msg, self.host, port=self.port, timeout=timeout)

    def start(self) -> NSDServer:
        """Start NSD and wait until every zone answers; raises RuntimeError if it will not."""
        if self.running:
            return self
        nsd = self._nsd or find_nsd()
        if nsd is None:
            raise NSDUnavailable("nsd is not installed (call ensure_nsd() first)")
        self._dir = Path(tempfile.mkdtemp(prefix="hg-nsd-"))
        self._write_zones()
        problems: list[str] = []
        deadline = time.monotonic() + self.start_timeout
        for _attempt in range(5):  # another process may take the port meanwhile
            self.port = _free_port(self.host)
            conf = self._write_conf()
            with (self._dir / "stderr.log").open("ab") as err:
                self._proc = subprocess.Popen(
                    [nsd, "-d", "-c", str(conf)],
                    stdin=subprocess.DEVNULL,
                    stdout=err,
                    stderr=err,
                    cwd=self._dir,
                    start_new_session=True,  # its own process group, to reap its children
                )
            problem = self._wait_ready(deadline)
            if not problem:
                return self
            problems.append(f"port {self.port}: {problem}")
            log = self.log_text()
            self._kill()
            if time.monotonic() >= deadline or "address already in use" not in log.lower():
                break
        log = self.log_text()
        self._cleanup_dir()
        raise RuntimeError("NSD did not start: " + "; ".join(problems) + "\nNSD log:\n" + log)

    def stop(self) -> None:
        """Stop NSD (SIGTERM, then SIGKILL), make sure none of its processes remain."""
        self._kill()
        self._cleanup_dir()

    def __enter__(self) -> NSDServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- internals ----------------------------------------------------------

    def _write_zones(self) -> None:
        zonedir = self.workdir / "zones"
        zonedir.mkdir()
        for origin, text in self.zones.items():
            (zonedir / zone_file_name(origin)).write_text(text)

    def _write_conf(self) -> Path:
        d = self.workdir
        lines = [
            "server:",
            f"    ip-address: {self.host}",
            f"    port: {self.port}",
            "    do-ip4: yes",
            "    do-ip6: no",
            '    username: ""',
            '    chroot: ""',
            f'    zonesdir: "{d / "zones"}"',
            f'    pidfile: "{d / "nsd.pid"}"',
            f'    xfrdfile: "{d / "xfrd.state"}"',
            f'    xfrdir: "{d}"',
            f'    zonelistfile: "{d / "zone.list"}"',
            '    database: ""',
            f'    logfile: "{d / "nsd.log"}"',
            f'    cookie-secret-file: "{d / "cookiesecrets.txt"}"',
            "    zonefiles-write: 0",
            "    rrl-ratelimit: 0",
            "    server-count: 1",
            "    verbosity: 1",
            "    hide-version: yes",
            "    reuseport: no",
            "",
            "remote-control:",
            "    control-enable: no",
            "",
        ]
        for origin in sorted(self.zones):
            lines += [
                "zone:",
                f'    name: "{origin}."',
                f'    zonefile: "{zone_file_name(origin)}"',
            ]
            lines.append("")
        conf = d / "nsd.conf"
        conf.write_text("\n".join(lines))
        return conf

    def _wait_ready(self, deadline: float) -> str:
        """ "" once every zone's SOA is answered with authority, else what went wrong."""
        pending = sorted(self.zones)
        last = "no answer yet"
        while pending:
            if self._proc is None or self._proc.poll() is not None:
                code = None if self._proc is None else self._proc.returncode
                return f"nsd exited with status {code}"
            if time.monotonic() >= deadline:
                return f"not ready in {self.start_timeout} s ({pending[0]}: {last})"
            origin = pending[0]
            try:
                reply = self.query(origin, "SOA", timeout=0.2)
            except (OSError, dns.exception.DNSException) as exc:
                last = f"{type(exc).__name__}: {exc}"
                time.sleep(0.02)
                continue
            rcode = reply.rcode()
            if rcode == dns.rcode.NOERROR and reply.flags & dns.flags.AA and reply.answer:
                pending.pop(0)
            else:  # still loading, or the zone file was refused (NSD logs why)
                last = f"answered {dns.rcode.to_text(rcode)}"
                errors = [line for line in self.log_text().splitlines() if " error: " in line]
                if errors:
                    return f"{origin}: {last}; NSD reported: " + " | ".join(errors[:5])
                time.sleep(0.02)
        return ""

    def _group_alive(self, pgid: int) -> list[int]:
        """Live (non-zombie) processes of process group ``pgid``."""
        alive = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rfind(")") + 2 :].split()
            if len(fields) > 2 and int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
                alive.append(int(entry.name))
        return alive

    def _kill(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        pgid = proc.pid  # start_new_session: the group is led by the process started
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pgid, signal.SIGKILL)
                proc.wait(timeout=5)
        deadline = time.monotonic() + 5
        while self._group_alive(pgid):  # server/xfrd children NSD forked
            if time.monotonic() >= deadline:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pgid, signal.SIGKILL)
                deadline = time.monotonic() + 5
            time.sleep(0.02)

    def _cleanup_dir(self) -> None:
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None


# --------------------------------------------------------------------------
# Random scenarios

PUBLIC_SUFFIXES = ("com", "net", "org", "com.au", "co.uk", "de", "nl", "io")

# Not public unicast, or documentation: never used for a "public" address.
EXCLUDED_V4 = tuple(
    ipaddress.IPv4Network(n)
    for n in (
        "0.0.0.0/8",
        "10.0.0.0/8",
        "100.64.0.0/10",
        "127.0.0.0/8",
        "169.254.0.0/16",
        "172.16.0.0/12",
        "192.0.0.0/24",
        "192.0.2.0/24",
        "192.88.99.0/24",
        "192.168.0.0/16",
        "198.18.0.0/15",
        "198.51.100.0/24",
        "203.0.113.0/24",
        "224.0.0.0/3",  # multicast and 240/4, up to 255.255.255.255
    )
)
DOCUMENTATION_V6 = ipaddress.IPv6Network("2001:db8::/32")

RESERVED_LABELS = frozenset({"ns", "www", "mail", "smtp", "nohost"})
DYNAMIC_WORDS = ("dyn", "dynamic", "pool", "dsl", "cable", "cust", "ppp", "dhcp")


def is_public_v4(addr: ipaddress.IPv4Address) -> bool:
    """Public-looking: outside every excluded block, and global by Python's tables."""
    return addr.is_global and not any(addr in net for net in EXCLUDED_V4)


def is_public_v6(addr: ipaddress.IPv6Address) -> bool:
    """Public-looking IPv6: global unicast, not documentation."""
    return addr.is_global and addr not in DOCUMENTATION_V6


def reverse_v4_zone(addr: ipaddress.IPv4Address) -> str:
    """The /24 reverse zone of an address: ``c.b.a.in-addr.arpa``."""
    a, b, c, _ = str(addr).split(".")
    return f"{c}.{b}.{a}.in-addr.arpa"


def reverse_v6_zone(addr: ipaddress.IPv6Address, prefix: int = 64) -> str:
    """The nibble reverse zone of the /``prefix`` of an address."""
    nibbles = addr.exploded.replace(":", "")[: prefix // 4]
    return ".".join(reversed(nibbles)) + ".ip6.arpa"


def reverse_name(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    """The PTR owner name of an address (no trailing dot)."""
    return addr.reverse_pointer


@dataclass
class Zone:
    """One zone being built: records as (absolute owner, type, rdata text)."""

    origin: str
    ns: tuple[str, ...]
    ttl: int
    serial: int
    records: list[tuple[str, str, str]] = field(default_factory=list)

    def text(self) -> str:
        """The zone file text (absolute names throughout)."""
        o = self.origin + "."
        lines = [
            f"$ORIGIN {o}",
            f"$TTL {self.ttl}",
            f"@ IN SOA {self.ns[0]}. hostmaster.{o} {self.serial} 7200 900 1209600 300",
            *(f"@ IN NS {ns}." for ns in self.ns),
        ]
        width = max((len(owner) for owner, _, _ in self.records), default=0) + 1
        for owner, rtype, rdata in self.records:
            lines.append(f"{owner + '.':<{width}} IN {rtype:<5} {rdata}")
        return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class Expect:
    """A question heloguard will ask, and the answer the zones were built to give.

    ``rcode`` is "NOERROR" or "NXDOMAIN"; ``records`` the expected rdata
    texts (lower case, no trailing dot), empty for NODATA or NXDOMAIN.
    """

    name: str
    rdtype: str
    rcode: str
    records: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Case:
    """One SMTP client to judge: its address, its HELO, and what it is."""

    key: str
    ip: str
    helo: str
    story: str
    expects: tuple[Expect, ...]


@dataclass
class Scenario:
    """A fresh random world: the zones to serve and the clients to judge."""

    seed: int
    zones: dict[str, str]
    cases: dict[str, Case]

    @property
    def expectations(self) -> list[Expect]:
        """Every question of every case, once each."""
        seen: dict[tuple[str, str], Expect] = {}
        for case in self.cases.values():
            for e in case.expects:
                seen.setdefault((e.name, e.rdtype), e)
        return list(seen.values())

    def zone_of(self, name: str) -> str | None:
        """The served zone a name falls in (longest match), or None."""
        labels = name.strip(".").lower().split(".")
        for i in range(len(labels)):
            candidate = ".".join(labels[i:])
            if candidate in self.zones:
                return candidate
        return None

    def describe(self, key: str | None = None) -> str:
        """For failure messages: the seed, the case, and the zones it touches."""
        out = [f"scenario seed={self.seed} (rerun with FOREIGN_DNS_SEED={self.seed})"]
        if key is None:
            wanted = set(self.zones)
        else:
            case = self.cases[key]
            out.append(f"case {key}: ip={case.ip} helo={case.helo}: {case.story}")
            wanted = {z for e in case.expects if (z := self.zone_of(e.name))}
        for origin in sorted(wanted):
            out.append(f"--- zone {origin}\n{self.zones[origin]}")
        return "\n".join(out)


class _World:
    """Picks unique random domains, labels and addresses, and files records in zones."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.zones: dict[str, Zone] = {}
        self.used_domains: set[str] = set()
        self.used_nets: set[ipaddress.IPv4Network] = set()
        self.ttl = rng.choice((300, 600, 1800, 3600, 14400, 86400))
        self.serial = 2_020_000_000 + rng.randrange(100_000_000)
        self.provider = self.domain()  # the DNS host named by the reverse zones' NS
        self.forward_zone(self.provider)

    def label(self, low: int = 6, high: int = 12) -> str:
        """Random letters, never one of the host labels the scenarios use on purpose."""
        while True:
            k = self.rng.randint(low, high)
            label = "".join(self.rng.choices(string.ascii_lowercase, k=k))
            if label not in RESERVED_LABELS:
                return label

    def domain(self) -> str:
        while True:
            name = f"{self.label()}.{self.rng.choice(PUBLIC_SUFFIXES)}"
            if name not in self.used_domains:
                self.used_domains.add(name)
                return name

    def ipv4(self) -> ipaddress.IPv4Address:
        """A public-looking address in a /24 no other address of the world uses."""
        while True:
            addr = ipaddress.IPv4Address(
                (self.rng.randint(1, 223) << 24)
                | (self.rng.randrange(1 << 16) << 8)
                | self.rng.randint(1, 254)
            )
            net = ipaddress.IPv4Network(f"{addr}/24", strict=False)
            if is_public_v4(addr) and net not in self.used_nets:
                self.used_nets.add(net)
                return addr

    def ipv6(self) -> ipaddress.IPv6Address:
        """A public-looking IPv6 address under 2a00::/12 (2a00: to 2a0f:)."""
        while True:
            high = ((0x2A00 + self.rng.randrange(16)) << 112) | (self.rng.randrange(1 << 48) << 64)
            addr = ipaddress.IPv6Address(high | self.rng.randint(1, (1 << 64) - 1))
            if is_public_v6(addr):
                return addr

    def _zone(self, origin: str, ns: tuple[str, ...]) -> Zone:
        zone = Zone(origin, ns, self.ttl, self.serial)
        self.zones[origin] = zone
        return zone

    def forward_zone(self, origin: str) -> Zone:
        """A domain's zone, with its own ns1 (and an address for it)."""
        if origin in self.zones:
            return self.zones[origin]
        zone = self._zone(origin, (f"ns1.{origin}",))
        self.add(f"ns1.{origin}", "A", str(self.ipv4()))
        return zone

    def reverse_zone(self, addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> Zone:
        """The /24 (IPv4) or /64 (IPv6) reverse zone of an address, served by the provider."""
        if isinstance(addr, ipaddress.IPv4Address):
            origin = reverse_v4_zone(addr)
        else:
            origin = reverse_v6_zone(addr)
        if origin in self.zones:
            return self.zones[origin]
        return self._zone(origin, (f"ns1.{self.provider}", f"ns2.{self.provider}"))

    def add(self, name: str, rtype: str, rdata: str) -> None:
        """File a record in the zone it belongs to (which must exist)."""
        labels = name.split(".")
        for i in range(len(labels)):
            zone = self.zones.get(".".join(labels[i:]))
            if zone is not None:
                zone.records.append((name, rtype, rdata))
                return
        raise ValueError(f"no zone for {name}")

    def host(self, name: str, addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> None:
        self.add(name, "A" if addr.version == 4 else "AAAA", str(addr))

    def ptr(self, addr: ipaddress.IPv4Address | ipaddress.IPv6Address, name: str) -> None:
        self.reverse_zone(addr)
        self.add(reverse_name(addr), "PTR", name + ".")


def _ok(name: str, rdtype: str, *records: str) -> Expect:
    return Expect(name, rdtype, "NOERROR", frozenset(records))


def _nx(name: str, rdtype: str) -> Expect:
    return Expect(name, rdtype, "NXDOMAIN")


def generate_scenario(seed: int | None = None) -> Scenario:
    """A fresh random scenario; the same seed gives the same scenario.

    With no seed, ``FOREIGN_DNS_SEED`` from the environment is used when set,
    else a new seed is drawn.
    """
    if seed is None:
        env = os.environ.get("FOREIGN_DNS_SEED", "").strip()
        seed = int(env) if env else random.Random().randrange(1 << 63)
    rng = random.Random(seed)
    w = _World(rng)
    w.add(f"ns2.{w.provider}", "A", str(w.ipv4()))
    cases: dict[str, Case] = {}

    # The bot: a dynamic-looking PTR name that does not exist, and a HELO that
    # names someone else's host, whose address has no PTR.
    bot, other = w.ipv4(), w.ipv4()
    isp = w.forward_zone(w.domain()).origin
    a, b, c, d = str(bot).split(".")
    dyn = f"{a}-{b}-{c}-{d}.{rng.choice(DYNAMIC_WORDS)}.{isp}"
    w.ptr(bot, dyn)
    w.add(f"www.{isp}", "A", str(w.ipv4()))  # the ISP's zone has content, just not dyn
    victim = w.forward_zone(w.domain()).origin
    helo = f"mail.{victim}"
    w.host(helo, other)
    w.add(victim, "MX", f"10 {helo}.")
    w.reverse_zone(other)  # exists, but holds no PTR for `other`: NXDOMAIN
    cases["bot"] = Case(
        "bot",
        str(bot),
        helo,
        f"PTR {dyn} has no A record; HELO {helo} -> {other}, which has no PTR",
        (
            _ok(reverse_name(bot), "PTR", dyn),
            _nx(dyn, "A"),
            _ok(helo, "A", str(other)),
            _ok(helo, "AAAA"),
            _nx(reverse_name(other), "PTR"),
        ),
    )

    # A well-run IPv4 server: PTR name -> A -> same address; HELO is that name.
    good = w.ipv4()
    good_name = f"{w.label(2, 10)}.{w.forward_zone(w.domain()).origin}"
    w.ptr(good, good_name)
    w.host(good_name, good)
    cases["ipv4"] = Case(
        "ipv4",
        str(good),
        good_name,
        f"{good} -> PTR {good_name} -> A {good}; HELO is that name",
        (
            _ok(reverse_name(good), "PTR", good_name),
            _ok(good_name, "A", str(good)),
            _ok(good_name, "AAAA"),
        ),
    )

    # A well-run IPv6 server: ip6.arpa PTR -> AAAA -> same address.
    good6 = w.ipv6()
    good6_name = f"{w.label(2, 10)}.{w.forward_zone(w.domain()).origin}"
    w.ptr(good6, good6_name)
    w.host(good6_name, good6)
    cases["ipv6"] = Case(
        "ipv6",
        str(good6),
        good6_name,
        f"{good6} -> PTR {good6_name} -> AAAA {good6}; HELO is that name",
        (
            _ok(reverse_name(good6), "PTR", good6_name),
            _ok(good6_name, "AAAA", str(good6)),
            _ok(good6_name, "A"),
        ),
    )

    # A server HELOing as a sibling host of its own registered domain.
    corp = w.forward_zone(w.domain()).origin
    out_addr, smtp_addr = w.ipv4(), w.ipv4()
    out_name = f"out{rng.randint(1, 99)}.{corp}"
    smtp_name = f"smtp.{corp}"
    w.ptr(out_addr, out_name)
    w.host(out_name, out_addr)
    w.ptr(smtp_addr, smtp_name)
    w.host(smtp_name, smtp_addr)
    w.add(corp, "MX", f"10 {smtp_name}.")
    cases["same-domain"] = Case(
        "same-domain",
        str(out_addr),
        smtp_name,
        f"{out_addr} -> PTR {out_name} -> A {out_addr}; HELO {smtp_name} -> {smtp_addr} "
        f"-> PTR {smtp_name} (another host of {corp})",
        (
            _ok(reverse_name(out_addr), "PTR", out_name),
            _ok(out_name, "A", str(out_addr)),
            _ok(smtp_name, "A", str(smtp_addr)),
            _ok(smtp_name, "AAAA"),
            _ok(reverse_name(smtp_addr), "PTR", smtp_name),
        ),
    )

    # Good FCrDNS, but a HELO name that does not exist (its domain does);
    # sometimes in the client's own domain, sometimes in another.
    nh_addr = w.ipv4()
    nh_domain = w.forward_zone(w.domain()).origin
    nh_name = f"{w.label(2, 10)}.{nh_domain}"
    w.ptr(nh_addr, nh_name)
    w.host(nh_name, nh_addr)
    helo_domain = nh_domain if rng.random() < 0.5 else w.forward_zone(w.domain()).origin
    nohost = f"nohost.{helo_domain}"
    cases["nohost"] = Case(
        "nohost",
        str(nh_addr),
        nohost,
        f"{nh_addr} -> PTR {nh_name} -> A {nh_addr}; HELO {nohost} does not exist",
        (
            _ok(reverse_name(nh_addr), "PTR", nh_name),
            _ok(nh_name, "A", str(nh_addr)),
            _nx(nohost, "A"),
            _nx(nohost, "AAAA"),
        ),
    )

    scenario = Scenario(seed, {o: z.text() for o, z in w.zones.items()}, cases)
    for e in scenario.expectations:  # the promise made to heloguard: no REFUSED
        if scenario.zone_of(e.name) is None:
            raise AssertionError(f"seed {seed}: {e.name} is in no served zone")
    return scenario


def answer_summary(reply: dns.message.Message, rdtype: str) -> tuple[str, frozenset[str]]:
    """(rcode text, rdata texts of the answer's records of ``rdtype``) for comparison."""
    want = dns.rdatatype.from_text(rdtype)
    records = frozenset(
        rd.to_text().rstrip(".").lower()
        for rrset in reply.answer
        if rrset.rdtype == want
        for rd in rrset
    )
    return dns.rcode.to_text(reply.rcode()), records


def ask_all(server: NSDServer, expects: Sequence[Expect]) -> list[str]:
    """Ask the server each expected question; describe every answer that differs."""
    problems = []
    for e in expects:
        reply = server.query(e.name, e.rdtype)
        got = answer_summary(reply, e.rdtype)
        if got != (e.rcode, e.records) or not reply.flags & dns.flags.AA:
            problems.append(f"{e.name}/{e.rdtype}: want {e.rcode} {sorted(e.records)}, got {got}")
    return problems
