//! The offline backend: a deterministic template generator that writes valid, varied
//! conversations for every category with an `offline` list, with no network.
//!
//! A category's conversation shapes are sequences of scenes (`fact`, `task`, `switch`, …,
//! see [`SCENES`]); each scene has a fixed number of variants (its content pool in
//! `config/teacher/offline_phrases.toml` times the user openers), so a shape has `N`
//! distinct conversations. Conversation `g` of a
//! category (batch index × batch size + position) gets a shape round-robin and, as the
//! `j`-th of that shape, variant `(j·P + offset) mod N`, with `P` a prime coprime to `N`
//! and `offset` derived from the seed, category and shape: a bijection, so a category
//! never repeats a conversation, and batch `(category, index)` always yields the same
//! conversations, whatever ran before it. A shape that several categories (or one
//! category twice) list would make the same conversations in each: its `k` owners share
//! one offset and owner `i` takes only the rounds `j·k + i`, so no two owners ever write
//! the same messages.
//!
//! Output is JSONL text with the short generation prompt as system message, exactly like a
//! model's output, so it takes the same parse, inject, check and store path.

use super::offline_phrases::{phrases, Phrases};
use super::{Backend, BackendOutput, BatchRequest, BoxFuture, Usage};
use crate::config::TeacherConfig;
use crate::error::{BackendError, TeacherError};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::time::Duration;

/// Settings of the offline backend.
#[derive(Debug, Clone, Default)]
pub struct OfflineConfig {
    /// Seed; the same seed gives the same dataset.
    pub seed: u64,
    /// Simulated latency per batch (zero for none).
    pub delay: Duration,
}

/// The scene names a category's `offline` list may use.
pub const SCENES: [&str; 12] = [
    "fact",
    "quick_fact",
    "long_question",
    "task",
    "search",
    "memory_empty",
    "memory_found",
    "memory_save",
    "feeling",
    "user_context",
    "greeting",
    "switch",
];

const THINK: &str = "<think>\n</think>\n";
const PRIMES: [u128; 4] = [1_000_003, 998_244_353, 1_000_000_007, 2_147_483_647];

/// Reminder times of the task scene: every hour from 1 to 11 pm, on the hour and at half past.
const REMINDER_TIMES: usize = 22;

/// Variants of the task scene: timers, reminders (each at [`REMINDER_TIMES`] times), music,
/// lights, weather.
fn task_variants(p: &Phrases) -> usize {
    p.timer_minutes.len()
        + REMINDER_TIMES * p.reminders.len()
        + p.genres.len()
        + p.rooms.len() * p.light_states.len()
        + p.cities.len()
}

fn base_variants(scene: &str) -> u64 {
    let p = phrases();
    (match scene {
        "fact" => p.topics.len() * p.leads.len(),
        "quick_fact" => p.quick_facts.len(),
        "long_question" => p.long_questions.len(),
        "task" => task_variants(p),
        "search" => p.searches.len(),
        "memory_empty" => p.memory_queries.len() * p.memory_empty_replies.len(),
        "memory_found" => p.memory_found.len(),
        "memory_save" => p.saves.len(),
        "feeling" => p.feelings.len(),
        "user_context" => p.user_context.len(),
        "greeting" => p.greetings.len(),
        "switch" => p.switches.len(),
        _ => 0,
    }) as u64
}

fn openers(scene: &str) -> u64 {
    if scene == "greeting" {
        1
    } else {
        phrases().openers.len() as u64
    }
}

fn variants(scene: &str) -> u64 {
    base_variants(scene) * openers(scene)
}

struct Writer {
    messages: Vec<Value>,
    calls: u32,
}

impl Writer {
    fn user(&mut self, opener: u64, text: &str) {
        let opener = phrases().openers[opener as usize].as_str();
        let text = if opener.is_empty() {
            text.to_string()
        } else {
            let first = text.split_whitespace().next().unwrap_or("");
            let keep = first == "I" || first.starts_with("I'") || first == "NVIDIA";
            let mut chars = text.chars();
            match chars.next() {
                Some(c) if !keep => format!("{opener}{}{}", c.to_lowercase(), chars.as_str()),
                _ => format!("{opener}{text}"),
            }
        };
        self.messages.push(json!({"role": "user", "content": text}));
    }

