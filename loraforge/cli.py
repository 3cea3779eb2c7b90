"""`loraforge SUBCOMMAND ...`: each subcommand is a typed function; its signature and docstring are the help.

Parameters without a default are positional (keyword-only ones are required --options); the others are --options
(underscores become dashes); a `config` or `data` parameter defaulting to None is an optional positional; a bool
defaulting to False is a flag; a list[str] takes several values. `Args:` lines document each one. An Annotated hint
(loraforge.argtypes: PositiveInt, Port, ...) or a Literal checks each value as it is parsed, before anything loads.
KEY=VALUE overrides may come anywhere on the line.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import errno
import importlib.util
import inspect
import math
import os
import re
import signal
import sys
import threading
import types
import typing
import warnings
from typing import Literal

from loraforge import __version__
from loraforge.argtypes import (FiniteFloat, FlagOverride, NonEmpty, PositiveFloat, PositiveInt, Port, Probability,
                                Seed, SeedCount, Temperature, Text)
from loraforge.utils.elastic import report_to_agent
from loraforge.utils.parent import follow_agent
from loraforge.utils.startup import exit_now, exit_on_signals, stopped_line, untouched
from loraforge.utils.streams import guard_streams, output_failed, stdout_lost


def _with_quantize(overrides: list[str], quantize: str | None) -> list[str]:
    """--quantize Q is the override model.quantization=Q (validated with the rest of the config), applied after the
    user's KEY=VALUE ones: the flag wins, and a warning names both as typed."""
    return list(overrides) + ([FlagOverride("model.quantization", quantize, "--quantize")] if quantize else [])


def _check_quantize(quantize: str | None, model: str) -> None:
    """eval's, generate's, serve's and ui's --quantize names a bitsandbytes storage, with bitsandbytes installed,
    that the CPU they run on can hold `model`'s layers in (check_model_widths, from its config), or ConfigError says
    what to use; before anything loads."""
    from loraforge.config import ConfigError
    from loraforge.models import model_skeleton
    from loraforge.quant.bnb import QUANT_TYPES, check_bitsandbytes, check_model_widths

    if quantize is not None and quantize not in QUANT_TYPES:
        raise ConfigError([f"--quantize {quantize!r}: use one of {', '.join(QUANT_TYPES)} (the one a QLoRA adapter "
                           f"trained over), or leave it out for the full-precision base"])
    check_bitsandbytes(quantize, "adamw")
    if quantize in ("nf4", "fp4"):  # int8 takes any width
        check_model_widths(model_skeleton(model), quantize, "cpu", words="flag")


def _check_precision(precision: str, dtype: str | None) -> None:
    """--precision and --dtype name a precision, or ConfigError names the bad one."""
    from loraforge.config import ConfigError
    from loraforge.precision import PRECISIONS

    bad = [f"--{name} {value!r}: use one of auto, {', '.join(PRECISIONS)}" for name, value in
           (("precision", precision), ("dtype", dtype)) if value is not None and value not in ("auto", *PRECISIONS)]
    if bad:
        raise ConfigError(bad)


def _precision(precision: str, dtype: str | None):
    """--precision (compute) and --dtype (the base's storage; default: follows the precision) resolved by the one
    rule, loraforge.precision.choose, on the CPU where eval and generate run."""
    from loraforge.precision import choose

    _check_precision(precision, dtype)
    return choose(precision, dtype or "auto", device="cpu", names=("--precision", "--dtype"), training=False)


API_KEY_ENV = "LORAFORGE_API_KEY"


def _api_key(given: str | None) -> str | None:
    """--api-key, else $LORAFORGE_API_KEY (unset or empty: none). A command line is readable by every user of the
    machine (ps, /proc/PID/cmdline), a process's environment by its own user only (soak: a key was on show)."""
    return given if given is not None else os.environ.get(API_KEY_ENV) or None


def _check_folders(**folders: str | None) -> None:
    """--runs (created when missing) must not be a file; the other folders given must exist; else ConfigError."""
    from loraforge.config import ConfigError

    problems = []
    for name, path in folders.items():
        flag = "--" + name.replace("_", "-")
        if path is None or os.path.isdir(path):
            continue
        if os.path.exists(path):
            problems.append(f"{flag} {path}: is a file; give a folder")
        elif name != "runs":
            problems.append(f"{flag} {path}: no such folder; give an existing one")
    if problems:
        raise ConfigError(problems)


def finished_line(result) -> str:
    """train's last line: where the result is and what the run measured (a resumed run that had already finished:
    nothing was trained, so no loss or speed)."""
    where = f"{result.saved} written to {result.output_dir / result.saved}"
    best = result.best  # training.keep_best: where the held-out loss was lowest, when not at the end
    kept = (f"; lowest held-out loss {best['eval_loss']:.4f} at step {best['step']}, its checkpoint kept: "
            f"{best['checkpoint']}" if best and best["step"] != result.steps else "")
    if unsaved := result.best_unsaved:  # soak: eval_every=1, save_every=2, the lowest at step 3: unsaid, not kept
        kept += (f"; the lowest held-out loss, {unsaved['eval_loss']:.4f} at step {unsaved['step']}, fell on a step "
                 f"that saved no checkpoint, so training.keep_best could not keep it (save at every evaluated step: "
                 f"training.eval_every a multiple of training.save_every)")
    if bad := result.nonfinite_evals:  # soak: a NaN held-out loss was said on the progress bar alone
        kept = (f"; {bad['count']} of {bad['of']} held-out losses were not finite (null in metrics.jsonl), the first "
                f"at step {bad['step']}" + kept)
    if result.already_finished and not result.result_existed:  # killed while writing it (soak: "already finished")
        return (f"{where}: the run's {result.steps} steps were done before it stopped, while writing its "
                f"{result.saved}, which is written now{kept}")
    if result.already_finished:  # no step ran in this process
        return f"{where}: the run had already finished its {result.steps} steps, nothing left to resume{kept}"
    aside = (f" (evaluating and saving took {result.aside_seconds:.0f} s more)"
             if result.aside_seconds >= 0.5 else "")
    skipped = ""  # fp16: steps the loss scaler skipped made no update (soak: 6 of 6, an untrained adapter, unsaid)
    if result.skipped_steps:
        none = ": the weights were never updated" if result.skipped_steps >= result.steps else ""
        skipped = (f" ({result.skipped_steps} of them skipped, their fp16 gradients overflowed{none}; "
                   f"skipped_steps in metrics.jsonl)")
    return (f"{where} after {result.steps} steps{skipped}: final loss {result.final_loss:.4f}, "
            f"{result.tokens_per_second:.0f} tokens/s while training{aside}, peak "
            f"{'GPU memory' if result.device_type == 'cuda' else 'memory'} {result.peak_memory_mb:.0f} MB"
            f"{' (max allocated)' if result.device_type == 'cuda' else ''}{kept}")


