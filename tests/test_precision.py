"""The precision rule (loraforge.precision) on every kind of hardware, with the facts injected; fp16 training with
loss scaling on CPU autocast, including a step whose gradients overflow."""

import json
import math
import os
import re
import subprocess
import sys
import warnings

import pytest
import torch

from loraforge.precision import (ONEDNN_CACHES, PROBE_MIN_SPEEDUP, Hardware, choose, detect, overflow_fix,
                                 probe_bf16_speedup)

AVX2 = Hardware("cpu", "CPU", None, "AVX2", False, False)  # AMD Zen 2/3, most laptops: oneDNN has no bf16 at all
AVX512 = Hardware("cpu", "CPU", None, "AVX512", False, True)  # Skylake-X: AVX-512 without its BF16 extension
SAPPHIRE = Hardware("cpu", "CPU", None, "AVX512", True, True)  # AVX-512 BF16 + AMX
ARM = Hardware("cpu", "CPU", None, "DEFAULT", None, True)  # torch cannot tell: the probe decides
A100 = Hardware("cuda", "NVIDIA A100", (8, 0))
T4 = Hardware("cuda", "Tesla T4", (7, 5))
V100 = Hardware("cuda", "Tesla V100", (7, 0))


def never(*_):
    raise AssertionError("the probe ran although the hardware facts decide")


@pytest.mark.parametrize("hw,compute,reason", [
    (A100, "bf16", "NVIDIA A100 (compute capability 8.0) has bf16"),
    (T4, "fp16", "Tesla T4 (compute capability 7.5) has no bf16: fp16"),
    (V100, "fp16", "Tesla V100 (compute capability 7.0) has no bf16: fp16"),
    (SAPPHIRE, "bf16", "this CPU has native bf16 (AVX512 with AVX-512 BF16/AMX)"),
    (AVX2, "fp32", "this CPU has no native bf16 (AVX2)"),
    (AVX512, "fp32", "this CPU has no native bf16 (AVX512)"),  # oneDNN emulates bf16 with AVX-512 F
    # AVX-512 BF16 reported but torch dispatching AVX2 kernels (ATEN_CPU_CAPABILITY=avx2): not native
    (Hardware("cpu", "CPU", None, "AVX2", True, True), "fp32", "this CPU has no native bf16 (AVX2)"),
])
def test_auto_follows_the_hardware_facts(hw, compute, reason):
    p = choose("auto", "auto", hw=hw, probe=never)
    assert (p.compute, p.storage, p.reason) == (compute, compute, reason)
    assert p.needs_scaler == (compute == "fp16")
    scaler = " + loss scaling" if compute == "fp16" else ""
    assert p.line() == f"precision {compute}{scaler}: {reason}"
    assert p.line(training=False) == f"precision {compute}: {reason}"  # eval, generate, serve: no loss is scaled


@pytest.mark.parametrize("given", [None, "512"])
def test_choosing_bounds_onednns_kernel_caches_unless_the_environment_gives_them(given, monkeypatch):
    """oneDNN and ideep keep a kernel per bf16 matmul shape (1,024 by default, 0.3-1.5 MB each) and read their
    capacities once, at the first bf16 matmul: choose(), which every command (train, eval, generate, serve, ui,
    forgetting) runs before its model loads, sets both to 128; a value the user's environment gives is kept."""
    monkeypatch.setattr(os, "environ", {k: v for k, v in os.environ.items() if k not in ONEDNN_CACHES})
    if given is not None:
        os.environ["LRU_CACHE_CAPACITY"] = given
    choose("auto", "auto", hw=SAPPHIRE, probe=never)
    assert {name: os.environ.get(name) for name in ONEDNN_CACHES} == {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "128",
                                                                      "LRU_CACHE_CAPACITY": given or "128"}


