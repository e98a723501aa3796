#!/bin/bash
# Device calls of 2026-12-07 (seventh session, one H100): the CUDA decoder (issue 14).
#   decode   the decoder's GPU tests (crates/model/tests/cuda_decoder.rs), then on a random
#            SmolLM2-135M (qatflow model init, SmolLM2's tokenizer from .gpu/tok):
#            generate_bench --decoder both (burn and the CUDA decoder in turn, BF16; the
#            CUDA decoder also with QATFLOW_CUDA_GRAPHS=off),
#            the time to the first token after a ~3,000-token prompt, and transformers'
#            decode anchor (../shared/bench/decode_anchor.py, copied to .gpu/) in the same call,
#            then qatflow bench (tool calling) through qatflow serve on the GPU
#   quick    the tests, the BF16 comparison, the long-prompt TTFT and the eager anchor only
#   serve    NVFP4 PTQ of the random model (qatflow quantize --device cuda) and its decode
#            speed (W4A4 emulated), then qatflow serve + qatflow bench on both models
# Binaries travel stripped and xz-compressed in .gpu/ (qatflow, generate_bench, cuda_decoder).
# Usage: bash scripts/device/call_s7.sh STEP
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH}
export QATFLOW_DECODER=cuda  # the CUDA decoder is opt-in
B=/tmp/bin; M=/tmp/smol; mkdir -p $B
stamp() { echo "=== $(date +%T) $*"; }
unpack() {
  for f in .gpu/*.xz; do n=$(basename $f .xz); xz -dc $f > $B/$n && chmod +x $B/$n; done
  mkdir -p /tmp/tok && cp .gpu/tok/*.json /tmp/tok/ && xz -dc .gpu/tok/tokenizer.json.xz > /tmp/tok/tokenizer.json
  $B/qatflow model init --config smollm2-135m --out $M --bf16 --tokenizer-from /tmp/tok
}
bench() { # NAME ARGS...: generate_bench on the GPU, JSON into $OUT/NAME.json
  local name=$1; shift
  stamp "$name"
  timeout 200 $B/generate_bench --device cuda "$@" > $OUT/$name.json 2> $OUT/$name.err
  echo "rc $?"; python3 -c "
import json,sys
d=json.load(open('$OUT/$name.json'))
for r in d['results']:
    print(r['decoder'], 'prompt', d['prompt_tokens'], 'prefill_s', round(r['prefill_s_median'],4), 'decode tok/s', round(r['decode_tokens_per_s_median'],1))
print('same_tokens', d['same_tokens'], 'speedup', d['decode_speedup'])" 2>&1 | tail -5
  tail -2 $OUT/$name.err
}
case $1 in
decode)
  stamp start; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  unpack
  stamp tests
  timeout 240 $B/cuda_decoder --ignored --nocapture --test-threads 1 2>&1 | tail -45
  QATFLOW_CUDA_GRAPHS=off timeout 120 $B/cuda_decoder --ignored --test-threads 1 2>&1 | grep "test result"
  bench decode_bf16 --model-dir $M --precision bf16 --decoder both --tokens 200 --runs 3
  QATFLOW_CUDA_GRAPHS=off bench decode_bf16_direct --model-dir $M --precision bf16 --decoder auto --tokens 200 --runs 5
  bench ttft_3000 --model-dir $M --precision bf16 --decoder auto --tokens 8 --runs 5 --repeat 250
  stamp anchor
  OUT=$OUT timeout 200 python3 .gpu/decode_anchor.py 2>&1 | grep -v Warning | tail -4
  stamp "serve bench"
  timeout 120 $B/qatflow bench $M --serve-arg=--device --serve-arg=cuda --category tool_calling \
    --max-tokens 32 --runs 3 --out $OUT/serve_bf16.json 2>&1 | tail -14
  stamp end ;;
quick)  # decode's essentials, for a short lease
  stamp start; nvidia-smi --query-gpu=name --format=csv,noheader; unpack
  timeout 90 $B/cuda_decoder --ignored --nocapture --test-threads 1 2>&1 | tail -40
  bench decode_bf16 --model-dir $M --precision bf16 --decoder both --tokens 200 --runs 3
  bench ttft_3000 --model-dir $M --precision bf16 --decoder auto --tokens 8 --runs 3 --repeat 250
  OUT=$OUT timeout 60 python3 .gpu/decode_anchor.py 2>&1 | grep tok/s
  stamp end ;;
serve)
  stamp start; unpack
  W=/tmp/ptq; mkdir -p $W
  $B/qatflow generate --backend offline --seed 0 --db $W/db > /dev/null 2>&1
  $B/qatflow dataset export --db $W/db --out $W/all.jsonl --clean-only --force 2>&1 | tail -1
  stamp quantize
  timeout 200 $B/qatflow quantize $M --out $W/nvfp4 --calib $W/all.jsonl --calib-samples 16 --device cuda 2>&1 | tail -3
  bench decode_nvfp4 --model-dir $W/nvfp4 --precision bf16 --decoder both --tokens 200 --runs 3
  bench ttft_3000_nvfp4 --model-dir $W/nvfp4 --precision bf16 --decoder auto --tokens 8 --runs 5 --repeat 250
  for m in $M $W/nvfp4; do
    stamp "serve bench $m"
    timeout 150 $B/qatflow bench $m --serve-arg=--device --serve-arg=cuda --max-tokens 64 --out $OUT/serve_$(basename $m).json 2>&1 | tail -12
  done
  stamp end ;;
esac
