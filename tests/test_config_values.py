"""Config values that would crash deep in training or silently train nothing are refused when the config loads,
each naming the field as the user types it."""

import os
import threading
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from helpers import default_recursion_limit, tiny_llama
from loraforge.config import ConfigError, expanded_size, load_train_config, read_yaml, yaml_loader
from loraforge.models import resolve_model
from loraforge.training.data import DataError, read_records
from loraforge.training import epochs, loop
from loraforge.training.loop import build_model, lr_lambda
from loraforge.training.optim import loraplus_param_groups

DATA = "data.train=train.jsonl"
ROOT = Path(__file__).parent.parent


def problems(*overrides, base=None) -> list[str]:
    with pytest.raises(ConfigError) as e:
        load_train_config(None, [*overrides] if base else [DATA, *overrides], base=base)
    return e.value.problems


@pytest.mark.parametrize("override, problem", [
    ("training.lr=.nan", "training.lr: must be a finite number, got nan (e.g. 2e-4)"),
    ("training.lr=.inf", "training.lr: must be a finite number, got inf (e.g. 2e-4)"),
    ("training.epochs=.nan", "training.epochs: must be a finite number, got nan (e.g. 1)"),
    ("training.max_grad_norm=.nan", "training.max_grad_norm: must be a finite number, got nan (e.g. 1.0)"),
    ("training.weight_decay=.inf", "training.weight_decay: must be a finite number, got inf (e.g. 0.01)"),
    ("training.loraplus_lr_ratio=.nan", "training.loraplus_lr_ratio: must be a finite number, got nan (e.g. 16)"),
    ("training.collective_timeout=.nan", "training.collective_timeout: must be a finite number, got nan (e.g. 600)"),
    # the process group's timedelta overflowed: a traceback from every process (1e9 starts a group: tried)
    ("training.collective_timeout=1e15", "training.collective_timeout: must be positive (seconds) and at most 1e+09 "
                                         "(31 years), got 1000000000000000.0"),
])
def test_nan_and_inf_training_values_are_refused_by_name(override, problem):
    assert problems(override) == [problem]


def test_a_pattern_written_without_the_space_yaml_needs_says_so():
    """Soak: `lora.rank_pattern={q_proj:64}` is YAML's key 'q_proj:64' with no value; the message said
    "lora.rank_pattern.q_proj:64: must be a positive integer …, got None"."""
    assert problems("lora.rank_pattern={q_proj:64}", "lora.alpha_pattern={v_proj:-0.5}") == [
        "lora.rank_pattern: {q_proj:64} reads as the key 'q_proj:64' with no value (YAML needs a space after the "
        "colon): write {q_proj: 64} (in quotes on a command line)",
        "lora.alpha_pattern: {v_proj:-0.5} reads as the key 'v_proj:-0.5' with no value (YAML needs a space after "
        "the colon): write {v_proj: -0.5} (in quotes on a command line)"]


def test_full_fine_tuning_of_a_quantized_base_is_refused_by_name():
    """bitsandbytes' "only Tensors of floating point dtype can require gradients" traceback, at the model's load."""
    assert problems("method=full", "model.quantization=nf4") == [
        "model.quantization: nf4 stores the base in a few bits, which method: full cannot train (every weight "
        "trains); remove model.quantization, or train an adapter on the quantized base (method: qlora or lora)"]


def test_lora_plus_with_full_fine_tuning_is_refused_by_name():
    """LoRA+ speeds up lora_B, which method full has none of: its groups (optim.loraplus_param_groups) put every 1-D
    weight, the RMSNorms' of a tiny Llama, at lr × ratio and the rest at lr, and the run trained so without a word
    (soak)."""
    model = tiny_llama().requires_grad_(True)
    groups = {g["name"]: g for g in loraplus_param_groups(model, lr=1e-3, ratio=16)}
    norms = [p for name, p in model.named_parameters() if "norm" in name]
    assert groups["no_decay"]["lr"] == pytest.approx(16e-3) and groups["lora_B"]["params"] == []
    assert [id(p) for p in groups["no_decay"]["params"]] == [id(p) for p in norms]
    assert problems("method=full", "training.loraplus_lr_ratio=16") == [
        "training.loraplus_lr_ratio: 16 is LoRA+ (lora_B trains at lr × this ratio), but method: full has no adapter "
        "and no lora_B: its norms and biases would train at 16 × training.lr and every other weight at training.lr; "
        "remove training.loraplus_lr_ratio, or use method: lora"]


def test_nan_and_inf_source_weights_and_epochs_are_refused_by_name():
    sources = {"data": {"train": [{"path": "a.jsonl", "weight": float("nan")}, {"path": "b.jsonl", "weight": 1},
                                  {"path": "c.jsonl", "weight": float("inf")}]}}
    assert problems(base=sources) == ["data.train[0].weight: must be a finite number, got nan (e.g. 1)",
                                      "data.train[2].weight: must be a finite number, got inf (e.g. 1)"]
    assert problems("data.train=[{path: a.jsonl, epochs: .nan}]", base={"data": {}}) == [
        "data.train[0].epochs: must be a finite number, got nan (e.g. 1)"]


def test_values_that_train_nothing_or_backwards_are_refused():
    ratio = "lora_B trains at lr × this ratio, so 0 freezes it and a negative value ascends the loss (e.g. 16)"
    assert problems("training.loraplus_lr_ratio=-3") == [
        f"training.loraplus_lr_ratio: must be positive or null (off), got -3.0: {ratio}"]
    assert problems("training.loraplus_lr_ratio=0") == [
        f"training.loraplus_lr_ratio: must be positive or null (off), got 0.0: {ratio}"]
    assert problems("training.weight_decay=-5") == [
        "training.weight_decay: must be ≥ 0, got -5.0 (0 for none; e.g. 0.01)"]
    assert problems("training.max_steps=3", "training.warmup_steps=999999999") == [
        "training.warmup_steps: 999999999 is not less than max_steps (3), so the learning rate would still be "
        "rising when training stops; use at most 2 (typically 3-10% of the steps, e.g. 1)"]
    # a warmup whose last step runs at the peak (max_steps - 1): allowed, as are the usual values
    cfg = load_train_config(None, [DATA, "training.max_steps=3", "training.warmup_steps=2",
                                   "training.loraplus_lr_ratio=16", "training.weight_decay=0.01"])
    assert (cfg.training.warmup_steps, cfg.training.loraplus_lr_ratio, cfg.training.weight_decay) == (2, 16.0, 0.01)


