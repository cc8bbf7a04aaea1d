#!/usr/bin/env bash
# The recipe of the shipped model (model/weights/pifuhd-small.safetensors): synthetic data, then the
# three stages, each starting from the previous stage's model (learning rate x0.1 near the end).
# `package` takes every stage's parts from its own run.
#
# Two generations of the shipped model:
#   v1: STAGES="data normal coarse fine package" with PIFu's sampling (16:1 near : uniform) and the
#       release's depth-feature scale, on 600 subjects (README, "Shipped model").
#   v2: the v1 model continued (INIT=the v1 file): the coarse level with its depth feature rescaled
#       to 5.12 z (function kept), trained on the v2 data (ray points, bodies) with predicted normals
#       and grey cut-outs; then the fine level. STAGES="data coarse fine package" INIT=v1.safetensors.
#   v3: the v2 model continued, in two arms of equal compute on the same data: coarse 500 steps (x0.1 at
#       400), then fine 120 (x0.1 at 100), both on predicted normals. BODY=1 trains the body-guided arm
#       (--body-guided: the coarse MLP also reads the body's distance and normal; true bodies, disturbed):
#       STAGES="coarse fine package" INIT=v2.safetensors COARSE_STEPS=500 FINE_STEPS=120 LR_DECAY=late BODY=1
#   v4: the v3 body arm continued with every training row in the body's depth frame (the body centred in
#       depth by its own box, as inference has a fitted one; pipelines.common.dataset.to_body_frame) and the
#       body-shift noise re-measured on the lifter's fits (4 cm in depth): coarse 400 (x0.1 at 320), fine
#       100 (x0.1 at 84): STAGES="coarse fine package" INIT=v3-body.safetensors COARSE_STEPS=400 FINE_STEPS=100
#       LR_DECAY=late FINE_DECAY=84 BODY=1
#   v5: v4 continued the same way at half the learning rate, another data order:
#       STAGES="coarse fine package" INIT=v4.safetensors COARSE_STEPS=400 FINE_STEPS=100 LR_DECAY=late
#       FINE_DECAY=84 LR=5e-4 SEED=1 BODY=1
#   v6: v5 continued likewise, INIT=v5.safetensors ... SEED=2.
#   v7: v6 continued likewise, INIT=v6.safetensors ... SEED=3.
#   v8: v7 continued, twice the steps: STAGES="coarse fine package calibrate" INIT=v7.safetensors
#       COARSE_STEPS=800 FINE_STEPS=200 LR_DECAY=late COARSE_DECAY=640 FINE_DECAY=168 LR=5e-4 SEED=4 BODY=1
#   v11 (not shipped; docs/model-card.md): v7 continued on the mix (MIX=1 SUBJECTS=200: garments, the
#       training statues with fitted bodies, procedural people): STAGES="data coarse fine package"
#       INIT=v7.safetensors COARSE_STEPS=400 FINE_STEPS=100 LR_DECAY=late FINE_DECAY=84 LR=5e-4 SEED=6 BODY=1
# `calibrate` stores the surface level chosen on the validation views (`pifuhd checkpoint calibrate`);
# `shard` writes the model again as a folder of float16 shards under 16 MiB each (SHARDS).
# From scratch, STAGES="data normal coarse fine package" trains all three with the v2 settings.
# Any Ray address works: set ADDRESS=... to run on a cluster (and DATA/OUT to s3:// URIs).
# THREADS: torch threads per worker (1 is faster than 2 on a 2-core machine that runs anything else).
# GPU=1: one GPU worker, samples decoded by Ray Data tasks on the other CPUs (cluster/train_gpu.sh).
# MODEL: where `package` writes the model and `calibrate` rewrites it (default: the shipped file).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-/work/data/synth-v2}
OUT=${OUT:-/work/data/runs-v2}
SUBJECTS=${SUBJECTS:-600}
# MIX=1: the data stage makes the mix of issue 31 instead: SUBJECTS people in MakeHuman's real garments
# (GARMENTS), the seven training statues (TRAIN_STATUES; the other four are the real validation set, never
# trained on) at 24 views each, and PROCEDURAL people in procedural garments, merged into DATA.
REAL=${REAL:-../shared/real}
GARMENTS=${GARMENTS:-$REAL/makehuman}
TRAIN_STATUES=${TRAIN_STATUES:-$(printf "$REAL/scans/%s.ply " athena bootlegeve marbleplayer nymph penelope shepherdboy ugolino)}
PROCEDURAL=${PROCEDURAL:-$((SUBJECTS * 3 / 8))}
NORMAL_STEPS=${NORMAL_STEPS:-700}
COARSE_STEPS=${COARSE_STEPS:-1200}
FINE_STEPS=${FINE_STEPS:-400}
STAGES=${STAGES:-"data normal coarse fine package"}
MODEL=${MODEL:-model/weights/pifuhd-small.safetensors}
SHARDS=${SHARDS:-$OUT/model-shards}
ADDRESS_ARGS=${ADDRESS:+--address $ADDRESS}
DEVICE_ARGS="--threads ${THREADS:-1}"
[ -n "${GPU:-}" ] && DEVICE_ARGS="--gpus --parallel-decode${THREADS:+ --threads $THREADS}"
BODY_ARGS=${BODY:+--body-guided}
# Decay at 5/6 of the coarse steps and 4/5 of the fine (v1, v2), or LR_DECAY=late: at 4/5 and 5/6 (v3).
# COARSE_DECAY / FINE_DECAY set the step directly.
if [ "${LR_DECAY:-}" = late ]; then COARSE_DECAY=${COARSE_DECAY:-$((COARSE_STEPS * 4 / 5))}; FINE_DECAY=${FINE_DECAY:-$((FINE_STEPS * 5 / 6))}
else COARSE_DECAY=${COARSE_DECAY:-$((COARSE_STEPS * 5 / 6))}; FINE_DECAY=${FINE_DECAY:-$((FINE_STEPS * 4 / 5))}; fi
COMMON="--data $DATA --out $OUT --preset small --batch-size ${BATCH:-4} --optimizer adam --lr ${LR:-1e-3} --seed ${SEED:-0} --checkpoint-every 100 --validate-every 200 $DEVICE_ARGS $ADDRESS_ARGS"
# The coarse stage starts from INIT when given (continuing a shipped model), else from the normal run.
COARSE_INIT=${INIT:-$OUT/v2-normal/model.safetensors}
RUNS=""