    fn reply(&mut self, text: &str) {
        self.messages
            .push(json!({"role": "assistant", "content": format!("{THINK}{text}")}));
    }

    fn tool(&mut self, name: &str, args: Value, result: &str) {
        self.calls += 1;
        let id = format!("call_{}", self.calls);
        self.messages.push(json!({"role": "assistant", "content": null, "tool_calls": [
            {"id": id, "type": "function", "function": {"name": name, "arguments": args.to_string()}}]}));
        self.messages
            .push(json!({"role": "tool", "tool_call_id": id, "content": result}));
    }

    fn task(&mut self, opener: u64, v: u64) {
        let p = phrases();
        let mut v = v as usize;
        if v < p.timer_minutes.len() {
            let n = p.timer_minutes[v];
            self.user(opener, &format!("Set a timer for {n} minutes."));
            self.tool(
                "set_timer",
                json!({"minutes": n}),
                &format!("Timer set for {n} minutes."),
            );
            self.reply(&format!("Your {n} minute timer is running."));
            return;
        }
        v -= p.timer_minutes.len();
        if v < REMINDER_TIMES * p.reminders.len() {
            let what = &p.reminders[v / REMINDER_TIMES];
            let (h, half) = (v % 11 + 1, v % REMINDER_TIMES >= 11);
            let (said, time) = if half {
                (format!("{h}:30 pm"), format!("{h}:30 PM"))
            } else {
                (format!("{h} pm"), format!("{h}:00 PM"))
            };
            self.user(opener, &format!("Remind me to {what} at {said}."));
            let mut text = what.to_string();
            text[..1].make_ascii_uppercase();
            self.tool(
                "set_reminder",
                json!({"text": text, "time": time}),
                &format!("Reminder created for {time}."),
            );
            self.reply(&format!("I'll remind you to {what} at {said}."));
            return;
        }
        v -= REMINDER_TIMES * p.reminders.len();
        if v < p.genres.len() {
            let g = &p.genres[v];
            self.user(opener, &format!("Play some {g} music."));
            self.tool(
                "play_music",
                json!({"query": format!("{g} music")}),
                &format!("Now playing: {g} mix."),
            );
            self.reply(&format!("Playing a {g} mix now."));
            return;
        }
        v -= p.genres.len();
        if v < p.rooms.len() * p.light_states.len() {
            let room = &p.rooms[v % p.rooms.len()];
            let (state, ask, said) = &p.light_states[v / p.rooms.len()];
            self.user(opener, &ask.replace("{}", room));
            self.tool(
                "control_lights",
                json!({"room": room, "state": state}),
                &format!("{room} lights: {state}."),
            );
            self.reply(&said.replace("{}", room));
            return;
        }
        v -= p.rooms.len() * p.light_states.len();
        let c = &p.cities[v];
        self.user(opener, &format!("What's the weather in {c}?"));
        self.tool(
            "get_weather",
            json!({"city": c}),
            &format!("{c}: 27 C, clear skies, humidity 48%."),
        );
        self.reply(&format!("It's 27 degrees and clear in {c}."));
    }

