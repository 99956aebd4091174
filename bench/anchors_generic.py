"""Other projects' generic/dynamic host-name detectors, run as written.

The benchmark reports heloguard's recall and false-positive rate on labelled
names; this module puts three outside anchors beside it, on the same rows:

* SpamAssassin's ``RDNS_DYNAMIC`` meta rule (with its ``__RDNS_DYNAMIC_*``,
  ``__RDNS_INDICATOR_*`` and ``__RDNS_STATIC`` sub-rules) and its
  ``HELO_DYNAMIC_*`` rules;
* rspamd's hfilter plugin: its weighted regexp tables for the client's host
  name and for the HELO;
* pymilter's ``Milter.dynip.is_dynip`` (installed with pymilter).

None of their rules is copied into this repository.  The rule files come at run
time from Debian's own packages: ``apt-get download`` into ``.cache/anchors/``
(gitignored; a ``.deb`` already there is reused, so only the first run needs
the network), then ``dpkg-deb -x``.  The files found there are parsed, and
their regexes are translated mechanically to Python's ``re``.  An anchor whose
files cannot be had is reported as unavailable, never replaced by a copy.

How each one is evaluated, in the terms of the program that wrote it:

SpamAssassin
    Header rules are Perl regexes applied to pseudo-headers.  For a client
    that connects straight to our MX, SpamAssassin's ``X-Spam-Relays-External``
    (and ``-Untrusted``) holds one relay, formatted by the template read from
    the package's ``Mail/SpamAssassin/Message/Metadata/Received.pm``
    (``[ ip=IP rdns=NAME helo=HELO by=MX ident= envfrom= intl=0 id= auth=
    msa=0 ]``).  The name being judged is put in both ``rdns=`` and ``helo=``
    (a bot that HELOs with its own rDNS name).  Meta rules are evaluated as
    written, with Perl's meaning of ``&&``, ``||``, ``!``, arithmetic and
    comparisons.  Rules are read from every ``*.cf`` in the package's rules
    directory and site directory, in SpamAssassin's order, so a later
    definition or score wins; a rule whose scores are all 0 is disabled, as in
    SpamAssassin.

rspamd hfilter
    The Lua long strings ``checks_hellohost``, ``checks_hello``,
    ``checks_hello_badip`` and ``checks_hello_bareip`` are read with a port of
    rspamd's map-list parser (``rspamd_parse_kv_list``) and its regexp
    delimiter/flag parser (``rspamd_regexp_new``), so a line rspamd would drop
    is dropped here too.  The plugin's callback takes the highest weight of the
    ``checks_hellohost`` regexes that match the client host name
    (``HFILTER_HOSTNAME_<w>``) and, for the HELO, of ``checks_hello`` and
    ``checks_hellohost`` unless the HELO is a bad or bare IP
    (``HFILTER_HELO_<w>``).  hfilter has no generic-name threshold of its own:
    each weight 1-5 is a symbol with its own score (0.5, 1, 2, 2.5, 3 in
    ``scores.d/hfilter_group.conf``), so "weight>=4" is our cut at its "hard"
    and "very hard" symbols.

pymilter
    ``is_dynip(name, ip)`` as installed; an exception counts as "not dynamic"
    (and is counted).
"""

from __future__ import annotations

import csv
import functools
import importlib.util
import re
import shutil
import subprocess
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ROOT

CACHE = ROOT / ".cache" / "anchors"
CORPUS = ROOT / "tests" / "data" / "generic" / "synthetic" / "corpus.csv"

#: The receiving MTA's name, SpamAssassin's ``by=``.  It matters a little: a
#: few HELO rules let ``[^\.]*`` run past the HELO into the rest of the line.
RECEIVING_HOST = "mx.example.org"

SA_PACKAGE = "spamassassin"
RSPAMD_PACKAGE = "rspamd"

LABEL_SA_RDNS = "SpamAssassin RDNS_DYNAMIC"
LABEL_SA_HELO = "SpamAssassin HELO_DYNAMIC_*"
LABEL_HF_ANY = "rspamd hfilter (any)"
LABEL_HF_HARD = "rspamd hfilter (weight>=4)"
LABEL_HF_HELO = "rspamd hfilter HELO (any)"
LABEL_PYMILTER = "pymilter is_dynip"
LABELS = (LABEL_SA_RDNS, LABEL_SA_HELO, LABEL_HF_ANY, LABEL_HF_HARD, LABEL_HF_HELO, LABEL_PYMILTER)


class AnchorUnavailable(Exception):
    """An anchor's files or code could not be had, or are not what we expect."""


# --------------------------------------------------------------------------
# Debian packages


@dataclass(frozen=True)
class Package:
    """A Debian binary package, downloaded and unpacked under CACHE."""

    name: str
    version: str
    deb: Path
    root: Path


def _run(argv: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, check=False, timeout=600)


def fetch_package(name: str) -> Package:
    """Download (once) and unpack Debian's package ``name``; raise AnchorUnavailable."""
    for tool in ("apt-get", "dpkg-deb"):
        if shutil.which(tool) is None:
            raise AnchorUnavailable(f"{tool} is not installed (a Debian system is needed)")
    CACHE.mkdir(parents=True, exist_ok=True)
    debs = sorted(CACHE.glob(f"{name}_*.deb"))
    if not debs:
        proc = _run(["apt-get", "download", name], cwd=CACHE)
        debs = sorted(CACHE.glob(f"{name}_*.deb"))
        if proc.returncode != 0 or not debs:
            why = (proc.stderr.strip().splitlines() or ["no .deb written"])[-1]
            raise AnchorUnavailable(
                f"`apt-get download {name}` failed ({why}); "
                "the package lists may need `apt-get update`"
            )
    deb = debs[-1]
    proc = _run(["dpkg-deb", "-f", str(deb), "Version"])
    version = proc.stdout.strip()
    if proc.returncode != 0 or not version:
        raise AnchorUnavailable(f"cannot read the version of {deb.name}: {proc.stderr.strip()}")
    root = CACHE / f"{name}_{version.replace(':', '%3a')}"
    marker = root / ".unpacked"
    if not marker.exists():
        root.mkdir(parents=True, exist_ok=True)
        proc = _run(["dpkg-deb", "-x", str(deb), str(root)])
        if proc.returncode != 0:
            raise AnchorUnavailable(f"cannot unpack {deb.name}: {proc.stderr.strip()}")
        marker.touch()
    return Package(name, version, deb, root)


