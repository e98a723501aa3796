//! The model worker: one thread owns the model and advances every active sequence by one
//! token per step ([`LanguageModel::decode_step`], per-sequence KV caches), admits
//! waiting requests from a bounded queue between steps (prefilling each new prompt from
//! the longest cached prefix of token ids), and streams token ids back to the request
//! handlers. A handler that goes away (client disconnect, stop string) cancels its
//! sequence at the next token.

use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{self, Receiver, SyncSender, TryRecvError, TrySendError};
use std::sync::Arc;
use std::time::Instant;

use qatflow_model::generate::Sampler;
use qatflow_model::{GenerateOptions, LanguageModel, LoadError};

use crate::ServeError;
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender};

use crate::metrics::Metrics;

/// Why a sequence ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// A stop token was generated.
    Stop,
    /// The token budget was used up.
    Length,
}

/// What the worker tells a request handler.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The prompt was prefilled; `cached` of its tokens came from the prefix cache.
    Started {
        /// Prompt tokens whose keys and values were reused.
        cached: usize,
    },
    /// A generated token (stop tokens are not sent).
    Token(u32),
    /// Generation ended.
    Done {
        /// Why.
        finish: Finish,
        /// Tokens generated, a final stop token included.
        generated: usize,
    },
    /// The model failed on this sequence (the worker goes on with the others).
    Error(String),
}

/// A generation request for the worker.
#[derive(Debug)]
pub struct Job {
    /// Prompt token ids (not empty, inside the vocabulary).
    pub prompt: Vec<u32>,
    /// Most tokens to generate (at least 1).
    pub max_tokens: usize,
    /// Temperature, top-p and seed (`max_new_tokens` is ignored; `max_tokens` counts).
    pub sampling: GenerateOptions,
    /// Token ids that end generation.
    pub stop_ids: Vec<u32>,
    /// When the request arrived (for time to first token).
    pub arrived: Instant,
    events: UnboundedSender<Event>,
}

impl Job {
    /// A job and the receiver of its events.
    pub fn new(
        prompt: Vec<u32>,
        max_tokens: usize,
        sampling: GenerateOptions,
        stop_ids: Vec<u32>,
    ) -> (Job, UnboundedReceiver<Event>) {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        (
            Job {
                prompt,
                max_tokens,
                sampling,
                stop_ids,
                arrived: Instant::now(),
                events: tx,
            },
            rx,
        )
    }
}

/// Limits of the worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EngineConfig {
    /// Most sequences decoded together.
    pub max_batch: usize,
    /// Most requests waiting beyond those being decoded.
    pub queue_capacity: usize,
    /// Prompt caches kept for prefix reuse (0 turns the prefix cache off).
    pub prefix_cache_entries: usize,
    /// Shortest shared prefix worth reusing, in tokens.
    pub min_prefix_tokens: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            max_batch: 32,
            queue_capacity: 256,
            prefix_cache_entries: 4,
            min_prefix_tokens: 16,
        }
    }
}

/// Errors of handing a job to the worker.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    /// The queue is full.
    #[error("the server is busy: {0} requests are already waiting; retry later")]
    QueueFull(usize),
    /// The worker thread is gone.
    #[error("the model worker has stopped; restart the server")]
    WorkerGone,
}

/// A handle to the model worker thread.
#[derive(Debug, Clone)]
pub struct Engine {
    jobs: SyncSender<Job>,
    metrics: Arc<Metrics>,
    capacity: usize,
}