@pytest.mark.parametrize("ratio", [None, 100])
def test_a_weight_decay_that_would_zero_or_flip_the_weights_each_step_is_refused(ratio):
    """AdamW multiplies a decayed weight by 1 − rate × weight_decay each step (torch's own AdamW, checked on a
    weight with no gradient): at rate × weight_decay ≥ 1 that zeroes it or flips its sign, and a run ended with a NaN
    loss whose advice (lower lr, fp32, check the records) missed the cause. lora_B's rate under LoRA+ is
    lr × loraplus_lr_ratio."""
    plus = [f"training.loraplus_lr_ratio={ratio}"] if ratio else []
    rate = 2e-4 * (ratio or 1)
    w = torch.nn.Parameter(torch.ones(1, dtype=torch.float64))
    w.grad = torch.zeros_like(w)
    torch.optim.AdamW([w], lr=rate, weight_decay=1e9).step()
    (problem,) = problems("training.lr=2e-4", "training.weight_decay=1e9", *plus)
    named = f"lr × loraplus_lr_ratio = {rate:g}" if ratio else f"lr {rate:g}"
    assert problem == (f"training.weight_decay: 1e+09 at {named} is too large: AdamW multiplies each decayed weight "
                       f"by 1 − rate × weight_decay = {w.item():g} every step, so each step would zero the weights or "
                       f"flip their sign; use a weight_decay below {1 / rate:g} (typically 0 to 0.1)")
    assert problems("training.lr=2e-4", f"training.weight_decay={1 / rate}", *plus)  # exactly zeroed: refused
    cfg = load_train_config(None, [DATA, "training.lr=2e-4", f"training.weight_decay={0.99 / rate}", *plus])
    assert cfg.training.weight_decay == pytest.approx(0.99 / rate)


def test_a_key_written_twice_is_refused_with_both_lines_not_read_as_the_last(tmp_path):
    """PyYAML keeps the last of two equal keys: a second `training:` section silently replaced the first one's lr
    and max_steps. Refused, naming the key and both lines; a YAML merge key (<<) may repeat, as YAML allows."""
    twice = tmp_path / "twice.yaml"
    twice.write_text("training:\n  lr: 1.0e-4\n  max_steps: 5\ndata: {train: train.jsonl}\ntraining:\n  lr: 2.0e-4\n")
    with pytest.raises(ConfigError) as e:
        load_train_config(str(twice))
    assert e.value.problems == [f"{twice}:5: training is written twice (first on line 1); YAML keeps only the last, "
                                f"so the first one's settings would be dropped without a word: write it once"]
    nested = tmp_path / "nested.yaml"
    nested.write_text("data: {train: train.jsonl}\nlora:\n  r: 4\n  lora_alpha: 8\n  r: 16\n")
    with pytest.raises(ConfigError, match=r"nested.yaml:5: r is written twice \(first on line 3\)"):
        load_train_config(str(nested))
    assert problems("lora.rank_pattern={q: 4, q: 8}") == [
        "override 'lora.rank_pattern={q: 4, q: 8}': q is written twice (first on line 1); YAML keeps only the last, "
        "so the first one's settings would be dropped without a word: write it once"]
    merged = "base: &b {lr: 1.0e-4}\nmore: &m {max_steps: 3}\ntraining:\n  <<: *b\n  <<: *m\n"
    assert yaml.load(merged, Loader=yaml_loader())["training"] == {"lr": 1e-4, "max_steps": 3}


def test_method_contradicting_the_lora_fields_written():
    assert problems("method=dora", "lora.use_dora=false") == [
        "lora.use_dora: false contradicts method: dora (which trains DoRA); remove lora.use_dora, or use method: "
        "lora for plain LoRA"]
    assert load_train_config(None, [DATA, "method=dora", "lora.use_dora=true"]).method == "dora"
    with pytest.warns(UserWarning) as record:
        cfg = load_train_config(None, [DATA, "method=full", "lora.r=4", "lora.lora_alpha=8"])
    assert cfg.method == "full"
    assert [str(w.message) for w in record] == [
        "lora.lora_alpha, lora.r: ignored with method: full, which trains every weight and has no adapter; remove "
        "them, or use method: lora"]


def test_adalora_refuses_the_lora_fields_it_would_ignore_and_warns_about_lora_r():
    """method: adalora trains its own update, ranks, scale and init: lora: fields that would change what a LoRA run
    trains are refused by name; lora.r (AdaLoRA's ranks are adalora.init_r / target_r) gets one warning."""
    assert problems("method=adalora", "lora.use_dora=true", "lora.use_rslora=true", "lora.init_lora_weights=pissa",
                    "lora.modules_to_save=[lm_head]", "lora.rank_pattern={q_proj: 4}",
                    "lora.alpha_pattern={q_proj: 2}") == [
        "lora.use_dora: true is not supported with method: adalora (AdaLoRA trains its own SVD-shaped update, with "
        "no DoRA magnitude); remove lora.use_dora, or use method: dora",
        "lora.use_rslora: true is not supported with method: adalora (AdaLoRA scales every layer by lora_alpha / "
        "adalora.init_r); remove lora.use_rslora, or use method: lora",
        "lora.init_lora_weights: 'pissa' is not supported with method: adalora (AdaLoRA starts E at zero and A, B ~ "
        "N(0, 0.02)); remove lora.init_lora_weights, or use method: lora",
        "lora.modules_to_save: ['lm_head'] is not supported with method: adalora (an AdaLoRA adapter trains and "
        "saves no whole modules); remove lora.modules_to_save, or use method: lora",
        "lora.rank_pattern: {'q_proj': 4} is not supported with method: adalora (AdaLoRA allocates every layer's "
        "rank itself, from adalora.init_r down to adalora.target_r); remove lora.rank_pattern, or use method: lora",
        "lora.alpha_pattern: {'q_proj': 2} is not supported with method: adalora (AdaLoRA scales every layer by "
        "lora_alpha / adalora.init_r); remove lora.alpha_pattern, or use method: lora"]
    assert problems("method=adalora", "lora.init_lora_weights=false") == [
        "lora.init_lora_weights: false is not supported with method: adalora (AdaLoRA starts E at zero and A, B ~ "
        "N(0, 0.02)); remove lora.init_lora_weights, or use method: lora"]
    with pytest.warns(UserWarning) as record:
        cfg = load_train_config(None, [DATA, "method=adalora", "lora.r=4", "lora.lora_alpha=32"])
    assert cfg.method == "adalora" and [str(w.message) for w in record] == [
        "lora.r: 4 is not used with method: adalora, whose ranks are adalora.init_r (every layer's at the start) "
        "and adalora.target_r (the average it prunes to); remove lora.r, or set those"]
    with warnings.catch_warnings():  # the defaults written out, and the lora: fields AdaLoRA does use: silent
        warnings.simplefilter("error")
        load_train_config(None, [DATA, "method=adalora", "lora.r=8", "lora.use_dora=false", "lora.use_rslora=false",
                                 "lora.init_lora_weights=true", "lora.lora_alpha=32", "lora.lora_dropout=0.1",
                                 "lora.target_modules=[q_proj]", "adalora.init_r=6"])
    # method lora keeps every one of them
    assert load_train_config(None, [DATA, "lora.use_rslora=true", "lora.init_lora_weights=pissa"]).lora.use_rslora