def _rel(pkg: Package, path: Path) -> str:
    return "/" + str(path.relative_to(pkg.root))


# --------------------------------------------------------------------------
# Perl / PCRE regular expressions to Python


class Untranslatable(Exception):
    """A regex construct with no faithful Python equivalent."""


_POSIX_CLASSES = {
    "alpha": "a-zA-Z",
    "digit": "0-9",
    "alnum": "a-zA-Z0-9",
    "upper": "A-Z",
    "lower": "a-z",
    "space": r" \t\n\r\f\v",
    "blank": r" \t",
    "xdigit": "0-9A-Fa-f",
    "word": r"\w",
    "punct": r"!-/:-@\[-`{-~",
    "cntrl": r"\x00-\x1f\x7f",
    "print": r"\x20-\x7e",
    "graph": r"\x21-\x7e",
}
# escapes Perl has and Python lacks, outside and inside a character class
_ESCAPES_OUT = {
    "z": r"\Z",
    "Z": r"(?=\n?\Z)",
    "h": r"[ \t]",
    "H": r"[^ \t]",
    "v": r"[\n\x0b\f\r]",
    "V": r"[^\n\x0b\f\r]",
    "R": r"(?:\r\n|[\n\x0b\f\r\x85])",
}
_ESCAPES_IN = {"h": r" \t", "v": r"\n\x0b\f\r"}
_NO_EQUIVALENT = set("KGXpPCLlUuNoe")
_PY_FLAGS = {"i": re.IGNORECASE, "m": re.MULTILINE, "s": re.DOTALL, "x": re.VERBOSE}


def perl_to_python(src: str) -> str:
    """Rewrite the body of a Perl (or PCRE) regex for Python's ``re``.

    Possessive quantifiers and atomic groups need nothing (Python 3.11 has
    them); ``\\z``, ``\\Z``, ``\\h``, ``\\v``, ``\\R``, ``\\x{..}``,
    ``\\Q..\\E``, POSIX classes, named groups and ``\\k<name>`` are rewritten;
    anything else without an equivalent raises Untranslatable.
    """
    out: list[str] = []
    i, n = 0, len(src)
    in_class = False
    while i < n:
        c = src[i]
        if c == "\\":
            if i + 1 >= n:
                raise Untranslatable("trailing backslash")
            d = src[i + 1]
            if d == "x" and src.startswith("{", i + 2):
                end = src.find("}", i + 3)
                if end < 0:
                    raise Untranslatable("unterminated \\x{")
                code = int(src[i + 3 : end] or "0", 16)
                out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")
                i = end + 1
                continue
            if d == "Q":
                end = src.find("\\E", i + 2)
                end = n if end < 0 else end
                out.append(re.escape(src[i + 2 : end]))
                i = end + 2
                continue
            if d == "E":
                i += 2
                continue
            if d == "k" and i + 2 < n and src[i + 2] in "<{'":
                close = {"<": ">", "{": "}", "'": "'"}[src[i + 2]]
                end = src.find(close, i + 3)
                if end < 0:
                    raise Untranslatable("unterminated \\k")
                out.append(f"(?P={src[i + 3 : end]})")
                i = end + 1
                continue
            if d == "g":
                m = re.match(r"\\g\{?(-?\d+)\}?", src[i:])
                if not m or m.group(1).startswith("-"):
                    raise Untranslatable(f"\\g form in {src[i : i + 6]!r}")
                out.append(f"(?:\\{m.group(1)})")
                i += m.end()
                continue
            table = _ESCAPES_IN if in_class else _ESCAPES_OUT
            if d in table:
                out.append(table[d])
            elif d in _NO_EQUIVALENT or (in_class and d in "zZHVR"):
                raise Untranslatable(f"\\{d}")
            else:
                out.append(src[i : i + 2])
            i += 2
            continue
        if in_class:
            if c == "[" and src.startswith("[:", i):
                m = re.match(r"\[:(\^?)([a-z]+):\]", src[i:])
                if not m or m.group(1) or m.group(2) not in _POSIX_CLASSES:
                    raise Untranslatable(f"POSIX class {src[i : i + 12]!r}")
                out.append(_POSIX_CLASSES[m.group(2)])
                i += m.end()
                continue
            if c == "]":
                in_class = False
                out.append(c)
            elif c in "[&~|":
                out.append("\\" + c)  # literal in Perl; Python would warn of set operations
            else:
                out.append(c)
            i += 1
            continue
        if c == "[":
            in_class = True
            out.append(c)
            i += 1
            if src.startswith("^", i):
                out.append("^")
                i += 1
            if src.startswith("]", i):
                out.append(r"\]")  # a leading ']' is literal
                i += 1
            continue
        if c == "(" and src.startswith("(?", i):
            rest = src[i + 2 :]
            if rest.startswith(("{", "?{", "^", "|", "R)", "&", "P>", "+")) or re.match(
                r"-?\d+\)", rest
            ):
                raise Untranslatable(f"group {src[i : i + 5]!r}")
            m = re.match(r"<([A-Za-z_]\w*)>|'([A-Za-z_]\w*)'", rest)
            if m:
                out.append(f"(?P<{m.group(1) or m.group(2)}>")
                i += 2 + m.end()
                continue
            m = re.match(r"([a-z]*)(?:-([a-z]*))?\)", rest)
            if m and i > 0:
                raise Untranslatable(f"inline modifiers {src[i : i + 2 + m.end()]!r} mid-pattern")
        if c == "$" and i + 1 < n and (src[i + 1].isalpha() or src[i + 1] in "_{"):
            raise Untranslatable("variable interpolation")
        out.append(c)
        i += 1
    if in_class:
        raise Untranslatable("unterminated character class")
    return "".join(out)


