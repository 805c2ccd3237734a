#!/usr/bin/env bash
# Issue 22's GPU measurements as one prepared call, sized for a device session of about 10 minutes
# (full-size CIFAR-10, ResNet-18 width 64):
#   1. one scan of a fixed checkpoint, stage by stage (scan_stages.py), at the default keep_mb (a quarter
#      of the host's available memory: the scoring pass's features and input views are kept), each scan
#      followed by one training epoch and one plain forward in the same process (--floor: scan / epoch and
#      its floor), and at the fixed 512 MB it replaced (the later stages forward and read again: what
#      keeping buys);
#   2. a whole attacked run beside its unguarded twin (bench_guard.py: scan / epoch and overhead);
#   3. last, so the others are kept if time runs out: a clean run beside its twin at the defaults (its first scan
#      is whole and the later ones score 512 images a class: what sampled scans save at full size).
# Results go to $OUT (default /tmp/gpu_check). The CIFAR-10 archive comes from GUARD_CIFAR10_ARCHIVE, or
# from .cache/cifar10-jpg.tar.gz (git-ignored: copy it there and carry .cache to the device machine).
# A CPU smoke test of the same commands: DEVICE=cpu N_TRAIN=2000 WIDTH=8 EPOCHS=4 bash benchmarks/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check}
DEVICE=${DEVICE:-cuda}
N_TRAIN=${N_TRAIN:-0}              # 0: all of CIFAR-10's training split (49,000 after the trusted set)
WIDTH=${WIDTH:-64}
EPOCHS=${EPOCHS:-8}
SMALL_KEEP_MB=${SMALL_KEEP_MB:-512}
PY=${PY:-python}
if [ -z "${GUARD_CIFAR10_ARCHIVE:-}" ] && [ -f .cache/cifar10-jpg.tar.gz ]; then
  export GUARD_CIFAR10_ARCHIVE=$PWD/.cache/cifar10-jpg.tar.gz
fi
mkdir -p "$OUT"
$PY -c "import torch; print('torch', torch.__version__, 'cuda' if torch.cuda.is_available() else 'no cuda',
torch.cuda.get_device_name() if torch.cuda.is_available() else '')"
stages="--device $DEVICE --n-train $N_TRAIN --width $WIDTH --repeats 3 --checkpoint $OUT/checkpoint.pt"
$PY benchmarks/scan_stages.py $stages --floor --out "$OUT/stages_default.json"
$PY benchmarks/scan_stages.py $stages --keep-mb "$SMALL_KEEP_MB" --out "$OUT/stages_keep_small.json"
$PY benchmarks/scan_stages.py --render "$OUT/stages_default.json" "$OUT/stages_keep_small.json" \
  --labels "keep_mb default" "keep_mb $SMALL_KEEP_MB" | tee "$OUT/stages.md"
$PY benchmarks/bench_guard.py --n-train "$N_TRAIN" --width "$WIDTH" --epochs "$EPOCHS" --batch-size 256 \
  --device "$DEVICE" --attacks badnets --rates 0.1 --no-no-attack --trust-free --out "$OUT/cost_attacked.json"
$PY benchmarks/bench_guard.py --n-train "$N_TRAIN" --width "$WIDTH" --epochs "$EPOCHS" --batch-size 256 \
  --device "$DEVICE" --attacks --trust-free --out "$OUT/cost_clean.json"
