"""heloguard as an MTA that offers no macro requests would see it: what asking costs.

``HeloguardMilter.negotiate`` asks the MTA for ``{daemon_name}`` at connect and
``{auth_authen}`` at MAIL with two ``setsymlist`` calls; pymilter's C layer
lets go of the GIL around each, so every session hands the GIL over twice
more than the no-op pymilter does.  Here the MTA's offer is stripped of
``SETSYMLIST`` before heloguard's own ``negotiate`` reads it, so it asks for
nothing and the MTA's default macros apply.  Bench only: heloguard keeps
asking, because the submission and authenticated-sender spares must not
depend on how ``milter_connect_macros`` and ``milter_mail_macros`` are set.

Run: ``python bench/baseline/heloguard_no_macros.py serve --config FILE``
"""

from __future__ import annotations

import sys

import Milter

from heloguard import adapter, cli

_asking = adapter.HeloguardMilter.negotiate


def _not_asking(self: adapter.HeloguardMilter, opts: list[int]) -> int:
    opts[0] &= ~Milter.SETSYMLIST
    return _asking(self, opts)


if __name__ == "__main__":
    adapter.HeloguardMilter.negotiate = _not_asking  # type: ignore[method-assign]
    sys.exit(cli.main(sys.argv[1:]))
