"""docs/REFERENCE.md is what scripts/reference.py generates from the code: every config field and command flag.

The config tables must match exactly; the --help texts are compared by content (each flag and its help), as
argparse's layout differs between Python versions."""

import runpy
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "docs" / "REFERENCE.md"
script = runpy.run_path(str(ROOT / "scripts" / "reference.py"))
STALE = "docs/REFERENCE.md is stale: run python scripts/reference.py > docs/REFERENCE.md"


def test_the_config_tables_are_current():
    assert "\n".join(script["config_reference"]()) in REFERENCE.read_text(encoding="utf-8"), STALE


def test_every_command_flag_and_its_help_is_listed():
    text = REFERENCE.read_text(encoding="utf-8")
    for name, command in script["commands"]().items():
        start = text.index(f"### loraforge {name}\n")
        end = text.find("\n### ", start + 1)
        section = " ".join(text[start:end if end > 0 else None].split())
        assert " ".join((command.description or "").split()) in section, STALE
        for action in command._actions:
            for flag in action.option_strings:
                assert flag in section, f"{name} {flag}: {STALE}"
            assert " ".join((action.help or "").replace("%%", "%").split()) in section, f"{name} {action.dest}: {STALE}"
