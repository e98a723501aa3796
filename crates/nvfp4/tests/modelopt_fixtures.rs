//! Bit-exact agreement of the reference codec with NVIDIA ModelOpt 0.47 outputs
//! (`tests/fixtures/modelopt-0.47.0/`, see its README.md).

use std::collections::BTreeMap;
use std::path::PathBuf;

use half::bf16;
use qatflow_nvfp4::linears::shared_input_group;
use qatflow_nvfp4::{codec, input_scale, quantize, Nvfp4Tensor};
use safetensors::{Dtype, SafeTensors};

fn fixture(name: &str) -> Vec<u8> {
    let path: PathBuf = [
        env!("CARGO_MANIFEST_DIR"),
        "../../tests/fixtures/modelopt-0.47.0",
        name,
    ]
    .iter()
    .collect();
    std::fs::read(&path).unwrap_or_else(|e| panic!("fixture {}: {e}", path.display()))
}

/// A tensor of a fixture file: dtype, shape, raw little-endian bytes.
struct Raw {
    dtype: Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

fn load(bytes: &[u8]) -> BTreeMap<String, Raw> {
    let st = SafeTensors::deserialize(bytes).expect("fixture parses");
    st.tensors()
        .into_iter()
        .map(|(name, v)| {
            let raw = Raw {
                dtype: v.dtype(),
                shape: v.shape().to_vec(),
                data: v.data().to_vec(),
            };
            (name, raw)
        })
        .collect()
}

impl Raw {
    fn f32s(&self) -> Vec<f32> {
        assert_eq!(self.dtype, Dtype::F32);
        self.data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    }

    fn bf16s(&self) -> Vec<bf16> {
        assert_eq!(self.dtype, Dtype::BF16);
        self.data
            .chunks_exact(2)
            .map(|c| bf16::from_bits(u16::from_le_bytes([c[0], c[1]])))
            .collect()
    }

