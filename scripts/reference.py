"""docs/REFERENCE.md: every config field (type, default, what it does) and every command's --help, generated from
the code so the reference cannot drift from it.

    python scripts/reference.py > docs/REFERENCE.md      # tests/test_reference.py checks the file is current
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import os
import textwrap
import typing

from loraforge import config as C
from loraforge.cli import build_parser
from loraforge.lora.adalora import AdaLoraConfig

WIDTH = 100  # the --help texts are wrapped at this width whatever the terminal
SECTIONS = [  # (YAML section, dataclass, a note on the section)
    ("model", C.ModelConfig, ""),
    ("lora", C.LoraConfig, "Names and defaults as in PEFT's LoraConfig, except lora_alpha (16 here, 8 in PEFT: "
              "the usual 2·r at the default r 8); ignored (with a warning) for method: full."),
    ("adalora", AdaLoraConfig, "For method: adalora; names and defaults as in PEFT's AdaLoraConfig. total_step is "
                               "the run's step count (training.max_steps, or epochs × steps per epoch). In a run, "
                               "lora_alpha, lora_dropout, target_modules, exclude_modules, layers_to_transform, "
                               "layers_pattern and bias come from the lora: section (its defaults, e.g. lora_alpha "
                               "16) unless set here; the defaults below are AdaLoraConfig's in Python."),
    ("data", C.DataConfig, ""),
    ("data.train / data.eval entries", C.DataSource, "A list entry of data.train or data.eval: one source."),
    ("training", C.TrainingConfig, ""),
]


def field_docs(cls) -> dict[str, str]:
    """The attribute docstrings of a dataclass: the string right after `name: type = default`."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body, docs = tree.body[0].body, {}
    for node, after in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant):
            docs[node.target.id] = " ".join(str(after.value.value).split())
    return docs


def default_of(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        return repr(f.default) if not isinstance(f.default, tuple) else repr(list(f.default))
    if f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
        return repr(value) if not dataclasses.is_dataclass(value) else "(section)"
    return "required"


def type_of(cls, f: dataclasses.Field) -> str:
    hint = typing.get_type_hints(cls).get(f.name, f.type)
    text = str(hint).replace("typing.", "").replace("<class '", "").replace("'>", "")
    return text.replace("NoneType", "None")


def config_reference() -> list[str]:
    lines = ["## Config fields", "",
             "A run's YAML has the sections below plus `method` (lora, qlora, dora, adalora, full) and `output_dir`;",
             "any field can be set on the command line as `section.field=value` (the value read as YAML; an empty",
             "value, `data.eval=`, is null for a field that takes null and refused for any other; of a key given",
             "twice on the command line the last is used, with a warning).", ""]
    for name, cls, note in SECTIONS:
        lines += [f"### {name}", ""] + ([note, ""] if note else [])
        lines += ["| field | type | default | what it does |", "|---|---|---|---|"]
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            doc = docs.get(f.name, "").replace("|", "\\|")
            kind, default = type_of(cls, f).replace("|", "\\|"), default_of(f).replace("|", "\\|")
            lines.append(f"| `{f.name}` | `{kind}` | `{default}` | {doc} |")
        lines.append("")
    return lines


def command_reference() -> list[str]:
    lines = ["## Commands", "", "`loraforge COMMAND --help` prints the same.", ""]
    for name, command in commands().items():
        lines += [f"### loraforge {name}", "", "```text", help_text(command), "```", ""]
    return lines


def commands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


def help_text(command: argparse.ArgumentParser) -> str:
    """The command's --help at WIDTH columns (argparse wraps at the terminal's width, read from COLUMNS)."""
    before = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = str(WIDTH)
    try:
        return command.format_help().rstrip()
    finally:
        if before is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = before


def reference() -> str:
    head = ["# loraforge reference", "",
            "Generated from the code by `python scripts/reference.py > docs/REFERENCE.md` (a test checks that it is",
            "current). The README explains; this lists everything.", ""]
    return "\n".join(head + config_reference() + command_reference()).rstrip() + "\n"


if __name__ == "__main__":
    print(reference(), end="")
