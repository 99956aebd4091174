"""Log output off the milter's threads: one writer thread, lines written in batches.

Every decision is a log line, written from a libmilter callback.  Writing it
there costs far more than building it: each ``write()`` (or syslog
``send()``) releases Python's global lock, and with many callback threads
the writer then queues to get it back, so a line cost about 150 us of CPU
per session under load (``bench/protocol.py``).  The callback now only puts
the record on a queue; one thread formats what has piled up and writes it
with one ``write()`` for a stream, or hands each record to a syslog handler.

A decision line needs no formatting in the callback either: :func:`defer`
queues the logger, the level and a message object whose ``str()`` is the
line (``heloguard.session`` passes one holding the session's facts), and the
writer builds the record and the text.  Where no writer serves the logger
(tests, the dry-run), :func:`defer` logs the message the ordinary way.

Other work a decision leaves behind (its JSON record for ``[log] decisions``,
its Prometheus counters) goes the same way: :func:`later` queues a function
and its arguments, and the writer calls it, in order with the lines.

Nothing is dropped: the queue is unbounded (a record is small, and the
writer keeps up with any load the milter can take), and :meth:`stop` writes
everything queued before it returns (``serve`` calls it on the way out; an
``atexit`` hook covers other exits).  A ``kill -9`` loses at most the lines
of the last few milliseconds, as an unflushed stdio buffer would.
"""

from __future__ import annotations

import atexit
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any, TextIO

_STOP = None  # the sentinel that ends the writer
BATCH_WAIT = 0.05  # seconds a line may wait to be written with others
# The writer hands the GIL back when it has held it this long (seconds).  It
# makes a batch of lines in one go; meanwhile each of libmilter's threads
# wanting the GIL waits out Python's switch interval (5 ms) and then forces a
# hand-over.  With 256 connections on one core that convoy cost a quarter of
# the throughput (bench/pinned.py).  A hand-over after every few lines cured
# it but cost more than it saved when the threads run on two cores: each one
# woke a waiting callback thread and queued the writer behind it, about 40 us
# of CPU per session at concurrency 8 (bench/protocol.py).  By time, it
# happens about once a batch.
HOLD_MAX = 0.002

# A line queued by defer(): the logger, the level, the message, time.time().
Deferred = tuple[logging.Logger, int, object, float]


class _Pace:
    """Counts the writer's steps through a batch; hands the GIL back when it has
    held it ``HOLD_MAX`` (the clock is read every eighth step)."""

    __slots__ = ("since", "steps")

    def __init__(self) -> None:
        self.steps = 0
        self.since = time.monotonic()

    def step(self) -> None:
        self.steps += 1
        if self.steps % 8 == 0 and time.monotonic() - self.since >= HOLD_MAX:
            time.sleep(0)  # releases the GIL: see HOLD_MAX
            self.since = time.monotonic()


class LineFormatter(logging.Formatter):
    """``[TIME ]PREFIX MESSAGE``, for a record or straight from a deferred line.

    The daemon's own formats are a prefix and the message, after the time or
    not.  For those the writer makes a deferred line's text with :meth:`line`:
    no ``LogRecord``, and the time text made once a second, where a
    ``logging.Formatter`` spends about as long again on the record and on
    ``strftime`` as on the line itself.  Records logged the ordinary way
    format as ``logging.Formatter`` would, to the same text.
    """

    def __init__(self, prefix: str, *, stamped: bool) -> None:
        super().__init__(
            ("%(asctime)s " if stamped else "") + prefix.replace("%", "%%") + "%(message)s"
        )
        self.prefix = prefix
        self.stamped = stamped
        self._second = -1
        self._stamp = ""

    def line(self, msg: object, created: float) -> str:
        """The text of a deferred line, as :meth:`format` makes it of its record."""
        if not self.stamped:
            return f"{self.prefix}{msg}"
        second = int(created)
        if second != self._second:  # only the writer's thread calls this
            self._stamp = time.strftime(self.default_time_format, self.converter(second))
            self._second = second
        return f"{self._stamp},{int((created - second) * 1000):03d} {self.prefix}{msg}"


class Job:
    """Work queued by :func:`later`: a function and its arguments."""

    __slots__ = ("args", "fn")

    def __init__(self, fn: Callable[..., object], args: tuple[Any, ...]) -> None:
        self.fn = fn
        self.args = args

    def __call__(self) -> None:
        try:
            self.fn(*self.args)
        except Exception:  # one bad job must not stop the writer
            logging.getLogger("heloguard").exception("log writer: %r failed", self.fn)


Item = logging.LogRecord | Deferred | Job | None


