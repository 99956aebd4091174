"""Decision records: one JSON line per decision, replayable offline.

With ``[log] decisions = PATH`` every decision the milter makes (one per
phase it evaluates) is appended to PATH as one JSON object: the inputs
(client address, HELO, sender, recipients, the phases evaluated), the
verdict and reply, every rule's finding, and every DNS answer it used (name,
type, status, records, TTL).  ``heloguard check --replay FILE`` re-evaluates
a record from its own DNS answers and must reach the same verdict: the
essay's "repeatable", made checkable.  ``heloguard check`` on the same inputs,
live, shows what changed if DNS did.

Records hold attacker-controlled text (HELO, PTR names); JSON escapes
control characters, and query keys of DNS lists are redacted.

A daemon killed mid-write (kill -9, power loss) or a disk that fills up
mid-line can leave a record cut short.  The writer ends that line before the
next record (at its next write after a failed one, or on opening the file
again), so the next record starts whole; the replay skips a cut-short
record with a warning and replays the rest.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path
from typing import Any

from heloguard.answers import Answer
from heloguard.engine import Decision
from heloguard.logfmt import redact
from heloguard.render import decision_json
from heloguard.rules.base import Stage

FORMAT = 1
log = logging.getLogger("heloguard")


def record(
    decision: Decision,
    *,
    client: str,
    helo: str | None,
    sender: str | None,
    rcpt: list[str],
    phases: list[list[Stage]],
    evaluate_all: bool = False,
    when: float | None = None,
) -> dict[str, Any]:
    """The record of one decision."""
    out = decision_json(decision)
    out.update(
        {
            "format": FORMAT,
            "time": round(when if when is not None else time.time(), 3),
            "input": {"ip": client, "helo": helo, "from": sender, "rcpt": rcpt},
            "phases": [[s.word for s in phase] for phase in phases],
            "evaluate_all": evaluate_all,
            "answers": [a.to_json() for a in decision.answers.values()],
        }
    )
    return out


def dumps(rec: dict[str, Any]) -> str:
    """One line of JSON, query keys redacted."""
    return redact(json.dumps(rec, separators=(",", ":"), sort_keys=False))


class RecordWriter:
    """Appends records to a file, one line each, from many threads.

    The milter writes from the log writer's thread (``heloguard.logsink.later``).
    A write that fails (a full disk) is remembered in :attr:`failed` until one
    succeeds again; :meth:`check` raises it in the callback, so while records
    cannot be kept every judged session is answered per ``failure_policy``.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        # written before the next record: ends a line a stopped daemon left cut short
        self._unended = "\n" if _ends_mid_line(self.path) else ""
        if self._unended:
            log.warning(
                "decision records: %s ends in a record cut short (the daemon stopped"
                " mid-write); the line is ended and kept, the replay skips it",
                self.path,
            )
        self._fh = self.path.open("a", encoding="utf-8", buffering=1)
        self.failed: OSError | None = None

    def write(self, rec: dict[str, Any]) -> None:
        """Append one record (a whole line, never interleaved)."""
        line = dumps(rec) + "\n"
        with self._lock:
            try:
                self._fh.write(self._unended + line)
                self._unended = ""
            except OSError as exc:
                self._unended = "\n"  # part of the line may be in the file
                first, self.failed = self.failed is None, exc  # set before anyone reads the log
                if first:
                    log.error(  # noqa: TRY400 - the reason is the whole story
                        "decision records: cannot write %s: %s; judged sessions are answered"
                        " per failure_policy until a record is written again",
                        self.path,
                        exc.strerror or exc,
                    )
                return
            if self.failed is not None:
                log.warning("decision records: writing %s again", self.path)
                self.failed = None

    def check(self) -> None:
        """Raise :class:`RecordsUnwritable` while the last write failed."""
        failed = self.failed
        if failed is not None:
            raise RecordsUnwritable(
                failed.errno, f"decision records: cannot write {self.path}: {failed.strerror}"
            )

    def close(self) -> None:
        """Close the file."""
        with self._lock:
            self._fh.close()


class RecordsUnwritable(OSError):
    """The decision records cannot be written (raised in the callback)."""


def _ends_mid_line(path: Path) -> bool:
    """Whether *path* holds text whose last line has no newline."""
    try:
        with path.open("rb") as fh:
            if fh.seek(0, 2) == 0:
                return False
            fh.seek(-1, 2)
            return fh.read(1) != b"\n"
    except FileNotFoundError:
        return False


class ReplayError(ValueError):
    """A record that cannot be replayed."""


class RecordCutShort(ReplayError):
    """A record whose line ends before its JSON does: the writer was stopped mid-write."""


def _cut_short(line: str, exc: json.JSONDecodeError) -> bool:
    """Whether *line* is a JSON object that ran out of text (not other garbage).

    Cut anywhere, a record fails either inside an unterminated string or
    within a few characters of the end (``tru``, ``\\u00``).
    """
    return line.startswith("{") and (
        exc.msg.startswith("Unterminated string") or exc.pos >= len(line) - 6
    )


def parse(line: str) -> dict[str, Any]:
    """Parse and check one record line."""
    try:
        rec = json.loads(line)
    except json.JSONDecodeError as exc:
        if _cut_short(line, exc):
            raise RecordCutShort(f"record cut short after {len(line)} characters") from None
        raise ReplayError(f"not a JSON record: {exc}") from None
    if not isinstance(rec, dict) or "input" not in rec or "answers" not in rec:
        raise ReplayError("not a heloguard decision record (no input or answers)")
    if rec.get("format") != FORMAT:
        raise ReplayError(f"record format {rec.get('format')!r}, expected {FORMAT}")
    return rec


def answers_of(rec: dict[str, Any]) -> list[Answer]:
    """The DNS answers a record holds."""
    try:
        return [Answer.from_json(a) for a in rec["answers"]]
    except (KeyError, TypeError, ValueError) as exc:
        raise ReplayError(f"bad answer in record: {exc}") from None


def phases_of(rec: dict[str, Any]) -> list[list[Stage]]:
    """The phases a record evaluated."""
    try:
        return [[Stage.parse(s) for s in phase] for phase in rec["phases"]]
    except (KeyError, TypeError) as exc:
        raise ReplayError(f"bad phases in record: {exc}") from None
