"""Record formats: each turns one raw record (a dict) into `(prompt, completion)` strings.

The model sees `prompt + completion`; by default only the completion is supervised. Formats are
built from Hydra configs (`_target_: qlora.data.InstructionFormat`), so their constructors take
plain values only; the tokenizer, which only `ChatFormat` needs, is passed at render time.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from qlora.data.errors import DataError

ALPACA_TEMPLATE = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
ALPACA_TEMPLATE_NO_INPUT = "### Instruction:\n{instruction}\n\n### Response:\n"


def _present_fields(record: Mapping[str, Any]) -> str:
    """The record's fields that hold a value. Readers give every record every column (null where a line
    lacks it), and load_records adds `source_index`: neither is a field the user wrote."""
    return ", ".join(sorted(str(k) for k, v in record.items() if v is not None and k != "source_index")) or "none"


def _string_field(record: Mapping[str, Any], field: str, index: int, *, required: bool = True) -> str:
    """`record[field]` as a string, or a DataError that says which record, what is wrong and the fix.

    A required field must be a non-blank string. An optional one (a prompt) must exist as a column
    but may be empty or null: CSV readers turn empty cells into nulls."""
    if field not in record or (required and record[field] is None):
        present = _present_fields(record)
        raise DataError(f"record {index}: missing field {field!r} (fields present: {present}); "
                        f"add it to the data or point the format at the right field name")
    value = record[field]
    if value is None:
        return ""
    if not isinstance(value, str):
        raise DataError(f"record {index}: field {field!r} must be a string, got {type(value).__name__} "
                        f"({value!r:.80}); convert the data to text first")
    if required and not value.strip():
        raise DataError(f"record {index}: field {field!r} is empty, so the record has nothing to learn; "
                        f"remove the record or fill in the field")
    return value


class RecordFormat:
    """Base class. Subclasses implement `render`; `needs_tokenizer` says whether it must be given."""

    needs_tokenizer = False

    def render(self, record: Mapping[str, Any], index: int, tokenizer=None) -> tuple[str, str]:
        raise NotImplementedError

    def prompt_for(self, text: str, tokenizer=None) -> str:
        """The prompt for a user's text at generation time, as training rendered its prompts."""
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"


class TextFormat(RecordFormat):
    """Plain text: an empty prompt, so every token is supervised (continued pre-training)."""

    def __init__(self, field: str = "text"):
        self.field = field

    def render(self, record, index, tokenizer=None):
        return "", _string_field(record, self.field, index)

    def prompt_for(self, text, tokenizer=None):
        return text  # continued pre-training: the text is continued as it is


class PromptCompletionFormat(RecordFormat):
    """Two fields used verbatim. The prompt may be empty; separators belong in the data."""

    def __init__(self, prompt_field: str = "prompt", completion_field: str = "completion"):
        self.prompt_field = prompt_field
        self.completion_field = completion_field

    def render(self, record, index, tokenizer=None):
        prompt = _string_field(record, self.prompt_field, index, required=False)
        return prompt, _string_field(record, self.completion_field, index)

    def prompt_for(self, text, tokenizer=None):
        return text  # prompts were used verbatim


class InstructionFormat(RecordFormat):
    """Alpaca-style instruction / optional input / output records.

    `template` must contain `{instruction}` and `{input}`; records whose input is missing or empty use
    `template_no_input` (which must contain `{instruction}`), so no empty "Input:" section is shown.
    """

    def __init__(self, instruction_field: str = "instruction", input_field: str = "input",
                 output_field: str = "output", template: str = ALPACA_TEMPLATE,
                 template_no_input: str = ALPACA_TEMPLATE_NO_INPUT):
        for name, text, keys in (("template", template, ("{instruction}", "{input}")),
                                 ("template_no_input", template_no_input, ("{instruction}",))):
            missing = [key for key in keys if key not in text]
            if missing:
                raise ValueError(f"InstructionFormat {name} lacks the placeholder(s) {missing}: {text!r}")
        self.instruction_field = instruction_field
        self.input_field = input_field
        self.output_field = output_field
        self.template = template
        self.template_no_input = template_no_input

    def render(self, record, index, tokenizer=None):
        instruction = _string_field(record, self.instruction_field, index)
        # The input section is optional: a missing, null or blank field drops it.
        has_input = self.input_field in record
        input_text = _string_field(record, self.input_field, index, required=False) if has_input else ""
        if input_text.strip():
            prompt = self.template.format(instruction=instruction, input=input_text)
        else:
            prompt = self.template_no_input.format(instruction=instruction)
        return prompt, _string_field(record, self.output_field, index)

    def prompt_for(self, text, tokenizer=None):
        return self.template_no_input.format(instruction=text)