def train(config: str, overrides: list[str] = (), resume: bool = False, quantize: str | None = None,
          overwrite: bool = False) -> None:
    """Fine-tune a model as a YAML config says; writes the adapter, metrics, loss plot and checkpoints.

    Args:
        config: the YAML file (sections: model, method, lora, data, training, output_dir)
        overrides: section.field=value pairs applied on top, e.g. training.lr=1e-4 lora.r=16 or lora={r: 16}
        resume: continue from the last complete checkpoint in output_dir
        quantize: nf4, fp4 or int8: store the frozen base with bitsandbytes (QLoRA); same as model.quantization=
        overwrite: write into a non-empty output_dir (an earlier run there is started over; never the data's folder)
    """
    from loraforge.config import load_train_config
    from loraforge.training.loop import Stopped
    from loraforge.training.loop import train as run

    try:
        result = run(load_train_config(config, _with_quantize(overrides, quantize)), resume=resume,
                     overwrite=overwrite)
    except Stopped as e:
        if e.result is None:  # stopped before the end: its checkpoint, and --resume (run_command says so)
            raise
        result = e.result  # the signal came during the last step: the run finished whole, nothing to resume
        if result.rank == 0:
            with contextlib.suppress(OSError):  # SIGHUP: the terminal may be gone
                print(f"{signal.Signals(e.signum).name} came during the last step (step {result.steps}); the run "
                      f"finished whole first, so it ends as finished, with nothing to resume", file=sys.stderr,
                      flush=True)
    if result.rank == 0:  # under torchrun every process returns; only rank 0 wrote the result
        with contextlib.suppress(OSError):
            print(finished_line(result), flush=True)


def demo(out: NonEmpty = "runs/demo", max_steps: PositiveInt | None = None, quantize: str | None = None,
         overrides: list[str] = (), overwrite: bool = False) -> None:
    """Fine-tune the built-in SmolLM2-135M-Instruct on the shipped date task and show the accuracy gain.

    Args:
        out: where the adapter, metrics and loss plot go
        max_steps: train for this many steps instead of the demo's default
        quantize: nf4, fp4 or int8: QLoRA, the frozen base stored with bitsandbytes
        overrides: section.field=value pairs on top of the demo config
        overwrite: write into a non-empty --out (e.g. train the demo again over an earlier demo run)
    """
    from loraforge.studies.demo import run_demo

    # --max-steps as an override too, applied after the user's: the flag wins over training.max_steps=, as in
    # forgetting and continual, and the warning names both (it was training.max_steps=7 winning, unsaid)
    steps = [FlagOverride("training.max_steps", max_steps, "--max-steps")] if max_steps else []
    run_demo(out, max_steps=max_steps, overrides=_with_quantize([*overrides, *steps], quantize), overwrite=overwrite)


def generate(prompt: Text, model: NonEmpty = "smollm2-135m", adapter: NonEmpty | None = None,
             max_new_tokens: PositiveInt = 256, temperature: Temperature = 0.0, top_p: Probability = 1.0,
             seed: Seed = 0, precision: str = "auto", dtype: str | None = None, system: Text | None = None,
             chat: bool = False, quantize: str | None = None) -> None:
    """Answer a prompt with the model's chat template, streaming tokens to the terminal.

    Args:
        prompt: the user message
        model: base model (transformers dir, hub id, .gguf file or built-in name)
        adapter: a PEFT-format adapter directory to apply
        max_new_tokens: stop after this many tokens
        temperature: 0 for greedy decoding (fp32 Llama-family models: on the static-cache decoder), 0.01-100 to sample
        top_p: nucleus sampling threshold when sampling, in (0, 1]
        seed: random seed for sampling, 0 .. 2**64 - 1
        precision: auto (fp32 on a CPU without native bf16, bf16 where it is native), fp32, bf16 or fp16
        dtype: storage of the base: fp32, bf16 or fp16 (default: the precision's)
        system: an optional system message
        chat: a model with no chat template: send PROMPT (and --system) as the "### User:" text chat records are
            trained on there (an adapter trained on them), not as plain text to continue
        quantize: nf4, fp4 or int8: the base stored with bitsandbytes, as a QLoRA adapter trained over it (default:
            the full-precision base)
    """
    import torch
    from jinja2 import TemplateError
    from transformers import TextStreamer

    from loraforge.config import ConfigError
    from loraforge.decoding import FiniteLogits, Until, stop_ids
    from loraforge.inference.greedy import check_fits
    from loraforge.inference.greedy import stream as static_stream
    from loraforge.inference.llama import unsupported
    from loraforge.lora.adapters import load_adapter
    from loraforge.models import load_base
    from loraforge.precision import overflow_fix
    from loraforge.training.data import plain_chat_prompt_ids

    torch.manual_seed(seed)
    chosen = _precision(precision, dtype)
    _check_quantize(quantize, model)
    base, tokenizer = load_base(model, dtype=chosen.storage, quantize=quantize)
    if adapter:
        load_adapter(base, adapter)
    base.eval()  # inference: no dropout, whatever mode the loaders left (soak: a dropout adapter's text varied by seed)
    # once the model is there (a failed load is one line); stdout is the answer alone
    print(chosen.line(training=False), file=sys.stderr, flush=True)
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    if tokenizer.chat_template:
        try:
            enc = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                                return_dict=True)
        except TemplateError as e:  # soak: Gemma's template refusing --system was a jinja2 traceback
            flag = "--system" if system else "PROMPT"
            raise ConfigError([f"{flag}: the model's chat template refuses it ({e})"
                               + ("; leave --system out and put the instructions in PROMPT" if system else "")],
                              arguments=True) from None
    elif chat:  # the text chat training used for this tokenizer (soak: a chat adapter was sent the raw prompt)
        enc = {"input_ids": torch.tensor([plain_chat_prompt_ids(messages, tokenizer)])}
        enc["attention_mask"] = torch.ones_like(enc["input_ids"])
    else:  # a base model's plain text: the system message, if any, goes first
        if adapter:
            print("no chat template: PROMPT is plain text to continue; for an adapter trained on chat records add "
                  "--chat", file=sys.stderr, flush=True)
        if system:
            print("no chat template: --system is put before the prompt as plain text", file=sys.stderr, flush=True)
        enc = tokenizer(f"{system}\n\n{prompt}" if system else prompt, return_tensors="pt")
        if enc["input_ids"].shape[1] == 0:
            raise ConfigError(["PROMPT: empty, and the model has no chat template to begin the text; give a prompt "
                               "for it to continue"], arguments=True)
    check_fits(base, enc["input_ids"].shape[1], max_new_tokens, flag="--max-new-tokens")  # either path below
    sampling = temperature > 0
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    if not sampling and chosen.compute == "fp32" and chosen.storage == "fp32" and unsupported(base) is None:
        streamer.put(enc["input_ids"])  # the prompt, which the streamer skips
        static_stream(base, enc["input_ids"][0].tolist(), stop_ids(tokenizer, base), max_new_tokens,
                      lambda token: streamer.put(torch.tensor([token])), until=stdout_lost)  # `| head -c 10`
        streamer.end()
        return
    with chosen.autocast("cpu"):
        base.generate(**enc, max_new_tokens=max_new_tokens, do_sample=sampling,
                      temperature=temperature if sampling else None, top_p=top_p if sampling else None,
                      top_k=None, streamer=streamer, logits_processor=[FiniteLogits(overflow_fix(chosen))],
                      stopping_criteria=[Until(stdout_lost)],
                      pad_token_id=tokenizer.pad_token_id, eos_token_id=stop_ids(tokenizer, base))


