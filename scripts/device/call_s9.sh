#!/bin/bash
# Device calls of 2026-12-07 (one H100): the CUDA decoder (issue 14).
#   decode   the decoder's GPU tests (crates/model/tests/cuda_decoder.rs, CUDA graphs on and
#            off), then on a random SmolLM2-135M (qatflow model init, SmolLM2's tokenizer from
#            .gpu/tok): generate_bench --decoder both (burn and the CUDA decoder in turn, BF16;
#            the CUDA decoder also with QATFLOW_CUDA_GRAPHS=off), the time to the first token
#            after a ~3,000-token prompt, with ANCHOR=1 transformers' decode anchor
#            (../shared/bench/decode_anchor.py, copied to .gpu/) in the same call; NVFP4 PTQ of
#            the random model (qatflow quantize --device cuda) and its decode speed and TTFT
#            (W4A4 emulated); qatflow bench (tool calling) through qatflow serve on the GPU
#   profile  the GPU tests, the prefill's time at ~750, 1,500 and 3,000 tokens, Nsight Compute's
#            time of every kernel of a 3,000-token prefill (scripts/device/ncu_summary.py)
#   part     keeps the GGUF part carried in .xfer/pN/ (SmolLM2-135M-Instruct's 98 MB GGUF,
#            xz-compressed, travels in three parts over consecutive calls to the warm machine)
#   real     the last part; joins and imports the GGUF, then on the real SmolLM2-135M-Instruct:
#            generate_bench (BF16, and float32 for the same tokens as burn), NVFP4 PTQ, generate_bench (NVFP4 W4A4), and qatflow bench
#            (the whole suite) through qatflow serve on the GPU for both
# Binaries travel stripped and xz-compressed in .gpu/ (qatflow, generate_bench, cuda_decoder).
# Usage: bash scripts/device/call_s9.sh STEP
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH}
B=/tmp/bin; M=/tmp/smol; P=/tmp/gguf_parts; W=/tmp/work; mkdir -p $B $P $W
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
quantize() { # SRC DST: NVFP4 PTQ on the GPU
  stamp "quantize $1"
  timeout 200 $B/qatflow quantize $1 --out $2 --calib config/examples/qat_v4_example.jsonl --calib-samples 16 --device cuda 2>&1 | tail -3
}
case $1 in
decode)
  stamp start; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  unpack
  stamp tests
  timeout 150 $B/cuda_decoder --ignored --nocapture --test-threads 1 2>&1 | tail -40
  QATFLOW_CUDA_GRAPHS=off timeout 90 $B/cuda_decoder --ignored --test-threads 1 2>&1 | grep "test result"
  bench decode_bf16 --model-dir $M --precision bf16 --decoder both --tokens 200 --runs 3
  QATFLOW_CUDA_GRAPHS=off bench decode_bf16_direct --model-dir $M --precision bf16 --decoder auto --tokens 200 --runs 5
  bench ttft_3000 --model-dir $M --precision bf16 --decoder auto --tokens 8 --runs 5 --repeat 250
  [ -n "$ANCHOR" ] && { stamp anchor; OUT=$OUT timeout 150 python3 .gpu/decode_anchor.py 2>&1 | grep -v Warning | tail -4; }
  quantize $M $W/nvfp4
  bench decode_nvfp4 --model-dir $W/nvfp4 --precision bf16 --decoder auto --tokens 200 --runs 5
  bench ttft_3000_nvfp4 --model-dir $W/nvfp4 --precision bf16 --decoder auto --tokens 8 --runs 5 --repeat 250
  stamp "serve bench"
  timeout 90 $B/qatflow bench $M --serve-arg=--device --serve-arg=cuda --category tool_calling \
    --max-tokens 32 --runs 3 --out $OUT/serve_random_bf16.json 2>&1 | tail -14
  stamp end ;;
profile)  # the GPU tests, then where a long prefill's time goes
  stamp start; unpack
  timeout 150 $B/cuda_decoder --ignored --nocapture --test-threads 1 2>&1 | grep -v "same arg-max true" | tail -30
  for r in 62 125 250; do
    bench ttft_r$r --model-dir $M --precision bf16 --decoder auto --tokens 2 --runs 5 --repeat $r
  done
  stamp ncu
  NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
  timeout 240 $NCU --clock-control none --metrics gpu__time_duration.sum --csv \
    --log-file $OUT/ncu.csv $B/generate_bench --device cuda --model-dir $M --precision bf16 \
    --decoder auto --tokens 2 --runs 1 --repeat 250 > /dev/null 2> $OUT/ncu.err
  echo "rc $?"; tail -2 $OUT/ncu.err
  python3 scripts/device/ncu_summary.py $OUT/ncu.csv 2>&1 | head -30
  stamp end ;;
part)
  cp .xfer/p*/part* $P/ && ls -la $P ;;
real)
  cp .xfer/p*/part* $P/; ls -la $P
  cat $P/part* | xz -dc > /tmp/smol.gguf && sha256sum /tmp/smol.gguf
  R=/tmp/real; $B/qatflow model import-gguf /tmp/smol.gguf --out $R 2>&1 | tail -1
  bench real_bf16 --model-dir $R --precision bf16 --decoder both --tokens 200 --runs 3
  bench real_f32 --model-dir $R --precision f32 --decoder both --tokens 100 --runs 1
  quantize $R $W/real_nvfp4
  bench real_nvfp4 --model-dir $W/real_nvfp4 --precision bf16 --decoder auto --tokens 200 --runs 5
  for m in $R $W/real_nvfp4; do
    stamp "serve bench $m"
    timeout 150 $B/qatflow bench $m --serve-arg=--device --serve-arg=cuda --max-tokens 64 \
      --out $OUT/serve_real_$(basename $m).json 2>&1 | tail -14
  done
  stamp end ;;
esac
