#!/usr/bin/env python3
"""Writes config/examples/qat_v4_example.jsonl: a deterministic example dataset in the
seeds' v4 shape (9 categories, 1000 conversations, full system prompt, empty think block,
tool calls with results), for the demo and tests. It is template-generated, not written by
a teacher model, and every line says so in its `source` field.

    python3 config/examples/generate_example.py   # from the repository root
"""
import json
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SYSTEM = (ROOT / "config/teacher/system_prompt.txt").read_text()
THINK = "<think>\n</think>\n"
rng = random.Random(20260316)

CITIES = ["Pune", "Mumbai", "Nashik", "Bengaluru", "Goa", "Lonavala", "Nagpur", "Kolhapur"]
TOPICS = [
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
]
SWITCHES = [
    ("Forget that, what's a good name for a cat?", "Mochi, Pepper and Toffee are all lovely cat names."),
    ("Different question, how long do I boil an egg?", "Boil it for about nine minutes for a firm yolk, then cool it in cold water."),
    ("Never mind, how many grams in a cup of rice?", "A cup of uncooked rice is roughly 185 grams."),
    ("Actually, what's the capital of Australia?", "The capital of Australia is Canberra."),
    ("Okay, tell me a fun fact instead.", "Octopuses have three hearts and blue blood."),
    ("Switching topics, how far is the Moon?", "The Moon is about 384,000 kilometres away on average."),
]
MEMORY_QUERIES = [
    ("Do you remember what I said about my sister's wedding?", "sister wedding"),
    ("What was the name of that book I liked last month?", "book liked"),
    ("Did I tell you where I parked yesterday?", "parking yesterday"),
    ("What did Arjun want for his birthday?", "Arjun birthday gift"),
    ("Remind me which motor driver I chose for the arm.", "motor driver arm"),
]
SAVES = [
    ("Remember that my dentist appointment is on the 14th.", "Dentist appointment on the 14th", "Saved, your dentist appointment is on the 14th."),
    ("Please remember Biscuit's vet is Dr. Kulkarni.", "Biscuit's vet is Dr. Kulkarni", "Got it, Biscuit's vet is Dr. Kulkarni."),
    ("Note that I prefer the 8 am standup.", "Prefers the 8 am standup", "Noted, you prefer the 8 am standup."),
]
SEARCHES = [
    ("What's the NVIDIA stock price?", "NVIDIA stock price", "NVIDIA (NVDA) is trading at $142.50, up 2.3% today.", "NVIDIA is at 142.50 dollars, up 2.3 percent today."),
    ("Who won the cricket match last night?", "cricket match result last night", "India beat Australia by 6 wickets at Wankhede.", "India beat Australia by six wickets at Wankhede last night."),
    ("What's the price of gold today?", "gold price today India", "24 carat gold: Rs 7,215 per gram.", "Twenty four carat gold is 7,215 rupees a gram today."),
    ("Any news about the Pune metro?", "Pune metro news", "The Swargate line extension opens for trial runs next week.", "The Swargate metro extension starts trial runs next week."),
    ("How much is a kilo of tomatoes in Pune?", "tomato price Pune per kg", "Tomatoes retail at Rs 38 per kg in Pune markets.", "Tomatoes are about 38 rupees a kilo in Pune right now."),
]
GREETINGS = [
    ("Namaskar Mira!", "Namaskar Priya, it's good to hear from you."),
    ("Shubh sakal!", "Shubh sakal Priya, I hope the day starts well."),
    ("Namaste, kasa aahes?", "Mi majet aahe, thank you Priya."),
    ("Happy Gudi Padwa!", "Gudi Padwachya hardik shubhechha, Priya."),
    ("Ganpati Bappa Morya!", "Mangal Murti Morya, Priya, enjoy the celebrations."),
    ("Happy Diwali Mira!", "Happy Diwali Priya, may the year be bright for you and Arjun."),
]
FEELINGS = [
    ("I'm so stressed about the demo tomorrow.", "That sounds heavy, and you have prepared for this more than you think. A good night's sleep will help more than another hour of tweaking."),
    ("I got the promotion!!", "Congratulations Priya, that is wonderful news. You earned it."),
    ("I feel lonely tonight.", "I'm sorry it feels that way tonight. Calling Arjun or a friend for a few minutes might help."),
    ("My robot arm finally picked the box!", "That is a big milestone, well done. All those late nights paid off."),
    ("Ugh, I burnt the dal again.", "That happens to everyone. A pinch of sugar and fresh tadka can rescue most of the taste."),
]
FACT_QUESTIONS = [
    ("Can you explain quantum computing in detail?", "Quantum computers use qubits that can hold many states at once, which lets some problems be solved much faster. They are still small and error-prone today."),
    ("Tell me everything about the French Revolution.", "The French Revolution of 1789 overthrew the monarchy and spread ideas of liberty and equality. It ended with Napoleon's rise to power in 1799."),
    ("Explain how the internet works.", "Computers split data into small packets that routers pass along until they reach the right address. Shared rules called protocols make every network understand each other."),
    ("Give me a full history of Pune.", "Pune grew from a small town into the Maratha capital under the Peshwas in the 1700s. Today it is known for its universities, IT parks and car factories."),
    ("What are all the benefits of exercise?", "Regular exercise strengthens your heart, muscles and bones and lifts your mood. Even thirty minutes of walking a day makes a real difference."),
]
USER_CONTEXT = [
    ("Where do I live again?", "You live in Pune with Arjun and Biscuit."),
    ("What do I do for work?", "You build warehouse picking arms as a robotics engineer."),
    ("What's my cat called?", "Your cat is called Biscuit."),
    ("Who am I talking to?", "You're talking to Mira, your voice companion running on your own workstation."),
    ("What's my partner's name?", "Your partner is Arjun."),
]
TASKS = [
    ("Set a timer for {n} minutes.", "set_timer", lambda n: {"minutes": n}, "Timer set for {n} minutes.", "Your {n} minute timer is running."),
    ("Remind me to call Amma at {h} pm.", "set_reminder", lambda h: {"text": "Call Amma", "time": f"{h}:00 PM"}, "Reminder created for {h}:00 PM.", "I'll remind you to call Amma at {h} pm."),
    ("Play some {g} music.", "play_music", lambda g: {"query": f"{g} music"}, "Now playing: {g} mix.", "Playing a {g} mix now."),
    ("Turn the {r} lights off.", "control_lights", lambda r: {"room": r, "state": "off"}, "{r} lights: off.", "The {r} lights are off."),
    ("What's the weather in {c}?", "get_weather", lambda c: {"city": c}, "{c}: 27 C, clear skies, humidity 48%.", "It's 27 degrees and clear in {c}."),
]
GENRES = ["lo-fi", "Hindustani classical", "jazz", "Marathi folk", "Bollywood", "ambient"]
ROOMS = ["kitchen", "bedroom", "living room", "study", "balcony"]