class ChatFormat(RecordFormat):
    """A list of `{"role", "content"}` messages rendered with the tokenizer's chat template.

    The completion is the last message, which must come from the assistant; the prompt is the
    conversation before it rendered with `add_generation_prompt=True`. The completion text is the
    full rendering minus the prompt rendering, so whatever the template appends to the assistant
    turn (an end-of-turn token, say) is supervised too, as the model must learn to stop.
    """

    needs_tokenizer = True

    def __init__(self, messages_field: str = "messages"):
        self.messages_field = messages_field

    def render(self, record, index, tokenizer=None):
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise DataError(f"ChatFormat needs a tokenizer with a chat template, and "
                            f"{type(tokenizer).__name__} has none; set `tokenizer.chat_template` "
                            f"(a Jinja string) or use a chat-tuned model's tokenizer")
        messages = self._messages(record, index)
        prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(messages, tokenize=False)
        if not full.startswith(prompt):
            raise DataError(f"record {index}: the chat template renders the conversation without its last "
                            f"message ({prompt[-60:]!r}) as something that is not a prefix of the whole "
                            f"conversation ({full[-120:]!r}), so the completion cannot be cut out exactly; "
                            f"use a template whose generation prompt matches the assistant turn header")
        completion = full[len(prompt):]
        if not completion.strip():
            raise DataError(f"record {index}: the last assistant message renders to nothing; "
                            f"remove the record or give the message content")
        return prompt, completion

    def prompt_for(self, text, tokenizer=None):
        return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)

    def _messages(self, record, index) -> list[dict[str, str]]:
        messages = record.get(self.messages_field)
        if messages is None:
            present = _present_fields(record)
            raise DataError(f"record {index}: missing field {self.messages_field!r} (fields present: "
                            f"{present}); add it or set ChatFormat(messages_field=...)")
        if not isinstance(messages, list) or not messages:
            raise DataError(f"record {index}: field {self.messages_field!r} must be a non-empty list of "
                            f"messages, got {messages!r:.80}")
        for turn, message in enumerate(messages):
            if not isinstance(message, Mapping) or not all(
                    isinstance(message.get(key), str) for key in ("role", "content")):
                raise DataError(f"record {index}: message {turn} must be a dict with string 'role' and "
                                f"'content', got {message!r:.80}")
        if messages[-1]["role"] != "assistant":
            raise DataError(f"record {index}: the last message is from {messages[-1]['role']!r}; the "
                            f"completion must be the final assistant message, so end each conversation "
                            f"with one")
        if not messages[-1]["content"].strip():
            raise DataError(f"record {index}: the last assistant message is empty; remove the record or "
                            f"give the message content")
        # Arrow stores a list of structs with the union of all keys, so messages read from a file carry
        # null entries for keys other messages have (e.g. "name"); templates would render those.
        return [{key: value for key, value in m.items() if value is not None} for m in messages]


# The data format a run trained with, recorded beside its adapter (and copied into merged exports):
# `qlora generate` formats prompts the same way, so an instruction-tuned run is asked in its own
# template rather than through a chat template it never saw.
PROMPT_FORMAT_FILE = "qlora_prompt_format.json"


def save_prompt_format(directory: Path, node: Mapping[str, Any]) -> None:
    """Record the resolved `data.format` node (`_target_` and its arguments) in `directory`."""
    (Path(directory) / PROMPT_FORMAT_FILE).write_text(json.dumps({"format": dict(node)}, indent=2) + "\n")


def load_prompt_format(directory: Path) -> RecordFormat | None:
    """The format recorded in `directory`, or None. Only RecordFormat subclasses are built from it."""
    path = Path(directory) / PROMPT_FORMAT_FILE
    if not path.is_file():
        return None
    from hydra.utils import get_object

    node = dict(json.loads(path.read_text())["format"])
    target = node.pop("_target_", "")
    node.pop("_partial_", None)
    cls = get_object(target) if target.startswith("qlora.data") else None
    if not (isinstance(cls, type) and issubclass(cls, RecordFormat)):
        return None  # a format of the user's own: not imported from a file someone may have shared
    return cls(**node)
