#!/usr/bin/env bash
# The shipped model's recipe (cluster/train_small.sh, body-guided, from scratch) sized for one GPU
# and about ten minutes: the training mix (MIX=1: real garments, the training statues, procedural people;
# train_small.sh) made on the machine's CPUs, the normal, coarse and fine stages on
# the GPU (bf16 autocast, samples decoded by Ray Data tasks), the surface level calibrated, and the
# weights written as float16 shards under 16 MiB each ($OUT/model-shards, a checkpoint every
# command reads). Each stage prints its seconds. Not yet timed on a GPU (README, "Shipped model").
# Any of train_small.sh's settings can be given, e.g. DATA=/data/synth-v2 to reuse a dataset.
set -euo pipefail
cd "$(dirname "$0")/.."
export GPU=${GPU-1} BODY=${BODY-1} LR_DECAY=${LR_DECAY:-late} MIX=${MIX-1}
export DATA=${DATA:-out/gpu-recipe/data} OUT=${OUT:-out/gpu-recipe/runs}
export MODEL=${MODEL:-out/gpu-recipe/pifuhd-small.safetensors}
export SUBJECTS=${SUBJECTS:-300} BATCH=${BATCH:-8}
export NORMAL_STEPS=${NORMAL_STEPS:-500} COARSE_STEPS=${COARSE_STEPS:-1500} FINE_STEPS=${FINE_STEPS:-400}
export STAGES=${STAGES:-"data normal coarse fine package calibrate shard"}
exec cluster/train_small.sh
