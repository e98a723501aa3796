#!/bin/bash
# Device calls of 2026-12-06 (fifth session, one H100/H200): the demo's full loop with QAD
# on the real SmolLM2-135M-Instruct (issue 15), and PTQ of a Qwen3-1.7B shape by
# `qatflow quantize --device cuda` beside ModelOpt's on the same token ids. The 98 MB GGUF
# travels xz-compressed in parts over consecutive calls to one warm machine.
#   first   the binary from .gpu/, GGUF part 1
#   part    the GGUF part in .xfer/
#   start   joins the parts, imports the GGUF, starts scripts/device/demo_driver.sh in its own
#           session (the demo with .gpu/demo_gpu.toml), follows it
#   poll    follows the running demo; packs its results into $OUT/demo_gpu.tgz
#   recut QAT QAD   stops the demo, sets the recipe's qat_epochs/qad_epochs, drops the
#           unfinished QAT run and restarts the driver (finished stages are kept); follows it
#   ptq     (after start: wheels of ../shared/bench/README.md in .xfer/whl/)
#           Qwen3-1.7B random-init (qatflow model init, SmolLM2's tokenizer): ModelOpt PTQ
#           (scripts/device/modelopt_ptq_anchor.py) and `qatflow quantize --device cuda`,
#           64 and 512 calibration sequences of the offline dataset, each timed (scripts/device/ptq_compare.sh)
# Usage: bash scripts/device/call_s5.sh STEP [SECONDS]
. scripts/device/gguf_parts.sh
case $1 in
first)
  stamp first; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  unpack_binaries; ls -la $P; stamp done ;;
part)
  take_part ;;
start)
  take_part; join_and_import
  stamp demo
  start_driver /tmp/demo_gpu.toml
  sleep 5; follow ${2:-500} ;;
poll)
  follow ${2:-540} ;;
recut)
  kill "$(cat /tmp/driver.pid)"; pkill -x qatflow; sleep 2
  sed -i "0,/^qat_epochs = .*/s//qat_epochs = $2/; 0,/^qad_epochs = .*/s//qad_epochs = $3/" /tmp/demo_gpu.toml
  [ -f $D/stages/qat.json ] || rm -rf $D/runs/qat
  mv /tmp/demo.log /tmp/demo_part1.log
  start_driver /tmp/demo_gpu.toml
  sleep 3; follow 540 ;;
ptq)
  B=/tmp bash scripts/device/ptq_compare.sh $D/models/smollm2 1 64 512 ;;
esac
