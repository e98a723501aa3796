# Shared steps of the device calls that carry SmolLM2-135M-Instruct's 98 MB GGUF, which
# exceeds one call's 64 MiB tree: it travels xz-compressed in parts over consecutive calls
# to one warm machine. Sourced by call_s4.sh, call_s5.sh and call_s6.sh: sets the CUDA library
# path, P (the parts folder), D (the demo folder) and `stamp`, and defines the transfer steps
# and the start of the demo driver.
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
