"""A study (`loraforge forgetting`, `loraforge continual`) run again into its --out goes on where it stopped.

    first run:  record settings + arm folders (outputs.WRITTEN)  ->  arm 1 trained, probed, row in STUDY.json
                                                                 ->  arm 2 training ... killed
    rerun:      settings equal?  no  -> refused (--overwrite starts over)
                                 yes -> rows in STUDY.json kept; arm 2 resumes from its newest checkpoint
                                        (train --resume), or trains again from the start where it has none

A study's numbers come from its arms' runs, which train resumes exactly (weights, optimizer, schedule, data
position, random state), and from probes that are deterministic; so the rerun's numbers equal those of a study
never stopped. The settings compared are the config, the study's own arguments and the SHA-256 of every input file
(data, adapter): a rerun on changed data would mix two studies in one table.
"""

from __future__ import annotations

import json
from pathlib import Path

from loraforge.config import TrainConfig, to_dict
from loraforge.models import local_model_path
from loraforge.training.checkpoint import flat, last_checkpoint
from loraforge.training.loop import Stopped, train
from loraforge.training.report import strict_json
from loraforge.utils.files import OVERWRITE, expand_user, sha256_file
from loraforge.utils.fingerprint import model_fingerprint
from loraforge.utils.outputs import (LOCK, OutputError, own_files, recorded_settings, refuse_foreign,
                                     write_own)


def file_hashes(paths) -> dict[str, str]:
    """{path: SHA-256} of each file among `paths`, and of each file directly inside a folder among them (an
    adapter's); what is not on disk (a hub id) is left out."""
    hashes = {}
    for given in dict.fromkeys(str(p) for p in paths if p):
        path = expand_user(given)
        files = sorted(f for f in path.iterdir() if f.is_file()) if path.is_dir() else [path] if path.is_file() else []
        hashes.update({str(f) if f != path else given: sha256_file(f) for f in files})
    return hashes


def study_settings(cfg: TrainConfig, inputs, **arguments) -> dict:
    """What a study's numbers depend on, as JSON gives it back: the config, the study's `arguments` (ranks, seeds,
    shares, ...), the SHA-256 of its input files (`inputs`: data files, an adapter folder) and the base's fingerprint
    (utils.fingerprint: its headers, sizes, a sample of every tensor, its config and tokenizer) where its files are
    on this machine (models.local_model_path: a folder, a .gguf file, the built-in model's GGUF in its package, a hub
    id's cached snapshot): its name alone let a rerun on a base whose weights had changed (a folder merged into in
    place, an upgraded package, a newer revision in the hub cache) mix arms trained on two bases in one table."""
    settings = {"config": to_dict(cfg), **arguments, "inputs": file_hashes(inputs)}
    if (local := local_model_path(cfg.model.name)) is not None and (fingerprint := model_fingerprint(str(local))):
        settings["base"] = {"path": cfg.model.name, "fingerprint": fingerprint}
    return json.loads(json.dumps(settings, default=str))  # tuples as lists: as a rerun reads the recorded ones


def changes(earlier: dict, now: dict) -> list[str]:
    """'key: earlier -> now' for each setting that differs, config fields as the user types them (training.lr), an
    input file as 'PATH changed' (its hash says nothing to a reader), a local base as 'the base model PATH (...)
    changed'."""
    def readable(settings: dict) -> dict:
        inputs = {f"{path} changed": digest for path, digest in settings.get("inputs", {}).items()}
        base = settings.get("base") or {}
        if base:
            inputs[f"the base model {base.get('path')} (its weights, config or tokenizer) changed"] = base.get(
                "fingerprint")
        rest = {k: v for k, v in settings.items() if k not in ("config", "inputs", "base")}
        return {**flat(settings.get("config", {})), **flat(rest), **inputs}
    before, after = readable(earlier), readable(now)
    return [key if key.endswith(" changed") else f"{key}: {before.get(key, '(unset)')} -> {after.get(key, '(unset)')}"
            for key in dict.fromkeys([*before, *after]) if before.get(key) != after.get(key)]


