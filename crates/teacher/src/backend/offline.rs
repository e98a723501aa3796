//! The offline backend: a deterministic template generator that writes valid, varied
//! conversations for every category with an `offline` list, with no network.
//!
//! A category's conversation shapes are sequences of scenes (`fact`, `task`, `switch`, …,
//! see [`SCENES`]); each scene has a fixed number of variants (its content pool times the
//! user openers), so a shape has `N` distinct conversations. Conversation `g` of a
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
pub const SCENES: [&str; 11] = [
    "fact",
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
const OPENERS: [&str; 5] = ["", "Hey Mira, ", "Mira, ", "Okay Mira, ", "Hi, "];
const PRIMES: [u128; 4] = [1_000_003, 998_244_353, 1_000_000_007, 2_147_483_647];

const TOPICS: [(&str, &str); 16] = [
    ("how tides work", "Tides come from the Moon's gravity pulling the oceans into a bulge that the Earth rotates through."),
    ("why the sky is blue", "Air scatters short blue wavelengths of sunlight far more than red ones, so blue light reaches you from every direction."),
    ("what a transistor does", "A transistor is a tiny electrical switch that lets a small current control a much larger one."),
    ("how a PID controller works", "A PID controller corrects an error using its size now, its build-up over time and how fast it is changing."),
    ("what inflation means", "Inflation is the general rise in prices, so each rupee buys a little less over time."),
    ("how vaccines work", "A vaccine shows your immune system a harmless copy of a germ so it can fight the real one quickly later."),
    ("why onions make you cry", "Cutting an onion releases a gas that turns into a mild acid when it reaches the water in your eyes."),
    ("what a black hole is", "A black hole is a region where gravity is so strong that not even light can escape it."),
    ("how bread rises", "Yeast eats the sugars in dough and releases carbon dioxide, which the gluten traps as bubbles."),
    ("what a servo motor is", "A servo is a motor with a position sensor and a controller, so it turns to an exact angle and holds it."),
    ("the history of the printing press", "Gutenberg's press of around 1440 made books cheap enough to spread ideas across Europe within decades."),
    ("how solar panels work", "Solar cells use silicon that releases electrons when sunlight hits it, and those moving electrons are the current."),
    ("why monsoons happen", "In summer the land heats faster than the sea, and the moist ocean air that rushes in to replace rising warm air brings the rain."),
    ("what a lidar sensor does", "A lidar fires laser pulses and times their echoes to measure the distance to everything around it."),
    ("how noise cancelling works", "Noise cancelling headphones play a sound wave that is the exact opposite of the noise, so the two cancel out."),
    ("why cats purr", "Cats purr by vibrating the muscles of their voice box, mostly when they are relaxed and sometimes to soothe themselves."),
];
const LEADS: [&str; 4] = [
    "Tell me {}.",
    "Explain {} to me.",
    "Quick one, {}?",
    "I was wondering about {}.",
];
const LONG_QUESTIONS: [(&str, &str); 10] = [
    ("Can you explain quantum computing in detail?", "Quantum computers use qubits that can hold many states at once, which lets some problems be solved much faster. They are still small and error-prone today."),
    ("Tell me everything about the French Revolution.", "The French Revolution of 1789 overthrew the monarchy and spread ideas of liberty and equality. It ended with Napoleon's rise to power in 1799."),
    ("Explain how the internet works.", "Computers split data into small packets that routers pass along until they reach the right address. Shared rules called protocols let every network understand the others."),
    ("Give me a full history of Pune.", "Pune grew from a small town into the Maratha capital under the Peshwas in the 1700s. Today it is known for its universities, IT parks and car factories."),
    ("What are all the benefits of exercise?", "Regular exercise strengthens your heart, muscles and bones and lifts your mood. Even thirty minutes of walking a day makes a real difference."),
    ("Walk me through how a car engine works, step by step.", "Fuel and air burn inside the cylinders and push the pistons down, which turns the crankshaft. The crankshaft's turning is what drives the wheels."),
    ("Explain machine learning like I'm writing a thesis on it.", "Machine learning fits a model's parameters to examples so that it predicts well on data it has not seen. The craft is in the data, the model's shape and how you measure the error."),
    ("Tell me the whole story of the Mahabharata.", "The Mahabharata tells of the war between the Pandava and Kaurava cousins over the throne of Hastinapura. Its heart is the Bhagavad Gita, Krishna's counsel to Arjuna on duty."),
    ("Describe everything about how the stock market works.", "Companies sell shares to raise money, and buyers and sellers then trade those shares on an exchange at prices set by supply and demand. Prices move with expectations of future profits."),
    ("Give me a complete guide to growing tomatoes.", "Plant tomatoes in full sun in rich, well drained soil and water them deeply but not every day. Stake them early and pinch off the side shoots for bigger fruit."),
];
const SWITCHES: [(&str, &str); 10] = [
    (
        "Forget that, what's a good name for a cat?",
        "Mochi, Pepper and Toffee are all lovely cat names.",
    ),
    (
        "Different question, how long do I boil an egg?",
        "Boil it for about nine minutes for a firm yolk, then cool it in cold water.",
    ),
    (
        "Never mind, how many grams in a cup of rice?",
        "A cup of uncooked rice is roughly 185 grams.",
    ),
    (
        "Actually, what's the capital of Australia?",
        "The capital of Australia is Canberra.",
    ),
    (
        "Okay, tell me a fun fact instead.",
        "Octopuses have three hearts and blue blood.",
    ),
    (
        "Switching topics, how far is the Moon?",
        "The Moon is about 384,000 kilometres away on average.",
    ),
    (
        "New topic, what's a synonym for happy?",
        "Joyful and cheerful both work well.",
    ),
    (
        "Anyway, how do you say thank you in Marathi?",
        "Thank you in Marathi is dhanyavaad, or more warmly, khup khup dhanyavaad.",
    ),
    (
        "Leave that, how many legs does a spider have?",
        "A spider has eight legs.",
    ),
    (
        "Different thing, what temperature does water boil at?",
        "Water boils at 100 degrees Celsius at sea level.",
    ),
];
const SEARCHES: [(&str, &str, &str, &str); 8] = [
    (
        "What's the NVIDIA stock price?",
        "NVIDIA stock price",
        "NVIDIA (NVDA) is trading at $142.50, up 2.3% today.",
        "NVIDIA is at 142.50 dollars, up 2.3 percent today.",
    ),
    (
        "Who won the cricket match last night?",
        "cricket match result last night",
        "India beat Australia by 6 wickets at Wankhede.",
        "India beat Australia by six wickets at Wankhede last night.",
    ),
    (
        "What's the price of gold today?",
        "gold price today India",
        "24 carat gold: Rs 7,215 per gram.",
        "Twenty four carat gold is 7,215 rupees a gram today.",
    ),
    (
        "Any news about the Pune metro?",
        "Pune metro news",
        "The Swargate line extension opens for trial runs next week.",
        "The Swargate metro extension starts trial runs next week.",
    ),
    (
        "How much is a kilo of tomatoes in Pune?",
        "tomato price Pune per kg",
        "Tomatoes retail at Rs 38 per kg in Pune markets.",
        "Tomatoes are about 38 rupees a kilo in Pune right now.",
    ),
    (
        "When is the next SpaceX launch?",
        "next SpaceX launch date",
        "Falcon 9, Starlink Group 12-4: Thursday 04:30 UTC from Cape Canaveral.",
        "The next Falcon 9 launch is Thursday morning, carrying Starlink satellites.",
    ),
    (
        "What's the rupee to dollar rate?",
        "USD INR exchange rate today",
        "1 USD = 83.42 INR (mid-market).",
        "One dollar is about 83.42 rupees today.",
    ),
    (
        "Is the Mumbai Pune expressway busy right now?",
        "Mumbai Pune expressway traffic now",
        "Moderate traffic near Khalapur toll; ghat section clear; travel time 2h 40m.",
        "It's moderately busy near Khalapur, and the drive takes about two hours forty minutes.",
    ),
];
const MEMORY_QUERIES: [(&str, &str); 10] = [
    (
        "Do you remember what I said about my sister's wedding?",
        "sister wedding",
    ),
    (
        "What was the name of that book I liked last month?",
        "book liked",
    ),
    (
        "Did I tell you where I parked yesterday?",
        "parking yesterday",
    ),
    (
        "What did Arjun want for his birthday?",
        "Arjun birthday gift",
    ),
    (
        "Remind me which motor driver I chose for the arm.",
        "motor driver arm",
    ),
    (
        "What was that restaurant Arjun recommended?",
        "restaurant Arjun recommended",
    ),
    (
        "Did I mention my manager's new project?",
        "manager new project",
    ),
    (
        "What was Biscuit's vaccination date?",
        "Biscuit vaccination date",
    ),
    ("What's the wifi password I told you?", "wifi password"),
    ("Which camera did I say I wanted?", "camera wanted"),
];
const MEMORY_EMPTY_REPLIES: [&str; 2] = [
    "I don't have anything saved about that, so I honestly don't remember.",
    "I checked and found nothing saved about that, so I don't remember.",
];
const MEMORY_FOUND: [(&str, &str, &str, &str); 6] = [
    (
        "What's Biscuit's vet called again?",
        "Biscuit vet",
        "[\"Biscuit's vet is Dr. Kulkarni\"]",
        "Biscuit's vet is Dr. Kulkarni.",
    ),
    (
        "When is my dentist appointment?",
        "dentist appointment",
        "[\"Dentist appointment on the 14th\"]",
        "Your dentist appointment is on the 14th.",
    ),
    (
        "Which standup time did I prefer?",
        "standup time preference",
        "[\"Prefers the 8 am standup\"]",
        "You prefer the 8 am standup.",
    ),
    (
        "What size shoes does Arjun wear?",
        "Arjun shoe size",
        "[\"Arjun wears size 9 shoes\"]",
        "Arjun wears size nine.",
    ),
    (
        "Where did I keep the spare keys?",
        "spare keys",
        "[\"Spare keys are in the blue drawer in the study\"]",
        "The spare keys are in the blue drawer in the study.",
    ),
    (
        "What torque did I set on the gripper?",
        "gripper torque",
        "[\"Gripper torque set to 1.2 Nm\"]",
        "You set the gripper torque to 1.2 newton metres.",
    ),
];
const SAVES: [(&str, &str, &str); 8] = [
    (
        "Remember that my dentist appointment is on the 14th.",
        "Dentist appointment on the 14th",
        "Saved, your dentist appointment is on the 14th.",
    ),
    (
        "Please remember Biscuit's vet is Dr. Kulkarni.",
        "Biscuit's vet is Dr. Kulkarni",
        "Got it, Biscuit's vet is Dr. Kulkarni.",
    ),
    (
        "Note that I prefer the 8 am standup.",
        "Prefers the 8 am standup",
        "Noted, you prefer the 8 am standup.",
    ),
    (
        "Remember Arjun wears size 9 shoes.",
        "Arjun wears size 9 shoes",
        "Saved, Arjun wears size nine.",
    ),
    (
        "Save this, the spare keys are in the blue drawer.",
        "Spare keys are in the blue drawer",
        "Saved, the spare keys are in the blue drawer.",
    ),
    (
        "Remember I'm allergic to cashews.",
        "Priya is allergic to cashews",
        "Noted, you're allergic to cashews.",
    ),
    (
        "Keep in mind my flight to Delhi is on Friday.",
        "Flight to Delhi on Friday",
        "Saved, your Delhi flight is on Friday.",
    ),
    (
        "Remember that the gripper torque is 1.2 Nm.",
        "Gripper torque set to 1.2 Nm",
        "Got it, the gripper torque is 1.2 newton metres.",
    ),
];
const FEELINGS: [(&str, &str); 12] = [
    ("I'm so stressed about the demo tomorrow.", "That sounds heavy, and you have prepared for this more than you think. A good night's sleep will help more than another hour of tweaking."),
    ("I got the promotion!!", "Congratulations Priya, that is wonderful news. You earned it."),
    ("I feel lonely tonight.", "I'm sorry it feels that way tonight. Calling Arjun or a friend for a few minutes might help."),
    ("My robot arm finally picked the box!", "That is a big milestone, well done. All those late nights paid off."),
    ("Ugh, I burnt the dal again.", "That happens to everyone. A pinch of sugar and a fresh tadka can rescue most of the taste."),
    ("I'M SO HAPPY RIGHT NOW!!!", "That is lovely to hear, Priya. Enjoy every bit of it."),
    ("I think I messed up the presentation.", "One rough presentation does not undo your good work. Note what to change and let the rest go tonight."),
    ("Biscuit is sick and I'm worried.", "I'm sorry, worrying about Biscuit is hard. If he is not eating or drinking, the vet should see him today."),
    ("We won the robotics challenge!", "Congratulations to you and the team, that is a huge win. You all worked hard for it."),
    ("I'm exhausted, it's been a long week.", "It really has been a long week for you. Rest tonight, the work will still be there tomorrow."),
    ("Arjun surprised me with flowers today.", "That is so sweet of Arjun. It sounds like a lovely day."),
    ("I can't sleep, my mind is racing.", "That is a tiring feeling. Slow breathing for a few minutes and putting the phone away often helps the mind settle."),
];
const USER_CONTEXT: [(&str, &str); 8] = [
    (
        "Where do I live again?",
        "You live in Pune with Arjun and Biscuit.",
    ),
    (
        "What do I do for work?",
        "You build warehouse picking arms as a robotics engineer.",
    ),
    ("What's my cat called?", "Your cat is called Biscuit."),
    (
        "Who am I talking to?",
        "You're talking to Mira, your voice companion running on your own workstation.",
    ),
    ("What's my partner's name?", "Your partner is Arjun."),
    (
        "Which languages do I speak?",
        "You speak English, Marathi and some Hindi.",
    ),
    ("What's my name?", "Your name is Priya Raman."),
    (
        "Where do you run?",
        "I run entirely on your own GPU workstation at home in Pune.",
    ),
];
const GREETINGS: [(&str, &str); 8] = [
    (
        "Namaskar Mira!",
        "Namaskar Priya, it's good to hear from you.",
    ),
    (
        "Shubh sakal!",
        "Shubh sakal Priya, I hope the day starts well.",
    ),
    ("Namaste, kasa aahes?", "Mi majet aahe, thank you Priya."),
    (
        "Happy Gudi Padwa!",
        "Gudi Padwachya hardik shubhechha, Priya.",
    ),
    (
        "Ganpati Bappa Morya!",
        "Mangal Murti Morya, Priya, enjoy the celebrations.",
    ),
    (
        "Happy Diwali Mira!",
        "Happy Diwali Priya, may the year be bright for you and Arjun.",
    ),
    ("Shubh ratri Mira.", "Shubh ratri Priya, sleep well."),
    ("Kaise ho Mira?", "Main theek hoon Priya, dhanyavaad."),
];
const CITIES: [&str; 8] = [
    "Pune",
    "Mumbai",
    "Nashik",
    "Bengaluru",
    "Goa",
    "Lonavala",
    "Nagpur",
    "Kolhapur",
];
const TIMER_MINUTES: [u32; 10] = [3, 5, 7, 10, 12, 15, 20, 25, 30, 45];
const REMINDERS: [&str; 3] = ["call Amma", "water the plants", "take the charger"];
const GENRES: [&str; 6] = [
    "lo-fi",
    "Hindustani classical",
    "jazz",
    "Marathi folk",
    "Bollywood",
    "ambient",
];
const ROOMS: [&str; 5] = ["kitchen", "bedroom", "living room", "study", "balcony"];
const LIGHT_STATES: [(&str, &str, &str); 3] = [
    ("off", "Turn the {} lights off.", "The {} lights are off."),
    ("on", "Switch on the {} lights.", "The {} lights are on."),
    ("dim", "Dim the {} lights.", "The {} lights are dimmed."),
];

/// Variants of the task scene: timers, reminders, music, lights, weather.
const TASK_VARIANTS: u64 = (TIMER_MINUTES.len()
    + 11 * REMINDERS.len()
    + GENRES.len()
    + ROOMS.len() * LIGHT_STATES.len()
    + CITIES.len()) as u64;

fn base_variants(scene: &str) -> u64 {
    (match scene {
        "fact" => TOPICS.len() * LEADS.len(),
        "long_question" => LONG_QUESTIONS.len(),
        "task" => TASK_VARIANTS as usize,
        "search" => SEARCHES.len(),
        "memory_empty" => MEMORY_QUERIES.len() * MEMORY_EMPTY_REPLIES.len(),
        "memory_found" => MEMORY_FOUND.len(),
        "memory_save" => SAVES.len(),
        "feeling" => FEELINGS.len(),
        "user_context" => USER_CONTEXT.len(),
        "greeting" => GREETINGS.len(),
        "switch" => SWITCHES.len(),
        _ => 0,
    }) as u64
}

fn openers(scene: &str) -> u64 {
    if scene == "greeting" {
        1
    } else {
        OPENERS.len() as u64
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
        let opener = OPENERS[opener as usize];
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
        let mut v = v as usize;
        if v < TIMER_MINUTES.len() {
            let n = TIMER_MINUTES[v];
            self.user(opener, &format!("Set a timer for {n} minutes."));
            self.tool(
                "set_timer",
                json!({"minutes": n}),
                &format!("Timer set for {n} minutes."),
            );
            self.reply(&format!("Your {n} minute timer is running."));
            return;
        }
        v -= TIMER_MINUTES.len();
        if v < 11 * REMINDERS.len() {
            let (h, what) = (v % 11 + 1, REMINDERS[v / 11]);
            self.user(opener, &format!("Remind me to {what} at {h} pm."));
            let mut text = what.to_string();
            text[..1].make_ascii_uppercase();
            self.tool(
                "set_reminder",
                json!({"text": text, "time": format!("{h}:00 PM")}),
                &format!("Reminder created for {h}:00 PM."),
            );
            self.reply(&format!("I'll remind you to {what} at {h} pm."));
            return;
        }
        v -= 11 * REMINDERS.len();
        if v < GENRES.len() {
            let g = GENRES[v];
            self.user(opener, &format!("Play some {g} music."));
            self.tool(
                "play_music",
                json!({"query": format!("{g} music")}),
                &format!("Now playing: {g} mix."),
            );
            self.reply(&format!("Playing a {g} mix now."));
            return;
        }
        v -= GENRES.len();
        if v < ROOMS.len() * LIGHT_STATES.len() {
            let room = ROOMS[v % ROOMS.len()];
            let (state, ask, said) = LIGHT_STATES[v / ROOMS.len()];
            self.user(opener, &ask.replace("{}", room));
            self.tool(
                "control_lights",
                json!({"room": room, "state": state}),
                &format!("{room} lights: {state}."),
            );
            self.reply(&said.replace("{}", room));
            return;
        }
        v -= ROOMS.len() * LIGHT_STATES.len();
        let c = CITIES[v];
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
        match scene {
            "fact" => {
                let (topic, answer) = TOPICS[b % TOPICS.len()];
                self.user(opener, &LEADS[b / TOPICS.len()].replace("{}", topic));
                self.reply(answer);
            }
            "long_question" => {
                let (q, a) = LONG_QUESTIONS[b];
                self.user(opener, q);
                self.reply(a);
            }
            "task" => self.task(opener, b as u64),
            "search" => {
                let (q, query, result, spoken) = SEARCHES[b];
                self.user(opener, q);
                self.tool("web_search", json!({"query": query}), result);
                self.reply(spoken);
            }
            "memory_empty" => {
                let (q, query) = MEMORY_QUERIES[b % MEMORY_QUERIES.len()];
                self.user(opener, q);
                self.tool("search_memory", json!({"query": query}), "[]");
                self.reply(MEMORY_EMPTY_REPLIES[b / MEMORY_QUERIES.len()]);
            }
            "memory_found" => {
                let (q, query, result, spoken) = MEMORY_FOUND[b];
                self.user(opener, q);
                self.tool("search_memory", json!({"query": query}), result);
                self.reply(spoken);
            }
            "memory_save" => {
                let (s, note, spoken) = SAVES[b];
                self.user(opener, s);
                self.tool("save_memory", json!({"text": note}), "saved");
                self.reply(spoken);
            }
            "feeling" => {
                let (q, a) = FEELINGS[b];
                self.user(opener, q);
                self.reply(a);
            }
            "user_context" => {
                let (q, a) = USER_CONTEXT[b];
                self.user(opener, q);
                self.reply(a);
            }
            "greeting" => {
                let (g, a) = GREETINGS[b];
                self.user(opener, g);
                self.reply(a);
            }
            "switch" => {
                let (q, a) = SWITCHES[b];
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
