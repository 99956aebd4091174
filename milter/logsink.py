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
# The writer hands the GIL back after this many lines.  It makes a batch of
# lines in one go; meanwhile each of libmilter's threads wanting the GIL waits
# out Python's switch interval (5 ms) and then forces a hand-over.  With 256
# connections on one core that convoy cost a quarter of the throughput
# (bench/pinned.py); a voluntary hand-over every few lines lets a waiting
# callback in at once.
YIELD_EVERY = 8

# A line queued by defer(): the logger, the level, the message, time.time().
Deferred = tuple[logging.Logger, int, object, float]


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
            records: list[logging.LogRecord] = []
            stop = False
            for n, item in enumerate(batch, 1):
                if n % YIELD_EVERY == 0:
                    time.sleep(0)  # releases the GIL: see YIELD_EVERY
                if item is _STOP:
                    stop = True
                elif isinstance(item, Job):
                    if records:  # keep the order: lines queued before the job first
                        self._write(records)
                        records = []
                    item()
                else:
                    records.append(_record(item))
            if records:
                self._write(records)
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

    def _write(self, records: list[logging.LogRecord]) -> None:
        target = self.target
        stream: TextIO | None = getattr(target, "stream", None)
        if isinstance(target, logging.StreamHandler) and stream is not None:
            lines = []
            for n, r in enumerate(records, 1):
                if n % YIELD_EVERY == 0:
                    time.sleep(0)  # releases the GIL: see YIELD_EVERY
                try:
                    lines.append(target.format(r) + target.terminator)
                except Exception:  # noqa: BLE001 - as Handler.handleError would
                    target.handleError(r)
            try:
                stream.write("".join(lines))
                stream.flush()
            except Exception:  # noqa: BLE001 - a full disk must not stop the writer
                target.handleError(records[-1])
            return
        for r in records:
            target.handle(r)

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
