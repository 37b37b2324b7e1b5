#!/usr/bin/env bash
# Everything in the README's "Results", from scratch: the shipped models and every study, with the commands that
# made them. Hours on a 2-core CPU; DEVICE=cuda runs the training on a GPU.
#   bash experiments.sh [RUN_DIR]                       all parts, into RUN_DIR (default runs) and results/
#   PARTS="ship chain" bash experiments.sh              some parts: ship, chain, study, distill, d3sr, fair, real,
#                                                       variance, guided, results
# Parts (default: all; the README gives the time each took here):
#   ship     the shipped models: the small presets' chain VAE -> x2 -> x4 -> x8 (scale distillation, 1,200, 1,200
#            and 2,000 steps) with a decoder fine-tune for each, written in fp16 to assets/yonos_x{2,4,8}.pt
#   chain    the study on the shipped recipe, shortened (CHAIN_STEPS, default 100 a stage), per training seed: x2,
#            x4 and x8 by scale distillation, and x4 and x8 by the plain objective given the same whole budget; and
#            once, at the shipped budget, x4 by the plain objective (2,400 steps: the shipped x2's plus x4's)
#   study    the tiny recipe (tiny.sh, README "Your first hour") once per training seed (SEEDS, default 0 1 2)
#   distill  the other distillations on each seed's tiny x4: progressive from the plain model; a conditional model
#            (--cond-drop) distilled by guided distillation, then progressively
#   d3sr     the tiny x4 distilled again with D3SR's diffusion discriminator (D3SR_SEEDS, default 0)
#   fair     the fair test of scale distillation (README "Scale distillation, measured fairly"): from the shipped x2
#            (a strong teacher), x4 by (a) scale distillation, (b) the plain objective from the same x2 weights, (c) the
#            plain objective from scratch; FAIR_STEPS (default 1,200) student steps each, per training seed, with
#            validation PSNR every 100 steps; then scored on the held-out photos at DDIM 1-64 (results/distill_fair.*)
#   real     the real-photo x4 (sample.py --real): x2 from the shipped x2 and x4 distilled from it, both on the photo
#            degradation chain (data.photo_chain, teacher and student LR from one draw), a decoder fine-tune, then
#            U-Net and decoder end to end (--with-unet), written to assets/yonos_x4_real.pt; scored with the clean x4
#            under eval.py's web protocol (results/real_x4.*)
#   variance where distillation can help: the two targets' distance and the two gradients' variance per timestep,
#            for the shipped x2 -> x4 and x4 -> x8 pairs (results/variance.*)
#   guided   why the guided student is poor at w = 0: a conditional x2 from the shipped x2, its guided student with
#            uniform w and with a quarter of the samples at w = 0, each scored by w (results/guided_w*.txt)
#   results  every evaluation on the held-out photos (photos/test) into results/, the figure, the example image
set -euo pipefail
cd "$(dirname "$0")"
PY=${PY:-.venv/bin/python}
RUN=${1:-runs}
DEVICE=${DEVICE:-auto}
PARTS=${PARTS:-ship chain study distill d3sr fair real variance guided results}
SEEDS=${SEEDS:-0 1 2}
[ -d photos/train ] || $PY data.py --export-photos photos
mkdir -p "$RUN" results
start=$(date +%s)
stamp() { echo "[$(( $(date +%s) - start ))s] $*"; }
has() { [[ " $PARTS " == *" $1 "* ]]; }
T="$PY train.py --data photos/train --val-data photos/val --device $DEVICE --quiet --overwrite --lr-schedule cosine"

