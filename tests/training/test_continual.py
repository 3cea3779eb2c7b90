"""training.init_adapter: start from an existing adapter (ours or PEFT's) and train on.

The reference is PEFT: its adapter loaded with is_trainable=True and one AdamW step with a fresh optimizer (an
adapter directory holds no optimizer state, so a continued run starts its optimizer and schedule fresh)."""

import contextlib
import json
import shutil

import peft
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from loraforge.config import ConfigError, load_train_config
from helpers import stop_in_last_save

from loraforge.models import load_tokenizer
from loraforge.training.epochs import micro_batches
from loraforge.training.loop import finish, load_data, make_batch, setup, train

PEFT_CONFIGS = {
    "rslora+patterns": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], use_rslora=True,
                            rank_pattern={"v_proj": 2}, alpha_pattern={"down_proj": 3}),
    "dora": dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj"], use_dora=True),
}


def peft_adapter(tiny_dir, path, kind):
    """A PEFT adapter with random (non-zero) A and B, saved as PEFT saves it."""
    torch.manual_seed(0)
    model = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32),
                                peft.LoraConfig(init_lora_weights=False, **PEFT_CONFIGS[kind]))
    model.save_pretrained(path)
    return path


def config(tiny_dir, data_file, out, adapter, *extra, **training):
    t = {"lr": 1e-3, "max_steps": 1, "batch_size": 4, "precision": "fp32", "seed": 3, "schedule": "constant",
         "init_adapter": adapter}
    t.update(training)
    over = [f"model.name={tiny_dir}", "model.dtype=fp32", f"data.train={data_file}", "data.eval_fraction=0",
            f"output_dir={out}", *extra] + [f"training.{k}={v}" for k, v in t.items()]
    return load_train_config(None, over)


@pytest.mark.parametrize("kind", list(PEFT_CONFIGS))
def test_zero_steps_save_the_adapter_it_started_from(tiny_dir, data_file, tmp_path, kind):
    start = peft_adapter(tiny_dir, tmp_path / "start", kind)
    written = json.loads((start / "adapter_config.json").read_text())  # trained on another base, or that base moved
    (start / "adapter_config.json").write_text(json.dumps({**written, "base_model_name_or_path": "/elsewhere/llama"}))
    with contextlib.ExitStack() as held:  # output_dir's lock, as train() holds it
        run = setup(config(tiny_dir, data_file, tmp_path / "out", start), resume=False, overwrite=False,
                    precision=None, held=held)
        finish(run, float("nan"), None, 0.0, 0)  # no fit(): zero steps
    saved, original = load_file(tmp_path / "out/adapter/adapter_model.safetensors"), load_file(
        start / "adapter_model.safetensors")
    assert saved.keys() == original.keys()
    for k in saved:
        torch.testing.assert_close(saved[k], original[k], rtol=0, atol=0)
    ours = json.loads((tmp_path / "out/adapter/adapter_config.json").read_text())
    theirs = json.loads((start / "adapter_config.json").read_text())
    for key in ("r", "lora_alpha", "use_rslora", "use_dora", "rank_pattern", "alpha_pattern"):
        assert ours[key] == theirs[key], key
    assert sorted(ours["target_modules"]) == sorted(theirs["target_modules"])
    # soak: the written adapter named the base of the adapter it started from, not the one it was trained on
    assert ours["base_model_name_or_path"] == str(tiny_dir)


@pytest.mark.parametrize("gone", ["deleted", "replaced"])
def test_resume_rebuilds_the_adapter_from_the_copy_the_run_kept(tiny_dir, data_file, tmp_path, gone):
    """The folder init_adapter names deleted, or replaced by another adapter (rank 2, not 4), between the kill and
    --resume: the resumed run still ends with the uninterrupted run's adapter, bit for bit."""
    start = peft_adapter(tiny_dir, tmp_path / "start", "rslora+patterns")
    whole = config(tiny_dir, data_file, tmp_path / "whole", start, max_steps=3)
    train(whole, progress=False)
    cfg = config(tiny_dir, data_file, tmp_path / "out", start, max_steps=3, save_every=1)
    stop_in_last_save(cfg)  # checkpoints 1 and 2 written
    shutil.rmtree(start)
    if gone == "replaced":
        torch.manual_seed(1)
        base = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
        peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(start)
    train(cfg, resume=True, progress=False)
    ours, theirs = (load_file(tmp_path / d / "adapter/adapter_model.safetensors") for d in ("out", "whole"))
    assert ours.keys() == theirs.keys()
    for k in ours:
        torch.testing.assert_close(ours[k], theirs[k], rtol=0, atol=0)


