#!/bin/bash
# Runs `qatflow demo --budget full --device cuda` on the GPU machine (scripts/device/call_s5.sh
# start) and retries it once per known failure: the demo resumes finished stages, so a retry
# redoes only the stage that failed.
#   - a training stage out of GPU memory: that stage retried from scratch with half the
#     budget's micro_batch;
#   - the QAD stage failing otherwise: retried without QAD (qad_epochs = 0), so the export,
#     evaluation and bench of the other models still run.
# Usage: demo_driver.sh QATFLOW DIR RECIPE
Q=$1; D=$2; R=$3
run() { echo "driver: $(date +%T) qatflow demo (recipe: $(grep -E 'micro_batch|qad_epochs' $R | head -2 | tr '\n' ' '))"
  $Q demo --dir $D --budget full --device cuda --recipe $R; }
run && exit 0
if grep -qi "out of memory\|OutOfMemory" /tmp/demo.log; then
  m=$(grep -m1 '^micro_batch' $R | grep -o '[0-9]*'); sed -i "0,/^micro_batch = .*/s//micro_batch = $((m / 2))/" $R
  # The failed stage's checkpoints have the old micro-batch in their config hash: start it over.
  for s in sft qat qad; do [ -f $D/stages/$s.json ] || { rm -rf $D/runs/$s; break; }; done
  echo "driver: out of memory, micro_batch $m -> $((m / 2))"; run && exit 0
fi
if [ -f $D/stages/qat.json ] && [ ! -f $D/stages/qad.json ]; then
  sed -i "0,/^qad_epochs = .*/s//qad_epochs = 0/" $R
  echo "driver: QAD failed, the demo goes on without it"; run && exit 0
fi
echo "driver: demo failed"; exit 1
