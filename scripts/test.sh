#!/usr/bin/env bash
# Runs every check CI runs: formatting, lints (warnings are errors) and the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v cc >/dev/null 2>&1 || { SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"; $SUDO apt-get update -qq && $SUDO apt-get install -y -qq build-essential; }
# Incremental caches double the target directory and buy nothing on a one-shot CI build.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo test --workspace --locked