    fn scene(&mut self, scene: &str, v: u64) {
        let (opener, b) = (v % openers(scene), (v / openers(scene)) as usize);
        let p = phrases();
        match scene {
            "fact" => {
                let (topic, answer) = &p.topics[b % p.topics.len()];
                self.user(opener, &p.leads[b / p.topics.len()].replace("{}", topic));
                self.reply(answer);
            }
            "quick_fact" => {
                let (q, a) = &p.quick_facts[b];
                self.user(opener, q);
                self.reply(a);
            }
            "long_question" => {
                let (q, a) = &p.long_questions[b];
                self.user(opener, q);
                self.reply(a);
            }
            "task" => self.task(opener, b as u64),
            "search" => {
                let (q, query, result, spoken) = &p.searches[b];
                self.user(opener, q);
                self.tool("web_search", json!({"query": query}), result);
                self.reply(spoken);
            }
            "memory_empty" => {
                let (q, query) = &p.memory_queries[b % p.memory_queries.len()];
                self.user(opener, q);
                self.tool("search_memory", json!({"query": query}), "[]");
                self.reply(&p.memory_empty_replies[b / p.memory_queries.len()]);
            }
            "memory_found" => {
                let (q, query, result, spoken) = &p.memory_found[b];
                self.user(opener, q);
                self.tool("search_memory", json!({"query": query}), result);
                self.reply(spoken);
            }
            "memory_save" => {
                let (s, note, spoken) = &p.saves[b];
                self.user(opener, s);
                self.tool("save_memory", json!({"text": note}), "saved");
                self.reply(spoken);
            }
            "feeling" => {
                let (q, a) = &p.feelings[b];
                self.user(opener, q);
                self.reply(a);
            }
            "user_context" => {
                let (q, a) = &p.user_context[b];
                self.user(opener, q);
                self.reply(a);
            }
            "greeting" => {
                let (g, a) = &p.greetings[b];
                self.user(opener, g);
                self.reply(a);
            }
            "switch" => {
                let (q, a) = &p.switches[b];
                self.user(opener, q);
                self.reply(a);
            }
            other => unreachable!("scene `{other}` was validated"),
        }
    }
}

/// One conversation shape of a category: its scenes and its permutation.
#[derive(Debug, Clone)]
struct Sequence {
    scenes: Vec<String>,
    /// Conversations this owner of the shape makes.
    size: u64,
    /// Variants of the shape as a whole.
    full: u64,
    /// Owners of the shape (categories listing it), and this one's place among them.
    stride: u64,
    slot: u64,
    prime: u128,
    offset: u128,
}

/// Who lists which shape: for each scene list, its owners `(category, position)` in order.
type Owners = BTreeMap<Vec<String>, Vec<(String, usize)>>;

/// The owners of every shape of `categories` (name, scene lists).
fn owners<'a>(categories: impl IntoIterator<Item = (&'a str, &'a [Vec<String>])>) -> Owners {
    let mut out = Owners::new();
    for (name, sequences) in categories {
        for (k, seq) in sequences.iter().enumerate() {
            out.entry(seq.clone())
                .or_default()
                .push((name.to_string(), k));
        }
    }
    for v in out.values_mut() {
        v.sort();
    }
    out
}

/// One category's conversation space.
#[derive(Debug, Clone)]
struct Space {
    sequences: Vec<Sequence>,
    total: u64,
}

impl Space {
    fn new(
        category: &str,
        sequences: &[Vec<String>],
        seed: u64,
        owners: &Owners,
    ) -> Result<Space, TeacherError> {
        let err = |message: String| TeacherError::Offline {
            category: category.to_string(),
            message,
        };
        if sequences.is_empty() {
            return Err(err("no offline scene sequences".into()));
        }
        let mut out = Vec::new();
        for (k, seq) in sequences.iter().enumerate() {
            if seq.is_empty() {
                return Err(err("an offline scene sequence is empty".into()));
            }
            let mut size: u64 = 1;
            for (i, scene) in seq.iter().enumerate() {
                if !SCENES.contains(&scene.as_str()) {
                    return Err(err(format!(
                        "unknown offline scene `{scene}` (known: {})",
                        SCENES.join(", ")
                    )));
                }
                if i == 0 && scene == "switch" {
                    return Err(err("`switch` cannot open a conversation".into()));
                }
                size = size.saturating_mul(variants(scene)).min(1 << 60);
            }
            let prime = PRIMES
                .into_iter()
                .find(|p| u128::from(size) % p != 0)
                .expect("a size below 2^60 is not divisible by four primes above 2^19");
            let sharing = owners.get(seq).map_or(&[][..], Vec::as_slice);
            let (stride, slot) = match sharing.iter().position(|(c, i)| c == category && *i == k) {
                Some(slot) if sharing.len() > 1 => (sharing.len() as u64, slot as u64),
                _ => (1, 0),
            };
            // Owners of a shared shape share its offset, so their rounds never meet.
            let key = if stride > 1 {
                format!("{seed}\0shared\0{}", seq.join("+"))
            } else {
                format!("{seed}\0{category}\0{k}")
            };
            let digest = Sha256::digest(key.as_bytes());
            let offset = u128::from(u64::from_be_bytes(digest[..8].try_into().expect("8 bytes")))
                % u128::from(size);
            out.push(Sequence {
                scenes: seq.clone(),
                size: (size + stride - 1 - slot) / stride,
                full: size,
                stride,
                slot,
                prime,
                offset,
            });
        }
        let total = out.iter().map(|s| s.size).sum();
        Ok(Space {
            sequences: out,
            total,
        })
    }

