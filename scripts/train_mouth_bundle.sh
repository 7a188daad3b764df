#!/bin/sh
# The recipe of the mouth-region bundle (issue 13): the default bundle's audio models and motion files,
# with an autoencoder and a denoiser fine-tuned on the mouth region of 512 px crops, distilled 4 -> 2
# and exported (ONNX + int8). Every stage resumes or is skipped when its output exists; run it in the background:
#   nohup scripts/train_mouth_bundle.sh > logs/mouth.log 2>&1 &
# Result: runs/mouth/distill/bundle (copy it over engine/bundles/default once `avatar eval` says it wins).
set -eu
A=.venv/bin/avatar
CFG=${CFG:-configs/cpu_mouth}
D=../shared/data
R=runs/mouth
$A prepare $D/clips --out out/full512 --crop-size 512 --quiet
$A prepare $D/grid_s1 --out out/grid512 --crop-size 512 --quiet
[ -f $R/autoencoder/autoencoder.pt ] || $A train autoencoder --data out/full512 out/grid512 --config $CFG/autoencoder.json --out $R/autoencoder
[ -f $R/denoiser/denoiser.pt ] || $A train denoiser --data out/full512 out/grid512 --config $CFG/denoiser.json --out $R/denoiser
[ -f $R/teacher/manifest.json ] || .venv/bin/python scripts/build_region_bundle.py --base engine/bundles/default --region mouth --crop-size 512 \
    --autoencoder $R/autoencoder --denoiser $R/denoiser --steps 8 --out $R/teacher
$A distill --bundle $R/teacher --data out/full512 out/grid512 --out $R/distill --steps 2 --teacher-steps 4 --config $CFG/distill.json
echo "mouth bundle: $R/distill/bundle"
