"""The embedded default: a small pretrained Llama and an instruction task, shipped in the repo.

- ``BASE_MODEL_DIR`` (``base/``): a 6.9 M-parameter LlamaForCausalLM pretrained from scratch on
  the CPython documentation that ships with the interpreter, with its byte-level BPE tokenizer
  (bfloat16 safetensors; loads with ``AutoModelForCausalLM`` / ``AutoTokenizer``). How it was made:
  ``base/TRAINING.md``; made by ``pretrain.py``, from the text gathered by ``corpus.py``.
- ``MOE_MODEL_DIR`` (``moe/``): the base sparse-upcycled into a 4-expert, top-2 MixtralForCausalLM
  and pretrained a little longer (``moe/TRAINING.md``; made by ``upcycle.py``): ``model=embedded_moe``.
- ``TASK_TRAIN`` / ``TASK_EVAL``: alpaca-style jsonl records ``{"instruction", "input",
  "output"}`` of a task the base model cannot do zero-shot: name the Python type of a literal
  (``{'mode': 3}`` -> ``dict``; see ``make_task.py``). No eval input occurs in train. Score: exact
  match of the greedy completion.

Prompt template (use ``format_prompt`` everywhere, training and evaluation alike)::

    ### Instruction:
    {instruction}

    ### Input:
    {input}

    ### Response:
    {output}</s>

Tokenize the prompt (the tokenizer prepends ``<s>``) and the response separately, append ``</s>``
to the response, and train on the response tokens only. Tokenizing the two apart keeps the
prompt's tokens identical at training and generation time (BPE could merge across the boundary).
"""
from __future__ import annotations

from pathlib import Path

_HERE = Path(__file__).resolve().parent
BASE_MODEL_DIR = _HERE / "base"
MOE_MODEL_DIR = _HERE / "moe"
TASK_TRAIN = _HERE / "task_train.jsonl"
TASK_EVAL = _HERE / "task_eval.jsonl"

PROMPT_TEMPLATE = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
PROMPT_TEMPLATE_NO_INPUT = "### Instruction:\n{instruction}\n\n### Response:\n"


def format_prompt(instruction: str, input: str = "") -> str:  # noqa: A002 (alpaca field name)
    """The prompt the model completes; the response (the record's output) follows it directly."""
    if input:
        return PROMPT_TEMPLATE.format(instruction=instruction, input=input)
    return PROMPT_TEMPLATE_NO_INPUT.format(instruction=instruction)


__all__ = ["BASE_MODEL_DIR", "MOE_MODEL_DIR", "TASK_TRAIN", "TASK_EVAL", "PROMPT_TEMPLATE", "format_prompt"]
