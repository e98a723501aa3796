//! Which linears NVFP4 quantizes, per architecture, and how they share a global scale.
//!
//! Each architecture has one [`ArchLinears`] table: the quantized projections, the
//! shared-input groups, and the decoder-layer modules ModelOpt leaves in BF16. The exporter
//! selects tensors with [`quantized_module`] and [`exclude_modules`], calibration and the
//! checkpoint export apply [`shared_input_group`], and the model crate checks its layers
//! against the tables.
//!
//! The shared-input group rule: linears that read the same input (q/k/v; gate/up; Qwen3.5's
//! `in_proj_qkv`/`in_proj_z`) share one global amax (the group's largest) for both their
//! `weight_scale_2` and their `input_scale`. vLLM fuses each group into one GEMM and takes the
//! max of the shards' global scales without rescaling their block scales, so an export without
//! this rule serves wrong weights. ModelOpt applies it at export
//! (`unified_export_hf.py::requantize_resmooth_fused_llm_layers` → `preprocess_linear_fusion`).

/// The NVFP4 linears of one architecture, by last module-name component.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ArchLinears {
    /// The architectures the table covers.
    pub name: &'static str,
    /// The quantized projections.
    pub quantized: &'static [&'static str],
    /// Sibling sets of [`Self::quantized`] that read the same input.
    pub groups: &'static [&'static [&'static str]],
    /// Decoder-layer modules left in BF16 and named in `exclude_modules`.
    pub excluded: &'static [&'static str],
}

impl ArchLinears {
    /// Whether the module `module` (a path such as `model.layers.0.mlp.up_proj`, or a last
    /// component alone) is one of this architecture's quantized projections.
    pub fn quantizes(&self, module: &str) -> bool {
        self.quantized.contains(&leaf(module))
    }
}

/// Llama / SmolLM2 and Qwen3: attention and MLP projections.
pub const DENSE: ArchLinears = ArchLinears {
    name: "llama, qwen3",
    quantized: &[
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    ],
    groups: &[&["q_proj", "k_proj", "v_proj"], &["gate_proj", "up_proj"]],
    excluded: &[],
};

/// Qwen3.5: full-attention layers as [`DENSE`], Gated DeltaNet layers with `in_proj_qkv`,
/// `in_proj_z` and `out_proj`; the depthwise `conv1d` and the tiny `in_proj_a` / `in_proj_b`
/// (`[linear_num_value_heads, hidden]`) stay in BF16.
pub const QWEN3_5: ArchLinears = ArchLinears {
    name: "qwen3_5",
    quantized: &[
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
        "in_proj_qkv",
        "in_proj_z",
        "out_proj",
    ],
    groups: &[
        &["q_proj", "k_proj", "v_proj"],
        &["gate_proj", "up_proj"],
        &["in_proj_qkv", "in_proj_z"],
    ],
    excluded: &["conv1d", "in_proj_a", "in_proj_b"],
};

/// Every architecture's table.
pub const ARCHITECTURES: &[ArchLinears] = &[DENSE, QWEN3_5];

/// Modules ModelOpt always leaves unquantized (BF16) and lists first in `exclude_modules`.
pub const EXCLUDE_MODULES: &[&str] = &["lm_head", "model.embed_tokens"];

/// Name prefixes of decoder layers: text-only checkpoints (`model.layers.`) and the
/// language model of a VL checkpoint (`model.language_model.layers.`).
pub const LAYER_PREFIXES: &[&str] = &["model.layers.", "model.language_model.layers."];

/// Last component of a module path.
fn leaf(module: &str) -> &str {
    module.rsplit('.').next().unwrap_or(module)
}

fn in_layer(module: &str) -> bool {
    LAYER_PREFIXES.iter().any(|p| module.starts_with(p))
}

/// The module name if `tensor` is the weight of a linear some architecture quantizes
/// (`model.layers.N.….{q,k,v,o,gate,up,down}_proj.weight` or Qwen3.5's
/// `linear_attn.{in_proj_qkv,in_proj_z,out_proj}.weight`, of rank 2).
pub fn quantized_module<'a>(tensor: &'a str, shape: &[usize]) -> Option<&'a str> {
    let module = tensor.strip_suffix(crate::keys::WEIGHT)?;
    let quantized = ARCHITECTURES.iter().any(|a| a.quantizes(module));
    (shape.len() == 2 && in_layer(module) && quantized).then_some(module)
}

