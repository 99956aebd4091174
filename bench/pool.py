"""libmilter's worker pool against a thread per connection: what each costs at 256.

Debian's libmilter is built with its worker pool (``-D_FFR_WORKERS_POOL=1``):
one thread polls every connection and hands each ready one to a worker, under
one mutex, and the worker gives it back when no next command is waiting.
heloguard's own build (``contrib/libmilter.py``, which the Makefile links
pymilter to) leaves the pool out, as sendmail's source does by default: each
connection has its own thread, which reads its next command itself.  Here
libmilter 8.17.1.9, the version Debian 12 ships, is built from the same
source with Debian's pool flags, and each filter (the no-op C and no-op
pymilter filters, heloguard) runs on it (``LD_LIBRARY_PATH``; the soname is
the same) and on the library as installed, pinned as in ``bench/pinned.py``:
the filter on core 1, the load generator on core 0, each filter's cells at 8,
64 and 256 back to back, round after round.

Needs a C compiler and libmilter's build inputs (``make deps-build``) and
``deb.debian.org`` over HTTPS, once (``contrib/libmilter.py`` keeps the
checked tarball in ``.cache/libmilter/``).  Run alone: ``python bench/pool.py``
(or ``python bench/run.py pool``, which splices the section into
``docs/benchmarks.md``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import pinned
import protocol
from common import LIBMILTER, ROOT, TESTS, median

from dnsserver import DNSServer

sys.path.insert(0, str(ROOT / "contrib"))
import libmilter

ROUNDS = protocol.THROUGHPUT_ROUNDS
POOL = "Debian's worker pool"
OWN = "a thread per connection (as installed)"


def build(work: Path) -> Path:
    """libmilter with Debian's worker pool, in a folder holding ``libmilter.so.1.0.1``."""
    top = libmilter.unpack(work / "src")
    out = work / "pool"
    libmilter.compile_library(top, out, [*libmilter.DEFINES, libmilter.WORKER_POOL])
    return out


def run() -> str:
    """Measure and return the markdown section."""
    head = [
        "## libmilter's worker pool against a thread per connection (`bench/pool.py`)",
        "",
        f"libmilter {libmilter.VERSION} as heloguard installs it (`contrib/libmilter.py`: each",
        "connection has its own thread, which reads its next command) and built from the",
        "same source with Debian's worker pool (one thread polls every connection and",
        "hands each ready one to a worker), each filter on both; pinned as in",
        f"`bench/pinned.py` (the filter on core 1, the load generator on core 0), {ROUNDS}",
        "rounds of each filter's cells at 8, 64 and 256 back to back.",
        "",
    ]
    if len(os.sched_getaffinity(0)) < 2 or shutil.which("taskset") is None:
        return "\n".join([*head, "Not measured: needs two cores and taskset (util-linux)."])
    if not (LIBMILTER / libmilter.SONAME).exists():
        return "\n".join([*head, f"Not measured: no {LIBMILTER / libmilter.SONAME} (make venv)."])
    work = Path(tempfile.mkdtemp(prefix="hg-bench-pool-"))
    try:
        pool = build(work)
    except (OSError, RuntimeError, subprocess.CalledProcessError, tarfile.TarError) as exc:
        shutil.rmtree(work, ignore_errors=True)
        return "\n".join([*head, f"Not measured: libmilter could not be built ({exc})."])
    cases = [protocol.case(i) for i in range(200)]
    threads: dict[str, int] = {}
    with DNSServer(TESTS / "zones") as dns:
        protocol.serve_clients(dns, 200)
        floor = {label: argv for label, argv, _ in protocol.noop_filters(work)}
        specs: list[protocol.Spec] = []
        for lib, env in ((POOL, ["env", f"LD_LIBRARY_PATH={pool}"]), (OWN, [])):
            pin = ["taskset", "-c", "1", *env]
            for label, argv in floor.items():
                sock = work / f"filter-{len(specs)}.sock"
                specs.append((f"{label}, {lib}", [*pin, *argv[:-1], f"unix:{sock}"], sock))
            hg_argv, hg_sock = protocol.heloguard(work, dns, f"hg-{len(specs)}")
            specs.append((f"heloguard, {lib}", [*pin, *hg_argv], hg_sock))
        with pinned.started(specs, work) as filters:
            measured = protocol.throughput_rows(filters, cases, rounds=ROUNDS)
            threads = {f.label: protocol.status_number(f.pid, "Threads") for f in filters}
    shutil.rmtree(work, ignore_errors=True)
    rounds = {label: protocol.kept_at_top(measured, label) for label, _, _ in specs}
    kept = {label: median(r) for label, r in rounds.items()}
    names = [label.rsplit(", ", 1)[0] for label, _, _ in specs[: len(specs) // 2]]
    each = "; ".join(
        f"{n} {kept[f'{n}, {POOL}']:.2f} / {kept[f'{n}, {OWN}']:.2f} "
        f"(threads {threads[f'{n}, {POOL}']} / {threads[f'{n}, {OWN}']})"
        for n in names
    )
    hg_pool, hg_own = rounds[f"heloguard, {POOL}"], rounds[f"heloguard, {OWN}"]
    if min(hg_own) > max(hg_pool):
        verdict = (
            f"every round of heloguard on its own build kept more ({min(hg_own):.2f}-"
            f"{max(hg_own):.2f}) than any on the worker pool ({min(hg_pool):.2f}-"
            f"{max(hg_pool):.2f}): the pool's poller and hand-overs are what cost the share"
        )
    else:
        verdict = (
            f"heloguard's rounds overlap ({min(hg_own):.2f}-{max(hg_own):.2f} on its own "
            f"build, {min(hg_pool):.2f}-{max(hg_pool):.2f} on the pool): not shown apart"
        )
    return "\n".join(
        [
            *head,
            *protocol.throughput_table(measured),
            "",
            "- Rate at 256 over the best at 8 or 64, median of the rounds, on the worker pool / "
            f"a thread per connection, and the threads alive after the last cell: {each}.",
            f"- So {verdict}.",
            "- Measured the same way at 4228fb5 and not kept: the pool keeping up to 64 idle "
            "workers (`MIN_IDLE`, 1 as shipped) moved heloguard's share from 0.76 to 0.74, "
            "so the pool's threads started and ended are not its cost.",
        ]
    )


if __name__ == "__main__":
    print(run())
