"""Build libmilter from sendmail's source, a thread per connection, for pymilter to link.

Debian's libmilter is built with ``-D_FFR_WORKERS_POOL=1``: one thread polls
every open connection and hands each command to a pool of worker threads,
under one mutex.  With hundreds of MTA connections open that poller walks
them all after every command, and a Python filter pays a GIL hand-over on
top of each hand-off, so its rate falls as connections grow
(``bench/pool.py`` measures both builds; ``docs/benchmarks.md``).  Built
without that flag, libmilter runs sendmail's own default: each connection
is served by its own thread, which reads the MTA's next command itself.

The source is Debian's copy of the sendmail release Debian ships
(``VERSION``), fetched once from deb.debian.org, checked against its
SHA-256 and kept in ``.cache/libmilter/``.  The sources and flags are
libmilter's own ``Makefile.m4`` and Debian's ``site.config.m4``, less the
worker pool.  The library keeps Debian's soname, so pymilter links it as it
would Debian's; the Makefile gives pymilter's build ``-L`` and a run path to
it (``make venv``).

    python contrib/libmilter.py DEST    # builds DEST/libmilter.so.1.0.1 (and libmilter.so)

Needs a C compiler and libmilter's headers (``make deps-build``: gcc,
libmilter-dev).
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".cache" / "libmilter"
VERSION = "8.17.1.9"
SOURCE = f"https://deb.debian.org/debian/pool/main/s/sendmail/sendmail_{VERSION}.orig.tar.gz"
SHA256 = "bbe09120daa48e81f4b283dd54d8e2003fea68e525f218a9fa1126ccc977eed7"
SONAME = "libmilter.so.1.0.1"
# libmilter/Makefile.m4's sources, two of them from libsm
LIBMILTER = ["main", "engine", "listener", "worker", "handler", "comm", "smfi", "signal"]
SOURCES = [
    *(f"libmilter/{n}.c" for n in [*LIBMILTER, "sm_gethost", "monitor"]),
    "libsm/errstring.c",
    "libsm/strl.c",
]
# Debian's debian/build/site.config.m4.in for libmilter and Makefile.m4's own,
# less -D_FFR_WORKERS_POOL=1 (WORKER_POOL below)
DEFINES = [
    "-DNOT_SENDMAIL",
    "-Dsm_snprintf=snprintf",
    "-DSM_CONF_POLL=1",
    "-DNETINET6=1",
    "-D_REENTRANT",
]
WORKER_POOL = "-D_FFR_WORKERS_POOL=1"  # Debian's build: one poller, a pool of workers


def tarball() -> Path:
    """sendmail's source tarball, fetched once and checked against its SHA-256."""
    CACHE.mkdir(parents=True, exist_ok=True)
    path = CACHE / SOURCE.rsplit("/", 1)[1]
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


def unpack(work: Path) -> Path:
    """The source tree under ``work``, ready to compile libmilter."""
    with tarfile.open(tarball()) as tar:
        tar.extractall(work, filter="data")
    top = work / f"sendmail-{VERSION}"
    (top / "libmilter" / "sm_os.h").symlink_to(top / "include" / "sm" / "os" / "sm_os_linux.h")
    return top


def compile_library(top: Path, out: Path, defines: Sequence[str]) -> Path:
    """Compile libmilter from the tree ``top`` into ``out``; return the library's path."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise RuntimeError("no C compiler (make deps-build installs gcc)")
    flags = ["-O2", "-fPIC", "-pthread", "-w"]
    flags += [f"-I{top / d}" for d in ("libmilter", "include", "sendmail")]
    out.mkdir(parents=True, exist_ok=True)
    objects = [out / (Path(source).stem + ".o") for source in SOURCES]
    for source, obj in zip(SOURCES, objects, strict=True):
        subprocess.run([cc, *flags, *defines, "-c", str(top / source), "-o", str(obj)], check=True)
    library = out / SONAME
    subprocess.run(
        [
            cc,
            "-shared",
            "-pthread",
            f"-Wl,-soname,{SONAME}",
            "-o",
            str(library),
            *map(str, objects),
        ],
        check=True,
    )
    for obj in objects:
        obj.unlink()
    link = out / "libmilter.so"  # what the linker's -lmilter finds
    link.unlink(missing_ok=True)
    link.symlink_to(SONAME)
    return library


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("dest", type=Path, help="folder for libmilter.so.1.0.1")
    args = parser.parse_args(argv)
    try:
        with tempfile.TemporaryDirectory(prefix="libmilter-") as work:
            library = compile_library(unpack(Path(work)), args.dest.resolve(), DEFINES)
    except (OSError, RuntimeError, subprocess.CalledProcessError, tarfile.TarError) as exc:
        print(f"libmilter: not built: {exc}", file=sys.stderr)
        return 1
    print(f"libmilter {VERSION}, a thread per connection: {library}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