def test_avx2_emulation_by_environment_chooses_fp32_and_says_why():
    """ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 (how an AVX2-only CPU is emulated on a newer one, where bf16
    matmuls ran 0.4 against fp32's 43 GFLOP/s at 1024²): auto is fp32, the reason names the cap (it said "this CPU
    has no native bf16 (AVX512)" on a CPU with AVX-512 BF16, for the oneDNN cap alone), and bf16 asked for warns."""
    code = ("import warnings; from loraforge.precision import choose; warnings.simplefilter('error'); "
            "print(choose('auto', 'auto').line())\n"
            "try:\n    choose('bf16', 'auto')\nexcept UserWarning as w:\n    print(w)")
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}
    auto, warned = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                  check=True).stdout.splitlines()
    reason = "bf16 is not native here (AVX2, ONEDNN_MAX_CPU_ISA=AVX2)"
    assert auto == f"precision fp32: {reason}"
    assert warned == (f"training.precision=bf16 on a CPU without native bf16 ({reason}): its matmuls are emulated, "
                      f"typically 50-200x slower than fp32. Use training.precision=auto (or fp32) on this machine")
    capped = Hardware("cpu", "CPU", None, "AVX512", True, False, "AVX2")  # the oneDNN cap alone
    assert choose("auto", "auto", hw=capped, probe=never).reason == "bf16 is not native here (AVX512, " \
                                                                     "ONEDNN_MAX_CPU_ISA=AVX2)"


@pytest.mark.parametrize("hw", [ARM, Hardware("cpu", "CPU", None, "AVX512", True, True, "AVX2")],
                         ids=["arm", "onednn-capped"])
@pytest.mark.parametrize("speedup,compute", [(2.1, "bf16"), (PROBE_MIN_SPEEDUP, "bf16"), (1.0, "fp32"),
                                             (0.004, "fp32")])
def test_unsure_facts_are_decided_by_the_matmul_probe(hw, speedup, compute):
    calls = []
    p = choose("auto", "auto", hw=hw, probe=lambda: calls.append(1) or speedup)
    assert p.compute == compute and calls == [1]
    assert f"bf16 matmuls ran {speedup:.{1 if compute == 'bf16' else 2}f}x fp32's" in p.reason


def test_the_matmul_probe_leaves_the_users_random_draws_alone():
    """soak: the probe drew its operands from torch's global generator, so choosing a precision (auto on ARM or a
    capped oneDNN) moved the user's next draws."""
    torch.manual_seed(7)
    expected = torch.rand(4)
    torch.manual_seed(7)
    assert probe_bf16_speedup.__wrapped__(n=8, seconds=0.001) > 0  # uncached: the probe itself runs
    assert torch.equal(torch.rand(4), expected)


def test_explicit_choices_are_kept_and_slow_ones_warned():
    with pytest.warns(UserWarning, match=r"training.precision=bf16 on a CPU without native bf16 \(this CPU has no "
                                         r"native bf16 \(AVX2\)\).*50-200x slower.*training.precision=auto"):
        p = choose("bf16", "auto", hw=AVX2, probe=never)
    assert (p.compute, p.storage, p.reason) == ("bf16", "bf16", "training.precision=bf16 as asked")
    with pytest.warns(UserWarning, match="model.dtype=bf16 on a CPU without native bf16"):
        assert choose("fp32", "bf16", hw=AVX2, probe=never).storage == "bf16"
    with pytest.warns(UserWarning, match=r"Tesla T4 has no bf16 \(compute capability 7.5\).*fp16 with loss"):
        assert choose("bf16", "auto", hw=T4, probe=never).compute == "bf16"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # what the hardware does well: no warning
        assert choose("fp32", "fp32", hw=SAPPHIRE, probe=never).compute == "fp32"
        assert choose("bf16", "auto", hw=SAPPHIRE, probe=never).compute == "bf16"
        assert choose("fp32", "auto", hw=AVX2, probe=never).storage == "fp32"
        assert choose("fp16", "auto", hw=V100, probe=never).compute == "fp16"