ship_tile() { case $1 in 2|8) echo 64 ;; *) echo 32 ;; esac; }   # the tile (latent cells) each shipped file records
if has ship; then   # the shipped chain: small presets, one thread (README "The shipped models" gives the times)
  S="$RUN/ship"
  mkdir -p "$S"
  C="--config small --crop 64 --batch-size 8 --val-every 300 --save-every 100 --log-every 20 --threads 1"
  # the VAE starts as an exact space-to-channel rearrangement (VAEConfig.shortcut); a short run measures its scale
  $T --stage vae --config small --crop 32 --batch-size 16 --steps 100 --lr 1e-4 --warmup 10 --val-every 100 \
    --save-every 100 --log-every 10 --threads 1 --out "$S/vae.pt"
  stamp "ship: VAE"
  $T $C --scale 2 --vae "$S/vae.pt" --steps 1200 --out "$S/x2.pt"
  stamp "ship: x2"
  D="--lr 2e-4 --warmup 50"   # each decoder fine-tune runs beside the next distillation
  $T $C --stage decoder --unet "$S/x2.pt" $D --steps 400 --out "$S/x2_dec.pt" &
  $T $C --scale 4 --teacher "$S/x2.pt" --steps 1200 --out "$S/x4.pt"
  stamp "ship: x4 distilled from x2"
  $T $C --stage decoder --unet "$S/x4.pt" $D --steps 300 --out "$S/x4_dec.pt" &
  $T $C --scale 8 --teacher "$S/x4.pt" --steps 2000 --out "$S/x8.pt"
  stamp "ship: x8 distilled from x4"
  $T $C --stage decoder --unet "$S/x8.pt" $D --steps 300 --out "$S/x8_dec.pt"
  wait
  stamp "ship: decoders"
  # fp16 storage: half the size, the same output to within the colour fix's rounding. Each file records its tile
  # (meta.tile, sample.py's default): x2 and x8 twice their training crop, chosen on photos/val; x4 its training
  # crop's 32 cells, which keeps a 512-px photo within a minute on two cores (README, "Tiles and speed on a CPU")
  for s in 2 4 8; do
    $PY -c "import sys, torch; from yonos import YonosSR; m = YonosSR.load(sys.argv[1]); m.meta['tile'] = int(sys.argv[3]); \
m.save(sys.argv[2], torch.float16)" "$S/x${s}_dec.pt" "assets/yonos_x$s.pt" "$(ship_tile $s)"
  done
fi

if has chain; then   # the study on the shipped recipe (small presets), shortened: B steps a stage, per training seed
  B=${CHAIN_STEPS:-100}
  for seed in $SEEDS; do
    R="$RUN/small_s$seed"
    mkdir -p "$R"
    Ts="$T --config small --crop 64 --batch-size 8 --seed $seed --threads 1 --warmup 20 --val-every 10000 \
      --save-every $B --log-every 25"
    V="$RUN/ship/vae.pt"   # the shipped chain's VAE (an exact rearrangement at init; its 100 steps moved it little)
    $Ts --scale 2 --vae "$V" --steps "$B" --out "$R/x2.pt"
    $Ts --scale 4 --teacher "$R/x2.pt" --steps "$B" --out "$R/x4.pt"
    $Ts --scale 8 --teacher "$R/x4.pt" --steps "$B" --out "$R/x8.pt"
    # plain models given the distilled ones' whole budget: x4 = x2 + x4 steps, x8 = x2 + x4 + x8 steps
    $Ts --scale 4 --vae "$V" --steps $((2 * B)) --out "$R/x4_plain.pt"
    $Ts --scale 8 --vae "$V" --steps $((3 * B)) --out "$R/x8_plain.pt"
    stamp "chain: seed $seed (x2, x4 and x8 distilled, x4 and x8 plain)"
  done
  # the plain objective at the shipped x4's whole budget, against the shipped x4 before its decoder fine-tune
  $T --config small --crop 64 --batch-size 8 --val-every 600 --save-every 100 --log-every 20 --threads 1 --scale 4 \
    --vae "$RUN/ship/vae.pt" --steps 2400 --out "$RUN/ship/x4_plain.pt"
  stamp "chain: plain x4 at the shipped budget"
fi

# the training runs below go two at a time, one thread each (slot waits for a free one; a failure stops the script)
slot() { while [ "$(jobs -rp | wc -l)" -ge 2 ]; do wait -n; done; }
drain() { while [ -n "$(jobs -rp)" ]; do wait -n; done; }