impl Engine {
    /// Starts the worker thread, which builds the model with `load` on its own thread
    /// (burn models need not be `Send`) and then serves jobs until every handle is dropped.
    /// Returns once the model is loaded, or the load error.
    pub fn start<M, F>(
        load: F,
        config: EngineConfig,
        metrics: Arc<Metrics>,
    ) -> Result<Engine, ServeError>
    where
        M: LanguageModel + 'static,
        F: FnOnce() -> Result<M, LoadError> + Send + 'static,
    {
        let (jobs, rx) = mpsc::sync_channel(config.queue_capacity);
        let (ready_tx, ready_rx) = mpsc::channel();
        let m = metrics.clone();
        std::thread::Builder::new()
            .name("qatflow-serve-model".into())
            .spawn(move || match load() {
                Ok(model) => {
                    let _ = ready_tx.send(Ok(()));
                    Worker::new(model, config, m).run(rx);
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                }
            })
            .map_err(|e| ServeError::Worker(e.to_string()))?;
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(Engine {
                jobs,
                metrics,
                capacity: config.queue_capacity,
            }),
            Ok(Err(e)) => Err(e.into()),
            Err(_) => Err(ServeError::Worker(
                "the model worker panicked while loading the model".into(),
            )),
        }
    }

    /// Queues a job without waiting.
    pub fn submit(&self, job: Job) -> Result<(), SubmitError> {
        self.metrics.queue_depth.fetch_add(1, Ordering::Relaxed);
        let r = self.jobs.try_send(job);
        if r.is_err() {
            self.metrics.queue_depth.fetch_sub(1, Ordering::Relaxed);
        }
        match r {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(_)) => Err(SubmitError::QueueFull(self.capacity)),
            Err(TrySendError::Disconnected(_)) => Err(SubmitError::WorkerGone),
        }
    }
}

/// Caches of recent prompts, for reuse by prompts that start with the same tokens.
struct PrefixCache<M: LanguageModel> {
    entries: VecDeque<(Vec<u32>, M::Cache)>,
    max_entries: usize,
    min_tokens: usize,
}

impl<M: LanguageModel> PrefixCache<M> {
    /// The cache of the longest cached prefix of `prompt` (leaving at least one token to
    /// prefill), truncated to that prefix, and its length.
    fn lookup(&mut self, prompt: &[u32]) -> Option<(usize, M::Cache)> {
        let (i, shared) = self
            .entries
            .iter()
            .enumerate()
            .map(|(i, (ids, _))| {
                let lcp = ids.iter().zip(prompt).take_while(|(a, b)| a == b).count();
                (i, lcp.min(prompt.len() - 1))
            })
            .max_by_key(|&(_, n)| n)?;
        if shared < self.min_tokens.max(1) {
            return None;
        }
        let entry = self.entries.remove(i)?;
        let mut cache = entry.1.clone();
        self.entries.push_front(entry);
        M::truncate_cache(&mut cache, shared);
        Some((shared, cache))
    }

    fn insert(&mut self, prompt: &[u32], cache: &M::Cache) {
        if self.max_entries == 0 {
            return;
        }
        // An entry whose tokens the new prompt starts with is superseded by it.
        self.entries.retain(|(ids, _)| !prompt.starts_with(ids));
        self.entries.push_front((prompt.to_vec(), cache.clone()));
        self.entries.truncate(self.max_entries);
    }
}

/// A sequence being decoded.
struct Seq<M: LanguageModel> {
    cache: M::Cache,
    next: u32,
    generated: usize,
    max_tokens: usize,
    sampler: Sampler,
    stop_ids: Vec<u32>,
    events: UnboundedSender<Event>,
    last_token_at: Instant,
}

struct Worker<M: LanguageModel> {
    model: M,
    config: EngineConfig,
    metrics: Arc<Metrics>,
    prefix: PrefixCache<M>,
    active: Vec<Seq<M>>,
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

impl<M: LanguageModel> Worker<M> {
    fn new(model: M, config: EngineConfig, metrics: Arc<Metrics>) -> Self {
        Worker {
            model,
            prefix: PrefixCache {
                entries: VecDeque::new(),
                max_entries: config.prefix_cache_entries,
                min_tokens: config.min_prefix_tokens,
            },
            config,
            metrics,
            active: Vec::new(),
        }
    }

    fn run(mut self, jobs: Receiver<Job>) {
        loop {
            if self.active.is_empty() {
                match jobs.recv() {
                    Ok(job) => self.admit(job),
                    Err(_) => return,
                }
            }
            while self.active.len() < self.config.max_batch.max(1) {
                match jobs.try_recv() {
                    Ok(job) => self.admit(job),
                    Err(TryRecvError::Empty | TryRecvError::Disconnected) => break,
                }
            }
            self.step();
            self.metrics
                .active_sequences
                .store(self.active.len(), Ordering::Relaxed);
        }
    }

