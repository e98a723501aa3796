//! The CUDA decoder against burn's float32 forward on the CPU, on random Llama and Qwen3
//! models of several head sizes (16, 80, 128, 256): prefill through the tiled attention
//! kernel and cuBLASLt (more than 16 rows, also after cached positions), short prompts and
//! decoding through the GEMV kernels, batched steps of 3 sequences (caches truncated and
//! cloned) and of 20 (cuBLASLt projections, per-row attention), and NVFP4 activation
//! emulation.
//!
//! Needs an NVIDIA GPU with its driver, NVRTC and cuBLASLt: run with
//! `cargo test -p qatflow-model --test cuda_decoder -- --ignored`.

use burn::backend::Flex;
use qatflow_model::batch::{decode_step, next_logits};
use qatflow_model::init::{named_config, write_random_model};
use qatflow_model::{CausalLm, CudaDecoder, LoadOptions, Precision};
use qatflow_nvfp4::QuantizerAmax;

type B = Flex;

/// A random model of `name`'s architecture with the given head size, loaded in float32.
fn load(name: &str, head_dim: usize, dir: &std::path::Path, emulate: bool) -> CausalLm<B> {
    let mut json = named_config(name).unwrap();
    json["vocab_size"] = 96.into();
    json["head_dim"] = head_dim.into();
    write_random_model(&json, 11, safetensors::Dtype::BF16, dir).unwrap();
    let options = LoadOptions {
        precision: Precision::F32,
        emulate_nvfp4_activations: emulate,
    };
    CausalLm::load(dir, options, &Default::default()).unwrap()
}

/// Largest difference relative to the reference's largest magnitude, and whether the
/// arg-max agrees.
fn compare(gpu: &[f32], reference: &[f32]) -> (f32, bool) {
    assert_eq!(gpu.len(), reference.len());
    let scale = reference.iter().fold(1f32, |m, v| m.max(v.abs()));
    let worst = gpu
        .iter()
        .zip(reference)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    let argmax = |v: &[f32]| {
        v.iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map(|(i, _)| i)
    };
    (worst / scale, argmax(gpu) == argmax(reference))
}

/// Copies of `cache` truncated to each of `lengths`.
fn truncated<C: Clone>(cache: &C, lengths: &[usize], truncate: impl Fn(&mut C, usize)) -> Vec<C> {
    lengths
        .iter()
        .map(|&len| {
            let mut c = cache.clone();
            truncate(&mut c, len);
            c
        })
        .collect()
}

