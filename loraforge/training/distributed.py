"""Several processes: the process group, DDP or FSDP2 (`training.distributed`), and what sharding changes.

    torchrun --nproc_per_node=N [--nnodes=M --rdzv-backend=c10d --rdzv-endpoint=HOST:PORT] -m loraforge train C

ddp:  every process holds the whole model; DistributedDataParallel all-reduces the gradients.
fsdp: PyTorch FSDP2 (`torch.distributed.fsdp.fully_shard`) on each decoder layer, then on the loss module as the
      root (it owns the embeddings, the final norm and the head, tied or not): every parameter, frozen base and
      adapter alike, is split across the processes and all-gathered one layer at a time for its forward and
      backward; gradients are reduce-scattered, so each process keeps (and the optimizer updates) only its shard.
      A 4-bit (QLoRA) base is split as its packed bytes, viewed as the base's float dtype (bitsandbytes'
      `quant_storage`, as FSDP-QLoRA does: FSDP shards floating-point parameters; Params4bit keeps its quantization
      state on the layer, whole on every process, moved to the process' device).
auto: fsdp when the base's weights take more than half of one process's memory (the training state, activations
      and the runtime need the rest), ddp otherwise.

Collectives time out after `training.collective_timeout` seconds, so a process whose peer died stops with an
error naming that setting rather than hanging.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
import uuid
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from transformers.modeling_layers import GradientCheckpointingLayer

from loraforge.config import TrainConfig
from loraforge.models import resolve_model
from loraforge.precision import Precision
from loraforge.quant.checks import is_4bit_param, is_quantized_linear
from loraforge.training.checkpoint import TrainingError, flat
from loraforge.training.mixing import fingerprint_changes
from loraforge.utils.allocator import return_large_frees
from loraforge.utils.parent import agent_started, follow_agent


def setup_processes(timeout_s: float = 600.0) -> tuple[int, int, torch.device]:
    """(rank, world size, device). Under torchrun, joins the process group (gloo on CPU, nccl on CUDA) with
    collectives that fail after `timeout_s` seconds instead of waiting for a dead peer forever."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    follow_agent()  # the CLI did already; a script of the user's under torchrun may not have
    tasks = os.environ.get("SLURM_STEP_NUM_TASKS", "1")
    if "RANK" not in os.environ and tasks.isdigit() and int(tasks) > 1:  # soak: each task trained the run alone
        raise TrainingError(f"srun started {tasks} tasks (SLURM_STEP_NUM_TASKS={tasks}), and each would train the "
                            f"whole run alone: loraforge joins processes under torchrun only; start one torchrun "
                            f"per node (srun --ntasks-per-node=1 torchrun --nnodes=$SLURM_NNODES "
                            f"--nproc_per_node=N --rdzv-backend=c10d --rdzv-endpoint=FIRST_NODE:29500 -m loraforge "
                            f"train CONFIG), or srun --ntasks=1 for one process")
    if "RANK" in os.environ and not dist.is_initialized():  # torchrun, even with one process (FSDP needs a group)
        if missing := [name for name in ("WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if name not in os.environ]:
            raise TrainingError(f"RANK is set ({rank}) but {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} "
                                f"not: start several processes with torchrun (torchrun --nproc_per_node=N -m "
                                f"loraforge train CONFIG), or unset RANK to train in one process")
        if world > 1 and "TORCHELASTIC_RUN_ID" not in os.environ:  # started by hand, not by torchrun: say so
            print(f"rank {rank}: waiting for the other {world - 1} process(es) at {os.environ['MASTER_ADDR']}:"
                  f"{os.environ['MASTER_PORT']} (up to training.collective_timeout, {timeout_s:g} s)", flush=True)
        try:
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(seconds=timeout_s))
        except RuntimeError as e:  # soak: a traceback (DistNetworkError, "Gloo connectFullMesh failed", exit 1)
            raise join_error(rank, world, timeout_s, e) from None
    return rank, world, device


def join_error(rank: int, world: int, timeout_s: float, error: Exception) -> TrainingError:
    """What a process says when it could not join the others: no process answered at MASTER_ADDR:MASTER_PORT (a
    node not started, a wrong address), or the processes could not connect to each other (a firewall, a hostname
    that resolves to a loopback address such as Debian's 127.0.1.1, the wrong network interface)."""
    first = str(error).strip().splitlines()[0].rstrip(".") if str(error).strip() else type(error).__name__
    at = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
    return TrainingError(f"rank {rank}: could not join the other {world - 1} process(es) at {at} within "
                         f"training.collective_timeout={timeout_s:g} s ({first[:300]}): start the same command on "
                         f"every node, with an address and port every node reaches; where they still cannot connect "
                         f"to each other (a firewall, a hostname that resolves to 127.0.1.1), name the network "
                         f"interface with GLOO_SOCKET_IFNAME (NCCL_SOCKET_IFNAME on GPUs)")


def restarted_from(ckpt_root: Path, world: int) -> Path | None:
    """Under torchrun restarting this launch's processes after a failure (--max-restarts: TORCHELASTIC_RESTART_COUNT
    > 0), the newest checkpoint when the attempt before wrote it (newer than the agent), else None: the restart
    continues it as --resume would, where the command (the same one torchrun runs again) would refuse the folder
    as holding an unfinished run. A checkpoint older than the agent, an earlier run's, is left to the usual
    refusal. Rank 0's answer (its agent's restart count: a node that joins later counts from 0), the same on every
    process (a collective, always: every process takes part whatever its own count)."""
    answer = None
    restarts = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    if (not dist.is_initialized() or dist.get_rank() == 0) and restarts.isdigit() and int(restarts) > 0:
        started = agent_started()
        newest = max(ckpt_root.glob("step-*/trainer_state.json"), default=None)
        with contextlib.suppress(OSError):
            if started is not None and newest is not None and newest.stat().st_mtime > started:
                answer = newest.parent
    if world > 1 and dist.is_initialized():
        sent = [answer]
        dist.broadcast_object_list(sent, src=0)
        answer = sent[0]
    return answer


left_a_group = False  # set by leave_processes: this process joined a process group and has left it


def leave_processes() -> None:
    """Destroy the process group, where one was joined, while the interpreter is still whole: without this, gloo's
    worker threads are torn down during interpreter shutdown and a process that is exiting (even with a refusal
    every rank printed) can die of SIGABRT ("terminate called without an active exception") instead of its exit
    code. A failure here (a peer already gone) changes nothing about how the command ends."""
    global left_a_group
    if dist.is_initialized():
        left_a_group = True  # python -m loraforge then exits without the interpreter's teardown (__main__.py)
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


def check_same_config(config: dict, world: int) -> None:
    """Every process runs the same config (`config`: to_dict of its resolved settings): a hash of each is gathered
    (a collective) and, where they differ, every process stops with the first differing setting and both values.
    A different training.seed would shuffle each process's data differently; a different lora.r fails in DDP."""
    if world == 1 or not dist.is_initialized():
        return
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()
    digests = [None] * world
    dist.all_gather_object(digests, digest)
    if len(set(digests)) == 1:
        return
    configs = [None] * world
    dist.all_gather_object(configs, flat(config))  # only now the settings themselves, to name the first that differs
    first = configs[0]
    for key in [*first, *(k for c in configs[1:] for k in c if k not in first)]:
        for rank, other in enumerate(configs[1:], start=1):
            if first.get(key) != other.get(key):
                raise TrainingError(f"the processes run different configs: {key} is {first.get(key)!r} on rank 0 and "
                                    f"{other.get(key)!r} on rank {rank}; give every process the same config file "
                                    f"and overrides")


def check_same_data(fingerprint: list[dict], world: int) -> None:
    """Every process read the same training examples (`fingerprint`: mixing.fingerprint, a collective). Nodes
    started from different folders resolve a relative data.train to different files: each would train on its own
    data without a word, or run a different number of steps and wait for the others until the timeout."""
    if world == 1 or not dist.is_initialized():
        return
    every = [None] * world
    dist.all_gather_object(every, fingerprint)
    for rank, other in enumerate(every[1:], start=1):
        if differ := fingerprint_changes(every[0], other, "on rank 0", f"on rank {rank}"):
            raise TrainingError(f"the processes read different training data ({'; '.join(differ)}); give every "
                                f"process the same files, e.g. absolute paths on a file system every node sees "
                                f"(a relative path is read from the folder each node was started in)", everywhere=True)


def check_same_precision(precision: Precision, world: int) -> None:
    """Every process computes and stores the base in the same dtypes. `precision: auto` is decided per process from
    its own hardware (a node without native bf16, a timing probe on a loaded machine): processes that decide
    differently would wait for each other at their first collective until training.collective_timeout, then
    blame "another process". Gathered here (a collective), a difference stops every process naming the setting."""
    if world == 1 or not dist.is_initialized():
        return
    mine = (precision.compute, precision.storage, precision.reason)
    every = [None] * world
    dist.all_gather_object(every, mine)
    for rank, (compute, storage, reason) in enumerate(every[1:], start=1):
        if (compute, storage) != every[0][:2]:
            raise TrainingError(f"the processes chose different precisions: compute {every[0][0]}, base stored in "
                                f"{every[0][1]} on rank 0 ({every[0][2]}) and compute {compute}, base stored in "
                                f"{storage} on rank {rank} ({reason}); set training.precision (and model.dtype) "
                                f"explicitly, e.g. training.precision=fp32, so that every process runs the same")


def unseen_output(out: Path, world: int) -> list[int]:
    """The ranks that do not see rank 0's output_dir `out` (a collective; rank 0 holds it, hold_output made it):
    nodes given a relative output_dir in different folders, or a disk only rank 0's node has. Rank 0 writes a
    probe file there, every process looks for it by its path."""
    if world == 1 or not dist.is_initialized():
        return []
    probe = out / f".tmp-nodes-{uuid.uuid4().hex}" if dist.get_rank() == 0 else None
    if probe is not None:
        with contextlib.suppress(OSError):
            probe.touch()
    sent = [probe]
    dist.broadcast_object_list(sent, src=0)
    seen = [None] * world
    dist.all_gather_object(seen, probe is not None or sees(sent[0]))  # every process has looked once this returns
    if probe is not None:
        probe.unlink(missing_ok=True)
    return [rank for rank, found in enumerate(seen) if not found]


def sees(path: Path, wait_s: float = 10.0) -> bool:
    """Whether `path`, just created by another process, exists here; looked for again each second for up to
    `wait_s` seconds, listing its folder first: an NFS client may answer from its cache of the folder (kept up to
    30-60 s, acdirmin/acdirmax) that a new entry is not there."""
    deadline = time.monotonic() + wait_s
    while True:
        with contextlib.suppress(OSError):
            os.listdir(path.parent)
        if path.exists():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(1.0)


NOT_ONE_FOLDER = ("output_dir is not one folder for every process (a relative path on nodes started in different "
                  "folders, or a disk only one node sees)")


def check_same_checkpoint(found: Path | None, ckpt_root: Path, world: int) -> None:
    """--resume: every process found the same newest checkpoint (a collective). Only rank 0 writes checkpoints
    (FSDP: every process its shard, into rank 0's folder), so on a node whose output_dir is its own folder the
    other processes find none, or an older one: each would have said its own thing, or resumed another step."""
    if world == 1 or not dist.is_initialized():
        return
    every = [None] * world
    dist.all_gather_object(every, found.name if found is not None else None)
    if len(set(every)) == 1:
        return
    what = "; ".join(f"rank {rank} finds {name or 'none'}" for rank, name in enumerate(every) if name != every[0])
    raise TrainingError(f"--resume: the processes do not see the same checkpoints under {ckpt_root}: rank 0 resumes "
                        f"{every[0] or 'none'}, {what} (checkpoints are written into rank 0's output_dir); "
                        f"{NOT_ONE_FOLDER}: give output_dir as an absolute path on a file system every node sees, "
                        f"or copy rank 0's {ckpt_root} to the same path on every node", everywhere=True)


def weights_digest(model: nn.Module, sample: int = 1024) -> dict[str, str]:
    """{parameter name: SHA-256 of up to `sample` of its elements, evenly spaced}: cheap (a few kB a tensor), and
    another checkpoint of the same architecture (another revision, another fine-tune) differs in nearly every
    element. Read as raw bytes, so 4-bit codes and bf16 alike."""
    digests = {}
    for name, p in model.named_parameters():
        flat_p = p.detach().reshape(-1)
        picked = flat_p[::max(1, flat_p.numel() // sample)][:sample].contiguous().cpu()
        digests[name] = hashlib.sha256(picked.view(torch.uint8).numpy().tobytes()).hexdigest()
    return digests


def check_same_weights(model: nn.Module, model_name: str, world: int) -> None:
    """Under FSDP every process keeps its own shard of the weights it loaded (DDP copies rank 0's to every process
    at the start): nodes that load different files under one model.name (a relative path, a node-local copy or
    hub cache of another revision) would train one model made of pieces of each, without a word. Gathered here
    (a collective, before sharding), a difference stops every process naming the first tensor that differs."""
    if world == 1 or not dist.is_initialized():
        return
    mine = weights_digest(model)
    every = [None] * world
    dist.all_gather_object(every, hashlib.sha256(json.dumps(mine, sort_keys=True).encode()).hexdigest())
    if len(set(every)) == 1:
        return
    try:
        where = str(Path(resolve_model(model_name)).resolve())
    except Exception:  # it loaded, so it resolves; the message does without the path if not
        where = model_name
    every = [None] * world
    dist.all_gather_object(every, (mine, where))
    first, first_where = every[0]
    for rank, (other, other_where) in enumerate(every[1:], start=1):
        if differ := next((n for n in first if first[n] != other.get(n)), None):
            raise TrainingError(f"the processes loaded different weights for model.name {model_name}: {differ} "
                                f"differs between rank 0 (read from {first_where}) and rank {rank} (read from "
                                f"{other_where}); FSDP would train one model made of pieces of each; give every "
                                f"process the same model files, e.g. an absolute path on a file system every node "
                                f"sees", everywhere=True)


def choose_mode(cfg: TrainConfig, world: int, device: torch.device, precision: Precision | None = None) -> str:
    """training.distributed resolved: 'none' (one process, no group), 'ddp' or 'fsdp'; unsupported combinations
    are refused here, before the model loads, with the combination named. `precision`: the run's, resolved
    (training.precision auto is fp16 on GPUs without bf16)."""
    mode = cfg.training.distributed
    if mode == "auto":
        if world == 1 or not dist.is_initialized():
            return "none"
        mode = "fsdp" if base_bytes(cfg.model.name) > 0.5 * process_memory(device) else "ddp"
    if mode == "ddp":
        return "ddp" if world > 1 else "none"
    if not dist.is_initialized():
        raise TrainingError("training.distributed: fsdp needs torchrun (even for one process): torchrun "
                            "--nproc_per_node=N -m loraforge train CONFIG")
    refuse_unsupported(cfg, precision)
    return "fsdp"


def refuse_unsupported(cfg: TrainConfig, precision: Precision | None = None) -> None:
    """What FSDP does not run yet in loraforge, each named as the user writes it; `precision`: the run's, resolved
    (auto's fp16 is refused as a written fp16 is)."""
    t, problems = cfg.training, []
    if cfg.method == "adalora":
        problems.append("method: adalora (its rank allocator scores whole A, E, B matrices; FSDP holds shards)")
    if cfg.quantization == "int8":
        problems.append("model.quantization: int8 (its row statistics live beside the int8 weight, which FSDP "
                        "would split; use nf4 or training.distributed: ddp)")
    fp16 = ("training.precision: fp16" if t.precision == "fp16" else "model.dtype: fp16" if cfg.model.dtype == "fp16"
            else f"training.precision: {t.precision}, which is fp16 here ({precision.reason})"
            if precision is not None and "fp16" in (precision.compute, precision.storage) else None)
    if fp16:  # soak: auto's fp16 (a T4, a V100) was not refused, and the message named neither field
        problems.append(f"{fp16} (loss scaling over sharded gradients is not wired up; use training.precision: "
                        f"fp32, bf16 where the hardware has it, or training.distributed: ddp)")
    if t.optimizer != "adamw":
        problems.append(f"training.optimizer: {t.optimizer} (bitsandbytes' optimizers do not take sharded "
                        f"parameters; use adamw)")
    if t.share_prefix is True:
        problems.append("training.share_prefix: true (the shared prefix's keys and values reach a decoder layer's "
                        "backward after FSDP has freed its gathered weights; use auto, which is off under FSDP)")
    if t.compile:
        problems.append("training.compile: true (not tested with FSDP; set it false)")
    if problems:  # called where the run goes sharded: under auto, because auto chose it
        head = ("auto chose fsdp (the base's weights take more than half of one process's memory), which"
                if t.distributed == "auto" else "fsdp")
        raise TrainingError(f"training.distributed: {head} does not support " + "; ".join(problems) + " yet",
                            everywhere=True)


def base_bytes(name: str) -> int:
    """The base's weight files on disk (safetensors), 0 when they are not local yet."""
    try:
        path = Path(resolve_model(name))
    except Exception:  # a hub id that is not downloaded: nothing to measure, DDP
        return 0
    return sum(f.stat().st_size for f in path.glob("*.safetensors")) if path.is_dir() else 0


def process_memory(device: torch.device) -> int:
    """Memory one process may use: its GPU's, or the machine's RAM shared by the processes on this node."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // local


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks (transformers' GradientCheckpointingLayer): FSDP's unit of sharding."""
    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def wrap(loss_fn: nn.Module, model: nn.Module, mode: str, precision: Precision, device: torch.device) -> nn.Module:
    """The module the loop calls: the loss itself (one process), under DDP, or sharded by FSDP2.

    FSDP: parameters become DTensor shards, so build the optimizer after this. Mixed precision follows the
    precision rule: parameters gathered in the compute dtype, gradients reduced in fp32.
    """
    if mode == "none":
        return loss_fn
    if mode == "ddp":
        return nn.parallel.DistributedDataParallel(loss_fn)
    layers = decoder_layers(model)
    if not layers:
        raise TrainingError(f"training.distributed: fsdp shards decoder layers one by one; {type(model).__name__} "
                            f"has none that loraforge recognises (transformers' GradientCheckpointingLayer); use "
                            f"training.distributed: ddp")
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    compute = precision.compute_dtype
    quantized = any(is_4bit_param(p) for p in model.parameters())  # 4-bit codes (held as floats): never cast
    policy = MixedPrecisionPolicy(param_dtype=None if compute == torch.float32 or quantized else compute,
                                  reduce_dtype=torch.float32)
    if device.type == "cpu":
        return_large_frees()
    for layer in layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(loss_fn, mesh=mesh, mp_policy=policy)  # root: embeddings, final norm, head (tied weights stay one)
    for module in model.modules():  # the 4-bit codes moved with their shards; their (small) statistics follow
        if is_quantized_linear(module) and getattr(module, "quant_state", None) is not None:
            module.quant_state.to(device)
    return loss_fn


def is_sharded(wrapped: nn.Module) -> bool:
    return isinstance(wrapped, FSDPModule)


@contextlib.contextmanager
def no_sync(wrapped: nn.Module):
    """Accumulate this micro-batch's gradients locally: no all-reduce (DDP) or reduce-scatter (FSDP)."""
    if isinstance(wrapped, nn.parallel.DistributedDataParallel):
        with wrapped.no_sync():
            yield
    elif isinstance(wrapped, FSDPModule):
        wrapped.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            wrapped.set_requires_gradient_sync(True)
    else:
        yield


def clip_sharded(params: list[nn.Parameter], max_norm: float | None) -> torch.Tensor:
    """The global gradient norm over sharded (DTensor) gradients, clipped to max_norm when set; a plain tensor."""
    norm = (torch.nn.utils.clip_grad_norm_(params, max_norm) if max_norm
            else torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None]))
    return norm.full_tensor() if isinstance(norm, DTensor) else norm


@contextlib.contextmanager
def unsharded(wrapped: nn.Module):
    """Evaluate the model outside the wrapped loss: the root's parameters (embeddings, norm, head) gathered for the
    duration; each decoder layer gathers its own in its forward, as in training. Every process must enter."""
    if not isinstance(wrapped, FSDPModule):
        yield
        return
    wrapped.unshard()
    try:
        yield
    finally:
        wrapped.reshard()


@contextlib.contextmanager
def full_trainables(model: nn.Module):
    """The trainable parameters gathered whole (fp32 masters, DTensor.full_tensor) in place of their shards, for
    saving an adapter with the one-process code; every process must enter (each gather is a collective)."""
    swapped = []
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if isinstance(p, DTensor) and p.requires_grad:
                module._parameters[name] = nn.Parameter(p.full_tensor(), requires_grad=False)
                swapped.append((module, name, p))
    try:
        yield
    finally:
        for module, name, p in swapped:
            module._parameters[name] = p


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's weights gathered on CPU on rank 0 (empty elsewhere): a `method: full` run's save. Tied
    weights once, under the name named_parameters() keeps, as the one-process save writes them."""
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    names = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
    return {k: v for k, v in state.items() if k in names}


def is_collective_failure(error: BaseException) -> bool:
    """A backend's error from a collective (gloo reports a dead peer as a plain RuntimeError)."""
    if isinstance(error, TrainingError):
        return False
    text = str(error)
    return isinstance(error, dist.DistError) or any(s in text for s in ("gloo", "NCCL", "Connection closed by peer",
                                                                        "Timed out"))


STAGES = {"set-up": " during set-up", "training": "", "finish": " after the last step, writing the adapter"}


def collective_error(rank: int, timeout_s: float, error: Exception, stage: str = "training",
                     saved: bool = True) -> TrainingError:
    """What a process says when a collective failed: a peer died (its own error is in its log) or stopped
    answering for training.collective_timeout seconds. `stage`: "set-up" (before the first step: nothing to resume
    from this run yet, unless it was resumed), "training" or "finish". `saved`: output_dir holds a checkpoint (where
    none does, --resume would be refused)."""
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if stage == "set-up":
        fix = "fix what stopped it and start the run again (with --resume if it continues from a checkpoint)"
    elif saved:
        fix = "resume from the last checkpoint with --resume"
    else:
        fix = "no checkpoint was saved yet (training.save_every), so fix what stopped it and start the run again"
    return TrainingError(f"rank {rank}: a collective with the other processes failed{STAGES[stage]} ({first[:300]}): "
                         f"another process stopped (its error is in its own output) or did not answer within "
                         f"training.collective_timeout={timeout_s:g} s; {fix}")