def test_an_override_that_is_not_yaml_names_the_override():
    assert problems("lora.target_modules=[") == [
        "override 'lora.target_modules=[': the value is not valid YAML (while parsing a flow node); close every [ "
        "and { (e.g. lora.target_modules=[a, b] or lora.target_modules={k: v}), or quote a string that holds them"]
    assert problems("adalora={foo:")[0].startswith("override 'adalora={foo:': the value is not valid YAML (")


def test_an_override_with_a_yaml_tag_is_told_to_write_a_plain_value():
    # soak (a form value from the dashboard): the hint about closing [ and { did not apply to a tag
    assert problems("training.lr=!!python/object:os.system") == [
        "override 'training.lr=!!python/object:os.system': the value's YAML tag cannot be read (could not determine "
        "a constructor for the tag 'tag:yaml.org,2002:python/object:os.system'); write a plain number, string, list "
        "or mapping, or quote a string that starts with !"]


def test_a_misspelled_section_or_field_gets_a_suggestion():
    assert problems("trainig.lr=1") == ["trainig: unknown field (did you mean 'training'?)"]
    assert problems("training.wieght_decay=0.1") == ["training.wieght_decay: unknown field (did you mean "
                                                     "'weight_decay'?)"]
    assert problems("training.xyz=1")[0].startswith("training.xyz: unknown field (known: activation_buffer, "
                                                    "attention, ")


def test_a_whole_section_override_sets_the_fields_it_names_and_keeps_the_others(tmp_path):
    # soak: lora={r: 2} after lora.lora_alpha=8 trained at alpha 16 (the default), and dropped the file's lora fields
    config = tmp_path / "run.yaml"
    config.write_text("data: {train: train.jsonl}\nlora: {target_modules: [v_proj], lora_dropout: 0.1}\n")
    cfg = load_train_config(str(config), ["lora.lora_alpha=8", "lora={r: 2}"])
    assert (cfg.lora.r, cfg.lora.lora_alpha, cfg.lora.target_modules, cfg.lora.lora_dropout) == (2, 8, ("v_proj",), 0.1)
    # a field whose value is a mapping is still replaced whole
    config.write_text("data: {train: train.jsonl}\nlora: {rank_pattern: {q_proj: 4}}\n")
    cfg = load_train_config(str(config), ["lora.rank_pattern={v_proj: 2}"])
    assert cfg.lora.rank_pattern == {"v_proj": 2}


def test_a_name_from_another_trainer_or_its_misspelling_points_to_our_field():
    # soak: training.lerning_rate listed all 30 fields; transformers' and PEFT's names map to ours
    assert problems("training.lerning_rate=1") == ["training.lerning_rate: unknown field (did you mean 'lr'?)"]
    assert problems("training.learning_rate=1") == ["training.learning_rate: unknown field (did you mean 'lr'?)"]
    assert problems("training.num_train_epochs=1") == ["training.num_train_epochs: unknown field (did you mean "
                                                       "'epochs'?)"]
    assert problems("lora.rank=4") == ["lora.rank: unknown field (did you mean 'r'?)"]
    assert problems("data.max_length=64") == ["data.max_length: unknown field (did you mean 'max_seq_len'?)"]


def test_a_field_written_in_the_wrong_section_names_the_section_it_belongs_in():
    assert problems("training.r=4") == ["training.r: unknown field; r belongs in the lora: section (write lora.r)"]
    assert problems("lora.lr=1e-4") == ["lora.lr: unknown field; lr belongs in the training: section "
                                        "(write training.lr)"]
    assert problems("max_seq_len=64") == ["max_seq_len: unknown field; max_seq_len belongs in the data: section "
                                          "(write data.max_seq_len)"]


def test_numbers_past_floats_range_or_pythons_digit_limit_are_refused_by_field(tmp_path):
    """1 and 400 zeros is a YAML int that float() refuses (OverflowError); 5,000 digits is more than Python's
    int() reads (ValueError): both were tracebacks (HTTP 500 from the dashboard's form)."""
    assert problems("training.lr=1" + "0" * 400) == ["training.lr: 401-digit number is too large (a float ends "
                                                     "near 1.8e308)"]
    assert problems("training.max_steps=" + "9" * 5000) == ["override training.max_steps=99999999999999999999...: "
                                                            "a 5000-character number is too long to read"]
    (tmp_path / "big.yaml").write_text("data: {train: a.jsonl}\ntraining: {max_steps: " + "9" * 5000 + "}\n")
    with pytest.raises(ConfigError, match=r"big.yaml: a number in it is too long to read \(Exceeds the limit"):
        load_train_config(str(tmp_path / "big.yaml"))


def test_a_value_nested_too_deeply_is_refused_by_field_not_a_recursion_error(tmp_path):
    """3,000 [ in an override or a file was a RecursionError traceback from PyYAML (HTTP 500 from the form)."""
    with default_recursion_limit():
        said = problems("training.batch_size=" + "[" * 3000)
    assert said == [
        "override training.batch_size=[[[[[[[[[[[[[[[[[[[[...: the value is nested too deeply to read (hundreds of [ "
        "or { levels); write it with fewer levels of brackets"]
    (tmp_path / "deep.yaml").write_text("data: {train: a.jsonl}\ntraining: {batch_size: " + "[" * 3000 + "]" * 3000
                                        + "}\n")
    with pytest.raises(ConfigError) as e, default_recursion_limit():
        load_train_config(str(tmp_path / "deep.yaml"))
    assert e.value.problems == [f"{tmp_path / 'deep.yaml'}: a value in it is nested too deeply to read (hundreds of "
                                f"[ or {{ levels); write it with fewer levels of brackets"]


@pytest.mark.parametrize("max_steps, bound, example", [(100, 99, 5), (2, 1, 1), (1, 0, 0)])
def test_warmup_steps_must_leave_the_last_step_at_the_peak_rate(max_steps, bound, example):
    """Step k (from 0) runs at lr·(k+1)/(warmup_steps+1) below warmup_steps, so warmup_steps = max_steps left the
    last step below the peak (a hunt's metrics never reached it); max_steps - 1 is the largest that reaches it."""
    assert problems(f"training.max_steps={max_steps}", f"training.warmup_steps={max_steps}") == [
        f"training.warmup_steps: {max_steps} is not less than max_steps ({max_steps}), so the learning rate would "
        f"still be rising when training stops; use at most {bound} (typically 3-10% of the steps, e.g. {example})"]
    assert load_train_config(None, [DATA, f"training.max_steps={max_steps}", f"training.warmup_steps={bound}"])
    last = max_steps - 1  # the schedule's factor at the last step: below 1 with the refused value, 1 with the bound
    assert lr_lambda("constant", max_steps, max_steps)(last) < 1 == lr_lambda("constant", bound, max_steps)(last)


