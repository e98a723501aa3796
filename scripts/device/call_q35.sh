#!/bin/bash
# Device call A of 2026-12-06 (third session; any Hopper card): the engine's correctness check,
# Qwen3.5 on the GPU (the tiny fixture's NLL and decoding, the 2B beside the ModelOpt anchor),
# then serving decode speed beside transformers'. Everything lands in /tmp/res and comes back as
# $OUT/res_a.tgz, packed after every stage (the device returns at most 8 files, and what a
# killed call left under $OUT).
FINAL=$OUT; export OUT=/tmp/res; mkdir -p $OUT
R=scripts/device/run.sh
pack() { tar czf $FINAL/res_a.tgz -C /tmp res; }
T=60 bash $R setup check; pack
T=60 bash $R q35tiny; pack
MODES=qat WARMUP=1 STEPS=4 T=140 bash $R q35; pack
T=120 bash $R anchor-q35; pack
T=80 bash $R serve; pack
T=50 bash $R decode-anchor; pack
