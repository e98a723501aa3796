#!/bin/bash
# Device calls of 2026-12-07, eleventh session (an H200, 141 GB, for the 8B/9B shapes):
#   a  Qwen3-8B and Qwen3.5-9B QAT with BF16 moments (issues 13 and 16: peak memory, tokens/s),
#      then one CubeCL-profiled Qwen3-1.7B QAT run (CUBECL_DEBUG_LOG=1: every CubeCL kernel
#      timed, summed by kind into $OUT/profile_qwen3-1.7b.txt)
#   b  the PyTorch + ModelOpt anchors of the same two shapes, same machine
# Carries .gpu (qatflow.xz, modelopt_qat_anchor.py) and .xfer/whl (ModelOpt's wheels).
# Usage: bash scripts/device/call_s11.sh a|b
R=scripts/device/run.sh
mkdir -p .gpu/whl && cp .xfer/whl/*.whl .gpu/whl/
case $1 in
a)
  T=40 bash $R setup
  MODES=qat MOMENTS=bf16 WARMUP=1 STEPS=3 T=150 bash $R q8
  MODES=qat MOMENTS=bf16 WARMUP=1 STEPS=2 T=150 bash $R q35-9b
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
  mkdir -p /tmp/tok && cp .gpu/tok/*.json /tmp/tok/ && xz -dc .gpu/tok/tokenizer.json.xz > /tmp/tok/tokenizer.json
  QATFLOW_ONLY=1 B=/tmp bash scripts/device/ptq_compare.sh /tmp/tok 3 64 ;;
b)
  T=260 bash $R anchor-q8
  STEPS=2 T=300 bash $R anchor-q35-9b ;;
esac
