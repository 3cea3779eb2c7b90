"""`loraforge continual`: what teaching an adapter a second task costs the first, with and without replay.

    base model, and the adapter as it is (trained on the old task)   --probe-->  rows "base", "before"
    for each replay share s (0: the new task alone):
        train on from the adapter (training.init_adapter) on the new task, a share s of each batch drawn
        from the old task's training data (loraforge.training.mixing)   --probe-->  one row per share
    probe = old task accuracy, new task accuracy (greedy exact match on held-out examples) and, unless turned
            off, the general probes of `loraforge forgetting` (MC accuracy, perplexity, KL vs the base)

Every arm trains the same steps at the same rate from the same adapter; only the data differs. Writes
continual.json (every number, with n) and each arm's run folder under --out.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from loraforge.argtypes import FiniteFloat, FlagOverride, NonEmpty, PositiveInt
from loraforge.config import (ConfigError, DataSource, LoraConfig, TrainConfig, load_train_config, replace_run,
                              to_dict)
from loraforge.lora.adapters import (AdapterError, delete_adapter, load_adapter, read_adapter_config,
                                     read_adapter_weights)
from loraforge.models import conversion_paths, load_base, load_config
from loraforge.quant.bnb import check_bitsandbytes
from loraforge.studies.demo import asset, demo_config
from loraforge.studies.forgetting import (CachedLogits, held_out_task, other_precisions, precision_text, probe_all,
                                          probe_base, run_length, start_over, steps_text, task_split, trained_steps)
from loraforge.studies.heldout import answer_token_budget, fitting, heldout_accuracy, model_hash, with_adapter_hash
from loraforge.studies.probes import load_probe
from loraforge.studies.rerun import (check_results, going_on, kept_report, study_settings, train_arm,
                                     write_report)
from loraforge.training import data as D
from loraforge.training.continual import init_adapter_config
from loraforge.training.loop import run_precision
from loraforge.training.trackers import check_tracker
from loraforge.utils.files import expand_user
from loraforge.utils.outputs import check_output, hold_output
from loraforge.utils.table import text_table

DEFAULT_SHARES = (0.0, 0.2)
DEMO_STEPS = 24
DEFAULT_ADAPTER = "runs/demo/adapter"  # what `loraforge demo` writes


def arm_config(cfg: TrainConfig, adapter: str, replay: str | None, share: float, out: Path,
               sizes: list[int] | None = None) -> TrainConfig:
    """`cfg` training on from `adapter`; with share > 0 a share of the examples drawn from `replay`, the new task's
    sources keeping the shares they have without replay in the remaining 1 - share: their weights, or where they
    have none their records (`sizes`, each source's) × epochs, as an epoch of them draws."""
    new = cfg.data.sources("train")
    sources = new
    if share > 0:
        weights = [s.weight if s.weight is not None else n * (s.epochs or 1.0) for s, n in zip(new, sizes)]
        sources = tuple(dataclasses.replace(s, weight=(1 - share) * w / sum(weights), epochs=None)
                        for s, w in zip(new, weights)) + (DataSource(path=replay, format="auto", weight=share),)
        # the old task's data in its own format, not the new task's data.format (soak: chat-format new task data
        # read the instruction replay as chat, and the replay arm failed after the probes and the first arm ran)
    data = dataclasses.replace(cfg.data, train=sources, eval=None, eval_fraction=0.0)
    training = dataclasses.replace(cfg.training, init_adapter=str(adapter), eval_every=0)  # save_every: the config's
    return dataclasses.replace(cfg, data=data, training=training, output_dir=str(out / arm_slug(share)))


def percent(share: float) -> str:
    """The share in percent with the digits that tell shares apart (0.2: 20, 0.001: 0.1, 0.004: 0.4)."""
    return f"{100 * share:.12g}"


def arm_name(share: float) -> str:
    return "new task" if share == 0 else f"new + {percent(share)}% replay"


def arm_slug(share: float) -> str:
    """The arm's folder under --out: one per share (check_shares refuses two shares that would share one)."""
    return "new" if share == 0 else f"replay{percent(share)}"


def check_shares(shares) -> list[str]:
    """Each share once: two arms of one folder would have the second refused after the first trained."""
    slugs = [arm_slug(s) for s in shares]
    return [f"--replay-share: {' and '.join(f'{s:g}' for s in shares if arm_slug(s) == slug)} give one arm "
            f"(folder {slug}); give each share once" for slug in dict.fromkeys(slugs) if slugs.count(slug) > 1]


def check_init_adapter(cfg: TrainConfig, adapter: str) -> None:
    """Every arm trains on from --adapter: a training.init_adapter naming another adapter would be replaced
    without a word (and its settings not be the ones trained)."""
    given = cfg.training.init_adapter
    if given and expand_user(given).resolve() != expand_user(adapter).resolve():
        raise ConfigError([f"training.init_adapter: continual trains every arm on from --adapter ({adapter}), not "
                           f"from {given}; remove training.init_adapter, or pass --adapter {given}"])


def run_continual(cfg: TrainConfig, adapter: str, previous: str, replay: str | None = None,
                  shares=DEFAULT_SHARES, out: str | Path = "runs/continual", general: bool = True,
                  limit: int | None = None, progress: bool = True, overwrite: bool = False) -> dict:
    """Probe base and adapter, train each replay share from the adapter on `cfg`'s task, probe each; print the
    table and write continual.json. `previous`: the old task's held-out examples; `replay`: its training data."""
    started = time.perf_counter()
    check_init_adapter(cfg, adapter)
    if problems := check_shares(shares) + replay_problems(replay, shares):  # (cli_continual checks them too)
        raise ConfigError(problems)
    check_tracker(cfg.training.report_to)  # else found by the first arm's train(), after the probes
    check_bitsandbytes(cfg.quantization, cfg.training.optimizer)  # the same for the quant extra
    # before anything is written into --out; replace_run keeps which lora: fields were written (r: 8 is checked)
    init_adapter_config(replace_run(cfg, training=dataclasses.replace(cfg.training, init_adapter=adapter)))
    with hold_output(out, "--out"):  # one study at a time in --out (each arm holds its own folder as it trains)
        return _study(cfg, adapter, previous, replay, shares, expand_user(out), general, limit, progress, overwrite,
                      started)


def _study(cfg: TrainConfig, adapter: str, previous: str, replay: str | None, shares, out: Path, general: bool,
           limit: int | None, progress: bool, overwrite: bool, started: float) -> dict:
    settings = study_settings(cfg, [*cfg.data.paths(), adapter, previous, replay], adapter=str(adapter),
                              previous=previous, replay=replay, shares=list(shares), general=general, limit=limit)
    resume = going_on(out, "continual", settings, overwrite)  # the same study stopped before: it goes on
    check_results(out, "continual", ("continual.json",), overwrite)  # before a rerun reads it back or replaces it
    earlier = kept_report(out, "continual", "continual.json") if resume else None
    if earlier is not None and earlier.get("complete"):
        print(format_report(earlier), flush=True)
        print(f"{out} holds this study, finished: its report above is read from {out / 'continual.json'} (pass "
              f"--overwrite to run it again)", flush=True)
        return earlier
    if not resume:
        start_over(out, ("continual.json",))
    cfg = task_split(cfg, out, "continual", overwrite, [arm_slug(share) for share in shares], settings)
    kept = {row.get("name"): row for row in (earlier or {}).get("rows", [])}
    sizes = [len(D.read_records(s.path)) for s in cfg.data.sources("train")]  # the replay arms' shares
    precision = run_precision(cfg, torch.device("cpu"))
    print(precision.line(), flush=True)
    bf16 = precision.compute == "bf16"
    (new_records, fmt_new), old_records = held_out_task(cfg, limit), D.read_records(previous)[:limit]
    fmt_old = D.detect_format(old_records[0])
    text = load_probe("text")
    probes = {"mc": load_probe("mc")[:limit], "kl": load_probe("kl")[:limit],
              "text": "\n".join(text.splitlines()[:limit]) if limit else text}

    # loaded once, each adapter going on and off; quantized as the arms train on it (method qlora)
    base, tokenizer = load_base(cfg.model.name, dtype=precision.storage, quantize=cfg.quantization)
    base.eval()
    new_records = fitting(new_records, tokenizer, base, "new task")
    old_records = fitting(old_records, tokenizer, base, "old task (--previous)")
    base_key = model_hash(base, tokenizer)  # scores are cached by weights: the demo's base and adapter ones reused
    max_new, max_old = (answer_token_budget(tokenizer, new_records, fmt_new),
                        answer_token_budget(tokenizer, old_records, fmt_old))

    def score(name: str, reference) -> dict:
        """The old and the new task (and the general probes) of `base` with whichever adapter it holds now."""
        t0 = time.perf_counter()
        key = with_adapter_hash(base_key, base)
        old = heldout_accuracy(base, tokenizer, old_records, fmt_old, max_old, precision.compute, key,
                               f"{name}, old task")
        if general:
            if reference is None:
                scores, _ = probe_base(base, tokenizer, cfg.model.name, new_records, fmt_new, bf16, probes, max_new,
                                       progress)
            else:
                scores = probe_all(base, tokenizer, reference, new_records, fmt_new, bf16, probes, max_new, name,
                                   progress)
        else:
            scores = {"task": heldout_accuracy(base, tokenizer, new_records, fmt_new, max_new, precision.compute, key,
                                               f"{name}, new task")}
        old.pop("samples", None)
        scores["task"].pop("samples", None)
        return {"name": name, "old": old, "new": scores["task"], **{k: scores[k] for k in ("mc", "ppl", "kl")
                                                                      if k in scores},
                "probe_seconds": time.perf_counter() - t0}

    def recorded(name: str) -> bool:
        """Whether the run before scored `name` (its row kept): said, and the row taken."""
        if name in kept:
            rows.append(kept[name])
            print(f"[{name}] scored by the run before:\n{row_line(rows[-1])}", flush=True)
        return name in kept

    rows = []
    if not recorded("base"):
        rows.append({**score("base", None), "train_seconds": 0.0})
        print(row_line(rows[-1]), flush=True)
    reference = CachedLogits(base) if general else None  # the base's logits: computed with the adapters off
    if not recorded("before"):
        load_adapter(base, adapter)
        rows.append({**score("before", reference), "train_seconds": 0.0})
        print(row_line(rows[-1]), flush=True)
        delete_adapter(base, "default")
    write_report(out, "continual", "continual.json", {"complete": False, "rows": rows})

    for share in shares:
        if recorded(arm_name(share)):  # trained and scored by the run before
            continue
        run_cfg = arm_config(cfg, adapter, replay, share, out, sizes)
        print(f"[{arm_name(share)}] training {run_length(run_cfg.training)} × batch "
              f"{run_cfg.training.batch_size} from {adapter} ...", flush=True)
        result = train_arm(run_cfg, progress, overwrite, "continual", resume)
        load_adapter(base, Path(run_cfg.output_dir) / "adapter")
        rows.append({**score(arm_name(share), reference), "train_seconds": result.seconds, "steps": result.steps,
                     "replay_share": share, "output_dir": run_cfg.output_dir,
                     "trained_in": result.precision})  # on a GPU: not the probes' CPU precision
        print(row_line(rows[-1]), flush=True)
        delete_adapter(base, "default")
        write_report(out, "continual", "continual.json", {"complete": False, "rows": rows})

    data = to_dict(cfg.data)
    trained = [row["trained_in"] for row in rows if "trained_in" in row]
    report = {"complete": True, "model": cfg.model.name, "adapter": str(adapter), "previous": previous,
              "replay": replay, "new_train": data["train"], "new_eval": data["eval"], "steps": trained_steps(rows),
              "batch_size": cfg.training.batch_size, "lr": cfg.training.lr, "precision": precision.compute,
              "train_precision": other_precisions(precision, trained),
              "method": cfg.method, "quantization": cfg.quantization, "rows": rows,
              "seconds": time.perf_counter() - started}
    write_report(out, "continual", "continual.json", report)
    print(format_report(report), flush=True)
    print(f"wrote {out / 'continual.json'}; total {report['seconds']:.0f} s", flush=True)
    return report


def _pct(d: dict) -> str:
    lo, hi = d["ci95"]
    return f"{100 * d['accuracy']:.0f} [{100 * lo:.0f}-{100 * hi:.0f}]"


def row_line(row: dict) -> str:
    extra = (f"  MC {row['mc']['correct']}/{row['mc']['n']}  ppl {row['ppl']['ppl']:.3f}  KL {row['kl']['kl']:.4g}"
             if "mc" in row else "")
    return (f"  {row['name']:<16} old task {row['old']['correct']}/{row['old']['n']}  new task "
            f"{row['new']['correct']}/{row['new']['n']}{extra}  (train {row['train_seconds']:.0f} s, probes "
            f"{row['probe_seconds']:.0f} s)")


def file_names(value: str | list) -> str:
    """A data field as the report holds it (a path, or a list of paths and {path, ...} sources): its file names."""
    items = [value] if isinstance(value, str) else value
    return ", ".join(Path(v if isinstance(v, str) else v["path"]).name for v in items)


def format_report(report: dict) -> str:
    rows = report["rows"]
    general = "mc" in rows[0]
    header = ["run", "old task acc % [95% CI]", "new task acc % [95% CI]"] + (
        ["MC acc %", "ppl", "KL vs base"] if general else []) + ["train s"]
    lines = []
    for r in rows:
        cells = [r["name"], _pct(r["old"]), _pct(r["new"])]
        if general:
            cells += [f"{100 * r['mc']['accuracy']:.1f}", f"{r['ppl']['ppl']:.3f}", f"{r['kl']['kl']:.4g}"]
        lines.append(cells + [f"{r['train_seconds']:.0f}"])
    head = (f"continual on {report['model']}: from {report['adapter']}, {steps_text(report['steps'])} steps × batch "
            f"{report['batch_size']} at lr {report['lr']:g}, {precision_text(report)}; old task = greedy exact "
            f"match on {rows[0]['old']['n']} held-out examples of {Path(report['previous']).name}, new task on "
            f"{rows[0]['new']['n']} of {file_names(report['new_eval'])}")
    return "\n".join([head, *text_table(header, lines)])


# --- CLI -----------------------------------------------------------------------------------------------------

def adapter_problems(adapter: str, model: str | None = None) -> list[str]:
    """--adapter checked before any probe runs (the base's probes take minutes): a folder with a readable PEFT
    config and weights; the default, missing, means `loraforge demo` has not run yet. With `model`, the adapter's
    tensors are also checked against that base (adapter_fits)."""
    if not expand_user(adapter).is_dir():
        fix = ("run `loraforge demo` first (it trains the adapter this study starts from), or give --adapter DIR"
               if adapter == DEFAULT_ADAPTER else "give the folder an adapter was saved in")
        return [f"--adapter {adapter}: no such folder; {fix}"]
    try:
        read_adapter_config(adapter)
        read_adapter_weights(adapter)
        if model is not None:
            adapter_fits(adapter, model)
    except (AdapterError, ConfigError, ValueError) as e:
        return [f"--adapter {adapter}: {e}"]
    return []


def adapter_fits(adapter: str, model: str) -> None:
    """AdapterError where `adapter`'s tensors do not fit `model` (an adapter made for another base), found before
    the model loads: load_adapter's own checks of every key and shape, run on the model built from its config on
    the meta device (shapes without weights: no memory, a fraction of a second). Such an adapter was refused only
    once the base had been probed. Whatever the meta device cannot run (a check that compares weights, PEFT's copy
    of a targeted head) or a model that cannot be built here is left to the real load, which reports it."""
    try:
        with torch.device("meta"):
            shapes = AutoModelForCausalLM.from_config(load_config(model))
    except Exception:  # noqa: BLE001 -- a model that fails here fails, and is reported, where it loads
        return
    try:
        with warnings.catch_warnings():  # about the base it is loaded over (its quantization...): the real load's
            warnings.simplefilter("ignore")
            load_adapter(shapes, adapter)
    except AdapterError:
        raise
    except Exception:  # noqa: BLE001 -- an operation without a meta kernel: the real load checks this adapter
        return


def previous_problems(previous: str | None) -> list[str]:
    """--previous checked before the model loads: records of one format with reference answers (a text file, a
    missing field were found after --out was made and the model loaded)."""
    if not previous:
        return []
    try:
        records = D.read_records(previous)
        fmt = D.detect_format(records[0])
        for i, record in enumerate(records):
            if (this := D.detect_format(record)) != fmt:
                raise D.DataError(f"record {i} is in {this!r} format but record 0 is in {fmt!r}; a dataset must use "
                                  f"one format")
            D.reference_output(record, fmt)
    except D.DataError as e:
        return [f"--previous {previous}: {e}"]
    return []


def replay_problems(replay: str | None, shares) -> list[str]:
    """--replay checked before the model loads when a replay arm will draw from it: the records are read (an empty
    file, a folder or records of no known format were found by the first replay arm's train(), after the probes
    and the arm without replay had run, and that work was lost)."""
    if not any(shares):
        return []
    if not replay:
        return ["--replay: the replay arms need the old task's training data; give --replay FILE or --replay-share 0"]
    try:
        records = D.read_records(replay)
        D.detect_format(records[0])
    except D.DataError as e:
        return [f"--replay {replay}: {e}"]
    return []


def cli_continual(config: str | None = None, adapter: str = DEFAULT_ADAPTER, previous: str | None = None,
                  replay: str | None = None, replay_share: list[FiniteFloat] = (), out: NonEmpty = "runs/continual",
                  max_steps: PositiveInt | None = None, skip_general: bool = False, limit: PositiveInt | None = None,
                  overrides: list[str] = (), overwrite: bool = False) -> None:
    """`loraforge continual`: cli.continual's docstring is its help (it is defined there, where the CLI's
    help is built without importing torch)."""
    steps = [FlagOverride("training.max_steps", max_steps, "--max-steps")] if max_steps else []  # the flag wins
    overrides = [*overrides, *steps]
    if config:
        cfg = load_train_config(config, overrides)
    else:
        cfg = demo_config(out, DEMO_STEPS, overrides,  # the user's data.train=/data.eval= overrides these
                          data={"train": asset("times_train.jsonl"), "eval": asset("times_test.jsonl")})
        cfg = dataclasses.replace(cfg, lora=LoraConfig())  # the adapter's own settings decide
        previous = previous or asset("demo_test.jsonl")
        replay = replay or asset("demo_train.jsonl")
    problems = [] if previous else ["--previous: give the old task's held-out examples (a .jsonl/.json/.csv/"
                                    ".parquet file)"]
    shares = tuple(float(s) for s in replay_share) or DEFAULT_SHARES  # numbers from the parser; strings from code
    problems += [f"--replay-share: {s:g} is not in [0, 1) (0: the new task alone; 0.2: a fifth of each batch "
                 f"from --replay)" for s in shares if not 0 <= s < 1]
    problems += check_shares(shares)
    problems += previous_problems(previous) + replay_problems(replay, shares)
    problems += adapter_problems(adapter, cfg.model.name)
    if problems:
        raise ConfigError(problems)
    inputs = [config, cfg.model.name, *conversion_paths(cfg.model.name), *cfg.data.paths(), adapter, previous, replay]
    check_output(out, overwrite=overwrite, inputs=inputs, command="continual")  # its own task split: kept
    run_continual(cfg, adapter, previous, replay, shares, out, not skip_general, limit, overwrite=overwrite)
