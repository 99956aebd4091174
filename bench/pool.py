"""libmilter's worker pool, rebuilt to keep its idle workers: does the churn cost the share at 256?

Debian's libmilter runs a worker pool (``_FFR_WORKERS_POOL``): a command that
finds no idle worker starts a thread, and a worker that finds two others idle
ends (``MIN_IDLE`` is 1 in ``libmilter/worker.c``).  At 256 connections that
is about one thread started and ended per session (``bench/syscalls.py``).
Here libmilter 8.17.1.9, the version Debian 12 ships, is built from Debian's
source tarball twice with Debian's pool flags (``-DSM_CONF_POLL=1
-D_FFR_WORKERS_POOL=1``): once as shipped, once keeping up to 64 idle
workers.  Each filter (the no-op C and no-op pymilter filters, heloguard) runs
on both builds (``LD_LIBRARY_PATH``; the soname is the same), pinned as in
``bench/pinned.py``: the filter on core 1, the load generator on core 0, each
filter's cells at 8, 64 and 256 back to back, round after round.  The build
as shipped is the control: the same compile, one constant apart (Debian's
own library is in ``bench/pinned.py``'s table).

Needs a C compiler and libmilter's build inputs (``make deps-build``) and
``deb.debian.org`` over HTTPS, once: the tarball is checked against its
SHA-256 and kept in ``.cache/libmilter/``.  Run alone: ``python bench/pool.py``
(or ``python bench/run.py pool``, which splices the section into
``docs/benchmarks.md``).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import pinned
import protocol
from common import ROOT, TESTS, median

from dnsserver import DNSServer

VERSION = "8.17.1.9"
SOURCE = f"https://deb.debian.org/debian/pool/main/s/sendmail/sendmail_{VERSION}.orig.tar.gz"
SHA256 = "bbe09120daa48e81f4b283dd54d8e2003fea68e525f218a9fa1126ccc977eed7"
SONAME = "libmilter.so.1.0.1"
KEPT_IDLE = 64
ROUNDS = protocol.THROUGHPUT_ROUNDS
# libmilter/Makefile.m4's sources, two of them from libsm
LIBMILTER = ["main", "engine", "listener", "worker", "handler", "comm", "smfi", "signal"]
SOURCES = [
    *(f"libmilter/{n}.c" for n in [*LIBMILTER, "sm_gethost", "monitor"]),
    "libsm/errstring.c",
    "libsm/strl.c",
]
# Debian's debian/build/site.config.m4.in for libmilter, and Makefile.m4's own
DEFINES = [
    "-DNOT_SENDMAIL",
    "-Dsm_snprintf=snprintf",
    "-DSM_CONF_POLL=1",
    "-D_FFR_WORKERS_POOL=1",
    "-DNETINET6=1",
    "-D_REENTRANT",
]
SHIPPED_IDLE = "#define MIN_IDLE\t1  /* minimum number of idle threads */"

AS_SHIPPED = "rebuilt as shipped"
KEEPING = f"rebuilt keeping {KEPT_IDLE} idle workers"


def _tarball() -> Path:
    cache = ROOT / ".cache" / "libmilter"
    cache.mkdir(parents=True, exist_ok=True)
    path = cache / SOURCE.rsplit("/", 1)[1]
    if not path.exists():
        part = path.with_suffix(".part")
        with urllib.request.urlopen(SOURCE, timeout=60) as r, part.open("wb") as out:
            shutil.copyfileobj(r, out)
        part.rename(path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != SHA256:
        path.unlink()
        raise RuntimeError(f"{path.name}: SHA-256 {digest}, expected {SHA256}")
    return path


def build(work: Path) -> dict[str, Path]:
    """The two libmilter builds, each a folder holding ``libmilter.so.1.0.1``."""
    src = work / "src"
    with tarfile.open(_tarball()) as tar:
        tar.extractall(src, filter="data")
    top = src / f"sendmail-{VERSION}"
    (top / "libmilter" / "sm_os.h").symlink_to(top / "include" / "sm" / "os" / "sm_os_linux.h")
    worker = top / "libmilter" / "worker.c"
    text = worker.read_text()
    if SHIPPED_IDLE not in text:
        raise RuntimeError("libmilter/worker.c: MIN_IDLE is not defined as expected")
    worker.write_text(text.replace(SHIPPED_IDLE, "#ifndef MIN_IDLE\n#define MIN_IDLE 1\n#endif"))
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise RuntimeError("no C compiler (make deps-build installs gcc)")
    flags = ["-O2", "-fPIC", "-pthread", f"-I{top / 'libmilter'}", f"-I{top / 'include'}"]
    flags += [f"-I{top / 'sendmail'}", *DEFINES]
    libs = {}
    for label, extra in ((AS_SHIPPED, []), (KEEPING, [f"-DMIN_IDLE={KEPT_IDLE}"])):
        out = work / label.replace(" ", "-")
        out.mkdir()
        objects = []
        for source in SOURCES:
            obj = out / (Path(source).stem + ".o")
            subprocess.run(
                [cc, *flags, *extra, "-c", str(top / source), "-o", str(obj)], check=True
            )
            objects.append(str(obj))
        subprocess.run(
            [cc, "-shared", "-pthread", f"-Wl,-soname,{SONAME}", "-o", str(out / SONAME), *objects],
            check=True,
        )
        libs[label] = out
    return libs


def run() -> str:
    """Measure and return the markdown section."""
    head = [
        "## libmilter's worker pool kept warm (`bench/pool.py`)",
        "",
        f"libmilter {VERSION} built from Debian's source as shipped and keeping up to",
        f"{KEPT_IDLE} idle workers (`MIN_IDLE`, 1 as shipped: a worker ends when it finds two",
        "others idle), each filter on both builds; pinned as in",
        f"`bench/pinned.py` (the filter on core 1, the load generator on core 0), {ROUNDS}",
        "rounds of each filter's cells at 8, 64 and 256 back to back.",
        "",
    ]
    if len(os.sched_getaffinity(0)) < 2 or shutil.which("taskset") is None:
        return "\n".join([*head, "Not measured: needs two cores and taskset (util-linux)."])
    work = Path(tempfile.mkdtemp(prefix="hg-bench-pool-"))
    try:
        libs = build(work)
    except (OSError, RuntimeError, subprocess.CalledProcessError, tarfile.TarError) as exc:
        shutil.rmtree(work, ignore_errors=True)
        return "\n".join([*head, f"Not measured: libmilter could not be built ({exc})."])
    cases = [protocol.case(i) for i in range(200)]
    threads: dict[str, int] = {}
    with DNSServer(TESTS / "zones") as dns:
        protocol.serve_clients(dns, 200)
        floor = {label: argv for label, argv, _ in protocol.noop_filters(work)}
        specs: list[protocol.Spec] = []
        for lib in (AS_SHIPPED, KEEPING):
            pin = ["taskset", "-c", "1", "env", f"LD_LIBRARY_PATH={libs[lib]}"]
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
        f"{n} {kept[f'{n}, {AS_SHIPPED}']:.2f} / "
        f"{kept[f'{n}, {KEEPING}']:.2f} (threads {threads[f'{n}, {AS_SHIPPED}']} / "
        f"{threads[f'{n}, {KEEPING}']})"
        for n in names
    )
    outside = [
        n
        for n in names
        if not min(rounds[f"{n}, {AS_SHIPPED}"])
        <= kept[f"{n}, {KEEPING}"]
        <= max(rounds[f"{n}, {AS_SHIPPED}"])
    ]
    if outside:
        verdict = (
            "keeping idle workers moved the share beyond the rounds as shipped for "
            + ", ".join(
                f"{n} ({kept[f'{n}, {AS_SHIPPED}']:.2f} -> {kept[f'{n}, {KEEPING}']:.2f})"
                for n in outside
            )
        )
    else:
        verdict = (
            "with idle workers kept, every filter's share lies within the range of its "
            "rounds as shipped: the threads libmilter starts and ends are not shown to "
            "cost the share at 256"
        )
    return "\n".join(
        [
            *head,
            *protocol.throughput_table(measured),
            "",
            "- Rate at 256 over the best at 8 or 64, median of the rounds, as shipped / "
            f"keeping {KEPT_IDLE} idle workers, and the threads alive after the last cell: "
            f"{each}.",
            f"- So {verdict}.",
        ]
    )


if __name__ == "__main__":
    print(run())
