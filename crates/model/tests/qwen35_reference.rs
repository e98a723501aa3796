//! Qwen3.5 configurations unlike the fixture's (other head counts, key/value widths, GQA
//! ratios, conv kernels, rotary fractions, layer patterns) against a straightforward
//! token-by-token float64 implementation written here from HF's `modeling_qwen3_5.py`:
//! the chunked forward over lengths that are not multiples of the chunk, recurrent decoding
//! with a cache, and the NVFP4 quantizable linears.

use std::collections::HashMap;
use std::path::Path;

use burn::backend::Flex;
use burn::tensor::{DType, Int, Tensor, TensorData};
use qatflow_model::qwen35::expected_tensors;
use qatflow_model::weights::Checkpoint;
use qatflow_model::{CausalLm, LayerKind, LoadOptions, ModelConfig};
use serde_json::{json, Value};

type B = Flex;

/// SplitMix64 → uniform (−1, 1).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
    }
}

/// Weights by name: shape and values (float32-representable, kept as f64).
type Weights = HashMap<String, (Vec<usize>, Vec<f64>)>;

/// Random weights for every tensor of `config`, scaled so that every part of the layer
/// matters (decays between 0.3 and 1 per step, gates away from saturation).
fn random_weights(config: &ModelConfig, seed: u64) -> Weights {
    let mut rng = Rng(seed);
    let mut out = HashMap::new();
    for (name, shape, linear) in expected_tensors(config, "model") {
        let name = if linear {
            format!("{name}.weight")
        } else {
            name
        };
        let n: usize = shape.iter().product();
        let fan_in = *shape.last().unwrap() as f64;
        let values: Vec<f64> = (0..n)
            .map(|_| {
                let u = rng.next();
                let v = if name.ends_with("A_log") {
                    -1.5 + 0.5 * u
                } else if name.ends_with("dt_bias") {
                    0.5 * u
                } else if shape.len() == 1 {
                    0.3 * u
                } else if name.ends_with("conv1d.weight") {
                    0.6 * u
                } else if name.contains("embed_tokens") || name == "lm_head.weight" {
                    u
                } else {
                    1.7 * u / fan_in.sqrt()
                };
                v as f32 as f64
            })
            .collect();
        out.insert(name, (shape, values));
    }
    out
}

