#!/bin/bash
# Device call C of 2026-12-06 (third session; any Hopper card), if time is left: Qwen3-1.7B QAT
# with BF16 moments beside its anchor (issue 13's memory bar). Results come back as $OUT/res_c.tgz.
FINAL=$OUT; export OUT=/tmp/res_c; mkdir -p $OUT
R=scripts/device/run.sh
pack() { tar czf $FINAL/res_c.tgz -C /tmp res_c; }
T=40 bash $R setup
MODES=qat TAG=_m16 MOMENTS=bf16 T=100 bash $R qwen; pack
T=130 bash $R anchor-qwen; pack
