#!/bin/bash
# Device calls of 2026-12-07, twelfth session.
#   h200    on an H200 (141 GB): Qwen3-8B and Qwen3.5-9B QAT at bf16-kahan with BF16 moments
#           (issues 13 and 16: peak memory, tokens/s), then the PyTorch + ModelOpt anchor of
#           Qwen3-8B on the same machine
#   engine  (any GPU) the anchor for Qwen3-1.7B, then qatflow's Qwen3-1.7B QAT at bf16-kahan and
#           bf16-plain (BF16 moments, as the anchor's AdamW on BF16 parameters keeps them), then
#           bf16-kahan again with QATFLOW_GEMM_SYNC=1 (the GEMMs ordered by syncs, as before the
#           patched cubecl-cuda: the same binary's A/B), then the GPU resume check
#           (scripts/device/resume_gpu.sh)
#   smol    the anchor for SmolLM2-135M, qatflow's SmolLM2 QAT, and the 50-step loss curves of
#           the engine (QATFLOW_GEMM=cublaslt) and burn's path (QATFLOW_GEMM=burn) from the same
#           seed, SmolLM2 then Qwen3-1.7B
# Carries .gpu (qatflow.xz, modelopt_qat_anchor.py) and .xfer/whl (ModelOpt's wheels).
# Usage: bash scripts/device/call_s12.sh h200|engine|smol
R=scripts/device/run.sh
[ -d .xfer/whl ] && mkdir -p .gpu/whl && cp .xfer/whl/*.whl .gpu/whl/
case $1 in
h200)
  T=40 bash $R setup
  MODES=qat MOMENTS=bf16 WARMUP=1 STEPS=3 T=150 bash $R q8
  MODES=qat MOMENTS=bf16 WARMUP=1 STEPS=2 T=150 bash $R q35-9b
  T=220 bash $R anchor-q8 ;;
engine)
  T=40 bash $R setup
  T=200 bash $R anchor-qwen
  for p in bf16-kahan bf16-plain; do
    PREC=$p MOMENTS=bf16 MODES=qat TAG=_$p T=120 bash $R qwen
  done
  QATFLOW_GEMM_SYNC=1 PREC=bf16-kahan MOMENTS=bf16 MODES=qat TAG=_sync T=120 bash $R qwen
  bash scripts/device/resume_gpu.sh .gpu/tok 2>&1 | tee $OUT/resume_gpu.txt ;;
smol)
  [ -x /tmp/qatflow ] || T=40 bash $R setup
  T=120 bash $R anchor-smol
  PREC=bf16-kahan MOMENTS=bf16 MODES=qat TAG=_bf16-kahan T=90 bash $R smol
  for m in smollm2-135m qwen3-1.7b; do for path in cublaslt burn; do
    echo "=== $(date +%T) 50 steps $m $path"
    QATFLOW_GEMM=$path timeout 150 /tmp/qatflow bench-train --device cuda --model $m \
      --precision bf16-kahan --moments bf16 --warmup 0 --steps 50 --mode qat --lr 1e-4 \
      --out $OUT/curve_${m}_$path.json > /dev/null 2> $OUT/curve_${m}_$path.log; echo "rc=$?"
  done; python3 scripts/device/compare_curves.py $OUT/curve_${m}_cublaslt.json $OUT/curve_${m}_burn.json; done ;;
esac
