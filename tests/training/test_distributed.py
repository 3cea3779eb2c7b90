"""FSDP2 under torchrun with real processes (gloo, CPU): the same result as one process on the same global batch,
a crashed rank stops the others with an error, sharded checkpoints resume with another number of processes,
and the combinations FSDP does not run yet are refused by name."""

import contextlib
import json
import os
import re
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file
from transformers import OPTForCausalLM

from helpers import opt_that_mixes_packed_rows, tiny_llama
from loraforge.config import load_train_config
from loraforge.precision import Precision
from loraforge.training import data as D
from loraforge.training.checkpoint import TrainingError, verify_checkpoint
from loraforge.training.dcp import read_failure, verify_sharded
from loraforge.training.distributed import choose_mode, refuse_unsupported
from loraforge.training.loop import train
from loraforge.training.loss import CausalLMLoss

ROOT = Path(__file__).resolve().parents[2]


def common(tiny_dir, data_file, steps=4):
    return [f"model.name={tiny_dir}", f"data.train={data_file}", "data.eval_fraction=0", "lora.r=4",
            "training.lr=1e-2", f"training.max_steps={steps}", "training.precision=fp32", "training.seed=3"]


def torchrun(n, cfg_file, args, port, env=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={n}",
                           f"--master_port={port}", "-m", "loraforge", "train", str(cfg_file), *args,
                           "training.distributed=fsdp"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


def assert_same(a: dict, b: dict, atol: float):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=atol)


def adapter(out) -> dict:
    return load_file(Path(out) / "adapter" / "adapter_model.safetensors")


@pytest.fixture
def cfg_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("{}\n")
    return path


def test_fsdp_lora_two_processes_train_like_one(tiny_dir, data_file, tmp_path, cfg_file):
    """2 ranks × batch 4 × accumulation 2, sharded, vs 1 process × batch 4 × accumulation 4 (no FSDP): the same
    global batches, hence the same adapter and held-out losses. On the way: gradient clipping of the sharded
    gradients (max_grad_norm 1.0, the default), LoRA+ groups, gradient checkpointing, evaluation every 2 steps
    (the model called outside the sharded loss). lora_dropout is off (its masks are drawn per process)."""
    args = [*common(tiny_dir, data_file), "data.eval_fraction=0.1", "training.eval_every=2",
            "training.loraplus_lr_ratio=4", "training.gradient_checkpointing=true", "training.batch_size=4"]
    one = train(load_train_config(None, [*args, "training.gradient_accumulation=4",
                                         f"output_dir={tmp_path / 'one'}"]), progress=False)
    proc = torchrun(2, cfg_file, [*args, "training.gradient_accumulation=2", f"output_dir={tmp_path / 'two'}"],
                    29541)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # the same float sums in another order (all-gather, reduce-scatter): equal to rounding; 1e-5 is 1000x below
    # one update at lr 1e-2
    assert_same(adapter(tmp_path / "one"), adapter(tmp_path / "two"), atol=1e-5)
    assert f"final loss {one.final_loss:.4f}" in proc.stdout
    evals = [json.loads(x)["eval_loss"] for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()
             if "eval_loss" in x]
    assert len(evals) == 2 and abs(evals[-1] - one.eval_loss) < 1e-5
    shards = sorted(p.name for p in (tmp_path / "two" / "checkpoints" / "step-0000004").iterdir())
    assert shards == [".metadata", "__0_0.distcp", "__1_0.distcp", "manifest.json", "rng-0.safetensors",
                      "rng-1.safetensors", "trainer_state.json"]


@pytest.mark.slow  # a third two-process launch: about 40 s on the 2-core CI machine
def test_fsdp_full_fine_tuning_two_processes_train_like_one(tiny_dir, data_file, tmp_path, cfg_file):
    """method: full, every weight sharded and trained: the gathered checkpoint equals the one-process one."""
    args = [*common(tiny_dir, data_file, steps=3), "method=full", "training.lr=1e-4"]
    train(load_train_config(None, [*args, "training.batch_size=8", f"output_dir={tmp_path / 'one'}"]),
          progress=False)
    proc = torchrun(2, cfg_file, [*args, "training.batch_size=4", f"output_dir={tmp_path / 'two'}"], 29542)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = load_file(tmp_path / "one" / "model" / "model.safetensors")
    two = load_file(tmp_path / "two" / "model" / "model.safetensors")
    assert_same(one, two, atol=1e-6)  # lr 1e-4: updates of ~1e-4, rounding differences ~1e-7