def test_training_refuses_an_alpha_that_trains_nothing_or_backwards():
    """Adapter files may hold lora_alpha 0 or negative (PEFT reads them); a run is refused them by name."""
    assert problems("lora.lora_alpha=0", "lora.alpha_pattern={v_proj: -2}") == [
        "lora.lora_alpha: must be positive to train, got 0.0 (try 2*r; 0 trains nothing, a negative alpha only flips "
        "the sign B learns)",
        "lora.alpha_pattern.v_proj: must be positive to train, got -2 (try 2*r; 0 trains nothing, a negative alpha "
        "only flips the sign B learns)"]


def test_max_steps_past_any_run_is_refused():
    """Soak (the dashboard's form): max_steps 10**400 passed and the run crashed in its progress bar (int too large
    to convert to float); 10**15 steps is the most a run takes."""
    assert problems("training.max_steps=1" + "0" * 400) == [
        "training.max_steps: at most 1e+15 (at a step a microsecond, 30 years), got a number of 401 digits"]
    assert problems("training.max_steps=1" + "0" * 16) == [
        "training.max_steps: at most 1e+15 (at a step a microsecond, 30 years), got 10000000000000000"]
    assert load_train_config(None, [DATA, "training.max_steps=1" + "0" * 15]).training.max_steps == 10**15


def test_training_refuses_an_alpha_whose_scale_overflows_fp32():
    """lora_alpha 1e300 gave the scale inf (as PEFT's does): every update inf, a NaN loss at step 1. The largest
    alpha whose scale fp32 holds still trains; with use_rslora the scale is alpha / sqrt(r)."""
    assert problems("lora.lora_alpha=1e300", "lora.r=8") == [
        "lora.lora_alpha: 1e+300 makes the scale lora_alpha / r (1.25e+299) overflow fp32, so every update and every "
        "output of the adapter is inf (try 2*r)"]
    assert problems("lora.lora_alpha=2e39", "lora.r=4", "lora.use_rslora=true") == [
        "lora.lora_alpha: 2e+39 makes the scale lora_alpha / sqrt(r) (1e+39) overflow fp32, so every update and every "
        "output of the adapter is inf (try 2*r)"]
    assert load_train_config(None, [DATA, "lora.lora_alpha=3e39", "lora.r=16"]).lora.lora_alpha == 3e39  # 1.9e38


def test_a_config_file_in_utf16_is_read_and_one_with_a_latin1_byte_is_named(tmp_path):
    """A UTF-16 file (Windows editors) and a Latin-1 comment were UnicodeDecodeError tracebacks."""
    text = "# café\ndata: {train: a.jsonl}\nlora: {r: 4}\n"
    (tmp_path / "utf16.yaml").write_bytes(text.encode("utf-16"))  # with its byte-order mark
    assert load_train_config(str(tmp_path / "utf16.yaml")).lora.r == 4
    (tmp_path / "latin1.yaml").write_bytes(text.encode("latin-1"))
    with pytest.raises(ConfigError) as e:
        load_train_config(str(tmp_path / "latin1.yaml"))
    path = tmp_path / "latin1.yaml"
    assert e.value.problems == [f"{path}:1: byte 0xe9 is not UTF-8; save the file as UTF-8 (iconv -f latin1 -t "
                                f"utf-8 {path} > fixed.yaml)"]


def test_a_config_read_from_a_pipe_loads_and_only_a_missing_one_is_no_such_file(tmp_path):
    """Soak: `loraforge train <(sed ... base.yaml)` and `... | loraforge train /dev/stdin` were "no such config file"
    (a pipe is no regular file), and so was /dev/null. A pipe is read once, as a file; /dev/null is an empty config."""
    fifo = tmp_path / "config.fifo"
    os.mkfifo(fifo)
    writer = threading.Thread(target=fifo.write_text, args=("data: {train: a.jsonl}\nlora: {r: 3}\n",), daemon=True)
    writer.start()
    try:
        assert load_train_config(str(fifo)).lora.r == 3
    finally:
        writer.join(timeout=10)
    with pytest.raises(ConfigError) as e:
        load_train_config(os.devnull)
    assert e.value.problems == ["data: missing; give at least data.train (a dataset file)"]
    with pytest.raises(ConfigError) as e:
        load_train_config(str(tmp_path / "nope.yaml"))
    assert e.value.problems == [f"{tmp_path / 'nope.yaml'}: no such config file; give the path of a training YAML "
                                f"file"]


@pytest.mark.parametrize("path", ["examples/demo.yaml", "examples/times.yaml"])
def test_shipped_configs_still_load(path):
    assert load_train_config(str(ROOT / path)).data.train


@pytest.mark.parametrize("field, problem", [
    (dict(tfinal=-100), "tfinal: must be ≥ 0 (steps), got -100"),  # trained on, short of target_r
    (dict(tinit=-3), "tinit: must be ≥ 0 (steps), got -3"),
    (dict(orth_reg_weight=float("inf")), "orth_reg_weight: must be a finite number >= 0, got inf (try 0.5)"),
    (dict(orth_reg_weight=float("nan")), "orth_reg_weight: must be a finite number >= 0, got nan (try 0.5)"),
    (dict(tfinal=10), "tfinal: 10 leaves no budget phase (tinit 0 + tfinal 10 ≥ total_step 6); lower tinit/tfinal "
                      "or raise total_step (in a training run: training.max_steps, or training.epochs)"),
    (dict(tinit=6), "tinit: 6 leaves no budget phase (tinit 6 + tfinal 0 ≥ total_step 6); lower tinit/tfinal or "
                    "raise total_step (in a training run: training.max_steps, or training.epochs)"),
])
def test_adalora_schedule_values_are_refused_naming_the_field_set(field, problem):
    """Found by a hunt (the run prefixes them with adalora.): negative tinit/tfinal trained on with a wrong final
    rank, an infinite orthogonality weight ended in a NaN gradient blamed on the learning rate, and tfinal's
    overreach was named tinit's."""
    from loraforge.lora.adalora import AdaLoraConfig

    with pytest.raises(ConfigError) as e:
        AdaLoraConfig(target_modules=("q_proj",), total_step=6, **field)
    assert problem in e.value.problems


@pytest.mark.parametrize("seed", [2 ** 64, -1])
def test_a_seed_outside_torchs_range_is_refused(seed):
    """2**64 ended in a traceback from torch.manual_seed."""
    assert problems(f"training.seed={seed}") == [f"training.seed: must be a whole number from 0 to 2**64 - 1, got "
                                                 f"{seed}"]


def test_pissa_and_olora_on_a_quantized_base_are_refused_before_loading():
    """They ended in a 13-frame TypeError after the 4-bit model loaded, advising a step train cannot take."""
    assert problems("method=qlora", "lora.init_lora_weights=olora") == [
        "lora.init_lora_weights: olora starts from the base's own weights, which the nf4 base (method qlora) holds "
        "quantized; use the default init (true), or train without quantization"]
    assert problems("model.quantization=int8", "lora.init_lora_weights=pissa_niter_4")[0].startswith(
        "lora.init_lora_weights: pissa_niter_4 starts from the base's own weights, which the int8 base")