/// Checks every path against burn; `prefill_tol` bounds steps of more than 16 rows (BF16
/// products when the weights are BF16) and the steps that attend over the keys and values
/// such a step wrote, `decode_tol` the float32 GEMV steps over caches they wrote themselves.
fn check(label: &str, model: &CausalLm<B>, prefill_tol: f32, decode_tol: f32) {
    let gpu = CudaDecoder::new(model, 0).unwrap();
    let mut failures = Vec::new();
    let mut expect = |what: &str, got: &[f32], want: &[f32], tol: f32| {
        let (diff, same) = compare(got, want);
        println!("{label} {what}: relative difference {diff:.2e}, same arg-max {same}");
        if diff > tol {
            failures.push(format!("{label} {what}: {diff:.2e} > {tol:.0e}"));
        }
    };
    // 300 rows: the tiled attention over several row blocks, cuBLASLt projections; the
    // decoding after it attends over two runs of 256 positions, merged.
    let prompt: Vec<u32> = (0..300).map(|i| (i * 7 % 90) as u32).collect();
    let mut slow = model.new_cache();
    let mut fast = gpu.new_cache();
    expect(
        "prefill 300",
        &gpu.next_logits(&prompt, &mut fast),
        &next_logits(model, &prompt, &mut slow),
        prefill_tol,
    );
    // Decoding after the prefill: float32 GEMVs, but over the keys and values that the
    // prefill's (possibly BF16) products wrote, so within the prefill's bound.
    for t in [5u32, 61, 2] {
        expect(
            "decode after prefill",
            &gpu.next_logits(&[t], &mut fast),
            &next_logits(model, &[t], &mut slow),
            prefill_tol,
        );
    }
    // A short prompt: the row kernels and GEMVs.
    let mut slow_short = model.new_cache();
    let mut fast_short = gpu.new_cache();
    expect(
        "prompt 9",
        &gpu.next_logits(&prompt[..9], &mut fast_short),
        &next_logits(model, &prompt[..9], &mut slow_short),
        decode_tol,
    );
    for t in [5u32, 61] {
        expect(
            "decode",
            &gpu.next_logits(&[t], &mut fast_short),
            &next_logits(model, &[t], &mut slow_short),
            decode_tol,
        );
    }
    // A many-row step after cached positions (a prompt after a cached prefix): the tiled
    // attention with a first position other than 0.
    let mut fast_more = fast_short.clone();
    let mut slow_more = slow_short.clone();
    expect(
        "prefill 40 after 11 cached",
        &gpu.next_logits(&prompt[100..140], &mut fast_more),
        &next_logits(model, &prompt[100..140], &mut slow_more),
        prefill_tol,
    );
    assert_eq!(fast_more.len(), 51);
    assert_eq!(fast.len(), 303);
    let mut other_fast = fast.clone();
    other_fast.truncate(10);
    let mut other_slow = slow.clone();
    other_slow.truncate(10);
    let mut fast_caches = [&mut fast, &mut other_fast, &mut fast_short];
    let mut slow_caches = [&mut slow, &mut other_slow, &mut slow_short];
    let got = gpu.decode_step(&[8, 9, 10], &mut fast_caches);
    let want = decode_step(model, &[8, 9, 10], &mut slow_caches);
    // The first two caches hold the prefill's keys and values, the third only the GEMVs'.
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        let tol = if i < 2 { prefill_tol } else { decode_tol };
        expect("batched step", g, w, tol);
    }
    assert_eq!(
        (fast.len(), other_fast.len(), fast_short.len()),
        (304, 11, 12)
    );
    // A step of more sequences than one GEMV launch takes (a busy server): projections
    // through cuBLASLt, attention per row over caches of different lengths.
    let lengths: Vec<usize> = (0..20).map(|i| 5 + 15 * i).collect();
    let mut fast_many = truncated(&fast, &lengths, |c, len| c.truncate(len));
    let mut slow_many = truncated(&slow, &lengths, |c, len| c.truncate(len));
    let tokens: Vec<u32> = (0..20).map(|i| (i * 11 % 90) as u32).collect();
    let got = gpu.decode_step(&tokens, &mut fast_many.iter_mut().collect::<Vec<_>>());
    let want = decode_step(
        model,
        &tokens,
        &mut slow_many.iter_mut().collect::<Vec<_>>(),
    );
    for (g, w) in got.iter().zip(&want) {
        expect("batched step of 20", g, w, prefill_tol);
    }
    let grown: Vec<usize> = fast_many.iter().map(|c| c.len()).collect();
    assert_eq!(grown, lengths.iter().map(|l| l + 1).collect::<Vec<_>>());
    assert!(failures.is_empty(), "{failures:#?}");
}

#[test]
#[ignore = "needs an NVIDIA GPU (run with --ignored on one)"]
fn the_cuda_decoder_matches_burns_forward() {
    let shapes = [
        ("tiny-llama", 16),
        ("tiny-llama", 80),
        ("tiny-qwen3", 128),
        ("tiny-qwen3", 256),
    ];
    for (name, head_dim) in shapes {
        let dir = tempfile::tempdir().unwrap();
        let model = load(name, head_dim, dir.path(), false);
        check(&format!("{name} hd{head_dim}"), &model, 3e-2, 1e-4);
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU (run with --ignored on one)"]
fn nvfp4_emulation_matches_burns_forward() {
    let dir = tempfile::tempdir().unwrap();
    let mut model = load("tiny-qwen3", 64, dir.path(), true);
    for (i, linear) in model.linears_mut().into_iter().enumerate() {
        let amax = QuantizerAmax {
            weight: Some(0.5 + i as f32 * 0.01),
            input: Some(4.0),
        };
        linear.set_fake_quant(amax).unwrap();
    }
    // Float32 weights everywhere: every path is float32, but a sum that lands on the other
    // side of an FP4 rounding bound moves one activation by a whole FP4 step.
    check("tiny-qwen3 nvfp4", &model, 5e-2, 5e-2);
}
