#!/usr/bin/env python3
"""Golden chat renderings and token ids from Hugging Face transformers.

Renders every conversation of tests/fixtures/templates/{template_cases,token_cases}.json
through each shipped chat template with transformers' ``apply_chat_template`` and
tokenizes the text with a local ``tokenizer.json`` (no hub access needed), writing
``{"generator": ..., "renderings": {"TEMPLATE/CASE": {"text", "ids"} | {"error"}}}``.
qatflow-model's test ``golden_token_ids_match_transformers`` compares its own rendering
and tokenization against this file.

Like ``ChatTemplate::render``, tool-call ``arguments`` given as JSON strings (OpenAI
format) are parsed to objects and a null ``content`` becomes "" before rendering.

Run (needs ``pip install transformers``; no PyTorch):

    cargo run -p qatflow-model --example fetch_model -- smollm2-135m-instruct /tmp/smollm2
    python3 crates/model/scripts/golden_tokens.py --tokenizer /tmp/smollm2 \
        --out tests/fixtures/templates/golden_tokens_smollm2.json
"""

import argparse
import json
import pathlib

import tokenizers
import transformers
from transformers import PreTrainedTokenizerFast

REPO = pathlib.Path(__file__).resolve().parents[3]
TEMPLATES = ["qwen3", "qwen3_5_think", "qwen3_5_nothink", "smollm2"]


def normalize(messages):
    out = []
    for m in messages:
        m = dict(m)
        if m.get("content") is None:
            m["content"] = ""
        if m.get("tool_calls"):
            calls = []
            for c in m["tool_calls"]:
                c = json.loads(json.dumps(c))
                f = c.get("function", c)
                if isinstance(f.get("arguments"), str):
                    f["arguments"] = json.loads(f["arguments"])
                calls.append(c)
            m["tool_calls"] = calls
        out.append(m)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokenizer", required=True, help="directory with tokenizer.json")
    ap.add_argument("--fixtures", default=str(REPO / "tests/fixtures/templates"))
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    fixtures = pathlib.Path(args.fixtures)
    tok = PreTrainedTokenizerFast(tokenizer_file=str(pathlib.Path(args.tokenizer) / "tokenizer.json"))
    cases = json.loads((fixtures / "template_cases.json").read_text())
    cases += json.loads((fixtures / "token_cases.json").read_text())

    renderings = {}
    for name in TEMPLATES:
        source = (fixtures / f"{name}.jinja").read_text()
        for case in cases:
            kwargs = {k: v for k, v in case.items() if k not in ("name", "messages", "tools")}
            try:
                text = tok.apply_chat_template(
                    normalize(case["messages"]),
                    tools=case.get("tools"),
                    chat_template=source,
                    tokenize=False,
                    **kwargs,
                )
                ids = tok(text, add_special_tokens=False)["input_ids"]
                renderings[f"{name}/{case['name']}"] = {"text": text, "ids": ids}
            except Exception as e:  # recorded: the Rust side must fail too
                renderings[f"{name}/{case['name']}"] = {"error": f"{type(e).__name__}: {e}"}

    out = {
        "generator": {
            "script": "crates/model/scripts/golden_tokens.py",
            "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__,
            "tokenizer": "tokenizer.json of " + pathlib.Path(args.tokenizer).name,
        },
        "renderings": renderings,
    }
    pathlib.Path(args.out).write_text(json.dumps(out, ensure_ascii=False, indent=1) + "\n")
    print(f"{len(renderings)} renderings -> {args.out}")


if __name__ == "__main__":
    main()
