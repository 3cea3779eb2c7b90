"""Sharded checkpoints of an FSDP run (`torch.distributed.checkpoint`), atomic like the one-process ones.

`checkpoints/step-N/` holds the trainable parameters' and the optimizer's shards as DCP writes them (one
`__<rank>_0.distcp` file per process and `.metadata`, keyed by parameter name, so a run with another number of
processes reads them back resharded), each process's RNG (`rng-<rank>.safetensors`), `trainer_state.json`
(step, scheduler, Python RNG, data position, config, the number of processes) and `manifest.json`, written last
by rank 0 with every file's size and SHA-256. Rank 0 makes a temporary directory of this save's own
(`.tmp-step-N-<random>`, files.atomic_dir) and sends its name to every process; all write into it and rank 0 renames
it once every process has finished. A kill during the save leaves only that directory, which resume never reads and
the next run removes under output_dir's lock (loop.setup). Resuming with settings that change the trainable
tensors (lora.r, lora.target_modules, method) is refused, naming what changed. Multi-node runs need output_dir on a
filesystem every node sees.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
from pathlib import Path

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from loraforge.config import TrainConfig, to_dict
from loraforge.training.checkpoint import (MANIFEST, SHARDED, WRITTEN_WITHOUT_FSDP, TrainingError, config_changes,
                                           disk_stop, find_checkpoint, prune_checkpoints, restore_rng, rng_state,
                                           world_change)
from loraforge.training.distributed import is_collective_failure
from loraforge.utils.files import atomic_dir, disk_error, sha256_file

FORMAT = SHARDED  # the manifest's and trainer_state.json's "format": what tells a sharded checkpoint from another
OPTIONS = StateDictOptions(ignore_frozen_params=True, strict=False)  # only what trains: adapters (or all, full)


def save_sharded(root: Path, step: int, module: nn.Module, optimizer, scheduler, cfg: TrainConfig,
                 state: dict) -> Path:
    """Write checkpoints/step-N from every process (a collective: all must call it); returns its path."""
    final = root / f"step-{step:07d}"
    try:
        _save_sharded(final, step, module, optimizer, scheduler, cfg, state)
    except BaseException as e:  # DCP's CheckpointException is a BaseException holding every rank's error
        error = disk_error(final, written_error(e))
        if error is None:
            raise
        raise disk_stop(root, step, error) from None  # one line on every rank, not DCP's traceback per rank
    if dist.get_rank() == 0:
        prune_checkpoints(root, cfg.training.keep_checkpoints, keep_best=cfg.training.keep_best)
    dist.barrier()  # no process goes on before step-N is in place
    return final


def written_error(e: BaseException) -> BaseException:
    """The error behind a failed save: where DCP reports every rank's, the first OSError, else the first error."""
    if isinstance(e, CheckpointException) and e.failures:
        errors = [exc for exc, _ in e.failures.values()]
        return next((exc for exc in errors if isinstance(exc, OSError)), errors[0])
    return e


def _save_sharded(final: Path, step: int, module: nn.Module, optimizer, scheduler, cfg: TrainConfig,
                  state: dict) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    with (atomic_dir(final) if rank == 0 else contextlib.nullcontext()) as made:  # rank 0: renamed at the end
        tmp = shared_path(made)
        model_state, optim_state = trained_state(module, optimizer)
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=tmp)
        save_file(rng_state(), tmp / f"rng-{rank}.safetensors")
        if os.environ.get("LORAFORGE_TEST_CRASH_IN_SAVE") == f"{step}:{rank}":  # test hook: die mid-save (SIGKILL)
            os.kill(os.getpid(), 9)
        dist.barrier()  # every process's files are written
        unseen = [r for r in range(world) if not (tmp / f"rng-{r}.safetensors").is_file()] if rank == 0 else None
        if unseen := shared_value(unseen):  # the manifest rank 0 writes would leave their shards out
            raise TrainingError(f"checkpoint {final.name}: rank 0 does not see the files process(es) {unseen} wrote "
                                f"into {tmp}: output_dir is not one folder for every process (a relative path on "
                                f"nodes started in different folders, or a disk one node sees); give output_dir as "
                                f"an absolute path on a file system every node sees", everywhere=True)
        if rank == 0:
            version, internal, gauss = random.getstate()
            meta = {"format": FORMAT, "step": step, "world_size": world, "scheduler": scheduler.state_dict(),
                    "python_rng": [version, list(internal), gauss], "config": to_dict(cfg), **state}
            (tmp / "trainer_state.json").write_text(json.dumps(meta, indent=1))
            files = {f.name: {"bytes": f.stat().st_size, "sha256": sha256_file(f)} for f in sorted(tmp.iterdir())}
            (tmp / MANIFEST).write_text(json.dumps({"format": FORMAT, "files": files}, indent=1))
            if final.exists():  # the same step written again (after resume skipped a damaged one): the new one wins
                shutil.rmtree(final)


def shared_path(path: Path | None) -> Path:
    """Rank 0's `path`, the same on every process (a collective: broadcast from rank 0)."""
    return Path(shared_value(str(path) if dist.get_rank() == 0 else None))


def shared_value(value):
    """Rank 0's `value` (a picklable one), the same on every process (a collective: broadcast from rank 0)."""
    sent = [value]
    dist.broadcast_object_list(sent, src=0)
    return sent[0]


