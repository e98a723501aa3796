#!/bin/bash
# Device calls of 2026-12-07, tenth session (one H100): issue 15's replication and PTQ timing.
#   first  the stripped binaries from .gpu/ (qatflow, gemm_check, cuda_decoder) and the
#          ModelOpt wheels from .xfer/whl/; the GPU checks of the shared cuBLASLt plan
#          (gemm_check, the CUDA decoder's GPU tests); then PTQ of a random-init Qwen3-1.7B
#          shape on 64 calibration sequences of the offline dataset (SmolLM2's token ids),
#          ModelOpt 0.47 (scripts/device/modelopt_ptq_anchor.py) and `qatflow quantize
#          --device cuda` in turn, three runs each, every run timed
#   ptq    only the PTQ comparison of `first` (RUNS and N: optional 2nd and 3rd arguments)
#   part   keeps the GGUF part carried in .xfer/pN/ (SmolLM2-135M-Instruct's 98 MB GGUF,
#          xz-compressed, travels in three parts over consecutive calls to the warm machine)
#   start  the last part; joins and imports the GGUF as the demo's base model, starts
#          `qatflow demo --budget full --device cuda --recipe results/demo/h100_2026-12-07/demo_gpu.toml` under
#          scripts/device/demo_driver.sh in its own session, follows it
#   poll   follows the running demo; packs its results into $OUT/demo_gpu.tgz
# The calls carry .gpu and .xfer/whl (first), then .xfer/p1, .xfer/p2, .xfer/p3 (part, part, start).
# Usage: bash scripts/device/call_s10.sh STEP
. scripts/device/gguf_parts.sh
B=/tmp
case $1 in
first)
  stamp first; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  for f in .gpu/*.xz; do n=$(basename $f .xz); xz -dc $f > $B/$n && chmod +x $B/$n; done
  cp results/demo/h100_2026-12-07/demo_gpu.toml /tmp/
  stamp gemm_check
  QATFLOW_GEMM=cublaslt timeout 120 $B/gemm_check > $OUT/gemm_check.json 2> $OUT/gemm_check.err
  echo "rc $?"; grep -o '"ok": *[a-z]*' $OUT/gemm_check.json; tail -2 $OUT/gemm_check.err
  stamp cuda_decoder tests
  timeout 150 $B/cuda_decoder --ignored --test-threads 1 2>&1 | grep "test \|result"
  stamp ptq
  B=$B bash scripts/device/ptq_compare.sh .gpu/tok 3 64
  stamp end ;;
ptq)
  stamp ptq; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  xz -dc .gpu/qatflow.xz > $B/qatflow && chmod +x $B/qatflow
  B=$B bash scripts/device/ptq_compare.sh .gpu/tok ${2:-3} ${3:-64}
  W=/tmp/ptq; q() { timeout 200 $B/qatflow quantize $W/qwen --out $W/qf --calib-token-ids $W/ids.json \
    --calib-samples ${3:-64} --device cuda --force 2>&1 | grep "quantize:" | cut -c1-300; }
  stamp qatflow, CUBECL_AUTOTUNE_LEVEL=minimal; CUBECL_AUTOTUNE_LEVEL=minimal q
  stamp qatflow, CubeCL logs; rm -f /tmp/cubecl.log; CUBECL_DEBUG_LOG=1 q
  ls -la /tmp/cubecl.log; head -c 30000000 /tmp/cubecl.log | xz -T4 -3 > $OUT/cubecl.log.xz
  stamp end ;;
part)
  cp .xfer/p*/part* $P/ && ls -la $P ;;
start)
  cp .xfer/p*/part* $P/; ls -la $P
  join_and_import
  stamp demo
  start_driver /tmp/demo_gpu.toml
  sleep 5; follow 480 ;;
poll)
  follow ${2:-560} ;;
esac
