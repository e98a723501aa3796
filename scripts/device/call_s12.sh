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
#   one     whatever GPU comes, the most of the above that fits one call (560 s): on an H200 the
#           8B/9B memory runs and the 8B anchor, then the Qwen3-1.7B anchor and engine run; on
#           an H100 the Qwen3-1.7B anchor, engine (kahan, plain), the 50-step curves of
#           Qwen3-1.7B, the synchronized A/B and the resume check. A stage that would not end
#           before 560 s is skipped and says so.
# Carries .gpu (qatflow.xz, modelopt_qat_anchor.py) and .xfer/whl (ModelOpt's wheels).
#   last    a short lease (LIMIT s): qatflow's Qwen3-1.7B QAT, then the anchor in what is left
# Usage: bash scripts/device/call_s12.sh h200|engine|smol|one|last
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
one)
  # fits STAGE_LIMIT: runs "$@" with T=limit when the call's 560 s leave room for it
  fits() { local t=$1; shift; if [ $((SECONDS + t)) -le ${LIMIT:-560} ]; then T=$t "$@"; else echo "=== skipped (no time left): $*"; fi; }
  T=40 bash $R setup
  mem=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1)
  curve() { # 50 steps of Qwen3-1.7B on one GEMM path
    echo "=== $(date +%T) 50 steps qwen3-1.7b $1"
    QATFLOW_GEMM=$1 timeout $T /tmp/qatflow bench-train --device cuda --model qwen3-1.7b \
      --precision bf16-kahan --moments bf16 --warmup 0 --steps 50 --mode qat --lr 1e-4 \
      --out $OUT/curve_qwen3-1.7b_$1.json > /dev/null 2> $OUT/curve_qwen3-1.7b_$1.log; echo "rc=$?"; }
  if [ "$mem" -gt 100000 ]; then
    MODES=qat MOMENTS=bf16 WARMUP=1 STEPS=2 fits 130 bash $R q35-9b
    MODES=qat MOMENTS=bf16 WARMUP=1 STEPS=3 fits 130 bash $R q8
    fits 200 bash $R anchor-q8
    fits 120 bash $R anchor-qwen
    PREC=bf16-kahan MOMENTS=bf16 MODES=qat TAG=_bf16-kahan fits 80 bash $R qwen
  else
    fits 150 bash $R anchor-qwen
    for p in bf16-kahan bf16-plain; do PREC=$p MOMENTS=bf16 MODES=qat TAG=_$p fits 80 bash $R qwen; done
    fits 80 curve cublaslt
    fits 110 curve burn
    [ -f $OUT/curve_qwen3-1.7b_burn.json ] && python3 scripts/device/compare_curves.py $OUT/curve_qwen3-1.7b_cublaslt.json $OUT/curve_qwen3-1.7b_burn.json
    if [ $((SECONDS + 100)) -le $((${LIMIT:-560} + 20)) ]; then bash scripts/device/resume_gpu.sh .gpu/tok 2>&1 | tee $OUT/resume_gpu.txt; else echo "=== skipped resume check"; fi
    QATFLOW_GEMM_SYNC=1 PREC=bf16-kahan MOMENTS=bf16 MODES=qat TAG=_sync fits 70 bash $R qwen
  fi ;;
last)
  # a short lease: qatflow's Qwen3-1.7B QAT (bf16-kahan, BF16 moments) first, then the anchor
  # with whatever time is left of LIMIT
  T=40 bash $R setup
  PREC=bf16-kahan MOMENTS=bf16 MODES=qat WARMUP=2 STEPS=5 TAG=_bf16-kahan T=75 bash $R qwen
  T=$((${LIMIT:-200} - SECONDS)) bash $R anchor-qwen ;;
esac