@pytest.mark.slow  # another two-process launch: about 45 s on the 2-core CI machine
def test_fsdp_qlora_two_processes_train_like_one(tmp_path, cfg_file, data_file, tiny_dir):
    """QLoRA (NF4 base, bitsandbytes on CPU) sharded over 2 ranks: the packed 4-bit weights are split like any
    parameter and each layer's quantization state stays whole; the same adapter as 1 process × batch 8."""
    from transformers import AutoTokenizer

    model = tmp_path / "tiny64"  # bitsandbytes' CPU 4-bit kernels need in_features a multiple of 64
    tiny_llama(vocab_size=len(AutoTokenizer.from_pretrained(tiny_dir)), tie_word_embeddings=True, hidden_size=64,
               intermediate_size=128).save_pretrained(model)
    AutoTokenizer.from_pretrained(tiny_dir).save_pretrained(model)
    args = [*common(model, data_file), "model.quantization=nf4"]
    train(load_train_config(None, [*args, "training.batch_size=8", f"output_dir={tmp_path / 'one'}"]),
          progress=False)
    proc = torchrun(2, cfg_file, [*args, "training.batch_size=4", f"output_dir={tmp_path / 'two'}"], 29545)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same(adapter(tmp_path / "one"), adapter(tmp_path / "two"), atol=1e-5)


def test_fsdp_probes_packing_refusing_true_and_padding_auto_for_a_model_that_mixes_packed_examples(tiny_dir, tmp_path,
                                                                                                    cfg_file):
    """Carried over: an FSDP run was not probed for packing (data.keeps_packed_apart), so OPT (a plain causal mask
    whatever the position_ids) under FSDP with data.packing true or auto packed its examples into rows where each
    attended to the ones before it. Probed on the sharded model as evaluation calls it: true is refused on every
    process in one line, auto pads, training as one process with data.packing false does."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    base, data = opt_that_mixes_packed_rows(tmp_path, tok)
    args = [*common(base, data, steps=2), "training.batch_size=2", "training.gradient_accumulation=1",
            "training.warmup_steps=0"]
    refused = torchrun(2, cfg_file, [*args, "data.packing=true", f"output_dir={tmp_path / 'true'}"], 29581)
    assert refused.returncode == 1, refused.stderr[-3000:]  # torchrun: its processes exited 2 (the CLI)
    said = ("error: invalid config:\n  data.packing: true, but OPTForCausalLM does not keep packed examples apart "
            "(its attention mask ignores position_ids), so each would attend to the ones before it in its row; use "
            "data.packing: false (or auto, which packs only models that keep them apart)\n")
    assert refused.stderr.count(said) == 1, refused.stderr[-3000:]  # once, from rank 0; both exited 2
    assert refused.stderr.count("exitcode  : 2") == 2
    auto = torchrun(2, cfg_file, [*args, "data.packing=auto", f"output_dir={tmp_path / 'auto'}"], 29582)
    assert auto.returncode == 0, auto.stderr[-3000:]
    assert "not packed (OPTForCausalLM does not keep packed examples apart)" in auto.stdout
    one = train(load_train_config(None, [*common(base, data, steps=2), "training.batch_size=4",
                                         "training.warmup_steps=0", "data.packing=false",
                                         f"output_dir={tmp_path / 'one'}"]), progress=False)
    assert f"final loss {one.final_loss:.4f}" in auto.stdout
    assert_same(adapter(tmp_path / "one"), adapter(tmp_path / "auto"), atol=1e-5)  # rounding, as above
    llama, opt = tiny_llama(), OPTForCausalLM.from_pretrained(base)  # the probe through the loss, one process
    assert D.keeps_packed_apart(llama, CausalLMLoss(llama)) is True
    assert D.keeps_packed_apart(opt, CausalLMLoss(opt)) is False


def ranks(n, cfg_file, args, port, env=None, limit_bytes=None, code: dict | None = None):
    """n processes with torchrun's environment but no torchrun agent (which would SIGTERM the survivors of a
    crash itself): what each process does on its own when a peer dies. [(returncode, stdout, stderr)] by rank.
    `limit_bytes`: each process's file-size limit (`ulimit -f`: the kernel refuses a longer write, EFBIG);
    `code`: {rank: python -c source} run instead of `-m loraforge`."""
    limit = (lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))) if limit_bytes else None
    procs, logs = [], []
    for rank in range(n):
        e = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "MASTER_ADDR": "127.0.0.1",
             "MASTER_PORT": str(port), "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(n),
             "LOCAL_WORLD_SIZE": str(n), **(env or {})}
        out, err = (cfg_file.parent / f"rank{rank}.{s}" for s in ("out", "err"))
        logs.append((out, err))
        with open(out, "w") as o, open(err, "w") as r:  # files, not pipes: a full pipe would block a rank
            start = ["-c", code[rank]] if code and rank in code else ["-m", "loraforge"]
            procs.append(subprocess.Popen([sys.executable, *start, "train", str(cfg_file), *args,
                                           "training.distributed=fsdp"], cwd=ROOT, env=e, stdout=o, stderr=r,
                                          preexec_fn=limit))
    return [(p.wait(timeout=300), out.read_text(), err.read_text()) for p, (out, err) in zip(procs, logs)]


def test_killed_rank_stops_the_other_and_resume_with_one_process_ends_the_same(tiny_dir, data_file, tmp_path,
                                                                               cfg_file):
    """Rank 1 is SIGKILLed while writing the step-4 checkpoint: rank 0 stops on its own with an error naming the
    collective timeout, the half-written checkpoint is never resumed from, and one process (batch 8, the same
    global batch) resumes the two-process shards from step 2 and ends with the uninterrupted run's adapter."""
    args = [*common(tiny_dir, data_file, steps=6), "training.save_every=2", "training.collective_timeout=60"]
    train(load_train_config(None, [*args, "training.batch_size=8", f"output_dir={tmp_path / 'whole'}"]),
          progress=False)
    cut = tmp_path / "cut"
    (rc0, _, err0), (rc1, _, _) = ranks(2, cfg_file, [*args, "training.batch_size=4", f"output_dir={cut}"], 29543,
                                        env={"LORAFORGE_TEST_CRASH_IN_SAVE": "4:1"})
    assert rc1 == -9 and rc0 > 0, err0[-3000:]  # killed; stopped with an error (not a hang, not killed)
    assert "rank 0: a collective with the other processes failed" in err0, err0[-3000:]
    assert "training.collective_timeout=60 s" in err0
    ckpts = cut / "checkpoints"
    assert (ckpts / "step-0000002").is_dir() and not (ckpts / "step-0000004").exists()
    assert not list(ckpts.glob(".tmp-*"))  # rank 0 removed the save's own temporary directory when the barrier failed
    resumed = torchrun(1, cfg_file, [*args, "training.batch_size=8", f"output_dir={cut}", "--resume"], 29544)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout and "step 2/6" in resumed.stdout
    assert "written by 2 processes, this run has 1" in resumed.stdout
    assert_same(adapter(tmp_path / "whole"), adapter(cut), atol=1e-5)


