"""Checkpoints an older loraforge wrote, resumed by this one (upgrade soak): the run goes on exactly as the
uninterrupted one, or one line says the checkpoint is an older loraforge's and what to do. The older files are
this version's checkpoints rewritten by hand in the older format (their manifest updated, as it was written)."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from helpers import stop_in_last_save

from loraforge.config import load_train_config
from loraforge.training.checkpoint import MANIFEST, TrainingError
from loraforge.utils.files import sha256_file
from loraforge.training.loop import train

AGAIN = "start the run over (--overwrite), or finish it with the loraforge that started it"
TOKENS_CHANGE = ("where the tokenizer has a chat template, an instruction record is now the template's conversation, "
                 "its answer ending with the template's end of turn, and a chat record is tokenized whole")


def run_args(tiny_dir, data_file, out) -> list[str]:
    return [f"model.name={tiny_dir}", f"data.train={data_file}", "data.eval_fraction=0", f"output_dir={out}",
            "lora.r=4", "lora.lora_dropout=0.1", "training.lr=1e-2", "training.max_steps=3", "training.batch_size=4",
            "training.precision=fp32", "model.dtype=fp32", "training.save_every=1", "training.keep_checkpoints=3",
            "training.seed=3"]


def as_older(out: Path, edit) -> None:
    """Every checkpoint of `out` with its trainer_state.json as `edit(state)` leaves it, and its manifest's entry."""
    for checkpoint in sorted((out / "checkpoints").iterdir()):
        file = checkpoint / "trainer_state.json"
        state = json.loads(file.read_text())
        edit(state)
        file.write_text(json.dumps(state, indent=1))
        manifest = json.loads((checkpoint / MANIFEST).read_text())
        manifest["files"]["trainer_state.json"] = {"bytes": file.stat().st_size, "sha256": sha256_file(file)}
        (checkpoint / MANIFEST).write_text(json.dumps(manifest, indent=1))


def adapter(out: Path) -> dict:
    return load_file(out / "adapter" / "adapter_model.safetensors")


def test_a_checkpoint_with_the_older_overflow_default_resumes_as_the_uninterrupted_run(tiny_dir, data_file,
                                                                                       tmp_path):
    """data.overflow's default was truncate until 2026-12-05, and a checkpoint keeps the whole config: every
    checkpoint of a loraforge before it was refused ("written with other settings (data.overflow: 'truncate' ->
    'auto') ... put them back as they were"), a setting the user never wrote. Its tokens are checked instead."""
    args = run_args(tiny_dir, data_file, tmp_path / "whole")
    train(load_train_config(None, args), progress=False)
    out = tmp_path / "run"
    stop_in_last_save(load_train_config(None, run_args(tiny_dir, data_file, out)))

    def older(state):
        state["config"]["data"]["overflow"] = "truncate"
        state.pop("tokens", None)  # written since this fix

    as_older(out, older)
    assert train(load_train_config(None, run_args(tiny_dir, data_file, out)), resume=True, progress=False).steps == 3
    whole, resumed = adapter(tmp_path / "whole"), adapter(out)
    assert whole.keys() == resumed.keys()
    for k in whole:
        torch.testing.assert_close(resumed[k], whole[k], rtol=0, atol=0)  # a resume recomputes exactly


def test_an_older_checkpoint_whose_tokens_differ_says_an_older_loraforge_may_have_tokenized_them(tiny_dir, data_file,
                                                                                                  tmp_path):
    """A checkpoint of loraforge before 2026-12-06 of instruction records: its fingerprint holds the tokens of their
    older rendering, so the resume said "the training data changed ... put the data back as it was" about files
    nobody had touched."""
    out = tmp_path / "run"
    stop_in_last_save(load_train_config(None, run_args(tiny_dir, data_file, out)))

    def older(state):
        state["data"][0]["sha256"] = "6540ed1017c16777a52929ecdd3ee6ad0bae4cc310046826e73889f32b197b52"  # a soak's
        state.pop("tokens", None)  # written since this fix

    as_older(out, older)
    with pytest.raises(TrainingError) as e:
        train(load_train_config(None, run_args(tiny_dir, data_file, out)), resume=True, progress=False)
    assert str(e.value) == (f"--resume: step-0000002 was written by an older loraforge, which may have tokenized the "
                            f"training data otherwise: the tokens differ from the ones it trained on (train.jsonl: as "
                            f"many examples (40), other tokens); if the files changed, put them back as they were; if "
                            f"not, this version reads them otherwise ({TOKENS_CHANGE}): {AGAIN}")


