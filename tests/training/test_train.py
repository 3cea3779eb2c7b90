"""The training loop on a tiny model: loss normalisation, resume after SIGKILL, DDP equivalence, NaN stop."""

import dataclasses
import gc
import io
import json
import math
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import Gemma2Config, Gemma2ForCausalLM, OPTForCausalLM

from helpers import lr_at, opt_that_mixes_packed_rows, tiny_llama
from loraforge.config import ConfigError, load_train_config
from loraforge.models import load_tokenizer
from loraforge.training.loss import CausalLMLoss
from loraforge.training import data as D
from loraforge.training import report
from loraforge.training.loop import TrainingError, build_model, train
from loraforge.training.report import LOG_INTERVAL_S, peak_memory_mb, progress_bar, read_metrics

ROOT = Path(__file__).resolve().parents[2]


def config(tiny_dir, data_file, out, **training):
    t = {"lr": 1e-2, "max_steps": 6, "batch_size": 4, "precision": "fp32", "seed": 3, "warmup_steps": 2}
    t.update(training)
    over = [f"model.name={tiny_dir}", f"data.train={data_file}", "data.eval_fraction=0", f"output_dir={out}",
            "lora.r=4", "lora.lora_dropout=0.1"] + [f"training.{k}={v}" for k, v in t.items()]
    return load_train_config(None, over)


def adapter(out) -> dict:
    return load_file(Path(out) / "adapter" / "adapter_model.safetensors")


def assert_same_adapter(a, b, atol):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=atol)


def test_loss_module_equals_plain_cross_entropy():
    model = tiny_llama()
    torch.manual_seed(0)
    ids = torch.randint(0, 128, (2, 9))
    labels = ids.clone()
    labels[0, :4] = -100
    labels[1, 7:] = -100
    total, n = CausalLMLoss(model, chunk_size=3)({"input_ids": ids, "labels": labels})
    logits = model(ids).logits[:, :-1]
    expected = F.cross_entropy(logits.reshape(-1, 128), labels[:, 1:].reshape(-1), ignore_index=-100,
                               reduction="sum")
    assert n == (labels[:, 1:] != -100).sum()
    torch.testing.assert_close(total, expected)


def test_accumulation_equals_a_big_batch(tiny_dir, data_file, tmp_path):
    """Loss summed and divided by the step's supervised tokens: batch 1 × accumulation 4 trains like batch 4.

    Dropout off: its masks are drawn per micro-batch, so they differ between the two ways of batching. (Batch 4
    shares the rows' prompt prefix, batch 1 cannot.) The run closes the files it wrote.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        a = train(load_train_config(None, _no_dropout(tiny_dir, data_file, tmp_path / "a", 4, 1)), progress=False)
        gc.collect()
    assert not [w for w in caught if issubclass(w.category, ResourceWarning)], [str(w.message) for w in caught]
    b = train(load_train_config(None, _no_dropout(tiny_dir, data_file, tmp_path / "b", 1, 4)), progress=False)
    assert a.steps == b.steps == 4
    # Adam divides by sqrt(v): where a gradient entry is near zero, rounding-level differences between the two
    # summation orders are amplified; 1e-5 is still 1000x below one update (lr 1e-2). Mean-per-micro-batch
    # normalisation (the bug this guards against) moves weights by ~1e-3 here.
    assert_same_adapter(adapter(tmp_path / "a"), adapter(tmp_path / "b"), atol=1e-5)
    assert abs(a.final_loss - b.final_loss) < 1e-5


def _no_dropout(tiny_dir, data_file, out, batch, accum):
    return [f"model.name={tiny_dir}", f"data.train={data_file}", "data.eval_fraction=0", f"output_dir={out}",
            "lora.r=4", "training.lr=1e-2", "training.max_steps=4", f"training.batch_size={batch}",
            f"training.gradient_accumulation={accum}", "training.precision=fp32", "training.seed=3"]


def _cli(args, env=None, check=True):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "loraforge", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(proc.stderr[-3000:])
    return proc


def test_resume_after_sigkill_mid_save_ends_with_the_same_adapter(tiny_dir, data_file, tmp_path):
    base = [f"model.name={tiny_dir}", f"data.train={data_file}", "data.eval_fraction=0", "lora.r=4",
            "lora.lora_dropout=0.1", "training.lr=1e-2", "training.max_steps=6", "training.batch_size=4",
            "training.precision=fp32", "training.save_every=2", "training.seed=3"]
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("{}\n")
    _cli(["train", str(cfg_file), *base, f"output_dir={tmp_path / 'whole'}"])
    crashed = _cli(["train", str(cfg_file), *base, f"output_dir={tmp_path / 'cut'}"],
                   env={"LORAFORGE_TEST_CRASH_IN_SAVE": "4"}, check=False)
    assert crashed.returncode == -9  # killed while writing the step-4 checkpoint
    ckpts = tmp_path / "cut" / "checkpoints"
    assert (ckpts / "step-0000002").is_dir() and not (ckpts / "step-0000004").exists()
    assert [p.is_dir() for p in ckpts.glob(".tmp-step-0000004-*")] == [True]  # half-written: resume ignores it
    resumed = _cli(["train", str(cfg_file), *base, f"output_dir={tmp_path / 'cut'}", "--resume"])
    assert "resuming from" in resumed.stdout and "step 2/6" in resumed.stdout
    # dropout is on: equality needs the RNG state restored as well as weights, optimizer, schedule, data position
    assert_same_adapter(adapter(tmp_path / "whole"), adapter(tmp_path / "cut"), atol=1e-6)


def test_two_processes_train_like_one(tiny_dir, data_file, tmp_path):
    """torchrun, 2 CPU ranks (gloo) × batch 4 vs 1 process × batch 8: the same global batches. Each rank's 4 rows
    share their prompt's prefix (training.share_prefix: a second backbone pass inside the DDP-wrapped loss)."""
    common = [f"model.name={tiny_dir}", f"data.train={data_file}", "data.eval_fraction=0", "lora.r=4",
              "training.lr=1e-2", "training.max_steps=4", "training.precision=fp32", "training.seed=3",
              "training.share_prefix=true"]
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("{}\n")
    _cli(["train", str(cfg_file), *common, "training.batch_size=8", f"output_dir={tmp_path / 'one'}"])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533",
                           "-m", "loraforge", "train", str(cfg_file), *common, "training.batch_size=4",
                           f"output_dir={tmp_path / 'two'}"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # float sums in a different order (all-reduce): equal to rounding
    assert_same_adapter(adapter(tmp_path / "one"), adapter(tmp_path / "two"), atol=1e-5)