fn write_safetensors(weights: &Weights, path: &Path) {
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = weights
        .iter()
        .map(|(n, (s, v))| {
            let b = v.iter().flat_map(|x| (*x as f32).to_le_bytes()).collect();
            (n.clone(), s.clone(), b)
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = bytes
        .iter()
        .map(|(n, s, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)
                    .unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
}

/// y = W x for W `[out, in]`.
fn matvec(w: &(Vec<usize>, Vec<f64>), x: &[f64]) -> Vec<f64> {
    let (out, inp) = (w.0[0], w.0[1]);
    assert_eq!(x.len(), inp);
    (0..out)
        .map(|o| (0..inp).map(|i| w.1[o * inp + i] * x[i]).sum())
        .collect()
}

fn rms(x: &[f64], eps: f64) -> Vec<f64> {
    let ms = x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64;
    let inv = 1.0 / (ms + eps).sqrt();
    x.iter().map(|v| v * inv).collect()
}

fn offset_norm(x: &[f64], w: &[f64], eps: f64) -> Vec<f64> {
    rms(x, eps)
        .iter()
        .zip(w)
        .map(|(v, w)| v * (1.0 + w))
        .collect()
}

fn silu(x: f64) -> f64 {
    x / (1.0 + (-x).exp())
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

fn l2n(x: &[f64]) -> Vec<f64> {
    let inv = 1.0 / (x.iter().map(|v| v * v).sum::<f64>() + 1e-6).sqrt();
    x.iter().map(|v| v * inv).collect()
}

/// The float64 reference: logits `[len][vocab]` of `ids`, one token at a time.
struct Reference {
    config: ModelConfig,
    w: Weights,
}

impl Reference {
    fn get(&self, name: &str) -> &(Vec<usize>, Vec<f64>) {
        self.w
            .get(name)
            .unwrap_or_else(|| panic!("no tensor {name}"))
    }

    fn logits(&self, ids: &[u32]) -> Vec<Vec<f64>> {
        let c = &self.config;
        let h = c.hybrid.as_ref().unwrap();
        let eps = c.rms_norm_eps;
        let hid = c.hidden_size;
        let embed = self.get("model.embed_tokens.weight");
        let mut xs: Vec<Vec<f64>> = ids
            .iter()
            .map(|&t| embed.1[t as usize * hid..][..hid].to_vec())
            .collect();
        let len = ids.len();
        for (l, kind) in h.layer_types.iter().enumerate() {
            let p = format!("model.layers.{l}");
            let normed: Vec<Vec<f64>> = xs
                .iter()
                .map(|x| offset_norm(x, &self.get(&format!("{p}.input_layernorm.weight")).1, eps))
                .collect();
            let mixed = match kind {
                LayerKind::LinearAttention => self.gdn(&p, &normed),
                LayerKind::FullAttention => self.attention(&p, &normed),
            };
            for t in 0..len {
                for i in 0..hid {
                    xs[t][i] += mixed[t][i];
                }
                let n = offset_norm(
                    &xs[t],
                    &self.get(&format!("{p}.post_attention_layernorm.weight")).1,
                    eps,
                );
                let gate = matvec(self.get(&format!("{p}.mlp.gate_proj.weight")), &n);
                let up = matvec(self.get(&format!("{p}.mlp.up_proj.weight")), &n);
                let act: Vec<f64> = gate.iter().zip(&up).map(|(g, u)| silu(*g) * u).collect();
                let down = matvec(self.get(&format!("{p}.mlp.down_proj.weight")), &act);
                for i in 0..hid {
                    xs[t][i] += down[i];
                }
            }
        }
        let head = if c.tie_word_embeddings {
            embed
        } else {
            self.get("lm_head.weight")
        };
        xs.iter()
            .map(|x| matvec(head, &offset_norm(x, &self.get("model.norm.weight").1, eps)))
            .collect()
    }

    fn gdn(&self, p: &str, xs: &[Vec<f64>]) -> Vec<Vec<f64>> {
        let h = self.config.hybrid.as_ref().unwrap();
        let a = format!("{p}.linear_attn");
        let (hk, hv, dk, dv) = (
            h.linear_num_key_heads,
            h.linear_num_value_heads,
            h.linear_key_head_dim,
            h.linear_value_head_dim,
        );
        let kernel = h.linear_conv_kernel_dim;
        let conv_dim = h.conv_dim();
        let conv = self.get(&format!("{a}.conv1d.weight"));
        let a_log = &self.get(&format!("{a}.A_log")).1;
        let dt_bias = &self.get(&format!("{a}.dt_bias")).1;
        let norm_w = &self.get(&format!("{a}.norm.weight")).1;
        let qkv: Vec<Vec<f64>> = xs
            .iter()
            .map(|x| matvec(self.get(&format!("{a}.in_proj_qkv.weight")), x))
            .collect();
        let mut state = vec![vec![0f64; dk * dv]; hv];
        let mut out = Vec::new();
        for (t, x) in xs.iter().enumerate() {
            // Causal depthwise conv over the projected channels, then SiLU.
            let mut mixed = vec![0f64; conv_dim];
            for (ch, m) in mixed.iter_mut().enumerate() {
                let mut s = 0.0;
                for j in 0..kernel {
                    let src = t as isize - (kernel as isize - 1) + j as isize;
                    if src >= 0 {
                        s += conv.1[ch * kernel + j] * qkv[src as usize][ch];
                    }
                }
                *m = silu(s);
            }
            let z = matvec(self.get(&format!("{a}.in_proj_z.weight")), x);
            let b = matvec(self.get(&format!("{a}.in_proj_b.weight")), x);
            let av = matvec(self.get(&format!("{a}.in_proj_a.weight")), x);
            let mut o_all = Vec::new();
            for j in 0..hv {
                let kh = j / (hv / hk);
                let q = l2n(&mixed[kh * dk..][..dk]);
                let q: Vec<f64> = q.iter().map(|v| v / (dk as f64).sqrt()).collect();
                let k = l2n(&mixed[hk * dk + kh * dk..][..dk]);
                let v = &mixed[2 * hk * dk + j * dv..][..dv];
                let beta = sigmoid(b[j]);
                let sp = (1.0 + (av[j] + dt_bias[j]).exp()).ln();
                let g = -a_log[j].exp() * sp;
                let s = &mut state[j];
                for e in s.iter_mut() {
                    *e *= g.exp();
                }
                for col in 0..dv {
                    let mem: f64 = (0..dk).map(|r| s[r * dv + col] * k[r]).sum();
                    let delta = (v[col] - mem) * beta;
                    for r in 0..dk {
                        s[r * dv + col] += k[r] * delta;
                    }
                }
                let o: Vec<f64> = (0..dv)
                    .map(|col| (0..dk).map(|r| s[r * dv + col] * q[r]).sum())
                    .collect();
                let n = rms(&o, self.config.rms_norm_eps);
                for col in 0..dv {
                    o_all.push(n[col] * norm_w[col] * silu(z[j * dv + col]));
                }
            }
            out.push(matvec(self.get(&format!("{a}.out_proj.weight")), &o_all));
        }
        out
    }

    fn attention(&self, p: &str, xs: &[Vec<f64>]) -> Vec<Vec<f64>> {
        let c = &self.config;
        let h = c.hybrid.as_ref().unwrap();
        let a = format!("{p}.self_attn");
        let (nh, nkv, hd, rd) = (c.num_heads, c.num_kv_heads, c.head_dim, h.rotary_dim);
        let eps = c.rms_norm_eps;
        let rope = |x: &mut [f64], pos: usize| {
            let half = rd / 2;
            for i in 0..half {
                let inv = c.rope.theta.powf(-((2 * i) as f64) / rd as f64);
                let (s, co) = (pos as f64 * inv).sin_cos();
                let (x1, x2) = (x[i], x[i + half]);
                x[i] = x1 * co - x2 * s;
                x[i + half] = x2 * co + x1 * s;
            }
        };
        let mut qs = Vec::new();
        let mut gates = Vec::new();
        let mut ks = Vec::new();
        let mut vs = Vec::new();
        for (t, x) in xs.iter().enumerate() {
            let qg = matvec(self.get(&format!("{a}.q_proj.weight")), x);
            let k = matvec(self.get(&format!("{a}.k_proj.weight")), x);
            let v = matvec(self.get(&format!("{a}.v_proj.weight")), x);
            let mut q_heads = Vec::new();
            let mut gate = Vec::new();
            for i in 0..nh {
                let (qh, gh) = if h.attn_output_gate {
                    (&qg[i * 2 * hd..][..hd], &qg[i * 2 * hd + hd..][..hd])
                } else {
                    (&qg[i * hd..][..hd], &qg[..0])
                };
                let mut qn = offset_norm(qh, &self.get(&format!("{a}.q_norm.weight")).1, eps);
                rope(&mut qn, t);
                q_heads.push(qn);
                gate.extend_from_slice(gh);
            }
            let mut k_heads = Vec::new();
            for j in 0..nkv {
                let mut kn = offset_norm(
                    &k[j * hd..][..hd],
                    &self.get(&format!("{a}.k_norm.weight")).1,
                    eps,
                );
                rope(&mut kn, t);
                k_heads.push(kn);
            }
            qs.push(q_heads);
            gates.push(gate);
            ks.push(k_heads);
            vs.push(v);
        }
        let mut out = Vec::new();
        for t in 0..xs.len() {
            let mut o = Vec::new();
            for i in 0..nh {
                let j = i / (nh / nkv);
                let scores: Vec<f64> = (0..=t)
                    .map(|s| {
                        qs[t][i]
                            .iter()
                            .zip(&ks[s][j])
                            .map(|(a, b)| a * b)
                            .sum::<f64>()
                            / (hd as f64).sqrt()
                    })
                    .collect();
                let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                let z: f64 = e.iter().sum();
                for d in 0..hd {
                    let v: f64 = (0..=t).map(|s| e[s] / z * vs[s][j * hd + d]).sum();
                    let gate = if h.attn_output_gate {
                        sigmoid(gates[t][i * hd + d])
                    } else {
                        1.0
                    };
                    o.push(v * gate);
                }
            }
            out.push(matvec(self.get(&format!("{a}.o_proj.weight")), &o));
        }
        out
    }
}

fn ids_tensor(ids: &[u32]) -> Tensor<B, 2, Int> {
    let data: Vec<i32> = ids.iter().map(|&t| t as i32).collect();
    Tensor::from_data(TensorData::new(data, [1, ids.len()]), &Default::default())
}

fn logits_vec(t: Tensor<B, 3>) -> Vec<f32> {
    t.cast(DType::F32).into_data().iter::<f32>().collect()
}

struct Case {
    config: ModelConfig,
    reference: Reference,
    model: CausalLm<B>,
    _dir: tempfile::TempDir,
}

fn case(json: Value, seed: u64) -> Case {
    let config = ModelConfig::from_json(&json, Path::new("<test>")).unwrap();
    let w = random_weights(&config, seed);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("model.safetensors");
    write_safetensors(&w, &file);
    let ckpt = Checkpoint::from_files(&[file]).unwrap();
    let model =
        CausalLm::<B>::from_checkpoint(&config, &ckpt, LoadOptions::default(), &Default::default())
            .unwrap();
    Case {
        reference: Reference {
            config: config.clone(),
            w,
        },
        config,
        model,
        _dir: dir,
    }
}

fn token_ids(n: usize, vocab: usize, seed: u64) -> Vec<u32> {
    let mut rng = Rng(seed);
    (0..n)
        .map(|_| ((rng.next() + 1.0) / 2.0 * vocab as f64) as u32 % vocab as u32)
        .collect()
}

/// Largest |Δ| between our float32 logits and the float64 reference, relative to the
/// largest reference logit (at least 1).
fn compare(got: &[f32], want: &[Vec<f64>]) -> f64 {
    let flat: Vec<f64> = want.iter().flatten().copied().collect();
    assert_eq!(got.len(), flat.len());
    let scale = flat.iter().fold(1f64, |m, v| m.max(v.abs()));
    got.iter()
        .zip(&flat)
        .fold(0f64, |m, (g, w)| m.max((*g as f64 - w).abs()))
        / scale
}

/// GQA 3:1 in the attention, 3 value heads per key head, key width ≠ value width, kernel 3,
/// half of each head rotated, full attention first and last.
fn config_a() -> Value {
    json!({
        "model_type": "qwen3_5_text", "vocab_size": 97, "hidden_size": 48,
        "intermediate_size": 80, "num_hidden_layers": 5, "num_attention_heads": 3,
        "num_key_value_heads": 1, "head_dim": 12, "rms_norm_eps": 1e-6,
        "layer_types": ["full_attention", "linear_attention", "linear_attention",
                        "full_attention", "linear_attention"],
        "linear_conv_kernel_dim": 3, "linear_key_head_dim": 12, "linear_num_key_heads": 2,
        "linear_num_value_heads": 6, "linear_value_head_dim": 10,
        "rope_parameters": {"rope_type": "default", "rope_theta": 500.0,
                            "partial_rotary_factor": 0.5},
        "tie_word_embeddings": false
    })
}

/// The default pattern from `full_attention_interval` 2, kernel 5, no output gate, every
/// dimension rotated, tied embeddings.
fn config_b() -> Value {
    json!({
        "model_type": "qwen3_5_text", "vocab_size": 61, "hidden_size": 32,
        "intermediate_size": 48, "num_hidden_layers": 4, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 8, "rms_norm_eps": 1e-5,
        "full_attention_interval": 2, "attn_output_gate": false,
        "linear_conv_kernel_dim": 5, "linear_key_head_dim": 6, "linear_num_key_heads": 1,
        "linear_num_value_heads": 2, "linear_value_head_dim": 7,
        "partial_rotary_factor": 1.0, "rope_theta": 10000.0,
        "tie_word_embeddings": true
    })
}

#[test]
fn chunked_forward_matches_the_f64_reference_on_other_shapes() {
    for (label, json, seed) in [("A", config_a(), 1), ("B", config_b(), 2)] {
        let c = case(json, seed);
        assert_eq!(
            c.config.hybrid.as_ref().unwrap().layer_types.len(),
            c.config.num_layers
        );
        for len in [1, 37, 64, 150] {
            let ids = token_ids(len, c.config.vocab_size, seed * 100 + len as u64);
            let want = c.reference.logits(&ids);
            let got = logits_vec(c.model.forward(ids_tensor(&ids), None));
            let diff = compare(&got, &want);
            println!("config {label}, length {len}: max relative |Δlogit| vs f64 {diff:e}");
            assert!(diff < 2e-5, "config {label} length {len}: {diff}");
        }
    }
}

#[test]
fn recurrent_decoding_matches_the_f64_reference() {
    let c = case(config_a(), 3);
    let ids = token_ids(140, c.config.vocab_size, 9);
    let want = c.reference.logits(&ids);
    let mut cache = c.model.new_cache();
    let mut got = Vec::new();
    // Prefill 70 (two chunks), 5 single tokens, 65 more (two chunks again, from the state).
    for (start, end) in [(0, 70)]
        .into_iter()
        .chain((70..75).map(|p| (p, p + 1)))
        .chain([(75, 140)])
    {
        let hidden = c
            .model
            .forward_hidden(ids_tensor(&ids[start..end]), None, Some(&mut cache));
        got.extend(logits_vec(c.model.logits(hidden)));
    }
    let diff = compare(&got, &want);
    println!("cached decode vs f64 reference: max relative |Δlogit| {diff:e}");
    assert!(diff < 2e-5, "{diff}");
}

#[test]
fn group_rule_covers_in_proj_qkv_and_z() {
    let mut c = case(config_a(), 4);
    let amax: std::collections::BTreeMap<String, f32> = c
        .model
        .linears_mut()
        .into_iter()
        .map(|l| (l.name.clone(), l.weight.val().abs().max().into_scalar()))
        .collect();
    // 3 linear-attention layers × 3 + 2 attention layers × 4, plus 5 MLPs × 3.
    assert_eq!(amax.len(), 9 + 8 + 15);
    let grouped = qatflow_model::apply_group_rule(&amax);
    let p = "model.layers.1.linear_attn";
    let shared = amax[&format!("{p}.in_proj_qkv")].max(amax[&format!("{p}.in_proj_z")]);
    assert_eq!(grouped[&format!("{p}.in_proj_qkv")], shared);
    assert_eq!(grouped[&format!("{p}.in_proj_z")], shared);
    assert_eq!(
        grouped[&format!("{p}.out_proj")],
        amax[&format!("{p}.out_proj")]
    );
    assert!(!amax
        .keys()
        .any(|n| n.contains("in_proj_a") || n.contains("in_proj_b")));
}