def compile_translated(body: str, flags: str) -> re.Pattern[str]:
    """Compile a Perl/PCRE regex body with its flags, ASCII semantics (SpamAssassin
    compiles with ``/aa``, rspamd without UTF).  Raises Untranslatable."""
    py_flags = re.ASCII
    for f in flags:
        if f in _PY_FLAGS:
            py_flags |= _PY_FLAGS[f]
        elif f not in "oaO":  # compile-once, ASCII-restrict and no-optimise change no match
            raise Untranslatable(f"modifier /{f}")
    translated = perl_to_python(body)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            return re.compile(translated, py_flags)
    except (re.error, FutureWarning, DeprecationWarning) as exc:
        raise Untranslatable(f"Python re rejects {translated!r}: {exc}") from exc


# --------------------------------------------------------------------------
# SpamAssassin


@dataclass
class SARule:
    """One header or meta rule, as SpamAssassin would load it."""

    name: str
    kind: str  # "header" or "meta"
    source: str  # file:line
    header: str = ""
    written: str = ""  # the regex as written, delimiters and modifiers included
    negate: bool = False
    if_unset: str = ""
    regex: re.Pattern[str] | None = None
    error: str = ""  # why it could not be translated
    expr: str = ""  # a meta rule's expression
    condition: str = ""  # the enclosing if/ifplugin blocks, if any


@dataclass
class SpamAssassin:
    """SpamAssassin's rules, loaded from its Debian package."""

    package: Package
    files: list[str]
    rules: dict[str, SARule]
    scores: dict[str, list[float]]
    template: str  # the relay as-string template from Received.pm
    rdns_target: str
    helo_targets: list[str]  # enabled HELO_DYNAMIC_* rules
    helo_disabled: list[str]  # HELO_DYNAMIC_* rules scored 0
    needed: list[str]  # every rule the targets depend on, targets included
    undefined: list[str] = field(default_factory=list)  # referenced but never defined


_META_TOKEN = re.compile(r"\s*(?:(\d+(?:\.\d+)?)|([A-Za-z_]\w*)|(&&|\|\||[<>=!]=|[-+*/()!<>]))")
_PSEUDO_RELAYS = (
    "X-Spam-Relays-External",
    "X-Spam-Relays-Untrusted",
    "X-Spam-Relays-Internal",
    "X-Spam-Relays-Trusted",
)


def _strip_delimiters(written: str) -> tuple[str, str]:
    """Util::compile_regexp's delimiter stripping: (body, modifiers)."""
    if written.startswith("/"):
        body, end = written[1:], "/"
    else:
        m = re.match(r"(?:m|qr)([{(<\[]|\W)", written)
        if not m or m.group(1) == "\\":
            raise Untranslatable("missing regexp delimiters")
        opener = m.group(1)
        end = {"{": "}", "(": ")", "<": ">", "[": "]"}.get(opener, opener)
        body = written[m.end() :]
    m = re.search(re.escape(end) + r"([a-df-z]*)\Z", body)
    if not m:
        raise Untranslatable("invalid end delimiter/modifiers")
    return body[: m.start()], m.group(1)


def _parse_header_rule(rule: SARule, value: str) -> None:
    m = re.match(r"(\S+)\s+(=~|!~)\s*(.*)$", value)
    if not m:
        rule.error = f"not a regex header test: {value[:60]!r}"
        return
    rule.header, rule.negate, rest = m.group(1), m.group(2) == "!~", m.group(3)
    unset = re.search(r"\s*\[if-unset:\s*([^\]]*)\]\s*$", rest)
    if unset:
        rule.if_unset, rest = unset.group(1), rest[: unset.start()]
    rule.written = rest
    try:
        body, mods = _strip_delimiters(rest)
        rule.regex = compile_translated(body, mods)
    except Untranslatable as exc:
        rule.error = str(exc)


def _sa_rule_files(pkg: Package) -> list[Path]:
    """The rules SpamAssassin loads by default: its rules directory, then the
    site directory (/etc/spamassassin), each in lexical order."""
    files: list[Path] = []
    for d in ("usr/share/spamassassin", "etc/spamassassin"):
        files += sorted((pkg.root / d).glob("*.cf"))
    return files


def _meta_names(expr: str) -> list[str]:
    return [m.group(2) for m in _META_TOKEN.finditer(expr) if m.group(2)]


