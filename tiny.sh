#!/usr/bin/env bash
# Your own tiny YONOS-SR in about 15 minutes on a 2-core laptop CPU (README, "Your first hour"):
#   tiny VAE -> x2 teacher -> x4 plain and x4 scale-distilled -> decoder fine-tune -> evaluation (1..16 steps) -> plots
# Everything goes to RUN (default runs/tiny); assets/ and results/ are never touched.
#   bash tiny.sh [RUN]          SEED=1 bash tiny.sh runs/tiny_s1        (make tiny = bash tiny.sh runs/tiny)
# The step counts below are the recipe; the environment can shrink them (the test suite runs it with a few steps).
set -euo pipefail
cd "$(dirname "$0")"
PY=${PY:-.venv/bin/python}
RUN=${1:-runs/tiny}
SEED=${SEED:-0}
DATA=${DATA:-photos/train}
VAL=${VAL:-photos/val}
VAE_STEPS=${VAE_STEPS:-700}
SR_STEPS=${SR_STEPS:-800}
DEC_STEPS=${DEC_STEPS:-400}
EVAL_STEPS=${EVAL_STEPS:-1,2,4,8,16}
EVAL_CROP=${EVAL_CROP:-128}
mkdir -p "$RUN"
if [ ! -d "$DATA" ]; then
  echo "no $DATA: making the photo corpus first (python data.py --export-photos photos)"
  $PY data.py --export-photos photos
fi
T="$PY train.py --config tiny --data $DATA --val-data $VAL --crop 32 --lr-schedule cosine --seed $SEED --quiet --overwrite"
start=$(date +%s)
stage() { echo "[$(( $(date +%s) - start ))s] $*"; }

stage "1/6 tiny VAE ($VAE_STEPS steps)"
$T --stage vae --batch-size 16 --steps "$VAE_STEPS" --lr 3e-4 --val-every "$VAE_STEPS" --threads 2 --out "$RUN/vae.pt"
stage "2/6 x2 teacher, plain SR objective ($SR_STEPS steps)"
$T --scale 2 --vae "$RUN/vae.pt" --steps "$SR_STEPS" --threads 2 --out "$RUN/x2.pt"
stage "3/6 x4 plain and x4 distilled from x2, side by side, one thread each ($SR_STEPS steps)"
$T --scale 4 --vae "$RUN/vae.pt" --steps "$SR_STEPS" --threads 1 --out "$RUN/x4_plain.pt" &
$T --scale 4 --teacher "$RUN/x2.pt" --steps "$SR_STEPS" --threads 1 --out "$RUN/x4.pt" &
wait
stage "4/6 decoder fine-tune on the distilled x4 ($DEC_STEPS steps)"
$T --stage decoder --unet "$RUN/x4.pt" --steps "$DEC_STEPS" --lr 1e-4 --threads 2 --out "$RUN/x4_dec.pt"
stage "5/6 evaluation: DDIM steps $EVAL_STEPS on $VAL (${EVAL_CROP}px centre crops, raw output)"
$PY eval.py "$RUN/x4_plain.pt" "$RUN/x4.pt" "$RUN/x4_dec.pt" --data "$VAL" --crop "$EVAL_CROP" --steps "$EVAL_STEPS" \
  --no-color-fix --threads 2 --out "$RUN/eval" > "$RUN/eval.txt"
sed -n '/^| model | scale | steps | seeds/,/^$/p' "$RUN/eval.txt"   # the summary table
stage "6/6 training curves"
$PY curves.py "$RUN"/x2.pt.log.jsonl "$RUN"/x4_plain.pt.log.jsonl "$RUN"/x4.pt.log.jsonl "$RUN"/x4_dec.pt.log.jsonl \
  --out "$RUN/curves.png"
stage "done: $RUN/eval.txt, $RUN/eval.png (quality vs steps), $RUN/curves.png; total $(( $(date +%s) - start )) s"
