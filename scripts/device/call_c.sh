#!/bin/bash
# Device call C of 2026-12-06 (third session; any Hopper card): Qwen3.5-2B QAT beside its
# ModelOpt anchor (issue 16), Qwen3-1.7B QAT with BF16 moments beside its anchor (issue 13's
# memory bar), in one lease. Results come back as $OUT/res_c.tgz, packed after every stage.
FINAL=$OUT; export OUT=/tmp/res_c; mkdir -p $OUT
R=scripts/device/run.sh
pack() { tar czf $FINAL/res_c.tgz -C /tmp res_c; }
T=40 bash $R setup
MODES=qat WARMUP=1 STEPS=4 T=100 bash $R q35; pack
T=120 bash $R anchor-q35; pack
MODES=qat TAG=_m16 MOMENTS=bf16 T=80 bash $R qwen; pack
T=130 bash $R anchor-qwen; pack
