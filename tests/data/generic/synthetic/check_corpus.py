"""Validate the generic-name data sets (corpus.csv and holdout.csv).

Run from anywhere:

    /work/main/.venv/bin/python tests/data/generic/check_corpus.py

Checks that every row parses, that names are unique within and across the two
files, that no address is private, loopback or documentation space, that the
label/category/IP-version mix meets the data brief, and that every row whose
note claims an address encoding (``enc=<tag>``) really carries its address in
that form.  Prints the counts; exits 1 if anything fails.
"""

from __future__ import annotations

import csv
import ipaddress
import re
import sys
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from publicsuffixlist import PublicSuffixList

HERE = Path(__file__).resolve().parent
HEADER = ["ip", "ptr", "label", "category", "note"]

GENERIC_CATEGORIES = frozenset(
    {
        "consumer-isp",
        "business-line",
        "mobile",
        "cloud-default",
        "hosting-default",
        "university-resnet",
        "opaque-id",
        "pool-placeholder",
    }
)
REAL_CATEGORIES = frozenset(
    {
        "big-sender",
        "isp-relay",
        "university-relay",
        "enterprise",
        "small-business",
        "pool-word-domain",
        "digits-mail-role",
    }
)
CATEGORIES = GENERIC_CATEGORIES | REAL_CATEGORIES
HARD_REAL = ("pool-word-domain", "digits-mail-role")

# Per file: minimum rows, minimum big-sender rows.
FILES: dict[str, tuple[int, int]] = {"corpus.csv": (600, 60), "holdout.csv": (400, 40)}
MIN_HARD_REAL = 30
MIN_GENERIC_DOMAINS = 25
GENERIC_SHARE = (0.50, 0.60)
MIN_IPV6_SHARE = 0.15

# Address space that must never appear (beyond what is_global already rejects).
DOC_NETS = [
    ipaddress.ip_network(n)
    for n in (
        "192.0.2.0/24",
        "198.51.100.0/24",
        "203.0.113.0/24",
        "2001:db8::/32",
        "3fff::/20",
        "10.0.0.0/8",
        "172.16.0.0/12",
        "192.168.0.0/16",
        "127.0.0.0/8",
        "100.64.0.0/10",
    )
]

LABEL_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
DIGITS_RE = re.compile(r"[0-9]+")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class Row:
    file: str
    line: int
    ip: IPAddress
    ptr: str
    label: str
    category: str
    note: str
    tag: str

    def where(self) -> str:
        return f"{self.file}:{self.line} {self.ip} {self.ptr}"


# --------------------------------------------------------------------------
# address encodings
# --------------------------------------------------------------------------


def octets(ip: IPAddress) -> tuple[int, int, int, int]:
    a, b, c, d = ip.packed[-4:]
    return a, b, c, d


def has_digits_bounded(ptr: str, needle: str) -> bool:
    """True if needle occurs in ptr with no digit directly before or after it."""
    start = ptr.find(needle)
    while start != -1:
        end = start + len(needle)
        before = ptr[start - 1] if start > 0 else ""
        after = ptr[end] if end < len(ptr) else ""
        if not before.isdigit() and not after.isdigit():
            return True
        start = ptr.find(needle, start + 1)
    return False


def joined(parts: Iterable[int], sep: str, width: int = 0) -> str:
    return sep.join(f"{p:0{width}d}" for p in parts)


def digit_run_sequence(ptr: str, wanted: list[int]) -> bool:
    """True if the numbers in wanted appear as consecutive digit runs of ptr."""
    runs = [int(t) for t in DIGITS_RE.findall(ptr)]
    n = len(wanted)
    return any(runs[i : i + n] == wanted for i in range(len(runs) - n + 1))


def base36(n: int) -> str:
    alphabet = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = ""
    while n:
        n, r = divmod(n, 36)
        out = alphabet[r] + out
    return out or "0"


def v4_forms(ptr: str, ip: IPAddress) -> bool:
    """Forward or reversed dashed/dotted octets of the (embedded) IPv4."""
    o = octets(ip)
    r = tuple(reversed(o))
    return any(has_digits_bounded(ptr, joined(x, sep)) for x in (o, r) for sep in "-.")


def v6_dashed(ptr: str, ip: IPAddress) -> bool:
    for label in ptr.split("."):
        parts = label.split("-")
        for k in range(len(parts)):
            candidate = ":".join(parts[k:])
            try:
                if ipaddress.IPv6Address(candidate) == ip:
                    return True
            except ValueError:
                continue
    return False