    /// Conversation `g` deals the shapes round-robin (shape after shape, skipping shapes
    /// whose variants are used up), so shapes are equally common while they last; its
    /// variant within the shape is a bijective permutation of the round number.
    fn locate(&self, mut g: u64) -> (&Sequence, u64) {
        let mut sizes: Vec<u64> = self.sequences.iter().map(|s| s.size).collect();
        sizes.sort_unstable();
        sizes.dedup();
        let mut round = 0;
        for cap in sizes {
            let active: Vec<&Sequence> = self.sequences.iter().filter(|s| s.size > round).collect();
            let span = (cap - round) * active.len() as u64;
            if g < span {
                let n = active.len() as u64;
                let seq = active[(g % n) as usize];
                return (seq, round + g / n);
            }
            g -= span;
            round = cap;
        }
        unreachable!("g is below the total checked by the caller")
    }

    fn conversation(&self, g: u64, system: &str) -> Value {
        let (seq, j) = self.locate(g);
        let round = u128::from(j) * u128::from(seq.stride) + u128::from(seq.slot);
        let mut idx = ((round * seq.prime + seq.offset) % u128::from(seq.full)) as u64;
        let mut w = Writer {
            messages: vec![json!({"role": "system", "content": system})],
            calls: 0,
        };
        for scene in &seq.scenes {
            let k = variants(scene);
            w.scene(scene, idx % k);
            idx /= k;
        }
        json!({ "messages": w.messages })
    }
}

/// The offline backend.
#[derive(Debug)]
pub struct OfflineBackend {
    spaces: BTreeMap<String, Space>,
    system: String,
    delay: Duration,
}

impl OfflineBackend {
    /// Prepares every category that has an `offline` list; fails on unknown scenes and on
    /// categories asking for more conversations than their scenes can make distinct.
    pub fn new(config: &OfflineConfig, teacher: &TeacherConfig) -> Result<Self, TeacherError> {
        let mut spaces = BTreeMap::new();
        let owners = owners(
            teacher
                .categories
                .iter()
                .map(|c| (c.name.as_str(), c.offline.as_slice())),
        );
        for c in teacher.categories.iter().filter(|c| !c.offline.is_empty()) {
            let space = Space::new(&c.name, &c.offline, config.seed, &owners)?;
            if space.total < c.count {
                return Err(TeacherError::Offline {
                    category: c.name.clone(),
                    message: format!(
                        "count {} exceeds the {} distinct conversations its offline scenes make",
                        c.count, space.total
                    ),
                });
            }
            spaces.insert(c.name.clone(), space);
        }
        Ok(OfflineBackend {
            spaces,
            system: teacher.generation.short_system_prompt.clone(),
            delay: config.delay,
        })
    }

    /// The JSONL text of conversations `first .. first + size` of a category.
    pub fn render(&self, category: &str, first: u64, size: usize) -> Result<String, BackendError> {
        let space = self.spaces.get(category).ok_or_else(|| {
            BackendError::Fatal(format!(
                "category `{category}` has no `offline` scene list in categories.toml"
            ))
        })?;
        if first + size as u64 > space.total {
            return Err(BackendError::Fatal(format!(
                "category `{category}` has only {} distinct offline conversations; ask for fewer",
                space.total
            )));
        }
        let mut text = String::new();
        for g in first..first + size as u64 {
            text.push_str(&space.conversation(g, &self.system).to_string());
            text.push('\n');
        }
        Ok(text)
    }
}

impl Backend for OfflineBackend {
    fn name(&self) -> &str {
        "offline"
    }

