"""A path typed in a config or on the command line that names nothing: the message names what is there under a name
that differs only in its Unicode form (NFD, as macOS writes names), in case, or in its separators (Windows')."""

import unicodedata

import pytest

import loraforge.models as M
from loraforge.config import ConfigError, load_train_config
from loraforge.lora.adapters import AdapterError, read_adapter_json
from loraforge.training.data import DataError, read_records

NFC, NFD = unicodedata.normalize("NFC", "café"), unicodedata.normalize("NFD", "café")
UNICODE = "in its Unicode form (NFD, as macOS writes names: an accent stored as a character of its own)"
RENAME = "or rename it to the composed form typed here (convmv -f utf8 -t utf8 --nfc --notest -r NAME)"


@pytest.fixture
def copied_from_a_mac(tmp_path, monkeypatch):
    """Names as a copy from a Mac (or a case-insensitive disk) leaves them; the current directory is tmp_path."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / f"{NFD}.jsonl").write_text('{"text": "x"}\n')
    (tmp_path / "Runs" / NFD / "adapter").mkdir(parents=True)
    (tmp_path / "Runs" / NFD / "adapter" / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    (tmp_path / "models" / "Tiny").mkdir(parents=True)
    (tmp_path / "models" / "Tiny" / "config.json").write_text("{}")
    (tmp_path / "Train.yaml").write_text("data: {train: x.jsonl}\n")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl").write_text('{"text": "x"}\n')
    return tmp_path


def test_a_missing_path_names_what_is_there_under_another_form_case_or_separator(copied_from_a_mac):
    """Soak: a data file, adapter, model or config whose name on disk is the NFD form of the NFC name typed (or
    differs in case, or was written C:\\-style) was only "no such file"; two names that look alike on screen."""
    assert NFC != NFD
    with pytest.raises(DataError) as e:
        read_records(f"{NFC}.jsonl")
    assert str(e.value) == (f"no such file: {NFC}.jsonl ({NFD}.jsonl is there: a name that differs {UNICODE} only; "
                            f"give its name as it is there, {RENAME})")
    with pytest.raises(AdapterError) as e:
        read_adapter_json(f"runs/{NFC}/adapter")
    assert str(e.value) == (f"no such adapter folder: runs/{NFC}/adapter (Runs/{NFD}/adapter is there: a name that "
                            f"differs in case and {UNICODE} only; give its name as it is there, {RENAME})")
    with pytest.raises(FileNotFoundError) as e:
        M.resolve_model("./models/tiny")
    assert str(e.value) == ("model './models/tiny' not found (models/Tiny is there: a name that differs in case only; "
                            "give its name as it is there, or rename it): give a transformers directory, a .gguf "
                            "file, a hub id, or a built-in name (smollm2-135m)")
    with pytest.raises(ConfigError) as e:
        load_train_config("train.yaml")
    assert e.value.problems == ["train.yaml: no such config file (Train.yaml is there: a name that differs in case "
                                "only; give its name as it is there, or rename it); give the path of a training YAML "
                                "file"]
    for typed, note in [("data\\train.jsonl", "write paths with '/': data/train.jsonl is there; '\\' is a character "
                                              "of a name here, not a separator"),
                        ("C:\\data\\train.jsonl", "a Windows path; give the path of the file on this machine, with "
                                                  "'/'"),
                        ("nothing.jsonl", f"relative paths are read from the current directory, {copied_from_a_mac}")]:
        with pytest.raises(DataError) as e:
            read_records(typed)
        assert str(e.value) == f"no such file: {typed} ({note})"


def test_a_missing_local_path_with_an_accented_letter_is_not_taken_for_a_hub_id(copied_from_a_mac):
    """Soak: `--model modèles/tiny` (no such folder) passed the hub-id check (\\w takes 'è'): huggingface_hub's
    HFValidationError traceback."""
    assert not M.is_hub_id("modèles/tiny") and M.is_hub_id("HuggingFaceTB/SmolLM2-135M-Instruct")
    with pytest.raises(FileNotFoundError, match=r"^model 'modèles/tiny' not found: give a transformers directory"):
        M.resolve_model("modèles/tiny")