def v6_prefix(ptr: str, ip: IPAddress) -> bool:
    full = ip.exploded.replace(":", "")
    if full[:16] in ptr:
        return True
    net = ipaddress.IPv6Network(f"{ip}/64", strict=False)
    for label in ptr.split("."):
        parts = label.split("-")
        for k in range(len(parts) - 3):
            try:
                if ipaddress.IPv6Network(":".join(parts[k : k + 4]) + "::/64") == net:
                    return True
            except ValueError:
                continue
    return False


def _seq(spec: str) -> Callable[[str, IPAddress], bool]:
    """Octets named by spec (a to d) appear in that order as consecutive numbers."""
    index = {"a": 0, "b": 1, "c": 2, "d": 3}

    def check(ptr: str, ip: IPAddress) -> bool:
        o = octets(ip)
        return ip.version == 4 and digit_run_sequence(ptr, [o[index[ch]] for ch in spec])

    return check


def _v4(
    check: Callable[[str, tuple[int, int, int, int], int], bool],
) -> Callable[[str, IPAddress], bool]:
    def wrapped(ptr: str, ip: IPAddress) -> bool:
        return ip.version == 4 and check(ptr, octets(ip), int(ip))

    return wrapped


def _v6(check: Callable[[str, IPAddress], bool]) -> Callable[[str, IPAddress], bool]:
    def wrapped(ptr: str, ip: IPAddress) -> bool:
        return ip.version == 6 and check(ptr, ip)

    return wrapped


def _v6_embedded_v4(ptr: str, ip: IPAddress) -> bool:
    return v4_forms(ptr, ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))


def _b36_pool(ptr: str, o: tuple[int, int, int, int], n: int) -> bool:
    return f"node-{base36(n & 0xFFFF)}." in ptr and f"pool-{o[0]}-{o[1]}." in ptr


ENCODINGS: dict[str, Callable[[str, IPAddress], bool]] = {
    "dash-fwd": _v4(lambda p, o, _n: has_digits_bounded(p, joined(o, "-"))),
    "dot-fwd": _v4(lambda p, o, _n: has_digits_bounded(p, joined(o, "."))),
    "dash-rev": _v4(lambda p, o, _n: has_digits_bounded(p, joined(reversed(o), "-"))),
    "dot-rev": _v4(lambda p, o, _n: has_digits_bounded(p, joined(reversed(o), "."))),
    "pad-fwd": _v4(
        lambda p, o, _n: any(has_digits_bounded(p, joined(o, s, 3)) for s in ("", "-", "."))
    ),
    "pad-rev": _v4(
        lambda p, o, _n: any(
            has_digits_bounded(p, joined(reversed(o), s, 3)) for s in ("", "-", ".")
        )
    ),
    "hex": _v4(lambda p, _o, n: f"{n:08x}" in p),
    "hex3-dec": _v4(
        lambda p, o, _n: has_digits_bounded(p, f"{o[0]:02x}{o[1]:02x}{o[2]:02x}-{o[3]}")
    ),
    "sl-hex": _v4(lambda p, o, _n: p.startswith(f"{o[3]:02x}.{o[2]:02x}.{o[1]:02x}{o[0]:02x}.")),
    "dec": _v4(lambda p, _o, n: str(n) in DIGITS_RE.findall(p)),
    "b36": _v4(lambda p, _o, n: base36(n) in p),
    "b36-pool": _v4(_b36_pool),
    "v6-full": _v6(lambda p, ip: ip.exploded.replace(":", "") in p),
    "v6-nibble": _v6(lambda p, ip: ".".join(reversed(ip.exploded.replace(":", ""))) in p),
    "v6-dash": _v6(v6_dashed),
    "v6-prefix": _v6(v6_prefix),
    "v6-v4": _v6(_v6_embedded_v4),
}
for _spec in ("abcd", "dcba", "dabc", "cd", "bcd", "abc", "ab"):
    ENCODINGS[f"seq-{_spec}"] = _seq(_spec)

