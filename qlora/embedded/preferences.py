"""Preference pairs for the embedded instruction task: the literal's right type name chosen, a wrong
answer rejected.

    prompt:   ### Instruction:\nName the Python type of this literal.\n\n### Input:\n{'mode': 3}\n\n### Response:\n
    chosen:   dict
    rejected: set                  (a wrong type name), or
    rejected: \n>>> c = 'x'\n       (what the base model itself answers: wrong, and not even a type name)

One pair per record of task_train.jsonl / task_eval.jsonl (held-out inputs never occur in training).
Half the pairs reject a wrong type name, preferring near types (dict/set use braces, list/tuple/str/
bytes share brackets or quotes, int/float/complex are all numbers), so that the model must learn the
feature that separates them. The other half reject the base model's own greedy answer (on-policy
negatives, as preference data sampled from the model being tuned has them): without those, DPO's
gradient at the first answer token is onehot(chosen) - onehot(rejected), which lifts the right type
name only against the wrong one and never against what the base actually says first (a newline and
a code prompt), so greedy decoding, and exact match, would not move.

    python qlora/embedded/preferences.py   # rewrites preference_train.jsonl and preference_eval.jsonl
"""
from __future__ import annotations

import json
import random
from pathlib import Path

from qlora.embedded import TASK_EVAL, TASK_TRAIN, format_prompt

_HERE = Path(__file__).resolve().parent
PREFERENCE_TRAIN = _HERE / "preference_train.jsonl"
PREFERENCE_EVAL = _HERE / "preference_eval.jsonl"
KINDS = ("int", "float", "complex", "str", "bytes", "bool", "NoneType", "list", "tuple", "dict", "set")
# Types whose literals look alike: the wrong answer a pair rejects is drawn from these first.
CONFUSABLE = {"dict": ("set",), "set": ("dict", "list"), "list": ("tuple", "set"), "tuple": ("list",),
              "str": ("bytes",), "bytes": ("str",), "int": ("float", "bool"), "float": ("int", "complex"),
              "complex": ("float", "int"), "bool": ("int", "NoneType"), "NoneType": ("bool",)}


def wrong_type(right: str, rng: random.Random) -> str:
    return rng.choice(CONFUSABLE[right]) if rng.random() < 0.75 else rng.choice([k for k in KINDS if k != right])


def base_answers(prompts: list[str], max_new_tokens: int = 8, batch_size: int = 64) -> list[str]:
    """The shipped base model's greedy answers (fp32, dense: the NF4 base answers alike)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qlora.embedded import BASE_MODEL_DIR

    tokenizer = AutoTokenizer.from_pretrained(BASE_MODEL_DIR)
    tokenizer.padding_side = "left"
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(BASE_MODEL_DIR, dtype=torch.float32).eval()
    answers = []
    with torch.no_grad():
        for start in range(0, len(prompts), batch_size):
            encoded = tokenizer(prompts[start:start + batch_size], return_tensors="pt", padding=True)
            out = model.generate(**encoded, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            answers += tokenizer.batch_decode(out[:, encoded["input_ids"].shape[1]:], skip_special_tokens=True)
    return answers


def build(source: Path, seed: int) -> list[dict]:
    rng = random.Random(seed)
    with open(source) as f:
        records = [json.loads(line) for line in f if line.strip()]
    prompts = [format_prompt(r["instruction"], r["input"]) for r in records]
    answers = base_answers(prompts)
    pairs = []
    for record, prompt, answer in zip(records, prompts, answers):
        right = record["output"]
        # The base's own answer when it is usable as a negative (some text, and wrong), else a wrong type.
        own = answer if answer.strip() and answer.strip() != right and rng.random() < 0.5 else None
        pairs.append({"prompt": prompt, "chosen": right, "rejected": own or wrong_type(right, rng)})
    return pairs


def main() -> None:
    for source, target, seed in ((TASK_TRAIN, PREFERENCE_TRAIN, 1), (TASK_EVAL, PREFERENCE_EVAL, 2)):
        pairs = build(source, seed)
        with open(target, "w") as f:
            f.writelines(json.dumps(p) + "\n" for p in pairs)
        print(f"wrote {len(pairs)} pairs to {target}")


if __name__ == "__main__":
    main()