@functools.cache
def load_spamassassin() -> SpamAssassin:
    """Fetch and parse SpamAssassin's rules; raise AnchorUnavailable."""
    pkg = fetch_package(SA_PACKAGE)
    files = _sa_rule_files(pkg)
    if not files:
        raise AnchorUnavailable(f"{SA_PACKAGE} {pkg.version} holds no /usr/share/spamassassin/*.cf")
    rules: dict[str, SARule] = {}
    scores: dict[str, list[float]] = {}
    for path in files:
        stack: list[tuple[str, bool]] = []  # (condition, branch taken)
        for lineno, raw in enumerate(path.read_text(errors="replace").splitlines(), 1):
            line = raw
            if "#" in line:  # Conf::Parser: unescaped '#' starts a comment
                line = re.sub(r"(?<!\\)#.*$", "", line).replace("\\#", "#")
            line = line.strip()
            if not line:
                continue
            key, value = ([*line.split(None, 1), ""])[:2]
            key = key.lower()
            if key in ("if", "ifplugin"):
                stack.append((f"{key} {value}", True))
            elif key == "else" and stack:
                stack[-1] = (stack[-1][0], False)
            elif key == "endif" and stack:
                stack.pop()
            elif key in ("header", "meta", "score"):
                if not all(taken for _, taken in stack):
                    continue  # an else branch: its if is taken to be true
                name, rest = ([*value.split(None, 1), ""])[:2]
                if key == "score":
                    nums = re.findall(r"-?\d+(?:\.\d+)?", rest)
                    if nums:
                        scores[name] = [float(x) for x in nums]
                    continue
                rule = SARule(
                    name=name,
                    kind=key,
                    source=f"{path.name}:{lineno}",
                    condition="; ".join(c for c, _ in stack),
                )
                if key == "meta":
                    rule.expr = rest
                else:
                    _parse_header_rule(rule, rest)
                rules[name] = rule  # a later definition replaces an earlier one
    rdns_target = "RDNS_DYNAMIC"
    if rdns_target not in rules:
        raise AnchorUnavailable(f"no rule {rdns_target} in {SA_PACKAGE} {pkg.version}")
    helo_all = sorted(n for n in rules if n.startswith("HELO_DYNAMIC_"))
    if not helo_all:
        raise AnchorUnavailable(f"no HELO_DYNAMIC_* rule in {SA_PACKAGE} {pkg.version}")
    helo_disabled = [n for n in helo_all if all(s == 0 for s in scores.get(n, [1.0]))]
    helo_targets = [n for n in helo_all if n not in helo_disabled]
    needed: list[str] = []
    undefined: list[str] = []
    todo = [rdns_target, *helo_all]
    while todo:
        name = todo.pop()
        if name in needed or name in undefined:
            continue
        if name not in rules:
            undefined.append(name)
            continue
        needed.append(name)
        if rules[name].kind == "meta":
            todo += _meta_names(rules[name].expr)
            try:  # check the syntax once, here
                _Meta(rules[name].expr, lambda _name: 0.0).evaluate()
            except Untranslatable as exc:
                rules[name].error = str(exc)
    received = pkg.root / "usr/share/perl5/Mail/SpamAssassin/Message/Metadata/Received.pm"
    if not received.exists():
        raise AnchorUnavailable(f"{_rel(pkg, received)} is missing from {SA_PACKAGE}")
    m = re.search(r'my \$asstr = "(\[ [^"]* \])";', received.read_text(errors="replace"))
    if not m:
        raise AnchorUnavailable(f"no relay as-string template found in {received.name}")
    return SpamAssassin(
        package=pkg,
        files=[_rel(pkg, f) for f in files],
        rules=rules,
        scores=scores,
        template=m.group(1),
        rdns_target=rdns_target,
        helo_targets=helo_targets,
        helo_disabled=helo_disabled,
        needed=sorted(needed),
        undefined=sorted(undefined),
    )


def relay_line(sa: SpamAssassin, ip: str, rdns: str, helo: str) -> str:
    """SpamAssassin's as-string for one relay (Received.pm's template, and its
    clean-ups: invalid characters to '!', trailing dots off the rDNS name,
    an "unknown" rDNS as none; intl=0 and msa=0 for an external relay)."""
    strip = re.compile(r"[\s\x00#\[\]()<>|]")
    rdns = re.sub(r"\.+\Z", "", rdns)
    if re.fullmatch(r"unknown", rdns, re.IGNORECASE) or rdns.startswith("["):
        rdns = ""
    rdns = strip.sub("!", rdns)
    fields = {
        "ip": strip.sub("!", ip),
        "rdns": rdns,
        "helo": strip.sub("!", helo),
        "by": RECEIVING_HOST,
        "ident": "",
        "id": "",
        "auth": "",
    }
    line = re.sub(r"\$relay->\{(\w+)\}", lambda m: fields.get(m.group(1), ""), sa.template)
    return line.replace("$envfrom", "")