def merge(*, base: NonEmpty, adapter: list[NonEmpty], out: NonEmpty, weights: list[str] = (), combination: str = "cat",
          svd_rank: PositiveInt | None = None, dtype: str = "fp32", quantize: str | None = None,
          overwrite: bool = False) -> None:
    """Merge adapter(s) into the base and write a standard transformers checkpoint (config, safetensors, tokenizer).

    Several adapters are combined exactly by default (cat: the sum of each one's weighted ΔW). Only plain LoRA
    adapters combine; merge a DoRA, modules_to_save or bias-training adapter alone, then use the result as --base.

    Args:
        base: the base model the adapter was trained on
        adapter: one adapter directory, or several to combine
        out: output directory (written atomically)
        weights: one weight per adapter when combining (default 1 each)
        combination: cat (exact), svd (truncated to the largest rank) or linear (PEFT's; equal ranks, not the sum)
        svd_rank: the rank --combination svd truncates to (default: the largest adapter's r)
        dtype: fp32, bf16 or fp16 for the written weights
        quantize: nf4/fp4/int8: merge into the quantized base a QLoRA adapter was trained on (int8: ~1e-2 off)
        overwrite: write into a non-empty --out, replacing only the checkpoint's files (never an --adapter/--base)
    """
    from loraforge.config import ConfigError
    from loraforge.lora.merge import export_merged

    numbers = []
    for w in weights:
        try:
            numbers.append(float(w))
        except ValueError:
            raise ConfigError([f"--weights {w!r}: give a number per adapter, e.g. --weights 0.7 0.3"]) from None
    path = export_merged(base, list(adapter), out, dtype=dtype, weights=numbers or None,
                         combination_type=combination, svd_rank=svd_rank, quantize=quantize, overwrite=overwrite)
    print(f"merged checkpoint written to {path}")


def export(*, to: str, out: NonEmpty, adapter: NonEmpty | None = None, base: NonEmpty = "smollm2-135m",
           type: str | None = None, overwrite: bool = False) -> None:  # noqa: A002
    """Take the result elsewhere: GGUF for llama.cpp / Ollama / LM Studio, or an adapter vLLM serves as is.

    Args:
        to: gguf (merged, one file), gguf-lora (the adapter + an Ollama OUT.Modelfile) or vllm (checked, converted)
        out: the .gguf file (gguf, gguf-lora) or the adapter directory (vllm)
        adapter: the adapter directory (gguf: optional, without it the base alone is written)
        base: the base model the adapter was trained on (gguf, gguf-lora)
        type: tensor type: f16 (gguf's default), q8_0 or f32 (gguf-lora's default); not for vllm
        overwrite: replace an existing --out
    """
    from .export.gguf_names import ExportError

    if to == "gguf":
        from .export.gguf import export_gguf

        print(f"GGUF written to {export_gguf(base, adapter, out, type=type or 'f16', overwrite=overwrite)} "
              f"(llama-cli -m FILE, or Ollama: FROM FILE)")
    elif to == "gguf-lora":
        from .export.gguf_lora import export_gguf_lora, modelfile_path

        if adapter is None:
            raise ExportError("--to gguf-lora needs --adapter DIR")
        path = export_gguf_lora(base, adapter, out, type=type or "f32", overwrite=overwrite)
        print(f"llama.cpp LoRA adapter written to {path} (llama-cli -m BASE.gguf --lora {path}); "
              f"Ollama: ollama create NAME -f {modelfile_path(path)}")
    elif to == "vllm":
        from .export.vllm import convert_for_vllm

        if adapter is None:
            raise ExportError("--to vllm needs --adapter DIR")
        if type is not None:
            raise ExportError(f"--type {type}: --to vllm keeps the adapter's own weights; leave --type out "
                              f"(it is for gguf and gguf-lora)")
        path, notes = convert_for_vllm(adapter, out, overwrite=overwrite)
        print(f"vLLM adapter written to {path}" + "".join(f"\n  {n}" for n in notes))
    else:
        raise ExportError(f"--to {to!r}: use gguf, gguf-lora or vllm")


def eval(data: NonEmpty | None = None, model: NonEmpty = "smollm2-135m", adapter: NonEmpty | None = None,  # noqa: A001
         max_new_tokens: PositiveInt = 32, limit: PositiveInt | None = None, precision: str = "auto",
         dtype: str | None = None, probe: list[str] = (), quantize: str | None = None) -> None:
    """Perplexity on a dataset and, for instruction data, exact-match accuracy; or the shipped general probes.

    Args:
        data: a dataset file (jsonl/json/csv/parquet, or txt: one text); optional with --probe
        model: base model
        adapter: adapter directory to apply
        max_new_tokens: generation length for the accuracy check
        limit: only the first N records
        precision: auto (fp32 on a CPU without native bf16, bf16 where it is native), fp32, bf16 or fp16
        dtype: storage of the base: fp32, bf16 or fp16 (default: the precision's)
        probe: general-ability probes: mc (200 4-option questions), text (perplexity), kl (KL vs base; needs --adapter)
        quantize: nf4, fp4 or int8: the base stored with bitsandbytes, as a QLoRA adapter trained over it (default:
            the full-precision base)
    """
    from loraforge.config import ConfigError
    from loraforge.training import data as D

    if data is None and not probe:
        raise ConfigError(["eval: give a DATA file, or --probe mc text kl (or both)"])
    if probe:  # --probe kl alone without --adapter: refused before the precision line and any loading
        from loraforge.studies.probes import check_probes

        check_probes(list(probe), adapter)
    chosen = _precision(precision, dtype)
    _check_quantize(quantize, model)
    records = D.read_records(data)[:limit] if data is not None else []  # a bad file before any probe or model
    print(chosen.line(training=False), flush=True)
    if probe:
        from loraforge.studies.forgetting import cli_probe

        cli_probe(list(probe), model=model, adapter=adapter, dtype=chosen.storage, precision=chosen.compute,
                  quantize=quantize)
        if data is None:
            return

    from loraforge.lora.adapters import load_adapter
    from loraforge.training.evaluate import accuracy, mean_token_loss, perplexity_of
    from loraforge.models import context_length, load_model, load_tokenizer
    from loraforge.precision import overflow_fix
    from loraforge.studies.heldout import within_context

    tokenizer = load_tokenizer(model)
    D.build_dataset(records, tokenizer, max_seq_len=sys.maxsize)  # soak: a bad record was said after the model load
    base = load_model(model, dtype=chosen.storage, quantize=quantize)
    if adapter:
        load_adapter(base, adapter)
    base.eval()  # inference: no dropout
    # at the model's context: perplexity and accuracy over the same records, and a line says what it cut
    records, examples, cut = within_context(records, tokenizer, context_length(base.config))
    if cut:
        print(cut)
    loss = mean_token_loss(base, examples, tokenizer.pad_token_id, precision=chosen.compute)
    if math.isnan(loss):  # soak: "perplexity: inf (mean token loss nan)", exit 0, where fp16 had overflowed
        raise FloatingPointError(f"the mean token loss over {len(examples)} examples is nan (the model's logits are "
                                 f"not finite): {overflow_fix(chosen)}")
    print(f"perplexity: {perplexity_of(loss):.3f} (mean token loss {loss:.4f} over {len(examples)} examples)")
    fmt = D.detect_format(records[0])
    if fmt in ("instruction", "chat"):
        result = accuracy(base, tokenizer, records, fmt, max_new_tokens, precision=chosen.compute)
        lo, hi = result["ci95"]
        print(f"exact-match accuracy: {result['accuracy']:.1%} ({result['correct']}/{result['n']}, "
              f"95% CI {lo:.1%}-{hi:.1%})")


