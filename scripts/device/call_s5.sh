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
#           64 and 512 calibration sequences of the offline dataset, each timed
# Usage: bash scripts/device/call_s5.sh STEP [SECONDS]
. scripts/device/gguf_parts.sh
follow() { # tails the demo log until the driver ends or $1 seconds pass
  local end=$((SECONDS + $1))
  # By pid: `pgrep -f demo_driver.sh` also matches a call whose own command names the driver.
  while [ $SECONDS -lt $end ] && kill -0 "$(cat /tmp/driver.pid 2>/dev/null)" 2>/dev/null; do sleep 5; done
  grep "^==>\|^driver" /tmp/demo.log | tail -30; tail -4 /tmp/demo.log | cut -c1-300
  nvidia-smi --query-gpu=memory.used --format=csv,noheader
  tar czf $OUT/demo_gpu.tgz --exclude='*.safetensors' --exclude='db' --exclude='models' \
    --exclude='*.jsonl' --exclude='*.gguf' -C /tmp demo demo.log 2>/dev/null; ls -la $OUT
}
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
  W=/tmp/ptq; mkdir -p $W; cd $W
  pip install --no-deps --target $W/py $OLDPWD/.xfer/whl/*.whl > /dev/null 2>&1
  /tmp/qatflow model init --config qwen3-1.7b --out $W/qwen --bf16 --tokenizer-from $D/models/smollm2 2>&1 | tail -1
  /tmp/qatflow generate --backend offline --seed 0 --db $W/db > /dev/null 2>&1
  /tmp/qatflow dataset export --db $W/db --out $W/all.jsonl --clean-only --force 2>&1 | tail -1
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
  for n in 64 512; do
    stamp modelopt $n
    PYTHONPATH=$W/py timeout 200 python3 $OLDPWD/scripts/device/modelopt_ptq_anchor.py $W/qwen $W/ids.json $n $W/mo_$n 2>&1 \
      | grep -v -i warn | tail -2 | tee -a $OUT/ptq.jsonl
    stamp qatflow $n
    t0=$(date +%s.%N)
    timeout 300 /tmp/qatflow quantize $W/qwen --out $W/qf_$n --calib-token-ids $W/ids.json \
      --calib-samples $n --device cuda --force > $W/qf_$n.log 2>&1; rc=$?
    t1=$(date +%s.%N)
    echo "{\"side\": \"qatflow\", \"sequences\": $n, \"rc\": $rc, \"total_s\": $(awk "BEGIN{print $t1 - $t0}")}" | tee -a $OUT/ptq.jsonl
    tail -3 $W/qf_$n.log | cut -c1-300
  done
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader ;;
esac
