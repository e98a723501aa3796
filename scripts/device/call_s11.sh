#!/bin/bash
# Device calls of 2026-12-07, eleventh session (an H200, 141 GB, for the 8B/9B shapes):
#   a  Qwen3-8B and Qwen3.5-9B QAT with BF16 moments (issues 13 and 16: peak memory, tokens/s),
#      then one CubeCL-profiled Qwen3-1.7B QAT run (CUBECL_DEBUG_LOG=1: every CubeCL kernel
#      timed, summed by kind into $OUT/profile_qwen3-1.7b.txt)
#   profile  only the profiled run and the PTQ runs of `a` (on any GPU)
#   loss     the chunked loss's lane-split reductions against the build before them (carries
#            .gpu/qatflow.xz and .gpu/qatflow_old.xz only)
#   b  the PyTorch + ModelOpt anchors of the same two shapes, same machine
# Carries .gpu (qatflow.xz, modelopt_qat_anchor.py) and .xfer/whl (ModelOpt's wheels).
# Usage: bash scripts/device/call_s11.sh a|b
R=scripts/device/run.sh
[ -d .xfer/whl ] && mkdir -p .gpu/whl && cp .xfer/whl/*.whl .gpu/whl/
case $1 in
a)
  T=40 bash $R setup
  MODES=qat MOMENTS=bf16 WARMUP=1 STEPS=3 T=150 bash $R q8
  MODES=qat MOMENTS=bf16 WARMUP=1 STEPS=2 T=150 bash $R q35-9b
  bash $0 profile ;;
profile)
  [ -x /tmp/qatflow ] || T=40 bash $R setup
  echo "=== $(date +%T) profile qwen3-1.7b qat"
  rm -f /tmp/cubecl.log
  CUBECL_DEBUG_LOG=1 QATFLOW_GEMM=cublaslt timeout 120 /tmp/qatflow bench-train --device cuda \
    --model qwen3-1.7b --precision bf16-kahan --moments bf16 --warmup 1 --steps 2 --mode qat \
    --out $OUT/profile_qwen3-1.7b.json > /dev/null 2> $OUT/profile_qwen3-1.7b.log; echo "rc=$?"
  ls -la /tmp/cubecl.log
  awk -F'|' 'NF>=3 {n=$3; gsub(/ /,"",n); t=$2; gsub(/ /,"",t); v=t+0;
    if (t ~ /ms$/) v*=1000; else if (t ~ /ns$/) v/=1000; else if (t !~ /µs$/ && t ~ /s$/) v*=1e6;
    s[n]+=v; c[n]++} END {for (k in s) if (c[k]>1) printf "%10.1f ms %7d %s\n", s[k]/1000, c[k], k}' \
    /tmp/cubecl.log | sort -rn > $OUT/profile_qwen3-1.7b.txt
  head -25 $OUT/profile_qwen3-1.7b.txt
  head -c 40000000 /tmp/cubecl.log | xz -T8 -3 > $OUT/cubecl_train.log.xz
  QATFLOW_ONLY=1 B=/tmp bash scripts/device/ptq_compare.sh .gpu/tok 3 64 ;;
loss)
  # The chunked loss's reductions split into lanes (HEAD) against the build before (bddadb3,
  # .gpu/qatflow_old.xz): Qwen3-1.7B QAT, alternating, the old build first
  # (it fills the kernel cache both share).
  for b in qatflow qatflow_old; do xz -dc .gpu/$b.xz > /tmp/$b && chmod +x /tmp/$b; done
  for round in 1 2; do for b in qatflow_old qatflow; do for m in qwen3-1.7b; do
    echo "=== $(date +%T) $b $m round $round"
    QATFLOW_GEMM=cublaslt timeout 150 /tmp/$b bench-train --device cuda --model $m --precision bf16-kahan \
      --moments bf16 --warmup 2 --steps 5 --mode qat --out $OUT/loss_${b}_${m}_$round.json > /dev/null 2> $OUT/loss_${b}_${m}_$round.log
    echo "rc=$?"; python3 -c "import json; d=json.load(open('$OUT/loss_${b}_${m}_$round.json'))['qat']; print('tok/s %.0f fb %.3f steps %s' % (d['tokens_per_s'], d['median_forward_backward_s'], [round(x, 3) for x in d['step_seconds']]))"
  done; done; done ;;
b)
  T=260 bash $R anchor-q8
  STEPS=2 T=300 bash $R anchor-q35-9b ;;
esac
