#!/usr/bin/env bash
# The GPU checks in one go, on a CUDA machine (CI has none): the gpu-marked tests (bf16-mixed training,
# checkpoint and evaluation of every task), the MiT-B5 512x512 bf16 speed benchmark against the anchor,
# and the default `python -m mic_uda.train` on the GPU with its wall time.
#   bash scripts/gpu_check.sh [OUT_DIR]        (logs go to OUT_DIR, default ./gpu_check)
# ANCHOR=path/to/mic_step_anchor.py overrides ../shared/bench/mic_step_anchor.py.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-gpu_check}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
anchor=${ANCHOR:-../shared/bench/mic_step_anchor.py}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, lightning, timm, torchmetrics, torchvision, hydra, segmentation_models_pytorch as smp; \
print('torch', torch.__version__, 'lightning', lightning.__version__, 'timm', timm.__version__, \
'torchmetrics', torchmetrics.__version__, 'torchvision', torchvision.__version__, 'smp', smp.__version__)" \
  | tee -a "$out/gpu.txt"

echo "== gpu-marked tests"
timeout 240 python3 -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider 2>&1 | tee "$out/pytest_gpu.log"

echo "== bench: MiT-B5 512x512 bf16-mixed, batch 2+2"
timeout 180 python3 scripts/bench_step.py --anchor "$anchor" 2>&1 | tee "$out/bench_mit_b5_512_bf16.log"

echo "== default training (embedded synthetic pair, MIC, 1000 iterations) on the GPU"
start=$(date +%s)
timeout 200 python3 -m mic_uda.train trainer=gpu hydra.run.dir="${RUN_DIR:-$out/default_run}" '~callbacks.progress_bar' \
  +trainer.enable_progress_bar=false 2>&1 | tail -40 | tee "$out/default_train.log"
echo "default training wall: $(( $(date +%s) - start )) s" | tee -a "$out/default_train.log"