class QueuedHandler(logging.Handler):
    """Put records on a queue for :class:`LogWriter`; never blocks on I/O."""

    def __init__(self, sink: queue.SimpleQueue[Item]) -> None:
        super().__init__()
        self.sink = sink

    def emit(self, record: logging.LogRecord) -> None:
        """Queue the record; its message is built by the writer."""
        self.sink.put(record)

    def handle(self, record: logging.LogRecord) -> bool:
        """Skip Handler's per-record lock: SimpleQueue is thread-safe."""
        rv = self.filter(record)
        if rv:
            self.sink.put(record if isinstance(rv, bool) else rv)
        return bool(rv)


class LogWriter:
    """The thread that writes what :class:`QueuedHandler` queued to ``target``."""

    def __init__(self, target: logging.Handler) -> None:
        self.target = target
        self.queue: queue.SimpleQueue[Item] = queue.SimpleQueue()
        self.handler = QueuedHandler(self.queue)
        self._thread = threading.Thread(target=self._run, name="heloguard-log", daemon=True)
        self._stopped = False
        self._thread.start()
        atexit.register(self.stop)

    def _run(self) -> None:
        while True:
            batch = [self.queue.get()]
            # Let lines pile up for a moment: a callback's put() then wakes no
            # thread, and one write() carries many lines.
            time.sleep(BATCH_WAIT)
            while len(batch) < 1000:
                try:
                    batch.append(self.queue.get_nowait())
                except queue.Empty:
                    break
            records: list[logging.LogRecord | Deferred] = []
            stop = False
            pace = _Pace()
            for item in batch:
                pace.step()
                if item is _STOP:
                    stop = True
                elif isinstance(item, Job):
                    if records:  # keep the order: lines queued before the job first
                        self._write(records, pace)
                        records = []
                    item()
                else:
                    records.append(item)
            if records:
                self._write(records, pace)
            if stop:
                return

    def serves(self, logger: logging.Logger) -> bool:
        """True when every record of ``logger`` goes to this writer and nowhere else."""
        seen = logger
        while not seen.handlers:
            if not seen.propagate or seen.parent is None:
                return False
            seen = seen.parent
        return seen.handlers == [self.handler] and not seen.propagate

    def _write(self, items: list[logging.LogRecord | Deferred], pace: _Pace) -> None:
        target = self.target
        stream: TextIO | None = getattr(target, "stream", None)
        if not isinstance(target, logging.StreamHandler) or stream is None:
            for item in items:
                target.handle(_record(item))
            return
        fast = target.formatter if isinstance(target.formatter, LineFormatter) else None
        end = target.terminator
        lines = []
        for item in items:
            pace.step()
            try:
                if fast is not None and isinstance(item, tuple):
                    lines.append(fast.line(item[2], item[3]) + end)
                else:
                    lines.append(target.format(_record(item)) + end)
            except Exception:  # noqa: BLE001 - as Handler.handleError would
                target.handleError(_record(item))
        try:
            stream.write("".join(lines))
            stream.flush()
        except Exception:  # noqa: BLE001 - a full disk must not stop the writer
            target.handleError(_record(items[-1]))

    def stop(self, timeout: float = 5.0) -> None:
        """Write everything queued, then end the thread (idempotent)."""
        if self._stopped:
            return
        self._stopped = True
        if _current[0] is self:
            _current[0] = None
        self.queue.put(_STOP)
        self._thread.join(timeout)
        self.target.close()


_current: list[LogWriter | None] = [None]  # the writer defer() hands lines to


def install(writer: LogWriter | None) -> None:
    """Make ``writer`` the one :func:`defer` uses (None: log the ordinary way)."""
    _current[0] = writer


def defer(logger: logging.Logger, level: int, msg: object) -> None:
    """Log ``msg`` at ``level``, its text made by the writer thread when one serves
    ``logger``; the caller checks ``logger.isEnabledFor(level)`` first."""
    writer = _current[0]
    if writer is not None and writer.serves(logger):
        writer.queue.put((logger, level, msg, time.time()))
    else:
        logger.log(level, msg)


def later(fn: Callable[..., object], *args: Any) -> None:
    """Call ``fn(*args)`` on the writer's thread, in order with the lines queued
    before it; at once when no writer is installed."""
    writer = _current[0]
    if writer is not None:
        writer.queue.put(Job(fn, args))
    else:
        fn(*args)


def _record(item: logging.LogRecord | Deferred) -> logging.LogRecord:
    if isinstance(item, logging.LogRecord):
        return item
    logger, level, msg, created = item
    record = logger.makeRecord(logger.name, level, "(unknown file)", 0, msg, (), None)
    record.created = created
    record.msecs = (created - int(created)) * 1000
    return record