def test_compiled_training_with_aten_cpu_capability_set_ignores_a_graph_cached_at_another_width(tiny_dir, data_file,
                                                                                                 tmp_path):
    """AVX2 soak: inductor's on-disk graph cache is not keyed on the vector width ATEN_CPU_CAPABILITY picks, so a
    compiled run with the variable set (the README's way to try an AVX2-only CPU) reused a graph cached by a run
    without it: at avx2 a loss of NaN at step 1, at default a C++ build error. Two runs share one inductor cache; the
    second, at default (scalar code: another width on any CPU with AVX2 or better), equals the first's adapter."""
    common = [f"model.name={tiny_dir}", f"data.train={data_file}", "data.eval_fraction=0", "lora.r=4",
              "training.lr=1e-2", "training.max_steps=2", "training.precision=fp32", "training.compile=true"]
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("{}\n")
    env = {k: v for k, v in os.environ.items() if k != "ATEN_CPU_CAPABILITY"}
    env.update(OMP_NUM_THREADS="1", TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"))
    for name, isa in (("native", None), ("scalar", "default")):  # each compiles inductor's C++ afresh
        # did not hang: about 5 min each on 2 cores shared with other work (600 s timed out under load for no fault)
        proc = subprocess.run([sys.executable, "-m", "loraforge", "train", str(cfg_file), *common,
                               f"output_dir={tmp_path / name}"], cwd=ROOT, capture_output=True, text=True,
                              env=env if isa is None else {**env, "ATEN_CPU_CAPABILITY": isa}, timeout=3600)
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_adapter(adapter(tmp_path / "native"), adapter(tmp_path / "scalar"), atol=1e-4)

def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tiny_dir, data_file, tmp_path, monkeypatch):
    calls = {"n": 0}
    original = CausalLMLoss.forward

    def poisoned(self, batch):
        total, n = original(self, batch)
        calls["n"] += 1
        return (total * float("nan") if calls["n"] == 4 and self.training else total), n

    monkeypatch.setattr(CausalLMLoss, "forward", poisoned)
    with pytest.raises(TrainingError, match=r"loss is nan at step 4.*last good checkpoint is .*step-0000002"):
        train(config(tiny_dir, data_file, tmp_path / "nan", save_every=2), progress=False)
    assert (tmp_path / "nan" / "checkpoints" / "step-0000002").is_dir()


def test_bad_config_fails_before_any_work(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_train_config(None, ["data.train=x.jsonl", "training.lr=-1", "training.warmup=3", "model.dtype=fp8",
                                 "training.share_prefix=maybe", "training.batch_tokens=lots"])
    text = str(e.value)
    assert "training.lr: must be positive, got -1" in text
    assert "training.warmup: unknown field (did you mean 'warmup_steps'?)" in text
    assert "model.dtype: 'fp8' is not one of ['auto', 'fp32', 'bf16', 'fp16']" in text
    assert "training.share_prefix: expected true, false or 'auto', got 'maybe'" in text  # as the user writes values
    assert "training.batch_tokens: expected an integer or null, got 'lots'" in text
    with pytest.raises(ConfigError, match="write it as section.field=value"):
        load_train_config(None, ["training.lr"])


def test_qlora_method_trains_only_the_adapter_on_a_4bit_base(tmp_path, data_file):
    """method: qlora through the same loop: NF4 base (bitsandbytes on CPU), fp32 adapter, checkpointing on."""
    from loraforge.models import load_tokenizer

    tok = load_tokenizer("smollm2-135m")
    path = tmp_path / "tiny64"  # bnb's CPU 4-bit path needs in_features that are multiples of 64
    tiny_llama(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
               tie_word_embeddings=True).save_pretrained(path)
    tok.save_pretrained(path)
    cfg = load_train_config(None, [f"model.name={path}", f"data.train={data_file}", "method=qlora",
                                   "data.eval_fraction=0", f"output_dir={tmp_path / 'out'}", "training.max_steps=3",
                                   "training.batch_size=4", "lora.r=4", "training.lr=1e-2"])
    result = train(cfg, progress=False)
    weights = adapter(tmp_path / "out")
    assert result.steps == 3 and all(torch.isfinite(v).all() for v in weights.values())
    assert result.trainable_params == sum(v.numel() for v in weights.values())
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in weights.items())  # B moved off zero


def test_a_finished_run_is_not_overwritten_without_resume(tiny_dir, data_file, tmp_path):
    from loraforge.utils.outputs import OutputError

    cfg = config(tiny_dir, data_file, tmp_path / "run", max_steps=3)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, eval_fraction=0.25))  # an eval loss too
    first = train(cfg, progress=False)
    with pytest.raises(OutputError, match=r"holds a finished run \(3 steps\); pass --overwrite"):
        train(cfg, progress=False)
    again = train(cfg, resume=True, progress=False)  # nothing left to do: it ends at once
    # with the losses the run measured (a notebook's train(resume=True) returned nan and None)
    assert (again.steps, again.already_finished, again.final_loss, again.eval_loss) == \
        (3, True, first.final_loss, first.eval_loss)
    assert not first.already_finished
    assert math.isfinite(first.final_loss) and first.eval_loss is not None