    /// Samples from `logits` for a sequence, sends the token and says whether the
    /// sequence goes on.
    fn emit(&self, seq: &mut Seq<M>, logits: &[f32], first_at: Option<Instant>) -> bool {
        let token = seq.sampler.sample(logits);
        seq.generated += 1;
        self.metrics
            .generated_tokens
            .fetch_add(1, Ordering::Relaxed);
        let now = Instant::now();
        match first_at {
            Some(arrived) => self.metrics.ttft.observe((now - arrived).as_secs_f64()),
            None => self
                .metrics
                .token_latency
                .observe((now - seq.last_token_at).as_secs_f64()),
        }
        seq.last_token_at = now;
        let done = |finish| Event::Done {
            finish,
            generated: seq.generated,
        };
        if seq.stop_ids.contains(&token) {
            let _ = seq.events.send(done(Finish::Stop));
            return false;
        }
        if seq.events.send(Event::Token(token)).is_err() {
            return false;
        }
        if seq.generated >= seq.max_tokens {
            let _ = seq.events.send(done(Finish::Length));
            return false;
        }
        seq.next = token;
        true
    }

    fn admit(&mut self, job: Job) {
        self.metrics.queue_depth.fetch_sub(1, Ordering::Relaxed);
        if job.events.is_closed() {
            return;
        }
        let model = &self.model;
        let prefix = &mut self.prefix;
        let prompt = &job.prompt;
        let prefilled = std::panic::catch_unwind(AssertUnwindSafe(|| {
            let (cached, mut cache) = prefix
                .lookup(prompt)
                .unwrap_or_else(|| (0, model.new_cache()));
            let logits = model.next_logits(&prompt[cached..], &mut cache);
            prefix.insert(prompt, &cache);
            (cached, cache, logits)
        }));
        let (cached, cache, logits) = match prefilled {
            Ok(r) => r,
            Err(p) => {
                let _ = job.events.send(Event::Error(format!(
                    "the model failed on this prompt: {}",
                    panic_message(p.as_ref())
                )));
                return;
            }
        };
        self.metrics
            .prompt_tokens
            .fetch_add(job.prompt.len() as u64, Ordering::Relaxed);
        self.metrics
            .prefix_cache_hit_tokens
            .fetch_add(cached as u64, Ordering::Relaxed);
        let _ = job.events.send(Event::Started { cached });
        let mut seq = Seq {
            cache,
            next: 0,
            generated: 0,
            max_tokens: job.max_tokens.max(1),
            sampler: Sampler::new(&job.sampling),
            stop_ids: job.stop_ids,
            events: job.events,
            last_token_at: Instant::now(),
        };
        if self.emit(&mut seq, &logits, Some(job.arrived)) {
            self.active.push(seq);
        }
    }

    fn step(&mut self) {
        self.active.retain(|s| !s.events.is_closed());
        if self.active.is_empty() {
            return;
        }
        let tokens: Vec<u32> = self.active.iter().map(|s| s.next).collect();
        let model = &self.model;
        let mut caches: Vec<&mut M::Cache> = self.active.iter_mut().map(|s| &mut s.cache).collect();
        let result =
            std::panic::catch_unwind(AssertUnwindSafe(|| model.decode_step(&tokens, &mut caches)));
        let logits = match result {
            Ok(l) => l,
            Err(p) => {
                let msg = format!(
                    "the model failed while decoding: {}",
                    panic_message(p.as_ref())
                );
                for s in self.active.drain(..) {
                    let _ = s.events.send(Event::Error(msg.clone()));
                }
                return;
            }
        };
        let mut active = std::mem::take(&mut self.active);
        let mut keep = Vec::with_capacity(active.len());
        for (mut seq, l) in active.drain(..).zip(logits) {
            if self.emit(&mut seq, &l, None) {
                keep.push(seq);
            }
        }
        self.active = keep;
    }
}