    fn generate<'a>(
        &'a self,
        request: &'a BatchRequest,
    ) -> BoxFuture<'a, Result<BackendOutput, BackendError>> {
        Box::pin(async move {
            if !self.delay.is_zero() {
                tokio::time::sleep(self.delay).await;
            }
            let text = self.render(&request.category, request.first_item, request.size)?;
            Ok(BackendOutput {
                text,
                usage: Usage {
                    requests: 1,
                    ..Usage::default()
                },
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    fn backend(seed: u64) -> OfflineBackend {
        OfflineBackend::new(
            &OfflineConfig {
                seed,
                delay: Duration::ZERO,
            },
            &TeacherConfig::builtin(),
        )
        .unwrap()
    }

    #[test]
    fn batches_are_deterministic_and_independent() {
        let b = backend(7);
        let whole = b.render("topic_switch", 0, 50).unwrap();
        let parts = format!(
            "{}{}",
            b.render("topic_switch", 0, 20).unwrap(),
            b.render("topic_switch", 20, 30).unwrap()
        );
        assert_eq!(whole, parts);
        assert_ne!(whole, backend(8).render("topic_switch", 0, 50).unwrap());
    }

    #[test]
    fn a_category_never_repeats_and_every_scene_renders() {
        let b = backend(1);
        for c in TeacherConfig::builtin().categories {
            let text = b.render(&c.name, 0, c.count as usize).unwrap();
            let lines: HashSet<&str> = text.lines().collect();
            assert_eq!(lines.len() as u64, c.count, "{}", c.name);
        }
        for scene in SCENES.iter().filter(|s| **s != "switch") {
            for v in 0..variants(scene) {
                let mut w = Writer {
                    messages: vec![],
                    calls: 0,
                };
                w.scene(scene, v);
                assert!(w.messages.len() >= 2);
            }
        }
    }

    #[test]
    fn no_two_categories_write_the_same_messages() {
        let b = backend(0);
        let mut seen = std::collections::HashMap::new();
        for c in TeacherConfig::builtin().categories {
            let text = b.render(&c.name, 0, c.count as usize).unwrap();
            for line in text.lines() {
                let messages = serde_json::from_str::<Value>(line).unwrap()["messages"].to_string();
                if let Some(other) = seen.insert(messages, c.name.clone()) {
                    panic!("{} repeats a conversation of {other}: {line}", c.name);
                }
            }
        }
    }

    #[test]
    fn owners_of_a_shared_shape_split_its_rounds() {
        let shared = vec![vec!["greeting".to_string()]];
        let o = owners([("a", &shared[..]), ("b", &shared[..])]);
        let a = Space::new("a", &shared, 5, &o).unwrap();
        let b = Space::new("b", &shared, 5, &o).unwrap();
        // greeting has 8 variants: 4 each, all different.
        assert_eq!((a.total, b.total), (4, 4));
        let mut all = HashSet::new();
        for g in 0..4 {
            assert!(all.insert(a.conversation(g, "s").to_string()));
            assert!(all.insert(b.conversation(g, "s").to_string()));
        }
    }

    #[test]
    fn shapes_are_dealt_round_robin_until_used_up() {
        let space = Space::new(
            "x",
            &[
                vec!["greeting".into()],
                vec!["greeting".into(), "fact".into()],
                vec!["greeting".into(), "task".into()],
            ],
            3,
            &Owners::new(),
        )
        .unwrap();
        let shapes: Vec<String> = (0..50)
            .map(|g| space.locate(g).0.scenes.join("+"))
            .collect();
        let count = |s: &str| shapes.iter().filter(|x| *x == s).count();
        // greeting alone has 8 variants: used up after 8 rounds, the rest share the others.
        assert_eq!(count("greeting"), 8);
        assert_eq!(count("greeting+fact"), 21);
        assert_eq!(count("greeting+task"), 21);
        let mut seen = HashSet::new();
        for g in 0..space.total.min(3000) {
            assert!(
                seen.insert(space.conversation(g, "s").to_string()),
                "repeat at {g}"
            );
        }
    }

    #[test]
    fn bad_scene_lists_are_errors() {
        let err = Space::new("x", &[vec!["nope".into()]], 0, &Owners::new())
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown offline scene `nope`"), "{err}");
        let err = Space::new("x", &[vec!["switch".into()]], 0, &Owners::new())
            .unwrap_err()
            .to_string();
        assert!(err.contains("cannot open"), "{err}");
    }
}
