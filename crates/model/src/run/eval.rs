//! Evaluation: mean negative log-likelihood / perplexity of token sequences, the KL
//! divergence between two models' next-token distributions, and incremental decoding
//! checked against the full forward. Log-softmax is computed in
//! float32 on chunks of positions, so no `[tokens, vocab]` float32 tensor is built for
//! more than a chunk (about 16M logits) at a time.

use burn::tensor::backend::Backend;
use burn::tensor::{DType, Int, Tensor, TensorData};

use crate::arch::layers::to_dtype;
use crate::arch::model::CausalLm;

/// Errors of evaluation.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    /// No sequences were given.
    #[error("no sequences to evaluate")]
    Empty,
    /// A sequence is too short to predict anything.
    #[error("sequence {index} has {len} token(s); at least {min} are needed")]
    TooShort {
        /// Index of the sequence in the input.
        index: usize,
        /// Its length.
        len: usize,
        /// The minimum.
        min: usize,
    },
    /// A token id is outside the model's vocabulary.
    #[error("sequence {index} holds token {token}, outside the model's vocabulary of {vocab_size}; tokenize with the model's own tokenizer")]
    TokenOutOfRange {
        /// Index of the sequence.
        index: usize,
        /// The token id.
        token: u32,
        /// The vocabulary size.
        vocab_size: usize,
    },
    /// The two models of a KL comparison have different vocabularies.
    #[error("the models have vocabularies of {base} and {other} tokens; KL divergence needs the same vocabulary")]
    VocabMismatch {
        /// Base model's vocabulary.
        base: usize,
        /// Other model's vocabulary.
        other: usize,
    },
}

/// Batching of an evaluation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EvalOptions {
    /// Sequences per forward pass (padded to the longest of the batch).
    pub batch_size: usize,
    /// Largest number of logits (positions × vocabulary) computed at once.
    pub max_chunk_logits: usize,
}

impl Default for EvalOptions {
    fn default() -> Self {
        EvalOptions {
            batch_size: 8,
            max_chunk_logits: 1 << 24,
        }
    }
}

/// Mean NLL of one sequence.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SequenceNll {
    /// Length of the sequence (the first token is context only).
    pub tokens: usize,
    /// Mean NLL (nats) over its predicted positions `1..tokens`.
    pub mean_nll: f64,
}

/// Result of [`eval_nll`].
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct NllReport {
    /// Mean NLL (nats) over all predicted tokens of all sequences.
    pub mean_nll: f64,
    /// `exp(mean_nll)`.
    pub perplexity: f64,
    /// Number of predicted tokens.
    pub predicted_tokens: usize,
    /// Per sequence, in input order.
    pub sequences: Vec<SequenceNll>,
}

/// Result of [`eval_kld`].
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct KldReport {
    /// Mean over positions of KL(base ‖ other) in nats.
    pub mean_kld: f64,
    /// 99th percentile (nearest rank) of the per-position KL.
    pub p99_kld: f64,
    /// Fraction of positions where both models' most likely next token agree.
    pub top1_agreement: f64,
    /// Number of positions compared.
    pub positions: usize,
    /// Mean next-token NLL of the base model over the predicted tokens (every position but
    /// each sequence's last), as [`eval_nll`] computes it; `None` when no sequence has two
    /// tokens.
    pub base_nll: Option<f64>,
    /// The same for the other model.
    pub other_nll: Option<f64>,
}

/// One sequence of [`eval_decode`].
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SequenceDecode {
    /// Length of the sequence.
    pub tokens: usize,
    /// Largest |Δ| between a logit of incremental decoding and the full forward's.
    pub max_abs_diff: f64,
}

/// Result of [`eval_decode`].
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DecodeReport {
    /// Tokens of each sequence given in the first (prefill) call.
    pub prefill: usize,
    /// Largest |Δlogit| over all sequences and positions.
    pub max_abs_diff: f64,
    /// Per sequence, in input order.
    pub sequences: Vec<SequenceDecode>,
}

