"""The log writer thread: every queued line written, in order, in few writes."""

from __future__ import annotations

import io
import logging
import threading

import pytest

from heloguard.logsink import LineFormatter, LogWriter, defer, install, later


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


class Line:
    """A message whose text is made when it is written; counts where that happened."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.made_in: list[str] = []

    def __str__(self) -> str:
        self.made_in.append(threading.current_thread().name)
        return self.text


def test_a_deferred_line_is_made_and_written_by_the_writer_thread() -> None:
    stream = io.StringIO()
    target = logging.StreamHandler(stream)
    target.setFormatter(logging.Formatter("%(levelname)s %(name)s %(message)s"))
    writer = LogWriter(target)
    logger = logging.getLogger("heloguard.test-deferred")
    logger.propagate = False
    logger.addHandler(writer.handler)
    child = logging.getLogger("heloguard.test-deferred.decisions")
    install(writer)
    try:
        assert writer.serves(child) and writer.serves(logger)
        lines = [Line(f"reject: HELO number {i}") for i in range(50)]
        for line in lines:
            defer(child, logging.WARNING, line)
        assert all(not line.made_in for line in lines), "no text made in the caller"
    finally:
        writer.stop()
    assert stream.getvalue().splitlines() == [
        f"WARNING heloguard.test-deferred.decisions reject: HELO number {i}" for i in range(50)
    ]
    assert {t for line in lines for t in line.made_in} == {"heloguard-log"}
    install(None)


def test_without_a_writer_defer_logs_the_ordinary_way(caplog: pytest.LogCaptureFixture) -> None:
    stream = io.StringIO()
    writer = LogWriter(logging.StreamHandler(stream))
    install(writer)  # installed, but this logger's records go elsewhere (to caplog)
    try:
        logger = logging.getLogger("heloguard.test-not-served")
        assert not writer.serves(logger)
        with caplog.at_level(logging.INFO, logger="heloguard.test-not-served"):
            defer(logger, logging.INFO, Line("pass: HELO ok"))
        assert [r.getMessage() for r in caplog.records] == ["pass: HELO ok"]
    finally:
        writer.stop()
        install(None)
    assert stream.getvalue() == ""


def test_later_runs_on_the_writer_thread_in_order_with_the_lines(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Records and counters leave the callback: queued, then run by the writer,
    after the lines queued before them; a job that raises stops nothing."""
    stream = io.StringIO()
    target = logging.StreamHandler(stream)
    target.setFormatter(logging.Formatter("%(message)s"))
    writer = LogWriter(target)
    logger = logging.getLogger("heloguard.test-later")
    logger.propagate = False
    logger.addHandler(writer.handler)
    logger.setLevel(logging.INFO)
    ran: list[tuple[int, str, int]] = []

    def job(n: int) -> None:  # what the stream held when the job ran
        ran.append((n, threading.current_thread().name, len(stream.getvalue().splitlines())))

    def broken() -> None:
        raise ValueError("a bad job")

    install(writer)
    caplog.set_level(logging.ERROR, logger="heloguard")
    try:
        for n in range(3):
            defer(logger, logging.INFO, f"line {n}")
            later(job, n)
        later(broken)
        defer(logger, logging.INFO, "after the bad job")
        assert ran == [], "nothing runs in the caller"
    finally:
        writer.stop()
        install(None)
    assert ran == [(0, "heloguard-log", 1), (1, "heloguard-log", 2), (2, "heloguard-log", 3)]
    assert stream.getvalue().splitlines() == ["line 0", "line 1", "line 2", "after the bad job"]
    (failure,) = [r for r in caplog.records if r.getMessage().startswith("log writer: ")]
    assert "broken" in failure.getMessage() and failure.exc_info is not None
    assert str(failure.exc_info[1]) == "a bad job"


def test_without_a_writer_later_runs_at_once() -> None:
    ran: list[str] = []
    later(ran.append, threading.current_thread().name)
    assert ran == [threading.current_thread().name]


@pytest.mark.parametrize("stamped", [True, False])
def test_a_deferred_line_reads_as_the_same_line_logged_the_ordinary_way(stamped: bool) -> None:
    """The writer makes a deferred line's text without a LogRecord; it must be the
    text ``logging.Formatter`` makes of the record, to the millisecond."""
    fmt = LineFormatter("heloguard[42]: ", stamped=stamped)
    plain = logging.Formatter(("%(asctime)s " if stamped else "") + "heloguard[42]: %(message)s")
    logger = logging.getLogger("heloguard.test-line-format")
    for created in (1765000000.0, 1765000000.0009, 1765000000.999, 1765000001.5, 1765086400.25):
        record = logger.makeRecord(logger.name, logging.INFO, "x", 0, "pass: HELO 100%", (), None)
        record.created, record.msecs = created, (created - int(created)) * 1000
        expected = plain.format(record)
        assert fmt.format(record) == expected
        assert fmt.line("pass: HELO 100%", created) == expected


def test_the_writer_writes_deferred_and_ordinary_lines_alike_in_order() -> None:
    stream = io.StringIO()
    target = logging.StreamHandler(stream)
    target.setFormatter(LineFormatter("heloguard[7]: ", stamped=False))
    writer = LogWriter(target)
    logger = logging.getLogger("heloguard.test-line-writer")
    logger.propagate = False
    logger.addHandler(writer.handler)
    logger.setLevel(logging.INFO)
    install(writer)
    try:
        for i in range(20):
            if i % 2:
                defer(logger, logging.INFO, Line(f"line {i}"))
            else:
                logger.info("line %d", i)
    finally:
        writer.stop()
        install(None)
    assert stream.getvalue().splitlines() == [f"heloguard[7]: line {i}" for i in range(20)]