def test_adalora_method_prunes_to_the_target_budget(tiny_dir, data_file, tmp_path):
    """method: adalora through the loop: the allocator runs after each step and the saved ranks meet target_r."""
    cfg = load_train_config(None, [f"model.name={tiny_dir}", f"data.train={data_file}", "method=adalora",
                                   "data.eval_fraction=0", f"output_dir={tmp_path / 'ada'}", "training.max_steps=4",
                                   "training.batch_size=4", "adalora.init_r=6", "adalora.target_r=2",
                                   "adalora.tinit=0", "adalora.tfinal=1", "adalora.deltaT=1"])
    train(cfg, progress=False)
    saved = json.loads((tmp_path / "ada" / "adapter" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "ADALORA" and saved["total_step"] == 4
    ranks = saved["rank_pattern"]
    # the budget is target_r per layer on average: the ranks kept add up to target_r × number of layers
    kept = sum(sum(bool(x) for x in v) if isinstance(v, list) else int(v) for v in ranks.values())
    assert kept == 2 * len(ranks)


def test_adalora_checkpoints_keep_the_importance_emas_as_tensors_and_resume_exactly(tiny_dir, data_file, tmp_path):
    """soak: AdaLoRA's checkpoints wrote the allocator's two importance EMAs (2× the adapter) into trainer_state.json
    as indented JSON lists: for SmolLM2-135M's 1.3M adapter values 71 MB, dumped in 29 s at every save of the
    budget phase (a 10 MB binary). They go to optimizer.safetensors now; a run resumed in its budget phase from
    such a checkpoint ends as the uninterrupted one, bit for bit (ranks kept, weights)."""
    args = [f"model.name={tiny_dir}", f"data.train={data_file}", "method=adalora", "data.eval_fraction=0",
            "training.max_steps=6", "training.batch_size=4", "training.lr=1e-2", "training.seed=3",
            "training.save_every=1", "training.keep_checkpoints=6", "lora.lora_dropout=0.1", "adalora.init_r=6",
            "adalora.target_r=2", "adalora.tinit=1", "adalora.tfinal=2", "adalora.deltaT=1"]
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    train(load_train_config(None, args + [f"output_dir={whole}"]), progress=False)
    step3 = whole / "checkpoints" / "step-0000003"  # in the budget phase: steps 2..3 re-allocate
    assert "exp_avg_ipt" not in json.loads((step3 / "trainer_state.json").read_text())["allocator"]
    emas = {k: v for k, v in load_file(step3 / "optimizer.safetensors").items() if k.startswith("adalora.")}
    weights = load_file(step3 / "trainable.safetensors")
    assert {k.split(".", 2)[2]: v.shape for k, v in emas.items() if k.startswith("adalora.exp_avg_unc.")} == {
        k.removesuffix(".default"): v.shape for k, v in weights.items()}  # one EMA per A, E and B, of its shape
    shutil.copytree(whole, cut)
    shutil.rmtree(cut / "adapter")
    for later in ("step-0000004", "step-0000005", "step-0000006"):
        shutil.rmtree(cut / "checkpoints" / later)
    train(load_train_config(None, args + [f"output_dir={cut}"]), resume=True, progress=False)
    assert json.loads((cut / "adapter" / "adapter_config.json").read_text())["rank_pattern"] == json.loads(
        (whole / "adapter" / "adapter_config.json").read_text())["rank_pattern"]
    assert_same_adapter(adapter(whole), adapter(cut), atol=0)


@pytest.mark.parametrize("packing", ["false", "true"])
def test_compiled_training_ends_with_the_same_adapter(tiny_dir, data_file, tmp_path, capsys, packing):
    """training.compile runs the same math through inductor: the adapter after 3 steps equals the eager one (which
    shares the rows' prompt prefix; the compiled loss does not, and says nothing of it). The compiled loss read the
    shared prefix's length and lean attention each batch's sequence starts: graph breaks that printed dynamo's
    20-line warning at the first step, and packed rows' starts were traced as constants: a compile for each batch
    (the built-in model's first packed step took 350 s, the second as long)."""
    from torch._dynamo.utils import counters

    counters.clear()
    runs = {}
    for flag in (False, True):
        out = tmp_path / f"compile-{flag}"
        train(load_train_config(None, [f"model.name={tiny_dir}", f"data.train={data_file}", "data.eval_fraction=0",
                                       f"output_dir={out}", "lora.r=4", "training.max_steps=3", "training.lr=1e-2",
                                       "training.precision=fp32", f"training.compile={str(flag).lower()}",
                                       f"data.packing={packing}"]),
              progress=False)
        runs[flag] = adapter(out)
        said = capsys.readouterr()
        assert ("rows share their first" in said.out) is (not flag and packing == "false")
        assert "Graph break" not in said.err
    # fp32; inductor fuses and reorders reductions, so equal to rounding (3 Adam steps amplify it a little)
    assert_same_adapter(runs[True], runs[False], atol=1e-4)
    # the breaks left: selecting the supervised rows (a data-dependent shape) and lean attention, run eagerly
    expected = ("aten.nonzero", "function `<function lean_attention_forward")
    assert all(any(e in reason for e in expected) for reason in counters["graph_break"]), counters["graph_break"]


def test_checkpointing_some_layers_changes_memory_not_math(tiny_dir, data_file, tmp_path):
    """gradient_checkpointing: N recomputes N evenly spread decoder layers; loss and gradients stay exact (fp32).
    N above the model's layer count checkpoints them all, with a warning that says so."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    from loraforge.training.loop import make_batch

    grads = {}
    for ckpt in ("false", "true", "1", "1000"):
        cfg = config(tiny_dir, data_file, tmp_path / ckpt, gradient_checkpointing=ckpt)
        cfg = dataclasses.replace(cfg, lora=dataclasses.replace(cfg.lora, lora_dropout=0.0))
        torch.manual_seed(0)
        with warnings.catch_warnings(record=True) as warned:
            warnings.simplefilter("always")
            model, tok = build_model(cfg, torch.device("cpu"))
        assert [str(w.message) for w in warned if "gradient_checkpointing" in str(w.message)] == (
            ["training.gradient_checkpointing: 1000 layers asked of a model with 2: all of them recompute, as with "
             "true (at most 2 for some of them)"] if ckpt == "1000" else [])
        flags = [m.gradient_checkpointing for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
        assert flags == {"false": [False, False], "true": [True, True], "1": [True, False],
                         "1000": [True, True]}[ckpt]
        examples, _ = D.build_dataset(D.read_records(str(data_file)), tok)
        model.train()
        loss_fn = CausalLMLoss(model, share_prefix=False)  # checkpointing turns it off: compare like with like
        loss, _ = loss_fn(make_batch(examples, list(range(8)), cfg, tok.pad_token_id, False))
        loss.backward()
        grads[ckpt] = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    for ckpt in ("true", "1", "1000"):
        for n, g in grads["false"].items():
            torch.testing.assert_close(grads[ckpt][n], g, rtol=1e-6, atol=1e-7)
    with pytest.raises(ConfigError, match="gradient_checkpointing: a number of layers must be ≥ 0, got -1"):
        config(tiny_dir, data_file, tmp_path, gradient_checkpointing=-1)


@pytest.mark.parametrize("packed", [False, True])
def test_attention_kernels_train_alike(tiny_dir, data_file, tmp_path, packed):
    """training.attention only picks a kernel: loss and gradients agree (fp32), padded and packed batches alike.
    Gradients compare at atol 1e-5 on gradients up to ~1e-2: the lean blocks (training.fused_blocks, on) sum in
    another order than transformers' modules."""
    from loraforge.training.loop import make_batch

    results = {}
    for attention in ("sdpa", "eager", "lean"):
        cfg = config(tiny_dir, data_file, tmp_path / attention, attention=attention)
        cfg = dataclasses.replace(cfg, lora=dataclasses.replace(cfg.lora, lora_dropout=0.0, init_lora_weights=False))
        torch.manual_seed(0)
        model, tok = build_model(cfg, torch.device("cpu"))
        assert model.config._attn_implementation == attention
        examples, _ = D.build_dataset(D.read_records(str(data_file)), tok)
        batch = make_batch(examples, [0, 5, 17, 33, 2, 9], cfg, tok.pad_token_id, packed)
        assert ("position_ids" in batch) == packed
        loss, n = CausalLMLoss(model.train())(batch)
        (loss / n).backward()
        results[attention] = (loss, {k: p.grad for k, p in model.named_parameters() if p.requires_grad})
    for attention in ("eager", "lean"):
        torch.testing.assert_close(results[attention][0], results["sdpa"][0], rtol=1e-5, atol=1e-5)
        for k, g in results["sdpa"][1].items():
            torch.testing.assert_close(results[attention][1][k], g, rtol=1e-4, atol=1e-5, msg=f"{attention} {k}")


def test_a_soft_capped_model_trains_with_auto_attention_as_with_eager(data_file, tmp_path):
    """Soak: every Gemma 2 run died of SDPA's "does not support softcap" (auto picked lean, which handed
    soft-capped scores to SDPA). auto now picks eager for such a model, and lean runs the model's own eager
    attention there: the same losses as training.attention=eager (fp32)."""
    tok = load_tokenizer("smollm2-135m")
    base = tmp_path / "gemma2"
    Gemma2ForCausalLM(Gemma2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=16,
                                   attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                                   query_pre_attn_scalar=16)).save_pretrained(base)
    tok.save_pretrained(base)
    losses = {}
    for attention in ("auto", "eager", "lean"):
        cfg = config(base, data_file, tmp_path / attention, attention=attention, max_steps=2, warmup_steps=0)
        train(cfg, progress=False)
        losses[attention] = [m["loss"] for m in read_metrics(tmp_path / attention / "metrics.jsonl") if "loss" in m]
    assert len(losses["eager"]) == 2 and losses["auto"] == losses["eager"]
    torch.testing.assert_close(losses["lean"], losses["eager"], rtol=1e-5, atol=1e-5)


def test_joined_rows_train_as_padded_rows(tiny_dir, data_file, tmp_path):
    """Where lean attention runs packed sequences one by one, a batch's packed rows are joined (data.join_rows):
    no padding between them, and the padded rows' loss and gradients (fp32). Other attention kernels
    attend over whole rows, so their rows are not joined, nor are rows whose sequences may pass LEAN_MAX_LENGTH."""
    from loraforge.training.fastpath import LEAN_MAX_LENGTH, joins_rows
    from loraforge.training.loop import make_batch

    assert joins_rows("lean", LEAN_MAX_LENGTH) and joins_rows("lean_whole", 128)
    assert not joins_rows("sdpa", 128) and not joins_rows("eager", 128) and not joins_rows("lean_masked", 128)
    assert not joins_rows("lean", LEAN_MAX_LENGTH + 1)
    cfg = config(tiny_dir, data_file, tmp_path, attention="lean")
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, max_seq_len=100),
                              lora=dataclasses.replace(cfg.lora, lora_dropout=0.0, init_lora_weights=False))
    torch.manual_seed(0)
    model, tok = build_model(cfg, torch.device("cpu"))
    examples, _ = D.build_dataset(D.read_records(str(data_file)), tok)
    idx = [0, 5, 17, 33, 2, 9, 21, 38]
    results = {}
    for join, bf16 in ((False, False), (True, False), (False, True), (True, True)):
        batch = make_batch(examples, idx, cfg, tok.pad_token_id, True, join)
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss, n = CausalLMLoss(model.train())(batch)
        (loss / n).backward()
        results[join, bf16] = (batch["input_ids"].shape, loss, {k: p.grad for k, p in model.named_parameters()
                                                                if p.requires_grad})
    (padded, loss, grads), (joined, joined_loss, joined_grads) = results[False, False], results[True, False]
    real = sum(len(examples[i].input_ids) for i in idx)  # joined: to the least multiple of 16 (data.JOIN_MULTIPLE)
    assert padded[0] > 1 and joined == (1, -(-real // 16) * 16)
    torch.testing.assert_close(joined_loss, loss, rtol=1e-6, atol=1e-6)
    for k, g in grads.items():
        torch.testing.assert_close(joined_grads[k], g, rtol=1e-5, atol=1e-7, msg=k)
    # bf16 autocast: joined rows err from fp32 no more than padded rows do (each within its own rounding)
    def error(join):
        _, bf_loss, bf_grads = results[join, True]
        flat = torch.cat([(bf_grads[k] - g).flatten() for k, g in grads.items()])
        return abs(bf_loss.item() - loss.item()) / loss.item(), float(flat.norm() / torch.cat(
            [g.flatten() for g in grads.values()]).norm())

    (loss_padded, grad_padded), (loss_joined, grad_joined) = error(False), error(True)
    assert 0 < grad_padded < 0.1 and loss_joined < 2 * loss_padded + 1e-3 and grad_joined < 2 * grad_padded, (
        (loss_padded, grad_padded), (loss_joined, grad_joined))


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_metrics_log_the_learning_rate_each_step_updated_with(tiny_dir, data_file, tmp_path, monkeypatch, schedule):
    """Step k's row holds the rate of step k's own update: the schedule's value at k - 1 (warmup over 2 of the 6
    steps, then the decay), equal to what AdamW was given; not the rate the next step will use."""
    used = []
    adamw_step = torch.optim.AdamW.step

    def step(self, *args, **kwargs):
        used.append(self.param_groups[0]["lr"])
        return adamw_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    train(config(tiny_dir, data_file, tmp_path, schedule=schedule, log_every=1), progress=False)
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [row["step"] for row in rows] == [1, 2, 3, 4, 5, 6]
    assert [row["lr"] for row in rows] == used  # what the optimizer used, exactly
    # the plain formula; LambdaLR multiplies lr by the factor: equal to rounding
    assert used == pytest.approx([lr_at(schedule, 1e-2, 2, 6, s) for s in range(6)], rel=1e-12, abs=0)


def test_tokens_per_second_leave_out_evaluation_and_checkpoints(tiny_dir, data_file, tmp_path, monkeypatch, capsys):
    """A held-out evaluation after every step (made to take 0.3 s) and a checkpoint every 2 steps: the result's and
    metrics.jsonl's tokens/s divide the tokens by the training steps' time alone, the result says how long the rest
    took; its wall time still counts everything, and each evaluation's line its own time. (A 2-step demo run with
    batch_size 1 read 14 tokens/s with its 9 s evaluation counted, 148 while it trained.)"""
    import time

    from loraforge.training import loop

    def slow_eval(*args, **kwargs):
        time.sleep(0.3)
        return 1.0

    monkeypatch.setattr(loop, "mean_token_loss", slow_eval)
    saves = []
    monkeypatch.setattr(loop, "save_step", lambda run, _f=loop.save_step: saves.append(time.sleep(0.2)) or _f(run))
    cfg = config(tiny_dir, data_file, tmp_path, eval_every=1, save_every=2, log_every=1)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, eval_fraction=0.1))
    result = train(cfg, progress=False)
    assert len(saves) == 3 and result.eval_loss == 1.0
    assert 6 * 0.3 + 3 * 0.2 <= result.aside_seconds < result.seconds
    assert result.tokens_per_second == pytest.approx(result.train_tokens / (result.seconds - result.aside_seconds))
    rows = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "tokens_per_s" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    for r in rows[1:]:  # step k's row: the evaluations and saves of steps 1..k-1 are left out of its rate
        k = r["step"] - 1
        assert r["tokens"] / r["tokens_per_s"] <= r["elapsed_s"] - k * 0.3 - (k // 2) * 0.2 + 1e-6, r
    said = re.findall(r"step (\d): eval loss 1\.0000, perplexity 2\.72 \((\d+\.\d) s, not counted in tokens/s\)",
                      capsys.readouterr().out)
    assert [int(step) for step, _ in said] == [1, 2, 3, 4, 5, 6] and all(float(s) >= 0.3 for _, s in said), said


def test_too_few_examples_for_one_step_names_the_batch_setting_in_force(tiny_dir, data_file, tmp_path):
    """The 40 records: one batch of training.batch_tokens 100000 is more than all of them (the error says how many
    tokens they hold); 64 rows likewise."""
    with pytest.raises(TrainingError) as e:
        train(config(tiny_dir, data_file, tmp_path / "tokens", batch_tokens=100000), progress=False)
    said = re.fullmatch(r"40 training examples \(([\d,]+) tokens in all\) fill 0 batches of training\.batch_tokens "
                        r"100000, fewer than one optimizer step needs \(gradient_accumulation 1 × 1 processes\); "
                        r"lower training\.batch_tokens \(it is 100000\)", str(e.value))
    model, tok = build_model(config(tiny_dir, data_file, tmp_path / "count"), torch.device("cpu"))
    examples, _ = D.build_dataset(D.read_records(str(data_file)), tok)
    assert said and int(said[1].replace(",", "")) == sum(len(x.input_ids) for x in examples) < 100000, str(e.value)
    with pytest.raises(TrainingError) as e:
        train(config(tiny_dir, data_file, tmp_path / "rows", batch_size=64), progress=False)
    assert str(e.value) == ("40 training examples are fewer than one optimizer step needs (batch_size 64 × "
                            "gradient_accumulation 1 × 1 processes); lower training.batch_size")


def test_the_data_line_counts_answers_that_ended_in_the_eos_text():
    from loraforge.training.loop import data_report

    stats = {"n_examples": 40, "n_truncated": 1, "n_dropped": 0, "n_eos_stripped": 3}
    assert data_report(stats, 4, 0.1, 0.1, False, "auto").startswith(
        "data: 40 train examples (1 truncated, 0 dropped, 3 ending in the EOS text (learnt once)), 4 held out; ")
    assert data_report({**stats, "n_eos_stripped": 0}, 4, 0.1, 0.1, False, "auto").startswith(
        "data: 40 train examples (1 truncated, 0 dropped), 4 held out; ")
    assert data_report(stats, 4, 0.3, 0.3, True, "auto", join=True).endswith(
        ": packed, a batch's rows joined into rows of about 2048 tokens (no padding between them)")


def test_the_data_line_names_where_a_dropped_record_came_from_and_why(tiny_dir, data_file, tmp_path, capsys):
    """A record whose prompt alone fills max_seq_len is dropped: the line said "1 dropped" and nothing of which one
    or why. Two sources (the mix adds their counts and lists): the first dropped record's file:line and reason."""
    long = tmp_path / "long.jsonl"
    rows = [{"instruction": f"Add {i} and 1.", "output": str(i + 1)} for i in range(6)]
    rows[3] = {"instruction": "long " * 200, "output": "ok"}
    rows[5] = {"instruction": "longer " * 300, "output": "ok"}
    long.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_train_config(None, [f"model.name={tiny_dir}", f"data.train=[{data_file}, {long}]",
                                   "data.max_seq_len=48", "data.eval_fraction=0", "training.max_steps=1",
                                   "training.batch_size=4", "training.precision=fp32", "lora.r=4",
                                   f"output_dir={tmp_path / 'run'}"])
    train(cfg, progress=False)
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("data: "))
    assert line.startswith(f"data: 44 train examples (0 truncated, 2 dropped: {long}:4 (its prompt alone fills "
                           f"max_seq_len=48) and 1 more), 0 held out")


