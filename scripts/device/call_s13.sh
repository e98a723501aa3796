#!/bin/bash
# Device call of 2026-12-07, thirteenth session: whatever GPU comes, the most of this that fits
# LIMIT seconds (default 560); a stage that would not end in time is skipped and says so.
#   1. gemm_check: cuBLASLt GEMMs, and the training engine's CUDA kernels never run on a GPU
#      before (the attention's query blocks and softmax kernels, AdamW, square_sum, RMSNorm) against
#      their references, plus one Qwen3-1.7B attention layer's time on both paths
#   2. on an H100: qatflow's Qwen3-1.7B QAT at bf16-kahan (BF16 moments), the ModelOpt anchor,
#      bf16-plain, a step's phase times (QATFLOW_PHASE_TIMES=1), the 50-step loss curves of
#      the engine and burn's path, the GPU resume check;
#      on an H200 (> 100 GB): Qwen3.5-9B and Qwen3-8B QAT memory, the 8B anchor, then the
#      Qwen3-1.7B pair; last, 4 micro-batches a step without and with --fake-quant-cache
#   ab (first argument): this session's build against the twelfth session's (.gpu/qatflow_s12.xz,
#      3629c9b) in one call, Qwen3-1.7B then Qwen3.5-2B QAT at bf16-kahan, alternating builds
# Carries .gpu (qatflow.xz, qatflow_s12.xz, gemm_check.xz, modelopt_qat_anchor.py, tok/) and
# .xfer/whl.
# Usage: LIMIT=540 bash scripts/device/call_s13.sh [ab]
R=scripts/device/run.sh
[ -d .xfer/whl ] && mkdir -p .gpu/whl && cp .xfer/whl/*.whl .gpu/whl/
fits() { local t=$1; shift; if [ $((SECONDS + t)) -le ${LIMIT:-560} ]; then T=$t "$@"; else echo "=== skipped (no time left): $*"; fi; }
gemm_check() {
  echo "=== $(date +%T) gemm_check"
  QATFLOW_GEMM=cublaslt timeout $T /tmp/gemm_check > $OUT/gemm_check.json 2> $OUT/gemm_check.log; echo "rc=$?"
  tail -3 $OUT/gemm_check.log | cut -c1-300
  python3 -c "
import json; d=json.load(open('$OUT/gemm_check.json'))
print('ok', d['ok'], d['failures'][:6]); print('attention', json.dumps(d['attention'])); print('adamw', json.dumps(d['adamw'])); print('square_sum', json.dumps(d['square_sum'])); print('rms_norm', json.dumps(d['rms_norm']))
for b in d['bench_linear_fwd_bwd']: print(b['m'], b['k'], b['n'], {p: round(b[p]['tflops'], 1) for p in ('cublaslt', 'burn')})" 2>&1 | tail -12; }
curve() { # 50 steps of Qwen3-1.7B on one GEMM path
  echo "=== $(date +%T) 50 steps qwen3-1.7b $1"
  QATFLOW_GEMM=$1 timeout $T /tmp/qatflow bench-train --device cuda --model qwen3-1.7b \
    --precision bf16-kahan --moments bf16 --warmup 0 --steps 50 --mode qat --lr 1e-4 \
    --out $OUT/curve_qwen3-1.7b_$1.json > /dev/null 2> $OUT/curve_qwen3-1.7b_$1.log; echo "rc=$?"; }
T=40 bash $R setup
if [ "$1" = ab ]; then
  for m in qwen3-1.7b qwen3.5-2b; do for round in 1 2; do for b in qatflow_s12 qatflow; do
    ab() { echo "=== $(date +%T) $m $b round $round"
      QATFLOW_GEMM=cublaslt timeout $T /tmp/$b bench-train --device cuda --model $m \
        --precision bf16-kahan --moments bf16 --warmup 2 --steps 5 --mode qat \
        --out $OUT/ab_${m}_${b}_$round.json > /dev/null 2> $OUT/ab_${m}_${b}_$round.log; echo "rc=$?"
      python3 -c "import json;d=json.load(open('$OUT/ab_${m}_${b}_$round.json'))['qat'];print('tok/s %.0f'%d['tokens_per_s'],'peak',d['peak_process_gpu_mib'])"; }
    fits 100 ab
  done; done; done
  exit 0
fi
mem=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1)
fits 120 gemm_check
if [ "$mem" -gt 100000 ]; then
  MODES=qat MOMENTS=bf16 WARMUP=1 STEPS=2 fits 130 bash $R q35-9b
  MODES=qat MOMENTS=bf16 WARMUP=1 STEPS=3 fits 130 bash $R q8
  fits 200 bash $R anchor-q8
fi
PREC=bf16-kahan MOMENTS=bf16 MODES=qat TAG=_bf16-kahan fits 80 bash $R qwen
fits 150 bash $R anchor-qwen
PREC=bf16-plain MOMENTS=bf16 MODES=qat TAG=_bf16-plain fits 80 bash $R qwen
phases() { # where a step goes: each engine phase between two syncs (slower steps)
  echo "=== $(date +%T) qwen3-1.7b phase times"
  QATFLOW_GEMM=cublaslt QATFLOW_GEMM_SYNC=1 QATFLOW_PHASE_TIMES=1 timeout $T /tmp/qatflow bench-train \
    --device cuda --model qwen3-1.7b --precision bf16-kahan --moments bf16 --warmup 1 --steps 3 \
    --mode qat --out $OUT/phases.json > /dev/null 2> $OUT/phases.log; echo "rc=$?"
  python3 -c "import json;d=json.load(open('$OUT/phases.json'))['qat'];print('step',d['median_step_s'],'fb',d['median_forward_backward_s'],'opt',d['median_optimizer_s'],'gemm',d['median_gemm_s'],'phases',d['median_phase_s'])"; }
fits 80 phases
fits 80 curve cublaslt
fits 110 curve burn
[ -f $OUT/curve_qwen3-1.7b_burn.json ] && python3 scripts/device/compare_curves.py $OUT/curve_qwen3-1.7b_cublaslt.json $OUT/curve_qwen3-1.7b_burn.json
if [ $((SECONDS + 100)) -le $((${LIMIT:-560} + 20)) ]; then bash scripts/device/resume_gpu.sh .gpu/tok 2>&1 | tee $OUT/resume_gpu.txt; else echo "=== skipped resume check"; fi
# The fake-quant cache with 4 micro-batches a step, without then with (last: least urgent).
for c in "" --fake-quant-cache; do
  fq() { echo "=== $(date +%T) qwen3-1.7b 4 micro-batches $c"
    QATFLOW_GEMM=cublaslt timeout $T /tmp/qatflow bench-train --device cuda --model qwen3-1.7b \
      --precision bf16-kahan --moments bf16 --warmup 1 --steps 3 --mode qat --micro-batches 4 $c \
      --out $OUT/fq${c:+_cache}.json > /dev/null 2> $OUT/fq${c:+_cache}.log; echo "rc=$?"
    python3 -c "import json;d=json.load(open('$OUT/fq${c:+_cache}.json'))['qat'];print('tok/s %.0f'%d['tokens_per_s'],'peak',d['peak_process_gpu_mib'])"; }
  fits 90 fq
done