FAMILY: dict[str, str] = {
    "dash-fwd": "forward octets",
    "dot-fwd": "forward octets",
    "seq-abcd": "forward octets",
    "dash-rev": "reversed octets",
    "dot-rev": "reversed octets",
    "seq-dcba": "reversed octets",
    "seq-dabc": "rotated octets",
    "seq-cd": "partial octets",
    "seq-bcd": "partial octets",
    "seq-abc": "partial octets",
    "seq-ab": "partial octets",
    "pad-fwd": "zero-padded octets",
    "pad-rev": "zero-padded octets",
    "hex": "hexadecimal",
    "hex3-dec": "hexadecimal",
    "sl-hex": "hexadecimal",
    "dec": "decimal integer",
    "b36": "base-36",
    "b36-pool": "base-36",
    "v6-full": "IPv6 full address",
    "v6-nibble": "IPv6 nibbles",
    "v6-dash": "IPv6 dashed hextets",
    "v6-prefix": "IPv6 prefix",
    "v6-v4": "IPv6 embedded IPv4",
}
REQUIRED_FAMILIES = frozenset(FAMILY.values()) | {"opaque identifier", "pool placeholder"}


def family_of(row: Row) -> str:
    if row.tag != "none":
        return FAMILY[row.tag]
    if row.category == "opaque-id":
        return "opaque identifier"
    if row.category == "pool-placeholder":
        return "pool placeholder"
    return "default name without address"


def unclaimed_encoding(row: Row) -> str | None:
    """Name an address form found in a row tagged enc=none (a likely tagging slip)."""
    p, ip = row.ptr, row.ip
    if ip.version == 4:
        for tag in ("dash-fwd", "dot-fwd", "dash-rev", "dot-rev", "pad-fwd", "hex", "dec"):
            if ENCODINGS[tag](p, ip):
                return tag
        return None
    for tag in ("v6-full", "v6-nibble", "v6-dash"):
        if ENCODINGS[tag](p, ip):
            return tag
    return None


# --------------------------------------------------------------------------
# loading and row checks
# --------------------------------------------------------------------------


def bad_address(ip: IPAddress) -> bool:
    return (not ip.is_global) or any(ip in net for net in DOC_NETS if net.version == ip.version)


def hostname_problem(ptr: str) -> str | None:
    if not ptr:
        return "empty ptr"
    if ptr != ptr.strip() or ptr != ptr.lower():
        return "ptr not lower case or has spaces"
    if ptr.endswith("."):
        return "ptr has a trailing dot"
    if len(ptr) > 253:
        return "ptr longer than 253"
    for label in ptr.split("."):
        if not LABEL_RE.match(label):
            return f"bad label {label!r}"
    return None


def load(name: str, errors: list[str]) -> list[Row]:
    rows: list[Row] = []
    path = HERE / name
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if header != HEADER:
            errors.append(f"{name}: header is {header}, want {HEADER}")
            return rows
        for line, rec in enumerate(reader, start=2):
            where = f"{name}:{line}"
            if len(rec) != len(HEADER):
                errors.append(f"{where}: {len(rec)} fields")
                continue
            ip_text, ptr, label, category, note = rec
            try:
                ip = ipaddress.ip_address(ip_text)
            except ValueError:
                errors.append(f"{where}: bad ip {ip_text!r}")
                continue
            if str(ip) != ip_text:
                errors.append(f"{where}: ip {ip_text!r} not in canonical form {ip}")
            if bad_address(ip):
                errors.append(f"{where}: non-global or documentation address {ip}")
            problem = hostname_problem(ptr)
            if problem:
                errors.append(f"{where}: {problem}")
            if label not in ("generic", "real"):
                errors.append(f"{where}: bad label {label!r}")
            if category not in CATEGORIES:
                errors.append(f"{where}: bad category {category!r}")
            elif (label == "generic") != (category in GENERIC_CATEGORIES):
                errors.append(f"{where}: label {label} does not fit category {category}")
            tag = note.split(" ", 1)[0].removeprefix("enc=") if note.startswith("enc=") else ""
            if tag != "none" and tag not in ENCODINGS:
                errors.append(f"{where}: note must start with enc=<known tag>, got {note!r}")
            rows.append(Row(name, line, ip, ptr, label, category, note, tag))
    return rows


def registered_domain(psl: PublicSuffixList, ptr: str) -> str | None:
    if "." not in ptr:
        return None
    result = psl.privatesuffix(ptr)
    return result if isinstance(result, str) else ptr


# --------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------


def show(title: str, counts: Counter[str]) -> None:
    print(f"  {title}:")
    for key, value in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        print(f"    {key:<30} {value:>4}")


