"""Readable refusals: a bad recipe value is reported in two lines, not under the whole usage text.

jsonargparse validates every recipe value against its type (``PositiveFloat``, a ``Literal`` of preset names...) and,
on failure, prints the parser's usage (about a hundred lines for a Lightning subcommand) followed by a nested report
of the union alternatives it tried. The one fact a user needs, which field, which value and which rule, sits at the
bottom. :class:`RecipeArgumentParser` (the Lightning CLI's parser class in ``dystream fit|validate|test|predict``)
prints that first::

    error: model.init_args.lr = -1 is refused: PositiveFloat requires v>0 (dystream.stages.vae.VAEStage; recipe
    recipes/vae.yaml, value from the command line)
    dystream fit --help lists every option; JSONARGPARSE_DEBUG=1 shows the parser's full report

The exit code stays 2 and ``--help`` is unchanged. Messages that are not about one value (an unknown option...) are
printed as they are, still without the usage. A class that refuses its arguments in ``__init__`` (its own checks,
DESIGN.md Style 5) is reported the same way by :func:`explain_instantiation`, without the traceback of jsonargparse's
instantiation.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NoReturn

from jsonargparse import ArgumentParser
from lightning.pytorch.cli import LightningArgumentParser

__all__ = ["RecipeArgumentParser", "Refusal", "explain", "explain_instantiation", "parse_refusal"]

_KEY = re.compile(r'^\s*(?:- )?Parser key "([^"]+)":\s*$')
_CLASS = re.compile(r"Problem with given class_path '([^']+)'")
_NESTED_VALUE = re.compile(r"Given value: NestedArg\(key='[^']*', val=(.+)\)\s*$")
# the rules jsonargparse states, most specific first: (pattern, rule, value group)
_RULES = (
    (re.compile(r"Not of type (\w+): (.+) does not conform to restriction (.+)$"), "{0} requires {2}", 1),
    (re.compile(r"Not of type (\w+): (.+)$"), "not a {0} ({1})", None),
    (re.compile(r"Expected a typing\.Literal\[(.+)\]\. Got value: (.+)$"), "must be one of {0}", 1),
    (re.compile(r"Expected a <class '(\w+)'>\. Got value: (.+)$"), "must be of type {0}", 1),
    (re.compile(r"Expected a (.+?)\. Got value: (.+)$"), "must be {0}", 1),
)


@dataclass(frozen=True)
class Refusal:
    """One refused value, from jsonargparse's report."""

    field: str  # dotted recipe path, e.g. model.init_args.lr
    value: str | None
    rule: str
    class_path: str | None


def parse_refusal(message: str) -> Refusal | None:
    """The field, value and rule of jsonargparse's report on one value; None for other errors."""
    lines = message.splitlines()
    keys: list[tuple[int, str]] = []  # (indent, key) of the nested "Parser key" lines, outermost first
    class_path = None
    rule_line = None
    for i, line in enumerate(lines):
        key = _KEY.match(line)
        if key:
            indent = len(line) - len(line.lstrip())
            keys = [k for k in keys if k[0] < indent] + [(indent, key.group(1))]
            rule_line = lines[i + 1].strip() if i + 1 < len(lines) else ""
            continue
        found = _CLASS.search(line)
        if found:
            class_path = found.group(1)
    if not keys or rule_line is None:
        return None
    parts = [keys[0][1]]
    if class_path is not None and len(keys) > 1:
        parts.append("init_args")  # the recipe layout of a subclass: model: {class_path, init_args: {...}}
    parts += [k for _, k in keys[1:]]
    value = None
    rule = rule_line
    for pattern, template, value_group in _RULES:
        found = pattern.match(rule_line)
        if found:
            rule = template.format(*found.groups())
            value = found.group(value_group + 1) if value_group is not None else None
            break
    if value is None:
        nested = _NESTED_VALUE.search(message)
        if nested:
            value = nested.group(1).strip("'\"")
    return Refusal(".".join(parts), value, rule, class_path)


def _recipes(argv: Sequence[str]) -> list[str]:
    """The --config / -c files of a command line."""
    out = []
    for i, arg in enumerate(argv):
        if arg in ("--config", "-c") and i + 1 < len(argv):
            out.append(argv[i + 1])
        elif arg.startswith("--config="):
            out.append(arg.split("=", 1)[1])
    return out


def _from_command_line(field: str, argv: Sequence[str]) -> bool:
    short = field.replace(".init_args.", ".")
    return any(a.split("=", 1)[0] in (f"--{field}", f"--{short}") for a in argv)


def explain(message: str, argv: Sequence[str], prog: str) -> str:
    """The short report of a refused command line (two lines for one bad value)."""
    tip = f"{prog} --help lists every option; JSONARGPARSE_DEBUG=1 shows the parser's full report"
    refusal = parse_refusal(message)
    if refusal is None:
        return f"error: {message.strip()}\n{tip}\n"
    where = [refusal.class_path] if refusal.class_path else []
    recipes = _recipes(argv)
    if recipes:
        where.append(f"recipe {', '.join(recipes)}")
    if _from_command_line(refusal.field, argv):
        where.append("value from the command line")
    shown = "" if refusal.value is None else f" = {refusal.value}"
    context = f" ({'; '.join(where)})" if where else ""
    return f"error: {refusal.field}{shown} is refused: {refusal.rule}{context}\n{tip}\n"


def explain_instantiation(exc: BaseException, argv: Sequence[str]) -> str | None:
    """The short report of a class that refused its recipe arguments in ``__init__`` (a ``ValueError`` the class
    raises, e.g. ``teacher_steps`` not divisible by ``student_steps``), which jsonargparse wraps into its union
    report while instantiating; None for any other exception (those keep their traceback)."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    message = str(exc)
    from_jsonargparse = tb is not None and "jsonargparse" in tb.tb_frame.f_code.co_filename
    if not (isinstance(exc, ValueError) and from_jsonargparse and message.startswith("Does not validate against")):
        return None
    reasons, current = [], None
    for line in message.splitlines():
        if line.startswith("  - "):
            current = [line[4:]]
            reasons.append(current)
        elif line.startswith("    ") and current is not None:
            current.append(line.strip())
        else:
            current = None
    reasons = [" ".join(r) for r in reasons if not r[0].startswith("Expected a <class 'NoneType'>")]
    if not reasons:
        return None
    class_path = re.search(r"class_path='([^']+)'", message)
    who = class_path.group(1) if class_path else "a recipe class"
    recipes = _recipes(argv)
    where = f" (recipe {', '.join(recipes)})" if recipes else ""
    prog = f"dystream {argv[0]}" if argv and not argv[0].startswith("-") else "dystream"
    return f"error: {who} refused its arguments: {reasons[0]}{where}\n{prog} --help lists every option\n"


class RecipeArgumentParser(LightningArgumentParser):
    """The Lightning CLI parser with a short, field-first error report (see the module docstring)."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error or os.environ.get("JSONARGPARSE_DEBUG"):
            ArgumentParser.error(self, message, ex)  # raises, as jsonargparse does for nested parsers and debugging
        argv = sys.argv[1:]  # dystream.cli.lightning_cli sets it to the parsed command line
        prog = f"dystream {argv[0]}" if argv and not argv[0].startswith("-") else "dystream"
        sys.stderr.write(explain(message, argv, prog))
        self.exit(2)