@pytest.mark.parametrize("names, precision, dtype", [
    (None, "training.precision=", "model.dtype="),  # the default: train's config fields
    (("--precision", "--dtype"), "--precision ", "--dtype "),  # generate, eval, serve, ui: the flags typed
])
def test_warnings_and_reason_name_the_settings_as_the_user_gave_them(names, precision, dtype):
    """Each caller names its own spelling: config fields (train) or flags (generate / eval / serve / ui)."""
    spelling = {} if names is None else {"names": names}
    with pytest.warns(UserWarning) as caught:
        p = choose("bf16", "fp16", hw=AVX2, probe=never, **spelling)
    assert [str(w.message) for w in caught] == [
        f"{precision}bf16 on a CPU without native bf16 (this CPU has no native bf16 (AVX2)): its matmuls are "
        f"emulated, typically 50-200x slower than fp32. Use {precision}auto (or fp32) on this machine",
        f"{dtype}fp16 on a CPU: fp16 matmuls are emulated on most CPUs (slower than fp32) and need loss scaling. "
        f"Use {dtype}fp32 on this machine ({dtype}auto follows {precision}bf16: bf16, emulated here too)"]
    assert p.line() == f"precision bf16, base stored in fp16: {precision}bf16 as asked"
    with pytest.warns(UserWarning) as caught:
        choose("bf16", "auto", hw=T4, probe=never, **spelling)
    assert [str(w.message) for w in caught] == [
        f"{precision}bf16: Tesla T4 has no bf16 (compute capability 7.5); it runs emulated and slowly. "
        f"Use {precision}auto (fp16 with loss scaling here)"]
    with pytest.warns(UserWarning) as caught:  # eval, generate, serve: they scale no loss
        choose("fp16", "auto", hw=AVX2, probe=never, training=False, **spelling)
        choose("bf16", "auto", hw=T4, probe=never, training=False, **spelling)
    assert [str(w.message) for w in caught] == [
        f"{precision}fp16 on a CPU: fp16 matmuls are emulated on most CPUs (slower than fp32). Use {precision}auto "
        f"(fp32 on this machine)",
        f"{precision}bf16: Tesla T4 has no bf16 (compute capability 7.5); it runs emulated and slowly. "
        f"Use {precision}auto (fp16 here)"]
    with pytest.raises(ValueError) as error:
        choose("auto", "int4", hw=AVX2, **spelling)
    assert str(error.value) == f"{dtype.strip(' =')}: 'int4' is not one of ['auto', 'fp32', 'bf16', 'fp16']"


def test_storage_follows_compute_unless_given():
    assert choose("auto", "fp32", hw=A100, probe=never).storage == "fp32"
    assert choose("auto", "auto", hw=T4, probe=never).storage == "fp16"
    p = choose("auto", "fp32", hw=T4, probe=never)
    assert p.line().startswith("precision fp16 + loss scaling, base stored in fp32: ")
    assert p.line(training=False).startswith("precision fp16, base stored in fp32: ")  # eval, generate, serve


def test_an_overflow_s_fix_names_the_fp16_setting_or_the_model():
    """overflow_fix: fp16 computed or stored is fp16's range (the fix names the setting that holds it); in bf16 or
    fp32 the model or adapter itself overflows."""
    assert overflow_fix(choose("fp16", "auto", hw=T4, probe=never)) == (
        "fp16 holds values only up to ±65504, which this forward passed; use --precision fp32 (or bf16 where the "
        "hardware has it), with --dtype auto or fp32")
    assert overflow_fix(choose("auto", "fp32", hw=T4, probe=never), ("training.precision", "model.dtype")) == (
        "fp16 holds values only up to ±65504, which this forward passed; use training.precision=fp32 (or bf16 "
        "where the hardware has it)")
    assert overflow_fix(choose("fp32", "fp16", hw=T4, probe=never, warn=False)).endswith("use --dtype fp32 (or bf16)")
    assert overflow_fix(choose("auto", "auto", hw=A100, probe=never)) == (
        "in bf16 too, so the model or the adapter itself overflows (an adapter's huge lora_alpha or weights?)")


def test_bad_values_are_named():
    with pytest.raises(ValueError, match=r"training.precision: 'fp8' is not one of \['auto', 'fp32', 'bf16', "):
        choose("fp8", "auto", hw=AVX2)
    with pytest.raises(ValueError, match="model.dtype: 'int4' is not one of"):
        choose("auto", "int4", hw=AVX2)