def check_file(name: str, rows: list[Row], psl: PublicSuffixList, errors: list[str]) -> set[str]:
    min_rows, min_big = FILES[name]
    total = len(rows)
    print(f"== {name}: {total} rows")
    if total == 0:
        errors.append(f"{name}: no rows")
        return set()

    dupes = [p for p, n in Counter(r.ptr for r in rows).items() if n > 1]
    errors.extend(f"{name}: duplicate ptr {p}" for p in dupes)

    labels = Counter(r.label for r in rows)
    cats = Counter(r.category for r in rows)
    versions = Counter(f"IPv{r.ip.version}" for r in rows)
    by_label_version = Counter(f"{r.label} IPv{r.ip.version}" for r in rows)
    show("label", labels)
    show("category", cats)
    show("IP version", versions)
    show("label x IP version", by_label_version)

    generic = [r for r in rows if r.label == "generic"]
    families = Counter(family_of(r) for r in generic)
    tags = Counter(r.tag for r in generic)
    show("generic rows by encoding family", families)
    show("generic rows by enc tag", tags)
    real_claims = Counter(r.tag for r in rows if r.label == "real" and r.tag != "none")
    show("real rows that carry their address (enc tag)", real_claims)

    domains = {d for r in generic if (d := registered_domain(psl, r.ptr))}
    tlds = {r.ptr.rsplit(".", 1)[-1] for r in generic if "." in r.ptr}
    cctlds = {t for t in tlds if len(t) == 2}
    print(f"  generic registered domains (providers): {len(domains)}")
    print(f"  generic country-code TLDs: {len(cctlds)} ({' '.join(sorted(cctlds))})")

    share = labels["generic"] / total
    v6share = versions["IPv6"] / total
    hard = sum(cats[c] for c in HARD_REAL)
    print(f"  generic share {share:.3f}; IPv6 share {v6share:.3f}; hard real rows {hard}")

    def need(ok: bool, message: str) -> None:
        if not ok:
            errors.append(f"{name}: {message}")

    need(total >= min_rows, f"{total} rows < {min_rows}")
    need(
        GENERIC_SHARE[0] <= share <= GENERIC_SHARE[1],
        f"generic share {share:.3f} outside {GENERIC_SHARE}",
    )
    need(v6share >= MIN_IPV6_SHARE, f"IPv6 share {v6share:.3f} < {MIN_IPV6_SHARE}")
    need(cats["big-sender"] >= min_big, f"big-sender {cats['big-sender']} < {min_big}")
    need(hard >= MIN_HARD_REAL, f"pool-word-domain + digits-mail-role {hard} < {MIN_HARD_REAL}")
    for cat in sorted(CATEGORIES - set(cats)):
        errors.append(f"{name}: category {cat} has no rows")
    for fam in sorted(REQUIRED_FAMILIES - set(families)):
        errors.append(f"{name}: encoding family {fam!r} has no generic rows")
    need(len(domains) >= MIN_GENERIC_DOMAINS, f"only {len(domains)} generic providers")

    failed = 0
    for r in rows:
        if r.tag in ENCODINGS and not ENCODINGS[r.tag](r.ptr, r.ip):
            failed += 1
            errors.append(f"{r.where()}: note claims enc={r.tag} but the name does not carry it")
        elif r.tag == "none" and (found := unclaimed_encoding(r)):
            failed += 1
            errors.append(f"{r.where()}: tagged enc=none but the name carries enc={found}")
    claimed = sum(1 for r in rows if r.tag in ENCODINGS)
    print(f"  encoding spot check: {claimed} rows claim an encoding; {failed} problems")
    return domains


def main() -> int:
    errors: list[str] = []
    psl = PublicSuffixList()
    loaded = {name: load(name, errors) for name in FILES}
    domains = {name: check_file(name, rows, psl, errors) for name, rows in loaded.items()}

    ptrs = [{r.ptr for r in rows} for rows in loaded.values()]
    shared = sorted(ptrs[0] & ptrs[1])
    errors.extend(f"ptr in both files: {p}" for p in shared)
    overlap = sorted(set.intersection(*domains.values()))
    print(f"== generic provider domains present in both files: {len(overlap)}")
    if overlap:
        print("   " + " ".join(overlap))

    if errors:
        print(f"== FAILED: {len(errors)} problems")
        for e in errors:
            print("  " + e)
        return 1
    print("== OK: all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
