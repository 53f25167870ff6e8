#!/usr/bin/env bash
# The CUDA path, checked in one go on a machine with an NVIDIA GPU (CI has none; it runs
# tests/test_device.py on the CPU instead). About 8 minutes on one GPU:
#   1. tests/test_device.py on cuda: training, gradients, scoring, greedy/sampled/beam
#      generation, mixed batches and the server's batcher, knockouts, inspection,
#      checkpoint/resume and data-parallel ranks (NCCL), against the same on CPU;
#   2. the speed benchmark (`--quick`), the serving benchmark and the generation benchmark
#      on cuda, on a model shaped like MODEL_DIR with random weights (timings are real;
#      F1 and BLEU are meaningless without trained weights);
#   3. a short run on that model and its knockout on 100 held-out rows, timed.
# Each step has a time limit; a failing step lets the others run (one visit to the GPU shows
# them all) and the script exits non-zero. Last, one summary line per figure.
#
# Usage: scripts/cuda_check.sh MODEL_DIR DATA_DIR [OUT_DIR]
#   MODEL_DIR  a model folder's config.json and tokenizer files (weights not needed), e.g. the
#              converted default model in ~/.cache/prefixlab/models/smollm2-135m-instruct
#   DATA_DIR   folder holding davidson_hate_offensive.csv and e2e_dev.csv (../shared/data)
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ $# -lt 2 ]]; then
  echo "usage: $0 MODEL_DIR DATA_DIR [OUT_DIR]" >&2
  exit 2
fi
model_dir=$1 data_dir=$2 out=${3:-/tmp/prefixlab-cuda-check}
for f in "$model_dir/config.json" "$data_dir/davidson_hate_offensive.csv" \
         "$data_dir/e2e_dev.csv"; do
  [[ -f $f ]] || { echo "error: $f not found" >&2; exit 2; }
done
mkdir -p "$out"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export PREFIXLAB_TEST_DEVICE=cuda PREFIXLAB_CACHE="$out/cache"

# No GPU, no check: say so at once rather than after minutes of CPU work.
python3 - <<'PY' | tee "$out/machine.txt"
import sys
import torch, transformers
if not torch.cuda.is_available():
    sys.exit(f"error: torch {torch.__version__} (CUDA build: {torch.version.cuda}) sees no "
             "CUDA device; run this on a machine with an NVIDIA GPU and a CUDA build of torch")
names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
print("torch", torch.__version__, "transformers", transformers.__version__,
      "gpus", torch.cuda.device_count(), "|", "; ".join(names))
PY

status=0
summary=()
step() {  # step NAME SECONDS COMMAND...: run it with a time limit, its log in $out/NAME.log
  local name=$1 limit=$2
  shift 2
  local start=$SECONDS
  echo "== $name (at most ${limit}s)"
  if timeout "$limit" "$@" > >(tee "$out/$name.log") 2>&1; then
    summary+=("$name: ok in $((SECONDS - start))s")
  else
    summary+=("$name: FAILED (exit $?) after $((SECONDS - start))s, see $out/$name.log")
    status=1
  fi
}
last_summary() {  # the tool's own machine-readable line, if it wrote one
  grep -h '^summary:' "$out/$1.log" 2>/dev/null | tail -1 || true
}

step device_tests 120 python3 -m pytest -q -p no:cacheprovider -m device tests/test_device.py

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
model="$out/random-model"

step bench 150 python3 -m prefixlab.bench.speed --device cuda --no-app --quick \
  --model "$model" --data-dir "$data_dir"
step bench_serve 90 python3 -m prefixlab.bench.serving --device cuda --model "$model" \
  --requests 256 --rounds 4
step bench_gen 90 python3 -m prefixlab.bench.generation --device cuda --model "$model" \
  --data-dir "$data_dir" --train-rows 200 --test-inputs 20 --speed-inputs 16

step train 60 python3 -m prefixlab train "$data_dir/davidson_hate_offensive.csv" \
  --text-column text --label-column label --model "$model" --device cuda \
  --output "$out/run" --max-steps 20 --batch-size 16 --prefix-length 10
step knockout 60 python3 -m prefixlab inspect "$out/run" --output "$out/inspection" \
  --knockout-rows 100

echo
echo "== summary ($(tail -1 "$out/machine.txt"))"
for line in "${summary[@]}"; do echo "$line"; done
echo "device tests: $(grep -hE '[0-9]+ (passed|failed)' "$out/device_tests.log" | tail -1)"
echo "bench (speed, cuda): $(last_summary bench)"
echo "bench_serve (cuda): $(last_summary bench_serve)"
echo "bench_gen (cuda): $(last_summary bench_gen)"
echo "knockout, 100 rows (cuda): ${summary[-1]#knockout: }"
exit $status