/// `exclude_modules` of a model with these tensor names: [`EXCLUDE_MODULES`], then every
/// decoder-layer module an architecture leaves in BF16 ([`ArchLinears::excluded`]) that the
/// model has, in name order (as ModelOpt lists them).
pub fn exclude_modules<'a>(tensor_names: impl IntoIterator<Item = &'a str>) -> Vec<String> {
    let mut layers: Vec<String> = tensor_names
        .into_iter()
        .filter_map(|t| t.strip_suffix(crate::keys::WEIGHT))
        .filter(|m| in_layer(m) && ARCHITECTURES.iter().any(|a| a.excluded.contains(&leaf(m))))
        .map(str::to_owned)
        .collect();
    layers.sort();
    layers.dedup();
    EXCLUDE_MODULES
        .iter()
        .map(|m| (*m).to_owned())
        .chain(layers)
        .collect()
}

/// The module names of the group `module` belongs to (itself alone when it has no siblings).
///
/// `module` is a module path such as `model.layers.0.self_attn.k_proj`; the result lists full
/// paths, e.g. the `q_proj`, `k_proj` and `v_proj` of the same attention block.
pub fn shared_input_group(module: &str) -> Vec<String> {
    let (parent, leaf) = match module.rsplit_once('.') {
        Some((p, l)) => (Some(p), l),
        None => (None, module),
    };
    let Some(group) = ARCHITECTURES
        .iter()
        .flat_map(|a| a.groups)
        .find(|g| g.contains(&leaf))
    else {
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

    #[test]
    fn tables_are_consistent() {
        for arch in ARCHITECTURES {
            for group in arch.groups {
                assert!(group.iter().all(|m| arch.quantizes(m)), "{}", arch.name);
            }
            assert!(arch.excluded.iter().all(|m| !arch.quantizes(m)));
        }
        // A group means the same in every architecture that has its members.
        for a in ARCHITECTURES {
            for b in ARCHITECTURES {
                for g in a.groups {
                    if g.iter().all(|m| b.quantizes(m)) {
                        assert!(b.groups.contains(g), "{} vs {}", a.name, b.name);
                    }
                }
            }
        }
    }

    #[test]
    fn quantized_modules_are_the_projections() {
        fn q(n: &str) -> Option<&str> {
            quantized_module(n, &[32, 16])
        }
        assert_eq!(
            q("model.layers.3.self_attn.k_proj.weight"),
            Some("model.layers.3.self_attn.k_proj")
        );
        assert_eq!(
            q("model.layers.0.mlp.down_proj.weight"),
            Some("model.layers.0.mlp.down_proj")
        );
        assert_eq!(q("lm_head.weight"), None);
        assert_eq!(q("model.embed_tokens.weight"), None);
        assert_eq!(q("model.layers.0.self_attn.q_norm.weight"), None);
        assert_eq!(q("model.layers.0.self_attn.q_proj.bias"), None);
        assert_eq!(
            quantized_module("model.layers.0.mlp.up_proj.weight", &[16]),
            None
        );
        assert_eq!(
            q("model.layers.0.linear_attn.in_proj_qkv.weight"),
            Some("model.layers.0.linear_attn.in_proj_qkv")
        );
        assert_eq!(
            q("model.language_model.layers.2.linear_attn.out_proj.weight"),
            Some("model.language_model.layers.2.linear_attn.out_proj")
        );
        assert_eq!(q("model.layers.0.linear_attn.in_proj_a.weight"), None);
        assert_eq!(q("model.layers.0.linear_attn.conv1d.weight"), None);
        assert_eq!(q("mtp.layers.0.mlp.up_proj.weight"), None);
    }

    #[test]
    fn qwen3_5_exclusions_follow_the_tensors() {
        let names = [
            "model.layers.1.linear_attn.in_proj_b.weight",
            "model.layers.0.linear_attn.conv1d.weight",
            "model.layers.0.linear_attn.in_proj_a.weight",
            "model.layers.0.linear_attn.A_log",
            "model.layers.0.linear_attn.in_proj_qkv.weight",
            "model.layers.3.self_attn.q_proj.weight",
        ];
        assert_eq!(
            exclude_modules(names),
            [
                "lm_head",
                "model.embed_tokens",
                "model.layers.0.linear_attn.conv1d",
                "model.layers.0.linear_attn.in_proj_a",
                "model.layers.1.linear_attn.in_proj_b",
            ]
        );
        assert_eq!(
            exclude_modules(["model.layers.0.mlp.up_proj.weight"]),
            EXCLUDE_MODULES
        );
    }
}