def test_a_sharded_checkpoint_the_disk_refuses_stops_every_process_with_one_line(tiny_dir, data_file, tmp_path,
                                                                                  cfg_file):
    """Each process's file-size limit (50 kB) is below its shard of the step-1 checkpoint (~90-150 kB): every process
    stops with the one line a one-process run gives (it was DCP's CheckpointException, ~80 lines a process), and
    the save's temporary directory is gone."""
    out = tmp_path / "out"
    args = [*common(tiny_dir, data_file, steps=2), "training.save_every=1", "training.batch_size=4",
            f"output_dir={out}"]
    ckpt = re.escape(str(out / "checkpoints" / "step-0000001"))
    for rc, _, err in ranks(2, cfg_file, args, 29549, limit_bytes=50_000):
        assert rc == 2 and "Traceback" not in err, err[-3000:]
        # a tensor's write past the limit (EFBIG), or torch.save's for DCP's other items, which loses the errno
        reason = (r"(a file would pass the largest file size allowed \(`ulimit -f`, or the file system's limit\)|"
                  r"the disk took only part of a write \(it is full, over a quota, or the file passed the largest "
                  r"size allowed: `ulimit -f`\))")
        assert re.fullmatch(rf"error: cannot write {ckpt}: {reason} \([0-9.]+ [kMGT]?B free there\); training "
                            rf"stopped after step 1, no checkpoint was completed before this one",
                            err.strip().splitlines()[-1]), err[-3000:]
    assert list((out / "checkpoints").iterdir()) == []


