#!/bin/bash
# PTQ of a random-init Qwen3-1.7B shape on the GPU machine, ModelOpt 0.47
# (scripts/device/modelopt_ptq_anchor.py) and `qatflow quantize --device cuda` in turn on the
# same token ids (conversations of the offline dataset, tokenized with the tokenizer of TOKDIR),
# every run timed; JSON lines into $OUT/ptq.jsonl, qatflow's logs into $OUT. Needs the qatflow
# binary in $B and the wheels of ../shared/bench/README.md in .xfer/whl/.
# TOKDIR holds the tokenizer's files (tokenizer.json may travel as tokenizer.json.xz).
# Usage: ptq_compare.sh TOKDIR RUNS N...   (N: calibration sequences, one comparison each;
# QATFLOW_ONLY=1 skips ModelOpt)
RUNS=$2; W=/tmp/ptq; TOK=$W/tok; mkdir -p $TOK
cp $1/*.json $TOK/; [ -f $1/tokenizer.json.xz ] && xz -dc $1/tokenizer.json.xz > $TOK/tokenizer.json
shift 2
pip install --no-deps --target $W/py .xfer/whl/*.whl > $W/pip.log 2>&1; echo "pip rc $?"
$B/qatflow model init --config qwen3-1.7b --out $W/qwen --bf16 --tokenizer-from $TOK 2>&1 | tail -1
$B/qatflow generate --backend offline --seed 0 --db $W/db > /dev/null 2>&1
$B/qatflow dataset export --db $W/db --out $W/all.jsonl --clean-only --force 2>&1 | tail -1
python3 - <<'PY'
import json
from tokenizers import Tokenizer
tok = Tokenizer.from_file("/tmp/ptq/qwen/tokenizer.json")
ids = []
for line in open("/tmp/ptq/all.jsonl"):
    text = "\n".join(f"{m['role']}: {m['content']}" for m in json.loads(line)["messages"] if m.get("content"))
    ids.append(tok.encode(text).ids[:2048])
    if len(ids) == 512: break
json.dump(ids, open("/tmp/ptq/ids.json", "w"))
print("ids", len(ids), "tokens", sum(map(len, ids)))
PY
for n in "$@"; do
  for run in $(seq $RUNS); do
    [ -z "$QATFLOW_ONLY" ] && echo "=== $(date +%T) modelopt $n run $run" && PYTHONPATH=$W/py timeout 200 python3 scripts/device/modelopt_ptq_anchor.py $W/qwen $W/ids.json $n $W/mo 2>&1 \
      | grep -v -i warn | tail -2 | tee -a $OUT/ptq.jsonl
    echo "=== $(date +%T) qatflow $n run $run"
    t0=$(date +%s.%N)
    timeout 300 $B/qatflow quantize $W/qwen --out $W/qf --calib-token-ids $W/ids.json \
      --calib-samples $n --device cuda --force > $W/qf.log 2>&1; rc=$?
    t1=$(date +%s.%N)
    echo "{\"side\": \"qatflow\", \"run\": $run, \"sequences\": $n, \"rc\": $rc, \"total_s\": $(awk "BEGIN{print $t1 - $t0}")}" | tee -a $OUT/ptq.jsonl
    grep -v "^\s*$" $W/qf.log | tail -4 | cut -c1-300; cp $W/qf.log $OUT/qf_${n}_$run.log
  done
done
cp $W/qf/export_report.json $OUT/qatflow_ptq_export_report.json 2>/dev/null
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