def verify_sharded(path: Path) -> str | None:
    """None when every file the manifest lists is there with its size and SHA-256; otherwise what is wrong."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except FileNotFoundError:
        return f"it has no {MANIFEST} (its save did not finish)"
    except (OSError, ValueError):
        return f"its {MANIFEST} is unreadable"
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        return WRITTEN_WITHOUT_FSDP
    for name, entry in manifest.get("files", {}).items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != entry.get("bytes") or sha256_file(file) != entry.get("sha256"):
            return f"{name} does not match its size and SHA-256 in {MANIFEST} (truncated or damaged)"
    return None


def find_sharded(root: Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest sharded checkpoint that verifies, and the newer ones that do not, each with the reason."""
    return find_checkpoint(root, verify_sharded)


def load_sharded(path: Path, module: nn.Module, optimizer, scheduler, config: dict | None = None) -> dict:
    """Read a sharded checkpoint into this run's shards, whatever the number of processes that wrote it (a
    collective). RNG states come back when the number of processes is the same; returns trainer_state.

    Trainable tensors whose names or shapes differ from the checkpoint's are refused with TrainingError, naming the
    settings (`config`: to_dict of the current config) that differ from the ones it was written with."""
    meta = json.loads((path / "trainer_state.json").read_text())
    model_state, optim_state = trained_state(module, optimizer)
    state = {"model": model_state, "optim": optim_state}
    # DCP would refuse a mismatch with a traceback (a BaseException) naming no setting
    if why := shape_mismatch(path, model_state, frozen_names(module)):
        raise mismatch_error(path, why, meta, config)
    try:
        dcp.load(state, checkpoint_id=path)
    except (Exception, CheckpointException) as e:  # DCP names what else it could not read
        if (error := read_failure(path, e, meta, config)) is None:
            raise
        raise error from None
    set_state_dict(module, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=OPTIONS)
    scheduler.load_state_dict(meta["scheduler"])
    rank, world = dist.get_rank(), dist.get_world_size()
    if meta["world_size"] == world:
        restore_rng(load_file(path / f"rng-{rank}.safetensors"))
    elif rank == 0:
        print(world_change(path, meta["world_size"], world, "start from the seed"), flush=True)
    version, internal, gauss = meta["python_rng"]
    random.setstate((version, tuple(internal), gauss))
    return meta


def read_failure(path: Path, error: BaseException, meta: dict, config: dict | None) -> TrainingError | None:
    """What a failed dcp.load of checkpoint `path` says: None where a peer is gone (the run's own message for a
    failed collective says that; it was blamed on the config), a file of it that cannot be read, else what does
    not match this run (`config`: to_dict of the current config)."""
    cause = written_error(error)
    if is_collective_failure(cause):
        return None
    first = str(cause).splitlines()[0][:200] if str(cause) else type(cause).__name__
    if isinstance(cause, OSError):
        return TrainingError(f"checkpoint {path}: a file of it cannot be read ({first}); delete it to resume from "
                             f"the one before, or start over with --overwrite", everywhere=True)
    return mismatch_error(path, first, meta, config)


def trained_state(module: nn.Module, optimizer) -> tuple[dict, dict]:
    """(model state, optimizer state) of what trains. DCP's ignore_frozen_params drops a frozen weight under one
    name only: a tied head (lm_head, the embedding's other name) was saved whole in every checkpoint (vocab × hidden
    in fp32: 113 MB for the built-in model, beside an adapter of a few MB)."""
    model_state, optim_state = get_state_dict(module, optimizer, options=OPTIONS)
    frozen = frozen_names(module)
    return {k: v for k, v in model_state.items() if k not in frozen}, optim_state


def frozen_names(module: nn.Module) -> set[str]:
    """Every name of a frozen parameter, tied ones under each of their names."""
    return {n for n, p in module.named_parameters(remove_duplicate=False) if not p.requires_grad}


def shape_mismatch(path: Path, model_state: dict, frozen: set[str] = frozenset()) -> str | None:
    """What differs between the checkpoint's model tensors (names, global shapes: its .metadata) and this run's;
    None when they are the same. Saved tensors that are `frozen` here (a tied head an earlier version saved) are
    passed over."""
    saved = {key.removeprefix("model."): entry.size
             for key, entry in dcp.FileSystemReader(path).read_metadata().state_dict_metadata.items()
             if key.startswith("model.") and key.removeprefix("model.") not in frozen}
    missing = sorted(set(model_state) - set(saved))
    if missing or set(saved) - set(model_state):
        return f"missing {missing[:3]}" if missing else f"not in this model {sorted(set(saved) - set(model_state))[:3]}"
    for name, tensor in model_state.items():  # a DTensor's shape is the whole tensor's, not this process's shard
        if list(tensor.shape) != list(saved[name]):
            return f"{name} {list(saved[name])} in the checkpoint, {list(tensor.shape)} here"
    return None


def mismatch_error(path: Path, why: str, meta: dict, config: dict | None) -> TrainingError:
    changed = config_changes(meta.get("config") or {}, config) if config is not None else []
    return TrainingError(f"checkpoint {path} does not match this model/config ({why}"
                         + (f"; changed since it was written: {', '.join(changed)}" if changed else "")
                         + "); resume with the config the run was started with")