class _Meta:
    """Perl's reading of a SpamAssassin meta expression: rule names are their
    hit counts, ``&&``/``||`` return the deciding operand, ``!`` gives 0 or 1."""

    def __init__(self, expr: str, value: Callable[[str], float]) -> None:
        self.tokens: list[str] = []
        pos = 0
        while pos < len(expr):
            m = _META_TOKEN.match(expr, pos)
            if not m:
                if expr[pos:].strip():
                    raise Untranslatable(f"meta syntax at {expr[pos : pos + 20]!r}")
                break
            self.tokens.append(m.group(m.lastindex or 0))
            pos = m.end()
        self.pos = 0
        self.value = value

    def evaluate(self) -> float:
        result = self._or()
        if self.pos != len(self.tokens):
            raise Untranslatable(f"meta: unexpected {self.tokens[self.pos]!r}")
        return result

    def _peek(self) -> str:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else ""

    def _take(self) -> str:
        tok = self._peek()
        self.pos += 1
        return tok

    def _or(self) -> float:
        left = self._and()
        while self._peek() == "||":
            self._take()
            right = self._and()
            left = left or right
        return left

    def _and(self) -> float:
        left = self._equality()
        while self._peek() == "&&":
            self._take()
            right = self._equality()
            left = left and right
        return left

    def _equality(self) -> float:
        left = self._relation()
        while self._peek() in ("==", "!="):
            op, right = self._take(), self._relation()
            left = float((left == right) if op == "==" else (left != right))
        return left

    def _relation(self) -> float:
        left = self._sum()
        while self._peek() in ("<", ">", "<=", ">="):
            op, right = self._take(), self._sum()
            left = float(
                {"<": left < right, ">": left > right, "<=": left <= right, ">=": left >= right}[op]
            )
        return left

    def _sum(self) -> float:
        left = self._product()
        while self._peek() in ("+", "-"):
            op, right = self._take(), self._product()
            left = left + right if op == "+" else left - right
        return left

    def _product(self) -> float:
        left = self._unary()
        while self._peek() in ("*", "/"):
            op, right = self._take(), self._unary()
            left = left * right if op == "*" else (left / right if right else 0.0)
        return left

    def _unary(self) -> float:
        tok = self._take()
        if tok == "!":
            return float(not self._unary())
        if tok == "-":
            return -self._unary()
        if tok == "(":
            inner = self._or()
            if self._take() != ")":
                raise Untranslatable("meta: unbalanced parentheses")
            return inner
        if re.fullmatch(r"\d+(?:\.\d+)?", tok):
            return float(tok)
        if re.fullmatch(r"[A-Za-z_]\w*", tok):
            return self.value(tok)
        raise Untranslatable(f"meta: unexpected {tok!r}")


def sa_hits(sa: SpamAssassin, line: str) -> dict[str, float]:
    """Every needed rule's value on one X-Spam-Relays-External line.

    A rule that could not be translated, or that is undefined, counts 0 (as an
    undefined rule does in SpamAssassin); describe() lists them."""
    headers = dict.fromkeys(_PSEUDO_RELAYS, "")
    headers["X-Spam-Relays-External"] = headers["X-Spam-Relays-Untrusted"] = line
    memo: dict[str, float] = {}

    def value(name: str) -> float:
        if name in memo:
            return memo[name]
        memo[name] = 0.0  # a cycle reads 0
        rule = sa.rules.get(name)
        result = 0.0
        if rule is None or rule.error:
            result = 0.0
        elif rule.kind == "header" and rule.regex is not None:
            text = headers.get(rule.header)
            if text is None:  # a header this one-relay model does not have
                text = rule.if_unset
            result = float(bool(rule.regex.search(text)) != rule.negate)
        elif rule.kind == "meta":
            result = _Meta(rule.expr, value).evaluate()
        memo[name] = result
        return result

    return {name: value(name) for name in sa.needed}


def spamassassin_verdicts(rows: Sequence[tuple[str, str]]) -> tuple[list[bool], list[bool]]:
    """(RDNS_DYNAMIC, any enabled HELO_DYNAMIC_*) for each (ip, name) row."""
    sa = load_spamassassin()
    rdns: list[bool] = []
    helo: list[bool] = []
    for ip, name in rows:
        hits = sa_hits(sa, relay_line(sa, ip, name, name))
        rdns.append(bool(hits[sa.rdns_target]))
        helo.append(any(hits.get(t) for t in sa.helo_targets))
    return rdns, helo


# --------------------------------------------------------------------------
# rspamd hfilter

HF_TABLES = ("checks_hellohost", "checks_hello", "checks_hello_badip", "checks_hello_bareip")
# the plugin logic implemented below, as it reads in hfilter.lua
_HF_LOGIC = (
    "type = 'regexp_multi'",
    "checks_hellohost_map:get_key(hostname)",
    "weight > weight_hostname",
    "checks_hello_badip_map:get_key(helo)",
    "checks_hello_bareip_map:get_key(helo)",
    "checks_hello_map:get_key(helo)",
    "checks_hellohost_map:get_key(helo)",
    "weight > weight_helo",
    "string.gsub(helo, '[%[%]]', '')",
    "helo ~= rspamc_local_helo",
)


@dataclass
class HfEntry:
    """One line of an hfilter map: the key as written, its value, the regex."""

    key: str
    value: str
    regex: re.Pattern[str] | None = None
    full_match: bool = False  # m{...}: rspamd wants the whole string
    error: str = ""


@dataclass
class Hfilter:
    """rspamd's hfilter tables, loaded from its Debian package."""

    package: Package
    lua: str  # path inside the package
    tables: dict[str, list[HfEntry]]
    lost: dict[str, str]  # text rspamd's map parser drops (never stored as a key)
    enabled: dict[str, bool]  # helo_enabled / hostname_enabled in modules.d/hfilter.conf
    rspamc_local_helo: str