def test_a_sharded_checkpoint_that_cannot_be_read_is_not_blamed_on_the_config(tmp_path):
    """Every failure of DCP's load was "does not match this model/config ...; resume with the config the run was
    started with", a peer gone (gloo's connection reset) and a missing file alike."""
    meta = {"config": {"lora": {"r": 4}}}
    peer = RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Read error [127.0.0.1]:1: Connection "
                        "reset by peer")
    assert read_failure(tmp_path, peer, meta, {"lora": {"r": 4}}) is None  # the run's collective message says it
    missing = FileNotFoundError(2, "No such file or directory", str(tmp_path / "__1_0.distcp"))
    assert str(read_failure(tmp_path, missing, meta, {"lora": {"r": 4}})) == (
        f"checkpoint {tmp_path}: a file of it cannot be read ([Errno 2] No such file or directory: "
        f"'{tmp_path / '__1_0.distcp'}'); delete it to resume from the one before, or start over with --overwrite")
    other = read_failure(tmp_path, KeyError("model.x"), meta, {"lora": {"r": 8}})
    assert str(other) == (f"checkpoint {tmp_path} does not match this model/config ('model.x'; changed since it was "
                          f"written: lora.r: 4 -> 8); resume with the config the run was started with")


ELSEWHERE = """
import sys
from pathlib import Path
import loraforge.training.dcp as dcp_module
shared = dcp_module.shared_path
def elsewhere(path):  # rank 1 on a node whose output_dir is another folder (a relative path, a node's own disk)
    mine = Path(str(shared(path)) + "-elsewhere")
    mine.mkdir(parents=True, exist_ok=True)
    return mine
dcp_module.shared_path = elsewhere
import runpy  # as python -m loraforge: its exit after a process group skips the teardown
runpy.run_module("loraforge", run_name="__main__", alter_sys=True)
"""


def test_a_sharded_checkpoint_whose_processes_wrote_into_different_folders_is_refused(tiny_dir, data_file,
                                                                                       tmp_path, cfg_file):
    """Rank 1 writes its shard into another folder than rank 0's (nodes given a relative output_dir, started in
    different folders): rank 0 would have written a manifest of its own files alone, a checkpoint that verifies
    and cannot resume (the bug, found at --resume after the run). Every process stops at that save, naming it."""
    out = tmp_path / "out"
    args = [*common(tiny_dir, data_file, steps=2), "training.save_every=1", "training.batch_size=4",
            f"output_dir={out}"]
    (rc0, _, err0), (rc1, _, err1) = ranks(2, cfg_file, args, 29547, code={1: ELSEWHERE})
    assert rc0 == rc1 == 2, err0[-3000:] + err1[-3000:]
    line = err0.strip().splitlines()[-1]
    assert line.startswith("error: checkpoint step-0000001: rank 0 does not see the files process(es) [1] wrote "
                           f"into {out / 'checkpoints'}/.tmp-step-0000001-"), err0[-3000:]
    assert line.endswith("output_dir is not one folder for every process (a relative path on nodes started in "
                         "different folders, or a disk one node sees); give output_dir as an absolute path on a file "
                         "system every node sees")
    assert "error" not in err1, err1  # said once per node
    assert list((out / "checkpoints").glob("step-*")) == []


OLD_SAVE = """
import sys
import loraforge.training.dcp as dcp_module
from torch.distributed.checkpoint.state_dict import get_state_dict
# as versions before this one saved: DCP's ignore_frozen_params alone, which kept the tied head (lm_head)
dcp_module.trained_state = lambda module, optimizer: get_state_dict(module, optimizer, options=dcp_module.OPTIONS)
import runpy  # as python -m loraforge: its exit after a process group skips the teardown
runpy.run_module("loraforge", run_name="__main__", alter_sys=True)
"""


def test_sharded_checkpoints_hold_only_what_trains_and_older_ones_still_resume(tiny_dir, data_file, tmp_path,
                                                                              cfg_file):
    """A sharded checkpoint held the tied head (the embedding's other name, frozen) whole: 6.3 MB for the tiny
    model's 18 kB of adapter, 113 MB for the built-in model. Now its tensors are the trainable ones. A checkpoint
    saved the old way (the run killed while saving step 2) resumes and ends with the uninterrupted adapter."""
    args = [*common(tiny_dir, data_file, steps=3), "training.save_every=1", "training.batch_size=4"]
    whole = torchrun(1, cfg_file, [*args, f"output_dir={tmp_path / 'whole'}"], 29550)
    assert whole.returncode == 0, whole.stderr[-3000:]
    ckpt = tmp_path / "whole" / "checkpoints" / "step-0000003"
    saved = set(dcp.FileSystemReader(ckpt).read_metadata().state_dict_metadata)
    model_keys = {k for k in saved if k.startswith("model.")}
    assert model_keys and all(".lora_A." in k or ".lora_B." in k for k in model_keys), sorted(model_keys)[:5]

    old = tmp_path / "old"
    script = tmp_path / "old_save.py"
    script.write_text(OLD_SAVE)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LORAFORGE_TEST_CRASH_IN_SAVE": "2:0"}
    killed = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1",
                             "--master_port=29551", str(script), "train", str(cfg_file), *args, f"output_dir={old}",
                             "training.distributed=fsdp"], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=300)
    assert killed.returncode != 0
    step1 = old / "checkpoints" / "step-0000001"
    assert "model.model.lm_head.weight" in dcp.FileSystemReader(step1).read_metadata().state_dict_metadata
    resumed = torchrun(1, cfg_file, [*args, f"output_dir={old}", "--resume"], 29552)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "step 1/3" in resumed.stdout
    assert_same(adapter(tmp_path / "whole"), adapter(old), atol=1e-6)


