#!/bin/bash
# Device calls of 2026-12-06 (fourth session, one H100): the demo's full loop on the GPU
# (issue 15) with the real SmolLM2-135M-Instruct, whose 98 MB GGUF exceeds one call's
# 64 MiB tree, so it travels in parts over consecutive calls to one warm machine.
#   first      the binary from .gpu/, transformers' decode anchor, and GGUF part 1 (xz)
#   part       the GGUF part in .xfer/
#   start      joins the parts, imports the GGUF, starts `qatflow demo` in its own session
#              (with .gpu/demo_gpu.toml), follows it until the call's time is nearly up
#   poll       runs the fake-quant kernel's GPU conformance (gpu_check, from .xfer/) once,
#              follows the running demo; packs its results into $OUT/demo_gpu.tgz
#   qad        (not run yet: the session had too little device time left to start a machine)
#              QAT and QAD of a random-initialised SmolLM2-135M shape, 6 steps
#              each on 48 offline-teacher conversations: QAD runs on CUDA, and its step time
#              beside QAT's
# Usage: bash scripts/device/call_s4.sh STEP [SECONDS]
. scripts/device/gguf_parts.sh
follow() { # tails the demo log until the demo ends or $1 seconds pass
  local end=$((SECONDS + $1))
  while [ $SECONDS -lt $end ] && pgrep -f "qatflow demo" > /dev/null; do sleep 5; done
  grep "^==>" /tmp/demo.log | tail -30; tail -5 /tmp/demo.log | cut -c1-400
  nvidia-smi --query-gpu=memory.used --format=csv,noheader
  tar czf $OUT/demo_gpu.tgz --exclude='*.safetensors' --exclude='db' --exclude='models' \
    --exclude='*.jsonl' -C /tmp demo demo.log 2>/dev/null; ls -la $OUT
}
case $1 in
first)
  stamp first; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  unpack_binaries
  stamp decode-anchor; timeout 150 python3 .gpu/decode_anchor.py 2>&1 | grep -v Warning | tail -4
  stamp done ;;
part)
  take_part ;;
start)
  take_part; join_and_import
  stamp demo
  setsid nohup /tmp/qatflow demo --dir $D --budget full --device cuda --recipe /tmp/demo_gpu.toml \
    > /tmp/demo.log 2>&1 < /dev/null &
  sleep 5; follow ${2:-500} ;;
qad)
  for f in .gpu/*.xz; do n=$(basename $f .xz); xz -dc $f > /tmp/$n && chmod +x /tmp/$n; done
  /tmp/qatflow model init --config smollm2-135m --out /tmp/smol --bf16 --tokenizer-from .gpu/smoltok 2>&1 | tail -1
  /tmp/qatflow generate --backend offline --seed 0 --db /tmp/db > /dev/null 2>&1
  /tmp/qatflow dataset export --db /tmp/db --out /tmp/all.jsonl --clean-only --force 2>&1 | tail -1
  head -48 /tmp/all.jsonl > /tmp/train.jsonl
  for kind in qat qad; do
    stamp $kind
    timeout 200 /tmp/qatflow train --config config/demo/$kind.toml --base /tmp/smol --data /tmp/train.jsonl \
      --output-dir /tmp/run_$kind --device cuda --epochs 1 --max-seq-len 2048 --calib-samples 8 \
      --max-steps 6 --json > $OUT/train_$kind.jsonl 2> $OUT/train_$kind.log
    echo "rc=$?"; tail -2 $OUT/train_$kind.log | cut -c1-300
    grep -h '"Step"\|"step"' $OUT/train_$kind.jsonl | tail -6 | cut -c1-300
  done
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader ;;
poll)
  if [ -f .xfer/gpu_check.xz ] && [ ! -f /tmp/gpu_check.txt ]; then
    xz -dc .xfer/gpu_check.xz > /tmp/gpu_check && chmod +x /tmp/gpu_check
    stamp gpu_check; timeout 120 /tmp/gpu_check > /tmp/gpu_check.txt 2>&1; echo "rc=$?"; tail -15 /tmp/gpu_check.txt
  fi
  cp /tmp/gpu_check.txt $OUT/ 2>/dev/null
  follow ${2:-540} ;;
esac
