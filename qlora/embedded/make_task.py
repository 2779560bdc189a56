"""Generate the embedded instruction task: name the Python type of a literal.

    instruction: Name the Python type of this literal.
    input:       {'mode': 3, 'level': 7}
    output:      dict

Eleven types (int, float, complex, str, bytes, bool, NoneType, list, tuple, dict, set) written as
literals with random values and words from the CPython documentation topics. The base model,
pretrained on documentation prose, never answers in this format zero-shot (0% exact match); the
answer depends on surface features of the input (quotes, brackets, a colon, a dot, a prefix), which
a LoRA learns in a couple of minutes on a CPU. Held-out inputs never occur in the training set, so
the score measures generalization to new values, not recall.

    python qlora/embedded/make_task.py [--train 2000] [--eval 100] [--seed 1234]
"""
from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

_HERE = Path(__file__).resolve().parent
INSTRUCTION = "Name the Python type of this literal."


def vocabulary() -> list[str]:
    """Lower-case words of the help() topic names that ship with the interpreter."""
    import pydoc_data.topics

    words = set()
    for name in pydoc_data.topics.topics:
        words.update(w for w in re.split(r"[^a-z]+", name.lower()) if 2 <= len(w) <= 10)
    return sorted(words)


def literal(kind: str, rng: random.Random, words: list[str]) -> str:
    number = lambda: str(rng.randint(-999, 9999))  # noqa: E731
    word = lambda: rng.choice(words)  # noqa: E731
    scalar = lambda: rng.choice([number(), repr(word())])  # noqa: E731
    items = lambda: [scalar() for _ in range(rng.randint(1, 3))]  # noqa: E731
    if kind == "int":
        return number()
    if kind == "float":
        return f"{rng.uniform(-100, 100):.{rng.randint(1, 3)}f}"
    if kind == "complex":
        return f"{rng.randint(1, 99)}j" if rng.random() < 0.5 else f"({rng.randint(-9, 9)}+{rng.randint(1, 9)}j)"
    if kind == "str":
        text = " ".join(word() for _ in range(rng.randint(1, 2)))
        return repr(text) if rng.random() < 0.5 else f'"{text}"'
    if kind == "bytes":
        return "b" + repr(word())
    if kind == "bool":
        return rng.choice(["True", "False"])
    if kind == "NoneType":
        return "None"
    if kind == "list":
        return "[" + ", ".join(items()) + "]"
    if kind == "tuple":
        values = items()
        return "(" + ", ".join(values) + ("," if len(values) == 1 else "") + ")"
    if kind == "dict":
        pairs = [f"{repr(word())}: {scalar()}" for _ in range(rng.randint(1, 3))]
        return "{" + ", ".join(pairs) + "}"
    if kind == "set":
        return "{" + ", ".join(dict.fromkeys(items())) + "}"
    raise ValueError(kind)


KINDS = ("int", "float", "complex", "str", "bytes", "bool", "NoneType", "list", "tuple", "dict", "set")


def build(n_train: int, n_eval: int, seed: int) -> tuple[list[dict], list[dict]]:
    rng = random.Random(seed)
    words = vocabulary()
    seen: set[str] = set()
    train, held_out = [], []
    # bool and NoneType have three literals in all: they appear in training only, never held out.
    while len(held_out) < n_eval:
        kind = rng.choice([k for k in KINDS if k not in ("bool", "NoneType")])
        text = literal(kind, rng, words)
        if text not in seen:
            seen.add(text)
            held_out.append({"instruction": INSTRUCTION, "input": text, "output": kind})
    while len(train) < n_train:
        kind = rng.choice(KINDS)
        text = literal(kind, rng, words)
        if text not in seen or kind in ("bool", "NoneType"):
            train.append({"instruction": INSTRUCTION, "input": text, "output": kind})
    return train, held_out


def write_jsonl(path: Path, records: list[dict]) -> None:
    with open(path, "w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Write task_train.jsonl and task_eval.jsonl.")
    parser.add_argument("--out", type=Path, default=_HERE)
    parser.add_argument("--train", type=int, default=2000)
    parser.add_argument("--eval", type=int, default=100)
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args(argv)
    train, held_out = build(args.train, args.eval, args.seed)
    write_jsonl(args.out / "task_train.jsonl", train)
    write_jsonl(args.out / "task_eval.jsonl", held_out)
    print(f"wrote {len(train)} training and {len(held_out)} held-out records to {args.out}")


if __name__ == "__main__":
    main()
