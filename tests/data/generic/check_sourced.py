"""Validate the sourced host-name corpora: real_senders.csv, pool_names.csv, new rows.

    python3 tests/data/generic/check_sourced.py [FILE ...]

With no FILE it checks real_senders.csv and pool_names.csv beside it.  Every
row must parse, carry a citation a reader can open, and quote the published
text it came from: the name and the address must both stand in the quoted
evidence, and an ``enc`` tag that claims an address encoding must be true of
the name.  Prints the counts and exits 1 on any problem.  Standard library
only, so a helper can run it with any python3.
"""

from __future__ import annotations

import csv
import ipaddress
import re
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
HEADER = ["ip", "name", "label", "operation", "category", "enc", "source", "evidence"]
DEFAULT_FILES = ("real_senders.csv", "pool_names.csv")

REAL = frozenset(
    {
        "mailbox-provider",
        "esp",
        "hosting-relay",
        "platform",
        "university",
        "government",
        "isp-smarthost",
        "enterprise",
        "list-server",
    }
)
GENERIC = frozenset(
    {
        "consumer-isp",
        "business-line",
        "mobile",
        "cgnat",
        "cloud-default",
        "hosting-default",
        "resnet",
        "placeholder",
    }
)
LABEL_RE = re.compile(r"^[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?$")
SOURCE_RE = re.compile(r"^(https?://\S+|github:[\w.-]+/[\w.-]+:\S+)$")
DIGITS = re.compile(r"\d+")
MAX_EVIDENCE = 240

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
NOT_PUBLIC = [
    ipaddress.ip_network(n)
    for n in ("100.64.0.0/10", "192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24", "2001:db8::/32")
]


def _v4(ip: IPAddress) -> ipaddress.IPv4Address | None:
    if isinstance(ip, ipaddress.IPv4Address):
        return ip
    return None


def _octets(ip: IPAddress) -> list[int]:
    return list(ip.packed[-4:])


def _bounded(text: str, needle: str) -> bool:
    """needle occurs in text with no digit right before or after it."""
    for m in re.finditer(re.escape(needle), text):
        before = text[m.start() - 1] if m.start() else ""
        after = text[m.end()] if m.end() < len(text) else ""
        if not before.isdigit() and not after.isdigit():
            return True
    return False


def _runs_contain(name: str, wanted: list[int]) -> bool:
    runs = [int(t) for t in DIGITS.findall(name)]
    n = len(wanted)
    return any(runs[i : i + n] == wanted for i in range(len(runs) - n + 1))


def _seq(spec: str) -> Callable[[str, IPAddress], bool]:
    def check(name: str, ip: IPAddress) -> bool:
        o = _octets(ip)
        return _runs_contain(name, [o["abcd".index(c)] for c in spec])

    return check


def _joined(parts: list[int], sep: str, width: int = 0) -> str:
    return sep.join(f"{p:0{width}d}" for p in parts)


def _hexes(ip: IPAddress) -> str:
    return re.sub(r"[^0-9a-f]", "", ip.exploded)


def _v6_dash(name: str, ip: IPAddress) -> bool:
    for label in name.split("."):
        parts = label.split("-")
        for i in range(len(parts)):
            for j in range(len(parts), i + 2, -1):
                try:
                    if ipaddress.IPv6Address(":".join(parts[i:j])) == ip:
                        return True
                except ValueError:
                    continue
    hextets = [f"{int(h, 16):x}" for h in ip.exploded.split(":")]
    return any("-".join(hextets[i : i + 3]) in name for i in range(6) if any(hextets[i : i + 3]))


def _v6_prefix(name: str, ip: IPAddress) -> bool:
    full = ip.exploded.replace(":", "")
    if full[:16] in name.replace("-", "").replace(".", ""):
        return True
    hextets = [f"{int(h, 16):x}" for h in ip.exploded.split(":")[:4]]
    return "-".join(hextets) in name or ".".join(hextets) in name


def _v6_v4(name: str, ip: IPAddress) -> bool:
    if not isinstance(ip, ipaddress.IPv6Address):
        return False
    cands = [ipaddress.IPv4Address(ip.packed[-4:])]
    if ip.sixtofour:
        cands.append(ip.sixtofour)
    for v4 in cands:
        o = _octets(v4)
        for order in (o, o[::-1]):
            if _runs_contain(name, order):
                return True
        if f"{int(v4):08x}" in name:
            return True
    return False


def _nibbles(name: str, ip: IPAddress) -> bool:
    nib = "".join(re.findall(r"(?:^|(?<=[.-]))([0-9a-f])(?=[.-]|$)", name))
    full = _hexes(ip)
    return len(nib) >= 8 and (nib in full or nib in full[::-1])


def _eui64(name: str, ip: IPAddress) -> bool:
    iid = _hexes(ip)[16:]
    compact = re.sub(r"[^0-9a-f]", "", name)
    return iid[6:10] == "fffe" and (iid in compact or iid[:6] + iid[10:] in compact)


def _hex_tail(name: str, ip: IPAddress) -> bool:
    o = _octets(ip)
    return any("".join(f"{x:02x}" for x in o[k:]) in name for k in (1, 2))