def test_an_older_checkpoint_of_text_cut_by_the_older_overflow_default_names_the_setting(tiny_dir, tmp_path):
    """Long text records of a loraforge before 2026-12-05 were truncated (data.overflow's default then), now cut
    into windows: the line names the setting, and with it put back the run resumes."""
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": " ".join(f"w{i}-{j}" for j in range(60))}) + "\n" for i in range(8)))
    out = tmp_path / "run"
    args = run_args(tiny_dir, data, out) + ["data.max_seq_len=32"]
    stop_in_last_save(load_train_config(None, args + ["data.overflow=truncate"]))
    as_older(out, lambda state: state.pop("tokens", None))
    with pytest.raises(TrainingError) as e:
        train(load_train_config(None, args), resume=True, progress=False)
    assert str(e.value).startswith("--resume: step-0000002 was written by an older loraforge, which may have "
                                   "tokenized the training data otherwise: the tokens differ from the ones it trained "
                                   "on (docs.jsonl: 8 examples then, ")
    assert ("as the settings that read it did (data.overflow: 'truncate' -> 'auto'); if the files or those settings "
            "changed, put them back as they were; if not, ") in str(e.value)
    assert train(load_train_config(None, args + ["data.overflow=truncate"]), resume=True, progress=False).steps == 3


def test_a_checkpoint_without_a_data_fingerprint_is_refused_not_resumed_on_other_tokens(tiny_dir, data_file,
                                                                                        tmp_path):
    """A checkpoint of loraforge before 2026-12-03 keeps no fingerprint of its tokens: it resumed silently, its
    remaining steps on instruction records rendered otherwise than its first ones."""
    out = tmp_path / "run"
    stop_in_last_save(load_train_config(None, run_args(tiny_dir, data_file, out)))
    as_older(out, lambda state: [state.pop(k, None) for k in ("data", "tokens")])
    with pytest.raises(TrainingError) as e:
        train(load_train_config(None, run_args(tiny_dir, data_file, out)), resume=True, progress=False)
    assert str(e.value) == (f"--resume: step-0000002 was written by an older loraforge, which kept no fingerprint of "
                            f"the tokens it trained on, and this one may tokenize the data otherwise "
                            f"({TOKENS_CHANGE}): its place in the data cannot be checked; {AGAIN}")


def test_a_dora_checkpoint_with_the_older_optimizer_groups_is_one_line_not_a_traceback(tiny_dir, data_file,
                                                                                       tmp_path):
    """Before 2026-12-03 DoRA's magnitudes sat in the optimizer's undecayed group (its 1-D parameters), now in the
    decayed one: such a checkpoint ended --resume in torch's ValueError traceback ("loaded state dict contains a
    parameter group that doesn't match the size of optimizer's group")."""
    out = tmp_path / "run"
    args = run_args(tiny_dir, data_file, out) + ["lora.use_dora=true"]
    stop_in_last_save(load_train_config(None, args))

    def older(state):  # each DoRA layer's parameters: lora_A, lora_B, then the magnitude (1-D)
        decayed = state["param_groups"][0]["params"]
        state["param_groups"][0]["params"] = [p for i, p in enumerate(decayed) if i % 3 != 2]
        state["param_groups"][1]["params"] = [p for i, p in enumerate(decayed) if i % 3 == 2]

    as_older(out, older)
    with pytest.raises(TrainingError) as e:
        train(load_train_config(None, args), resume=True, progress=False)
    assert str(e.value) == (f"checkpoint {out / 'checkpoints' / 'step-0000002'} keeps its optimizer's state in groups "
                            f"of [16, 8] parameters, this run's optimizer has [24, 0]: an older loraforge grouped "
                            f"them otherwise (DoRA's magnitudes are weight-decayed since 2026-12-03), so its state "
                            f"cannot continue here; {AGAIN}")
