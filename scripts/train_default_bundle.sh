#!/bin/sh
# The recipe of the default bundle (engine/bundles/default), from ../shared/data, on CPU.
# Every stage resumes from its checkpoint when run again; run it in the background:
#   nohup scripts/train_default_bundle.sh > train.log 2>&1 &
# Times on this 2-core machine are in the bundle's data card. On a GPU machine, copy
# configs/cpu_small to a new folder, set train.device to "cuda" and scale steps and widths.
set -eu
A=.venv/bin/avatar
CFG=${CFG:-configs/cpu_small}
D=../shared/data
$A prepare $D/clips --out out/full
$A prepare $D/grid_s1 --out out/grid
$A prepare $D/motion_clips --out out/motion --allow-no-audio
# the autoencoder and the audio models are independent (one thread each, side by side)
$A train autoencoder --data out/full out/grid out/motion --config $CFG/autoencoder.json --out runs/autoencoder &
$A train a2l --data out/full out/grid --config $CFG/a2l.json --out runs/a2l &
$A train sync --data out/full out/grid --config $CFG/sync.json --out runs/sync &
wait
$A train denoiser --data out/full out/grid --config $CFG/denoiser.json --out runs/denoiser
.venv/bin/python scripts/build_bundle.py --runs runs --out engine/bundles/default --steps 4
.venv/bin/avatar eval --data out/full --out docs/eval/default_bundle