def test_unsupported_combinations_are_refused_by_name(tiny_dir, data_file):
    cfg = load_train_config(None, [*common(tiny_dir, data_file), "method=adalora", "training.precision=fp16",
                                   "training.compile=true", "training.share_prefix=true",
                                   "training.optimizer=adamw_8bit", "training.distributed=fsdp"])
    with pytest.raises(TrainingError) as e:
        refuse_unsupported(cfg)
    text = str(e.value)
    for named in ("method: adalora", "training.precision: fp16", "training.compile: true",
                  "training.share_prefix: true", "training.optimizer: adamw_8bit"):
        assert named in text
    int8 = load_train_config(None, [*common(tiny_dir, data_file), "model.quantization=int8"])
    with pytest.raises(TrainingError, match="model.quantization: int8"):
        refuse_unsupported(int8)
    plain = load_train_config(None, [*common(tiny_dir, data_file), "training.distributed=fsdp"])
    with pytest.raises(TrainingError, match="fsdp needs torchrun"):  # no process group outside torchrun
        choose_mode(plain, 1, torch.device("cpu"))
    assert choose_mode(load_train_config(None, common(tiny_dir, data_file)), 1, torch.device("cpu")) == "none"


def test_fsdp_refuses_the_fp16_that_auto_precision_resolves_to_naming_the_field(tiny_dir, data_file):
    """Soak: only a written fp16 was refused under FSDP; training.precision auto resolves to fp16 on a GPU without
    bf16 (T4, V100), where FSDP is what auto picks for a base too big for one GPU, and that run went on with loss
    scaling over sharded gradients, which is not wired up. The message named no field either ("fp16 (...)")."""
    cfg = load_train_config(None, [*common(tiny_dir, data_file), "training.distributed=fsdp", "training.precision=auto",
                                   "model.dtype=auto"])
    t4 = Precision("fp16", "fp16", "the GPU (sm_75) has no native bf16")
    with pytest.raises(TrainingError) as e:
        refuse_unsupported(cfg, t4)
    assert str(e.value) == (
        "training.distributed: fsdp does not support training.precision: auto, which is fp16 here (the GPU (sm_75) "
        "has no native bf16) (loss scaling over sharded gradients is not wired up; use training.precision: fp32, "
        "bf16 where the hardware has it, or training.distributed: ddp) yet")
    refuse_unsupported(cfg, Precision("bf16", "bf16", "the GPU has bf16"))  # accepted
    stored = load_train_config(None, [*common(tiny_dir, data_file), "model.dtype=fp16"])
    with pytest.raises(TrainingError) as e:  # training.distributed auto: the run went sharded because auto chose it
        refuse_unsupported(stored)
    assert str(e.value).startswith("training.distributed: auto chose fsdp (the base's weights take more than half of "
                                   "one process's memory), which does not support model.dtype: fp16 (loss scaling")