if has fair; then   # the same student steps for each arm; the teacher exists already (the paper's setting)
  F="$RUN/fair"
  mkdir -p "$F"
  N=${FAIR_STEPS:-1200}
  # every arm decodes through one VAE: the shipped x2's (arms a and b inherit it with the x2's weights)
  $PY -c "import sys; from yonos import YonosSR; YonosSR.load(sys.argv[1]).vae.save(sys.argv[2])" \
    assets/yonos_x2.pt "$F/vae_x2.pt"
  Tf="$T --config small --crop 64 --batch-size 8 --threads 1 --val-every 100 --save-every 100 --log-every 20 --steps $N"
  for seed in $SEEDS; do
    mkdir -p "$F/s$seed"
    slot; $Tf --seed "$seed" --scale 4 --teacher assets/yonos_x2.pt --out "$F/s$seed/x4_distilled.pt" &
    slot; $Tf --seed "$seed" --scale 4 --init assets/yonos_x2.pt --out "$F/s$seed/x4_plain_from_x2.pt" &
    slot; $Tf --seed "$seed" --scale 4 --vae "$F/vae_x2.pt" --out "$F/s$seed/x4_plain_scratch.pt" &
  done
  drain
  stamp "fair: x4 (a) distilled, (b) plain from x2, (c) plain from scratch, seeds $SEEDS"
  Ef="$PY eval.py --threads 1"
  arms() { for seed in $SEEDS; do for a in x4_distilled x4_plain_from_x2 x4_plain_scratch; do echo "$F/s$seed/$a.pt"; done; done; }
  $Ef assets/yonos_x2.pt --data photos/val --out results/distill_fair_teacher > results/distill_fair_teacher.txt
  $Ef $(arms) --data photos/test --out results/distill_fair_whole > results/distill_fair_whole.txt &   # one step, whole
  $Ef $(arms) --data photos/test --crop 64 --no-color-fix --steps 1,2,4,8,16,64 --out results/distill_fair_steps \
    > results/distill_fair_steps.txt
  wait
  for seed in $SEEDS; do mkdir -p results/distill_fair_logs/s$seed; cp "$F"/s$seed/*.log.jsonl results/distill_fair_logs/s$seed/; done
  $PY study.py --fair results/distill_fair
  stamp "fair: evaluated"
fi

if has real; then   # the real-photo x4: the same chain as the shipped one on data.photo_chain, from the shipped x2
  R="$RUN/real"
  mkdir -p "$R"
  C="--config small --crop 64 --batch-size 8 --val-every 100 --save-every 100 --log-every 20 --threads 2 --degradation photo"
  $T $C --scale 2 --init assets/yonos_x2.pt --steps 1200 --out "$R/x2.pt"
  $T $C --scale 4 --teacher "$R/x2.pt" --steps 1000 --out "$R/x4.pt"
  $T $C --stage decoder --unet "$R/x4.pt" --lr 2e-4 --warmup 50 --steps 600 --out "$R/x4_dec.pt"
  # then U-Net and decoder together, end to end through the one-step output (ours: --with-unet)
  $T $C --stage decoder --with-unet --unet "$R/x4_dec.pt" --lr 1e-4 --warmup 50 --steps 1200 --out "$R/x4_e2e.pt"
  # and a second round at batch 16 (the later --batch-size wins) and half the learning rate, which val preferred
  # (results/real_x4_val_variants.txt)
  $T $C --batch-size 16 --stage decoder --with-unet --unet "$R/x4_e2e.pt" --lr 5e-5 --warmup 20 --steps 600 \
    --out "$R/x4_e2e2.pt"
  # and a third on 128-px crops (more of each JPEG's block grid in view), at a constant learning rate, written as
  # the weights' EMA, used with 64-cell tiles to match (val: +0.18-0.23 dB over the second round;
  # results/real_x4_val_variants.txt)
  $T $C --crop 128 --stage decoder --with-unet --unet "$R/x4_e2e2.pt" --lr 5e-5 --lr-schedule constant --warmup 20 \
    --steps 800 --ema 0.998 --out "$R/x4_e2e3.pt"
  $PY -c "import sys, torch; from yonos import YonosSR; m = YonosSR.load(sys.argv[1]); m.meta.update(tile=64, \
degradation='photo'); m.save(sys.argv[2], torch.float16)" "$R/x4_e2e3.pt" assets/yonos_x4_real.pt
  stamp "real: x2, x4, decoder, end to end"
  for d in val test; do   # val: the split the recipe was chosen on; test: held out, reported
    $PY eval.py assets/yonos_x4.pt assets/yonos_x4_real.pt --protocol web --data photos/$d --threads 1 \
      --out results/real_x4_$d > results/real_x4_$d.txt
  done
  $PY eval.py assets/yonos_x4.pt assets/yonos_x4_real.pt --data photos/test --figure assets/figure_real.png \
    --figure-row --figure-image flower.png --lr-jpeg 50 --lr-noise 2
  stamp "real: evaluated"
fi

if has variance; then   # the shipped pairs at the shipped students' weights, 16 draws a timestep bucket
  $PY study.py --variance assets/yonos_x2.pt assets/yonos_x4.pt assets/yonos_x4.pt assets/yonos_x8.pt --draws 16 \
    --out results/variance > results/variance.txt
  stamp "variance"
fi

if has guided; then   # the guided student at w = 0 (results/README.md, "The guided student at w = 0")
  G="$RUN/guided"
  mkdir -p "$G"
  C="--config small --crop 64 --batch-size 8 --val-every 100 --save-every 100 --log-every 20 --threads 1"
  $T $C --scale 2 --init assets/yonos_x2.pt --cond-drop 0.1 --steps 400 --out "$G/x2_cfg.pt"
  $T $C --stage guided --teacher "$G/x2_cfg.pt" --w-max 4 --steps 300 --out "$G/x2_guided.pt"
  $T $C --stage guided --teacher "$G/x2_cfg.pt" --w-max 4 --w-zero 0.25 --steps 300 --out "$G/x2_guided_w0.pt"
  $PY study.py --guided "$G/x2_cfg.pt" "$G/x2_guided.pt" --out results/guided_w
  $PY study.py --guided "$G/x2_cfg.pt" "$G/x2_guided_w0.pt" --out results/guided_w_zero
  stamp "guided"
fi

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
  E="$PY eval.py --data photos/test --threads 1"
  for s in 2 4 8; do   # the 14 held-out photos, whole, one step: the shipped file (default, raw) and its U-Net
    # with the VAE's own decoder (the decoder fine-tune off)
    $E assets/yonos_x$s.pt --out results/shipped_x$s > results/shipped_x$s.txt
    $E assets/yonos_x$s.pt --no-color-fix --out results/shipped_x${s}_raw > results/shipped_x${s}_raw.txt
    if [ -f "$RUN/ship/x$s.pt" ]; then
      t=$(ship_tile $s)   # the same tiles as the shipped file
      $E "$RUN/ship/x$s.pt" --tile $t --out results/ship_no_decoder_x$s > results/ship_no_decoder_x$s.txt
      $E "$RUN/ship/x$s.pt" --tile $t --no-color-fix --out results/ship_no_decoder_x${s}_raw \
        > results/ship_no_decoder_x${s}_raw.txt
    fi
  done
  if [ -f "$RUN/ship/x4_plain.pt" ]; then   # the plain objective at the shipped x4's budget (no decoder fine-tune)
    $E "$RUN/ship/x4_plain.pt" --out results/ship_plain_x4 > results/ship_plain_x4.txt
    $E "$RUN/ship/x4_plain.pt" --no-color-fix --out results/ship_plain_x4_raw > results/ship_plain_x4_raw.txt
  fi
  $E assets/yonos_x[248].pt --figure assets/figure.png
  # the example of make sample: a held-out photo (photos/test, in no training run), x4 bicubic LR of a crop
  $PY -c "from eval import prepare; from PIL import Image; hr, lr = prepare('photos/test/EveningGlow.png', 4); \
lr.crop((110, 75, 270, 181)).save('assets/example.png')"
  $PY sample.py assets/example.png --out assets/example_x4.png --force --dtype fp32   # the golden output: fp32
  stamp "results: shipped models"
  if [ -f "$RUN/small_s0/x8_plain.pt" ]; then   # the study on the shipped recipe: raw output, DDIM 1..64, on 64-px
    # centre crops (the training crop, one tile: 64 steps x 14 photos x 12 models on two cores)
    small() { for seed in $SEEDS; do for m in "$@"; do echo "$RUN/small_s$seed/$m"; done; done; }
    for sc in 4 8; do
      $E $(small x$sc.pt x${sc}_plain.pt) --crop 64 --no-color-fix --steps 1,2,4,8,16,32,64 --out results/chain_x$sc \
        > results/chain_x$sc.txt &
    done
    wait
    stamp "results: the study on the shipped recipe"
  fi
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