def test_this_machine_is_detected_consistently():
    """detect() reads torch's own facts; the rule's answer agrees with oneDNN's bf16 support on this CPU."""
    hw = detect("cpu")
    assert hw.cpu_capability == torch.backends.cpu.get_cpu_capability()
    assert hw.onednn_bf16 == torch.ops.mkldnn._is_mkldnn_bf16_supported()
    p = choose("auto", "auto", hw=hw)
    if not hw.onednn_bf16:
        assert p.compute == "fp32" and hw.cpu_capability in p.reason


# --- fp16 with loss scaling, trained on CPU autocast -------------------------------------------------------------

def _cfg(tiny_dir, data_file, out, *over):
    from loraforge.config import load_train_config

    return load_train_config(None, [f"model.name={tiny_dir}", f"data.train={data_file}", f"output_dir={out}",
                                    "model.dtype=fp32", "training.lr=1e-2", "training.max_steps=4",
                                    "training.batch_size=4", "training.seed=3", "training.warmup_steps=0",
                                    "data.eval_fraction=0", *over])


def _metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_fp16_trains_like_fp32_with_a_scaler(tiny_dir, data_file, tmp_path):
    from loraforge.training.loop import train

    with pytest.warns(UserWarning, match=r"training.precision=fp16 on a CPU: fp16 matmuls are emulated"):
        r16 = train(_cfg(tiny_dir, data_file, tmp_path / "fp16", "training.precision=fp16"), progress=False)
    r32 = train(_cfg(tiny_dir, data_file, tmp_path / "fp32", "training.precision=fp32"), progress=False)
    assert r16.precision.startswith("precision fp16 + loss scaling, base stored in fp32")
    assert r16.skipped_steps == 0
    # the reference: fp32 throughout, unscaled
    assert r32.precision == "precision fp32: training.precision=fp32 as asked" and r32.skipped_steps == 0
    m16, m32 = _metrics(tmp_path / "fp16"), _metrics(tmp_path / "fp32")
    assert [m["loss_scale"] for m in m16] == [65536.0] * 4 and "loss_scale" not in m32[0]
    # fp16 rounds activations to 11 significant bits: losses agree to ~1e-3 relative over 4 steps
    torch.testing.assert_close(torch.tensor([m["loss"] for m in m16]), torch.tensor([m["loss"] for m in m32]),
                               rtol=5e-3, atol=0)


@pytest.mark.parametrize("compute,storage,scaled", [("fp16", "fp16", True), ("fp16", "fp32", True),
                                                    ("fp32", "fp16", True), ("bf16", "fp16", False),
                                                    ("fp32", "bf16", False), ("bf16", "bf16", False)])
def test_the_loss_is_scaled_wherever_gradients_flow_back_in_fp16(compute, storage, scaled):
    """An fp16 base computing in fp32 has no autocast: its activations and their gradients are fp16 throughout, and
    trained without loss scaling (a tiny Llama's LoRA gradients 0.92 off fp32's at 130k tokens a step, 0.08 with
    it). Under bf16 autocast they are not fp16: no scaler."""
    p = choose(compute, storage, hw=T4, probe=never, warn=False)
    assert p.needs_scaler is scaled
    assert p.line().startswith(f"precision {compute}{' + loss scaling' if scaled else ''}")


@pytest.mark.filterwarnings("ignore:model.dtype=fp16 on a CPU")
def test_an_fp16_base_trained_in_fp32_scales_its_loss(tiny_dir, data_file, tmp_path):
    """training.precision=fp32 model.dtype=fp16 trained unscaled fp16 gradients, unsaid; now with the scaler, as
    fp16 autocast does: the loss scale in metrics.jsonl, and losses that follow an fp32 base's."""
    from loraforge.training.loop import train

    result = train(_cfg(tiny_dir, data_file, tmp_path / "fp16", "training.precision=fp32", "model.dtype=fp16"),
                   progress=False)
    reference = train(_cfg(tiny_dir, data_file, tmp_path / "fp32", "training.precision=fp32"), progress=False)
    assert result.precision == "precision fp32 + loss scaling, base stored in fp16: training.precision=fp32 as asked"
    assert reference.precision == "precision fp32: training.precision=fp32 as asked"  # the reference: unscaled fp32
    rows, ref = _metrics(tmp_path / "fp16"), _metrics(tmp_path / "fp32")
    assert [m["loss_scale"] for m in rows] == [65536.0] * 4 and "loss_scale" not in ref[0]
    # an fp16 base rounds weights and activations to 11 significant bits: ~1e-3 relative over 4 steps, as fp16 autocast
    torch.testing.assert_close(torch.tensor([m["loss"] for m in rows]), torch.tensor([m["loss"] for m in ref]),
                               rtol=5e-3, atol=0)


