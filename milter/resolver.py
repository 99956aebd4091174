"""The resolver: the only place in heloguard that talks DNS.

One event-loop thread runs dnspython's asyncio stub resolver and does all
network I/O.  Callers on other threads (libmilter's workers, the command
line) hand it coroutines with :meth:`Resolver.submit` or :meth:`Resolver.run`
and wait with a deadline.

Warm path: a decision whose every question is in the cache never touches the
loop.  ``run`` and ``submit`` with ``inline=True`` first drive the coroutine
in the calling thread;
``lookup_many`` answers from the cache there, and only when a question is
missing does the coroutine hop to the loop thread (it yields a marker that
``run`` recognises, and the loop takes the suspended coroutine over from that
point).  A thread hand-off costs more than a whole cached decision, so this is
what keeps a busy MX's repeat clients cheap.  The cache is shared between
threads under a lock; everything else (in-flight merging, sockets, timers)
stays on the loop.

Every lookup ends as an :class:`~heloguard.answers.Answer` value (OK,
NXDOMAIN, NODATA or TEMP), never as an exception.  Positive answers are cached
for their TTL and negative ones for the SOA minimum (RFC 2308), both clamped
to configured bounds; TEMP answers only for ``temp_ttl`` seconds (default 2)
so that a dead server is not hammered but a hiccup is soon forgotten.  Two
identical questions in flight at once are sent once.  Only the question asked
is cached: additional and authority records in a response (which the client's
own reverse zone controls) are never stored.

Trust: every record comes from zones that the connecting party may control
(its reverse zone, its HELO domain).  dnspython drops responses whose id or
question do not match the query.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ipaddress
import logging
import threading
import time
from collections.abc import Callable, Coroutine, Generator, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import dns.asyncresolver
import dns.exception
import dns.message
import dns.name
import dns.nameserver
import dns.rcode
import dns.rdatatype
import dns.resolver
import dns.rrset
from cachetools import TLRUCache

from heloguard.answers import Answer, Origin, Query, Status

log = logging.getLogger("heloguard.resolver")
T = TypeVar("T")

# Negative answers without an SOA in the authority section (RFC 2308 5: "should
# not be cached" beyond a short time).
NEGATIVE_TTL_WITHOUT_SOA = 60


@dataclass(frozen=True, slots=True)
class ResolverSettings:
    """How the resolver asks and caches; see the ``[dns]`` config section."""

    nameservers: tuple[tuple[str, int], ...] = ()  # empty: /etc/resolv.conf
    timeout: float = 2.0  # per question, all retries included
    cache_size: int = 20000  # answers kept, bounds memory
    min_ttl: int = 5  # positive answers are cached at least this long
    max_ttl: int = 86400  # ... and at most this long
    negative_min_ttl: int = 5
    negative_max_ttl: int = 3600
    temp_ttl: int = 2  # TEMP answers: never for long


@dataclass(slots=True)
class ResolverStats:
    """Counters, read by tests, the dry-run and (later) metrics."""

    asked: int = 0  # lookups requested
    sent: int = 0  # questions that went to a nameserver
    cache_hits: int = 0
    merged: int = 0  # joined an identical question in flight
    temp: int = 0  # TEMP answers received from the network


def parse_nameserver(text: str) -> tuple[str, int]:
    """Parse ``HOST``, ``HOST:PORT``, ``[V6]:PORT`` or a bare IPv6 address."""
    text = text.strip()
    if not text:
        raise ValueError("empty nameserver")
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep:
            raise ValueError(f"unbalanced brackets in {text!r}")
        port = rest[1:] if rest.startswith(":") else ""
        if rest and not rest.startswith(":"):
            raise ValueError(f"junk after ']' in {text!r}")
    elif text.count(":") == 1:
        host, _, port = text.partition(":")
    else:
        host, port = text, ""  # IPv4, a name, or a bare IPv6 address
    try:
        ipaddress.ip_address(host)
    except ValueError as exc:
        raise ValueError(f"nameserver {host!r} is not an IP address") from exc
    number = 53
    if port:
        if not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"bad port in nameserver {text!r}")
        number = int(port)
    return host, number


def _record_text(rdtype: str, rdata: Any) -> str:
    """Render one record as the plain text the rules judge."""
    if rdtype in ("A", "AAAA"):
        return str(rdata.address)
    if rdtype in ("PTR", "CNAME", "NS"):
        return str(rdata.target.to_text(omit_final_dot=True)).lower()
    if rdtype == "MX":
        exchange = rdata.exchange.to_text(omit_final_dot=True).lower()
        return f"{rdata.preference} {exchange}"
    if rdtype == "TXT":
        return b"".join(rdata.strings).decode("utf-8", "backslashreplace")
    return str(rdata.to_text())


def _negative_ttl(response: dns.message.Message | None) -> int:
    """RFC 2308: min(SOA TTL, SOA MINIMUM) from the authority section."""
    if response is None:
        return NEGATIVE_TTL_WITHOUT_SOA
    for rrset in response.authority:
        if rrset.rdtype == dns.rdatatype.SOA and len(rrset) > 0:
            return int(min(rrset.ttl, rrset[0].minimum))
    return NEGATIVE_TTL_WITHOUT_SOA


def _errors_reason(exc: dns.resolver.NoNameservers) -> str:
    """SERVFAIL / REFUSED / ... from dnspython's per-server error list.

    Each entry is (server, tcp, port, error, response) where error is the
    rcode as text for a response with a bad rcode, else an exception.
    """
    reasons: list[str] = []
    for err in exc.kwargs.get("errors", []):
        detail = err[3] if len(err) > 3 else err
        if isinstance(detail, str):
            reasons.append(detail)
        elif isinstance(detail, dns.message.Message):
            reasons.append(dns.rcode.to_text(detail.rcode()))
        else:
            reasons.append(type(detail).__name__)
    return ",".join(sorted(set(reasons))) or "no nameserver answered"


class _ToLoop:
    """An awaitable that moves the awaiting coroutine onto the resolver's loop.

    On the loop thread it completes at once.  On any other thread it yields
    :data:`_HOP`, which :meth:`Resolver.run` / :meth:`Resolver.submit` catch:
    they give the suspended coroutine to the loop, which resumes it there.
    """

    __slots__ = ("loop_thread",)

    def __init__(self, loop_thread: int | None) -> None:
        self.loop_thread = loop_thread

    def __await__(self) -> Generator[object, None, None]:
        if threading.get_ident() != self.loop_thread:
            yield _HOP


_HOP = object()  # the marker a coroutine yields to move onto the loop


class _Resume:
    """Continue, inside a loop Task, a coroutine first driven on another thread."""

    __slots__ = ("coro",)

    def __init__(self, coro: Coroutine[Any, Any, T]) -> None:
        self.coro = coro

    def __await__(self) -> Generator[Any, Any, Any]:
        coro = self.coro
        try:
            pending = coro.send(None)  # back from _ToLoop, now on the loop thread
        except StopIteration as stop:
            return stop.value
        while True:
            try:
                sent = yield pending
            except BaseException as exc:  # noqa: BLE001 - cancellation too: pass it on
                try:
                    pending = coro.throw(exc)
                except StopIteration as stop:
                    return stop.value
                continue
            try:
                pending = coro.send(sent)
            except StopIteration as stop:
                return stop.value


async def _resume(coro: Coroutine[Any, Any, T]) -> T:
    result: T = await _Resume(coro)
    return result


class Resolver:
    """Cached, merging DNS lookups; network I/O on one event-loop thread."""

    def __init__(
        self,
        settings: ResolverSettings | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings or ResolverSettings()
        self.stats = ResolverStats()
        self._clock = clock
        self._cache: TLRUCache[Query, tuple[Answer, float]] = TLRUCache(
            maxsize=self.settings.cache_size, ttu=self._ttu, timer=clock
        )
        self._inflight: dict[Query, asyncio.Future[Answer]] = {}
        self._dns = self._make_dnspython_resolver()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run_loop, name="heloguard-dns", daemon=True)
        self._started = False
        self._lock = threading.Lock()
        self._cache_lock = threading.Lock()  # the cache is read from every thread
        self._loop_thread: int | None = None
        # Hooks for the metrics: an answer from the network, a cache hit.
        self.on_answer: Callable[[Answer], None] | None = None
        self.on_cache_hit: Callable[[], None] | None = None

    # -- life cycle ---------------------------------------------------------

    def _make_dnspython_resolver(self) -> dns.asyncresolver.Resolver:
        st = self.settings
        if st.nameservers:
            res = dns.asyncresolver.Resolver(configure=False)
            res.nameservers = [dns.nameserver.Do53Nameserver(h, p) for h, p in st.nameservers]
        else:
            try:
                res = dns.asyncresolver.Resolver(configure=True)
            except dns.resolver.NoResolverConfiguration:
                # No resolv.conf and no nameserver configured: every answer is TEMP.
                res = dns.asyncresolver.Resolver(configure=False)
                res.nameservers = []
        res.cache = None  # our own cache, keyed on the question only
        # dnspython's timeout is per try; lifetime is the whole question.  Two
        # tries fit in the per-question timeout so one lost packet is retried.
        res.lifetime = st.timeout
        res.timeout = max(st.timeout / 2, 0.05)
        res.use_edns(0, 0, 1232)
        res.search = []
        return res

    def _run_loop(self) -> None:
        self._loop_thread = threading.get_ident()
        asyncio.set_event_loop(self._loop)
        self._loop.run_forever()

    def start(self) -> Resolver:
        """Start the loop thread (idempotent)."""
        with self._lock:
            if not self._started:
                self._thread.start()
                self._started = True
        return self

    def close(self) -> None:
        """Stop the loop thread: cancel pending lookups (closing their sockets), then stop."""
        with self._lock:
            if not self._started or self._loop.is_closed():
                return

        async def cancel_pending() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self._loop.shutdown_asyncgens()

        try:
            asyncio.run_coroutine_threadsafe(cancel_pending(), self._loop).result(timeout=5)
        except (concurrent.futures.TimeoutError, RuntimeError):
            log.warning("resolver: pending lookups did not stop in time")
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        if not self._thread.is_alive():
            self._loop.close()

    def __enter__(self) -> Resolver:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def now(self) -> float:
        """The clock that TTLs and deadlines are measured on."""
        return self._clock()

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The event loop that owns the cache and all DNS I/O."""
        return self._loop

    def submit(
        self, coro: Coroutine[Any, Any, T], *, inline: bool = False
    ) -> concurrent.futures.Future[T]:
        """Run ``coro`` on the resolver's loop; returns a thread-safe future.

        ``inline``: first drive it in this thread, as far as the cache answers
        (the coroutine may await nothing but :meth:`lookup_many` and plain
        coroutines); the future is already done when the cache answered
        everything.
        """
        self.start()
        if not inline:
            return asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            yielded = coro.send(None)
        except StopIteration as stop:
            done: concurrent.futures.Future[T] = concurrent.futures.Future()
            done.set_result(stop.value)
            return done
        except Exception as exc:  # noqa: BLE001 - the caller gets it from the future
            failed: concurrent.futures.Future[T] = concurrent.futures.Future()
            failed.set_exception(exc)
            return failed
        if yielded is not _HOP:  # only _ToLoop may suspend off the loop
            coro.close()
            raise RuntimeError(f"coroutine awaited {yielded!r} outside the resolver's loop")
        return asyncio.run_coroutine_threadsafe(_resume(coro), self._loop)

    def run(
        self, coro: Coroutine[Any, Any, T], timeout: float | None = None, *, inline: bool = False
    ) -> T:
        """Run ``coro`` (see :meth:`submit`) and wait for it (from another thread)."""
        fut = self.submit(coro, inline=inline)
        try:
            return fut.result(timeout)
        except concurrent.futures.TimeoutError:
            fut.cancel()
            raise

    # -- lookups -------------------------------------------------------------

    def _ttu(self, _key: Query, value: tuple[Answer, float], now: float) -> float:
        return value[1]

    def _clamp(self, answer: Answer) -> float:
        st = self.settings
        if answer.status is Status.OK:
            ttl = min(max(answer.ttl, st.min_ttl), st.max_ttl)
        elif answer.status.permanent_negative:
            ttl = min(max(answer.ttl, st.negative_min_ttl), st.negative_max_ttl)
        else:
            ttl = st.temp_ttl
        return float(ttl)

    def cached(self, query: Query) -> Answer | None:
        """The cached answer, its TTL counted down; None on a miss (any thread)."""
        with self._cache_lock:
            hit = self._cache.get(query)
        if hit is None:
            return None
        answer, expires = hit
        left = max(0, int(expires - self._clock()))
        return replace(answer, ttl=min(answer.ttl, left), origin=Origin.CACHE, elapsed=0.0)

    async def lookup(self, query: Query) -> Answer:
        """Answer one question from the cache, an identical one in flight, or the network."""
        self.stats.asked += 1
        hit = self.cached(query)
        if hit is not None:
            self._hit()
            return hit
        pending = self._inflight.get(query)
        if pending is not None:
            self.stats.merged += 1
            answer = await asyncio.shield(pending)
            return replace(answer, origin=Origin.MERGED)
        fut: asyncio.Future[Answer] = self._loop.create_future()
        self._inflight[query] = fut
        try:
            answer = await self._ask(query)
        except BaseException as exc:  # cancellation: waiters get a TEMP, not a hang
            fut.set_result(Answer(query, Status.TEMP, reason=f"lookup abandoned: {exc!r}"))
            raise
        finally:
            self._inflight.pop(query, None)
        if not fut.done():
            fut.set_result(answer)
        with self._cache_lock:
            self._cache[query] = (answer, self._clock() + self._clamp(answer))
        return answer

    async def lookup_many(
        self, queries: Iterable[Query], deadline: float | None = None
    ) -> dict[Query, Answer]:
        """Ask many questions in parallel; those not answered by ``deadline`` are TEMP.

        ``deadline`` is on this resolver's clock.  Lookups that miss it go on
        in the background and still fill the cache.  Answered from the cache
        in the calling thread when it can; the rest moves onto the loop.
        """
        out: dict[Query, Answer] = {}
        missing: list[Query] = []
        for q in dict.fromkeys(queries):
            hit = self.cached(q)
            if hit is not None:
                self.stats.asked += 1
                self._hit()
                out[q] = hit
            else:
                missing.append(q)
        if missing:
            await _ToLoop(self._loop_thread)
            tasks = {asyncio.ensure_future(self.lookup(q)): q for q in missing}
            timeout = None if deadline is None else max(0.0, deadline - self._clock())
            done, _pending = await asyncio.wait(tasks, timeout=timeout)
            for task, q in tasks.items():
                if task in done and not task.cancelled() and task.exception() is None:
                    out[q] = task.result()
                else:
                    out[q] = Answer(
                        q, Status.TEMP, reason="stage time budget exhausted", origin=Origin.BUDGET
                    )
        return out

    async def _ask(self, query: Query) -> Answer:
        """Send one question to the network and turn the outcome into a value."""
        self.stats.sent += 1
        started = time.monotonic()
        try:
            answer = await self._ask_dnspython(query)
        except Exception as exc:  # a resolver bug must not become a crash or a 5xx
            log.exception("resolver error on %s", query)
            answer = Answer(query, Status.TEMP, reason=f"resolver error: {type(exc).__name__}")
        elapsed = time.monotonic() - started
        if answer.status is Status.TEMP:
            self.stats.temp += 1
        answer = replace(answer, elapsed=elapsed)
        if self.on_answer is not None:
            self.on_answer(answer)
        return answer

    def _hit(self) -> None:
        self.stats.cache_hits += 1
        if self.on_cache_hit is not None:
            self.on_cache_hit()

    def cache_size(self) -> int:
        """Answers in the cache now."""
        return len(self._cache)

    async def _ask_dnspython(self, query: Query) -> Answer:
        if not self._dns.nameservers:
            return Answer(query, Status.TEMP, reason="no nameserver configured")
        try:
            qname = dns.name.from_text(query.name)
        except (dns.exception.DNSException, ValueError) as exc:
            # A name that cannot be put on the wire cannot exist.
            return Answer(query, Status.NXDOMAIN, reason=f"invalid name: {type(exc).__name__}")
        try:
            result = await self._dns.resolve(
                qname, query.rdtype, raise_on_no_answer=False, search=False
            )
        except dns.resolver.NXDOMAIN as exc:
            responses = exc.kwargs.get("responses", {})
            response = responses.get(qname) if isinstance(responses, Mapping) else None
            return Answer(query, Status.NXDOMAIN, ttl=_negative_ttl(response))
        except dns.resolver.NoNameservers as exc:
            return Answer(query, Status.TEMP, reason=_errors_reason(exc))
        except dns.resolver.LifetimeTimeout:
            return Answer(query, Status.TEMP, reason="timeout")
        except dns.exception.Timeout:
            return Answer(query, Status.TEMP, reason="timeout")
        except dns.exception.DNSException as exc:
            # YXDOMAIN, a CNAME chain too long or looping, a malformed answer.
            return Answer(query, Status.TEMP, reason=f"{type(exc).__name__}")
        except (OSError, ValueError) as exc:
            return Answer(query, Status.TEMP, reason=f"{type(exc).__name__}: {exc}")
        canonical = result.canonical_name.to_text(omit_final_dot=True).lower()
        chained = canonical if canonical != query.name else None
        rrset: dns.rrset.RRset | None = result.rrset
        ttl = int(result.chaining_result.minimum_ttl)
        if rrset is None or len(rrset) == 0:
            return Answer(query, Status.NODATA, ttl=ttl, canonical=chained)
        records = tuple(sorted({_record_text(query.rdtype, rd) for rd in rrset}))
        return Answer(query, Status.OK, records=records, ttl=ttl, canonical=chained)
