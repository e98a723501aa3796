#!/usr/bin/env bash
# Sets up qatflow on a fresh machine and runs the main job on the embedded default:
# build the `qatflow` binary; generate the v4 dataset with the offline teacher into the
# local sled store (every conversation checked on arrival, resumable); export it and
# validate it against the v4 gates; import the example dataset.
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
QATFLOW=target/release/qatflow
EXAMPLE=config/examples/qat_v4_example.jsonl
DB=qatflow-data/db

echo "==> qatflow generate --backend offline --resume --db $DB"
"$QATFLOW" generate --backend offline --resume --db "$DB"

echo "==> qatflow dataset export --out qatflow-data/teacher_v4.jsonl"
"$QATFLOW" dataset export --db "$DB" --out qatflow-data/teacher_v4.jsonl --force

echo "==> qatflow validate qatflow-data/teacher_v4.jsonl --profile v4"
"$QATFLOW" validate qatflow-data/teacher_v4.jsonl --profile v4

echo "==> qatflow validate $EXAMPLE --profile v4"
"$QATFLOW" validate "$EXAMPLE" --profile v4

echo "==> qatflow dataset import $EXAMPLE"
"$QATFLOW" dataset import "$EXAMPLE" --db "$DB"

echo "==> qatflow dataset stats"
"$QATFLOW" dataset stats --db "$DB"
