#!/usr/bin/env bash
# CPU decoding speed of SmolLM2-135M-Instruct (F32, greedy): burn's forward and the packed CPU
# decoder (`qatflow_model::CpuDecoder`, what `qatflow serve` and `qatflow chat` use on the CPU),
# run by run in turn in one process (`generate_bench --decoder both`), for a short prompt and
# for the production system prompt sent as the message (804 tokens with the chat template). Writes one JSON object per case to OUT.
# Usage: scripts/bench_cpu_decode.sh [OUT.jsonl]   (default results/decode/cpu_<date>.jsonl)
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-results/decode/cpu_$(date +%F).jsonl}"
cargo build --release --locked --offline --example generate_bench
bench=target/release/examples/generate_bench
long="$(tr '\n' ' ' < config/teacher/system_prompt.txt)"
: > "$out"
"$bench" --decoder both --tokens 64 --runs 11 >> "$out"
"$bench" --decoder both --tokens 64 --runs 7 --prompt "$long" >> "$out"
python3 - "$out" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    cells = [f"{x['decoder']} {x['decode_tokens_per_s_median']:.1f} tok/s (prefill {x['prefill_tokens_per_s_median']:.0f} tok/s)" for x in r["results"]]
    print(f"prompt {r['prompt_tokens']} tokens, {r['runs']} runs: " + ", ".join(cells)
          + f"; decode speed-up {r['decode_speedup']:.2f}x, same tokens: {r['same_tokens']}")
PY
