"""The card's folders keep their names, but must never shadow pymilter.

milter/ is installed as `heloguard` and rules/ as `heloguard.rules`.
pymilter's C extension owns the top-level name `milter`; if our folder ever
wins that name (python run from the checkout without PYTHONSAFEPATH, a stray
sys.path entry, a namespace-package accident), every milter import breaks.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import os
import subprocess
import sys
from pathlib import Path

import heloguard
import heloguard.rules
from heloguard.rules import REGISTRY

ROOT = Path(__file__).resolve().parent.parent


def test_milter_is_pymilters_extension() -> None:
    import milter  # pymilter's C extension

    origin = Path(milter.__file__ or "")
    assert origin.name.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES)), origin
    assert ROOT / "milter" not in origin.parents
    assert hasattr(milter, "setconn"), "not libmilter's binding"


def test_milter_not_shadowed_from_checkout() -> None:
    """Run from the checkout's root, as `make` does: the extension still wins."""
    env = dict(os.environ, PYTHONSAFEPATH="1")
    out = subprocess.run(
        [sys.executable, "-c", "import milter; print(milter.__file__)"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert out.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES)), out


def test_package_names() -> None:
    assert heloguard.__name__ == "heloguard"
    assert heloguard.rules.__name__ == "heloguard.rules"
    assert Path(heloguard.__file__ or "").resolve().parent == ROOT / "milter"
    assert Path(heloguard.rules.__file__ or "").resolve().parent == ROOT / "rules"


def test_every_rule_module_is_registered() -> None:
    helpers = {"__init__", "base", "lookups"}
    modules = {p.stem for p in (ROOT / "rules").glob("*.py")} - helpers
    registered = {
        importlib.import_module(r.check.__module__).__name__.rsplit(".", 1)[1]
        for r in REGISTRY.values()
    }
    assert modules <= registered, f"rule modules missing from the registry: {modules - registered}"
    for name, rule in REGISTRY.items():
        assert rule.name == name
        assert rule.doc.strip(), f"{name} has no docstring"
        for word in ("Stage", "Replies", "Trust"):
            assert word in rule.doc, f"{name}'s docstring does not state its {word}"
