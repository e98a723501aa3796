#!/bin/bash
# Device call B of 2026-12-06 (third session): Qwen3-8B QAT on an H200 beside the anchor
# (issue 13), Qwen3-1.7B's anchor with time to finish, and the 9B Qwen3.5 anchor's memory.
# Results come back as $OUT/res_b.tgz.
FINAL=$OUT; export OUT=/tmp/res_b; mkdir -p $OUT
trap 'tar czf $FINAL/res_b.tgz -C /tmp res_b' EXIT
R=scripts/device/run.sh
T=40 bash $R setup
MODES=qat MOMENTS=bf16 WARMUP=1 STEPS=5 T=150 bash $R q8
T=150 bash $R anchor-q8
MODES=qat TAG=_m16 MOMENTS=bf16 T=80 bash $R qwen
T=120 bash $R anchor-qwen
STEPS=2 T=110 bash $R anchor-q35-9b
