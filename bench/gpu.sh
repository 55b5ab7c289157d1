#!/usr/bin/env bash
# GPU check + speed of the fused Triton kernel (qat.kernels.triton_linear) against bf16 torch.matmul,
# then the QAT step-time overhead (bench/gpu_qat_overhead.py) and MoE experts batched (bench/moe_experts.py).
# Needs only torch and triton (tested against torch 2.11 / triton 3.6); qat is used from this checkout.
# Usage: bash bench/gpu.sh [--quick] [--skip-every-config]   (~5-8 min on an H200: compiles + autotuning)
#        bash bench/gpu.sh --dry-run                          (CPU, TRITON_INTERPRET=1, tiny shapes)
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, \
'cuda', torch.cuda.is_available() and torch.cuda.get_device_name())"
command -v nvidia-smi >/dev/null \
  && nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader || true
status=0
python bench/gpu_kernels.py "$@" || status=$?
# QAT training-step overhead on the GPU (issue 8: at most 1.15x float); --dry-run runs it on CPU
python bench/gpu_qat_overhead.py $([[ " $* " == *" --dry-run "* ]] && echo --dry-run) || status=$?
# MoE experts one at a time against batched over experts (issue 31), the families' own widths
python bench/moe_experts.py $([[ " $* " == *" --dry-run "* ]] && echo --dry-run || echo --full) \
  || status=$?
exit $status
