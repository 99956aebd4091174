"""The documentation follows the code: rules, configuration keys, commands.

docs/rules.md, docs/man/heloguard.8 and docs/man/heloguard.toml.5 are
written by hand.  These tests fail when the code changes under them:

* every rule in the registry has a section in docs/rules.md, in evaluation
  order, with its stage, cost, default action, options and reply codes, and
  every rule section names a registered rule;
* every section and key that ``heloguard config check`` prints is an item of
  heloguard.toml(5), and every item there is a real key;
* every command and option of ``heloguard.cli.build_parser()`` is in
  heloguard(8), with the exit statuses the code uses;
* both man pages render without a warning.

The man pages follow two conventions that these tests rely on: a section of
the configuration is a ``.SS [name]`` heading and each key a ``.TP`` item
whose tag is ``.B key``; a command is a ``.SS "heloguard COMMAND"`` heading
and each option a ``.TP`` item whose tag names it.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from heloguard.cli import EX_CONFIG, EX_USAGE, build_parser
from heloguard.config import from_mapping
from heloguard.engine import Engine
from heloguard.render import EXIT_FOR_VERDICT
from heloguard.rules import REGISTRY
from heloguard.rules.base import Stage

ROOT = Path(__file__).resolve().parent.parent
RULES_MD = ROOT / "docs" / "rules.md"
MAN8 = ROOT / "docs" / "man" / "heloguard.8"
MAN5 = ROOT / "docs" / "man" / "heloguard.toml.5"
CONTRIB_TOML = ROOT / "contrib" / "heloguard.toml"
PHASES = ([Stage.CONNECT, Stage.HELO], [Stage.MAIL], [Stage.RCPT])
ALL_RULES = "[rules.NAME]"  # the heloguard.toml(5) section of the keys every rule takes
MAN_PACKAGES = "man-db and groff-base"


# -- helpers: docs/rules.md ------------------------------------------------------

_RULE_HEADING = re.compile(r"^(#{2,6}) `([A-Za-z0-9_]+)`\s*$", re.MULTILINE)
_ANY_HEADING = re.compile(r"^#{1,6} ", re.MULTILINE)


def rule_sections() -> list[tuple[str, str]]:
    """(rule name, section text) for every heading that is a single code span."""
    text = RULES_MD.read_text(encoding="utf-8")
    out: list[tuple[str, str]] = []
    for m in _RULE_HEADING.finditer(text):
        rest = text[m.end() :]
        end = _ANY_HEADING.search(rest)
        out.append((m.group(2), rest[: end.start()] if end else rest))
    return out


def facts(section: str) -> dict[str, str]:
    """The two-column ``| fact | value |`` table of a rule section."""
    rows = re.findall(r"^\| ([A-Z][a-z ]+) \| (.+) \|\s*$", section, re.MULTILINE)
    return {k: v for k, v in rows if k != "fact"}


def evaluation_order() -> list[str]:
    """The rules in the order the engine evaluates them, every rule switched on."""
    config = from_mapping({"rules": {name: {"action": "reject"} for name in REGISTRY}})
    engine = Engine(config)
    return [name for phase in PHASES for name in engine.rules_for(phase)]


def literal_replies(path: Path) -> set[str]:
    """Every ``Reply(CODE, "STATUS", ...)`` with literal code and status in a module."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id == "Reply"
            and len(node.args) >= 2
            and isinstance(code := node.args[0], ast.Constant)
            and isinstance(code.value, int)
            and isinstance(status := node.args[1], ast.Constant)
            and isinstance(status.value, str)
        ):
            found.add(f"{code.value} {status.value}")
    return found


def module_file(module: str) -> Path:
    """The source file of a heloguard module (``heloguard.rules.ptr`` is rules/ptr.py)."""
    mod = sys.modules[module]
    assert mod.__file__ is not None
    return Path(mod.__file__)


# -- helpers: man pages -------------------------------------------------------------


