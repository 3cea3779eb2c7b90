#!/usr/bin/env bash
# The GPU checks in one run (one H100/H200, no internet; each step under the time limit it is given below, a
# failed or slow step does not stop the next): the CUDA tests, bench/train.py in bf16 on the built-in model's shape
# (demo, chat and packed-text data) and on a ~1.1B Llama, QLoRA NF4 steps, bench/serve.py with the engine on the
# GPU; with GPU_STEPS=all also the fast suite on a machine with CUDA (training tests then run on the GPU) and the
# FSDP smoke run; then one table of it all (bench/gpu_summary.py).
#
#   bash bench/gpu.sh [WHEELS_DIR] [TOKENIZER_DIR]      # issue 17's set: ~8 min on an H200 (estimate)
#   GPU_STEPS=all bash bench/gpu.sh ...                  # + suite, 1.1B demo rows, compile, FSDP (+12 min)
#   GPU_STEPS="cuda-tests serve" bash bench/gpu.sh ...   # only the steps named
#
# The default steps' limits add up to 565 s, with setup (wheels, the stand-in models, imports) on top: where one
# command may run only 10 minutes, run it as two, GPU_STEPS="cuda-tests train-135m" and then GPU_STEPS="train-1b-text
# qlora serve" (the same $OUT: every step's log stays there, and the second table holds both calls' bench rows).
#
# Each step's limit comes from an H200 run (stop 52): a bench/train.py worker there spends ~15 s starting (imports,
# CUDA, the model) before its steps, a bench/qlora.py run ~25 s, so the limits are counted in workers.
# WHEELS_DIR: wheels of what the GPU machine lacks (bitsandbytes, fastapi, uvicorn, openai, ...), installed with
# --no-index into /tmp/site; bench/gpu_wheels.sh gathers them and TOKENIZER_DIR on a machine with internet.
# TOKENIZER_DIR: the built-in model's config and tokenizer files; its weights are
# replaced by random ones of the same shape (bench/synthetic.py), as speed does not depend on their values.
# Writes every log under $OUT (or ./gpu-out) and prints one summary table at the end.
set -u
cd "$(dirname "$0")/.."
WHEELS=${1:-.gpu/whl}
TOKDIR=${2:-.gpu/smollm2}
OUT=${OUT:-gpu-out}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 LORAFORGE_CACHE=/tmp/lf-cache
PY=${PYTHON:-python3}
SUMMARY=()
DEFAULT="cuda-tests train-135m train-1b-text qlora serve"  # train-1b (demo rows): GPU_STEPS=all or named
ONLY=${GPU_STEPS:-$DEFAULT}  # the steps to run; "all": every step
[ "$ONLY" = all ] && ONLY=""
step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to $OUT/NAME.log, remember PASS/FAIL
  local name=$1 limit=$2; shift 2
  if [ -n "$ONLY" ] && [[ " $ONLY " != *" $name "* ]]; then return; fi
  local t0=$SECONDS
  echo "=== $name (limit ${limit}s): $*"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  tail -n 25 "$OUT/$name.log"
  local verdict; verdict=$([ $rc = 0 ] && echo PASS || echo FAIL)
  SUMMARY+=("$(printf '%-14s %-5s %4ds  rc=%s' "$name" "$verdict" $((SECONDS - t0)) $rc)")
}

if ! $PY -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" > /dev/null 2>&1; then
  echo "bench/gpu.sh: torch ($PY) sees no CUDA GPU here; run it on a GPU machine (on a CPU: python bench/train.py," \
       "bench/qlora.py and bench/serve.py)" >&2
  exit 2
