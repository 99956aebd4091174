"""pymilter runs on our own libmilter build, a thread per connection (contrib/libmilter.py).

Debian's libmilter serves every connection from one polling thread and a
worker pool; ``make venv`` builds libmilter without that pool and links
pymilter to it by run path.  These tests fail if pymilter was built against
Debian's library after all (say, from a cached wheel), or if the library
in use serves connections from a pool.
"""

from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path
from typing import Any

import milter  # pymilter's C extension
import pytest
from miltertest import MilterClient

CONNECTIONS = 24


def _threads(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    raise AssertionError(f"no Threads line for {pid}")


def test_pymilter_loads_the_libmilter_built_for_the_venv() -> None:
    assert milter.__file__ is not None
    mapped = {
        line.split()[-1]
        for line in Path("/proc/self/maps").read_text().splitlines()
        if "libmilter" in line
    }
    ours = Path(sys.prefix) / "lib" / "libmilter" / "libmilter.so.1.0.1"
    assert mapped == {str(ours)}, f"pymilter loaded {mapped or 'no libmilter'}, not {ours}"


@pytest.mark.integration
def test_each_open_connection_has_its_own_thread(start_milter: Any) -> None:
    m = start_milter()
    before = _threads(m.proc.pid)
    with contextlib.ExitStack() as stack:
        for _ in range(CONNECTIONS):
            # negotiated, then idle: waiting for a connect that never comes
            stack.enter_context(MilterClient(m.socket)).negotiate()
        deadline = time.monotonic() + 5
        while _threads(m.proc.pid) < before + CONNECTIONS and time.monotonic() < deadline:
            time.sleep(0.05)
        during = _threads(m.proc.pid)
    # a worker pool would park the idle connections with its poller: a few threads
    assert during >= before + CONNECTIONS, (before, during)
