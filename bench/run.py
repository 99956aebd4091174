"""``make bench``: run every benchmark and write docs/benchmarks.md."""

from __future__ import annotations

import datetime
import sys
import time
from pathlib import Path

# PYTHONSAFEPATH keeps the script's folder off sys.path; the benchmarks import each other.
sys.path.insert(0, str(Path(__file__).resolve().parent))

import cold_chain
import generic_names
import greylist_pg
import greylist_rate
import postfix_e2e
import protocol
from common import ROOT, machine

SECTIONS = [protocol, postfix_e2e, cold_chain, generic_names, greylist_rate, greylist_pg]


def main() -> int:
    started = time.monotonic()
    parts = []
    for module in SECTIONS:
        print(f"running {module.__name__} ...", file=sys.stderr, flush=True)
        parts.append(module.run())
    took = time.monotonic() - started
    header = [
        "# Benchmarks",
        "",
        "Written by `make bench` (`bench/run.py`); every figure below was measured by that run.",
        "Timings belong here, never in tests.",
        "",
        f"- Machine: {machine()}",
        f"- Date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC; "
        f"the whole suite took {took:.0f} s.",
        "",
    ]
    text = "\n".join(header) + "\n" + "\n\n".join(parts) + "\n"
    (ROOT / "docs" / "benchmarks.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
