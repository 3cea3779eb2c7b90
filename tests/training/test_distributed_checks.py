"""Several processes (plain processes with torchrun's environment, DDP over gloo, CPU) against one: AdaLoRA's
penalty, resuming with another number of processes (the same global batch continues exactly, another one is
refused by name), a peer that stops during set-up or after the last step, configs that differ between the
processes, and too few examples for the processes. Tiny Llama, fp32, a few steps: seconds per process."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

from helpers import tiny_llama
from loraforge.config import load_train_config
from loraforge.training import data as D
from loraforge.training.checkpoint import TrainingError, verify_checkpoint
from loraforge.training.distributed import collective_error
from loraforge.training.epochs import too_few_examples
from loraforge.training.loop import train

ROOT = Path(__file__).resolve().parents[2]
# rank 1's data file is missing on its node (where it is local rank 0, which says a node's data errors): its own
# one-line error during set-up, while rank 0 goes on
MISSING_DATA = ("import os, sys; os.environ['LOCAL_RANK'] = '0'\n"
                "import loraforge.training.loop as L; from loraforge.training.data import DataError\n"
                "def missing(*a, **k): raise DataError('no such file: /node1/train.jsonl')\n"
                "L.load_data = missing; import runpy\n"
                "runpy.run_module('loraforge', run_name='__main__', alter_sys=True)")


def common(tiny_dir, data_file, steps=4):
    return [f"model.name={tiny_dir}", f"data.train={data_file}", "data.eval_fraction=0", "lora.r=4",
            "training.lr=1e-2", f"training.max_steps={steps}", "training.precision=fp32", "training.seed=3"]


def ranks(tmp_path, per_rank: list[list[str]], port: int, env=None, code: dict | None = None, cwds=None,
          distributed: str = "ddp"):
    """One process per rank (args per rank; `code`: {rank: python -c source} run instead of `-m loraforge`;
    `cwds`: each one's folder) with torchrun's environment but no agent (which would SIGTERM the survivors
    itself): what each process does on its own. [(returncode, stdout, stderr)] by rank."""
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("{}\n")
    procs, logs = [], []
    for rank, args in enumerate(per_rank):
        e = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1",
             "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank), "LOCAL_RANK": str(rank),
             "WORLD_SIZE": str(len(per_rank)), "LOCAL_WORLD_SIZE": str(len(per_rank)), **(env or {})}
        out, err = (tmp_path / f"rank{rank}.{s}" for s in ("out", "err"))
        logs.append((out, err))
        start = ["-c", code[rank]] if code and rank in code else ["-m", "loraforge"]
        with open(out, "w") as o, open(err, "w") as r:  # files, not pipes: a full pipe would block a rank
            procs.append(subprocess.Popen([sys.executable, *start, "train", str(cfg_file), *args,
                                           f"training.distributed={distributed}"], cwd=cwds[rank] if cwds else ROOT,
                                          env=e,
                                          stdout=o, stderr=r))
    return [(p.wait(timeout=300), out.read_text(), err.read_text()) for p, (out, err) in zip(procs, logs)]


def adapter(out) -> dict:
    return load_file(Path(out) / "adapter" / "adapter_model.safetensors")


def assert_same(a: dict, b: dict, atol: float):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=atol)


def error_line(err: str) -> str:
    assert "Traceback" not in err, err[-3000:]
    return err.strip().splitlines()[-1]


def test_adalora_under_ddp_trains_like_one_process(tiny_dir, data_file, tmp_path):
    """AdaLoRA (orthogonality penalty at its default weight 0.5, rank masking) on 2 processes × batch 4 against one
    process × batch 8: the same adapter. The penalty once per step, not once per process: with it counted once per
    process (the bug) they differ by 2.9e-5 here. Only rank 0, which wrote the adapter, says so."""
    args = [*common(tiny_dir, data_file, steps=4), "method=adalora"]
    train(load_train_config(None, [*args, "training.batch_size=8", f"output_dir={tmp_path / 'one'}"]),
          progress=False)
    (rc0, out0, err0), (rc1, out1, err1) = ranks(tmp_path, [[*args, "training.batch_size=4",
                                                             f"output_dir={tmp_path / 'two'}"]] * 2, 29561)
    assert rc0 == 0 and rc1 == 0, err0[-3000:] + err1[-3000:]
    # the same sums in another order (all-reduce): rounding, 7e-9 measured; the bug's difference is 2.9e-5
    assert_same(adapter(tmp_path / "one"), adapter(tmp_path / "two"), atol=1e-6)
    assert "adapter written to" in out0 and "adapter written to" not in out1


def test_resume_with_another_process_count_keeps_the_global_batch_or_refuses(tiny_dir, data_file, tmp_path):
    """A 2-process DDP run (batch 4) whose rank 0 is killed while saving step 4: rank 1, at the final barrier,
    says which collective failed in one line. Its step-2 checkpoint records the global batch; one process with
    batch 4 (global batch 4, not 8) is refused by name and leaves it intact; one process with batch 4 ×
    gradient_accumulation 2 continues it to the adapter of the uninterrupted one-process run with batch 8."""
    args = [*common(tiny_dir, data_file, steps=4), "training.save_every=2", "training.schedule=cosine",
            "training.collective_timeout=60"]
    whole = tmp_path / "whole"
    train(load_train_config(None, [*args, "training.batch_size=8", f"output_dir={whole}"]), progress=False)
    state = json.loads((whole / "checkpoints" / "step-0000002" / "trainer_state.json").read_text())
    assert state["global_batch"] == {"processes": 1, "batch_size": 8, "gradient_accumulation": 1,
                                     "batch_tokens": None}  # one process records it too

    cut = tmp_path / "cut"
    (rc0, _, err0), (rc1, _, err1) = ranks(tmp_path, [[*args, "training.batch_size=4", f"output_dir={cut}"]] * 2,
                                           29562, env={"LORAFORGE_TEST_CRASH_IN_SAVE": "4"})  # only rank 0 saves
    assert rc0 == -9 and rc1 == 2, err0[-3000:] + err1[-3000:]
    assert error_line(err1).startswith("error: rank 1: a collective with the other processes failed after the last "
                                       "step, writing the adapter ("), err1[-3000:]
    assert error_line(err1).endswith("training.collective_timeout=60 s; resume from the last checkpoint with --resume")
    step2 = cut / "checkpoints" / "step-0000002"
    assert not (cut / "checkpoints" / "step-0000004").exists() and verify_checkpoint(step2) is None

    with pytest.raises(TrainingError) as e:
        train(load_train_config(None, [*args, "training.batch_size=4", f"output_dir={cut}"]), resume=True,
              progress=False)
    assert str(e.value) == (
        "--resume: step-0000002 was written with a global batch of 8 examples (2 processes × training.batch_size 4 "
        "× training.gradient_accumulation 1), this run's is 4 examples (1 process × training.batch_size 4 × "
        "training.gradient_accumulation 1): the data position and learning-rate schedule continue only with the "
        "same global batch; keep it with training.batch_size=8 (or training.gradient_accumulation=2), or resume "
        "with 2 processes")
    assert verify_checkpoint(step2) is None

    resumed = train(load_train_config(None, [*args, "training.batch_size=4", "training.gradient_accumulation=2",
                                             f"output_dir={cut}"]), resume=True, progress=False)
    assert resumed.steps == 4
    # the same examples per step and the same schedule; sums in another order: 1.5e-8 measured (4 steps, lr 1e-2)
    assert_same(adapter(whole), adapter(cut), atol=1e-6)
    logged = [json.loads(x) for x in (cut / "metrics.jsonl").read_text().splitlines()]
    expected = [json.loads(x) for x in (whole / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == [1, 2, 3, 4]
    assert [r["lr"] for r in logged] == pytest.approx([r["lr"] for r in expected], rel=0, abs=1e-12)
    assert [r["loss"] for r in logged] == pytest.approx([r["loss"] for r in expected], rel=0, abs=1e-5)


def test_a_peer_that_stops_during_set_up_is_named_in_one_line(tiny_dir, data_file, tmp_path):
    """Rank 1 cannot read its data (its own error line); rank 0, in DDP's first collective, says a collective
    failed during set-up, not a gloo traceback."""
    args = [*common(tiny_dir, data_file, steps=2), "training.batch_size=4", f"output_dir={tmp_path / 'out'}"]
    (rc0, _, err0), (rc1, _, err1) = ranks(tmp_path, [args, args], 29563, code={1: MISSING_DATA})
    assert rc1 == 2 and error_line(err1) == "error: no such file: /node1/train.jsonl", err1[-3000:]
    assert rc0 == 2, err0[-3000:]
    line = error_line(err0)
    assert line.startswith("error: rank 0: a collective with the other processes failed during set-up ("), line
    assert line.endswith("another process stopped (its error is in its own output) or did not answer within "
                         "training.collective_timeout=600 s; fix what stopped it and start the run again (with "
                         "--resume if it continues from a checkpoint)")


def test_configs_that_differ_between_processes_stop_every_process_naming_the_setting(tiny_dir, data_file,
                                                                                      tmp_path):
    """training.seed differs on rank 1 (each process would shuffle the data its own way and train silently):
    both processes stop before loading anything, naming the setting and both values."""
    args = [*common(tiny_dir, data_file, steps=2), "training.batch_size=4", f"output_dir={tmp_path / 'out'}"]
    for rc, _, err in ranks(tmp_path, [args, [*args, "training.seed=4"]], 29564):
        assert rc == 2, err[-3000:]
        assert error_line(err) == ("error: the processes run different configs: training.seed is 3 on rank 0 and 4 "
                                   "on rank 1; give every process the same config file and overrides")
    assert not (tmp_path / "out").exists()


def test_processes_that_read_different_data_under_one_path_stop_naming_it(tiny_dir, data_file, tmp_path):
    """data.train=train.jsonl on two nodes started in different folders: the config is the same text, the files
    are not (48 rows on one, 64 on the other). Each process trained on its own data without a word, or waited
    for the others until the timeout (the bug); now both stop before the model loads, naming the counts."""
    rows = Path(data_file).read_text().splitlines(keepends=True)
    nodes = [tmp_path / "node0", tmp_path / "node1"]
    for node, n in zip(nodes, (len(rows), len(rows) * 3 // 4)):
        node.mkdir()
        (node / "train.jsonl").write_text("".join(rows[:n]))
    args = [*common(tiny_dir, "train.jsonl", steps=2), "training.batch_size=4", "training.collective_timeout=60",
            f"output_dir={tmp_path / 'out'}"]
    (rc0, _, err0), (rc1, _, err1) = ranks(tmp_path, [args, args], 29567, cwds=nodes)
    assert rc0 == rc1 == 2, err0[-3000:] + err1[-3000:]
    assert error_line(err0) == (
        f"error: the processes read different training data (train.jsonl: {len(rows)} examples on rank 0, "
        f"{len(rows) * 3 // 4} on rank 1); give every process the same files, e.g. absolute paths on a file system "
        f"every node sees (a relative path is read from the folder each node was started in)"), err0[-3000:]
    assert "error" not in err1, err1  # said once per node


NOT_ONE_FOLDER = ("output_dir is not one folder for every process (a relative path on nodes started in different "
                  "folders, or a disk only one node sees)")


def test_nodes_with_their_own_output_dir_are_told_at_the_start_and_resume_names_it(tiny_dir, data_file, tmp_path):
    """output_dir=run on two nodes started in different folders (node-local disks): only rank 0 writes
    checkpoints, on its node. The run said nothing; its --resume then stopped rank 1 with "holds no checkpoint ...
    run without --resume to start it" and rank 0 with a failed collective advising --resume (the bug). Now rank 0
    says so at the start, and --resume stops every process naming what each finds; with the checkpoints copied
    to every node it resumes."""
    nodes = [tmp_path / "node0", tmp_path / "node1"]
    for node in nodes:
        node.mkdir()
    args = [*common(tiny_dir, data_file, steps=2), "training.batch_size=4", "training.save_every=1",
            "training.collective_timeout=60", "output_dir=run"]
    (rc0, out0, err0), (rc1, out1, err1) = ranks(tmp_path, [args, args], 29572, cwds=nodes)
    assert rc0 == rc1 == 0, err0[-3000:] + err1[-3000:]
    assert (f"note: rank(s) 1 do not see rank 0's output_dir run: {NOT_ONE_FOLDER}: checkpoints, metrics and the "
            f"adapter are written on rank 0's node alone, and --resume needs the checkpoint on every node; give "
            f"output_dir as an absolute path on a file system every node sees (or copy run/checkpoints to every "
            f"node before --resume)") in out0.splitlines(), out0
    assert "note" not in out1 and not (nodes[1] / "run").exists()
    assert sorted(p.name for p in (nodes[0] / "run" / "checkpoints").iterdir()) == ["step-0000001", "step-0000002"]

    (rc0, _, err0), (rc1, _, err1) = ranks(tmp_path, [[*args, "--resume"]] * 2, 29573, cwds=nodes)
    assert rc0 == rc1 == 2, err0[-3000:] + err1[-3000:]
    assert error_line(err0) == (
        f"error: --resume: the processes do not see the same checkpoints under run/checkpoints: rank 0 resumes "
        f"step-0000002, rank 1 finds none (checkpoints are written into rank 0's output_dir); {NOT_ONE_FOLDER}: give "
        f"output_dir as an absolute path on a file system every node sees, or copy rank 0's run/checkpoints to the "
        f"same path on every node")
    assert "error" not in err1, err1  # said once per node

    shutil.copytree(nodes[0] / "run" / "checkpoints", nodes[1] / "run" / "checkpoints")
    (rc0, out0, err0), (rc1, _, err1) = ranks(tmp_path, [[*args, "--resume"]] * 2, 29574, cwds=nodes)
    assert rc0 == rc1 == 0, err0[-3000:] + err1[-3000:]
    assert "resuming from run/checkpoints/step-0000002 (step 2/2)" in out0.splitlines(), out0


def test_fsdp_nodes_with_other_weights_or_their_own_output_dir_stop_at_the_start(tiny_dir, data_file, tmp_path):
    """FSDP keeps each process's own shard of the weights it loaded (DDP copies rank 0's): model.name=model on two
    nodes whose folders hold different checkpoints trained a model made of pieces of both, without a word
    (adapter 0.07 off the one-process run in the soak). Both processes stop before sharding now, naming a tensor
    and both folders. A node-local output_dir is refused at the start too: FSDP writes every shard into it."""
    nodes = [tmp_path / "node0", tmp_path / "node1"]
    for seed, node in enumerate(nodes):
        tiny_llama(seed=seed, vocab_size=len(AutoTokenizer.from_pretrained(tiny_dir)),
                   tie_word_embeddings=True).save_pretrained(node / "model")
        AutoTokenizer.from_pretrained(tiny_dir).save_pretrained(node / "model")
    args = [*common(tiny_dir, data_file, steps=2), "model.name=model", "training.batch_size=4",
            "training.collective_timeout=60", f"output_dir={tmp_path / 'out'}"]
    (rc0, _, err0), (rc1, _, err1) = ranks(tmp_path, [args, args], 29575, cwds=nodes, distributed="fsdp")
    assert rc0 == rc1 == 2, err0[-3000:] + err1[-3000:]
    assert "error" not in err1, err1  # said once per node
    assert error_line(err0) == (
        f"error: the processes loaded different weights for model.name model: model.embed_tokens.weight differs "
        f"between rank 0 (read from {nodes[0] / 'model'}) and rank 1 (read from {nodes[1] / 'model'}); FSDP "
        f"would train one model made of pieces of each; give every process the same model files, e.g. an absolute "
        f"path on a file system every node sees")
    assert not list((tmp_path / "out").glob("checkpoints/step-*"))

    args = [*common(tiny_dir, data_file, steps=2), "training.batch_size=4", "training.collective_timeout=60",
            "output_dir=run"]
    (rc0, _, err0), (rc1, _, err1) = ranks(tmp_path, [args, args], 29576, cwds=nodes, distributed="fsdp")
    assert rc0 == rc1 == 2, err0[-3000:] + err1[-3000:]
    assert "error" not in err1, err1
    assert error_line(err0) == (
        f"error: training.distributed: fsdp: rank(s) 1 do not see rank 0's output_dir run: {NOT_ONE_FOLDER}; every "
        f"process writes its shard of each checkpoint into it, so give output_dir as an absolute path on a file "
        f"system every node sees")


def test_a_ddp_run_with_dropout_resumes_to_the_uninterrupted_adapter(tiny_dir, data_file, tmp_path):
    """Dropout draws from each process's own RNG: a DDP checkpoint kept rank 0's alone, so after --resume rank 1
    drew rank 0's masks (4e-3 off the uninterrupted adapter in the soak). Each process's state is kept now."""
    args = [*common(tiny_dir, data_file, steps=4), "lora.lora_dropout=0.3", "training.save_every=2",
            "training.batch_size=4", "training.collective_timeout=60"]
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    for rc, _, err in ranks(tmp_path, [[*args, f"output_dir={whole}"]] * 2, 29568):
        assert rc == 0, err[-3000:]
    (rc0, _, err0), (rc1, _, err1) = ranks(tmp_path, [[*args, f"output_dir={cut}"]] * 2, 29569,
                                           env={"LORAFORGE_TEST_CRASH_IN_SAVE": "4"})  # only rank 0 saves
    assert rc0 == -9 and rc1 == 2, err0[-3000:] + err1[-3000:]
    for rc, _, err in ranks(tmp_path, [[*args, f"output_dir={cut}", "--resume"]] * 2, 29570):
        assert rc == 0, err[-3000:]
    assert_same(adapter(whole), adapter(cut), atol=1e-7)


def test_a_torchrun_restart_continues_the_checkpoint_the_attempt_before_wrote(tiny_dir, data_file, tmp_path):
    """torchrun --max-restarts runs the same command again after a process fails: it was refused ("holds an
    unfinished run ...; continue it with --resume"), every restart alike, until torchrun gave up (the bug). A
    restart (TORCHELASTIC_RESTART_COUNT > 0) now continues the checkpoint its attempt before wrote, to the
    uninterrupted adapter; an earlier run's checkpoint (older than the agent, here this test's process) is still
    refused. One process with torchrun's environment, its agent played by pytest."""
    args = [*common(tiny_dir, data_file, steps=4), "training.batch_size=4", "training.save_every=1"]
    train(load_train_config(None, [*args, f"output_dir={tmp_path / 'whole'}"]), progress=False)
    cut, old = tmp_path / "cut", tmp_path / "old"
    (tmp_path / "c.yaml").write_text("{}\n")
    command = [sys.executable, "-m", "loraforge", "train", "c.yaml", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    first = subprocess.run([*command, f"output_dir={cut}"], cwd=tmp_path, capture_output=True, text=True,
                           env={**env, "LORAFORGE_TEST_CRASH_IN_SAVE": "3"}, timeout=300)  # killed saving step 3
    assert first.returncode == -9, first.stderr[-3000:]
    shutil.copytree(cut, old)
    for state in old.glob("checkpoints/step-*/trainer_state.json"):
        os.utime(state, (1e9, 1e9))  # written in 2001: before this agent started
    restart = {**env, "TORCHELASTIC_RESTART_COUNT": "1", "TORCHELASTIC_RUN_ID": "test", "RANK": "0",
               "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29579"}
    again = subprocess.run([*command, f"output_dir={cut}"], cwd=tmp_path, capture_output=True, text=True,
                           env=restart, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.splitlines()[0] == ("torchrun restarted the processes (restart 1): continuing from "
                                            "step-0000002, which the attempt before wrote, as --resume does")
    assert_same(adapter(tmp_path / "whole"), adapter(cut), atol=1e-7)  # the same steps, as --resume gives
    earlier = subprocess.run([*command, f"output_dir={old}"], cwd=tmp_path, capture_output=True, text=True,
                             env={**restart, "MASTER_PORT": "29580"}, timeout=300)
    assert earlier.returncode == 2 and error_line(earlier.stderr).startswith(
        f"error: output_dir {old} holds an unfinished run (checkpoint step-0000002, step 2 of 4); continue it with "
        f"--resume"), earlier.stderr[-3000:]


def test_rank_set_by_hand_without_the_rest_of_torchruns_environment_is_named(tiny_dir, data_file, tmp_path):
    """RANK without MASTER_ADDR and MASTER_PORT (a launcher script, a leftover export) was a ValueError traceback
    from the process group; one line now, naming what is missing and the launcher."""
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE")}
    (tmp_path / "c.yaml").write_text("{}\n")
    run = subprocess.run([sys.executable, "-m", "loraforge", "train", "c.yaml", *common(tiny_dir, data_file),
                          f"output_dir={tmp_path / 'out'}"], cwd=tmp_path, capture_output=True, text=True,
                         env={**env, "RANK": "0", "OMP_NUM_THREADS": "1"}, timeout=300)
    assert run.returncode == 2 and error_line(run.stderr) == (
        "error: RANK is set (0) but WORLD_SIZE, MASTER_ADDR, MASTER_PORT are not: start several processes with "
        "torchrun (torchrun --nproc_per_node=N -m loraforge train CONFIG), or unset RANK to train in one process"), \
        run.stderr[-3000:]


def test_a_process_that_cannot_join_the_others_says_so_in_one_line(tiny_dir, data_file, tmp_path):
    """Rank 1 started where no rank 0 answers (a node not started, a wrong MASTER_ADDR; a firewall between the
    processes fails the same way, later): a DistNetworkError traceback, exit 1 (the bug). One line now, naming the
    address, the timeout and what to check, exit 2."""
    (tmp_path / "c.yaml").write_text("{}\n")
    env = {**os.environ, "RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": "29577", "OMP_NUM_THREADS": "1"}  # nothing listens there
    run = subprocess.run([sys.executable, "-m", "loraforge", "train", "c.yaml", *common(tiny_dir, data_file, 2),
                          "training.collective_timeout=2", f"output_dir={tmp_path / 'out'}"], cwd=tmp_path,
                         capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 2 and error_line(run.stderr) == (
        "error: rank 1: could not join the other 1 process(es) at 127.0.0.1:29577 within "
        "training.collective_timeout=2 s (The client socket has timed out after 2000ms while trying to connect to "
        "(127.0.0.1, 29577)): start the same command on every node, with an address and port every node reaches; "
        "where they still cannot connect to each other (a firewall, a hostname that resolves to 127.0.1.1), name the "
        "network interface with GLOO_SOCKET_IFNAME (NCCL_SOCKET_IFNAME on GPUs)"), run.stderr[-3000:]


def test_torchruns_failure_summary_shows_the_error_line(tiny_dir, tmp_path):
    """torchrun ends a failed run with a summary, the last lines of a multi-node job's log; for loraforge's errors
    it said "error_file: <N/A>" and "traceback : To enable traceback see: https://pytorch.org/..." (the bug), so
    the cause was only further up, among the other nodes' lines. The process hands its error line to the agent
    (TORCHELASTIC_ERROR_FILE) and the summary prints it."""
    (tmp_path / "c.yaml").write_text("{}\n")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1", "--master_port=29578",
                          "-m", "loraforge", "train", "c.yaml", *common(tiny_dir, tmp_path / "none.jsonl", 2),
                          f"output_dir={tmp_path / 'out'}"], cwd=tmp_path, capture_output=True, text=True,
                         env={**env, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert run.returncode == 1, run.stderr[-3000:]
    summary = run.stderr[run.stderr.index("Root Cause (first observed failure)"):]
    assert f"  traceback : error: no such file: {tmp_path / 'none.jsonl'}\n" in summary, summary
    assert "error_file: <N/A>" not in summary


def test_tasks_that_srun_started_without_torchrun_are_told_to_start_torchrun(tiny_dir, data_file, tmp_path):
    """srun --ntasks=2 python -m loraforge train: no torchrun, no RANK, so each task trained the whole run alone
    (node-local output_dirs: two runs; a shared one: the second refused as "another loraforge process (pid N)")
    (the bug). Each task stops before writing anything, naming the launch that joins them."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    (tmp_path / "c.yaml").write_text("{}\n")
    run = subprocess.run([sys.executable, "-m", "loraforge", "train", "c.yaml", *common(tiny_dir, data_file, 2),
                          f"output_dir={tmp_path / 'out'}"], cwd=tmp_path, capture_output=True, text=True,
                         env={**env, "SLURM_STEP_NUM_TASKS": "2", "SLURM_NTASKS": "2", "SLURM_PROCID": "1",
                              "OMP_NUM_THREADS": "1"}, timeout=300)
    assert run.returncode == 2 and error_line(run.stderr) == (
        "error: srun started 2 tasks (SLURM_STEP_NUM_TASKS=2), and each would train the whole run alone: loraforge "
        "joins processes under torchrun only; start one torchrun per node (srun --ntasks-per-node=1 torchrun "
        "--nnodes=$SLURM_NNODES --nproc_per_node=N --rdzv-backend=c10d --rdzv-endpoint=FIRST_NODE:29500 -m loraforge "
        "train CONFIG), or srun --ntasks=1 for one process"), run.stderr[-3000:]
    assert not (tmp_path / "out").exists()


def auto_as(compute: str, reason: str) -> str:
    """A process whose `precision: auto` decides `compute` (as a node without native bf16 would)."""
    return ("import sys; import loraforge.precision as P\n"
            f"P.auto_precision = lambda hw, probe: ({compute!r}, {reason!r})\n"
            "import runpy; runpy.run_module('loraforge', run_name='__main__', alter_sys=True)")


def test_processes_whose_auto_precision_differs_stop_naming_the_setting(tiny_dir, data_file, tmp_path):
    """precision auto decides bf16 on rank 0 and fp32 on rank 1 (a node without native bf16): both stop at once,
    naming training.precision, rather than waiting at their first collective until training.collective_timeout
    and blaming "another process" (the bug: 60 s here, then that message)."""
    args = [*common(tiny_dir, data_file, steps=2), "training.batch_size=4", "training.precision=auto",
            "training.collective_timeout=60", f"output_dir={tmp_path / 'out'}"]
    code = {0: auto_as("bf16", "native bf16"), 1: auto_as("fp32", "no native bf16 (AVX2)")}
    for rc, _, err in ranks(tmp_path, [args, args], 29565, code=code):
        assert rc == 2, err[-3000:]
        assert error_line(err) == (
            "error: the processes chose different precisions: compute bf16, base stored in bf16 on rank 0 (native "
            "bf16) and compute fp32, base stored in fp32 on rank 1 (no native bf16 (AVX2)); set training.precision "
            "(and model.dtype) explicitly, e.g. training.precision=fp32, so that every process runs the same")


def test_a_config_error_under_torchrun_is_printed_once_per_node(tiny_dir, data_file, tmp_path):
    """Every process of a node reads the same command line and files, so an invalid setting is said once (by local
    rank 0), not once per process (eight identical lines at 8 processes); every process exits 2."""
    args = [("lora.r=0" if item == "lora.r=4" else item) for item in common(tiny_dir, data_file, steps=2)]
    args.append(f"output_dir={tmp_path / 'out'}")  # (lora.r given once: a key given twice is warned about)
    (rc0, _, err0), (rc1, _, err1) = ranks(tmp_path, [args, args], 29566)
    assert rc0 == rc1 == 2, err0[-3000:] + err1[-3000:]
    assert err0 == "error: invalid config:\n  lora.r: must be a positive integer (at most 65536), got 0 (try 8)\n"
    assert "error" not in err1, err1


def test_too_few_examples_for_the_processes_names_them(tiny_dir, data_file):
    one = load_train_config(None, [*common(tiny_dir, data_file), "training.batch_size=1"])
    assert too_few_examples(one, [D.Example([1, 2], [-100, 2])], 1, 2) == (
        "1 training examples are fewer than one optimizer step needs (batch_size 1 × gradient_accumulation 1 × 2 "
        "processes); run fewer processes (torchrun --nproc_per_node; this run has 2) or add training examples")
    four = load_train_config(None, [*common(tiny_dir, data_file), "training.batch_size=4",
                                    "training.gradient_accumulation=2"])
    assert too_few_examples(four, [D.Example([1, 2], [-100, 2])] * 5, 1, 2) == (
        "5 training examples are fewer than one optimizer step needs (batch_size 4 × gradient_accumulation 2 × 2 "
        "processes); lower training.batch_size, lower training.gradient_accumulation, run fewer processes (torchrun "
        "--nproc_per_node; this run has 2) or add training examples")


def test_a_failed_collective_advises_resume_only_where_a_checkpoint_is():
    """A peer killed before the first save: the advice was --resume, which then said there is no checkpoint."""
    error = RuntimeError("[gloo] Connection reset by peer")
    head = ("rank 0: a collective with the other processes failed ([gloo] Connection reset by peer): another process "
            "stopped (its error is in its own output) or did not answer within training.collective_timeout=60 s; ")
    assert str(collective_error(0, 60, error, "training", saved=True)) == (
        head + "resume from the last checkpoint with --resume")
    assert str(collective_error(0, 60, error, "training", saved=False)) == (
        head + "no checkpoint was saved yet (training.save_every), so fix what stopped it and start the run again")