@pytest.mark.parametrize("kind", list(PEFT_CONFIGS))
def test_one_step_equals_peft_with_a_fresh_optimizer(tiny_dir, data_file, tmp_path, kind):
    """Our step from the adapter equals PEFT's: same batch, loss = summed token losses / supervised tokens, the
    gradient clipped to norm 1, AdamW(lr 1e-3, betas 0.9/0.999, eps 1e-8, no weight decay) freshly made."""
    start = peft_adapter(tiny_dir, tmp_path / "start", kind)
    cfg = config(tiny_dir, data_file, tmp_path / "out", start)
    train(cfg, progress=False)
    ours = load_file(tmp_path / "out/adapter/adapter_model.safetensors")

    tok = load_tokenizer(str(tiny_dir))
    examples, _, _, mixture = load_data(cfg, tok)
    batch = make_batch(examples, micro_batches(examples, cfg, 0, mixture)[0], cfg, tok.pad_token_id, pack=False)
    model = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32),
                                           start, is_trainable=True)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    labels = batch["labels"][:, 1:]
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100,
                           reduction="sum") / (labels != -100).sum()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    theirs = peft.get_peft_model_state_dict(model)
    assert ours.keys() == theirs.keys()
    moved = 0
    for k in ours:
        # Adam's first update is lr·g/(|g| + eps) ≈ ±lr per weight: a difference of 0.1% of lr would be a wrong sign
        # or a wrong gradient scale, while float32 rounding of the same math stays below 1e-7 (measured: 4.5e-8).
        torch.testing.assert_close(ours[k], theirs[k].detach(), rtol=0, atol=1e-6)
        moved += (ours[k] != load_file(start / "adapter_model.safetensors")[k]).sum().item()
    assert moved > 0  # the step did change the adapter
    # the saved result loads in PEFT with the logits of PEFT's own stepped model
    loaded = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32),
                                            tmp_path / "out/adapter").eval()
    model.eval()
    with torch.no_grad():
        ids = batch["input_ids"][:, :12]
        # the same weights up to float32 rounding (below 1e-7 each, above), so the logits agree far inside 1e-5
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=1e-5)


def test_conflicts_are_one_line_each(tiny_dir, data_file, tmp_path):
    start = peft_adapter(tiny_dir, tmp_path / "start", "rslora+patterns")
    out = tmp_path / "out"
    with pytest.raises(ConfigError) as e:
        train(config(tiny_dir, data_file, out, start, "lora.r=16", "lora.use_rslora=false", "method=dora"))
    source = f"{start}/adapter_config.json"
    fix = "the adapter's settings are used when training on from it: remove lora.{}, or leave out " \
          "training.init_adapter to start a fresh adapter"
    assert e.value.problems == [
        f"method: dora conflicts with training.init_adapter ({source} has use_dora false); use method lora",
        f"lora.r: 16 here, 4 in {source}; {fix.format('r')}",
        f"lora.use_rslora: False here, True in {source}; {fix.format('use_rslora')}",
    ]
    # a field written with its default value is the user's choice too: it was used without a word (r=4 trained)
    with pytest.raises(ConfigError) as e:
        train(config(tiny_dir, data_file, out, start, "lora.r=8", "lora.lora_alpha=16"))
    alpha = json.loads((start / "adapter_config.json").read_text())["lora_alpha"]
    assert e.value.problems == [f"lora.r: 8 here, 4 in {source}; {fix.format('r')}",
                                f"lora.lora_alpha: 16.0 here, {float(alpha)!r} in {source}; {fix.format('lora_alpha')}"]
    assert not out.exists()  # refused before any work
    # a lora: field equal to the adapter's is no conflict, nor is a field left at its default
    cfg = config(tiny_dir, data_file, out, start, "lora.r=4", "lora.use_rslora=true")
    assert train(cfg, progress=False).steps == 1


def test_adalora_and_missing_adapters_are_refused_clearly(tiny_dir, data_file, tmp_path):
    ada = tmp_path / "ada"
    model = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_dir),
                                peft.AdaLoraConfig(init_r=4, target_r=2, total_step=10, target_modules=["q_proj"]))
    model.save_pretrained(ada)
    with pytest.raises(ConfigError) as e:
        train(config(tiny_dir, data_file, tmp_path / "o1", ada))
    (line,) = e.value.problems
    assert line.startswith(f"training.init_adapter: {ada} is an AdaLoRA adapter, which cannot be trained on")
    with pytest.raises(ConfigError) as e:
        train(config(tiny_dir, data_file, tmp_path / "o2", tmp_path / "nothing"))
    assert e.value.problems == [f"training.init_adapter: no such adapter folder: {tmp_path / 'nothing'}"]


def test_all_linear_and_the_names_peft_expanded_it_to_select_the_same_layers(tiny_dir, data_file, tmp_path):
    """PEFT saves target_modules all-linear as the list of module names it expanded to; a run's own
    lora.target_modules: all-linear was refused as a conflict with that list, though both select the same layers.
    Now the two are compared by the layers they select on the model: the run trains on from the adapter (its
    tensors are PEFT's), and a list selecting other layers is still refused."""
    start, out = tmp_path / "start", tmp_path / "out"
    torch.manual_seed(0)
    model = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32),
                                peft.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    model.save_pretrained(start)
    saved = json.loads((start / "adapter_config.json").read_text())["target_modules"]
    assert len(saved) == 14 and "model.layers.1.mlp.down_proj" in saved  # 2 layers × 7 linear layers, by path
    assert train(config(tiny_dir, data_file, out, start, "lora.target_modules=all-linear", "lora.r=4"),
                 progress=False).steps == 1
    assert load_file(out / "adapter" / "adapter_model.safetensors").keys() == \
        load_file(start / "adapter_model.safetensors").keys()
    with pytest.raises(ConfigError) as e:
        train(config(tiny_dir, data_file, tmp_path / "other", start, "lora.target_modules=[q_proj, v_proj]"))
    assert e.value.problems[0].startswith("lora.target_modules: ('q_proj', 'v_proj') here, (")