RSS_AFTER_FREE = """
import sys, torch
from loraforge.utils.allocator import return_large_frees
if sys.argv[1] == "held":
    return_large_frees()
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096
x = torch.ones(5_000_000); del x  # 20 MB, mmapped and freed: glibc raises its mmap threshold to 20 MB
before = rss()
y = torch.ones(2_500_000); del y  # 10 MB: from the heap unless the threshold is held, and kept there when freed
print((rss() - before) / 2**20)
"""


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads the resident set from /proc (Linux)")
def test_freed_large_blocks_go_back_to_the_system_under_fsdp_on_cpu():
    """What FSDP's gather-and-free of every layer on CPU met: glibc kept a freed 10 MB block in the heap (the
    plain process, the reference); with the mmap threshold held, freeing it gives it back."""
    def grown(mode):
        out = subprocess.run([sys.executable, "-c", RSS_AFTER_FREE, mode], capture_output=True, text=True,
                             env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
        assert out.returncode == 0, out.stderr
        return float(out.stdout.split()[-1])

    plain, held = grown("plain"), grown("held")
    if plain < 5:
        pytest.skip(f"this C library returned the freed block by itself ({plain:.1f} MB kept): nothing to fix here")
    assert held < 1, f"{held:.1f} MB of a freed 10 MB block stayed resident (without the fix: {plain:.1f} MB)"


SAVE_BESIDE_AND_LOAD = """
import contextlib, sys
from pathlib import Path
import torch.distributed as dist
from loraforge.config import load_train_config, to_dict
from loraforge.training.checkpoint import TrainingError
from loraforge.training.dcp import verify_sharded
from loraforge.training.dcp import load_sharded, save_sharded, verify_sharded
from loraforge.training.loop import setup
saved, others = Path(sys.argv[1]), Path(sys.argv[2])
cfg = load_train_config(None, sys.argv[3:])
with contextlib.ExitStack() as held:
    run = setup(cfg, False, False, None, held)
    if run.rank == 0:  # another writer's save in flight under the name every save used before
        (others / "__0_0.distcp").parent.mkdir(parents=True)
        (others / "__0_0.distcp").write_text("in flight")
    dist.barrier()
    path = save_sharded(run.ckpt_root, 7, run.ddp, run.optimizer, run.scheduler, cfg, {"tokens_seen": 0})
    print(f"rank {run.rank}: saved {path.name}: {verify_sharded(path)}", flush=True)
    try:
        load_sharded(saved, run.ddp, run.optimizer, run.scheduler, to_dict(cfg))
    except TrainingError as e:
        print(f"rank {run.rank}: {e}", flush=True)
"""


def test_fsdp_resume_with_another_lora_r_is_refused_naming_it(tiny_dir, data_file, tmp_path, cfg_file):
    """Shards resumed without FSDP are refused as written with it, and left as they are. Shards saved at lora.r=4
    and read at lora.r=8: every process stops with the one-line error (exit code 2 from
    the CLI) naming the tensor's two shapes, and with this run's config the changed setting. On the way, a save
    writes into a temporary directory of its own: another writer's files under the old fixed name stay."""
    args = [*common(tiny_dir, data_file, steps=2), "training.save_every=2", "training.batch_size=4"]
    first = torchrun(2, cfg_file, [*args, f"output_dir={tmp_path / 'r4'}"], 29546)
    assert first.returncode == 0, first.stderr[-3000:]
    saved = tmp_path / "r4" / "checkpoints" / "step-0000002"
    with pytest.raises(TrainingError) as e:  # resumed without FSDP: named, not called incomplete (nor deleted)
        train(load_train_config(None, [*args, "training.max_steps=4", f"output_dir={tmp_path / 'r4'}"]), resume=True,
              progress=False)
    assert str(e.value) == (f"--resume: {saved}: it was written with training.distributed=fsdp (sharded); resume it "
                            f"under torchrun with training.distributed=fsdp (any number of processes, e.g. torchrun "
                            f"--nproc_per_node=1 -m loraforge train CONFIG training.distributed=fsdp --resume)")
    assert verify_sharded(saved) is None
    lora_a = "model.model.layers.0.self_attn.q_proj.lora_A.default.weight"  # the wrapped loss module's name
    shapes = f"{lora_a} [4, 32] in the checkpoint, [8, 32] here"
    resumed = ranks(2, cfg_file, [*args, "lora.r=8", f"output_dir={tmp_path / 'r4'}", "--resume"], 29547)
    for rank, (rc, _, err) in enumerate(resumed):
        assert rc == 2, err[-3000:]
        assert f"error: checkpoint {saved} does not match this model/config ({shapes}" in err, err[-3000:]
        assert "Traceback" not in err

    others = tmp_path / "r8" / "checkpoints" / ".tmp-step-0000007"
    script = tmp_path / "save_and_load.py"
    script.write_text(SAVE_BESIDE_AND_LOAD)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29548",
                           str(script), str(saved), str(others), *args, "lora.r=8", f"output_dir={tmp_path / 'r8'}",
                           "training.distributed=fsdp"], cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in (0, 1):
        assert f"rank {rank}: saved step-0000007: None" in proc.stdout  # None: its manifest verifies
        assert (f"rank {rank}: checkpoint {saved} does not match this model/config ({shapes}; changed since it was "
                f"written: lora.r: 4 -> 8); resume with the config the run was started with") in proc.stdout
    assert (others / "__0_0.distcp").read_text() == "in flight"
    assert sorted(p.name for p in (tmp_path / "r8" / "checkpoints").iterdir()) == [".tmp-step-0000007", "step-0000007"]