    fn scalar_bits(&self) -> u32 {
        assert!(
            self.dtype == Dtype::F32 && self.shape.is_empty(),
            "F32 scalar"
        );
        u32::from_le_bytes([self.data[0], self.data[1], self.data[2], self.data[3]])
    }
}

fn amax_of(values: impl Iterator<Item = f32>) -> f32 {
    values.fold(0.0f32, |m, v| m.max(v.abs()))
}

#[test]
fn nvfp4_vectors_bit_exact() {
    let bytes = fixture("nvfp4_vectors.safetensors");
    let t = load(&bytes);
    let sets: Vec<&str> = t.keys().filter_map(|k| k.strip_suffix(".input")).collect();
    assert_eq!(
        sets,
        ["bf16_48x64", "crafted", "heavy_32x256", "randn_64x128"]
    );
    for set in sets {
        let input = &t[&format!("{set}.input")];
        let q: Nvfp4Tensor = match input.dtype {
            Dtype::F32 => {
                let x = input.f32s();
                quantize(set, &x, &input.shape, amax_of(x.iter().copied())).expect("quantizable")
            }
            Dtype::BF16 => {
                let x = input.bf16s();
                quantize(set, &x, &input.shape, amax_of(x.iter().map(|v| v.to_f32())))
                    .expect("quantizable")
            }
            other => panic!("{set}: unexpected input dtype {other:?}"),
        };
        let packed = &t[&format!("{set}.packed")];
        assert_eq!(q.packed_shape(), packed.shape, "{set} packed shape");
        assert_eq!(q.packed, packed.data, "{set} packed codes");
        let scale = &t[&format!("{set}.weight_scale")];
        assert_eq!(scale.dtype, Dtype::F8_E4M3);
        assert_eq!(q.scale_shape(), scale.shape, "{set} scale shape");
        assert_eq!(q.weight_scale, scale.data, "{set} weight_scale bytes");
        assert_eq!(
            q.weight_scale_2.to_bits(),
            t[&format!("{set}.weight_scale_2")].scalar_bits(),
            "{set} weight_scale_2"
        );
        let want: Vec<u32> = t[&format!("{set}.dequant")]
            .f32s()
            .iter()
            .map(|v| v.to_bits())
            .collect();
        let got: Vec<u32> = q.dequantize().iter().map(|v| v.to_bits()).collect();
        assert_eq!(got, want, "{set} dequantized values");
        // The export fixture also dequantizes from its own parts.
        let rebuilt = Nvfp4Tensor::from_parts(
            set,
            input.shape.clone(),
            packed.data.clone(),
            scale.data.clone(),
            q.weight_scale_2,
        )
        .expect("consistent parts");
        assert_eq!(
            rebuilt
                .dequantize()
                .iter()
                .map(|v| v.to_bits())
                .collect::<Vec<_>>(),
            want
        );
    }
}

/// Re-quantizes every quantized linear of a ModelOpt export from its BF16 source with the
/// shared-input group rule, and compares weight, weight_scale and weight_scale_2 byte for byte.
fn export_bit_exact(source: &str, export: &str) -> usize {
    let src_bytes = fixture(source);
    let exp_bytes = fixture(export);
    let src = load(&src_bytes);
    let exp = load(&exp_bytes);
    let modules: Vec<&str> = exp
        .keys()
        .filter_map(|k| k.strip_suffix(".weight_scale_2"))
        .collect();
    assert!(!modules.is_empty());
    for module in &modules {
        let group = shared_input_group(module);
        let amax = group
            .iter()
            .map(|m| {
                amax_of(
                    src[&format!("{m}.weight")]
                        .bf16s()
                        .iter()
                        .map(|v| v.to_f32()),
                )
            })
            .fold(0.0f32, f32::max);
        let w = &src[&format!("{module}.weight")];
        let q = quantize(module, &w.bf16s(), &w.shape, amax).expect("quantizable");
        let packed = &exp[&format!("{module}.weight")];
        assert_eq!(packed.dtype, Dtype::U8);
        assert_eq!(q.packed_shape(), packed.shape, "{module} packed shape");
        assert!(q.packed == packed.data, "{module}: packed weight differs");
        let scale = &exp[&format!("{module}.weight_scale")];
        assert_eq!(q.scale_shape(), scale.shape, "{module} scale shape");
        assert!(
            q.weight_scale == scale.data,
            "{module}: weight_scale differs"
        );
        assert_eq!(
            q.weight_scale_2.to_bits(),
            exp[&format!("{module}.weight_scale_2")].scalar_bits(),
            "{module}: weight_scale_2"
        );

        // input_scale: the group shares one, and it is input_scale(amax) of a BF16 amax.
        let s = f32::from_bits(exp[&format!("{module}.input_scale")].scalar_bits());
        for sibling in &group {
            assert_eq!(
                exp[&format!("{sibling}.input_scale")].scalar_bits(),
                s.to_bits(),
                "{sibling} input_scale vs {module}"
            );
        }
        let calibrated = bf16::from_f32(s * codec::GLOBAL_SCALE_DIVISOR).to_f32();
        assert_eq!(
            input_scale(module, calibrated).expect("positive").to_bits(),
            s.to_bits(),
            "{module} input_scale"
        );
    }
    modules.len()
}

#[test]
fn qwen3_tiny_export_bit_exact() {
    // 2 layers × (q, k, v, o, gate, up, down).
    assert_eq!(
        export_bit_exact(
            "qwen3_tiny_bf16.safetensors",
            "qwen3_tiny_nvfp4.safetensors"
        ),
        14
    );
}

#[test]
fn qwen35_tiny_export_bit_exact() {
    // 3 linear-attention layers × (in_proj_qkv, in_proj_z, out_proj, gate, up, down) + 1 full
    // attention layer × (q, k, v, o, gate, up, down).
    assert_eq!(
        export_bit_exact(
            "qwen35_tiny_bf16.safetensors",
            "qwen35_tiny_nvfp4.safetensors"
        ),
        25
    );
}

#[test]
fn group_rule_is_needed() {
    // Without the group rule, some k/v/up/in_proj projections of the Qwen3.5 fixture would get
    // a different global scale (in the Qwen3 fixture each group's members happen to share amax).
    let src_bytes = fixture("qwen35_tiny_bf16.safetensors");
    let exp_bytes = fixture("qwen35_tiny_nvfp4.safetensors");
    let src = load(&src_bytes);
    let exp = load(&exp_bytes);
    let differing = exp
        .keys()
        .filter_map(|k| k.strip_suffix(".weight_scale_2"))
        .filter(|m| {
            let own = amax_of(
                src[&format!("{m}.weight")]
                    .bf16s()
                    .iter()
                    .map(|v| v.to_f32()),
            );
            let ws2 = qatflow_nvfp4::weight_scale_2(m, own).expect("positive");
            ws2.to_bits() != exp[&format!("{m}.weight_scale_2")].scalar_bits()
        })
        .count();
    assert!(differing > 0, "the fixture should exercise the group rule");
}

#[test]
fn burn_fake_quant_matches_fixture_dequant_on_flex() {
    use burn::backend::{Autodiff, Flex};
    use burn::tensor::{Tensor, TensorData};
    use qatflow_nvfp4::fake_quant::fake_quantize;

    let bytes = fixture("nvfp4_vectors.safetensors");
    let t = load(&bytes);
    for set in t.keys().filter_map(|k| k.strip_suffix(".input")) {
        let input = &t[&format!("{set}.input")];
        let x: Vec<f32> = match input.dtype {
            Dtype::F32 => input.f32s(),
            _ => input.bf16s().iter().map(|v| v.to_f32()).collect(),
        };
        let amax = amax_of(x.iter().copied());
        let [rows, cols] = [input.shape[0], input.shape[1]];
        let tensor = Tensor::<Autodiff<Flex>, 2>::from_data(
            TensorData::new(x, [rows, cols]),
            &Default::default(),
        );
        let got: Vec<u32> = fake_quantize(set, tensor, amax)
            .expect("quantizable")
            .into_data()
            .to_vec::<f32>()
            .expect("f32")
            .iter()
            .map(|v| v.to_bits())
            .collect();
        let want: Vec<u32> = t[&format!("{set}.dequant")]
            .f32s()
            .iter()
            .map(|v| v.to_bits())
            .collect();
        assert_eq!(got, want, "{set}");
    }
}