for stage in $STAGES; do
    SECONDS=0
    case $stage in
    data)
        if [ -n "${MIX:-}" ]; then  # real garments, the training statues and procedural people, merged
            [ -f "$DATA-garments/dataset.json" ] || .venv/bin/pifuhd data synth --count "$SUBJECTS" --garments "$GARMENTS" \
                --views 4 --seed 11 --resolution 512 --val-fraction 0.05 --test-fraction 0.05 --out "$DATA-garments" $ADDRESS_ARGS
            [ -f "$DATA-statues/dataset.json" ] || .venv/bin/pifuhd data scans $TRAIN_STATUES --views 24 --seed 3 --resolution 512 \
                --val-fraction 0 --test-fraction 0 --out "$DATA-statues" $ADDRESS_ARGS
            [ -f "$DATA-procedural/dataset.json" ] || .venv/bin/pifuhd data synth --count "$PROCEDURAL" --views 4 --seed 7 \
                --resolution 512 --val-fraction 0.05 --test-fraction 0.05 --out "$DATA-procedural" $ADDRESS_ARGS
            [ -f "$DATA/dataset.json" ] || .venv/bin/pifuhd data merge "$DATA-garments" "$DATA-statues" "$DATA-procedural" -o "$DATA"
        else
            [ -f "$DATA/dataset.json" ] || .venv/bin/pifuhd data synth --count "$SUBJECTS" --views 4 --seed 7 --resolution 512 \
                --val-fraction 0.1 --test-fraction 0.1 --out "$DATA" $ADDRESS_ARGS
        fi ;;
    normal)
        .venv/bin/pifuhd train --stage normal --name v2-normal --steps "$NORMAL_STEPS" \
            --lr-decay-steps $((NORMAL_STEPS * 4 / 5)) $COMMON
        RUNS="$RUNS $OUT/v2-normal" ;;
    coarse)
        .venv/bin/pifuhd train --stage coarse --name v2-coarse --init "$COARSE_INIT" --z-size 25 --predicted-normals \
            --steps "$COARSE_STEPS" --lr-decay-steps $COARSE_DECAY $BODY_ARGS $COMMON
        RUNS="$RUNS $OUT/v2-coarse" ;;
    fine)
        .venv/bin/pifuhd train --stage fine --name v2-fine --init "$OUT/v2-coarse/model.safetensors" --predicted-normals \
            --steps "$FINE_STEPS" --lr-decay-steps $FINE_DECAY $BODY_ARGS $COMMON
        RUNS="$RUNS $OUT/v2-fine" ;;
    package)
        .venv/bin/pifuhd checkpoint package ${RUNS:-$OUT/v2-coarse $OUT/v2-fine} \
            -o "$MODEL" \
            ${INIT:+--continued-from "$INIT"} \
            --recipe "cluster/train_small.sh (STAGES='$STAGES' INIT=${INIT:-none} COARSE_STEPS=$COARSE_STEPS FINE_STEPS=$FINE_STEPS LR_DECAY=${LR_DECAY:-} COARSE_DECAY=$COARSE_DECAY FINE_DECAY=$FINE_DECAY LR=${LR:-1e-3} SEED=${SEED:-0} BODY=${BODY:-} GPU=${GPU:-} BATCH=${BATCH:-4} MIX=${MIX:-}, data seed 7, $SUBJECTS subjects)" ;;
    calibrate)
        .venv/bin/pifuhd checkpoint calibrate "$MODEL" --data "$DATA" --limit "${CALIBRATION_VIEWS:-24}" \
            --levels 0.5 0.55 0.6 0.65 0.7 -o "$MODEL" ;;
    shard)
        .venv/bin/pifuhd checkpoint convert "$MODEL" "$SHARDS" --half --max-shard-mib 15 ;;
    esac
    echo "[train_small] $stage: ${SECONDS} s"
done
