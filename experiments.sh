#!/usr/bin/env bash
# Everything in the README's "Results", from scratch: the shipped models and every study, with the commands that
# made them. Hours on a 2-core CPU; DEVICE=cuda runs the training on a GPU.
#   bash experiments.sh [RUN_DIR]                       all parts, into RUN_DIR (default runs) and results/
#   PARTS="study distill" bash experiments.sh           some parts: ship, study, distill, d3sr, results
# Parts (default: study distill d3sr results, about 2 hours on 2 cores; the README gives the time of each):
#   study    the tiny recipe (tiny.sh, README "Your first hour") once per training seed (SEEDS, default 0 1 2)
#   distill  the other distillations on each seed's tiny x4: progressive from the plain model; a conditional model
#            (--cond-drop) distilled by guided distillation, then progressively
#   d3sr     the tiny x4 distilled again with D3SR's diffusion discriminator (D3SR_SEEDS, default 0)
#   results  every evaluation on the held-out photos (photos/test) into results/, the figure, the example image
#   ship     opt-in, not yet run to the end: a larger chain (small presets) VAE -> x2 -> x4 -> x8 with a decoder
#            fine-tune for each, written in fp16 to assets/yonos_x{2,4,8}.pt (meant for a GPU; not timed here)
set -euo pipefail
cd "$(dirname "$0")"
PY=${PY:-.venv/bin/python}
RUN=${1:-runs}
DEVICE=${DEVICE:-auto}
PARTS=${PARTS:-study distill d3sr results}
SEEDS=${SEEDS:-0 1 2}
[ -d photos/train ] || $PY data.py --export-photos photos
mkdir -p "$RUN" results
start=$(date +%s)
stamp() { echo "[$(( $(date +%s) - start ))s] $*"; }
has() { [[ " $PARTS " == *" $1 "* ]]; }
T="$PY train.py --data photos/train --val-data photos/val --device $DEVICE --quiet --overwrite --lr-schedule cosine"

if has ship; then
  S="$RUN/ship"
  mkdir -p "$S"
  C="--config small --crop 64 --batch-size 8 --val-every 1000 --save-every 500 --log-every 50"
  $T --stage vae --config small --crop 32 --batch-size 16 --steps 16000 --lr 3e-4 --val-every 2000 --save-every 1000 \
    --log-every 50 --threads 2 --out "$S/vae.pt"
  stamp "ship: VAE"
  $T $C --scale 2 --vae "$S/vae.pt" --steps 6000 --lr 5e-4 --warmup 200 --threads 2 --out "$S/x2.pt"
  stamp "ship: x2"
  $T $C --scale 4 --teacher "$S/x2.pt" --steps 6000 --lr 5e-4 --warmup 200 --threads 1 --out "$S/x4.pt" &
  $T $C --stage decoder --unet "$S/x2.pt" --steps 4000 --lr 2e-4 --warmup 100 --threads 1 --out "$S/x2_dec.pt" &
  wait
  stamp "ship: x4 distilled from x2, x2 decoder"
  $T $C --scale 8 --teacher "$S/x4.pt" --steps 6000 --lr 5e-4 --warmup 200 --threads 1 --out "$S/x8.pt" &
  $T $C --stage decoder --unet "$S/x4.pt" --steps 4000 --lr 2e-4 --warmup 100 --threads 1 --out "$S/x4_dec.pt" &
  wait
  $T $C --stage decoder --unet "$S/x8.pt" --steps 4000 --lr 2e-4 --warmup 100 --threads 2 --out "$S/x8_dec.pt"
  stamp "ship: x8 distilled from x4, x4 and x8 decoders"
  for s in 2 4 8; do
    $PY -c "import sys, torch; from yonos import YonosSR; YonosSR.load(sys.argv[1]).save(sys.argv[2], torch.float16)" \
      "$S/x${s}_dec.pt" "assets/yonos_x$s.pt"
  done
fi

# the training runs below go two at a time, one thread each (slot waits for a free one; a failure stops the script)
slot() { while [ "$(jobs -rp | wc -l)" -ge 2 ]; do wait -n; done; }
drain() { while [ -n "$(jobs -rp)" ]; do wait -n; done; }

if has study; then
  for seed in $SEEDS; do   # the 15-minute recipe of README "Your first hour", once per training seed
    R="$RUN/tiny_s$seed"
    [ -f "$R/eval.json" ] || SEED=$seed PY=$PY bash tiny.sh "$R"   # a finished tiny.sh run of this seed is kept
    stamp "study: seed $seed (tiny chain: VAE, x2, x4 plain, x4 distilled, decoder)"
  done
fi

