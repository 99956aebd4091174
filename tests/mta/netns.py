"""Enter a network namespace for a moment, to create sockets that live in it.

A socket belongs to the network namespace of the thread that created it, for its
whole life, whatever namespace that thread moves to afterwards.  So a test can
reach a daemon that runs in a private namespace (see ``sendmail.PrivateSendmail``)
without running any code of its own inside that namespace:

    with entered(sendmail.netns_path):
        sock = socket.create_connection(("127.0.0.1", 25))
    # sock still talks inside the namespace; this thread is back home

Python 3.11 has no ``os.setns``, so this calls libc's ``setns(2)`` through ctypes.
Needs CAP_SYS_ADMIN (root).  Only the calling thread moves; threads started
inside the ``with`` block start in the namespace and stay there.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterator
from contextlib import contextmanager

CLONE_NEWNET = 0x40000000

_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    """setns - move the calling thread into the network namespace open as fd."""
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


@contextmanager
def entered(netns_path: str | os.PathLike[str] | None) -> Iterator[None]:
    """Run the block with this thread in the network namespace at netns_path.

    ``None`` means "stay where you are", so callers can pass an optional path.
    The path is anything that opens as a namespace: ``/proc/PID/ns/net`` or a
    file under ``/run/netns``.
    """
    if netns_path is None:
        yield
        return
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        target = os.open(netns_path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            _setns(target)
        finally:
            os.close(target)
        try:
            yield
        finally:
            _setns(home)
    finally:
        os.close(home)
