"""Paths and files as users' machines have them: a path typed in a config or on the command line that names nothing
(the message names what is there under a name that differs only in its Unicode form, NFD as macOS writes names, in
case, or in its separators, Windows'), JSON files saved by Windows editors (a byte-order mark), and a base's
pickled pytorch_model.bin (read as plain tensors only)."""

import codecs
import json
import os
import unicodedata

import pytest
import torch

import loraforge.models as M
from loraforge.config import ConfigError, LoraConfig, load_train_config
from loraforge.lora.adapters import AdapterError, read_adapter_json, save_adapter
from loraforge.lora.inject import inject
from loraforge.training.data import DataError, read_records
from helpers import tiny_llama

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


@pytest.mark.parametrize("encoding, codec", [("UTF-8", "utf-8-sig"), ("UTF-16", "utf-16")])
def test_a_model_or_adapter_config_with_a_byte_order_mark_says_so(tmp_path, encoding, codec):
    """Soak: a config.json saved by a Windows editor with a byte-order mark passed the model check (json.loads of
    bytes skips it) and was transformers' "its weights cannot be read ... not a valid JSON file"; an
    adapter_config.json was "Unexpected UTF-8 BOM (decode using utf-8-sig)" or "not UTF-8 text (byte 0)". Neither
    transformers nor PEFT reads either file."""
    model = tmp_path / "model"
    tiny_llama().save_pretrained(model)
    config = model / "config.json"
    config.write_bytes(config.read_text().encode(codec))
    assert config.read_bytes().startswith(codecs.BOM_UTF8 if encoding == "UTF-8" else codecs.BOM_UTF16)
    with pytest.raises(M.ModelFilesError) as e:
        M.resolve_model(str(model))
    assert str(e.value) == (f"model {model}: {config} starts with a {encoding} byte-order mark (as Windows editors "
                            f"write), which transformers does not read; save it as UTF-8 without one")
    save_adapter(inject(tiny_llama(), LoraConfig(r=4)), tmp_path / "ad")
    config = tmp_path / "ad" / "adapter_config.json"
    config.write_bytes(json.dumps(json.loads(config.read_text())).encode(codec))
    with pytest.raises(AdapterError) as e:
        read_adapter_json(tmp_path / "ad")
    assert str(e.value) == (f"{config} starts with a {encoding} byte-order mark (as Windows editors write), which PEFT "
                            f"does not read either; save it as UTF-8 without one")


class _Runs:
    """A pickled object whose unpickling would run a command (a .bin from an untrusted source)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_base_of_pickled_bin_weights_loads_only_plain_tensors_and_names_the_conversion(tmp_path):
    """The rule: only safetensors and JSON from users' files, never torch.load without weights_only=True. A base
    folder of pytorch_model.bin loads as transformers reads it, with weights_only=True said by us: a plain .bin gives
    the safetensors folder's model; one holding an object is refused (the object never runs), naming the file."""
    model = tiny_llama()
    model.save_pretrained(tmp_path / "st")
    model.save_pretrained(tmp_path / "bin")
    (tmp_path / "bin" / "model.safetensors").unlink()
    torch.save(model.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    ids = torch.arange(10).view(1, 10)
    torch.testing.assert_close(M.load_model(str(tmp_path / "bin"))(ids).logits,
                               M.load_model(str(tmp_path / "st"))(ids).logits, rtol=0, atol=0)
    marker = tmp_path / "ran"
    torch.save({**model.state_dict(), "x": _Runs(marker)}, tmp_path / "bin" / "pytorch_model.bin")
    with pytest.raises(M.ModelFilesError) as e:
        M.load_model(str(tmp_path / "bin"))
    assert not marker.exists()
    assert str(e.value).startswith(f"model {tmp_path / 'bin'}: its weights cannot be read from {tmp_path / 'bin'}: "
                                   f"pytorch_model.bin (a pickle) holds objects besides tensors (")
    assert "only if you trust where the file came from, convert it: python -c" in str(e.value)