call_counter = [0]


def sys():
    return {"role": "system", "content": SYSTEM}


OPENERS = ["", "", "Hey Mira, ", "Mira, ", "Okay Mira, ", "Hi, "]


def user(text):
    opener = rng.choice(OPENERS)
    if opener:
        text = opener + text[0].lower() + text[1:]
    return {"role": "user", "content": text}


def reply(text):
    return {"role": "assistant", "content": THINK + text}


def tool_turn(name, args, result):
    call_counter[0] += 1
    cid = f"call_{call_counter[0]:05d}"
    return [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": cid, "type": "function", "function": {"name": name, "arguments": json.dumps(args)}}]},
        {"role": "tool", "tool_call_id": cid, "content": result},
    ]


def task():
    template, name, args, result, spoken = rng.choice(TASKS)
    if name == "set_timer":
        v = rng.choice([3, 5, 7, 10, 12, 15, 20, 25, 30, 45])
        key = "n"
    elif name == "set_reminder":
        v = rng.randint(1, 11)
        key = "h"
    elif name == "play_music":
        v = rng.choice(GENRES)
        key = "g"
    elif name == "control_lights":
        v = rng.choice(ROOMS)
        key = "r"
    else:
        v = rng.choice(CITIES)
        key = "c"
    fmt = {key: v}
    return [user(template.format(**fmt)), *tool_turn(name, args(v), result.format(**fmt)), reply(spoken.format(**fmt))]


def search():
    q, query, result, spoken = rng.choice(SEARCHES)
    return [user(q), *tool_turn("web_search", {"query": query}, result), reply(spoken)]


def fact():
    topic, answer = rng.choice(TOPICS)
    lead = rng.choice(["Tell me {}.", "Explain {} to me.", "Quick one, {}?", "I was wondering about {}."])
    return [user(lead.format(topic)), reply(answer)]


def category_turns(cat):
    if cat == "topic_switch":
        s, a = rng.choice(SWITCHES)
        first = fact() if rng.random() < 0.6 else task()
        return first + [user(s), reply(a)]
    if cat == "direct_action":
        return task() if rng.random() < 0.8 else search()
    if cat == "concise_voice":
        q, a = rng.choice(FACT_QUESTIONS)
        return [user(q), reply(a)] if rng.random() < 0.6 else fact()
    if cat == "honest_memory":
        q, query = rng.choice(MEMORY_QUERIES)
        if rng.random() < 0.6:
            return [user(q), *tool_turn("search_memory", {"query": query}, "[]"),
                    reply("I don't have anything saved about that, so I honestly don't remember.")]
        s, note, spoken = rng.choice(SAVES)
        return [user(s), *tool_turn("save_memory", {"text": note}, "saved"), reply(spoken)]
    if cat == "no_emoji_no_markdown":
        q, a = rng.choice(FEELINGS)
        return [user(q), reply(a)]
    if cat == "no_followup_questions":
        turns = fact() if rng.random() < 0.5 else task()
        return turns
    if cat == "user_context":
        q, a = rng.choice(USER_CONTEXT)
        return [user(q), reply(a)]
    if cat == "cultural_greetings":
        g, a = rng.choice(GREETINGS)
        return [user(g), reply(a)]
    if cat == "tool_result_responses":
        return search() if rng.random() < 0.6 else task()
    raise ValueError(cat)


COUNTS = [
    ("topic_switch", 150), ("direct_action", 150), ("concise_voice", 200),
    ("honest_memory", 100), ("no_emoji_no_markdown", 100), ("no_followup_questions", 100),
    ("user_context", 100), ("cultural_greetings", 50), ("tool_result_responses", 50),
]

seen = set()
out = []
for cat, n in COUNTS:
    made = 0
    while made < n:
        turns = category_turns(cat)
        if rng.random() < 0.35:
            turns = category_turns(cat) + turns
        key = json.dumps(turns, sort_keys=True)
        if key in seen:
            continue
        seen.add(key)
        out.append({"messages": [sys(), *turns], "category": cat, "source": "example-generator"})
        made += 1

path = ROOT / "config/examples/qat_v4_example.jsonl"
with open(path, "w") as f:
    for conv in out:
        f.write(json.dumps(conv, ensure_ascii=False, separators=(",", ":")) + "\n")
print(f"wrote {len(out)} conversations to {path}")