def test_held_out_examples_cut_or_dropped_by_overflow_are_counted(tiny_dir, data_file, tmp_path, capsys):
    """data.overflow applies to data.eval too: 3 of its 8 records past max_seq_len were dropped (or cut) without a
    word; the data line now counts them as it does for training."""
    held = tmp_path / "eval.jsonl"
    rows = [{"instruction": f"Add {i}.", "output": "ok"} for i in range(5)]
    rows += [{"instruction": "Say it.", "output": "one two " * 40}] * 3  # the answer is cut, or the record dropped
    held.write_text("".join(json.dumps(r) + "\n" for r in rows))
    for overflow, kept, counts in [("drop", 5, "0 truncated, 3 dropped"), ("truncate", 8, "3 truncated, 0 dropped")]:
        cfg = load_train_config(None, [f"model.name={tiny_dir}", f"data.train={data_file}", f"data.eval={held}",
                                       "data.max_seq_len=48", f"data.overflow={overflow}", "training.max_steps=1",
                                       "training.batch_size=4", "training.precision=fp32", "lora.r=4",
                                       f"output_dir={tmp_path / overflow}"])
        train(cfg, progress=False)
        assert f", {kept} held out ({counts}); padded batches" in capsys.readouterr().out


def test_the_examples_an_epoch_leaves_out_are_said_and_padding_is_measured_in_the_steps_order(tiny_dir, tmp_path,
                                                                                             capsys):
    """An epoch is whole optimizer steps: 30 examples in steps of 4 × 2 train on 24, silently before. And packing
    auto judged padding in the file's order (here 15 short records, then 15 long: no padding in a batch of 4),
    while the steps take the shuffled order (much padding): the line said 0.0% and did not pack."""
    data = tmp_path / "d.jsonl"
    rows = [{"instruction": "Hi.", "output": "ok"}] * 15 + [{"instruction": "Say " + "one two " * 30,
                                                             "output": "x"}] * 15
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = config(tiny_dir, data, tmp_path / "run", max_steps="null", epochs=1, batch_size=4,
                 gradient_accumulation=2, warmup_steps=0)
    train(cfg, progress=False)
    out = capsys.readouterr().out
    assert ("data: each epoch trains on 24 of its 30 examples: 3 whole steps of batch_size 4 × gradient_accumulation "
            "2; the other 6 (shuffled anew each epoch) are left out; to train on every one, use a training.batch_size "
            "× training.gradient_accumulation that divides 30\n") in out  # the fields as an override names them
    from loraforge.models import load_tokenizer
    from loraforge.training.epochs import micro_batches
    from loraforge.training.loop import load_data

    examples = load_data(cfg, load_tokenizer(str(tiny_dir)))[0]
    in_order = [examples[i] for batch in micro_batches(examples, cfg, 0) for i in batch]
    said = float(out.split("padded batches would be ")[1].split("%")[0])
    assert said == round(100 * D.padding_fraction(in_order, 4), 1) > 20 > 100 * D.padding_fraction(examples, 4)
    train(config(tiny_dir, data, tmp_path / "whole", max_steps="null", epochs=1, batch_size=5,
                 gradient_accumulation=2, warmup_steps=0), progress=False)
    assert "each epoch trains on" not in capsys.readouterr().out  # 30 = 3 steps of 5 × 2