fi
mkdir -p "$OUT"
if [ -d "$WHEELS" ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl \
    > "$OUT/pip.log" 2>&1 || { echo "wheel install failed"; tail "$OUT/pip.log"; }
  export PYTHONPATH=/tmp/site
fi
SITE=$(PYTHONPATH=$PWD:${PYTHONPATH:-} $PY bench/synthetic.py --builtin "$TOKDIR" --site /tmp/standin \
  2>"$OUT/standin.log" | tail -1)
export PYTHONPATH=$PWD:$SITE:${PYTHONPATH:-}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
$PY -c "import torch, transformers, peft
print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
$PY -c "from loraforge.precision import choose, detect; print(choose('auto', 'auto', detect('cuda'), 'cuda').line())"

step cuda-tests 75 $PY -m pytest -q -p no:cacheprovider -m cuda tests/test_cuda.py
# the fast suite in 12 processes (pytest-xdist: bench/gpu_wheels.sh gathers it; the GPU image lacks it, and pytest
# refused -n with a usage error): where it is missing, the step fails saying so rather than running out its limit
if $PY -c "import xdist" > /dev/null 2>&1; then
  step suite 150 $PY -m pytest -q -p no:cacheprovider -n 12 -m "not slow and not cuda" tests
else
  step suite 10 sh -c 'echo "pytest-xdist is not installed for $0: the suite runs in 12 processes to fit its limit;" \
    "install it (bench/gpu_wheels.sh gathers its wheel)"; exit 1' "$PY"
fi
# the built-in model's shape on the bench's three data shapes (demo, chat, packed text: 4 rows of 512), 6 workers
# (~31 s each on the H200's host with these steps);
# the shared prefix (lf-prefix) is off on GPUs by default: stop 52 measured it slower there (2093 against 3849 tok/s)
step train-135m 200 $PY bench/train.py --dtypes auto --batch 16 --steps 6 --warmup 2 --rounds 1 \
  --variants peft,lf --json "$OUT/train-135m.json"
{ [ -z "$ONLY" ] || [[ " $ONLY " == *" train-1b"* ]]; } && [ ! -d /tmp/llama-1b ] && \
$PY bench/synthetic.py --shape 1b --tokenizer "$TOKDIR" --out /tmp/llama-1b > "$OUT/synth-1b.log" 2>&1
step train-1b 80 $PY bench/train.py --model /tmp/llama-1b --dtypes auto --batch 16 --steps 6 --warmup 2 --rounds 1 \
  --variants peft,lf --json "$OUT/train-1b.json"
# the same 1.1B on packed text, 16 rows of 512 a step (--text-rows; --batch counts demo and chat examples only):
# 8,192 tokens a step, enough work to keep the GPU busy
step train-1b-text 110 $PY bench/train.py --model /tmp/llama-1b --shapes text --text-rows 16 --dtypes auto \
  --steps 6 --warmup 2 --rounds 1 --variants peft,lf --json "$OUT/train-1b-text.json"
# LoRA and QLoRA in the precision the rule picks on a GPU (bf16); bench/qlora.py alone also runs the fp32 ones
step qlora 90 $PY bench/qlora.py --steps 6 --runs lora-bf16 qlora-bf16 --json "$OUT/qlora.json"
step serve 90 $PY bench/serve.py --device cuda --clients 32 --adapters 1,16 --max-tokens 16 --repeats 1
# training.compile on chat rows (GPU_STEPS=all or named): does compiling lift the CPU-side bound the eager step has
# on a GPU (stop 52: ~10k dispatched ops a step for loraforge, ~15k for PEFT, at ~2,100 tokens a step)?
step train-compile 300 $PY bench/train.py --shapes chat --dtypes auto --batch 16 --steps 6 --warmup 3 --rounds 1 \
  --variants peft,lf,lf-compile --json "$OUT/train-compile.json"
if [ -f scripts/gpu_fsdp_smoke.sh ]; then step fsdp 240 bash scripts/gpu_fsdp_smoke.sh; fi

echo; echo "=== summary"
printf '%s\n' "${SUMMARY[@]}" > "$OUT/summary.txt"
echo "all steps: ${SECONDS}s (setup included)" | tee -a "$OUT/summary.txt"
$PY bench/gpu_summary.py "$OUT" | tee "$OUT/table.md"