fn check(sequences: &[Vec<u32>], vocab_size: usize, min: usize) -> Result<(), EvalError> {
    if sequences.is_empty() {
        return Err(EvalError::Empty);
    }
    for (index, s) in sequences.iter().enumerate() {
        if s.len() < min {
            return Err(EvalError::TooShort {
                index,
                len: s.len(),
                min,
            });
        }
        if let Some(&token) = s.iter().find(|&&t| t as usize >= vocab_size) {
            return Err(EvalError::TokenOutOfRange {
                index,
                token,
                vocab_size,
            });
        }
    }
    Ok(())
}

/// Hidden states `[rows, hidden]` of a padded batch, flattened over (sequence, position).
fn batch_hidden<B: Backend>(model: &CausalLm<B>, batch: &[Vec<u32>]) -> (Tensor<B, 2>, usize) {
    let width = batch.iter().map(Vec::len).max().unwrap_or(0);
    let mut ids = vec![0i32; batch.len() * width];
    for (b, s) in batch.iter().enumerate() {
        for (p, &t) in s.iter().enumerate() {
            ids[b * width + p] = t as i32;
        }
    }
    let lengths: Vec<usize> = batch.iter().map(Vec::len).collect();
    let input =
        Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [batch.len(), width]), &model.device());
    let hidden = model.forward_hidden(input, Some(&lengths), None);
    let h = hidden.dims()[2];
    (hidden.reshape([batch.len() * width, h]), width)
}

/// Float32 log-probabilities `[rows, vocab]` of the given hidden rows.
fn log_probs<B: Backend>(model: &CausalLm<B>, rows: Tensor<B, 2>) -> Tensor<B, 2> {
    qatflow_kernels::reduce::log_softmax(to_dtype(model.logits(rows), DType::F32))
}

fn chunk_rows(vocab: usize, options: &EvalOptions) -> usize {
    (options.max_chunk_logits / vocab.max(1)).max(1)
}

fn index_tensor<B: Backend>(values: &[usize], device: &B::Device) -> Tensor<B, 1, Int> {
    let data: Vec<i32> = values.iter().map(|&v| v as i32).collect();
    Tensor::from_data(TensorData::new(data, [values.len()]), device)
}

fn to_f64<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f64> {
    to_dtype(t, DType::F32)
        .into_data()
        .iter::<f32>()
        .map(f64::from)
        .collect()
}

/// Mean NLL and perplexity of `sequences` (each at least 2 tokens): every position
/// `1..n` of a sequence is predicted from the ones before it.
pub fn eval_nll<B: Backend>(
    model: &CausalLm<B>,
    sequences: Vec<Vec<u32>>,
) -> Result<NllReport, EvalError> {
    eval_nll_with(model, sequences, &EvalOptions::default())
}

/// [`eval_nll`] with explicit batching.
pub fn eval_nll_with<B: Backend>(
    model: &CausalLm<B>,
    sequences: Vec<Vec<u32>>,
    options: &EvalOptions,
) -> Result<NllReport, EvalError> {
    let vocab = model.config().vocab_size;
    check(&sequences, vocab, 2)?;
    let device = model.device();
    let chunk = chunk_rows(vocab, options);
    let mut per_seq = Vec::with_capacity(sequences.len());
    let (mut total, mut count) = (0f64, 0usize);
    for batch in sequences.chunks(options.batch_size.max(1)) {
        let (hidden, width) = batch_hidden(model, batch);
        // (row of the predicting position, target token, sequence in batch)
        let mut rows = Vec::new();
        for (b, s) in batch.iter().enumerate() {
            for p in 0..s.len() - 1 {
                rows.push((b * width + p, s[p + 1] as usize, b));
            }
        }
        let mut sums = vec![0f64; batch.len()];
        for part in rows.chunks(chunk) {
            let idx: Vec<usize> = part.iter().map(|r| r.0).collect();
            let targets: Vec<usize> = part.iter().map(|r| r.1).collect();
            let lp = log_probs(model, hidden.clone().select(0, index_tensor(&idx, &device)));
            let picked = lp.gather(1, index_tensor(&targets, &device).unsqueeze_dim(1));
            for (r, v) in part.iter().zip(to_f64(picked)) {
                sums[r.2] -= v;
            }
        }
        for (s, sum) in batch.iter().zip(sums) {
            let n = s.len() - 1;
            total += sum;
            count += n;
            per_seq.push(SequenceNll {
                tokens: s.len(),
                mean_nll: sum / n as f64,
            });
        }
    }
    let mean_nll = total / count as f64;
    Ok(NllReport {
        mean_nll,
        perplexity: mean_nll.exp(),
        predicted_tokens: count,
        sequences: per_seq,
    })
}

