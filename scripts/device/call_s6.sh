#!/bin/bash
# Device calls prepared on 2026-12-07 (sixth session, which had no device time left: not run
# yet) for one machine with 4 GPUs (nvidia-h100-x4): the demo's shipped full
# recipe (`qatflow demo --budget full`: 1,000 conversations, SFT 3 epochs, QAT 5, QAD 5) on
# the real SmolLM2-135M-Instruct (issue 15), with PTQ, QAT and QAD side by side on GPUs 0-2
# and each model's bench on a GPU of its own; meanwhile GPU 3 times `qatflow quantize
# --device cuda` against ModelOpt's PTQ on a Qwen3-1.7B shape (`call_s5.sh ptq`).
#   first   the binary from .gpu/, GGUF part 1
#   part    the GGUF part in .xfer/
#   start   joins the parts, imports the GGUF, starts scripts/device/demo_driver.sh with the
#           shipped config/demo/demo.toml in its own session, follows it
#   ptq     (wheels in .xfer/whl/) the PTQ comparison on GPU 3, then follows the demo
#   poll    follows the running demo; packs its results into $OUT/demo_gpu.tgz
# Usage: bash scripts/device/call_s6.sh STEP [SECONDS]
. scripts/device/gguf_parts.sh
case $1 in
first)
  stamp first; nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader
  unpack_binaries; ls -la $P; stamp done ;;
part)
  take_part ;;
start)
  take_part; join_and_import
  cp config/demo/demo.toml /tmp/demo_recipe.toml
  stamp demo
  start_driver /tmp/demo_recipe.toml
  sleep 5; follow ${2:-60} ;;
ptq)
  CUDA_VISIBLE_DEVICES=3 bash scripts/device/call_s5.sh ptq
  follow ${2:-10} ;;
poll)
  follow ${2:-540} ;;
esac