def test_sequences_past_the_models_context_are_refused_before_the_model_loads(tiny_dir, data_file, tmp_path):
    """The tiny Llama has 128 positions: records of ~200 tokens let through by data.max_seq_len=512 are refused
    by name; the same max_seq_len over short records (packed rows restart positions per sequence) trains."""
    long_file = tmp_path / "long.jsonl"
    long_file.write_text("".join(json.dumps({"instruction": f"Count {i}.", "output": " ".join(["one two"] * 90)})
                                 + "\n" for i in range(8)))
    cfg = load_train_config(None, [f"model.name={tiny_dir}", f"data.train={long_file}", "data.eval_fraction=0",
                                   f"output_dir={tmp_path / 'out'}", "data.max_seq_len=512", "training.max_steps=1",
                                   "training.batch_size=2", "training.precision=fp32"])
    with pytest.raises(ConfigError) as e:
        train(cfg)
    assert re.fullmatch(r"data\.max_seq_len: 512 lets sequences of (\d+) tokens through, which is past the model's "
                        r"context of 128 tokens \(max_position_embeddings in the config of .*\); use at most 128",
                        str(e.value).splitlines()[-1].strip()), str(e.value)
    assert not (tmp_path / "out" / "adapter").exists()
    short = load_train_config(None, [f"model.name={tiny_dir}", f"data.train={data_file}", "data.eval_fraction=0",
                                     f"output_dir={tmp_path / 'short'}", "data.max_seq_len=512", "data.packing=true",
                                     "training.max_steps=1", "training.batch_size=4", "training.precision=fp32"])
    assert train(short).steps == 1 and (tmp_path / "short" / "adapter" / "adapter_model.safetensors").is_file()


