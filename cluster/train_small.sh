#!/usr/bin/env bash
# The recipe of the shipped model (model/weights/pifuhd-small.safetensors): synthetic data, then the
# three stages, each starting from the previous stage's model (learning rate x0.1 at 80 %). The
# normal nets only feed the coarse level at inference (it trains on ground-truth normals), so
# their stage may run in any order; `package` takes every stage's parts from its own run.
# Any Ray address works: set ADDRESS=... to run on a cluster (and DATA/OUT to s3:// URIs).
# THREADS: torch threads per worker (2 uses both cores of a 2-core machine). STAGES: which to run.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-/work/data/synth-s7}
OUT=${OUT:-/work/data/runs}
NORMAL_STEPS=${NORMAL_STEPS:-700}
COARSE_STEPS=${COARSE_STEPS:-3000}
FINE_STEPS=${FINE_STEPS:-800}
STAGES=${STAGES:-"data normal coarse fine package"}
ADDRESS_ARGS=${ADDRESS:+--address $ADDRESS}
COMMON="--data $DATA --out $OUT --preset small --batch-size 4 --optimizer adam --lr 1e-3 --checkpoint-every 100 --validate-every 250 --threads ${THREADS:-2} $ADDRESS_ARGS"

for stage in $STAGES; do
    case $stage in
    data)
        [ -f "$DATA/dataset.json" ] || .venv/bin/pifuhd data synth --count 600 --views 4 --seed 7 --resolution 512 \
            --val-fraction 0.1 --test-fraction 0.1 --out "$DATA" $ADDRESS_ARGS ;;
    normal)
        .venv/bin/pifuhd train --stage normal --name small-normal --steps "$NORMAL_STEPS" \
            --lr-decay-steps $((NORMAL_STEPS * 4 / 5)) $COMMON ;;
    coarse)
        .venv/bin/pifuhd train --stage coarse --name small-coarse --init "$OUT/small-normal/model.safetensors" \
            --steps "$COARSE_STEPS" --lr-decay-steps $((COARSE_STEPS * 4 / 5)) $COMMON ;;
    fine)
        .venv/bin/pifuhd train --stage fine --name small-fine --init "$OUT/small-coarse/model.safetensors" \
            --steps "$FINE_STEPS" --lr-decay-steps $((FINE_STEPS * 4 / 5)) $COMMON ;;
    package)
        .venv/bin/pifuhd checkpoint package "$OUT/small-normal" "$OUT/small-coarse" "$OUT/small-fine" \
            -o model/weights/pifuhd-small.safetensors \
            --recipe "cluster/train_small.sh (NORMAL_STEPS=$NORMAL_STEPS COARSE_STEPS=$COARSE_STEPS FINE_STEPS=$FINE_STEPS, data seed 7)" ;;
    esac
done
