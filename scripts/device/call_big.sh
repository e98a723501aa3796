#!/bin/bash
# Device call B of 2026-12-06 (third session; an H200, 141 GB): the 9B Qwen3.5's and Qwen3-8B's
# QAT memory with BF16 moments (issues 16 and 13), each beside the PyTorch + ModelOpt anchor.
# Results come back as $OUT/res_b.tgz, packed after every stage.
FINAL=$OUT; export OUT=/tmp/res_b; mkdir -p $OUT
R=scripts/device/run.sh
pack() { tar czf $FINAL/res_b.tgz -C /tmp res_b; }
T=40 bash $R setup
MODES=qat MOMENTS=bf16 WARMUP=1 STEPS=2 T=130 bash $R q35-9b; pack
MODES=qat MOMENTS=bf16 WARMUP=1 STEPS=5 T=130 bash $R q8; pack
T=130 bash $R anchor-q8; pack
STEPS=2 T=130 bash $R anchor-q35-9b; pack