def test_target_errors_name_their_section_and_adalora_total_step_is_the_runs(tiny_dir, data_file, tmp_path):
    """inject's 'target_modules: ...' is lora.target_modules or adalora.target_modules to the user; an
    adalora.total_step other than the run's step count was replaced without a word."""
    cfg = config(tiny_dir, data_file, tmp_path / "a")
    cpu = torch.device("cpu")
    with pytest.raises(ConfigError) as e:
        build_model(dataclasses.replace(cfg, lora=dataclasses.replace(cfg.lora, target_modules=("qkv",))), cpu)
    assert e.value.problems[0].startswith("lora.target_modules: ('qkv',) matches no linear layer")
    ada = dataclasses.replace(cfg, method="adalora", adalora={"target_modules": ["qkv"], "target_r": 2})
    with pytest.raises(ConfigError) as e:
        build_model(ada, cpu, total_steps=6)
    assert e.value.problems[0].startswith("adalora.target_modules: ('qkv',) matches no linear layer")
    with pytest.raises(ConfigError) as e:
        build_model(dataclasses.replace(ada, adalora={"total_step": 100, "target_r": 2}), cpu, total_steps=6)
    assert e.value.problems == ["adalora.total_step: 100 is not this run's 6 steps; a training run sets it "
                                "(training.max_steps, or epochs × steps per epoch): remove adalora.total_step, or "
                                "set training.max_steps=100"]
    model, _ = build_model(dataclasses.replace(ada, adalora={"total_step": 6, "target_r": 2}), cpu, total_steps=6)
    assert any(type(m).__name__ == "SVDLinear" for m in model.modules())  # the run's own count is fine


def test_warmup_longer_than_an_epochs_run_is_refused_once_its_steps_are_known(tiny_dir, data_file, tmp_path):
    """With max_steps the config refuses warmup_steps above it; with epochs the total is known only once the data
    is read: a hunt found 10 steps trained at most a fifth of the peak rate, the decay never reached. Refused
    before the model loads, naming the field and the run's step count."""
    cfg = config(tiny_dir, data_file, tmp_path / "run", max_steps="null", epochs=1, warmup_steps=50)
    with pytest.raises(ConfigError) as e:
        train(cfg, progress=False)
    (problem,) = e.value.problems
    said = re.fullmatch(r"training\.warmup_steps: 50 is not less than the run's (\d+) steps \(training\.epochs 1\.0 "
                        r"× \1 steps an epoch\), so the learning rate would still be rising when training stops; "
                        r"use at most (\d+) \(typically 3-10% of the steps, e\.g\. 1\)", problem)
    assert said and int(said[2]) == int(said[1]) - 1, problem  # step k runs at lr·(k+1)/(w+1): the last at the peak
    assert not (tmp_path / "run").exists()


def test_a_source_too_small_to_split_says_nothing_is_held_out(tiny_dir, data_file, tmp_path, capsys):
    """eval_fraction holds out nothing from a source under 20 records (mixing.MIN_TO_SPLIT): the data line says
    so and how to get a held-out loss, where it used to say only "0 held out"."""
    small = tmp_path / "n19.jsonl"
    small.write_text("".join(Path(data_file).read_text().splitlines(keepends=True)[:19]))
    cfg = load_train_config(None, [f"model.name={tiny_dir}", f"data.train={small}", "data.eval_fraction=0.5",
                                   f"output_dir={tmp_path / 'run'}", "lora.r=4", "training.max_steps=1",
                                   "training.batch_size=4", "training.precision=fp32"])
    result = train(cfg, progress=False)
    assert result.data_stats["not_held_out"] == ["n19.jsonl"]
    assert ("19 train examples (0 truncated, 0 dropped), 0 held out (data.eval_fraction holds out nothing from "
            "n19.jsonl: under 20 records; give data.eval for a held-out loss)") in capsys.readouterr().out


