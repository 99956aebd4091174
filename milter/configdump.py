"""The effective configuration printed back as TOML (``heloguard config check``)."""

from __future__ import annotations

import dataclasses
import json
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


def _table(name: str, obj: Any) -> list[str]:
    lines = [f"[{name}]"]
    for f in dataclasses.fields(obj):
        lines.append(f"{f.name} = {_value(getattr(obj, f.name))}")
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