def test_a_batch_size_written_beside_batch_tokens_is_said_to_be_unused():
    """batch_tokens decides each micro-batch: a batch_size written with it was dropped without a word."""
    said = (r"^training\.batch_size 4 is not used: training\.batch_tokens 120 fills each micro-batch with examples up "
            r"to that many tokens \(remove one of the two\)$")
    with pytest.warns(UserWarning, match=said):
        load_train_config(None, [DATA, "training.batch_size=4", "training.batch_tokens=120"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_train_config(None, [DATA, "training.batch_tokens=120"])  # the default batch_size: nothing to say



KEEP_BEST_UNUSED = ("training.keep_best: true keeps the checkpoint of the lowest held-out loss, but this run holds "
                    "no data out (no data.eval, and data.eval_fraction is 0): nothing is evaluated, so it keeps only "
                    "the training.keep_checkpoints (2) newest; give data.eval (or data.eval_fraction above 0, e.g. "
                    "0.05), or remove training.keep_best")


@pytest.mark.parametrize("written, said", [
    (["training.keep_best=true", "data.eval_fraction=0"], True),
    (["training.keep_best=true", "data.eval_fraction=0.0", "data.eval=[]"], True),
    (["data.eval_fraction=0"], False),  # the default: on either way, not asked for
    (["training.keep_best=false", "data.eval_fraction=0"], False),
    (["training.keep_best=true"], False),  # data.eval_fraction 0.05 holds data out
    (["training.keep_best=true", "data.eval_fraction=0", "data.eval=held.jsonl"], False),
])
def test_keep_best_written_without_held_out_data_is_said_to_keep_nothing(written, said):
    """keep_best keeps the checkpoint of the lowest held-out loss: written true in a run that holds no data out, it
    kept nothing of its own without a word. A warning where the config writes it (the file or the command line);
    the default, not written, says nothing. The reference: what the config says is held out."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cfg = load_train_config(None, [DATA, *written])
    evaluated = bool(cfg.data.eval) or cfg.data.eval_fraction > 0
    assert [str(w.message) for w in caught] == ([KEEP_BEST_UNUSED] if said else [])
    assert said == ("training.keep_best=true" in written and not evaluated)


def test_keep_best_written_in_the_file_without_held_out_data_is_said_too(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("training:\n  keep_best: true\ndata:\n  eval_fraction: 0\n")
    with pytest.warns(UserWarning) as caught:
        load_train_config(str(path), [DATA])
    assert [str(w.message) for w in caught] == [KEEP_BEST_UNUSED]


def test_batch_size_and_batch_tokens_from_the_file_and_the_command_line_say_a_fix_that_works(tmp_path):
    """Soak (docs): a file's batch_size with batch_tokens on the command line was told "remove one of the two", which
    the command line cannot do (training.batch_size=null is refused); a batch_size typed on the command line beside a
    file's batch_tokens was dropped with that same advice."""
    with_size, with_tokens = tmp_path / "size.yaml", tmp_path / "tokens.yaml"
    with_size.write_text("training:\n  batch_size: 4\n")
    with_tokens.write_text("training:\n  batch_tokens: 120\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the command line's batch_tokens says what it means for this run
        assert load_train_config(str(with_size), [DATA, "training.batch_tokens=120"]).training.batch_tokens == 120
    said = (r"^training\.batch_size 4 is not used: training\.batch_tokens 120 fills each micro-batch with examples "
            r"up to that many tokens \(add training\.batch_tokens=null to batch by training\.batch_size\)$")
    with pytest.warns(UserWarning, match=said):
        load_train_config(str(with_tokens), [DATA, "training.batch_size=4"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the fix it names, followed
        cfg = load_train_config(str(with_tokens), [DATA, "training.batch_size=4", "training.batch_tokens=null"])
    assert (cfg.training.batch_size, cfg.training.batch_tokens) == (4, None)

def test_activation_buffer_and_reuse_memory_take_true_false_or_auto():
    """Anything but a boolean or 'auto' is named, with what the field takes."""
    assert load_train_config(None, [DATA, "training.activation_buffer=auto"]).training.activation_buffer == "auto"
    assert problems("training.activation_buffer=sometimes") == [
        "training.activation_buffer: expected true, false or 'auto', got 'sometimes'"]
    assert problems("training.reuse_memory=2") == ["training.reuse_memory: expected true, false or 'auto', got 2"]


@pytest.mark.parametrize("override", ['lora.target_modules="q_proj|v_proj\\n"',
                                      'lora.target_modules=["q_proj", "v\\tproj"]'])
def test_a_target_module_with_a_control_character_is_refused_before_any_model_loads(override):
    """A newline pasted into the YAML string: a valid regex that matches no layer, found only once the model loaded."""
    (problem,) = problems(override)
    assert problem.startswith("lora.target_modules: ") and "holds a control character" in problem
    assert ("'q_proj|v_proj\\n'" in problem) != ("'v\\tproj'" in problem)


def test_an_alias_bomb_is_refused_before_any_check_walks_it(tmp_path):
    """Soak: nine nested aliases reaching lora.r hung `train` past 120 s at 2.5 GB (the message's repr expanded
    9^9 values), or died of MemoryError; the expansion is counted once per object now."""
    lines = ["zz:", "  x0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    lines += [f"  x{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)]
    (tmp_path / "bomb.yaml").write_text("\n".join(lines + ["lora: {r: *a8}", "data: {train: t.jsonl}", ""]))
    with pytest.raises(ConfigError) as e:
        load_train_config(str(tmp_path / "bomb.yaml"))
    x = [10]  # x0: a list of 9 strings; each x_i a list of 9 x_(i-1): as many values as a reader would walk
    for _ in range(8):
        x.append(1 + 9 * x[-1])
    total = 1 + (1 + sum(x)) + (1 + x[-1]) + 2  # the top mapping, zz, lora (r: x8) and data
    assert total == 926_177_109
    assert e.value.problems == [f"{tmp_path / 'bomb.yaml'}: its YAML aliases expand to {total:,} values (more than "
                                f"1,000,000: aliases nested inside aliases?); write the values out, or nest fewer "
                                f"aliases"]
    bomb = "[" + ", ".join(["&a [x, x, x, x, x, x, x, x, x]"] + [f"&{c} [{', '.join([f'*{p}'] * 9)}]" for p, c in
                                                                zip("abcdefg", "bcdefgh")]) + ", *h]"
    assert problems(f"lora.r={bomb}")[0].startswith("override lora.r: its YAML aliases expand to ")
    shared = "zz: {a: &a [1, 2, 3]}\nlora: {target_modules: [q_proj]}\nx: [*a, *a, *a]\n"  # a few aliases: as before
    assert expanded_size(yaml.load(shared, Loader=yaml_loader())) == 1 + (1 + 4) + (1 + 2) + (1 + 3 * 4)


def test_output_dir_expands_a_tilde_and_refuses_an_environment_variable(tmp_path, monkeypatch):
    """Soak: `output_dir=~/run` made a folder named ~ in the working directory (and `rm -rf ~` cleans that up),
    `$HOME/x` one named $HOME; a model or data path with $ was a traceback or a bare "no such file"."""
    monkeypatch.setenv("HOME", str(tmp_path))
    assert load_train_config(None, [DATA, "output_dir=~/run"]).output_dir == str(tmp_path / "run")
    assert problems("output_dir=$HOME/x") == ["output_dir: '$HOME/x' holds a '$': a config expands ~ but no "
                                              "environment variable; write the path itself"]
    with pytest.raises(FileNotFoundError, match=r"^model '\$HOME/m' not found \(a config expands ~ but no environment "
                                                r"variable\): give a transformers directory"):
        resolve_model("$HOME/m")
    for name in ("a b", "x/y/z", "x--y"):  # not a hub id: transformers' repo-id validation error, as a traceback
        with pytest.raises(FileNotFoundError, match=f"^model '{name}' not found: give a transformers directory"):
            resolve_model(name)
    assert resolve_model("org/name") == "org/name"
    with pytest.raises(DataError, match=r"^no such file: \$HOME/t.jsonl \(a config expands ~ but no environment "
                                        r"variable\)$"):
        read_records("$HOME/t.jsonl")


def test_yaml_integers_read_as_yaml_1_2_and_people_read_them(tmp_path):
    """Soak: PyYAML's YAML 1.1 read `r: 010` as 8 and `r: 1:30` as 90 (base 60), and trained on that silently."""
    read = lambda text: yaml.load(text, Loader=yaml_loader())  # noqa: E731
    assert [read(f"r: {v}")["r"] for v in ("010", "-010", "00", "0x8", "1_000", "8")] == [10, -10, 0, 8, 1000, 8]
    assert read("r: 1:30")["r"] == "1:30"
    assert problems("lora.r=1:30") == ["lora.r: expected an integer, got '1:30'"]
    (tmp_path / "tab.yaml").write_text("lora:\n\tr: 4\ndata: {train: t.jsonl}\n")
    with pytest.raises(ConfigError) as e:
        load_train_config(str(tmp_path / "tab.yaml"))
    assert e.value.problems[0].startswith(f"{tmp_path / 'tab.yaml'}: not valid YAML (indent with spaces: YAML does "
                                          f"not allow tabs there): ")
    assert f'in "{tmp_path / "tab.yaml"}", line 2, column 1' in e.value.problems[0]


@pytest.mark.skipif(not yaml.__with_libyaml__, reason="PyYAML built without libyaml: the pure-Python parser alone")
def test_configs_are_read_by_libyaml_as_the_pure_python_parser_reads_them(tmp_path):
    """Soak: a 15 MB config took 5.5 s, nearly all in PyYAML's pure-Python parser; libyaml's (CSafeLoader) reads it
    about 6 times faster with our constructors: the same values, and a file it refuses is read again by the
    pure-Python one for the same message."""
    assert issubclass(yaml_loader(), yaml.CSafeLoader) and not issubclass(yaml_loader(libyaml=False), yaml.CSafeLoader)
    text = ("base: &b {lr: 1.0e-4, r: 010}\ntraining:\n  <<: *b\n  max_steps: 1_000\nlora:\n  r: 1:30\n  on: yes\n"
            "  t: [q_proj, {k: ~}]\n  s: \"caf\\u00e9\"\n" + "rows:\n"
            + "".join(f"  - [{i}, {i}.5, x{i}]\n" for i in range(300)))
    reference = yaml.load(text, Loader=yaml_loader(libyaml=False))
    assert read_yaml(text) == reference and read_yaml(text.encode("utf-16")) == reference
    assert reference["training"] == {"lr": 1e-4, "r": 10, "max_steps": 1000} and reference["lora"]["r"] == "1:30"
    for bad in ("lora:\n\tr: 4\n", "a: [1, 2\n", "lora:\n  r: 4\n  r: 8\n", "a: " + "[" * 1200 + "]" * 1200):
        try:
            expected = ("read", yaml.load(bad, Loader=yaml_loader(libyaml=False)))
        except Exception as e:  # noqa: BLE001 - the pure-Python parser's error is the reference
            expected = (type(e), str(e))
        try:
            got = ("read", read_yaml(bad))
        except Exception as e:  # noqa: BLE001
            got = (type(e), str(e))
        assert got[0] == expected[0] and (got == expected or got[0] is RecursionError)  # its frame's words vary


def test_override_keys_with_spaces_read_and_empty_names_are_refused():
    """Soak: 'lora.r = 8' was "lora.r : unknown field"; lora..r=4 and lora.=4 were "lora.: unknown field"."""
    assert load_train_config(None, [DATA, "lora.r = 16"]).lora.r == 16
    for item in ("lora..r=4", "lora.=4", ".r=4"):
        assert problems(item) == [f"override {item!r}: write it as section.field=value, e.g. training.lr=1e-4"]


@pytest.mark.parametrize("overrides, said", [
    (["lora.lora_alpha=1e6"], "lora.lora_alpha: 1e+06 makes the adapter's scale lora_alpha / r = 1e+06 / 8 = "
     "1.25e+05, outside the usual 0.0001 to 1000 (most runs use 1 to 2); updates that large usually diverge: try "
     "lora_alpha 16 (2*r)"),
    (["lora.lora_alpha=1e-4", "lora.use_rslora=true", "lora.r=16"], "lora.lora_alpha: 0.0001 makes the adapter's "
     "scale lora_alpha / sqrt(r) = 0.0001 / 4 = 2.5e-05, outside the usual 0.0001 to 1000 (most runs use 1 to 2); "
     "updates that small barely train: try lora_alpha 8 (2*sqrt(r))"),
    (["method=adalora", "lora.lora_alpha=1e6", "adalora.init_r=8"], "lora.lora_alpha: 1e+06 makes the adapter's "
     "scale lora_alpha / init_r = 1e+06 / 8 = 1.25e+05, outside the usual 0.0001 to 1000 (most runs use 1 to 2); "
     "updates that large usually diverge: try lora_alpha 16 (2*init_r)"),
    (["method=adalora", "adalora.lora_alpha=1e6", "adalora.init_r=8"], "adalora.lora_alpha: 1e+06 makes the "
     "adapter's scale lora_alpha / init_r = 1e+06 / 8 = 1.25e+05, outside the usual 0.0001 to 1000 (most runs use 1 "
     "to 2); updates that large usually diverge: try lora_alpha 16 (2*init_r)"),
])
def test_a_lora_alpha_of_an_extreme_scale_is_warned_about_once_and_still_trains(overrides, said, tiny_dir):
    """Soak: lora_alpha 1e6 (a scale of 125,000) trained without a word. Such a scale is legal (PEFT saves and loads
    it), so the config loads with the value as written, and building the run's model warns once (inject, where
    every new adapter is made, warns; the config no longer does too), naming the field, the scale and the usual
    range, the field as the config has it (carried over: it said lora_alpha, not lora.lora_alpha, or adalora's own
    where that section sets it); a usual alpha warns nothing."""
    with pytest.warns(UserWarning) as record:
        cfg = load_train_config(None, [DATA, f"model.name={tiny_dir}", *overrides])
        build_model(cfg, torch.device("cpu"), total_steps=10)
    assert [str(w.message) for w in record if "lora_alpha" in str(w.message)] == [said]
    assert (cfg.lora.lora_alpha if cfg.method == "lora" else float(cfg.adalora.get("lora_alpha", cfg.lora.lora_alpha))
            ) == float(next(o for o in overrides if "lora_alpha" in o).split("=")[1])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for usual in (["lora.lora_alpha=8000"], ["lora.lora_alpha=16", "lora.use_rslora=true", "lora.r=16"]):
            build_model(load_train_config(None, [DATA, f"model.name={tiny_dir}", *usual]), torch.device("cpu"))


def test_a_train_config_built_in_python_takes_mappings_and_is_checked_as_a_yaml_is(tmp_path):
    """soak: TrainConfig(method="qlora2") trained plain LoRA without a word, and sections given as dicts died later
    with AttributeError. Mappings become their sections (the same config load_train_config reads from them); a
    method, section or value that a YAML would be refused for is refused, every problem named."""
    from loraforge.config import TrainConfig, TrainingConfig

    sections = dict(data={"train": "train.jsonl"}, model={"name": "tiny", "dtype": "fp32"}, lora={"r": 2},
                    training={"max_steps": 2, "batch_size": 4}, output_dir=str(tmp_path / "run"))
    assert TrainConfig(**sections) == load_train_config(base=sections)
    assert TrainConfig(data={"train": "x.jsonl"}, output_dir=tmp_path / "run").output_dir == str(tmp_path / "run")
    with pytest.raises(ConfigError) as e:
        TrainConfig(data={"train": "x.jsonl"}, method="qlora2", model=3, lora={"r": 0, "rnak": 2},
                    training=TrainingConfig(max_steps=2), adalora=None, output_dir=None)
    assert e.value.problems == [
        "model: expected a ModelConfig or a mapping of its fields, got 3",
        "lora.rnak: unknown field (did you mean 'r'?)",
        "lora.r: must be a positive integer (at most 65536), got 0 (try 8)",
        "method: 'qlora2' is not one of ['lora', 'qlora', 'dora', 'adalora', 'full']",
        "adalora: expected a mapping of AdaLoRA settings (e.g. {'init_r': 12}), got None",
        "output_dir: expected a folder path, got None"]


def test_records_given_in_place_of_a_file_are_one_line_and_sources_given_in_python_are_checked():
    """soak: data.train given the 40 record dicts themselves was a ConfigError of 121 lines (three per record)."""
    from loraforge.config import DataConfig, DataSource, TrainConfig

    records = [{"instruction": f"add {i} and {i + 1}", "output": str(2 * i + 1)} for i in range(40)]
    line = ("data.train: a list of 40 records (instruction, output); it takes dataset files: write the records to a "
            ".jsonl file (one JSON object per line) and give its path")
    assert problems(base={"data": {"train": records}}) == [line]
    for build, expected in ((lambda: TrainConfig(data={"train": records}), line),
                            (lambda: DataConfig(train=records), line.removeprefix("data.")),
                            (lambda: DataConfig(train="a.jsonl", eval=[{"text": "x"}]),
                             "eval: a list of 1 record (text); it takes dataset files: write the records to a .jsonl "
                             "file (one JSON object per line) and give its path"),
                            (lambda: DataConfig(train=[3]), "train[0]: expected a path or a mapping of DataSource "
                                                            "fields, got 3")):
        with pytest.raises(ConfigError) as e:
            build()
        assert e.value.problems == [expected]
    sources = [{"path": "a.jsonl", "epochs": 2}, "b.jsonl"]  # as a YAML list: the same config
    assert DataConfig(train=sources) == load_train_config(base={"data": {"train": sources}}).data
    assert DataConfig(train=sources).sources() == (DataSource("a.jsonl", epochs=2), DataSource("b.jsonl"))


def test_a_key_given_twice_on_the_command_line_is_warned_about_naming_its_values(tmp_path):
    """Soak: `lora.r=2 lora.r=3` trained rank 3, unsaid. The last is still used (override lists are composed: a
    script's keys, then the user's); a command-line key over the file's value is no duplicate."""
    with pytest.warns(UserWarning) as said:
        cfg = load_train_config(None, [DATA, "lora.r=2", " lora.r = 3", "lora.r=4", "training.lr=1e-3",
                                       "training.lr=2e-3"])
    assert [str(w.message) for w in said] == [
        "lora.r given 3 times on the command line (lora.r=2, lora.r=3, lora.r=4): the last, lora.r=4, is used",
        "training.lr given twice on the command line (training.lr=1e-3, training.lr=2e-3): the last, "
        "training.lr=2e-3, is used"]
    assert (cfg.lora.r, cfg.training.lr) == (4, 2e-3)
    (tmp_path / "run.yaml").write_text("data: {train: train.jsonl}\nlora: {r: 2}\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_train_config(str(tmp_path / "run.yaml"), ["lora.r=3"]).lora.r == 3


def test_thousands_of_unknown_keys_name_each_shown_key_once_and_the_known_fields_once():
    """Soak: 10,000 unknown training.x keys made a 4.4 MB message, the known fields repeated per key."""
    said = problems(*[f"training.x{i}=1" for i in range(1, 10_001)], "lora.y1=1", "lora.y2=1")
    known = "activation_buffer, attention, batch_size"
    assert said[0].startswith(f"training.x1: unknown field (known: {known}, ")
    assert said[1:20] == [f"training.x{i}: unknown field" for i in range(2, 21)]
    assert said[20] == "training: 9,980 more unknown fields, not named here (10,000 in all)"
    assert said[21].startswith("lora.y1: unknown field (known: alpha_pattern, ")
    assert said[22:] == ["lora.y2: unknown field"]
    assert sum(len(p) for p in said) < 2_000


@pytest.mark.parametrize("override, said", [
    ("lora.r=", "lora.r: empty value; give an integer, e.g. lora.r=8"),
    ("training.lr= ", "training.lr: empty value; give a number, e.g. training.lr=0.0002"),
    ("model.name=", "model.name: empty value; give a string, e.g. model.name=smollm2-135m"),
    ("training.compile=", "training.compile: empty value; give true or false, e.g. training.compile=false"),
    ("training.schedule=", "training.schedule: empty value; give one of 'cosine', 'linear', 'constant', e.g. "
     "training.schedule=cosine"),
])
def test_an_empty_override_value_is_named_with_what_the_field_takes(override, said):
    """Soak: `lora.r=` said "expected an integer, got None"; a field that takes null reads an empty value as null."""
    assert problems(override, "training.seed=x") == [said, "training.seed: expected an integer, got 'x'"]
    cfg = load_train_config(None, [DATA, "data.eval=", "training.max_grad_norm=", "model.quantization="])
    assert (cfg.data.eval, cfg.training.max_grad_norm, cfg.model.quantization) == (None, None, None)


def test_pissa_niter_past_any_useful_count_is_refused_not_run_for_ever():
    """Soak (fields): pissa_niter_99999999999999 ran its randomized SVD's iterations for ever (killed after 5
    minutes on a 2-layer model), and N over 4,300 digits was int()'s ValueError traceback."""
    for n in ("99999999999999", "1001", "9" * 5000):
        (p,) = problems(f"lora.init_lora_weights=pissa_niter_{n}")
        assert p.startswith("lora.init_lora_weights: 'pissa_niter_") and "more than 1000 subspace iterations" in p
        assert "far more than it needs to converge" in p
        assert p.endswith("use pissa_niter_4 to pissa_niter_16 (PEFT's), or 'pissa' for the exact SVD they "
                          "converge to")
    for n in ("1000", "0", "0001000"):
        assert load_train_config(None, [DATA, f"lora.init_lora_weights=pissa_niter_{n}"]
                                 ).lora.init_lora_weights == f"pissa_niter_{n}"


def test_epochs_whose_steps_pass_max_steps_bound_are_refused_before_the_model_loads(tiny_dir, data_file, tmp_path,
                                                                                    monkeypatch):
    """Soak (fields): training.epochs=1e300 started a run of a 301-digit step count (max_steps is bounded at 1e15,
    epochs was not); the config refuses epochs past 1e15 (each epoch is one step at least) and train() an epoch
    count whose steps (known from the data) pass it, before the model loads."""
    (p,) = problems("training.epochs=1e300")
    assert p == "training.epochs: at most 1e+15 (every epoch is at least one step; max_steps' bound), got 1e+300 " \
                "(e.g. 3, or set max_steps)"
    assert load_train_config(None, [DATA, "training.epochs=1e15"]).training.epochs == 1e15
    monkeypatch.setattr(loop, "build_model", lambda *a, **k: pytest.fail("the model was loaded"))
    cfg = load_train_config(None, [f"data.train={data_file}", f"model.name={tiny_dir}", "training.batch_size=4",
                                   "training.epochs=2e14", f"output_dir={tmp_path / 'out'}"])
    with pytest.raises(ConfigError) as e:
        loop.train(cfg, progress=False)
    # 40 records, 2 held out (eval_fraction 0.05): 38 // 4 = 9 steps an epoch
    assert e.value.problems == ["training.epochs: 2e+14 × 9 steps an epoch is 1.8e+15 steps, past 1e+15 "
                                "(max_steps' bound: at a step a microsecond, 30 years); use at most 1.11e+14 "
                                "epochs, or set training.max_steps"]


def test_batch_tokens_epochs_too_many_to_count_are_refused_before_counting(tiny_dir, data_file, tmp_path,
                                                                         monkeypatch):
    """Soak (smalls): training.epochs=1e13 with training.batch_tokens passed the 1e15 bound (9e13 steps) and then
    EpochPlan.total packed every epoch one at a time to count the steps: no output after 100 s. An epoch count
    past the count's bounds is refused before counting and before the model loads; one within them counts the
    same steps as packing each epoch by hand."""
    monkeypatch.setattr(loop, "build_model", lambda *a, **k: pytest.fail("the model was loaded"))
    monkeypatch.setattr(epochs.EpochPlan, "_count_to", lambda self, e: pytest.fail(f"counted to epoch {e}"))
    args = [f"data.train={data_file}", f"model.name={tiny_dir}", "training.batch_tokens=64",
            f"output_dir={tmp_path / 'out'}"]
    with pytest.raises(ConfigError) as e:
        loop.train(load_train_config(None, [*args, "training.epochs=1e13"]), progress=False)
    assert e.value.problems == ["training.epochs: 1e+13 epochs with training.batch_tokens 64: each epoch's shuffle "
                                "packs its own number of steps, so the run's steps are counted epoch by epoch before "
                                "it starts (38 examples an epoch), past 1e+06 epochs or 1e+08 examples packed (a "
                                "minute's counting); use at most 1e+06 epochs, or set training.max_steps"]
    monkeypatch.undo()
    cfg = load_train_config(None, [*args, "training.epochs=7.5"])
    assert epochs.too_many_epochs(cfg, 3, 38) is None
    examples = [SimpleNamespace(input_ids=[0] * (5 + i % 20)) for i in range(38)]
    by_hand = [len(epochs.micro_batches(examples, cfg, e)) for e in range(8)]  # a step a micro-batch here
    assert epochs.EpochPlan(examples, cfg, None, 1).total(7.5) == sum(by_hand[:7]) + int(0.5 * by_hand[7])
    monkeypatch.setattr(epochs, "MAX_COUNTED_EPOCHS", 7)  # the bound is the smaller of the two: epochs' here
    assert epochs.too_many_epochs(cfg, 3, 38).endswith("use at most 7 epochs, or set training.max_steps")
    monkeypatch.setattr(epochs, "MAX_COUNTED_EPOCHS", 10**6)
    monkeypatch.setattr(epochs, "MAX_COUNTED_EXAMPLES", 38 * 7 + 37)  # examples' bound: 7 epochs of 38
    assert epochs.too_many_epochs(cfg, 3, 38).endswith("use at most 7 epochs, or set training.max_steps")


def test_an_empty_model_output_dir_or_module_to_save_is_refused_as_typed():
    """Soak (smalls): model.name='' and output_dir='' passed the config and were refused later naming '.' (a folder
    without config.json; output_dir . holding the data), and modules_to_save [''] as "modules_to_save takes all 120"
    without saying that '' ends every module's name (PEFT's suffix rule). Each is refused by the config, as typed."""
    assert problems("model.name=''", "output_dir=''") == [
        "model.name: '' names no model ('' reads as the current folder, '.'); give a transformers directory, a hub id, "
        "a .gguf file or a built-in name, e.g. smollm2-135m",
        "output_dir: '' names no folder ('' reads as the current folder, '.'); give a folder path, e.g. runs/latest"]
    assert problems("lora.modules_to_save=['lm_head', '']") == [
        "lora.modules_to_save: '' ends every module's name (as in PEFT, each module whose name ends with an entry is "
        "saved), so it would train the whole model in full and save it; give module names, e.g. ['lm_head'], or leave "
        "modules_to_save out"]
    cfg = load_train_config(None, [DATA, "model.name=./m", "output_dir=out", "lora.modules_to_save=['lm_head']"])
    assert (cfg.model.name, cfg.output_dir, cfg.lora.modules_to_save) == ("./m", "out", ("lm_head",))
