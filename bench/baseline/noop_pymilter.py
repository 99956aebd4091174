"""A no-op pymilter filter: the floor of the milter protocol in Python.

It hooks what heloguard hooks (connect, helo, envfrom, envrcpt, close),
declines the same callbacks in negotiation and answers CONTINUE to
everything, through pymilter's stock ``Milter.runmilter``.

Run: ``python bench/baseline/noop_pymilter.py unix:/path/to/socket``
"""

from __future__ import annotations

import sys
from typing import Any

import Milter


class Noop(Milter.Base):  # type: ignore[misc]  # pymilter has no type hints
    """One instance per connection; every callback continues."""

    def negotiate(self, opts: list[int]) -> int:
        # pymilter 1.0.5's own negotiate fails on Python 3 (see docs/operations.md);
        # decline what heloguard declines, as heloguard's adapter does
        opts[0] = 0
        opts[1] = opts[1] & ~self.protocol_mask()
        opts[2] = opts[3] = 0
        return int(Milter.CONTINUE)

    @Milter.noreply  # type: ignore[untyped-decorator]
    def connect(self, hostname: str, family: int, hostaddr: Any) -> int:
        return int(Milter.CONTINUE)

    def hello(self, hostname: str) -> int:
        return int(Milter.CONTINUE)

    def envfrom(self, sender: str, *params: str) -> int:
        return int(Milter.CONTINUE)

    def envrcpt(self, recipient: str, *params: str) -> int:
        return int(Milter.CONTINUE)

    def close(self) -> int:
        return int(Milter.CONTINUE)


def main() -> int:
    Milter.factory = Noop
    Milter.set_flags(0)
    Milter.runmilter("noop", sys.argv[1], timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
