"""The log writer thread: every queued line written, in order, in few writes."""

from __future__ import annotations

import io
import logging
import threading

from heloguard.logsink import LogWriter


class CountingStream(io.StringIO):
    """A stream that counts its write() calls."""

    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, s: str) -> int:
        self.writes += 1
        return super().write(s)


def test_every_line_is_written_in_order_and_in_batches() -> None:
    stream = CountingStream()
    target = logging.StreamHandler(stream)
    target.setFormatter(logging.Formatter("%(message)s"))
    writer = LogWriter(target)
    logger = logging.getLogger("heloguard.test-logsink")
    logger.propagate = False
    logger.addHandler(writer.handler)
    logger.setLevel(logging.INFO)

    def burst(n: int) -> None:
        for i in range(500):
            logger.info("thread %d line %d", n, i)

    threads = [threading.Thread(target=burst, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    writer.stop()  # writes what is still queued
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2000
    for n in range(4):  # each thread's lines in its own order
        mine = [line for line in lines if line.startswith(f"thread {n} ")]
        assert mine == [f"thread {n} line {i}" for i in range(500)]
    assert stream.writes < 100, "lines are written in batches, not one write() each"
    logger.info("after stop")  # nothing hangs; the line is simply not written
    writer.stop()  # idempotent


def test_a_failing_stream_does_not_stop_the_writer() -> None:
    class Broken(io.StringIO):
        def write(self, s: str) -> int:
            raise OSError("disk full")

    target = logging.StreamHandler(Broken())
    errors: list[logging.LogRecord] = []
    target.handleError = errors.append  # type: ignore[method-assign,assignment]
    writer = LogWriter(target)
    writer.handler.handle(logging.LogRecord("x", logging.INFO, __file__, 1, "m", None, None))
    writer.stop()
    assert errors, "the failure is reported as logging reports its own errors"