def going_on(out: Path, command: str, settings: dict, overwrite: bool) -> bool:
    """Whether this run of `command` goes on with the study in `out`: one recorded there with the same `settings`
    (and no --overwrite). One recorded with other settings is refused unless `overwrite` (which starts it over):
    its finished arms' rows would stand beside rows of another study."""
    earlier = recorded_settings(out, command)
    if overwrite or earlier is None:
        return False
    if "base" not in earlier:  # recorded by a version that did not fingerprint the base: its name alone compared
        settings = {key: value for key, value in settings.items() if key != "base"}
    if earlier != settings:
        shown = changes(earlier, settings)
        raise OutputError(f"--out {out} holds a `loraforge {command}` study run with other settings "
                          f"({'; '.join(shown[:4])}{'; ...' if len(shown) > 4 else ''}); run it as it was to go on, "
                          f"pass {OVERWRITE} to start it over (its arms train again), or choose another --out")
    return True


def kept_report(out: Path, command: str, name: str) -> dict | None:
    """The report `name` (forgetting.json, continual.json) that `command` wrote in `out` and that is unchanged since
    (outputs.own_files), or None."""
    if name not in own_files(out, command):
        return None
    try:
        report = json.loads((out / name).read_text())
    except (OSError, ValueError):
        return None
    return report if isinstance(report, dict) and isinstance(report.get("rows"), list) else None


def check_results(out: Path, command: str, names: tuple[str, ...], overwrite: bool) -> None:
    """Refuse, unless `overwrite`, a study whose result files (`names` in `out`) are not `command`'s own
    (outputs.refuse_foreign): a user's file of such a name, or one changed since the study wrote it. A rerun going
    on replaced a forgetting.json the user had edited since the first run (from Python: the CLI's check_output
    refused it), and a finished study's rerun its edited forgetting.png; continual.json the same."""
    refuse_foreign(out, names, own_files(out, command) if out.is_dir() else set(), overwrite=overwrite)


def write_report(out: Path, command: str, name: str, report: dict) -> None:
    """A study's JSON, written as `command`'s own (outputs.write_own: recorded, then written atomically), so a rerun
    keeps its rows; a kill leaves the earlier file or none, never half of one. A file of that name that is not
    `command`'s unchanged own (edited while the study ran) is refused (OutputError naming it), never replaced: the
    study checked its results before it began (forgetting.check_results; --overwrite removed them)."""
    write_own(out, command, {name: strict_json(report, indent=1, default=str)}, overwrite=False)


def train_arm(run_cfg: TrainConfig, progress: bool, overwrite: bool, command: str, resume: bool = False):
    """train() for one arm of a study; `resume`: the study goes on (going_on), so an arm folder holding a run of
    this study continues it: from its newest verified checkpoint as `train --resume` does (one that finished
    training but not its writing writes it; one that finished returns its result), or, where a kill came before
    its first checkpoint, from the start (said). A signal's stop says how to go on."""
    out, fresh = Path(run_cfg.output_dir), False
    if resume and out.is_dir() and (found := last_checkpoint(out / "checkpoints")) is not None:
        print(f"  {out.name}: going on from its checkpoint {found.name}, as train --resume does", flush=True)
    elif resume and out.is_dir() and any(p.name != LOCK for p in out.iterdir()):
        print(f"  {out.name}: stopped before its first complete checkpoint: training it again from the start",
              flush=True)
        resume, fresh = False, True
    else:
        resume = False
    try:  # overwrite: an earlier run there starts over
        return train(run_cfg, resume=resume, progress=progress, overwrite=overwrite or fresh)
    except Stopped as e:
        raise Stopped(e.signum, f"{e}; run the same `loraforge {command}` command again to go on (the arms it "
                                f"finished are kept, this one goes on from its checkpoint)", resumable=False) from None


__all__ = ["changes", "check_results", "file_hashes", "going_on", "kept_report", "study_settings", "train_arm",
           "write_report"]