def parse_kv_list(data: str, default: str = "1") -> tuple[list[tuple[str, str]], str]:
    """A port of rspamd_parse_kv_list (src/libserver/maps/map_helpers.c), with
    final=TRUE: the (key, value) pairs it inserts, and any text it consumed
    without inserting (an unterminated /regexp/ swallows the rest)."""
    pairs: list[tuple[str, str]] = []
    state = "skip_spaces_before_key"
    p = c = 0
    end = len(data)
    key: str | None = None

    def store(a: int, b: int) -> str:
        while a < b and data[a].isspace():
            a += 1
        return data[a:b].strip()

    while p < end:
        ch = data[p]
        if state == "skip_spaces_before_key":
            if ch.isspace():
                p += 1
            elif ch == '"':
                p += 1
                c = p
                state = "read_key_quoted"
            elif ch == "/":
                c = p
                p += 1
                state = "read_key_slashed"
            else:
                c = p
                state = "read_key"
        elif state in ("read_key", "read_key_after_slash"):
            plain = state == "read_key"
            if ch == "#" and (not plain or p == c or data[p - 1] != "\\"):
                if p - c > 0:
                    pairs.append((store(c, p), default))
                key = None
                state = "read_comment_start"
            elif ch in "\r\n":
                if p - c > 0:
                    pairs.append((store(c, p), default))
                key = None
                state = "read_eol"
            elif ch.isspace():
                if p - c > 0:
                    key = store(c, p)
                    state = "skip_spaces_after_key"
                else:
                    state = "skip_comment"
            else:
                p += 1
        elif state == "read_key_quoted":
            if ch == "\\":
                state = "backslash_quoted"
            elif ch == '"':
                key = store(c, p)
                state = "skip_spaces_after_key"
            p += 1
        elif state == "read_key_slashed":
            if ch == "\\":
                state = "backslash_slashed"
                p += 1
            elif ch == "/":
                state = "read_key_after_slash"
            else:
                p += 1
        elif state == "backslash_quoted":
            p += 1
            state = "read_key_quoted"
        elif state == "backslash_slashed":
            p += 1
            state = "read_key_slashed"
        elif state == "skip_spaces_after_key":
            if ch in " \t":
                p += 1
            else:
                c = p
                state = "read_value"
        elif state == "read_value":
            if key is None:
                state = "skip_comment"
            elif ch == "#" or ch in "\r\n":
                pairs.append((key, store(c, p) if p - c > 0 else default))
                key = None
                state = "read_comment_start" if ch == "#" else "read_eol"
            else:
                p += 1
        elif state == "read_comment_start":
            p += 1
            key = None
            state = "skip_comment"
        elif state == "skip_comment":
            if ch in "\r\n":
                state = "read_eol"
            else:
                p += 1
        elif state == "read_eol":
            if ch in "\r\n":
                p += 1
            else:
                state = "skip_spaces_before_key"
    lost = ""
    if state == "read_key" and p - c > 0:
        pairs.append((store(c, p), default))
    elif state == "read_value" and key is not None:
        pairs.append((key, store(c, p) if p - c > 0 else default))
    elif state in ("read_key_slashed", "backslash_slashed", "read_key_after_slash"):
        lost = data[c:].strip()
    return pairs, lost


def rspamd_regexp(key: str) -> HfEntry:
    """rspamd_regexp_new(key, NULL): delimiters and flags, then translation."""
    entry = HfEntry(key=key, value="")
    start, sep = 0, ""
    if key.startswith("/"):
        sep = "/"
    elif key.startswith("m") and len(key) > 1:
        start, sep = 1, key[1]
        sep = "}" if sep == "{" else sep
        entry.full_match = True
    if not sep or sep.isalnum():
        body, flags = key, ""
        entry.full_match = False
    else:
        stop = key.rfind(sep)
        if stop <= start:
            entry.error = f"rspamd rejects it: pattern is not enclosed with {sep}"
            return entry
        body, flags = key[start + 1 : stop], key[stop + 1 :]
    kept = ""
    for f in flags:  # rspamd warns about an unknown flag and ignores it and the rest
        if f not in "imsxuOr":
            break
        kept += f
    try:
        entry.regex = compile_translated(body, kept.replace("u", "").replace("r", ""))
    except Untranslatable as exc:
        entry.error = str(exc)
    return entry


@functools.cache
def load_hfilter() -> Hfilter:
    """Fetch and parse rspamd's hfilter plugin; raise AnchorUnavailable."""
    pkg = fetch_package(RSPAMD_PACKAGE)
    found = sorted(pkg.root.rglob("hfilter.lua"))
    if not found:
        raise AnchorUnavailable(f"no hfilter.lua in {RSPAMD_PACKAGE} {pkg.version}")
    lua_path = found[0]
    lua = lua_path.read_text(errors="replace")
    missing = [s for s in _HF_LOGIC if s not in lua]
    if missing:
        raise AnchorUnavailable(
            f"{_rel(pkg, lua_path)} no longer reads as this module implements it "
            f"(missing {missing[0]!r})"
        )
    local_helo = re.search(r"local rspamc_local_helo = \"([^\"]*)\"", lua)
    tables: dict[str, list[HfEntry]] = {}
    lost: dict[str, str] = {}
    for name in HF_TABLES:
        m = re.search(r"local\s+" + name + r"\s*=\s*\[(=*)\[\n?(.*?)\]\1\]", lua, re.DOTALL)
        if not m:
            raise AnchorUnavailable(f"no table {name} in {_rel(pkg, lua_path)}")
        pairs, lost_text = parse_kv_list(m.group(2))
        if lost_text:
            lost[name] = lost_text
        entries: list[HfEntry] = []
        seen: set[str] = set()
        for k, v in pairs:
            if k in seen:  # rspamd keeps the first regexp and value of a duplicate key
                continue
            seen.add(k)
            entry = rspamd_regexp(k)
            entry.value = v
            entries.append(entry)
        tables[name] = entries
    enabled: dict[str, bool] = {}
    conf = pkg.root / "etc/rspamd/modules.d/hfilter.conf"
    if conf.exists():
        text = conf.read_text(errors="replace")
        for opt in ("helo_enabled", "hostname_enabled"):
            m = re.search(opt + r"\s*=\s*(\w+)", text)
            enabled[opt] = bool(m and m.group(1) == "true")
    return Hfilter(
        package=pkg,
        lua=_rel(pkg, lua_path),
        tables=tables,
        lost=lost,
        enabled=enabled,
        rspamc_local_helo=local_helo.group(1) if local_helo else "rspamc.local",
    )


