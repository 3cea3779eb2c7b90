#!/usr/bin/env bash
# FSDP smoke test for a 1-GPU CUDA machine without internet (about 2 minutes): a tiny Llama and a character-level
# tokenizer are built in code and saved to a temporary directory, then `torchrun --nproc_per_node=1 -m loraforge
# train ... training.distributed=fsdp` (nccl) trains it for a few steps, is killed mid-save, resumes, and a bf16 run
# checks the mixed-precision policy; on CUDA, QLoRA (NF4) under FSDP against QLoRA without it. One line per check: PASS/FAIL with its numbers; exit status 1 if any failed.
#
#   bash scripts/gpu_fsdp_smoke.sh              # CUDA, nccl
#   SMOKE_CPU=1 bash scripts/gpu_fsdp_smoke.sh  # the same on CPU with gloo (no GPU needed)
#   PYTHON=/path/to/python bash scripts/gpu_fsdp_smoke.sh
#
# Needs torch, transformers, safetensors, tokenizers, pyyaml (and matplotlib for the loss plot); not bitsandbytes.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
if [ "${SMOKE_CPU:-0}" = "1" ]; then export CUDA_VISIBLE_DEVICES=""; fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" PYTHONUNBUFFERED=1
exec timeout 600 "$PYTHON" - <<'EOF'
import json, os, subprocess, sys, tempfile, time
from pathlib import Path

import torch
from safetensors.torch import load_file

results = []


def check(name, ok, detail):
    results.append(ok)
    print(f"{'PASS' if ok else 'FAIL'} {name}: {detail}", flush=True)


cuda = torch.cuda.is_available()
check("environment", (not cuda) or torch.distributed.is_nccl_available(),
      f"torch {torch.__version__}, " + (f"{torch.cuda.get_device_name()} (nccl)" if cuda else "CPU (gloo)"))
tmp = Path(tempfile.mkdtemp(prefix="fsdp-smoke-"))