def serve(model: NonEmpty = "smollm2-135m", adapter: list[str] = (), adapters_dir: NonEmpty | None = None,
          host: str = "127.0.0.1", port: Port = 8000, api_key: str | None = None, max_loaded: PositiveInt = 8,
          max_batch: PositiveInt = 32, max_queue: PositiveInt = 256, prefix_cache_mb: float = 256,
          precision: str = "auto",
          dtype: str | None = None, adapter_dtype: str = "auto", ui: bool = False, runs: NonEmpty = "runs",
          header_timeout: PositiveFloat = 30, max_connections: PositiveInt = 512, quantize: str | None = None) -> None:
    """Serve one base model with many LoRA adapters over an OpenAI-compatible HTTP API, batched across adapters.

    Args:
        model: base model (built-in name, transformers directory, hub id or .gguf)
        adapter: NAME=DIR pairs loaded at start; a request's "model" field names the adapter
        adapters_dir: a directory of adapter directories, loaded by name on first use
        host: address to listen on
        port: port to listen on
        api_key: requests need "Authorization: Bearer KEY" (default: $LORAFORGE_API_KEY, hidden from others)
        max_loaded: adapters resident at once (least recently used evicted, reloaded on demand)
        max_batch: sequences decoded together
        max_queue: waiting requests before answering 429
        prefix_cache_mb: MB of keys/values of shared prompt prefixes (a system prompt) kept for reuse; 0 = off
        precision: auto (fp32 on a CPU without native bf16, bf16 where it is native), fp32, bf16 or fp16
        dtype: storage of the base, in which it decodes: fp32, bf16 or fp16 (default: the precision's)
        adapter_dtype: served adapters' weights: auto (bf16 for a bf16 base, else fp32), fp32, or bf16 (half the bytes)
        ui: also serve the web dashboard at /ui/ (see `loraforge ui`; datasets from the current folder)
        runs: the dashboard's runs folder
        header_timeout: seconds a request's headers may take to arrive, and each pause in its body; then 408 and closed
        max_connections: connections open at once; one beyond them closes idle kept-alive ones, else is answered 503
        quantize: nf4, fp4 or int8: the base stored with bitsandbytes, as QLoRA adapters trained over it (default:
            the full-precision base); it decodes on transformers' forward, not the static decoder
    """
    from loraforge.config import ConfigError, clipped
    from loraforge.serve.api import run_server
    from loraforge.serve.errors import SHOWN_CHARS
    from loraforge.serve.residency import name_refusal

    _check_precision(precision, dtype)
    _check_quantize(quantize, model)
    api_key = _api_key(api_key)
    if not prefix_cache_mb >= 0:
        raise ConfigError([f"--prefix-cache-mb {prefix_cache_mb}: give the megabytes to keep (0 turns it off)"])
    if adapter_dtype not in ("auto", "fp32", "bf16"):
        raise ConfigError([f"--adapter-dtype {adapter_dtype!r}: use auto, fp32 or bf16"])
    pairs = {}
    for item in adapter:
        name, sep, path = item.partition("=")
        given, named = clipped(item, SHOWN_CHARS), clipped(name, SHOWN_CHARS)  # a 10,000-character one is cut
        if not sep or not name or not path:
            raise ConfigError([f"--adapter {given}: write it as NAME=DIR, e.g. --adapter alice=runs/alice/adapter"])
        # the name before the base loads (soak: "café", "../x" or a 10,000-character one was refused after it)
        if why := name_refusal(name, model):
            raise ConfigError([f"--adapter {given}: the name {named} {why}"])
        if name in pairs:  # soak: the second DIR was served, the first dropped, unsaid
            raise ConfigError([f"--adapter {given}: the name {named} is given twice (DIR {pairs[name]} and {path}); "
                               f"give each adapter its own name"])
        if not os.path.isdir(path):
            raise ConfigError([f"--adapter {given}: {path} is not a directory; give NAME=DIR of a saved adapter"])
        pairs[name] = path
    _check_folders(adapters_dir=adapters_dir)
    extend = None
    if ui:  # the dashboard's routes on the same app (loraforge.ui imports serve, never the other way)
        _check_folders(runs=runs)
        from .ui.app import check_host, mount, training_models

        check_host(host, api_key)
        extend = lambda app, engine: mount(app, runs, ".", training_models(model, None), engine, api_key,  # noqa: E731
                                           host)
    run_server(model, pairs, adapters_dir, host, port, api_key, max_loaded, max_batch, max_queue, dtype or "auto",
               precision, extend=extend, prefix_cache_mb=prefix_cache_mb, adapter_dtype=adapter_dtype,
               header_timeout=header_timeout, max_connections=max_connections, quantize=quantize)


def ui(model: NonEmpty = "smollm2-135m", runs: NonEmpty = "runs", data_dir: NonEmpty = ".",
       adapters_dir: NonEmpty | None = None, models_dir: NonEmpty | None = None, host: str = "127.0.0.1",
       port: Port = 8000, api_key: str | None = None, precision: str = "auto", dtype: str | None = None,
       header_timeout: PositiveFloat = 30, max_connections: PositiveInt = 512, quantize: str | None = None) -> None:
    """A web dashboard: live run curves, start/stop runs, chat with base and adapters side by side, adapters.

    Args:
        model: the base model served to the playground and offered to the run form
        runs: the runs folder (each run's output_dir); the page starts its runs here
        data_dir: dataset files the form offers (paths outside it are refused)
        adapters_dir: where POST /v1/adapters loads from (default: the runs folder)
        models_dir: more base models for the form: each transformers directory in it
        host: address to listen on; anything but loopback needs --api-key
        port: port to listen on
        api_key: the page and the API need it (default: $LORAFORGE_API_KEY: unlike a command line, hidden from others)
        precision: auto (fp32 on a CPU without native bf16, bf16 where it is native), fp32, bf16 or fp16
        dtype: storage of the served base: fp32, bf16 or fp16 (default: the precision's)
        header_timeout: seconds a request's headers may take to arrive, and each pause in its body; then 408 and closed
        max_connections: connections open at once; one beyond them closes idle kept-alive ones, else is answered 503
        quantize: nf4, fp4 or int8: the playground's base stored with bitsandbytes, as QLoRA adapters trained over it
            (default: the full-precision base)
    """
    from .ui.app import run_ui

    _check_precision(precision, dtype)
    _check_quantize(quantize, model)
    _check_folders(runs=runs, data_dir=data_dir, models_dir=models_dir, adapters_dir=adapters_dir)
    run_ui(model, runs, data_dir, adapters_dir, models_dir, host, port, _api_key(api_key), dtype or "auto", precision,
           header_timeout=header_timeout, max_connections=max_connections, quantize=quantize)