def signalled_torchrun(cfg_file, args, port, out, signum, whole_group) -> tuple[int, str]:
    """`torchrun --nproc_per_node=2 -m loraforge train`, signalled once rank 0 has logged a step: `signum` to the
    agent alone (as `kill`, Slurm or Kubernetes do; the agent forwards it) or to the whole process group (Ctrl-C in a
    terminal: every process gets it, then again from the agent). (agent's exit code, stderr of all processes)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1"}
    err_file, logged = cfg_file.parent / f"torchrun-{port}.err", metrics_lines(out)  # a resume appends to the log
    with open(err_file, "w") as err:  # a file: a full pipe would block the processes
        proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                                 f"--master_port={port}", "-m", "loraforge", "train", str(cfg_file), *args],
                                cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while metrics_lines(out) <= logged:
            assert proc.poll() is None and time.monotonic() < deadline, err_file.read_text()[-3000:]
            time.sleep(0.05)
        os.killpg(proc.pid, signum) if whole_group else os.kill(proc.pid, signum)
        code = proc.wait(timeout=120)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    return code, err_file.read_text()


def metrics_lines(out) -> int:
    metrics = out / "metrics.jsonl"
    return metrics.read_text().count("\n") if metrics.is_file() else 0


@pytest.mark.parametrize("mode, signum, whole_group", [("ddp", signal.SIGTERM, False), ("fsdp", signal.SIGINT, True)])
def test_a_signal_under_torchrun_stops_every_process_after_one_step_with_a_whole_checkpoint(
        tiny_dir, data_file, tmp_path, cfg_file, mode, signum, whole_group):
    """Under torchrun a signal stops the run as it does one process: every process finishes the same step, the
    checkpoint of it is whole (FSDP: every shard, a collective), rank 0 alone says so in one line, and --resume
    continues from it. Before, torchrun's processes had no handler: a kill lost every step since the last save."""
    out = tmp_path / "run"
    args = [*common(tiny_dir, data_file, steps=100000), f"output_dir={out}", "training.batch_size=4",
            "training.save_every=0", "training.log_every=1", f"training.distributed={mode}"]
    port = 29561 if mode == "ddp" else 29563
    code, stderr = signalled_torchrun(cfg_file, args, port, out, signum, whole_group)
    lines = [line for line in stderr.splitlines() if line.startswith("stopped by")]
    ckpts = out / "checkpoints"
    (step,) = [d.name for d in ckpts.iterdir()]  # save_every 0: the stop's checkpoint alone
    n = int(step.removeprefix("step-"))
    assert code != 0 and lines == [f"stopped by {signal.Signals(signum).name} after step {n} of 100000: checkpoint "
                                   f"{ckpts / step} saved; continue with --resume"], stderr[-3000:]
    assert (verify_sharded if mode == "fsdp" else verify_checkpoint)(ckpts / step) is None
    assert "Traceback" not in stderr.split("stopped by")[0]  # no process died mid-step before the stop
    if mode == "ddp":  # --resume starts at that step (then is stopped again)
        code, stderr = signalled_torchrun(cfg_file, [*args, "--resume"], port + 1, out, signum, whole_group)
        later = sorted(int(d.name.removeprefix("step-")) for d in ckpts.iterdir())
        assert later[0] == n and len(later) == 2 and later[1] > n, stderr[-3000:]
        assert f"stopped by SIGTERM after step {later[1]} of 100000" in stderr


def test_processes_whose_torchrun_agent_is_killed_stop_with_a_checkpoint_instead_of_training_on_unseen(
        tiny_dir, data_file, tmp_path, cfg_file):
    """torchrun starts every process in a session of its own: `kill -9` of the agent (or the OOM killer) used to
    leave them training on, holding output_dir, with nobody to see them. Now each gets SIGTERM when the agent dies
    (prctl PR_SET_PDEATHSIG) and stops as a signalled run does: the same step, a whole checkpoint, none left."""
    out = tmp_path / "run"
    args = [*common(tiny_dir, data_file, steps=100000), f"output_dir={out}", "training.batch_size=4",
            "training.save_every=0", "training.log_every=1"]
    code, _ = signalled_torchrun(cfg_file, args, 29567, out, signal.SIGKILL, whole_group=False)
    assert code == -signal.SIGKILL
    deadline = time.monotonic() + 300  # did not train on (100000 steps): generous for a loaded 2-core machine
    while subprocess.run(["pgrep", "-f", f"output_dir={out}"], capture_output=True).returncode == 0:
        assert time.monotonic() < deadline, "the processes trained on after their agent was killed"
        time.sleep(0.2)
    ckpts = out / "checkpoints"
    (step,) = [d.name for d in ckpts.iterdir()]  # save_every 0: the stop's checkpoint alone
    assert verify_checkpoint(ckpts / step) is None and int(step.removeprefix("step-")) >= 1
    stderr = (cfg_file.parent / "torchrun-29567.err").read_text()
    assert f"stopped by SIGTERM after step {int(step.removeprefix('step-'))} of 100000" in stderr, stderr[-3000:]


