#!/usr/bin/env bash
# The GPU check (issue 12, part 5): kft's defaults on one NVIDIA GPU, no network, < 5 minutes.
#
#   tools/gpu_check.sh                  # ResNet50, 224 px, batch 64: gpu_check.json + gpu_check.md
#   tools/gpu_check.sh --smoke          # tiny sizes on any device, CPU included (seconds to a minute)
#   tools/gpu_check.sh --backbones=EfficientNetB0 --out=/tmp/effnet.json
#
# In one run, on synthetic uint8 batches and weights=None (nothing downloaded): the XLA train
# step with every augmentation op lowered to HLO (each op found there, no host transfer),
# --mixed_precision=auto's choice against float32 (and bfloat16 against float16),
# --jit_compile=auto's choice against the other setting, kft's step against the plain Keras
# baseline; ratios as JSON and a markdown table for BENCHMARKS.md. Exit status: 0 ok,
# 1 augmentation not all on the device, 2 no GPU found (without --smoke).
set -euo pipefail
cd "$(dirname "$0")/.."
exec python tools/bench.py --gpu "$@"
