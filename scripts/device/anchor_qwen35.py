"""The ModelOpt QAT anchor for Qwen3.5 (issue 16): transformers' Qwen3_5ForCausalLM of the same
shape as `qatflow bench-train --model qwen3.5-2b | qwen3.5-9b`, random init, sequence 2048,
batch 1, gradient checkpointing, AdamW on bf16 parameters, NVFP4 fake quantization from
ModelOpt on the linears qatflow quantizes (every linear except `lm_head`, `in_proj_a`,
`in_proj_b`; `conv1d` stays unquantized). It reuses `qat_throughput` of the shared anchor
(`modelopt_qat_anchor.py`, copied next to this file as `.gpu/modelopt_qat_anchor.py`).

Without the optional `flash-linear-attention` and `causal-conv1d` packages transformers runs
Gated DeltaNet through its own torch implementation, as a plain install does.

  python3 anchor_qwen35.py qwen3.5-2b [qwen3.5-9b] [--steps N]   # writes $OUT/anchor_results.json
"""
import copy
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", ".gpu"))
import modelopt_qat_anchor as anchor  # noqa: E402


def qwen35(hidden, intermediate, layers, heads, kv_heads, lin_k, lin_v, tied):
    """The values of qatflow's `qwen35_json` (crates/model/src/arch/init.rs)."""
    from transformers import Qwen3_5TextConfig
    types = ["full_attention" if (i + 1) % 4 == 0 else "linear_attention" for i in range(layers)]
    return Qwen3_5TextConfig(
        vocab_size=248320, hidden_size=hidden, intermediate_size=intermediate,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        head_dim=256, rms_norm_eps=1e-6, attn_output_gate=True, full_attention_interval=4,
        layer_types=types, linear_conv_kernel_dim=4, linear_key_head_dim=128,
        linear_num_key_heads=lin_k, linear_num_value_heads=lin_v, linear_value_head_dim=128,
        partial_rotary_factor=0.25,
        rope_parameters={"rope_type": "default", "rope_theta": 10000000.0,
                         "partial_rotary_factor": 0.25},
        tie_word_embeddings=tied, max_position_embeddings=262144, hidden_act="silu")


CONFIGS = {
    "qwen3.5-2b": lambda: qwen35(2048, 6144, 24, 8, 2, 16, 16, True),
    "qwen3.5-9b": lambda: qwen35(4096, 12288, 32, 16, 4, 16, 32, False),
}

if __name__ == "__main__":
    import torch
    import modelopt
    import transformers
    import modelopt.torch.quantization as mtq

    args = sys.argv[1:]
    steps = 8
    if "--steps" in args:
        i = args.index("--steps")
        steps = int(args[i + 1])
        del args[i:i + 2]
    print("modelopt", modelopt.__version__, "transformers", transformers.__version__, "torch",
          torch.__version__, torch.cuda.get_device_name(), flush=True)
    cfg = copy.deepcopy(mtq.NVFP4_DEFAULT_CFG)
    for pattern in ("*conv1d*", "*in_proj_a*", "*in_proj_b*"):
        if isinstance(cfg["quant_cfg"], list):  # ModelOpt 0.47: ordered entries, later ones win
            cfg["quant_cfg"].append({"quantizer_name": pattern, "enable": False})
        else:
            cfg["quant_cfg"][pattern] = {"enable": False}
    mtq.NVFP4_DEFAULT_CFG = cfg  # qat_throughput reads it at call time
    for name in args or ["qwen3.5-2b"]:
        for quant in (False, True):
            try:
                anchor.qat_throughput(name, CONFIGS[name](), steps=steps, quant=quant)
            except torch.OutOfMemoryError as e:
                anchor.results[f"{name} quant={quant} seq=2048"] = {"error": f"OOM: {e}"[:300]}
                print(name, quant, "OOM", flush=True)
                torch.cuda.empty_cache()
    os.makedirs(anchor.OUT, exist_ok=True)
    with open(os.path.join(anchor.OUT, "anchor_results.json"), "w") as f:
        json.dump(anchor.results, f, indent=1)
