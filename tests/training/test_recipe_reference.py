"""train() against a plain reference loop written out here: PEFT's get_peft_model on the same tiny base with the
same initial adapter, torch's AdamW, the loss summed over the step's supervised tokens of every micro-batch and
divided by their count, the learning-rate formula, one clip per optimizer step, and for AdaLoRA PEFT's orthogonality
penalty and update_and_allocate. The two saved adapters (PEFT's save_pretrained for the reference) must agree."""

import json
from pathlib import Path

import peft
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from helpers import lr_at
from loraforge.config import load_train_config
from loraforge.training import loop
from loraforge.training.report import read_metrics

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
ADALORA = {"init_r": 6, "target_r": 2, "tinit": 1, "tfinal": 1, "deltaT": 1, "orth_reg_weight": 0.5}
CASES = {  # method, extra overrides, the reference's PEFT config, training settings
    "lora": ("lora", ["lora.r=4"], {}, {"schedule": "cosine", "max_steps": 3}),
    "dora_rslora": ("dora", ["lora.r=4", "lora.use_rslora=true"], {"use_dora": True, "use_rslora": True},
                    {"schedule": "linear", "max_steps": 3}),
    # AdaLoRA starts with E = 0 and A, B ~ N(0, 0.02): gradients ~10x smaller, so is the clip
    "adalora": ("adalora", [f"adalora.{k}={v}" for k, v in ADALORA.items()], ADALORA,
                {"schedule": "cosine", "max_steps": 4, "max_grad_norm": 0.005}),
}


def uneven_data(tmp_path: Path) -> Path:
    """Answers of 1 and of 25 words: micro-batches whose supervised-token counts differ several times over."""
    path = tmp_path / "uneven.jsonl"
    rows = [{"instruction": f"Count {i}.", "input": "", "output": " ".join(str((i + j) % 10) for j in range(n))}
            for i, n in enumerate([1, 25, 1, 1, 25, 1, 25, 1, 1, 25, 1, 1, 25, 1, 1, 1])]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def by_name(model) -> dict[str, torch.nn.Parameter]:
    """Trainable parameters under one spelling for both libraries: PEFT's name without base_model.model., the
    adapter name or a DoRA magnitude's .weight."""
    names = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            name = name.removeprefix("base_model.model.").replace(".default", "")
            names[name.replace("lora_magnitude_vector.weight", "lora_magnitude_vector")] = p
    return names


def peft_orth_penalty(model, weight: float) -> torch.Tensor:
    """PEFT's AdaLoraModel.forward penalty: weight · mean over lora_A, lora_B of ‖AAᵀ − I‖_F, ‖BᵀB − I‖_F."""
    terms = []
    for name, p in model.named_parameters():
        if ".lora_A." in name or ".lora_B." in name:
            cov = p @ p.T if ".lora_A." in name else p.T @ p  # (r, r)
            terms.append(torch.linalg.matrix_norm(cov - torch.eye(cov.shape[0])))
    return weight * torch.stack(terms).mean()


def reference_run(cfg, base: Path, method: str, peft_config: dict, start: dict, steps: list[list[dict]],
                  out: Path) -> list[float]:
    """The plain loop over the micro-batches train() took; returns each step's mean token loss and saves the adapter
    to `out` with PEFT."""
    t, total = cfg.training, len(steps)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    settings = {"task_type": "CAUSAL_LM", "target_modules": TARGETS, "lora_alpha": cfg.lora.lora_alpha,
                "lora_dropout": 0.0, **peft_config}
    model = peft.get_peft_model(model, peft.AdaLoraConfig(total_step=total, **settings) if method == "adalora"
                                else peft.LoraConfig(r=cfg.lora.r, **settings))
    params = by_name(model)
    assert params.keys() == start.keys()
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(start[name])
    model.train()
    # no bias or norm trains here: HF's rule decays every trainable parameter (DoRA's magnitudes too)
    optimizer = torch.optim.AdamW(params.values(), lr=t.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=t.weight_decay)
    losses = []
    for step, batches in enumerate(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(t.schedule, t.lr, t.warmup_steps, total, step)
        n = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)  # every micro-batch of the step
        summed = 0.0
        for b in batches:
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1].float()
            loss = F.cross_entropy(logits.flatten(0, 1), b["labels"][:, 1:].flatten(), reduction="sum")
            objective = loss / n
            if method == "adalora":  # once per optimizer step
                objective = objective + peft_orth_penalty(model, ADALORA["orth_reg_weight"]) / len(batches)
            objective.backward()
            summed += loss.item()
        torch.nn.utils.clip_grad_norm_(list(params.values()), t.max_grad_norm)
        optimizer.step()
        if method == "adalora":
            model.base_model.update_and_allocate(step + 1)  # steps counted from 1, as the loop counts them
        optimizer.zero_grad()
        losses.append(summed / n)
    model.save_pretrained(out)
    return losses


@pytest.mark.parametrize("case", CASES)
def test_training_equals_a_plain_peft_and_adamw_loop(tiny_dir, tmp_path, monkeypatch, case):
    """Two micro-batches of very different token counts per step, warmup then decay, weight decay, clipping that
    acts (max_grad_norm far below the gradients' norm); DoRA with rsLoRA; AdaLoRA's rank schedule."""
    method, extra, peft_config, training = CASES[case]
    t = {"lr": 1e-2, "batch_size": 2, "gradient_accumulation": 2, "warmup_steps": 1, "weight_decay": 0.1,
         "max_grad_norm": 0.05, "precision": "fp32", "seed": 3, **training}
    cfg = load_train_config(None, [f"model.name={tiny_dir}", f"data.train={uneven_data(tmp_path)}",
                                   "data.eval_fraction=0", "data.packing=false", f"output_dir={tmp_path / 'run'}",
                                   f"method={method}", "lora.lora_alpha=8", *extra]
                            + [f"training.{k}={v}" for k, v in t.items()])
    start, steps = {}, []
    optimizer_step = loop.optimizer_step

    def recorded(run, batches):
        if not steps:  # the adapter train() starts from
            start.update({name: p.detach().cpu().clone() for name, p in by_name(run.model).items()})
        steps.append([{k: v.cpu() for k, v in b.items()} for b in batches])  # the reference runs on the CPU
        return optimizer_step(run, batches)

    monkeypatch.setattr(loop, "optimizer_step", recorded)
    loop.train(cfg, progress=False)
    counts = [[int((b["labels"][:, 1:] != -100).sum()) for b in batches] for batches in steps]
    assert any(max(c) > 3 * min(c) for c in counts), counts

    losses = reference_run(cfg, tiny_dir, method, peft_config, start, steps, tmp_path / "reference")
    rows = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert all(r["grad_norm"] > 2 * t["max_grad_norm"] for r in rows)  # the clip acted at every step
    assert [r["loss"] for r in rows] == pytest.approx(losses, rel=1e-6, abs=0)
    got = load_file(tmp_path / "run" / "adapter" / "adapter_model.safetensors")
    want = load_file(tmp_path / "reference" / "adapter_model.safetensors")
    assert got.keys() == want.keys()
    # Adam divides by sqrt(v): the gradients agree to ~1e-6 relative (the fused head and lean attention sum in
    # another order), and that grows where an entry's gradient is near 0; measured 2e-6 at most. One step moves a
    # weight by up to lr (1e-2); loss divided per micro-batch instead of per step moves them by ~1e-2 here.
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-5, msg=key)
    if method == "adalora":
        kept = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())["rank_pattern"]
        assert kept == json.loads((tmp_path / "reference" / "adapter_config.json").read_text())["rank_pattern"]