ENCODINGS: dict[str, Callable[[str, IPAddress], bool]] = {
    "dash-fwd": lambda n, ip: bool(_v4(ip)) and _bounded(n, _joined(_octets(ip), "-")),
    "dot-fwd": lambda n, ip: bool(_v4(ip)) and _bounded(n, _joined(_octets(ip), ".")),
    "dash-rev": lambda n, ip: bool(_v4(ip)) and _bounded(n, _joined(_octets(ip)[::-1], "-")),
    "dot-rev": lambda n, ip: bool(_v4(ip)) and _bounded(n, _joined(_octets(ip)[::-1], ".")),
    "pad-fwd": lambda n, ip: (
        bool(_v4(ip)) and any(_joined(_octets(ip), s, 3) in n for s in ("", "-", "."))
    ),
    "pad-rev": lambda n, ip: (
        bool(_v4(ip)) and any(_joined(_octets(ip)[::-1], s, 3) in n for s in ("", "-", "."))
    ),
    "hex": lambda n, ip: bool(_v4(ip)) and f"{int(ip):08x}" in n,
    "hex-rev": lambda n, ip: bool(_v4(ip)) and "".join(f"{x:02x}" for x in _octets(ip)[::-1]) in n,
    "hex-tail": lambda n, ip: bool(_v4(ip)) and _hex_tail(n, ip),
    "dec": lambda n, ip: bool(_v4(ip)) and str(int(ip)) in DIGITS.findall(n),
    "v6-full": lambda n, ip: ip.version == 6 and _hexes(ip) in re.sub(r"[^0-9a-f]", "", n),
    "v6-nibble": lambda n, ip: ip.version == 6 and _nibbles(n, ip),
    "v6-dash": lambda n, ip: ip.version == 6 and _v6_dash(n, ip),
    "v6-prefix": lambda n, ip: ip.version == 6 and _v6_prefix(n, ip),
    "v6-v4": _v6_v4,
    "v6-eui64": lambda n, ip: ip.version == 6 and _eui64(n, ip),
}


def enc_problem(tag: str, name: str, ip: IPAddress) -> str | None:
    """None when the tag is true of (name, ip), else why not."""
    if tag == "none" or tag.startswith("other:") or tag == "b36":
        return None
    if tag.startswith("seq-"):
        spec = tag[4:]
        if not spec or set(spec) - set("abcd"):
            return f"bad seq tag {tag!r}"
        return None if _seq(spec)(name, ip) else f"octets {spec} not found in order"
    check = ENCODINGS.get(tag)
    if check is None:
        return f"unknown enc tag {tag!r}"
    return None if check(name, ip) else f"enc {tag} not true of the name"


def _fold(text: str) -> str:
    return " ".join(text.split()).lower()


def _address_forms(ip: IPAddress) -> list[str]:
    forms = {str(ip), ip.exploded}
    if isinstance(ip, ipaddress.IPv6Address):
        forms.add(re.sub(r"\b0+(?=[0-9a-f])", "", ip.exploded))
    return [f.lower() for f in forms]


def check_file(path: Path, errors: list[str], seen: dict[str, str]) -> Counter[str]:
    counts: Counter[str] = Counter()
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if header != HEADER:
            errors.append(f"{path.name}: header {header}, want {HEADER}")
            return counts
        for line, rec in enumerate(reader, start=2):
            where = f"{path.name}:{line}"
            if len(rec) != len(HEADER):
                errors.append(f"{where}: {len(rec)} fields, want {len(HEADER)}")
                continue
            ip_text, name, label, operation, category, enc, source, evidence = rec
            try:
                ip = ipaddress.ip_address(ip_text)
            except ValueError:
                errors.append(f"{where}: bad ip {ip_text!r}")
                continue
            if str(ip) != ip_text:
                errors.append(f"{where}: ip {ip_text!r} is not canonical ({ip})")
            if not ip.is_global or any(ip in n for n in NOT_PUBLIC if n.version == ip.version):
                errors.append(f"{where}: {ip} is not public unicast")
            if name != name.strip().lower() or name.endswith(".") or not name:
                errors.append(f"{where}: name {name!r} not lower case / trimmed")
            elif not all(LABEL_RE.match(x) for x in name.split(".")):
                errors.append(f"{where}: name {name!r} has a bad label")
            if label not in ("real", "generic"):
                errors.append(f"{where}: bad label {label!r}")
            elif category not in (REAL if label == "real" else GENERIC):
                errors.append(f"{where}: category {category!r} does not fit label {label}")
            if not operation.strip():
                errors.append(f"{where}: empty operation")
            if not SOURCE_RE.match(source):
                errors.append(f"{where}: source {source!r} is neither a URL nor github:o/r:path")
            ev = _fold(evidence)
            if len(evidence) > MAX_EVIDENCE:
                errors.append(f"{where}: evidence longer than {MAX_EVIDENCE}")
            if name not in ev:
                errors.append(f"{where}: name {name} not in the evidence")
            if not any(f in ev for f in _address_forms(ip)):
                errors.append(f"{where}: address {ip} not in the evidence")
            problem = enc_problem(enc, name, ip)
            if problem:
                errors.append(f"{where}: {problem} ({name}, {ip})")
            if name in seen:
                errors.append(f"{where}: {name} already in {seen[name]}")
            seen[name] = where
            counts[f"{label} {category} IPv{ip.version}"] += 1
            counts[f"label {label}"] += 1
            counts[f"enc {enc.split(':')[0]}"] += 1
    return counts


def main(argv: list[str]) -> int:
    files = [Path(a) for a in argv] or [HERE / f for f in DEFAULT_FILES]
    errors: list[str] = []
    seen: dict[str, str] = {}
    for path in files:
        counts = check_file(path, errors, seen)
        print(f"== {path}: {counts['label real'] + counts['label generic']} rows")
        for key, n in sorted(counts.items()):
            print(f"  {key:<45} {n:>4}")
    for e in errors:
        print("ERROR", e)
    print(f"{len(errors)} problems")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
