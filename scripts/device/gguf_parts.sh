# Shared steps of the device calls that carry SmolLM2-135M-Instruct's 98 MB GGUF, which
# exceeds one call's 64 MiB tree: it travels xz-compressed in parts over consecutive calls
# to one warm machine. Sourced by call_s4.sh, call_s5.sh, call_s6.sh and call_s10.sh: sets the CUDA library
# path, P (the parts folder), D (the demo folder) and `stamp`, and defines the transfer steps,
# the start of the demo driver and `follow`.
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH}
P=/tmp/gguf_parts; D=/tmp/demo; mkdir -p $P
stamp() { echo "=== $(date +%T) $*"; }

# The stripped binaries (.gpu/*.xz) into /tmp, and the first GGUF part.
unpack_binaries() {
  for f in .gpu/*.xz; do n=$(basename $f .xz); xz -dc $f > /tmp/$n && chmod +x /tmp/$n; done
  cp .gpu/part* $P/; cp .gpu/demo_gpu.toml /tmp/
}

# A later part (in .xfer/).
take_part() {
  cp .xfer/part* $P/ 2>/dev/null; ls -la $P
}

# Starts scripts/device/demo_driver.sh with the recipe $1 in its own session (its pid in
# /tmp/driver.pid, its output in /tmp/demo.log).
start_driver() {
  setsid nohup bash scripts/device/demo_driver.sh /tmp/qatflow $D "$1" \
    > /tmp/demo.log 2>&1 < /dev/null &
  echo $! > /tmp/driver.pid
}

# Joins the parts into /tmp/smol.gguf and imports it as the demo's base model.
join_and_import() {
  cat $P/part* | xz -dc > /tmp/smol.gguf && sha256sum /tmp/smol.gguf
  /tmp/qatflow model import-gguf /tmp/smol.gguf --out $D/models/smollm2 2>&1 | tail -2
}

# Tails the demo log until the driver ends or $1 seconds pass (by pid: `pgrep -f
# demo_driver.sh` also matches a call whose own command names the driver), shows each lane's
# log end and the GPUs' memory, and packs the demo's results (no weights, databases or
# training data) into $OUT/demo_gpu.tgz.
follow() {
  local end=$((SECONDS + $1))
  while [ $SECONDS -lt $end ] && kill -0 "$(cat /tmp/driver.pid 2>/dev/null)" 2>/dev/null; do sleep 5; done
  grep "^==>\|^driver\|GPU" /tmp/demo.log | tail -30; tail -4 /tmp/demo.log | cut -c1-300
  for f in $D/logs/*.log; do [ -f "$f" ] && { echo "--- $f"; tail -2 "$f" | cut -c1-200; }; done
  nvidia-smi --query-gpu=index,memory.used,utilization.gpu --format=csv,noheader
  tar czf $OUT/demo_gpu.tgz --exclude='*.safetensors' --exclude='db' --exclude='models' \
    --exclude='*.gguf' --exclude='train.jsonl' --exclude='all.jsonl' \
    -C /tmp demo demo.log $(cd /tmp && ls demo_recipe.toml 2>/dev/null)
  ls -la $OUT
}
