#!/usr/bin/env bash
# Runs every check CI runs: formatting, lints (warnings are errors) and the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
need=()
command -v cc >/dev/null 2>&1 || need+=(build-essential)
# The GPU kernels' tests run them on a software Vulkan device (Mesa's lavapipe).
ls /usr/share/vulkan/icd.d/lvp_icd.*.json >/dev/null 2>&1 || need+=(mesa-vulkan-drivers libvulkan1)
if [ ${#need[@]} -gt 0 ]; then
  $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}"
fi
# Incremental caches double the target directory and buy nothing on a one-shot CI build.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo test --workspace --locked
