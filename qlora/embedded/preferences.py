"""Preference pairs for the embedded instruction task: the literal's right type name chosen, a wrong one
rejected.

    prompt:   ### Instruction:\\nName the Python type of this literal.\\n\\n### Input:\\n{'mode': 3}\\n\\n### Response:\\n
    chosen:   dict
    rejected: set

One pair per record of task_train.jsonl / task_eval.jsonl (held-out inputs never occur in training).
The wrong name is the one a model is most tempted by for that literal when the literal's brackets
or quotes are shared with another type (dict/set both use braces, list/tuple/str/bytes share
brackets or quotes, int/float/complex are all numbers), else any other type, seeded. So DPO must
learn the feature that separates near types, which the base cannot do zero-shot (0% exact match).

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


def pair(record: dict, rng: random.Random) -> dict:
    right = record["output"]
    near = CONFUSABLE[right]
    wrong = rng.choice(near) if rng.random() < 0.75 else rng.choice([k for k in KINDS if k != right])
    return {"prompt": format_prompt(record["instruction"], record["input"]), "chosen": right, "rejected": wrong}


def build(source: Path, seed: int) -> list[dict]:
    rng = random.Random(seed)
    with open(source) as f:
        return [pair(json.loads(line), rng) for line in f if line.strip()]


def main() -> None:
    for source, target, seed in ((TASK_TRAIN, PREFERENCE_TRAIN, 1), (TASK_EVAL, PREFERENCE_EVAL, 2)):
        pairs = build(source, seed)
        with open(target, "w") as f:
            f.writelines(json.dumps(p) + "\n" for p in pairs)
        print(f"wrote {len(pairs)} pairs to {target}")


if __name__ == "__main__":
    main()