def _map_get_key(entries: list[HfEntry], text: str) -> list[str]:
    """A regexp_multi map's get_key: the values of every regexp that matches."""
    values = []
    for e in entries:
        if e.regex is None or not text:
            continue
        m = e.regex.search(text)
        if m and (not e.full_match or (m.start() == 0 and m.end() == len(text))):
            values.append(e.value)
    return values


def _max_weight(values: list[str], start: float) -> float:
    weight = start
    for v in values:
        try:
            w = float(v)  # Lua: tonumber(weight) or 0
        except ValueError:
            w = 0.0
        weight = max(weight, w)
    return weight


def hfilter_weights(hf: Hfilter, hostname: str, helo: str) -> tuple[float, float]:
    """(weight_hostname, weight_helo) as hfilter_callback computes them."""
    weight_hostname = _max_weight(_map_get_key(hf.tables["checks_hellohost"], hostname), 0)
    weight_helo = 0.0
    if helo and helo != hf.rspamc_local_helo:
        helo = re.sub(r"[\[\]]", "", helo)
        bad = _map_get_key(hf.tables["checks_hello_badip"], helo)
        bare = [] if bad else _map_get_key(hf.tables["checks_hello_bareip"], helo)
        if not bad and not bare:
            weight_helo = _max_weight(_map_get_key(hf.tables["checks_hello"], helo), 0)
            weight_helo = _max_weight(
                _map_get_key(hf.tables["checks_hellohost"], helo), weight_helo
            )
    return weight_hostname, weight_helo


def hfilter_verdicts(
    rows: Sequence[tuple[str, str]],
) -> tuple[list[bool], list[bool], list[bool]]:
    """(hostname weight >= 1, hostname weight >= 4, HELO weight >= 1) per row."""
    hf = load_hfilter()
    anyw: list[bool] = []
    hard: list[bool] = []
    helo: list[bool] = []
    for _ip, name in rows:
        w_host, w_helo = hfilter_weights(hf, name, name)
        anyw.append(w_host >= 1)
        hard.append(w_host >= 4)
        helo.append(w_helo >= 1)
    return anyw, hard, helo


# --------------------------------------------------------------------------
# pymilter


@functools.cache
def _pymilter_dynip() -> ModuleType:
    """pymilter's Milter.dynip.  Run from the checkout's root, the folder
    ``milter/`` (heloguard's sources) shadows pymilter's C extension that
    ``Milter/__init__`` imports; dynip.py needs nothing of it, so it is then
    loaded from the installed package by path instead."""
    spec = importlib.util.find_spec("Milter")
    if spec is None or not spec.submodule_search_locations:
        raise AnchorUnavailable("pymilter (the Milter package) is not installed")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its '\d' string escapes warn on compile
        ext = importlib.util.find_spec("milter")
        if ext is not None and ext.submodule_search_locations is None:  # the C extension
            import Milter.dynip

            dynip: ModuleType = Milter.dynip
            return dynip
        path = Path(next(iter(spec.submodule_search_locations))) / "dynip.py"
        file_spec = importlib.util.spec_from_file_location("_pymilter_dynip", path)
        if file_spec is None or file_spec.loader is None or not path.exists():
            raise AnchorUnavailable(f"cannot load {path}")
        module = importlib.util.module_from_spec(file_spec)
        file_spec.loader.exec_module(module)
        return module


_PYMILTER_ERRORS: list[int] = [0]


def pymilter_verdicts(rows: Sequence[tuple[str, str]]) -> list[bool]:
    """is_dynip(name, ip) for each row; an exception counts as False."""
    is_dynip: Callable[[str, str], object] = _pymilter_dynip().is_dynip
    out = []
    errors = 0
    for ip, name in rows:
        try:
            out.append(bool(is_dynip(name, ip)))
        except Exception:
            errors += 1
            out.append(False)
    _PYMILTER_ERRORS[0] = errors
    return out


def _pymilter_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("pymilter")
    except PackageNotFoundError:
        return "unknown"


# --------------------------------------------------------------------------
# The public API


def anchor_verdicts(rows: Sequence[tuple[str, str]]) -> dict[str, list[bool] | str]:
    """For (ip, name) rows, each anchor's verdicts (True = generic/dynamic), or a
    string saying why that anchor is unavailable."""
    out: dict[str, list[bool] | str] = {}
    try:
        rdns, helo = spamassassin_verdicts(rows)
        out[LABEL_SA_RDNS], out[LABEL_SA_HELO] = rdns, helo
    except AnchorUnavailable as exc:
        out[LABEL_SA_RDNS] = out[LABEL_SA_HELO] = f"unavailable: {exc}"
    try:
        anyw, hard, hhelo = hfilter_verdicts(rows)
        out[LABEL_HF_ANY], out[LABEL_HF_HARD], out[LABEL_HF_HELO] = anyw, hard, hhelo
    except AnchorUnavailable as exc:
        out[LABEL_HF_ANY] = out[LABEL_HF_HARD] = out[LABEL_HF_HELO] = f"unavailable: {exc}"
    try:
        out[LABEL_PYMILTER] = pymilter_verdicts(rows)
    except AnchorUnavailable as exc:
        out[LABEL_PYMILTER] = f"unavailable: {exc}"
    return out