def test_packing_is_refused_or_skipped_for_a_model_that_mixes_packed_examples(tiny_dir, tmp_path, capsys):
    """OPT builds a plain causal mask whatever the position_ids say, so each packed example attended to the ones
    before it: a soak's OPT run packed (data.packing auto or true) trained on a loss 1e-3 off the padded run's, and
    `loraforge eval` packed its examples for perplexity. Now true is refused in one line, auto pads (the data line
    says why), and evaluation pads: the same losses as data.packing=false."""
    from loraforge.training.evaluate import mean_token_loss

    tok = load_tokenizer(str(tiny_dir))
    base, data = opt_that_mixes_packed_rows(tmp_path, tok)
    losses = {}
    for packing in ("false", "auto", "true"):
        cfg = load_train_config(None, [f"model.name={base}", f"data.train={data}", "data.eval_fraction=0",
                                       f"output_dir={tmp_path / packing}", f"data.packing={packing}", "lora.r=4",
                                       "training.max_steps=2", "training.batch_size=4", "training.precision=fp32",
                                       "training.warmup_steps=0"])
        if packing == "true":
            with pytest.raises(ConfigError) as e:
                train(cfg, progress=False)
            assert e.value.problems == [
                "data.packing: true, but OPTForCausalLM does not keep packed examples apart (its attention mask "
                "ignores position_ids), so each would attend to the ones before it in its row; use data.packing: "
                "false (or auto, which packs only models that keep them apart)"]
            continue
        train(cfg, progress=False)
        losses[packing] = [m["loss"] for m in read_metrics(tmp_path / packing / "metrics.jsonl") if "loss" in m]
    assert len(losses["false"]) == 2 and losses["auto"] == losses["false"]
    assert "not packed (OPTForCausalLM does not keep packed examples apart)" in capsys.readouterr().out
    model = OPTForCausalLM.from_pretrained(base)
    examples = D.build_dataset(D.read_records(str(data)), tok)[0]
    assert D.keeps_packed_apart(model) is False and D.keeps_packed_apart(tiny_llama()) is True
    assert mean_token_loss(model, examples, tok.pad_token_id) == pytest.approx(  # auto: `loraforge eval`'s
        mean_token_loss(model, examples, tok.pad_token_id, packing=False), rel=1e-6)


def test_a_progress_bar_into_a_log_file_is_not_redrawn_every_step(tiny_dir, data_file, tmp_path, monkeypatch):
    """Soak: `train ... 2> train.log` kept a `\\r` redraw of the bar for every step (tqdm redraws at most every
    0.1 s, but set_postfix redrew each step). Where stderr is no terminal, the bar is now redrawn every
    report.LOG_INTERVAL_S at most: its first and last state in a run shorter than that; metrics.jsonl has each step.
    The interval is set past any run's length: with 30 s a loaded machine's 40 steps drew a third state, for no fault
    (the draws, not the clock, are what this counts)."""
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    monkeypatch.setattr(report, "LOG_INTERVAL_S", 1e6)
    with open(tmp_path / "train.log", "w") as log:
        monkeypatch.setattr(sys, "stderr", log)
        train(config(tiny_dir, data_file, tmp_path / "run", max_steps=40, log_every=1, batch_size=1), progress=True)
    text = (tmp_path / "train.log").read_text()
    draws = [d for d in re.split("[\r\n]", text) if d.startswith("train:")]  # tqdm redraws with \r, or \n
    assert [d.split("|")[0].strip() for d in draws] == ["train:   0%", "train: 100%"], draws
    assert [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r] == list(range(1, 41))


