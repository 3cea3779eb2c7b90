"""The documentation read literally: what README.md says a run's config holds against the frozen dataclasses.

docs/REFERENCE.md is generated from the code (tests/test_cli.py checks it is current); the README's own summary of
the config ("### Training config") is written by hand, and a soak found two training fields missing from it.
"""

import dataclasses
import re
import typing
from pathlib import Path

from loraforge import AdaLoraConfig
from loraforge.config import DataConfig, LoraConfig, ModelConfig, TrainConfig, TrainingConfig
from loraforge.training.checkpoint import RESUME_FREE, RESUME_WARNED, SCHEDULE_FIELDS
from loraforge.ui import runs

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = {"model": ModelConfig, "lora": LoraConfig, "adalora": AdaLoraConfig, "data": DataConfig,
            "training": TrainingConfig}
COMPLETE = ("model", "data", "training")  # listed whole; lora ends with "...", adalora names its schedule only


def top_level(text: str) -> str:
    """`text` without what nested parentheses and backticks hold."""
    text = re.sub(r"`[^`]*`", "", text)
    while (inner := re.sub(r"\([^()]*\)", "", text)) != text:
        text = inner
    return text


def readme_sections() -> dict[str, list[str]]:
    """{section: the field names the README's "Sections:" sentence lists for it, in order}."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    config = readme[readme.index("### Training config"):]
    listing = " ".join(config[config.index("Sections:"):config.index("and `output_dir`")].split())
    found = {}
    for m in re.finditer(r"`(\w+)` \(", listing):
        depth, start = 1, m.end()
        end = start
        while depth:
            depth += {"(": 1, ")": -1}.get(listing[end], 0)
            end += 1
        items = re.split(r"[,;]", top_level(listing[start:end - 1]).replace("PEFT's names:", ""))
        names = [piece.split(":")[0].strip() for item in items for piece in item.split(" or ")]
        found[m.group(1)] = [n for n in names if re.fullmatch(r"[a-z][A-Za-z0-9_]*", n)]
    return found


def test_the_readme_lists_every_config_field_that_exists():
    listed = readme_sections()
    methods = typing.get_args(typing.get_type_hints(TrainConfig)["method"])
    assert listed.pop("method") == list(methods)
    assert set(listed) == set(SECTIONS), listed
    problems = []
    for section, cls in SECTIONS.items():
        fields = [f.name for f in dataclasses.fields(cls)]
        problems += [f"{section}.{name}: in README.md, not a field" for name in listed[section] if name not in fields]
        if section in COMPLETE:
            problems += [f"{section}.{name}: a field README.md does not list" for name in fields
                         if name not in listed[section]]
    assert problems == []


def test_the_readme_names_every_setting_a_resume_may_change():
    """README's "What may change" on --resume against RESUME_FREE: each name it gives may change, and every setting
    that may change without naming a count or schedule (those have sentences of their own) is named."""
    readme = " ".join((ROOT / "README.md").read_text(encoding="utf-8").split())
    sentence = readme[readme.index("What may change:"):]
    sentence = sentence[:sentence.index("with a warning")]
    named = set(re.findall(r"`([\w.*]+)`", sentence))
    may = {key.split(".", 1)[1] for key in RESUME_FREE | set(RESUME_WARNED) if key.startswith("training.")}
    said = {name.removeprefix("training.") for name in named if not name.startswith("model.")}
    assert {n for n in said if not any(re.fullmatch(n.replace("*", r"\w+"), m) for m in may)} == set()
    counted = {"eval_every", "save_every", "log_every", "keep_checkpoints",  # "how often it evaluates, saves and logs"
               "epochs", "max_steps", "batch_size", "batch_tokens", "gradient_accumulation", "init_adapter"}
    schedule = {key.split(".", 1)[1] for key in SCHEDULE_FIELDS}
    unsaid = {m for m in may - counted - schedule if not any(re.fullmatch(n.replace("*", r"\w+"), m) for n in said)}
    assert unsaid == set()
    assert {name for name in named if name.startswith("model.")} <= set(RESUME_WARNED) | RESUME_FREE


def bash_lines(path: Path) -> list[str]:
    """The command lines of a markdown file's ```bash blocks, continuation lines joined, comments dropped."""
    text = path.read_text(encoding="utf-8")
    blocks = re.findall(r"^```bash\n(.*?)^```", text, re.M | re.S)
    lines = "\n".join(blocks).replace("\\\n", " ").splitlines()
    return [line.split("  #")[0].strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def test_the_inputs_the_readmes_commands_name_are_in_the_repository():
    """Run from the repository's root (as the README says), each shipped config, dataset and --data-dir a command
    names exists: `loraforge ui --data-dir data` was an error (no such folder) for everyone who copied it."""
    inputs = []
    for line in bash_lines(ROOT / "README.md"):
        words = line.split()
        inputs += [w for w in words if w.startswith(("examples/", "loraforge/assets/"))]
        inputs += [words[i + 1] for i, w in enumerate(words[:-1]) if w == "--data-dir"]
    assert [path for path in inputs if not (ROOT / path).exists()] == []
    assert "examples/demo.yaml" in inputs and "loraforge/assets/demo_test.jsonl" in inputs  # the lines were read


def test_the_readme_names_every_status_the_dashboard_shows():
    """The README listed running, finished, stopped and failed; a run started in a terminal and stopped there read
    "unknown" on the page, a status it did not name."""
    shown = re.findall(r"^- (\w+): ", runs.__doc__, re.M)
    assert shown == ["running", "finished", "stopped", "failed", "unknown"]
    readme = " ".join((ROOT / "README.md").read_text(encoding="utf-8").split())
    listing = readme[readme.index("every run with its status ("):]
    listing = listing[:listing.index("from the files it writes")]
    assert [status for status in shown if not re.search(rf"\b{status}\b", listing)] == []