/// KL(base ‖ other) of the next-token distributions at every position of `sequences`
/// (each at least 1 token), with top-1 agreement and both models' NLL from the same forward
/// passes.
pub fn eval_kld<B: Backend>(
    base: &CausalLm<B>,
    other: &CausalLm<B>,
    sequences: Vec<Vec<u32>>,
) -> Result<KldReport, EvalError> {
    eval_kld_with(base, other, sequences, &EvalOptions::default())
}

/// [`eval_kld`] with explicit batching.
pub fn eval_kld_with<B: Backend>(
    base: &CausalLm<B>,
    other: &CausalLm<B>,
    sequences: Vec<Vec<u32>>,
    options: &EvalOptions,
) -> Result<KldReport, EvalError> {
    let mut reports = eval_kld_many(base, &[other], sequences, options)?;
    Ok(reports.remove(0))
}

/// What [`eval_kld_many`] accumulates for one compared model.
#[derive(Default)]
struct KldSums {
    klds: Vec<f64>,
    agree: usize,
    nll: f64,
}

/// [`eval_kld_with`] for several models against one base: the base model's forward pass runs
/// once per batch for all of them. One report per model of `others`, in order.
pub fn eval_kld_many<B: Backend>(
    base: &CausalLm<B>,
    others: &[&CausalLm<B>],
    sequences: Vec<Vec<u32>>,
    options: &EvalOptions,
) -> Result<Vec<KldReport>, EvalError> {
    let vocab = base.config().vocab_size;
    if let Some(other) = others.iter().find(|o| o.config().vocab_size != vocab) {
        return Err(EvalError::VocabMismatch {
            base: vocab,
            other: other.config().vocab_size,
        });
    }
    check(&sequences, vocab, 1)?;
    let device = base.device();
    let chunk = chunk_rows(vocab, options);
    let mut sums: Vec<KldSums> = others.iter().map(|_| KldSums::default()).collect();
    let (mut nll_base, mut predicted) = (0f64, 0usize);
    for batch in sequences.chunks(options.batch_size.max(1)) {
        let (hb, width) = batch_hidden(base, batch);
        let hidden: Vec<Tensor<B, 2>> = others.iter().map(|o| batch_hidden(o, batch).0).collect();
        // (row of the position, next token if there is one)
        let rows: Vec<(usize, Option<usize>)> = batch
            .iter()
            .enumerate()
            .flat_map(|(b, s)| {
                (0..s.len()).map(move |p| (b * width + p, s.get(p + 1).map(|&t| t as usize)))
            })
            .collect();
        for part in rows.chunks(chunk) {
            let idx: Vec<usize> = part.iter().map(|r| r.0).collect();
            let idx = index_tensor::<B>(&idx, &device);
            let targets: Vec<usize> = part.iter().map(|r| r.1.unwrap_or(0)).collect();
            let targets = index_tensor::<B>(&targets, &device).unsqueeze_dim(1);
            let lb = log_probs(base, hb.clone().select(0, idx.clone()));
            let picked_b = to_f64(lb.clone().gather(1, targets.clone()));
            for (r, b) in part.iter().zip(&picked_b) {
                if r.1.is_some() {
                    nll_base -= b;
                    predicted += 1;
                }
            }
            let top_b = lb.clone().argmax(1);
            let pb = lb.clone().exp();
            for ((other, ho), sum) in others.iter().zip(&hidden).zip(&mut sums) {
                let lo = log_probs(other, ho.clone().select(0, idx.clone()));
                let picked_o = to_f64(lo.clone().gather(1, targets.clone()));
                for (r, o) in part.iter().zip(picked_o) {
                    if r.1.is_some() {
                        sum.nll -= o;
                    }
                }
                let top_o = lo.clone().argmax(1);
                let kl = qatflow_kernels::reduce::row_sum(pb.clone() * (lb.clone() - lo));
                sum.klds.extend(to_f64(kl));
                let same = top_b.clone().equal(top_o).int().sum();
                sum.agree += same.into_data().iter::<i64>().next().unwrap_or(0) as usize;
            }
        }
    }
    let mean = |sum: f64| (predicted > 0).then(|| sum / predicted as f64);
    Ok(sums
        .into_iter()
        .map(|s| {
            let n = s.klds.len();
            let mean_kld = s.klds.iter().sum::<f64>() / n as f64;
            let mut sorted = s.klds;
            sorted.sort_unstable_by(f64::total_cmp);
            let rank = ((0.99 * n as f64).ceil() as usize).clamp(1, n);
            KldReport {
                mean_kld,
                p99_kld: sorted[rank - 1],
                top1_agreement: s.agree as f64 / n as f64,
                positions: n,
                base_nll: mean(nll_base),
                other_nll: mean(s.nll),
            }
        })
        .collect())
}