# The studies' commands are declared here, as the others are, so that the parser (and so `--help`, a mistyped command)
# is built without importing the modules that run them: those import torch and transformers (7-11 s on 2 cores).
# Each passes its arguments on to the study's own cli_* function (tests/test_cli.py: the same signature).

def estimate(model: NonEmpty = "7b", method: Literal["full", "lora", "qlora", "dora", "adalora"] = "qlora",
             batch_size: PositiveInt = 1, seq_len: PositiveInt = 512, r: PositiveInt = 16,
             optimizer: Literal["adamw", "adamw_8bit", "paged_adamw", "paged_adamw_8bit"] = "adamw",
             dtype: Literal["bf16", "fp16", "fp32"] = "bf16", gradient_checkpointing: bool = False,
             no_gradient_checkpointing: bool = False, gpus: PositiveInt = 1,
             distributed: Literal["ddp", "fsdp"] = "ddp") -> None:
    """Print the expected training memory of a model and method, broken down.

    Args:
        model: a known size (7b, 13b, 65b, 70b), a transformers directory, or a built-in model name
        method: full, lora, qlora, dora or adalora
        batch_size: sequences per micro-batch
        seq_len: tokens per sequence (at most the model's context)
        r: LoRA rank (adalora: its init_r; all linear layers of each block are targeted)
        optimizer: adamw, adamw_8bit, paged_adamw or paged_adamw_8bit
        dtype: the frozen base's and activations' dtype (bf16, fp16, fp32)
        gradient_checkpointing: force gradient checkpointing on (default: on for qlora only)
        no_gradient_checkpointing: force it off
        gpus: processes (devices) training together; batch_size is per device
        distributed: ddp (a whole replica per device) or fsdp (weights, gradients and optimizer state sharded)
    """
    from loraforge.studies.estimate import cli_estimate

    cli_estimate(model, method, batch_size, seq_len, r, optimizer, dtype, gradient_checkpointing,
                 no_gradient_checkpointing, gpus, distributed)


def forgetting(config: str | None = None, out: NonEmpty = "runs/forgetting", ranks: list[PositiveInt] = (),
               seeds: SeedCount = 1, max_steps: PositiveInt | None = None, lora_lr: PositiveFloat = 1e-3,
               full_lr: PositiveFloat = 5e-5, overrides: list[str] = (), overwrite: bool = False) -> None:
    """Train one task with LoRA at two ranks and with full fine-tuning; table of learned vs forgotten.

    Without CONFIG: the built-in SmolLM2-135M on the shipped date task (the demo's). Each run is probed for
    task accuracy (learned) and multiple-choice accuracy, perplexity on general text and KL vs the base model on
    general prompts (kept). Writes forgetting.json, forgetting.png and every run's output under --out.
    Stopped or killed, the same command run again goes on: the arms it finished are kept, the one it was training
    resumes from its newest checkpoint (training.save_every; a stop by a signal saves one) or trains again; run
    with other settings it is refused (--overwrite starts over).

    Args:
        config: a training YAML for the task; default: the demo task. Its method and lora.r are replaced per arm:
            the LoRA arms train as method lora, the full one as full, on the unquantized base (a config of method
            qlora, dora or adalora is warned about; model.quantization is refused)
        out: directory for the runs, forgetting.json and forgetting.png
        ranks: LoRA ranks to compare, lora_alpha = 2r (default: 8 64)
        seeds: training seeds per arm, 1 to 100 (accuracies carry 95% intervals; 2 adds the spread: ~14 min in all on
            2 cores; each more seed trains every arm again)
        max_steps: optimizer steps for every arm (default: the config's, or 30 for the demo task)
        lora_lr: learning rate of the LoRA runs
        full_lr: learning rate of the full fine-tuning runs
        overrides: section.field=value pairs on top of the config
        overwrite: write into a non-empty --out (an earlier comparison there is run again, every arm trained anew)
    """
    from loraforge.studies.forgetting import cli_forgetting

    cli_forgetting(config, out, ranks, seeds, max_steps, lora_lr, full_lr, overrides, overwrite)


def continual(config: str | None = None, adapter: str = "runs/demo/adapter", previous: str | None = None,
              replay: str | None = None, replay_share: list[FiniteFloat] = (), out: NonEmpty = "runs/continual",
              max_steps: PositiveInt | None = None, skip_general: bool = False, limit: PositiveInt | None = None,
              overrides: list[str] = (), overwrite: bool = False) -> None:
    """Teach an adapter a second task and measure what it cost the first: old and new task accuracy (and the
    general probes) of the base, the adapter, and the adapter trained on with and without replaying old data.

    Without CONFIG: the built-in model, the adapter of `loraforge demo` (dates), and the shipped times task
    ("quarter past three in the afternoon" -> 15:15) as the new task, with the dates as the old one.
    Stopped or killed, the same command run again goes on (the arms it finished kept, the one it was training
    resumed from its newest checkpoint); run with other settings it is refused (--overwrite starts over).

    Args:
        config: a training YAML for the new task (its data.eval is scored; no lora: section needed); default: times
        adapter: the adapter trained on the old task (ours or PEFT's LoRA)
        previous: the old task's held-out examples (default, without CONFIG: the demo's held-out dates)
        replay: the old task's training data, drawn from in the replay arms (default, without CONFIG: the demo's)
        replay_share: shares of each batch drawn from --replay, one arm each; 0: the new task alone (default: 0 0.2)
        out: directory for the runs and continual.json
        max_steps: optimizer steps of every arm (default: the config's, or 24 for the times task)
        skip_general: score only the two tasks, not the general probes (MC accuracy, perplexity, KL vs the base)
        limit: keep only the first N examples of each task and of each general probe (quick checks)
        overrides: section.field=value pairs on top of the config
        overwrite: write into a non-empty --out (an earlier study there is run again, every arm trained anew)
    """
    from loraforge.studies.continual import cli_continual

    cli_continual(config, adapter, previous, replay, replay_share, out, max_steps, skip_general, limit, overrides,
                  overwrite)


def _commands() -> dict:
    return {"demo": demo, "train": train, "generate": generate, "merge": merge, "eval": eval, "serve": serve,
            "estimate": estimate, "forgetting": forgetting, "ui": ui, "export": export, "continual": continual}


OVERRIDE = re.compile(r"^[A-Za-z_]\w*(\.\w+)*=")  # section.field=value, or a run's own field (method=qlora)
# A value that starts with "-" but spells a number: argparse's own matcher takes only plain decimals (-0.5), so
# `--weights 1 -1e-3` was "unrecognized arguments: -1e-3"; -2E1, -.5e3, -inf, -Infinity, -nan are numbers too
DIGITS = r"\d(?:_?\d)*"  # float() takes 1_000 too
NEGATIVE_NUMBER = re.compile(rf"^-(?:{DIGITS}\.?(?:{DIGITS})?|\.{DIGITS})(?:e[+-]?{DIGITS})?$|^-(?:inf|infinity|nan)$",
                             re.IGNORECASE)
OPTIONAL_POSITIONALS = ("config", "data")  # `loraforge forgetting [CONFIG]`, `loraforge eval [DATA] --probe mc`
# (and `train`'s CONFIG, which may follow the overrides)


