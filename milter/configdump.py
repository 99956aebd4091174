"""The effective configuration printed back as TOML (``heloguard config check``)."""

from __future__ import annotations

import dataclasses
import json
import re
from enum import Enum
from typing import Any

from heloguard.config import Config


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, Enum):
        return json.dumps(v.value)
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, tuple | list):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    return json.dumps(str(v))


# A PostgreSQL password in a DSN, as a URI (user:secret@) or a keyword (password=secret).
_URI_PASSWORD = re.compile(r"(://[^:/@?#]*:)[^@/?#]*@")
_KEY_PASSWORD = re.compile(r"(\bpassword\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", re.IGNORECASE)


def redact_dsn(dsn: str) -> str:
    """A DSN as it may be printed: any password replaced by ``***``."""
    return _KEY_PASSWORD.sub(r"\1***", _URI_PASSWORD.sub(r"\1***@", dsn))


def _table(name: str, obj: Any) -> list[str]:
    lines = [f"[{name}]"]
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if f.name == "dsn" and isinstance(value, str):
            value = redact_dsn(value)
        lines.append(f"{f.name} = {_value(value)}")
    return lines


def dump(config: Config) -> str:
    """Every section with every key, defaults included."""
    lines = [f"# effective configuration from {config.source}"]
    for name in ("dns", "policy", "log", "milter", "exceptions", "metrics"):
        lines += ["", *_table(name, getattr(config, name))]
    if config.greylist is not None:
        lines += ["", *_table("greylist", config.greylist)]
    for name, section in config.extra.items():
        lines += ["", *_table(name, section)]
    for name, rule in config.rules.items():
        lines += ["", f"[rules.{name}]", f"action = {_value(rule.action)}"]
        for f in dataclasses.fields(rule.options):
            lines.append(f"{f.name} = {_value(getattr(rule.options, f.name))}")
    return "\n".join(lines) + "\n"