def test_peak_memory_is_the_runs_own_not_an_earlier_cells(tiny_dir, data_file, tmp_path):
    """A notebook's kernel lives on: a train() after a cell that held 600 MB more reported that cell's peak (the
    process's maximum resident set). The run's peak now counts from its start, so it stays below the process's
    earlier one, and the process's figure (VmHWM) is the reference: a run that touched 600 MB less cannot pass it."""
    held = torch.ones(600 * 2**20 // 4)  # 600 MB touched, as a bigger model an earlier cell loaded
    del held
    before = peak_memory_mb("cpu")
    result = train(config(tiny_dir, data_file, tmp_path / "run", max_steps=3), progress=False)
    assert result.peak_memory_mb < before - 400, (result.peak_memory_mb, before)


class KernelStream(io.StringIO):
    """Stands in for ipykernel.iostream.OutStream, a Jupyter kernel's sys.stderr: no terminal (isatty False), yet
    the notebook shows a `\\r` redraw in place."""


KernelStream.__module__ = "ipykernel.iostream"


def test_a_progress_bar_in_a_notebook_is_redrawn_as_on_a_terminal(tmp_path, monkeypatch):
    """Soak (a real kernel through nbclient): a 5-second run's bar was drawn twice, at 0% and 100%, as into a log
    file (every report.LOG_INTERVAL_S); now as on a terminal (39 draws), with tqdm's own intervals."""
    for name in ("TQDM_DISABLE", "TQDM_MININTERVAL", "TQDM_MAXINTERVAL"):  # tqdm's defaults from the environment
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(sys, "stderr", KernelStream())
    bar = progress_bar(40)
    assert (bar.mininterval, bar.maxinterval) == (0.1, 10.0)  # tqdm's defaults
    bar.close()
    with open(tmp_path / "train.log", "w") as log:
        monkeypatch.setattr(sys, "stderr", log)
        bar = progress_bar(40)
        assert (bar.mininterval, bar.maxinterval) == (LOG_INTERVAL_S, LOG_INTERVAL_S) == (30.0, 30.0)
        bar.close()


@pytest.mark.parametrize("keep_best", [True, False])
def test_the_checkpoint_of_the_lowest_held_out_loss_is_kept_beside_the_newest(tiny_dir, data_file, tmp_path,
                                                                              monkeypatch, keep_best):
    """keep_checkpoints keeps the newest N: a run whose eval loss rose at the end kept no record of where it was
    lowest, and had deleted that checkpoint. A checkpoint of an evaluated step now records its eval loss, and with
    training.keep_best (the default) the lowest one's is kept beside the newest and named by the run's result and
    last line. The evaluations return 3, 1, 2, 4 (rising after step 2); the reference is metrics.jsonl's lowest."""
    from loraforge.cli import finished_line
    from loraforge.training import loop
    from loraforge.training.checkpoint import verify_checkpoint

    losses = iter([3.0, 1.0, 2.0, 4.0])
    monkeypatch.setattr(loop, "mean_token_loss", lambda *args, **kwargs: next(losses))
    out = tmp_path / "run"
    cfg = load_train_config(None, [f"model.name={tiny_dir}", f"data.train={data_file}", f"data.eval={data_file}",
                                   f"output_dir={out}", "lora.r=4", "training.max_steps=4", "training.batch_size=4",
                                   "training.precision=fp32", "training.warmup_steps=0", "training.eval_every=1",
                                   "training.save_every=1", "training.keep_checkpoints=1",
                                   f"training.keep_best={str(keep_best).lower()}"])
    result = train(cfg, progress=False)
    evaluated = [row for row in read_metrics(out / "metrics.jsonl") if "eval_loss" in row]
    assert [(row["step"], row["eval_loss"]) for row in evaluated] == [(1, 3.0), (2, 1.0), (3, 2.0), (4, 4.0)]
    lowest = min(evaluated, key=lambda row: row["eval_loss"])
    kept = sorted(p.name for p in (out / "checkpoints").glob("step-*"))
    if not keep_best:
        assert kept == ["step-0000004"] and result.best is None
        return
    best = out / "checkpoints" / f"step-{lowest['step']:07d}"
    assert kept == [best.name, "step-0000004"] and verify_checkpoint(best) is None
    assert json.loads((best / "trainer_state.json").read_text())["eval_loss"] == lowest["eval_loss"]
    assert result.best == {"step": lowest["step"], "eval_loss": lowest["eval_loss"], "checkpoint": str(best)}
    assert result.best_unsaved is None  # every evaluated step saved: the lowest is kept
    assert finished_line(result).endswith(f"; lowest held-out loss 1.0000 at step 2, its checkpoint kept: {best}")


def test_a_lowest_held_out_loss_at_a_step_without_checkpoint_is_said(tiny_dir, data_file, tmp_path, monkeypatch):
    """Soak: eval_every=1, save_every=2, the lowest held-out loss at step 3: keep_best kept step 2's checkpoint (or
    none but the last) and the last line said nothing of step 3. It says so now; the reference is metrics.jsonl."""
    from loraforge.cli import finished_line
    from loraforge.training import loop

    losses = iter([3.0, 2.0, 1.0, 4.0])
    monkeypatch.setattr(loop, "mean_token_loss", lambda *args, **kwargs: next(losses))
    out = tmp_path / "run"
    result = train(load_train_config(None, [
        f"model.name={tiny_dir}", f"data.train={data_file}", f"data.eval={data_file}", f"output_dir={out}", "lora.r=4",
        "training.max_steps=4", "training.batch_size=4", "training.precision=fp32", "training.warmup_steps=0",
        "training.eval_every=1", "training.save_every=2", "training.keep_checkpoints=1"]), progress=False)
    evaluated = [(row["step"], row["eval_loss"]) for row in read_metrics(out / "metrics.jsonl") if "eval_loss" in row]
    step, loss = min(evaluated, key=lambda e: e[1])
    assert (step, loss) == (3, 1.0) and not (out / "checkpoints" / f"step-{step:07d}").exists()
    assert result.best["step"] == 2 and result.best_unsaved == {"step": step, "eval_loss": loss}
    assert finished_line(result).endswith(
        f"its checkpoint kept: {out / 'checkpoints' / 'step-0000002'}; the lowest held-out loss, 1.0000 at step 3, "
        f"fell on a step that saved no checkpoint, so training.keep_best could not keep it (save at every evaluated "
        f"step: training.eval_every a multiple of training.save_every)")

def test_keep_best_written_without_held_out_data_is_warned_and_keeps_nothing_more(tiny_dir, data_file, tmp_path):
    """training.keep_best: true with data.eval_fraction 0 and no data.eval kept nothing of its own, unsaid. It is
    warned when the config is read; the run bears the warning out: metrics.jsonl holds no held-out loss, no best is
    named, and the checkpoints are the keep_checkpoints newest alone."""
    out = tmp_path / "run"
    with pytest.warns(UserWarning, match=r"^training\.keep_best: true keeps .* remove training\.keep_best$"):
        cfg = load_train_config(None, [
            f"model.name={tiny_dir}", f"data.train={data_file}", "data.eval_fraction=0", f"output_dir={out}",
            "lora.r=4", "training.max_steps=3", "training.batch_size=4", "training.precision=fp32",
            "training.save_every=1", "training.keep_checkpoints=1", "training.keep_best=true"])
    result = train(cfg, progress=False)
    assert [row for row in read_metrics(out / "metrics.jsonl") if "eval_loss" in row] == []
    assert result.best is None and result.best_unsaved is None and result.eval_loss is None
    assert sorted(p.name for p in (out / "checkpoints").glob("step-*")) == ["step-0000003"]


def test_a_resume_after_a_kill_in_the_final_adapter_write_writes_it_and_names_the_best(tiny_dir, data_file, tmp_path,
                                                                                      monkeypatch):
    """Soak (SIGKILL while the adapter of the last step was written): --resume found step 4 of 4 done, wrote the
    adapter, and said "the run had already finished its 4 steps, nothing left to resume", without the checkpoint of
    the lowest held-out loss that the uninterrupted run names. Both are said now; the reference is that run."""
    from loraforge.cli import finished_line
    from loraforge.training import loop

    monkeypatch.setattr(loop, "mean_token_loss", lambda *args, **kwargs: {1: 3.0, 2: 1.0, 3: 2.0, 4: 4.0}[step[0]])
    step, optimizer_step = [0], loop.optimizer_step

    def counted(run, batches):
        step[0] = run.step + 1
        return optimizer_step(run, batches)

    monkeypatch.setattr(loop, "optimizer_step", counted)

    def run(out, resume=False):
        return train(load_train_config(None, [
            f"model.name={tiny_dir}", f"data.train={data_file}", f"data.eval={data_file}", f"output_dir={out}",
            "lora.r=4", "training.max_steps=4", "training.batch_size=4", "training.precision=fp32",
            "training.warmup_steps=0", "training.eval_every=1", "training.save_every=1",
            "training.keep_checkpoints=1"]), resume=resume, progress=False)

    whole = run(tmp_path / "whole")
    with monkeypatch.context() as m:
        m.setattr(loop, "save_adapter", lambda *args: (_ for _ in ()).throw(KeyboardInterrupt))  # killed writing it
        with pytest.raises(KeyboardInterrupt):
            run(tmp_path / "cut")
    assert not (tmp_path / "cut" / "adapter").exists()
    resumed = run(tmp_path / "cut", resume=True)
    assert_same_adapter(adapter(tmp_path / "cut"), adapter(tmp_path / "whole"), atol=0)  # fp32: bit for bit
    assert whole.best["step"] == resumed.best["step"] == 2 and resumed.best["eval_loss"] == whole.best["eval_loss"]
    kept = f"; lowest held-out loss 1.0000 at step 2, its checkpoint kept: {resumed.best['checkpoint']}"
    assert finished_line(resumed) == (f"adapter written to {tmp_path / 'cut' / 'adapter'}: the run's 4 steps were "
                                      f"done before it stopped, while writing its adapter, which is written now{kept}")
    again = run(tmp_path / "cut", resume=True)  # now it had finished
    assert finished_line(again).endswith(f"the run had already finished its 4 steps, nothing left to resume{kept}")