def plain(troff: str) -> str:
    """Man page source with font changes and the usual escapes removed."""
    text = re.sub(r"\\f[BIRP]|\\f\[[A-Z]*\]|\\&", "", troff)
    for escape, char in (("\\-", "-"), ("\\(dq", '"'), ("\\(aq", "'"), ("\\e", "\\")):
        text = text.replace(escape, char)
    return text


def subsections(path: Path) -> dict[str, str]:
    """``.SS`` heading (quotes removed) -> the source up to the next heading."""
    source = path.read_text(encoding="utf-8")
    out: dict[str, str] = {}
    parts = re.split(r"^(\.S[SH] .*)$", source, flags=re.MULTILINE)
    for heading, body in zip(parts[1::2], parts[2::2], strict=True):
        if heading.startswith(".SS "):
            out[heading[4:].strip().strip('"')] = body
        else:
            out[heading] = body
    return out


def item_tags(body: str) -> list[str]:
    """The tags of the ``.TP`` items in some man page source, made plain (macro and quotes gone)."""
    tags = re.findall(r"^\.TP[^\n]*\n([^\n]*)$", body, re.MULTILINE)
    return [plain(re.sub(r"^\.[A-Z]+ ", "", tag)).replace('"', "").strip() for tag in tags]


def item_keys(body: str) -> set[str]:
    """Configuration keys: ``.TP`` items whose tag is ``.B key``."""
    return set(re.findall(r"^\.TP[^\n]*\n\.B ([a-z0-9_]+)\s*$", body, re.MULTILINE))


def man_section(path: Path, title: str) -> str:
    """The source of one ``.SH`` section."""
    return subsections(path)[f".SH {title}"]


# -- helpers: the code --------------------------------------------------------------