def _arg_docs(doc: str) -> dict[str, str]:
    """{parameter: its `Args:` text}, a text's more indented continuation lines joined on (generate's --chat help
    stopped mid-sentence at its first line's end)."""
    if "Args:" not in doc:
        return {}
    entries = re.split(r"^\s+(\w+): ", doc.split("Args:", 1)[1], flags=re.M)[1:]
    return {name: " ".join(text.split()) for name, text in zip(entries[::2], entries[1::2])}


def _summary(doc: str) -> str:
    """The docstring's first paragraph as one line: `loraforge --help`'s line for a command (continual's stopped at
    the docstring's first line break, "... task accuracy (and the")."""
    return " ".join(doc.split("\n\n", 1)[0].split())


def _value_type(tp) -> tuple:
    """(type=, choices=) for one value of a hint: an Annotated hint's checker, a Literal's values, else the type."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):  # X | None: the value is an X
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    if typing.get_origin(tp) is list:
        tp = typing.get_args(tp)[0]
    if typing.get_origin(tp) is typing.Annotated:
        return tp.__metadata__[0], None
    if typing.get_origin(tp) is typing.Literal:
        return str, typing.get_args(tp)
    return tp, None


class _Parser(argparse.ArgumentParser):
    """argparse's parser whose error line ends with `hint` (parse_args sets a command's: dash_hint)."""

    hint = ""

    def error(self, message: str):
        super().error(message + self.hint)


def build_parser() -> argparse.ArgumentParser:
    commands = _commands()
    # allow_abbrev=False: argparse took any unique prefix of an option silently, so `train x.yaml --o` was
    # --overwrite (a finished run started over) and `serve --adapters a=b` was --adapters-dir; a prefix or a typo is
    # now refused with the option it resembles (parse_args)
    parser = _Parser(prog="loraforge", description="LoRA / QLoRA / AdaLoRA fine-tuning, "
                                     "PEFT-compatible adapters, merging and serving.", allow_abbrev=False)
    parser.add_argument("--version", action="version", version=f"loraforge {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, func in commands.items():
        doc = inspect.getdoc(func) or ""
        p = sub.add_parser(name, help=_summary(doc).replace("%", "%%"),
                           description=doc.split("Args:")[0].strip(),
                           formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
        p._negative_number_matcher = NEGATIVE_NUMBER  # no option of ours looks like a number: a value, not an option
        docs = _arg_docs(doc)
        hints = typing.get_type_hints(func, include_extras=True)
        for param in inspect.signature(func).parameters.values():
            tp = hints.get(param.name, str)
            kwargs = {"help": docs.get(param.name, "").replace("%", "%%")}  # argparse formats help with %
            is_list = typing.get_origin(tp) is list
            base_tp, choices = _value_type(tp)
            if choices:
                kwargs["choices"] = choices
            if param.default is inspect.Parameter.empty and param.kind is inspect.Parameter.KEYWORD_ONLY:
                extra = {"nargs": "+", "action": "extend"} if is_list else {}  # a required --option
                p.add_argument("--" + param.name.replace("_", "-"), dest=param.name, type=base_tp, required=True,
                               **extra, **kwargs)
            elif param.default is inspect.Parameter.empty:
                p.add_argument(param.name, type=base_tp, nargs="+" if is_list else None, **kwargs)
            elif param.name in OPTIONAL_POSITIONALS and param.default is None:
                p.add_argument(param.name, type=base_tp, nargs="?", default=None, **kwargs)
            elif tp is bool:
                p.add_argument("--" + param.name.replace("_", "-"), action="store_true", **kwargs)
            elif param.name == "overrides":  # trailing key=value pairs
                p.add_argument(param.name, nargs="*", default=[], metavar="KEY=VALUE", **kwargs)
            else:
                kwargs["help"] += f" (default: {param.default})" if param.default not in (None, ()) else ""
                extra = {"nargs": "+", "action": "extend"} if is_list else {}  # --adapter a=x --adapter b=y
                p.add_argument("--" + param.name.replace("_", "-"), dest=param.name, type=base_tp,
                               default=list(param.default) if is_list else param.default, **extra, **kwargs)
    return parser


def did_you_mean(word: str, known) -> str:
    """' (did you mean X?)' for a mistyped or shortened name among `known`, else ''. Every option `word` begins
    (`--over`: --overwrite), or the closest spelling (`trian`: train, `--max-step`: --max-steps)."""
    known = list(known)
    close = [k for k in known if k.startswith(word) and word.strip("-")]
    # spellings compared without their dashes: '--' alone made --batch-size "close" to --quantize (soak)
    bare = {k.lstrip("-"): k for k in known}
    close += [bare[k] for k in difflib.get_close_matches(word.lstrip("-"), bare, n=1) if bare[k] not in close]
    return f" (did you mean {' or '.join(close)}?)" if close else ""


def _subparser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    """`command`'s own parser (build_parser)."""
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]


def _options(parser: argparse.ArgumentParser, command: str) -> list[str]:
    """The --options of `command` as its subparser (build_parser) declares them, --help first."""
    return [o for o in _subparser(parser, command)._option_string_actions if o.startswith("--")]


def dash_hint(argv: list[str], parser: argparse.ArgumentParser) -> str:
    """' (why)' for the first word of `argv` before any `--` that starts with '-' and is none of `parser`'s options,
    else '': argparse reads it as an option, and its error did not say so (soak: `merge ... --out -m` was "argument
    --out: expected one argument", `train -x.yaml` "the following arguments are required: config" with -x.yaml
    there, `generate -hello` "argument -h/--help: ignored explicit argument 'ello'"). A word with a space or one
    that spells a number is a value to argparse too; an unknown --word is left to the unrecognized-option line."""
    options = parser._option_string_actions
    before = None
    for word in argv[:argv.index("--") if "--" in argv else len(argv)]:
        if (word.startswith("-") and len(word) > 1 and " " not in word and not NEGATIVE_NUMBER.match(word)
                and word.partition("=")[0] not in options):
            if before in options and options[before].nargs != 0:  # an option that takes a value, then this word
                return (f" ({word} starts with '-', so it reads as an option, not as {before}'s value: write "
                        f"{before}={word})")
            if os.path.lexists(word):
                return (f" ({word} is a file here: a name that starts with '-' reads as an option; write ./{word}, or "
                        f"put -- before it)")
            if not word.startswith("--"):
                return f" ({word} starts with '-', so it reads as an option; if it is a value, put -- before it)"
        before = word
    return ""


def stray_hint(argv: list[str], command: str, options: list[str]) -> str:
    """' (--ada: did you mean --adapter?)' for the first --word of `argv` before any `--` that is none of `command`'s
    `options`, else '': an error of the command's own parser (a required argument missing) came before the line
    that names unknown options, and said nothing of it (soak: `merge --out x --ada a` said only "the following
    arguments are required: --base, --adapter")."""
    for word in argv[:argv.index("--") if "--" in argv else len(argv)]:
        name = word.partition("=")[0]
        if name.startswith("--") and len(name) > 2 and name not in options:
            said = _hint(name, command, options)
            return f" ({name}: {said[2:-1]})" if said else f" ({name} is not an option of {command})"
    return ""