@pytest.mark.filterwarnings("ignore:training.precision=fp16 on a CPU")
def test_an_overflowing_fp16_step_is_skipped_and_reported(tiny_dir, data_file, tmp_path, monkeypatch, capsys):
    """Gradients made inf on the 2nd step's backward: that update is skipped (no weight changes), the scale halves,
    the learning-rate schedule waits, and metrics and the result say so."""
    import loraforge.training.loop as T

    build = T.build_model

    def build_with_overflow(*args, **kwargs):
        model, tok = build(*args, **kwargs)
        param = next(p for p in model.parameters() if p.requires_grad)
        calls = []
        param.register_hook(lambda g: (calls.append(1), g * float("inf") if len(calls) == 2 else g)[1])
        return model, tok

    updated = []  # per optimizer step: did any weight change? (fused AdamW is called and skips inside)
    adamw_step = torch.optim.AdamW.step

    def step(self, *args, **kwargs):
        params = [p for g in self.param_groups for p in g["params"]]
        before = [p.detach().clone() for p in params]
        out = adamw_step(self, *args, **kwargs)
        updated.append(any(not torch.equal(b, p) for b, p in zip(before, params)))
        return out

    monkeypatch.setattr(T, "build_model", build_with_overflow)
    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    result = T.train(_cfg(tiny_dir, data_file, tmp_path, "training.precision=fp16", "training.schedule=linear"),
                     progress=False)
    assert updated == [True, False, True, True] and result.skipped_steps == 1
    m = _metrics(tmp_path)
    assert [x["skipped_steps"] for x in m] == [0, 1, 1, 1]
    assert [x["loss_scale"] for x in m] == [65536.0, 32768.0, 32768.0, 32768.0]
    lr = [x["lr"] for x in m]
    # each row holds the rate its step's update used: step 3 used step 2's, the schedule did not move on the
    # skipped step
    assert lr[2] == lr[1] and lr[1] < lr[0] and lr[3] < lr[2]
    out = capsys.readouterr().out
    assert "step 2: fp16 gradients overflowed, update skipped and loss scale lowered to 32768" in out
    from safetensors.torch import load_file

    assert all(torch.isfinite(t).all() for t in load_file(tmp_path / "adapter" / "adapter_model.safetensors").values())


