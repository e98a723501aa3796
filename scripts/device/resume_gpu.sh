#!/bin/bash
# The GPU resume check of issue 13: `qatflow train` on CUDA (training engine on), killed with
# SIGKILL after its second checkpoint and resumed with --resume, must end with weights
# byte-identical to an uninterrupted run, as the CPU test
# crates/cli/tests/train.rs::sigkill_after_a_checkpoint_then_resume_equals_an_uninterrupted_run
# shows on the CPU. Model: a random SmolLM2-135M (`qatflow model init`, seed 5) with SmolLM2's
# tokenizer; data: 8 conversations of config/examples/qat_v4_example.jsonl; QAT, BF16 Kahan,
# micro-batch 2 × 2 accumulated (both gradient paths), 3 epochs = 6 steps, a checkpoint a step.
# Usage: bash scripts/device/resume_gpu.sh TOKDIR   (TOKDIR as for ptq_compare.sh; binary /tmp/qatflow)
set -u
B=${B:-/tmp/qatflow}; W=/tmp/resume; rm -rf $W; mkdir -p $W/tok
cp $1/*.json $W/tok/; [ -f $1/tokenizer.json.xz ] && xz -dc $1/tokenizer.json.xz > $W/tok/tokenizer.json
$B model init --config smollm2-135m --seed 5 --bf16 --out $W/model --tokenizer-from $W/tok 2>&1 | tail -1
python3 - <<'PY'
import json
out = open("/tmp/resume/data.jsonl", "w")
for line in list(open("config/examples/qat_v4_example.jsonl"))[20:28]:
    v = json.loads(line)
    v["messages"] = [m for m in v["messages"] if m["role"] != "system"]
    out.write(json.dumps(v) + "\n")
PY
cat > $W/qat.toml <<'TOML'
[model]
base = "model"
[data]
jsonl = "data.jsonl"
max_seq_len = 512
[optim]
epochs = 3
lr = 1e-4
micro_batch = 2
grad_accum = 2
precision = "bf16-kahan"
moments = "bf16"
[quant]
calib_samples = 4
[run]
device = "cuda"
checkpoint_every = 1
keep_checkpoints = 10
TOML
export QATFLOW_GEMM=${QATFLOW_GEMM:-cublaslt}
echo "=== $(date +%T) uninterrupted"
timeout 90 $B train --config $W/qat.toml --output-dir $W/full > $W/full.log 2>&1; echo "rc=$?"; tail -2 $W/full.log
echo "=== $(date +%T) killed after checkpoint 2"
$B train --config $W/qat.toml --output-dir $W/part --json > /dev/null 2> $W/part.log & PID=$!
for i in $(seq 1 1200); do [ -e $W/part/checkpoints/step-00000002 ] && break; sleep 0.05; done
kill -9 $PID; wait $PID 2>/dev/null
ls $W/part/checkpoints
[ -e $W/part/checkpoints/step-00000006 ] && echo "the run finished before the kill: proves nothing"
echo "=== $(date +%T) resumed"
timeout 90 $B train --config $W/qat.toml --output-dir $W/part --resume > $W/resume.log 2>&1; echo "rc=$?"; tail -2 $W/resume.log
F=checkpoints/step-00000006/model.safetensors
sha256sum $W/full/$F $W/part/$F
cmp $W/full/$F $W/part/$F && echo "RESUME BIT-IDENTICAL: yes" || echo "RESUME BIT-IDENTICAL: no"
