"""The tiny Qwen3.5 of the ModelOpt 0.47 fixtures on a device (issue 16: "the same holds on the
GPU"). Standard library only.

  python3 q35tiny.py setup DIR      # DIR/model (config.json + model.safetensors), DIR/ids.json,
                                    # DIR/ids_long.json (two 150-token sequences across chunks)
  python3 q35tiny.py compare DIR OUT
      # reads OUT/q35tiny_nll_{cpu,cuda}.json and OUT/q35tiny_decode_*.json written by
      # `qatflow eval nll|decode`, prints them beside transformers' float32 NLL (from the
      # logits in crates/model/tests/fixtures/qwen35_tiny_hf_logits_f32.safetensors) and
      # writes OUT/q35tiny_summary.json
"""
import json
import math
import os
import random
import struct
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
META = os.path.join(ROOT, "crates/model/tests/fixtures/qwen35_tiny_meta.json")
LOGITS = os.path.join(ROOT, "crates/model/tests/fixtures/qwen35_tiny_hf_logits_f32.safetensors")
WEIGHTS = os.path.join(ROOT, "tests/fixtures/modelopt-0.47.0/qwen35_tiny_bf16.safetensors")


def setup(d):
    meta = json.load(open(META))
    os.makedirs(os.path.join(d, "model"), exist_ok=True)
    with open(os.path.join(d, "model", "config.json"), "w") as f:
        json.dump(meta["source_config.json"], f)
    link = os.path.join(d, "model", "model.safetensors")
    if not os.path.exists(link):
        os.symlink(os.path.abspath(WEIGHTS), link)
    with open(os.path.join(d, "ids.json"), "w") as f:
        json.dump(meta["ids"], f)
    rng = random.Random(0)
    vocab = meta["source_config.json"].get("vocab_size") or meta["source_config.json"]["text_config"]["vocab_size"]
    with open(os.path.join(d, "ids_long.json"), "w") as f:
        json.dump([[rng.randrange(vocab) for _ in range(150)] for _ in range(2)], f)


def hf_nll():
    """Per-sequence mean NLL from transformers' float32 logits [2, 48, vocab]."""
    raw = open(LOGITS, "rb").read()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    info = header["logits"]
    b, t, v = info["shape"]
    start, end = info["data_offsets"]
    flat = struct.unpack(f"<{b * t * v}f", raw[8 + n + start:8 + n + end])
    out = []
    for s, seq in enumerate(json.load(open(META))["ids"]):
        total = 0.0
        for p in range(len(seq) - 1):
            row = flat[(s * t + p) * v:(s * t + p + 1) * v]
            m = max(row)
            lse = m + math.log(sum(math.exp(x - m) for x in row))
            total += lse - row[seq[p + 1]]
        out.append(total / (len(seq) - 1))
    return out


def compare(d, out):
    want = hf_nll()
    summary = {"transformers_f32_nll": want}
    for name in sorted(os.listdir(out)):
        if name.startswith("q35tiny_") and name.endswith(".json") and name != "q35tiny_summary.json":
            try:
                summary[name[:-5]] = json.load(open(os.path.join(out, name)))
            except ValueError as e:
                summary[name[:-5]] = {"error": str(e)}
    for key, rep in summary.items():
        if key.startswith("q35tiny_nll") and "sequences" in rep:
            got = [s["mean_nll"] for s in rep["sequences"]]
            diff = max(abs(a - b) for a, b in zip(got, want))
            rep["max_abs_diff_vs_transformers"] = diff
            print(f"{key}: {['%.6f' % g for g in got]} transformers {['%.6f' % w for w in want]} max |Δ| {diff:.2e}")
        elif key.startswith("q35tiny_decode") and "max_abs_diff" in rep:
            print(f"{key}: max |Δlogit| decode vs chunked forward {rep['max_abs_diff']:.2e}")
    with open(os.path.join(out, "q35tiny_summary.json"), "w") as f:
        json.dump(summary, f, indent=1)


if __name__ == "__main__":
    if sys.argv[1] == "setup":
        setup(sys.argv[2])
    else:
        compare(sys.argv[2], sys.argv[3])