def test_processes_whose_torchrun_agent_is_killed_while_they_start_end_instead_of_waiting_for_its_store(
        tiny_dir, data_file, tmp_path, cfg_file):
    """The agent killed while its processes are still importing (0.3 s after they appear): they used to wait for its
    rendezvous store until training.collective_timeout (600 s) and more; the CLI asks for the agent's death signal
    before its slow imports (utils.parent.follow_agent), so they end at once."""
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1"}
    agent = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                              "--master_port=29569", "-m", "loraforge", "train", str(cfg_file),
                              *common(tiny_dir, data_file), f"output_dir={out}"], cwd=ROOT, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 300  # the agent's start-up, under a loaded 2-core machine's imports
        while len(children(agent.pid)) < 2:
            assert agent.poll() is None and time.monotonic() < deadline
            time.sleep(0.01)
        workers = children(agent.pid)
        time.sleep(0.3)
        agent.kill()
        agent.wait()
        deadline = time.monotonic() + 300  # at once, normally; they waited 600 s and more before the fix
        while any(alive(pid) for pid in workers):
            assert time.monotonic() < deadline, "the processes outlived their killed agent by 5 minutes"
            time.sleep(0.1)
    finally:
        for pid in children(agent.pid) if agent.poll() is None else []:
            os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(agent.pid, signal.SIGKILL)
    assert not (out / "adapter").exists()


def children(pid: int) -> list[int]:
    found = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [int(p) for p in found]


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"  # a zombie has ended (its parent, the agent, is gone; init reaps it)


SIGNAL_AFTER_AGREEING = """
import os, signal, sys
import torch.distributed as dist
real, seen = dist.all_reduce, []
def all_reduce(tensor, op=dist.ReduceOp.SUM, *args, **kwargs):
    work = real(tensor, op, *args, **kwargs)
    if op == dist.ReduceOp.MAX and dist.get_rank() == 1:  # the stop agreement (StopRequest.agreed) on rank 1
        seen.append(1)
        if len(seen) == 3:  # before step 3: the signal lands after rank 1 sent its flag (0), before agreed returns
            os.kill(os.getpid(), signal.SIGTERM)
    return work
dist.all_reduce = all_reduce
import runpy  # as python -m loraforge: its exit after a process group skips the teardown
runpy.run_module("loraforge", run_name="__main__", alter_sys=True)
"""


def test_a_signal_that_lands_on_one_process_during_the_stop_agreement_stops_every_process_at_the_same_step(
        tiny_dir, data_file, tmp_path, cfg_file):
    """torchrun delivers a signal to each process at its own moment: rank 1's arrives while its agreement all-reduce
    is under way (it sent "no signal", rank 0 agreed to go on). Rank 1 used to stop on its own late flag and exit,
    while rank 0 waited in the next step's all-reduce: "Connection closed by peer", no checkpoint. Now both go by
    the agreed value: rank 1's flag stops both one step later, with a whole checkpoint."""
    out = tmp_path / "run"
    script = tmp_path / "signal_after_agreeing.py"
    script.write_text(SIGNAL_AFTER_AGREEING)
    args = [*common(tiny_dir, data_file, steps=6), f"output_dir={out}", "training.batch_size=4",
            "training.save_every=0", "training.distributed=ddp"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29571",
                           str(script), "train", str(cfg_file), *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    ckpts = out / "checkpoints"
    assert ckpts.is_dir() and [d.name for d in ckpts.iterdir()] == ["step-0000003"], proc.stderr[-3000:]
    assert verify_checkpoint(ckpts / "step-0000003") is None
    assert proc.returncode != 0 and "a collective with the other processes failed" not in proc.stderr, \
        proc.stderr[-3000:]
    assert f"stopped by SIGTERM after step 3 of 6: checkpoint {ckpts / 'step-0000003'} saved" in proc.stderr
    assert not (out / "adapter").exists()