@pytest.mark.filterwarnings("ignore:training.precision=fp16 on a CPU", "ignore:lora.lora_alpha")
def test_fp16_stops_where_even_an_unscaled_step_overflows(tiny_dir, data_file, tmp_path):
    """Soak: lora_alpha 1e9 overflowed every fp16 step; the scaler halved on (23 steps, to 0.0078) until its first
    update made the loss NaN, and a 6-step run ended 'adapter written' with 6 skipped, unsaid. A step that overflows
    with the loss scaled by 1 (the true gradients pass 65504) now stops the run, after the steps torch's GradScaler
    takes from its initial scale to get there."""
    from loraforge.training.checkpoint import TrainingError
    from loraforge.training.loop import train

    reference = torch.amp.GradScaler("cpu")
    p = torch.nn.Parameter(torch.ones(1))
    opt, scales = torch.optim.SGD([p], lr=0.1), []
    while reference.get_scale() >= 1:  # every step overflows: the scale each used, until the next is below 1
        scales.append(reference.get_scale())
        (reference.scale(p.sum()) * float("inf")).backward()
        reference.step(opt)
        reference.update()
        opt.zero_grad()
    assert scales[0] == 65536.0 and scales[-1] == 1.0 and len(scales) == 17
    with pytest.raises(TrainingError) as stop:
        train(_cfg(tiny_dir, data_file, tmp_path, "training.precision=fp16", "lora.lora_alpha=1e9",
                   "training.max_steps=30", "training.batch_size=1"), progress=False)
    loss = re.search(r"the loss was ([^)]+)\)", str(stop.value)).group(1)
    assert math.isfinite(float(loss))  # the forward was fine: the gradients overflowed
    assert str(stop.value) == (
        "fp16 gradients overflowed at step 17 with the loss scaled by 1: the gradients themselves pass fp16's "
        f"±65504, which no loss scale can fix (17 steps skipped so far; the loss was {loss}); stopping. The last "
        "good checkpoint is none (no checkpoint was "
        "written yet). Check the adapter's scale, lora.lora_alpha / lora.r = 1e+09 / 8 (lower lora.lora_alpha if "
        "it is unusually large), the learning rate (training.lr 0.01) and the data; or use training.precision=bf16 "
        "where the hardware has it, or fp32")
    m = _metrics(tmp_path)  # the 16 skipped steps before it, each with the scale after its back-off
    assert [x["loss_scale"] for x in m] == scales[1:] and [x["skipped_steps"] for x in m] == list(range(1, 17))
    assert not (tmp_path / "adapter").exists()


@pytest.mark.filterwarnings("ignore:training.precision=fp16 on a CPU")
def test_metrics_say_the_precision_and_a_resume_in_another_warns(tiny_dir, data_file, tmp_path, monkeypatch):
    """Soak: the precision auto chose was printed and nowhere kept: not in metrics.jsonl, nor in a checkpoint, so a
    checkpoint of a T4's fp16 resumed where auto means something else went on in it without a word. The run's first
    metrics row now holds the precision line, and a resume where it changed warns and writes it again (a resume in
    the same precision writes rows equal to the stopped run's: test_faults)."""
    from helpers import stop_in_last_save
    from loraforge.training.loop import train

    cfg = _cfg(tiny_dir, data_file, tmp_path, "training.max_steps=3", "training.save_every=1")  # auto; base fp32
    monkeypatch.setattr("loraforge.precision.detect", lambda device="cpu": T4)
    stop_in_last_save(cfg)  # fp16 + loss scaling; checkpoints 1 and 2 written
    monkeypatch.setattr("loraforge.precision.detect", lambda device="cpu": AVX2)
    with pytest.warns(UserWarning) as caught:
        train(cfg, resume=True, progress=False)
    said = [str(w.message) for w in caught if "--resume" in str(w.message)]
    assert said == ["--resume: step-0000002 was trained in fp16 (base stored in fp32), and this run goes on in fp32 "
                    "(this CPU has no native bf16 (AVX2)): the steps from here on round differently; its fp16 loss "
                    "scale is not carried over; to continue as it was, set training.precision=fp16 model.dtype=fp32"]
    rows = _metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert [r.get("precision") for r in rows] == [
        "precision fp16 + loss scaling, base stored in fp32: Tesla T4 (compute capability 7.5) has no bf16: fp16",
        None, "precision fp32: this CPU has no native bf16 (AVX2)"]


def _overflow_at(monkeypatch, steps: set[int], where: str):
    """Make fp16 overflow at these steps (from 1): `where` "forward" (an MLP's output inf: the loss is NaN, as for a
    batch whose activations pass 65504) or "gradients" (a trainable weight's gradient inf, the loss finite)."""
    import loraforge.training.loop as T

    build, step, now = T.build_model, T.optimizer_step, [0]

    def stepping(run, batches):
        now[:] = [run.step + 1]
        return step(run, batches)

    def build_overflowing(*args, **kwargs):
        model, tok = build(*args, **kwargs)
        if where == "forward":
            model.model.layers[1].mlp.register_forward_hook(lambda m, i, o: o * float("inf") if now[0] in steps else o)
        else:
            param = next(p for p in model.parameters() if p.requires_grad)
            param.register_hook(lambda g: g * float("inf") if now[0] in steps else g)
        return model, tok

    monkeypatch.setattr(T, "build_model", build_overflowing)
    monkeypatch.setattr(T, "optimizer_step", stepping)