def build(path: Path) -> None:
    """A tiny random Llama (4 layers) and a character-level tokenizer, saved as a transformers directory."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<pad>", "<unk>", "<s>", "</s>"] + [chr(c) for c in range(32, 127)] + ["\n"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True, pad_token_id=0, bos_token_id=2, eos_token_id=3)
    LlamaForCausalLM(config).save_pretrained(path)
    fast.save_pretrained(path)


model_dir, data = tmp / "tiny", tmp / "train.jsonl"
build(model_dir)
data.write_text("".join(json.dumps({"instruction": f"Add {a} and {b}.", "input": "", "output": str(a + b)}) + "\n"
                        for a in range(8) for b in range(5)))
(tmp / "c.yaml").write_text("{}\n")
common = [f"model.name={model_dir}", f"data.train={data}", "data.eval_fraction=0", "lora.r=4", "lora.lora_dropout=0",
          "training.lr=1e-2", "training.max_steps=6", "training.save_every=2", "training.batch_size=8",
          "training.seed=3", "training.collective_timeout=60"]


def train(name, *extra, fsdp=True, env=None, resume=False):
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1", "--master_port=29571"] if fsdp
           else [sys.executable])
    cmd += ["-m", "loraforge", "train", str(tmp / "c.yaml"), *common, *extra, f"output_dir={tmp / name}"]
    cmd += ["training.distributed=fsdp"] if fsdp else []
    cmd += ["--resume"] if resume else []
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=240)
    return proc, time.perf_counter() - start


def adapter(name):
    return load_file(tmp / name / "adapter" / "adapter_model.safetensors")


def max_diff(a, b):
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a) if a.keys() == b.keys() else float("inf")


def losses(name):
    rows = [json.loads(x) for x in (tmp / name / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [r["loss"] for r in rows if "loss" in r]


def tail(proc):
    """The error a failed run printed (torchrun's own report after it says nothing about the cause)."""
    lines = proc.stderr.strip().splitlines()
    errors = [x for x in lines if ("Error" in x or "error:" in x) and "elastic" not in x and "error_file" not in x]
    return " | ".join(errors[-3:] or lines[-3:])[-900:]


ONLY = os.environ.get("SMOKE_ONLY", "")  # "qlora": only the QLoRA checks
if ONLY != "qlora":
    # 1. FSDP (1 process, fp32) against the same run without FSDP: the same adapter
    fsdp, s1 = train("fsdp", "training.precision=fp32")
    plain, s2 = train("plain", "training.precision=fp32", fsdp=False)
    if fsdp.returncode == 0 and plain.returncode == 0:
        d, curve = max_diff(adapter("fsdp"), adapter("plain")), losses("fsdp")
        check("fsdp fp32 = one process without fsdp", d < 1e-5,
              f"max |adapter difference| {d:.2e} (tolerance 1e-5), loss {curve[0]:.4f} -> {curve[-1]:.4f}, "
              f"{s1:.0f} s / {s2:.0f} s")
        files = sorted(p.name for p in (tmp / "fsdp" / "checkpoints" / "step-0000006").iterdir())
        check("sharded checkpoint", "__0_0.distcp" in files and "manifest.json" in files, ", ".join(files))
    else:
        check("fsdp fp32 = one process without fsdp", False, f"fsdp rc {fsdp.returncode}: {tail(fsdp)}; "
              f"plain rc {plain.returncode}: {tail(plain)}")

    # 2. killed (SIGKILL) while writing the step-4 checkpoint, then --resume: the uninterrupted adapter
    crash, _ = train("cut", "training.precision=fp32", env={"LORAFORGE_TEST_CRASH_IN_SAVE": "4:0"})
    ckpts = tmp / "cut" / "checkpoints"
    atomic = (ckpts / "step-0000002").is_dir() and not (ckpts / "step-0000004").exists()
    check("kill -9 mid-save leaves no checkpoint that resume would pick", crash.returncode != 0 and atomic,
          f"rc {crash.returncode}, complete: {sorted(p.name for p in ckpts.glob('step-*'))}")
    resumed, s3 = train("cut", "training.precision=fp32", resume=True)
    if resumed.returncode == 0 and (tmp / "fsdp" / "adapter").is_dir():
        d = max_diff(adapter("fsdp"), adapter("cut"))
        check("resume = uninterrupted", d < 1e-6 and "step 2/6" in resumed.stdout,
              f"max |adapter difference| {d:.2e} (tolerance 1e-6), resumed from step 2, {s3:.0f} s")
    else:
        check("resume = uninterrupted", False, f"rc {resumed.returncode}: {tail(resumed)}")

    # 3. the precision rule's choice (bf16 on GPUs >= sm_80): gathered in bf16, reduced in fp32, still learning
    bf16, s4 = train("bf16", "training.precision=auto", "training.max_steps=12")
    if bf16.returncode == 0:
        curve = losses("bf16")
        first = bf16.stdout.splitlines()[0] if bf16.stdout else ""
        ok = all(x == x and abs(x) != float("inf") for x in curve) and curve[-1] < curve[0]
        check("fsdp auto precision trains", ok, f"{first}; loss {curve[0]:.4f} -> {curve[-1]:.4f} over {len(curve)} "
              f"steps, {s4:.0f} s")
    else:
        check("fsdp auto precision trains", False, f"rc {bf16.returncode}: {tail(bf16)}")

# 4. QLoRA: the NF4 base quantized on the CPU, sharded as its packed bytes (held as fp32, bnb's quant_storage), its
#    statistics moved to the GPU, against the same QLoRA run without FSDP, which quantizes on the GPU: the same loss
#    curve; the adapters differ where the CPU's and the GPU's quantizers round a weight to different NF4 codes, which
#    Adam's first steps amplify (measured on an H200: 4.5e-3 after 6 steps at lr 1e-2, final losses equal to 4 digits)
if cuda:
    q_fsdp, s5 = train("qlora-fsdp", "training.precision=fp32", "model.quantization=nf4")
    q_plain, s6 = train("qlora-plain", "training.precision=fp32", "model.quantization=nf4", fsdp=False)
    if q_fsdp.returncode == 0 and q_plain.returncode == 0:
        d, curve, ref = max_diff(adapter("qlora-fsdp"), adapter("qlora-plain")), losses("qlora-fsdp"), losses("qlora-plain")
        gap = max(abs(a - b) / abs(b) for a, b in zip(curve, ref))
        check("qlora nf4 fsdp = qlora without fsdp", gap < 1e-3 and d < 2e-2,
              f"losses within {gap:.1e} relative (tolerance 1e-3), max |adapter difference| {d:.2e} (tolerance 2e-2), "
              f"loss {curve[0]:.4f} -> {curve[-1]:.4f} / {ref[0]:.4f} -> {ref[-1]:.4f}, {s5:.0f} s / {s6:.0f} s")
    else:
        check("qlora nf4 fsdp = qlora without fsdp", False, f"fsdp rc {q_fsdp.returncode}: {tail(q_fsdp)}; "
              f"plain rc {q_plain.returncode}: {tail(q_plain)}")
    q_bf16, s7 = train("qlora-bf16", "training.precision=auto", "model.quantization=nf4", "training.max_steps=12")
    curve = losses("qlora-bf16") if q_bf16.returncode == 0 else []
    check("qlora nf4 fsdp bf16 trains", bool(curve) and all(x == x for x in curve) and curve[-1] < curve[0],
          f"loss {curve[0]:.4f} -> {curve[-1]:.4f}, {s7:.0f} s" if curve else f"rc {q_bf16.returncode}: {tail(q_bf16)}")

print(f"{sum(results)}/{len(results)} checks passed (files in {tmp})")
sys.exit(0 if all(results) else 1)
EOF