def config_keys(name: str) -> list[str]:
    """The config keys whose field is spelled `name` (batch_size: ['training.batch_size=VALUE']), top level or in
    a section (model, lora, data, training)."""
    from loraforge.config import TrainConfig

    hints = typing.get_type_hints(TrainConfig)
    keys = [name] if name in hints else []
    for section, tp in hints.items():
        if dataclasses.is_dataclass(tp) and name in {f.name for f in dataclasses.fields(tp)}:
            keys.append(f"{section}.{name}")
    return [f"{key}=VALUE" for key in keys]


def _hint(option: str, command: str, options: list[str]) -> str:
    """The hint for an --option `command` does not have (`options`: those it has): a positional's name given as an
    option (`train --config x.yaml`: CONFIG comes without a flag), or the options it resembles."""
    name = option.lstrip("-").replace("-", "_")
    params = inspect.signature(_commands()[command]).parameters
    if name in params and "--" + option.lstrip("-") not in options:
        what = "KEY=VALUE pairs come" if name == "overrides" else f"{name.upper()} is positional: give it"
        return f" ({what} without {option})"
    if option in options:  # `generate -- -x --max-new-tokens 4`: after --, every word is a value
        return f" (after -- every word is a value: put {option} before the --)"
    if hint := did_you_mean(option, options):
        return hint
    if "overrides" in params and (keys := config_keys(name)):
        # `train c.yaml --batch-size 4` said "estimate has it": the config field is what train takes
        return f" ({command} has no {option}; give the config field as {' or '.join(keys)})"
    parser = build_parser()  # soak: `eval --batch-size 0` was "(did you mean --quantize?)"
    others = [c for c in _commands() if c != command and option in _options(parser, c)]
    return f" ({command} has no {option}; {' and '.join(others)} {'has' if len(others) == 1 else 'have'} it)" \
        if others else ""


def parse_args(argv: list[str] | None = None) -> dict:
    """Parse a command line; KEY=VALUE overrides may come anywhere, also after --options. A mistyped command or
    option (or an option shortened: argparse's prefixes are off) is refused with the name it resembles."""
    parser = build_parser()
    given = sys.argv[1:] if argv is None else list(argv)
    word = next((a for a in given if not a.startswith("-")), None)  # the top level has no option taking a value
    if word is not None and word not in _commands() and (hint := did_you_mean(word, _commands())):
        parser.error(f"argument command: invalid choice: {word!r}{hint}")
    if word in _commands():  # its parser's errors (argparse's own) say what a word starting with '-' was read as,
        rest, sub = given[given.index(word) + 1:], _subparser(parser, word)  # or name an option it does not have
        sub.hint = dash_hint(rest, sub) or stray_hint(rest, word, _options(parser, word))
    args, extra = parser.parse_known_args(argv)
    stray = [e for e in extra if e.startswith("-") or "=" not in e]
    if stray or (extra and not hasattr(args, "overrides")):
        # soak: `eval -x.jsonl`, a file whose name starts with '-', read as an option no command has
        files = [e for e in stray if e.startswith("-") and os.path.lexists(e)]
        hint = (f" ({files[0]} is a file here: a name that starts with '-' reads as an option; write ./{files[0]}, "
                f"or put -- before it)") if files else ""
        options = _options(parser, args.command)
        named = [e + (_hint(e.partition("=")[0], args.command, options) if e.startswith("--") and e not in files
                      else "") for e in stray or extra]
        parser.error(f"unrecognized arguments: {' '.join(named)}{hint}")
    if extra:
        args.overrides = list(args.overrides) + extra
    for name in OPTIONAL_POSITIONALS:  # argparse took an override for the file: `forgetting lora.r=4` (the
        value = getattr(args, name, None)  # optional file left out) or `train lora.r=4 base.yaml` (given later)
        if value is not None and hasattr(args, "overrides") and OVERRIDE.match(value):
            rest = [value, *args.overrides]
            given = next((v for v in rest if not OVERRIDE.match(v)), None)
            if given is not None:
                rest.remove(given)
            elif inspect.signature(_commands()[args.command]).parameters[name].default is inspect.Parameter.empty:
                parser.error(f"the following arguments are required: {name} (before or after the KEY=VALUE "
                             f"overrides)")
            setattr(args, name, given)
            args.overrides = rest
    return vars(args)


_INTERRUPTED: list[int] = []  # the Ctrl-Cs that reached _interrupt


def _interrupt(signum, frame):
    """Python's own Ctrl-C (KeyboardInterrupt), remembered: one that lands inside an import (torch, numpy) can leave
    a half-initialised module whose next use fails with another error (a 900-line RecursionError from numpy)."""
    _INTERRUPTED.append(signum)
    raise KeyboardInterrupt


class Terminated(BaseException):
    """SIGTERM (`kill`, `docker stop`) or SIGHUP (the terminal or SSH session closed) where no training loop stops
    on it: raised in the main thread (`_terminated_cleanly`) so that the command's clean-up runs, and the CLI exits
    128 + its number. The signal's default action ended the process where it stood: a merge killed while writing
    left its 400 MB `.tmp-OUT-*` folder beside --out until a rerun into the same --out swept it. A BaseException,
    as SystemExit is: `except Exception` never takes it for an error."""

    def __init__(self, signum: int):
        super().__init__(stopped_line(signum))
        self.signum = signum


def _terminate(signum, frame):
    signal.signal(signum, signal.SIG_DFL)  # a second one ends the process at once, clean-up or not
    raise Terminated(signum)


SERVERS = ("serve", "ui")  # uvicorn stops them on SIGTERM itself (api.run_until_signal), its threads included


