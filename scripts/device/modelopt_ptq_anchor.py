"""Reference point for `qatflow quantize --device cuda` (issue 15): NVIDIA ModelOpt 0.47 PTQ
(NVFP4_DEFAULT_CFG, max calibration) of a Hugging Face model directory on the GPU, then its
Hugging Face export, timed stage by stage. Both sides calibrate on the same token ids.

  python3 modelopt_ptq_anchor.py MODEL_DIR IDS.json N OUT_DIR     # prints one JSON line

IDS.json is a JSON array of token-id arrays (what `qatflow quantize --calib-token-ids`
reads); the first N are used, one sequence per forward pass (ModelOpt's calibration loop).
Needs torch + transformers and nvidia-modelopt 0.47.0 with its wheels (see
../shared/bench/README.md)."""
import json, sys, time
import torch

model_dir, ids_path, n, out_dir = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
from transformers import AutoModelForCausalLM
import modelopt
import modelopt.torch.quantization as mtq
from modelopt.torch.export import export_hf_checkpoint

ids = [torch.tensor([s], device="cuda") for s in json.load(open(ids_path))[:n]]
t0 = time.time()
model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.bfloat16).cuda().eval()
torch.cuda.synchronize(); t1 = time.time()

def loop(m):
    with torch.no_grad():
        for x in ids:
            m(x)

model = mtq.quantize(model, mtq.NVFP4_DEFAULT_CFG, loop)
torch.cuda.synchronize(); t2 = time.time()
export_hf_checkpoint(model, export_dir=out_dir)
torch.cuda.synchronize(); t3 = time.time()
print(json.dumps({
    "side": "modelopt", "modelopt": modelopt.__version__, "torch": torch.__version__,
    "gpu": torch.cuda.get_device_name(), "sequences": len(ids),
    "tokens": sum(x.shape[1] for x in ids),
    "load_s": round(t1 - t0, 2), "calibrate_s": round(t2 - t1, 2), "export_s": round(t3 - t2, 2),
    "calibrate_plus_export_s": round(t3 - t1, 2), "total_s": round(t3 - t0, 2),
    "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}), flush=True)
