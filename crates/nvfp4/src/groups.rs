//! The shared-input group rule: linears that read the same input (q/k/v; gate/up; Qwen3.5's
//! `in_proj_qkv`/`in_proj_z`) share one global amax (the group's largest) for both their
//! `weight_scale_2` and their `input_scale`. vLLM fuses each group into one GEMM and takes the
//! max of the shards' global scales without rescaling their block scales, so an export without
//! this rule serves wrong weights. ModelOpt applies it at export
//! (`unified_export_hf.py::requantize_resmooth_fused_llm_layers` → `preprocess_linear_fusion`).

/// Sibling sets of linear module names (last path component) that read the same input.
pub const SHARED_INPUT_GROUPS: &[&[&str]] = &[
    &["q_proj", "k_proj", "v_proj"],
    &["gate_proj", "up_proj"],
    &["in_proj_qkv", "in_proj_z"],
];

/// The module names of the group `module` belongs to (itself alone when it has no siblings).
///
/// `module` is a module path such as `model.layers.0.self_attn.k_proj`; the result lists full
/// paths, e.g. the `q_proj`, `k_proj` and `v_proj` of the same attention block.
pub fn shared_input_group(module: &str) -> Vec<String> {
    let (parent, leaf) = match module.rsplit_once('.') {
        Some((p, l)) => (Some(p), l),
        None => (None, module),
    };
    let Some(group) = SHARED_INPUT_GROUPS.iter().find(|g| g.contains(&leaf)) else {
        return vec![module.to_owned()];
    };
    group
        .iter()
        .map(|l| match parent {
            Some(p) => format!("{p}.{l}"),
            None => (*l).to_owned(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_follow_siblings() {
        assert_eq!(
            shared_input_group("model.layers.3.self_attn.v_proj"),
            [
                "model.layers.3.self_attn.q_proj",
                "model.layers.3.self_attn.k_proj",
                "model.layers.3.self_attn.v_proj"
            ]
        );
        assert_eq!(
            shared_input_group("m.mlp.up_proj"),
            ["m.mlp.gate_proj", "m.mlp.up_proj"]
        );
        assert_eq!(
            shared_input_group("la.in_proj_z"),
            ["la.in_proj_qkv", "la.in_proj_z"]
        );
        assert_eq!(shared_input_group("m.mlp.down_proj"), ["m.mlp.down_proj"]);
        assert_eq!(shared_input_group("o_proj"), ["o_proj"]);
    }
}
