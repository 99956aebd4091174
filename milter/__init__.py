"""heloguard: turn spam bots away at EHLO time from DNS facts alone.

The folder ``milter/`` is installed as the package ``heloguard`` (pymilter's C
extension owns the top-level name ``milter``) and ``rules/`` as
``heloguard.rules``.
"""

__version__ = "0.1.0"