def config_check(*args: str) -> dict[str, list[str]]:
    """Sections and keys printed by ``heloguard config check``, run as an admin would."""
    proc = subprocess.run(
        [sys.executable, "-m", "heloguard.cli", "config", "check", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(os.environ, PYTHONSAFEPATH="1"),
        cwd=ROOT,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    sections: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in proc.stdout.splitlines():
        if m := re.fullmatch(r"\[([A-Za-z0-9_.]+)\]", line):
            current = sections.setdefault(m.group(1), [])
        elif (m := re.fullmatch(r"([A-Za-z0-9_]+) = .*", line)) and current is not None:
            current.append(m.group(1))
    assert sections, proc.stdout
    return sections


@pytest.fixture(scope="module")
def printed_keys() -> dict[str, set[str]]:
    """The embedded defaults, plus contrib's example (which turns [greylist] on)."""
    merged: dict[str, set[str]] = {}
    for args in ((), ("--config", str(CONTRIB_TOML))):
        for section, keys in config_check(*args).items():
            merged.setdefault(section, set()).update(keys)
    assert "greylist" in merged, "contrib/heloguard.toml should have a [greylist] section"
    return merged


def commands(
    parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    """Every command path (``("config", "check")``) and its parser, depth first."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                path = (*prefix, name)
                yield path, sub
                yield from commands(sub, path)


def options(parser: argparse.ArgumentParser) -> list[str]:
    """A command's option strings, --help left out."""
    return [
        opt
        for action in parser._actions
        if not isinstance(action, argparse._HelpAction)
        for opt in action.option_strings
    ]


COMMANDS = sorted(commands(build_parser()), key=lambda c: c[0])


# -- docs/rules.md ------------------------------------------------------------------


def test_every_registered_rule_has_a_section() -> None:
    named = [name for name, _ in rule_sections()]
    missing = sorted(set(REGISTRY) - set(named))
    assert not missing, f"rules without a section in docs/rules.md: {missing}"


def test_every_rule_section_names_a_registered_rule() -> None:
    named = [name for name, _ in rule_sections()]
    unknown = sorted(set(named) - set(REGISTRY))
    assert not unknown, f"sections of docs/rules.md naming no registered rule: {unknown}"
    duplicated = sorted({n for n in named if named.count(n) > 1})
    assert not duplicated, f"rules with more than one section: {duplicated}"


def test_rule_sections_are_in_evaluation_order() -> None:
    assert [name for name, _ in rule_sections()] == evaluation_order()


def test_glance_table_matches_the_registry() -> None:
    text = RULES_MD.read_text(encoding="utf-8")
    rows = re.findall(
        r"^\| \d+ \| `([a-z0-9_]+)` \| (\w+) \| (\d+) \| (\w+)", text, flags=re.MULTILINE
    )
    assert [r[0] for r in rows] == evaluation_order(), "the 'At a glance' table's order"
    for name, stage, cost, action in rows:
        rule = REGISTRY[name]
        assert (stage, int(cost), action) == (rule.stage.word, rule.cost, rule.default_action), name


@pytest.mark.parametrize("name", list(REGISTRY))
def test_rule_section_states_stage_cost_and_default_action(name: str) -> None:
    rule = REGISTRY[name]
    section = dict(rule_sections())[name]
    table = facts(section)
    assert table.get("Stage", "").split()[0] == rule.stage.word, table
    assert int(table.get("Cost", "-1").split()[0]) == rule.cost, table
    assert table.get("Default action", "").split()[0] == rule.default_action, table


@pytest.mark.parametrize("name", list(REGISTRY))
def test_rule_section_lists_exactly_the_rule_options(name: str) -> None:
    rule = REGISTRY[name]
    fields = {f.name for f in dataclasses.fields(rule.options)}
    # an option is a code span followed by its description in parentheses: `zones` (list, ...)
    row = facts(dict(rule_sections())[name])["Options"]
    listed = set(re.findall(r"`([a-z][a-z0-9_]*)` \(", row))
    assert listed == fields, f"{name}: documented {sorted(listed)}, code has {sorted(fields)}"


def test_every_reply_code_of_a_rule_module_is_documented() -> None:
    sections = dict(rule_sections())
    by_module: dict[str, list[str]] = {}
    for name, rule in REGISTRY.items():
        by_module.setdefault(rule.check.__module__, []).append(name)
    for module, names in by_module.items():
        text = "".join(sections[n] for n in names)
        missing = sorted(r for r in literal_replies(module_file(module)) if r not in text)
        assert not missing, f"replies of {module} not in the sections of {names}: {missing}"


def test_engine_and_greylist_replies_are_documented() -> None:
    text = RULES_MD.read_text(encoding="utf-8")
    for module in ("heloguard.engine", "heloguard.greylist"):
        missing = sorted(r for r in literal_replies(module_file(module)) if r not in text)
        assert not missing, f"replies of {module} not in docs/rules.md: {missing}"


# -- heloguard.toml(5) --------------------------------------------------------------


def test_every_printed_section_and_key_is_in_the_config_man_page(
    printed_keys: dict[str, set[str]],
) -> None:
    documented = {name.strip("[]"): item_keys(body) for name, body in subsections(MAN5).items()}
    common = documented.get(ALL_RULES.strip("[]"), set())
    for section, keys in printed_keys.items():
        assert section in documented, f"no .SS [{section}] in {MAN5.name}"
        shared = common if section.startswith("rules.") else set()
        missing = sorted(keys - documented[section] - shared)
        assert not missing, f"[{section}]: keys missing from {MAN5.name}: {missing}"


def test_every_documented_key_exists(printed_keys: dict[str, set[str]]) -> None:
    for name, body in subsections(MAN5).items():
        if not name.startswith("["):
            continue
        section, keys = name.strip("[]"), item_keys(body)
        if name == ALL_RULES:
            every_rule = [v for k, v in printed_keys.items() if k.startswith("rules.")]
            real = set.intersection(*every_rule)
        else:
            assert section in printed_keys, (
                f"{MAN5.name} documents [{section}], which is no section"
            )
            real = printed_keys[section]
        unknown = sorted(keys - real)
        assert not unknown, f"{MAN5.name} [{section}] documents keys that do not exist: {unknown}"


def test_config_man_page_example_is_valid(tmp_path: Path) -> None:
    body = man_section(MAN5, "EXAMPLES")
    example = re.search(r"^\.nf\n(.*?)^\.fi$", body, re.MULTILINE | re.DOTALL)
    assert example is not None, "no .nf/.fi example in EXAMPLES"
    config = tmp_path / "example.toml"
    config.write_text(plain(example.group(1)), encoding="utf-8")
    config_check("--config", str(config))


# -- heloguard(8) -------------------------------------------------------------------


@pytest.mark.parametrize("path", [c[0] for c in COMMANDS], ids=" ".join)
def test_every_command_is_in_the_man_page(path: tuple[str, ...]) -> None:
    text = " ".join(plain(MAN8.read_text(encoding="utf-8")).split())
    assert f"heloguard {' '.join(path)}" in text, f"heloguard {' '.join(path)}"


@pytest.mark.parametrize("path", [p for p, parser in COMMANDS if options(parser)], ids=" ".join)
def test_every_option_is_an_item_of_its_command(path: tuple[str, ...]) -> None:
    parser = dict(COMMANDS)[path]
    sections = subsections(MAN8)
    heading = f"heloguard {' '.join(path)}"
    assert heading in sections, f'no .SS "{heading}" in {MAN8.name}'
    tags = item_tags(sections[heading]) + item_tags(sections[".SH COMMON OPTIONS"])
    for opt in options(parser):
        assert any(re.search(rf"(?<![\w-]){re.escape(opt)}(?![\w-])", t) for t in tags), (
            f"{heading}: option {opt} is not a .TP item"
        )


def test_check_flags_are_all_documented() -> None:
    check = dict(COMMANDS)[("check",)]
    text = plain(MAN8.read_text(encoding="utf-8"))
    for flag in ("--replay", "--batch", "--json", "--ptr", "--rules", *options(check)):
        assert flag in text, flag


def test_exit_statuses_are_documented() -> None:
    codes = {0, 1, EX_USAGE, EX_CONFIG, *EXIT_FOR_VERDICT.values()}
    documented = {int(t) for t in item_tags(man_section(MAN8, "EXIT STATUS")) if t.isdigit()}
    assert documented == codes


# -- rendering ----------------------------------------------------------------------


@pytest.mark.parametrize("page", [MAN8, MAN5], ids=lambda p: p.name)
def test_man_page_renders_without_warnings(page: Path) -> None:
    man = shutil.which("man")
    if man is None:
        reason = f"man(1) is not installed (Debian packages {MAN_PACKAGES})"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason}; CI=true requires it")
        pytest.skip(reason)
    env = dict(os.environ, LC_ALL="C.UTF-8", MANWIDTH="80", MANPAGER="cat", PAGER="cat")
    proc = subprocess.run(
        [man, "--warnings", "-E", "UTF-8", "-l", str(page)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "", proc.stderr
    assert "heloguard" in proc.stdout


def test_every_encoding_example_in_rules_md_is_read() -> None:
    """The generic rule's table of address encodings: each example is generic for its address."""
    import ipaddress

    from heloguard.hostclass import classify

    text = RULES_MD.read_text(encoding="utf-8")
    table = text[text.index("**Address encodings read**") :]
    table = table[: table.index("\n\n", table.index("| encoding"))]
    checked = 0
    for line in table.splitlines()[3:]:
        pending: list[str] = []
        for name, addr in re.findall(r"`([^`]+)`(?:\s*\[([^\]]+)\])?", line.split("|")[2]):
            pending.append(name)
            if addr:
                for n in pending:
                    v = classify(n, ipaddress.ip_address(addr))
                    assert v.generic and v.kind == "address", (n, addr, v)
                    checked += 1
                pending = []
        assert not pending, f"an example without its address: {pending}"
    assert checked >= 20
