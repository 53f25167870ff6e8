#!/usr/bin/env bash
# The CUDA path, checked on a machine with an NVIDIA GPU (CI has none; run it by hand there):
#   1. tests/test_device.py on cuda: training, gradients, scoring, generation, runs and interpretability
#      on cuda, against the same on CPU (tiny random models);
#   2. the benchmark on cuda, ours vs PEFT, on a model shaped like the default SmolLM2-135M
#      with random weights (timings are real; F1 is meaningless without trained weights).
#
# Usage: scripts/cuda_check.sh MODEL_DIR DATA_DIR [OUT_DIR]
#   MODEL_DIR  a model folder's config.json and tokenizer files (weights not needed), e.g. the
#              converted default model in ~/.cache/prefixlab/models/<name>
#   DATA_DIR   folder holding davidson_hate_offensive.csv (../shared/data)
set -euo pipefail
cd "$(dirname "$0")/.."
model_dir=$1 data_dir=$2 out=${3:-/tmp/prefixlab-cuda-check}
mkdir -p "$out"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1

python3 - <<'PY'
import torch, transformers
print("torch", torch.__version__, "transformers", transformers.__version__,
      "cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
PY

status=0  # a failing test still lets the benchmark run: one visit to the GPU shows both
python3 -m pytest -q -p no:cacheprovider tests/test_device.py 2>&1 | tee "$out/test_device.log" \
  || status=1

python3 - "$model_dir" "$out/random-model" <<'PY'
import shutil, sys
from pathlib import Path
import torch
from transformers import AutoConfig, AutoModelForCausalLM
src, dst = Path(sys.argv[1]), Path(sys.argv[2])
torch.manual_seed(0)
model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(src))
model.save_pretrained(dst)
for f in src.iterdir():
    if f.name.startswith(("tokenizer", "special_tokens", "chat_template", "generation")):
        shutil.copy(f, dst / f.name)
print("random-weight model:", dst, sum(p.numel() for p in model.parameters()) / 1e6, "M params")
PY

python3 -m prefixlab.bench.speed --device cuda --no-app --model "$out/random-model" \
  --data-dir "$data_dir" 2>&1 | tee "$out/bench_cuda.log" || status=1
exit $status