Tt() { local seed=$1; shift; $T --config tiny --crop 32 --seed "$seed" --threads 1 "$@"; }
# the budgets, in training steps counted from the VAE on (distillation steps also cost teacher forward passes):
#   plain x4 800, and 1600 (the scale-distilled model's budget); scale distillation x2 800 + x4 800; progressive from the plain x4: 800 + 3 rounds
#   of 200 (8 -> 4 -> 2 -> 1 steps); guided: its own conditional x4 (--cond-drop 0.1) 800 + the w-student 300 + 3 x 200
guided_chain() {
  local seed=$1 R="$RUN/tiny_s$1"
  Tt "$seed" --scale 4 --vae "$R/vae.pt" --steps 800 --cond-drop 0.1 --out "$R/x4_cfg.pt"
  Tt "$seed" --stage guided --teacher "$R/x4_cfg.pt" --w-max 4 --steps 300 --out "$R/x4_guided.pt"
  Tt "$seed" --stage steps --teacher "$R/x4_guided.pt" --teacher-steps 8 --steps 200 --out "$R/x4_guided_4steps.pt"
  Tt "$seed" --stage steps --teacher "$R/x4_guided_4steps.pt" --steps 200 --out "$R/x4_guided_2steps.pt"
  Tt "$seed" --stage steps --teacher "$R/x4_guided_2steps.pt" --steps 200 --out "$R/x4_guided_1steps.pt"
  stamp "distill: guided + progressive, seed $seed"
}
progressive_chain() {
  local seed=$1 R="$RUN/tiny_s$1"
  Tt "$seed" --stage steps --teacher "$R/x4_plain.pt" --teacher-steps 8 --steps 200 --out "$R/x4_plain_4steps.pt"
  Tt "$seed" --stage steps --teacher "$R/x4_plain_4steps.pt" --steps 200 --out "$R/x4_plain_2steps.pt"
  Tt "$seed" --stage steps --teacher "$R/x4_plain_2steps.pt" --steps 200 --out "$R/x4_plain_1steps.pt"
  stamp "distill: progressive from plain, seed $seed"
}
plain_long() {  # the plain x4 given the budget of the distilled one (x2 800 + x4 800 steps)
  local seed=$1 R="$RUN/tiny_s$1"
  Tt "$seed" --scale 4 --vae "$R/vae.pt" --steps 1600 --out "$R/x4_plain_1600.pt"
  stamp "distill: plain x4 for 1600 steps, seed $seed"
}
d3sr() {  # the tiny x4 distilled again, with D3SR's diffusion discriminator from step 300 on
  local seed=$1 R="$RUN/tiny_s$1"
  Tt "$seed" --scale 4 --teacher "$R/x2.pt" --steps 800 --adv-weight 0.05 --adv-start 300 --out "$R/x4_adv.pt"
  stamp "d3sr: seed $seed"
}
if has distill; then
  for seed in $SEEDS; do slot; guided_chain "$seed" & done
fi
if has d3sr; then
  for seed in ${D3SR_SEEDS:-0}; do slot; d3sr "$seed" & done
fi
if has distill; then
  for seed in $SEEDS; do slot; progressive_chain "$seed" & done
  for seed in $SEEDS; do slot; plain_long "$seed" & done
fi
drain

if has results; then
  E="$PY eval.py --data photos/test --threads 2"
  shipped=$(ls assets/yonos_x[248].pt)   # the shipped files there are (x4 always)
  $E $shipped --crop 256 --out results/shipped > results/shipped.txt   # 256-px centre crops of the 14 photos
  $E $shipped --crop 256 --no-color-fix --out results/shipped_raw > results/shipped_raw.txt
  $E $shipped --figure assets/figure.png
  # the example of make sample: a held-out photo (photos/test, which no recipe choice looked at), x4 bicubic LR of a crop
  $PY -c "from eval import prepare; from PIL import Image; hr, lr = prepare('photos/test/EveningGlow.png', 4); \
lr.crop((110, 75, 270, 181)).save('assets/example.png')"
  $PY sample.py assets/example.png --out assets/example_x4.png --force
  if [ -f "$RUN/ship/x8.pt" ]; then
    $E "$RUN/ship/x2.pt" "$RUN/ship/x4.pt" "$RUN/ship/x8.pt" --no-color-fix --out results/ship_no_decoder \
      > results/ship_no_decoder.txt
  fi
  stamp "results: shipped models"
  runs() { for seed in $SEEDS; do for m in "$@"; do echo "$RUN/tiny_s$seed/$m"; done; done; }
  Es="$E --crop 128 --no-color-fix"   # 128-px centre crops of the 14 held-out photos, raw model output
  $Es $(runs x4_plain.pt x4.pt) --steps 1,2,4,8 --out results/study_x4 > results/study_x4.txt
  if [ -f "$RUN/tiny_s0/x4_plain_1600.pt" ]; then
    $Es $(runs x4_plain_1600.pt) --steps 1,2,4,8 --out results/study_x4_plain_1600 > results/study_x4_plain_1600.txt
  fi
  $Es $(runs x4.pt x4_dec.pt) --out results/study_decoder > results/study_decoder.txt
  stamp "results: study"
  if [ -f "$RUN/tiny_s0/x4_guided_1steps.pt" ]; then
    $Es $(runs x4_guided.pt) --steps 1,2,4,8 --out results/distill_guided > results/distill_guided.txt
    for n in 1 2 4; do
      $Es $(runs x4_plain_${n}steps.pt x4_guided_${n}steps.pt) --steps $n --out results/distill_$n > results/distill_$n.txt
    done
    for w in 0 1 2 4; do
      $Es $(runs x4_cfg.pt) --guidance $w --steps 1 --out results/guidance_w$w > results/guidance_w$w.txt
    done
    $PY study.py results/guidance_w*.json --guidance-plot results/guidance.png > results/guidance.txt
  fi
  if [ -f "$RUN/tiny_s0/x4_adv.pt" ]; then
    $Es "$RUN/tiny_s0/x4.pt" "$RUN/tiny_s0/x4_adv.pt" --out results/d3sr > results/d3sr.txt
    $E "$RUN/tiny_s0/x4.pt" "$RUN/tiny_s0/x4_adv.pt" --no-color-fix --figure results/d3sr_figure.png
  fi
  stamp "results: all"
fi