@pytest.mark.filterwarnings("ignore:training.precision=fp16 on a CPU")
def test_an_fp16_loss_the_forward_overflowed_is_a_skipped_step_once_and_stops_twice(tiny_dir, data_file, tmp_path,
                                                                                     monkeypatch, capsys):
    """Soak: one batch whose fp16 forward overflowed (loss NaN) stopped the run, and --resume replayed it into the same
    stop. As in torch's AMP it is now an overflowing step: skipped, counted, the scale lowered, exactly as a step
    whose gradients overflowed (the same metrics and adapter after it); a second in a row stops the run."""
    from safetensors.torch import load_file

    from loraforge.training.checkpoint import TrainingError
    from loraforge.training.loop import train

    results = {}
    for where in ("forward", "gradients"):
        with monkeypatch.context() as m:
            _overflow_at(m, {3}, where)
            out = tmp_path / where
            results[where] = train(_cfg(tiny_dir, data_file, out, "training.precision=fp16"), progress=False)
    said = capsys.readouterr().out
    assert "step 3: fp16 forward overflowed (loss nan), update skipped and loss scale lowered to 32768" in said
    assert "step 3: fp16 gradients overflowed, update skipped and loss scale lowered to 32768" in said
    forward, gradients = (_metrics(tmp_path / w) for w in ("forward", "gradients"))
    assert [r["loss"] for r in forward] == [r["loss"] if r["step"] != 3 else None for r in gradients]
    for key in ("loss_scale", "skipped_steps", "lr"):
        assert [r[key] for r in forward] == [r[key] for r in gradients]
    assert results["forward"].skipped_steps == 1 and results["forward"].final_loss == gradients[-1]["loss"]
    a, b = (load_file(tmp_path / w / "adapter" / "adapter_model.safetensors") for w in ("forward", "gradients"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    _overflow_at(monkeypatch, {3, 4}, "forward")
    with pytest.raises(TrainingError) as stop:
        train(_cfg(tiny_dir, data_file, tmp_path / "twice", "training.precision=fp16"), progress=False)
    assert str(stop.value) == (
        "loss is nan at step 4 (and was at step 3, whose update fp16's loss scaler skipped); stopping. The last good "
        "checkpoint is none (no checkpoint was written yet). Lower training.lr (it is 0.01; try 0.001); fp16 "
        "overflows past 65504: use training.precision: bf16 where the hardware has it, or fp32; check the records "
        "of this step for unusual text (very long, repeated or garbled)")


# --- the built-in model's cache under concurrency ----------------------------------------------------------------

CONVERT = """
import sys, time
from pathlib import Path
from loraforge.models import cached_conversion

def build(gguf, tmp):  # a stand-in for the ~20 s de-quantization: slow, and written file by file
    with open(sys.argv[2], "a") as log:
        log.write("built\\n")
    (tmp / "config.json").write_text("{}")
    time.sleep(1.5)
    (tmp / "model.safetensors").write_bytes(b"x" * 1000)

print(cached_conversion(Path(sys.argv[3]), Path(sys.argv[1]), build), flush=True)
"""


def test_concurrent_conversions_end_with_one_complete_cache(tmp_path):
    """Three processes asking for the same conversion at once (torchrun ranks on a fresh machine): one converts,
    the others wait and use its result; all succeed, nothing half-written is left."""
    import subprocess
    import sys

    script, log, out, gguf = tmp_path / "c.py", tmp_path / "builds.log", tmp_path / "cache" / "m-1", tmp_path / "m.gguf"
    script.write_text(CONVERT)
    gguf.write_bytes(b"GGUF")
    procs = [subprocess.Popen([sys.executable, str(script), str(out), str(log), str(gguf)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(3)]
    results = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [r[1] for r in results]
    assert [r[0].strip().splitlines()[-1] for r in results] == [str(out)] * 3
    assert log.read_text() == "built\n"  # converted once
    assert sum("waiting: another process is converting m.gguf" in r[0] for r in results) >= 1
    assert (out / "model.safetensors").stat().st_size == 1000
    assert sorted(p.name for p in out.parent.iterdir()) == ["m-1", "m-1.lock"]  # no temporary directory left


def test_without_locks_the_first_rename_wins(tmp_path, monkeypatch):
    """Where there are no file locks (Windows), a process that finds the cache written by another while it
    converted uses that one and removes its own copy."""
    import contextlib

    import loraforge.models as M

    out = tmp_path / "m-1"
    monkeypatch.setattr(M, "_file_lock", lambda *a: contextlib.nullcontext())

    def build(gguf, tmp):
        (tmp / "config.json").write_text("{}")
        (tmp / "model.safetensors").write_bytes(b"mine")
        out.mkdir()  # another process's complete result lands first
        (out / "config.json").write_text("{}")
        (out / "model.safetensors").write_bytes(b"theirs")

    assert M.cached_conversion(tmp_path / "m.gguf", out, build) == out
    assert (out / "model.safetensors").read_bytes() == b"theirs"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m-1"]


def test_a_cache_directory_without_a_checkpoint_is_refused_not_used(tmp_path):
    import loraforge.models as M

    out = tmp_path / "m-1"
    out.mkdir()
    (out / "config.json").write_text("{}")  # no weights: half a checkpoint
    with pytest.raises(FileExistsError, match="holds no complete checkpoint.*delete it and run again"):
        M.cached_conversion(tmp_path / "m.gguf", out, lambda g, t: None)


def test_a_conversion_the_disk_refuses_leaves_nothing_and_says_so(tmp_path):
    import errno

    import loraforge.models as M
    from loraforge.utils.files import DiskError

    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"x" * 1000)

    def build(g, tmp):
        (tmp / "config.json").write_text("{}")
        raise OSError(errno.ENOSPC, "No space left on device")

    free = r"\([0-9.]+ [kMGT]?B free there\)"  # a stand-in build: no size needed is known
    with pytest.raises(DiskError, match=r"cannot write .*m-1: no space left on the device " + free + r"; converted "
                                        r"models are cached there: free space, or set LORAFORGE_CACHE to a folder "
                                        r"with room$"):
        M.cached_conversion(gguf, tmp_path / "m-1", build)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m-1.lock", "m.gguf"]


def test_the_dtype_fix_names_what_auto_gives_with_the_precision_given():
    """Under --precision fp32 on a bf16 CPU the --dtype fp16 warning said "Use --dtype auto (bf16 on this machine)",
    but auto storage follows the compute precision: fp32 there. The fix says what auto gives with that
    --precision, and names the hardware's choice where auto would follow it to an emulated precision."""
    names = {"names": ("--precision", "--dtype"), "training": False}
    cases = [
        (("fp32", "fp16", SAPPHIRE), "fp32", "--dtype auto (fp32 with --precision fp32)"),
        (("auto", "fp16", SAPPHIRE), "bf16", "--dtype auto (bf16 on this machine)"),
        (("bf16", "fp16", SAPPHIRE), "bf16", "--dtype auto (bf16 with --precision bf16)"),
        (("fp16", "fp16", SAPPHIRE), "fp16", "--dtype bf16 on this machine (--dtype auto follows --precision fp16: "
                                             "fp16, emulated here too)"),
        (("fp32", "bf16", AVX2), "fp32", "--dtype auto (fp32 with --precision fp32)"),
        (("auto", "bf16", AVX2), "fp32", "--dtype auto (or fp32) on this machine"),
    ]
    for (precision, dtype, hw), auto_storage, fix in cases:
        assert choose(precision, "auto", hw=hw, probe=never, warn=False).storage == auto_storage  # what auto gives
        with pytest.warns(UserWarning) as caught:
            choose(precision, dtype, hw=hw, probe=never, **names)
        assert str(caught[-1].message).startswith(f"--dtype {dtype} on a CPU")
        assert str(caught[-1].message).endswith(f". Use {fix}"), (precision, dtype)
