"""``make bench``: run every benchmark and write docs/benchmarks.md.

    python bench/run.py                 # every section, a new file
    python bench/run.py generic_names   # re-measure these sections only

With section names, only those sections are run and replaced in the existing
docs/benchmarks.md (each section's heading names its module); the others are
kept as they were, and the header says which sections were re-measured when.
"""

from __future__ import annotations

import datetime
import sys
import time
from pathlib import Path

# PYTHONSAFEPATH keeps the script's folder off sys.path; the benchmarks import each other.
sys.path.insert(0, str(Path(__file__).resolve().parent))

import callbacks
import cold_chain
import generic_names
import greylist_pg
import greylist_rate
import native
import pinned
import pool
import postfix_e2e
import protocol
import syscalls
import waits
import whatif_rate
from common import ROOT, machine

SECTIONS = [
    protocol,
    callbacks,
    syscalls,
    native,
    pinned,
    pool,
    waits,
    postfix_e2e,
    cold_chain,
    generic_names,
    greylist_rate,
    greylist_pg,
    whatif_rate,
]
OUT = ROOT / "docs" / "benchmarks.md"
WHOLE_RUN = "every figure below was measured by that run."
PARTLY = "every figure below was measured by one run of it (sections re-measured alone say when)."


def _split(text: str) -> tuple[str, list[str]]:
    """The header and the ``## `` sections of an existing benchmarks.md."""
    head, *sections = text.split("\n## ")
    return head, ["## " + s.rstrip("\n") for s in sections]


def _module_of(section: str) -> str:
    first = section.splitlines()[0]
    return first.split("`bench/", 1)[1].split(".py", 1)[0] if "`bench/" in first else ""


def _superseded(line: str, names: list[str]) -> bool:
    """An earlier re-measured note all of whose sections are run again now."""
    if not line.startswith("- Re-measured"):
        return False
    earlier = line.rsplit("): ", 1)[-1].rstrip(".").split(", ")
    return set(earlier) <= set(names)


def update(names: list[str]) -> int:
    """Re-run the named sections and splice them into the existing file."""
    by_name = {m.__name__: m for m in SECTIONS}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        print(
            f"unknown section(s): {', '.join(unknown)}; known: {', '.join(by_name)}",
            file=sys.stderr,
        )
        return 2
    head, sections = _split(OUT.read_text()) if OUT.exists() else ("# Benchmarks\n", [])
    fresh = {}
    for name in names:
        print(f"running {name} ...", file=sys.stderr, flush=True)
        fresh[name] = by_name[name].run().rstrip("\n")
    kept = {_module_of(s): s for s in sections}
    kept.update(fresh)
    order = [m.__name__ for m in SECTIONS] + [k for k in kept if k not in by_name]
    stamp = f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC"
    note = f"- Re-measured alone on {stamp} ({machine()}): {', '.join(names)}."
    head_lines = [ln for ln in head.rstrip("\n").splitlines() if not _superseded(ln, names)]
    head_lines = [ln.replace(WHOLE_RUN, PARTLY) for ln in head_lines]
    body = "\n\n".join(kept[k] for k in order if k in kept)
    text = "\n".join([*head_lines, note, ""]) + "\n" + body + "\n"
    OUT.write_text(text)
    print(text)
    return 0


def main() -> int:
    if sys.argv[1:]:
        return update(sys.argv[1:])
    started = time.monotonic()
    parts = []
    for module in SECTIONS:
        print(f"running {module.__name__} ...", file=sys.stderr, flush=True)
        parts.append(module.run())
    took = time.monotonic() - started
    header = [
        "# Benchmarks",
        "",
        f"Written by `make bench` (`bench/run.py`); {WHOLE_RUN}",
        "Timings belong here, never in tests.",
        "",
        f"- Machine: {machine()}",
        f"- Date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC; "
        f"the whole suite took {took:.0f} s.",
        "",
    ]
    text = "\n".join(header) + "\n" + "\n\n".join(parts) + "\n"
    OUT.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