@contextlib.contextmanager
def _terminated_cleanly(command: str):
    """Inside the block (the command, its imports done) a signal raises in the main thread, so that the command's
    clean-up runs: SIGTERM and SIGHUP raise Terminated (see there) for a command that is not a server, for a signal
    left at its default action (nohup's SIGHUP stays ignored) or at the startup's exit_now, and not under torchrun,
    whose agent stops its processes itself; a server gets them at their default action (uvicorn takes them). Ctrl-C
    raises KeyboardInterrupt (_interrupt) where the startup's exit_now had it. The training loop takes the signals
    over while it runs (a checkpoint, then Stopped), and gives them back after. They are given back as they were."""
    main_thread = threading.current_thread() is threading.main_thread()
    ours = command not in SERVERS and "TORCHELASTIC_RUN_ID" not in os.environ
    handlers = {s: (_terminate if ours else signal.SIG_DFL) for s in (signal.SIGTERM, signal.SIGHUP)
                if main_thread and untouched(s)}
    if main_thread and signal.getsignal(signal.SIGINT) is exit_now:
        handlers[signal.SIGINT] = _interrupt
    previous = {s: signal.signal(s, handler) for s, handler in handlers.items()}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _ended(signum, frame):
    """Ctrl-C, SIGTERM or SIGHUP once the command has ended, while the interpreter tears down (torch's part alone
    takes a second or more): exit 128 + the signal's number at once (130, 143, 129), rather than with a
    KeyboardInterrupt traceback from an atexit callback or a thread join, or killed by the signal (the dashboard's
    "Stop now" on a run already writing its last line exited -15)."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # a write the signal interrupted: "reentrant call"
            stream.flush()
    os._exit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    """The command line (`argv`, or the process's own when None); returns the exit code. For the process's own
    command line a Ctrl-C, SIGTERM or SIGHUP during the start (the imports: utils.startup) or after the command has
    ended (_ended) exits 128 + its number at once; a caller passing `argv` (tests, a program) gets its SIGINT handler
    back as it was. The process's own standard output and error are guarded (utils.streams): a reader that leaves, a
    full disk under a log file or an encoding without a character ends no command (one whose stdout was lost to a
    full disk exits 1)."""
    _INTERRUPTED.clear()
    own = argv is None and threading.current_thread() is threading.main_thread()
    if argv is None:
        guard_streams()
    if own:
        exit_on_signals()  # python -m loraforge did it before its imports; the `loraforge` script of old did not
    ours = not own and threading.current_thread() is threading.main_thread() and \
        signal.getsignal(signal.SIGINT) is signal.default_int_handler
    if ours:
        signal.signal(signal.SIGINT, _interrupt)
    try:
        code = run_command(argv)
        return 1 if code == 0 and argv is None and output_failed() else code
    except SystemExit as e:  # argparse's own end: --help, --version (0) or a usage error (2)
        if e.code in (0, None) and argv is None and output_failed():  # `--help > /dev/full`: said, so exit 1
            return 1
        raise
    except KeyboardInterrupt:  # a second Ctrl-C while the first one's stop, its message or the clean-up was running
        print("interrupted", file=sys.stderr)
        return 130
    except Exception:  # what an interrupted import left behind: the Ctrl-C is the cause, not this error
        if not _INTERRUPTED:
            raise
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        if ours:
            signal.signal(signal.SIGINT, signal.default_int_handler)
        if own:
            for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                if signal.getsignal(s) is exit_now:  # the ones exit_on_signals took: nohup's SIGHUP stays ignored
                    signal.signal(s, _ended)


def one_line_warnings() -> None:
    """Our own warnings (a config field ignored, a slow precision asked for) as one `warning: ...` line, instead of
    Python's `path/to/loraforge/x.py:94: UserWarning: ...` and a source line; other libraries' keep Python's form."""
    if getattr(warnings.formatwarning, "ours", False):
        return
    default, package = warnings.formatwarning, os.path.dirname(os.path.abspath(__file__)) + os.sep

    def formatwarning(message, category, filename, lineno, line=None):
        if os.path.abspath(filename).startswith(package):
            return f"warning: {message}\n"
        return default(message, category, filename, lineno, line)

    formatwarning.ours = True
    warnings.formatwarning = formatwarning


def too_long(path) -> str:
    """Why the file system refused `path` as too long, and the fix."""
    longest = max((len(part.encode(errors="surrogateescape")) for part in str(path).split(os.sep)), default=0)
    if longest > 255:
        return (f"the name is too long for the file system (a part of the path is {longest} bytes, most allow 255); "
                f"shorten it")
    return f"the path is too long for the file system ({len(str(path))} characters); shorten it"


EXTRAS = {"fastapi": "serve", "uvicorn": "serve", "starlette": "serve"}
"""Packages of the optional extras whose absence only a command's import finds: package -> extra that installs it.
(bitsandbytes, the trackers and `datasets` name their setting where they are needed.)"""


NEEDS = {"serve": ("fastapi", "uvicorn"), "ui": ("fastapi", "uvicorn")}
"""The optional packages a command cannot start without: looked for (not imported) before torch is, so their absence
is said at once (it came after torch's import, 7-13 s on 2 cores)."""


def missing_extra(command: str, e: ModuleNotFoundError) -> str | None:
    """The line for an optional package `command` imported and did not find, or None (not one of EXTRAS)."""
    package = (e.name or "").partition(".")[0]
    if package not in EXTRAS:
        return None
    return (f"loraforge {command} needs {package}, which is not installed here: pip install "
            f"'loraforge[{EXTRAS[package]}]'")


def run_command(argv: list[str] | None = None) -> int:
    one_line_warnings()
    try:  # before the imports: torch's in a deleted folder ends the process ("Intel oneMKL FATAL ERROR: Cannot load")
        os.getcwd()
    except FileNotFoundError:
        print("error: the current directory no longer exists (deleted or moved away); cd into one that does and run "
              "the command again", file=sys.stderr)
        return 2
    follow_agent()  # under torchrun: before the slow imports, so that an agent killed during them is seen
    args = parse_args(argv)
    command = args.pop("command")
    return _run(command, args)


def _run(command: str, args: dict) -> int:
    """Run `command` with its parsed `args`: its exit code, and one line on stderr for an error users can fix."""
    func = _commands()[command]
    for package in NEEDS.get(command, ()):
        if importlib.util.find_spec(package) is None:
            print(f"error: {missing_extra(command, ModuleNotFoundError(name=package))}", file=sys.stderr)
            return 2
    from loraforge.lora.adapters import AdapterError
    from loraforge.config import ConfigError
    from loraforge.training.data import DataError
    from loraforge.utils.files import DiskError
    from loraforge.models import ModelDownloadError, ModelFilesError
    from loraforge.serve.errors import ServeError
    from loraforge.utils.outputs import OutputError
    from loraforge.training.loop import Stopped, TrainingError
    from loraforge.training.distributed import leave_processes

    try:
        with _terminated_cleanly(command):
            func(**args)
    except (ConfigError, DataError, AdapterError, TrainingError, OutputError, ModelDownloadError, ModelFilesError,
            DiskError, ServeError, FileNotFoundError, FileExistsError, FloatingPointError) as e:
        # under torchrun a node's processes share its command line and files: a config or data error once per node, and
        # a training error every process raises alike (--resume's refusals, a non-finite loss) the same
        once = isinstance(e, (ConfigError, DataError)) or getattr(e, "everywhere", False)
        if not (once and os.environ.get("LOCAL_RANK", "0") != "0"):
            print(f"error: {e}", file=sys.stderr)
        report_to_agent(f"error: {e}")  # torchrun's failure summary shows it, not "error_file: <N/A>"
        return 2
    except ModuleNotFoundError as e:  # an optional extra's package (serve, ui): the install line, not a traceback
        if (line := missing_extra(command, e)) is None:
            raise
        print(f"error: {line}", file=sys.stderr)
        return 2
    except OSError as e:  # a path the file system refuses by its length, wherever the command first touches it
        if e.errno != errno.ENAMETOOLONG:
            raise
        print(f"error: {e.filename or 'a path'}: {too_long(e.filename or '')}", file=sys.stderr)
        return 2
    except Stopped as e:  # a signal stopped the training loop: exit 128 + its number, as the shell would report it
        if os.environ.get("RANK", "0") == "0":  # under torchrun every process stopped at the same step: one line
            with contextlib.suppress(OSError):  # SIGHUP: the terminal it would go to may be gone
                print(f"{e}" + ("; continue with --resume" if func is train and e.resumable else ""),
                      file=sys.stderr)
        return e.exit_code
    except Terminated as e:
        with contextlib.suppress(OSError):  # SIGHUP: the terminal it would go to may be gone
            print(e, file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        leave_processes()  # under torchrun: before interpreter shutdown, or a rank may exit with SIGABRT
    return 0


if __name__ == "__main__":
    sys.exit(main())