/// Incremental decoding checked against one full forward: each sequence's first `prefill`
/// tokens go through the model in one call on a fresh cache, then every later token alone
/// (the attention layers' key/value cache; Gated DeltaNet's recurrent and convolution
/// state), and the logits of every position are compared with a full forward of the whole
/// sequence (the chunked form for Gated DeltaNet). Builds `[tokens, vocab]` float32 logits
/// per sequence: meant for short sequences.
pub fn eval_decode<B: Backend>(
    model: &CausalLm<B>,
    sequences: Vec<Vec<u32>>,
    prefill: usize,
) -> Result<DecodeReport, EvalError> {
    let prefill = prefill.max(1);
    check(&sequences, model.config().vocab_size, prefill + 1)?;
    let device = model.device();
    let ids = |tokens: &[u32]| {
        let data: Vec<i32> = tokens.iter().map(|&t| t as i32).collect();
        Tensor::<B, 2, Int>::from_data(TensorData::new(data, [1, tokens.len()]), &device)
    };
    let mut per_seq = Vec::with_capacity(sequences.len());
    for seq in &sequences {
        let full = to_dtype(model.forward(ids(seq), None), DType::F32);
        let mut cache = model.new_cache();
        let steps = std::iter::once((0, prefill)).chain((prefill..seq.len()).map(|p| (p, p + 1)));
        // Each step's largest |Δ| stays on the device; one read-back per sequence.
        let diffs: Vec<Tensor<B, 1>> = steps
            .map(|(start, end)| {
                let hidden = model.forward_hidden(ids(&seq[start..end]), None, Some(&mut cache));
                let part = to_dtype(model.logits(hidden), DType::F32);
                (part - full.clone().slice([0..1, start..end])).abs().max()
            })
            .collect();
        per_seq.push(SequenceDecode {
            tokens: seq.len(),
            max_abs_diff: to_f64(Tensor::cat(diffs, 0).max())[0],
        });
    }
    Ok(DecodeReport {
        prefill,
        max_abs_diff: per_seq.iter().map(|s| s.max_abs_diff).fold(0.0, f64::max),
        sequences: per_seq,
    })
}
