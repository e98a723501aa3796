#!/bin/bash
# Device call A of 2026-12-06 (third session): the engine's correctness check, Qwen3.5 on the
# GPU (the tiny fixture's NLL and decoding, the 2B beside the ModelOpt anchor, the 9B's memory).
# Everything lands in /tmp/res and comes back as $OUT/res_a.tgz (the device returns 8 files).
FINAL=$OUT; export OUT=/tmp/res; mkdir -p $OUT
trap 'tar czf $FINAL/res_a.tgz -C /tmp res' EXIT
R=scripts/device/run.sh
T=60 bash $R setup check
T=60 bash $R q35tiny
MODES=qat WARMUP=1 STEPS=4 T=140 bash $R q35
T=130 bash $R anchor-q35
MODES=qat MOMENTS=bf16 WARMUP=1 STEPS=2 T=150 bash $R q35-9b