def _describe_sa() -> str:
    try:
        sa = load_spamassassin()
    except AnchorUnavailable as exc:
        return f"SpamAssassin: unavailable ({exc})."
    needed = [sa.rules[n] for n in sa.needed]
    headers = [r for r in needed if r.kind == "header"]
    metas = [r for r in needed if r.kind == "meta"]
    bad = [r for r in needed if r.error]
    sources = sorted({r.source.split(":")[0] for r in needed})
    conditional = [r.name for r in needed if r.condition]
    text = (
        f"**SpamAssassin** (Debian `{SA_PACKAGE}` {sa.package.version}): "
        f"{len(sa.files)} rule files read in SpamAssassin's order; the rules used come from "
        f"{', '.join(f'`{s}`' for s in sources)}. {len(headers)} header rules and {len(metas)} "
        f"meta rules are needed; {len(headers) - sum(1 for r in headers if r.error)} of the "
        f"header regexes were translated to Python, "
        + (
            "untranslatable: " + "; ".join(f"`{r.name}` ({r.error})" for r in bad)
            if bad
            else "none was untranslatable"
        )
        + ". Each name is judged on a one-relay `X-Spam-Relays-External` line built from "
        f"`Received.pm`'s template, `{relay_line(sa, '192.0.2.1', 'NAME', 'NAME')}`. "
        f"`RDNS_DYNAMIC` is its meta rule evaluated as written; `HELO_DYNAMIC_*` is any of "
        f"{', '.join(f'`{n}`' for n in sa.helo_targets)}"
        + (
            f" ({', '.join(f'`{n}`' for n in sa.helo_disabled)} is scored 0, i.e. "
            "disabled, and not counted)"
            if sa.helo_disabled
            else ""
        )
        + ". The rules are those shipped in the package, not a later `sa-update`."
    )
    if sa.undefined:
        text += f" Referenced but undefined (count 0): {', '.join(sa.undefined)}."
    if conditional:
        text += f" Defined inside if/ifplugin blocks, taken as loaded: {', '.join(conditional)}."
    return text


def _describe_hf() -> str:
    try:
        hf = load_hfilter()
    except AnchorUnavailable as exc:
        return f"rspamd hfilter: unavailable ({exc})."
    parts = []
    bad: list[str] = []
    for name, entries in hf.tables.items():
        ok = sum(1 for e in entries if e.regex is not None)
        parts.append(f"`{name}` {ok}/{len(entries)}")
        bad += [f"`{e.key}` ({e.error})" for e in entries if e.error]
    for name, text in hf.lost.items():
        bad.append(f"in `{name}`, `{text}` (no closing `/`: rspamd's map parser drops it)")
    enabled = ", ".join(f"{k} = {str(v).lower()}" for k, v in hf.enabled.items())
    return (
        f"**rspamd hfilter** (Debian `{RSPAMD_PACKAGE}` {hf.package.version}, `{hf.lua}`; "
        f"`modules.d/hfilter.conf`: {enabled}): regexes translated per table {', '.join(parts)}"
        + ("; not in effect: " + "; ".join(bad) if bad else "")
        + ". *(any)* is a `checks_hellohost` weight >= 1 for the client host name "
        "(`HFILTER_HOSTNAME_1`..`_5`), *(weight>=4)* the same at weight 4 or 5 (our cut: hfilter "
        "has no threshold, each weight is its own symbol scored 0.5/1/2/2.5/3), *HELO (any)* "
        "the HELO check with the name as HELO (`checks_hello` and `checks_hellohost`, unless "
        "a bad or bare IP)."
    )


def _describe_pymilter() -> str:
    try:
        _pymilter_dynip()
    except AnchorUnavailable as exc:
        return f"pymilter: unavailable ({exc})."
    return (
        f"**pymilter** {_pymilter_version()}: `Milter.dynip.is_dynip(name, ip)` as installed "
        f"(IPv6 addresses are never dynamic to it); exceptions counted as not dynamic: "
        f"{_PYMILTER_ERRORS[0]} in the last run."
    )


def describe() -> str:
    """A short markdown paragraph on what was read and how verdicts are formed."""
    return " ".join((_describe_sa(), _describe_hf(), _describe_pymilter()))


# --------------------------------------------------------------------------
# Self-check on the development corpus


def _main() -> None:
    with CORPUS.open(newline="") as fh:
        data = list(csv.DictReader(fh))
    rows = [(r["ip"], r["ptr"]) for r in data]
    generic = [r["label"] == "generic" for r in data]
    verdicts = anchor_verdicts(rows)
    n_gen, n_real = sum(generic), len(generic) - sum(generic)
    print(f"{CORPUS.relative_to(ROOT)}: {n_gen} generic, {n_real} real\n")
    print("| anchor | recall | false-positive rate |")
    print("|---|---|---|")
    for label, says in verdicts.items():
        if isinstance(says, str):
            print(f"| {label} | {says} | |")
            continue
        caught = sum(g and s for g, s in zip(generic, says, strict=True))
        fp = sum((not g) and s for g, s in zip(generic, says, strict=True))
        print(
            f"| {label} | {caught / n_gen:.3f} ({caught}/{n_gen}) "
            f"| {fp / n_real:.3f} ({fp}/{n_real}) |"
        )
    checks = [
        ("73.1.2.3", "c-73-1-2-3.hsd1.ca.comcast.net"),
        ("209.85.128.41", "mail-wm1-f41.google.com"),
        ("62.251.8.83", "fia83-8.dsl.hccnet.nl"),
        ("24.210.34.53", "dhcp024-210-034-053.columbus.rr.com"),
        ("198.51.100.7", "o167-89-97-77.outbound-mail.sendgrid.net"),
    ]
    print("\nBy hand:")
    by_hand = anchor_verdicts(checks)
    for i, (ip, name) in enumerate(checks):
        said = {
            k: ("generic" if v[i] else "-") for k, v in by_hand.items() if not isinstance(v, str)
        }
        print(f"- {name} ({ip}): " + ", ".join(f"{k}: {v}" for k, v in said.items()))
    print()
    print(describe())


if __name__ == "__main__":
    _main()
