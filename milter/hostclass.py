"""Is a host name generic (made by the address owner) or real (named by its operator)?

Pure CPU, no I/O: :func:`classify` takes a name and, when known, the address
it belongs to, and says ``generic`` or ``real`` with the evidence that
decided: the token, what it means, and what it outweighed.  Only the labels
to the left of the registered domain (ICANN part of the Public Suffix List)
are judged, so a pool word in a company's own domain (``mail.dynamicsoft.com``,
``smtp.hostpoint.ch``) never counts.

Generic needs positive evidence in the name itself; a provider's suffix is
never enough on its own.  The evidence, strongest first:

1. An admin's exception pattern: real.  An admin's extra pattern: generic.
2. A mail-role word (``smtp``, ``mail``, ``mta``, ``relay``, ``mout``,
   ``outbound``, ``bounce``...), wherever it stands in a token: real.  Relay
   fleets build names from a data-centre code, the role and a serial
   (``p3plsmtpa08-03.prod.phx3.secureserver.net``), big senders from their
   addresses (``a8-12.smtp-out.amazonses.com``, ``out203-205-221-153.mail.qq.com``);
   the role word says a person named the host for mail.  Only the client's
   address *and* a pool word together outweigh it.
3. A word whose meaning depends on where it stands (``mx``, ``pop``, ``out``,
   ``imap``, ``list``...) is a mail role only at the head of the first label
   (``mx1.``, ``pop3.``, ``out12.``) and only when the name carries neither the
   address nor a pool word; elsewhere ``pop`` is a point of presence and ``mx``
   a router or a country (``mx-ll-1.2.3-4.dynamic.3bb.co.th``).
4. The client's address inside the name, in any encoding providers use:
   octets forward, reversed or in another order (byte-swapped, rotated,
   reversed in pairs), dashed, dotted, zero-padded or run together, two or
   three octets beside a pool or router word, hexadecimal (whole, reversed,
   or only the trailing octets), the 32-bit decimal integer, base 36, IPv6
   hextets, nibbles, the full address, the interface identifier or the MAC
   address inside an EUI-64 one, and an IPv4 address embedded in an IPv6 one.
   Four octets of some other address count too.
5. A pool word (``dynamic``, ``dsl``, ``ppp``, ``pool``, ``cable``, ``cpe``,
   ``customer``, ``static``, ``cgnat``...): generic, with or without an
   address (``static.vnpt.vn``, ``adsl.viettel.vn`` are placeholders).  Short
   or common ones (``cm``, ``bb``, ``res``, ``sub``, ``home``, ``client``...)
   only make octets beside them the address; alone they prove nothing.
6. A customer-line or machine identifier: a MAC address, ``vmi123456``,
   ``vps-5f3a2b``, ``p522356-ipngn...``, letters and six or more digits.
7. A cloud or hosting provider's suffix (EC2, GCP, Linode, OVH, Contabo...)
   only together with a serial-number first label (``li123-45``, ``s12345``);
   alone it is no evidence: the provider's own relays live there too.
8. Otherwise: real.

Trust: the name is attacker-controlled (the client's reverse zone, or its
HELO); nothing here raises, whatever the text.  A bot that can write its own
PTR can call itself ``smtp1``: which is why ``generic`` stands beside
``fcrdns`` and the lists, never instead of them.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache

from heloguard.answers import IPAddress, normalize_name
from heloguard.names import labels_left_of_registered, registered_domain_icann

# -- vocabularies --------------------------------------------------------------

# Mail-role words that say "mail" wherever they stand inside a run of letters
# (``plsmtpa``, ``resqmta``, ``moutng``, ``wbeout`` is not one of them).  Each is
# long or rare enough that no pool name carries it by chance.
STRONG_ROLES = (
    "smtp",
    "mail",
    "mta",
    "relay",
    "mout",
    "outbound",
    "outgoing",
    "bounce",
    "sender",
    "mailer",
    "mxout",
    "exim",
    "postfix",
    "sendmail",
    "newsletter",
    "mlsend",
)
# Mail-role words that mean it only at the head of the first label (``mx1``,
# ``pop3``, ``out12``), and only in a name that carries neither the address nor
# a pool word.  Digits are stripped before the comparison.
WEAK_ROLES = frozenset(
    """
    mx mxa mxb mxin mxs pop pops imap out outs list lists lyris exchange inbound delivery
    antispam spamfilter gw gateway msa mda lmtp
    """.split()  # noqa: SIM905 - a word list reads best as words
)
# Letters that end a fleet token with a mail role (GoDaddy's ``p3plwbeout03``,
# ``p3plibsmtp``): ``out`` after other letters inside a token with digits.
_FLEET_OUT = re.compile(r"^[a-z]*\d+[a-z]*out\d|^[a-z]{2,}out\d")

# Words providers put in the names of customer address pools, in the languages
# their subscribers speak (abo, kunde, cliente: subscriber, customer; bredband,
# breitband: broadband; hsia: high-speed internet access).
POOL_WORDS = frozenset(
    """
    dynamic dyn dynip dynamicip dhcp dsl adsl vdsl xdsl sdsl hdsl ppp pppoe pppoa pool
    pools cable cablemodem cm cpe client clients customer customers cust subscriber
    subscribers subs sub broadband bb fios ftth fttx fttc fttb fttp fibre fiber res resnet
    residential home user users dial dialup dialin dip static sta fixed fixip nat cgnat cgn
    gprs umts lte wimax wireless wifi wlan mobile mob catv hfc hsd modem unassigned unused
    unknown noptr norev reverse rev ipv4 ipv6 ip4 ip6 business biz cidr dialpool dsldevice
    adsldevice dyndsl dhcpdsl hosted rdns norevdns unallocated unconfigured notconfigured
    abo abonne abonnes kunde kunden cliente clientes clienti utente utenti usuario usuarios
    dinamico dinamica dinamic dynamique statique estatico estatica fixo fixa leased line
    bredband breitband hsia
    """.split()  # noqa: SIM905 - a word list reads best as words
)
# Pool words that are short or common enough to mean something else alone
# (``cm11.websitewelcome.com`` is a relay, not a cable modem): they make octets
# beside them the address, but are no evidence on their own.
AMBIGUOUS_POOL_WORDS = frozenset(
    """
    cm bb res rev reverse sub subs sta mob mobile home user users client clients cust
    business biz fixed nat cgn lte wireless wifi wlan modem fibre fiber ip4 ip6 ipv4 ipv6
    cidr dip line
    """.split()  # noqa: SIM905 - a word list reads best as words
)
# Pool words long enough to be recognised inside a compound (``dipool``,
# ``dslpool``, ``adslclient``): a prefix or suffix of at most three letters.
COMPOUND_POOL_WORDS = frozenset(
    """
    pool dynamic dhcp dialup pppoe adsl vdsl xdsl broadband cablemodem customer subscriber
    residential leased
    """.split()  # noqa: SIM905 - a word list reads best as words
)
# Roots that make a pool name anywhere inside a run of letters (``athedsl-``).
POOL_ROOTS = ("dsl", "ppp", "dhcp")
# ... at either end of a run of at most this many letters (a longer run is a
# word or noise, not a pool code).
_ROOT_RUN = 12
# Placeholders for "no name was set", however they are spelled and split.
PLACEHOLDERS = (
    "noreverse",
    "norevdns",
    "nordns",
    "noptr",
    "notset",
    "notassigned",
    "unassigned",
    "notconfigured",
    "unconfigured",
    "notdefined",
    "nohostname",
)
# Access-network words: routers, concentrators and points of presence.  Not
# evidence alone, but octets beside one are the address (``12-34.bras1.``).
NETWORK_WORDS = frozenset(
    """
    bras bng lns lac olt dslam msan pop pops agg aggr nas bbrouter ptp cgnat cgn
    """.split()  # noqa: SIM905 - a word list reads best as words
)

# Cloud and hosting providers' suffixes (suffix, evidence).  Supporting
# evidence only: see step 7 of the module docstring.
CLOUD_SUFFIXES: tuple[tuple[str, str], ...] = (
    (".compute.amazonaws.com", "Amazon EC2 default name"),
    (".compute-1.amazonaws.com", "Amazon EC2 default name"),
    (".compute.amazonaws.com.cn", "Amazon EC2 default name"),
    (".googleusercontent.com", "Google Cloud default name"),
    (".cloudapp.net", "Azure default name"),
    (".cloudapp.azure.com", "Azure default name"),
    (".members.linode.com", "Linode default name"),
    (".ip.linodeusercontent.com", "Linode default name"),
    (".contaboserver.net", "Contabo default name"),
    (".your-server.de", "Hetzner default name"),
    (".vultrusercontent.com", "Vultr default name"),
    (".vultr.com", "Vultr default name"),
    (".scaleway.com", "Scaleway default name"),
    (".poneytelecom.eu", "Scaleway default name"),
    (".oraclecloud.com", "Oracle Cloud default name"),
    (".aliyun.com", "Alibaba Cloud default name"),
    (".hostwindsdns.com", "Hostwinds default name"),
    (".secureserver.net", "GoDaddy hosting name"),
    (".onlinehome-server.info", "IONOS hosting default name"),
    (".kimsufi.com", "OVH default name"),
    (".ovh.net", "OVH default name"),
    (".hostinger.com", "Hostinger default name"),
    (".dedibox.fr", "Scaleway Dedibox default name"),
)
# A serial-number label: a few letters and digits, nothing a person would read.
_SERIAL_LABEL = re.compile(r"^[a-z]{0,6}[-_]?\d+(?:[-_][a-z]{0,4}\d+)*$")

_SPLIT = re.compile(r"[^a-z0-9]+")
_DIGITS = re.compile(r"\d+")
_LETTERS = re.compile(r"[a-z]+")
_HEXRUN = re.compile(r"[0-9a-f]+")
_MAC = re.compile(r"(?<![0-9a-f])(?:[0-9a-f]{2}[-_.]?){5}[0-9a-f]{2}(?![0-9a-f])")
OPAQUE_SHAPES: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"^p\d{4,}-ip[a-z]+"), "provider line identifier"),
    (re.compile(r"^pcp\d+-?pcs"), "provider line identifier"),
    (re.compile(r"^vmi\d{3,}$"), "VM identifier"),
    (re.compile(r"^vps-?[0-9a-f]{5,}$"), "VPS identifier"),
    (re.compile(r"^(?:vps|vds|srv|server|node|host|ded)-?\d{5,}$"), "server identifier"),
    (re.compile(r"^[a-z]{1,3}\d{6,}$"), "letters and a long serial number"),
    (re.compile(r"^cpe-?[0-9a-f]{12}$"), "CPE and a MAC address"),
    (
        # optionally after a short word: node-1w7jr9qsv51tb41p80xpg7667 (an
        # address in base 32)
        re.compile(r"^(?:[a-z]{1,6}-)?(?=(?:[a-z]*\d){4})(?=(?:\d*[a-z]){6})[a-z0-9]{16,}$"),
        "random instance identifier",
    ),
    (
        re.compile(r"^(?=[0-9a-f]*[a-f][0-9a-f]*[a-f])(?=(?:[a-f]*\d){4})[0-9a-f]{12,}$"),
        "hex identifier",
    ),
)


@dataclass(frozen=True, slots=True)
class Verdict:
    """The classification of one name: the deciding token, what it means, what it outweighed."""

    generic: bool
    kind: str  # address, address-like, pool-word, opaque-id, cloud, role, extra, exception, plain
    evidence: str

    def __str__(self) -> str:
        return f"{'generic' if self.generic else 'real'} ({self.kind}): {self.evidence}"


@dataclass(frozen=True, slots=True)
class Patterns:
    """Admin additions: extra generic patterns and exceptions (regexes on the whole name)."""

    extra: tuple[re.Pattern[str], ...] = ()
    exceptions: tuple[re.Pattern[str], ...] = ()

    @classmethod
    def compile(cls, extra: Iterable[str] = (), exceptions: Iterable[str] = ()) -> Patterns:
        """Compile admin patterns (raises re.error on a bad one)."""
        return cls(
            tuple(re.compile(p, re.IGNORECASE) for p in extra),
            tuple(re.compile(p, re.IGNORECASE) for p in exceptions),
        )


NO_PATTERNS = Patterns()


# -- address encodings ---------------------------------------------------------


def _to_base36(n: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = ""
    while n:
        n, r = divmod(n, 36)
        out = digits[r] + out
    return out or "0"


def _contains(seq: Sequence[int], sub: Sequence[int]) -> bool:
    n = len(sub)
    return any(list(seq[i : i + n]) == list(sub) for i in range(len(seq) - n + 1))


def _window_of(seq: Sequence[int], values: Sequence[int]) -> list[int]:
    """The first run of len(values) numbers in seq that holds exactly those values."""
    n, want = len(values), sorted(values)
    for i in range(len(seq) - n + 1):
        if sorted(seq[i : i + n]) == want:
            return list(seq[i : i + n])
    return []


@lru_cache(maxsize=4096)
def _v4_strings(packed: bytes) -> tuple[tuple[str, str], ...]:
    """Run-together encodings of an IPv4 address: (text, description)."""
    o = list(packed)
    value = int.from_bytes(packed, "big")
    return (
        ("".join(f"{x:03d}" for x in o), "octets zero-padded and run together"),
        ("".join(f"{x:03d}" for x in reversed(o)), "octets reversed, zero-padded, run together"),
        ("".join(f"{x:02x}" for x in o), "hexadecimal"),
        ("".join(f"{x:02x}" for x in reversed(o)), "hexadecimal, reversed"),
        (str(value), "32-bit decimal integer"),
        (_to_base36(value), "base 36"),
        ("".join(f"{x:02x}" for x in o[1:]), "hexadecimal of its last three octets"),
        ("".join(f"{x:02x}" for x in o[:3]), "hexadecimal of its first three octets"),
    )


# An octet is a run of 1-3 digits standing alone ("-73-"), or at the end or
# start of a word whose letters are not all hex digits ("out203", "host1").
# Digits inside hex-looking tokens ("1a", "ec2", "d9e4") are not octets.
_ALNUM = re.compile(r"[a-z0-9]+")
_WORD_DIGITS = re.compile(r"^([a-z]*)(\d{1,3})$|^(\d{1,3})([a-z]*)$")
_NOT_HEX = re.compile(r"[g-z]")


def _octet_tokens(left: str, bare: list[bool] | None = None) -> list[int]:
    """The numbers of the name that could be octets; ``bare`` gets, for each,
    whether it stood alone (``12``) rather than glued to letters (``host12``)."""
    out: list[int] = []
    for token in _ALNUM.findall(left):
        if token.isdigit():
            if len(token) <= 3:
                out.append(int(token))
                if bare is not None:
                    bare.append(True)
            continue
        m = _WORD_DIGITS.match(token)
        if m:
            letters = m.group(1) if m.group(2) else m.group(4)
            digits = m.group(2) or m.group(3)
            if _NOT_HEX.search(letters):
                out.append(int(digits))
                if bare is not None:
                    bare.append(False)
    return out


def _dashed(values: Iterable[int]) -> str:
    return "-".join(map(str, values))


def _v4_in(left: str, addr: ipaddress.IPv4Address, pooled: bool) -> str:
    """How ``addr`` appears in ``left`` ("" when it does not)."""
    o = list(addr.packed)
    nums = _octet_tokens(left)
    if _contains(nums, o):
        return f"address {addr} as octets ({_dashed(o)})"
    if _contains(nums, o[::-1]):
        return f"address {addr} as reversed octets ({_dashed(o[::-1])})"
    swapped = _window_of(nums, o)
    if swapped:
        return f"address {addr} as octets in another order ({_dashed(swapped)})"
    compact = left.replace("-", "").replace(".", "").replace("_", "")
    for text, how in _v4_strings(addr.packed):
        if len(text) >= 5 and text in compact:
            return f"address {addr} as {how} ({text})"
    plain = "".join(map(str, o))
    if len(plain) >= 8 and any(run == plain for run in _DIGITS.findall(left)):
        return f"address {addr} as octets run together ({plain})"
    if _contains(nums, o[1:]) or _contains(nums, o[::-1][:3]):
        return f"address {addr}: its last three octets in the name"
    if _contains(nums, o[:3]) or _contains(nums, o[::-1][1:]):
        return f"address {addr}: its network's three octets in the name"
    if not pooled:
        return ""
    three = _window_of(nums, o[1:])
    if three:
        return f"address {addr}: three of its octets beside a pool word ({_dashed(three)})"
    if _contains(nums, o[2:]) or _contains(nums, o[::-1][:2]):
        return f"address {addr}: last two octets beside a pool word"
    if _contains(nums, o[:2]):
        return f"address {addr}: first two octets beside a pool word"
    tail = f"{o[2]:02x}{o[3]:02x}"
    if any(tail in run for run in _HEXRUN.findall(left)):
        return f"address {addr}: its last two octets in hexadecimal ({tail}) beside a pool word"
    return ""


def _hex_tokens(left: str) -> list[str]:
    return _HEXRUN.findall(left)


def _eui64_mac(full: str) -> str:
    """The MAC address inside an EUI-64 interface identifier ("" if it is none)."""
    iid = full[16:]
    if iid[6:10] != "fffe":
        return ""
    first = int(iid[0:2], 16) ^ 0x02  # the universal/local bit is inverted
    return f"{first:02x}{iid[2:6]}{iid[10:]}"


def _v6_in(left: str, addr: ipaddress.IPv6Address, pooled: bool) -> str:
    """How an IPv6 address appears in ``left`` ("" when it does not)."""
    full = addr.exploded.replace(":", "")
    compact = re.sub(r"[^0-9a-f]", "", left)
    if full in compact:
        return f"address {addr} in full hexadecimal"
    if full[16:] in compact and full[16:].strip("0"):
        return f"address {addr}: interface identifier {full[16:]}"
    mac = _eui64_mac(full)
    if mac and mac in compact:
        return f"address {addr}: the MAC address {mac} of its EUI-64 interface identifier"
    if full[::-1][:16] in compact and full[16:].strip("0"):
        return f"address {addr} as reversed nibbles"
    nibbles = "".join(re.findall(r"(?:^|(?<=[.-]))([0-9a-f])(?=[.-]|$)", left))
    if len(nibbles) >= 16 and (nibbles in full or nibbles in full[::-1]):
        order = "forward" if nibbles in full else "reversed"
        return f"address {addr} as {order} nibbles ({len(nibbles)} of 32)"
    hextets = [int(h, 16) for h in addr.exploded.split(":")]
    tokens = [int(t, 16) for t in _hex_tokens(left) if len(t) <= 4]
    squeezed = _squeeze_zeros(hextets)
    for candidate in (hextets, squeezed):
        for i in range(len(candidate) - 2):
            window = candidate[i : i + 3]
            if any(window) and _contains(tokens, window):
                return f"address {addr} as hextets ({'-'.join(f'{h:x}' for h in window)})"
    if full[:16].strip("0") and full[:16] in compact:
        return f"address {addr}: its /64 prefix {full[:16]}"
    for v4 in _embedded_v4(addr):
        found = _v4_in(left, v4, pooled)
        if found:
            return f"IPv4 {v4} embedded in {addr}: {found}"
    return ""


def _squeeze_zeros(hextets: list[int]) -> list[int]:
    """Hextets with the longest run of zeros removed (as in ``2001-db8--25``)."""
    best, start = (0, -1), -1
    for i, h in enumerate([*hextets, 1]):
        if h == 0 and start < 0:
            start = i
        elif h != 0 and start >= 0:
            best = max(best, (i - start, start))
            start = -1
    length, at = best
    return hextets if length == 0 else hextets[:at] + hextets[at + length :]


def _embedded_v4(addr: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """IPv4 addresses an IPv6 address may carry: mapped, 6to4, or its last 32 bits."""
    out = []
    if addr.ipv4_mapped:
        out.append(addr.ipv4_mapped)
    if addr.sixtofour:
        out.append(addr.sixtofour)
    out.append(ipaddress.IPv4Address(addr.packed[-4:]))
    # an address starting with 0 is no address (and would match any run of zeros)
    return [v4 for v4 in out if v4.packed[0] != 0]


def _address_like(left: str) -> str:
    """Four octets of some address in a row (a name made from an address).

    Only the first of the four may be glued to letters (``host10-1-2-3``):
    serials such as ``bay0-omc3-s14.bay0`` are a fleet's numbering, not an address.
    """
    bare: list[bool] = []
    nums = _octet_tokens(left, bare)
    for i in range(len(nums) - 3):
        window = nums[i : i + 4]
        if all(0 <= x <= 255 for x in window) and all(bare[i + 1 : i + 4]):
            return f"an IPv4 address in the name ({_dashed(window)})"
    nibbles = re.findall(r"(?:^|[.-])([0-9a-f])(?=[.-]|$)", left)
    if len(nibbles) >= 16:
        return "IPv6 nibbles in the name"
    m = _V6_LIKE.search(left)
    if m:
        return f"an IPv6 address in the name ({m.group(0)})"
    return ""


# A global unicast IPv6 address (2000::/3) written with dashes: 2a02-8108-1-2...
_V6_LIKE = re.compile(r"(?<![0-9a-z])[23][0-9a-f]{3}(?:[-:][0-9a-f]{0,4}){3,}")


# -- words ---------------------------------------------------------------------


def _tokens(left: str) -> list[str]:
    return [t for t in _SPLIT.split(left) if t]


def _strong_role(tokens: Iterable[str]) -> tuple[str, str]:
    """(token, role word) for the first token whose letters hold a mail-role word."""
    for t in tokens:
        for run in _LETTERS.findall(t):
            for word in STRONG_ROLES:
                if word in run:
                    return t, word
        if _FLEET_OUT.match(t):
            return t, "out"
    return "", ""


def _weak_role_head(left: str) -> str:
    """The first token of the first label, when it is a position-dependent role word."""
    first = _tokens(left.split(".", 1)[0])
    if first and _DIGITS.sub("", first[0]) in WEAK_ROLES:
        return first[0]
    return ""


def _word_in(tokens: Iterable[str], words: frozenset[str], skip: str = "") -> str:
    for t in tokens:
        if t == skip:
            continue
        word = _DIGITS.sub("", t)
        if word in words or t in words:
            return t
        for run in _LETTERS.findall(t):
            for w in COMPOUND_POOL_WORDS & words:
                # dipool, dslpool, poolc: a pool word with a short prefix or suffix
                if run != w and len(run) - len(w) <= 3 and (run.startswith(w) or run.endswith(w)):
                    return t
            if len(run) <= _ROOT_RUN and any(
                run.startswith(root) or run.endswith(root) for root in POOL_ROOTS if root in words
            ):
                return t  # athedsl, ppptel: roots no word of any language carries
    return ""


# A long run of hex digits inside a label: a MAC address or a hash, the way
# cable providers name modems (s0106e0b70af841da).
_HEX_ID = re.compile(r"[0-9a-f]{12,}")


def _hex_id(label: str) -> bool:
    for run in _HEX_ID.findall(label):
        letters = sum(c in "abcdef" for c in run)
        if letters >= 2 and len(run) - letters >= 4:
            return True
    return False


def _opaque(left: str) -> str:
    for label in left.split("."):
        if _MAC.search(label) and sum(c.isdigit() for c in label) >= 4:
            return f"a MAC address in {label!r}"
        if _hex_id(label):
            return f"a MAC address or hash in {label!r}"
        for shape, how in OPAQUE_SHAPES:
            if shape.search(label):
                return f"{how} {label!r}"
    return ""


def _without_suffix(name: str) -> str:
    """The name without its public suffix (``ip244.ip-137-74-2`` for ``ip244.ip-137-74-2.eu``)."""
    reg = registered_domain_icann(name)
    if reg is None:
        return name
    suffix = reg[reg.index(".") :]
    return name[: -len(suffix)]


def _cloud(name: str) -> str:
    for suffix, how in CLOUD_SUFFIXES:
        if name.endswith(suffix):
            return how
    return ""


def _also(*found: str) -> str:
    """The "; outweighs X, Y" tail for the evidence a verdict overrode."""
    found = tuple(f for f in found if f)
    return f"; outweighs {', '.join(found)}" if found else ""


# -- the classifier ------------------------------------------------------------


def classify(
    name: str, address: IPAddress | None = None, patterns: Patterns = NO_PATTERNS
) -> Verdict:
    """Classify ``name``; ``address`` is the client's, when known."""
    name = normalize_name(name)
    for pat in patterns.exceptions:
        if pat.search(name):
            return Verdict(False, "exception", f"matches exception /{pat.pattern}/")
    for pat in patterns.extra:
        if pat.search(name):
            return Verdict(True, "extra", f"matches extra pattern /{pat.pattern}/")
    left = labels_left_of_registered(name)
    if not left:
        if registered_domain_icann(name) is None and "." not in name:
            return Verdict(True, "plain", "a single label")
        return Verdict(False, "plain", "the registered domain itself")
    tokens = _tokens(left)
    role_token, role = _strong_role(tokens)
    weak = "" if role else _weak_role_head(left)
    pool = _word_in(tokens, POOL_WORDS)
    plain_pool = _word_in(tokens, POOL_WORDS - AMBIGUOUS_POOL_WORDS)
    network = _word_in(tokens, NETWORK_WORDS, skip=weak)
    found = ""
    if address is not None:
        # The client's own address is looked for in the registered domain too:
        # some providers register a domain per network (OVH's ip-137-74-2.eu),
        # and an exact match of the address's octets is no coincidence.
        scope = _without_suffix(name)
        pooled = bool(pool or network)
        if isinstance(address, ipaddress.IPv4Address):
            found = _v4_in(scope, address, pooled)
        else:
            found = _v6_in(scope, address, pooled)
    cloud = _cloud(name)
    if role:
        if found and pool:
            return Verdict(
                True,
                "address",
                f"{found} with pool word {pool!r}{_also(f'mail-role word {role!r}')}",
            )
        where = f" in {role_token!r}" if role_token != role else ""
        outweighed = _also(found and "the address in the name", cloud and f"the {cloud}")
        return Verdict(False, "role", f"mail-role word {role!r}{where}{outweighed}")
    like = "" if found else _address_like(left)
    if weak and not (found or pool or like):
        return Verdict(False, "role", f"mail-role word {weak!r} heads the name{_also(cloud)}")
    not_role = _also(weak and f"{weak!r} (not a mail role beside an address or pool word)")
    if found:
        return Verdict(True, "address", found + not_role)
    if like:
        return Verdict(True, "address-like", like + not_role)
    squeezed = _SPLIT.sub("", left)
    placeholder = next((p for p in PLACEHOLDERS if p in squeezed), "")
    if placeholder:
        return Verdict(True, "pool-word", f"placeholder {placeholder!r}: no name was set")
    if plain_pool:
        reg = registered_domain_icann(name)
        return Verdict(True, "pool-word", f"pool word {plain_pool!r} left of {reg}{not_role}")
    opaque = _opaque(left)
    if opaque:
        return Verdict(True, "opaque-id", opaque)
    first = left.split(".", 1)[0]
    if cloud and _SERIAL_LABEL.match(first):
        return Verdict(True, "cloud", f"{cloud} with the serial-number label {first!r}")
    if cloud:
        return Verdict(False, "plain", f"no address, pool word or identifier; {cloud} alone")
    return Verdict(False, "plain", "no address, pool word or provider pattern")
