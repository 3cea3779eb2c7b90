#!/usr/bin/env bash
# What bench/gpu.sh needs on a CUDA machine without internet, gathered on one with it: the wheels that machine's
# Python lacks (WHEELS_DIR) and the built-in model's config and tokenizer (TOKENIZER_DIR; bench/synthetic.py gives
# the model random weights of its shape there). Made for a machine whose image has torch, numpy, tokenizers,
# huggingface_hub (1.31+), safetensors, pyyaml, tqdm, matplotlib, pyarrow, httpx, anyio and pytest, as the GPU
# machines this project was lent have; the wheels are for its Python (PY_VERSION, default 3.12), x86-64 Linux.
#
#   bash bench/gpu_wheels.sh [WHEELS_DIR] [TOKENIZER_DIR]      # defaults: .gpu/whl .gpu/smollm2
#   bash bench/gpu.sh .gpu/whl .gpu/smollm2                     # then, on the GPU machine
#
# bitsandbytes' wheel carries kernels for every CUDA, ROCm and XPU release (43 MB); only CUDA 12.8+ and 13 (and the
# CPU's) are kept: the two folders come to about 37 MB.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=${1:-.gpu/whl}
TOKDIR=${2:-.gpu/smollm2}
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
mkdir -p "$WHEELS" "$TOKDIR"
PACKAGES=(transformers==5.24.0 gguf==0.19.0 bitsandbytes==0.50.2 peft==0.21.2
          fastapi==0.165.0 starlette==1.10.0 annotated-types typing-inspection opentelemetry-api
          pydantic==2.14.4 pydantic-core==2.50.5 typing-extensions uvicorn==0.55.0
          openai==3.60.0 distro jiter==0.19.0 sniffio httpx2==2.16.2 httpcore2==2.16.2 truststore idna
          pytest-xdist execnet  # gpu.sh's suite step runs in 12 processes
          accelerate==1.16.0 psutil==7.2.2)  # peft imports them; a bare CUDA image may lack them
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "${PY_VERSION:-3.12}" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d "$WHEELS" "${PACKAGES[@]}"
for whl in "$WHEELS"/bitsandbytes-*.whl; do
  zip -q -d "$whl" 'bitsandbytes/libbitsandbytes_cuda11*' 'bitsandbytes/libbitsandbytes_cuda12[0-6]*' \
    'bitsandbytes/libbitsandbytes_rocm*' 'bitsandbytes/libbitsandbytes_xpu*' > /dev/null 2>&1 || true
done
"$PY" - "$TOKDIR" <<'PY'
import filecmp, shutil, sys
from pathlib import Path
from loraforge.models import load_tokenizer, resolve_model

src, out = Path(resolve_model("smollm2-135m")), Path(sys.argv[1])
names = [name for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                           "generation_config.json", "special_tokens_map.json") if (src / name).is_file()]
if other := [name for name in names if (out / name).exists() and not filecmp.cmp(src / name, out / name, False)]:
    sys.exit(f"error: TOKENIZER_DIR {out} holds another {', '.join(other)}; give a new folder (nothing was copied)")
for name in names:
    shutil.copy(src / name, out / name)
print(f"{out}: the built-in model's config and tokenizer ({len(load_tokenizer(str(out)))} tokens)")
PY
du -sh "$WHEELS" "$TOKDIR"
