"""Log output off the milter's threads: one writer thread, lines written in batches.

Every decision is a log line, written from a libmilter callback.  Writing it
there costs far more than building it: each ``write()`` (or syslog
``send()``) releases Python's global lock, and with many callback threads
the writer then queues to get it back, so a line cost about 150 us of CPU
per session under load (``bench/protocol.py``).  The callback now only puts
the record on a queue; one thread formats what has piled up and writes it
with one ``write()`` for a stream, or hands each record to a syslog handler.

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
from typing import TextIO

_STOP = None  # the sentinel that ends the writer
BATCH_WAIT = 0.05  # seconds a line may wait to be written with others


class QueuedHandler(logging.Handler):
    """Put records on a queue for :class:`LogWriter`; never blocks on I/O."""

    def __init__(self, sink: queue.SimpleQueue[logging.LogRecord | None]) -> None:
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
        self.queue: queue.SimpleQueue[logging.LogRecord | None] = queue.SimpleQueue()
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
            records = [r for r in batch if r is not _STOP]
            if records:
                self._write(records)
            if len(records) < len(batch):
                return

    def _write(self, records: list[logging.LogRecord]) -> None:
        target = self.target
        stream: TextIO | None = getattr(target, "stream", None)
        if isinstance(target, logging.StreamHandler) and stream is not None:
            lines = []
            for r in records:
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
        self.queue.put(_STOP)
        self._thread.join(timeout)
        self.target.close()
