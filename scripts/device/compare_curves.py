"""Compares the per-step training losses of two `qatflow bench-train` JSON reports (the
`qat` mode's `step_losses`): prints the largest relative difference per step and whether
every step agrees within 1 %.
  python3 compare_curves.py NEW.json OLD.json"""
import json, sys

def losses(path):
    return json.load(open(path))["qat"]["step_losses"]

new, old = losses(sys.argv[1]), losses(sys.argv[2])
n = min(len(new), len(old))
rel = [abs(a - b) / abs(b) for a, b in zip(new[:n], old[:n])]
worst = max(range(n), key=lambda i: rel[i]) if n else None
print(f"steps {n} (new {len(new)}, old {len(old)}); first {new[0]:.4f} vs {old[0]:.4f}; "
      f"last {new[n-1]:.4f} vs {old[n-1]:.4f}; max rel diff {rel[worst]:.4%} at step {worst}; "
      f"within 1 %: {all(r <= 0.01 for r in rel) and len(new) == len(old)}")
