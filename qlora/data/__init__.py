"""Training data: record formats, loading, tokenization with completion-only labels, packing and
collation. `prepare_datasets` chains the steps; `Collator` batches the result."""
from qlora.data.collate import Collator, block_causal_mask, count_supervised_tokens
from qlora.data.errors import DataError
from qlora.data.formats import (ChatFormat, InstructionFormat, PromptCompletionFormat, RecordFormat,
                                TextFormat)
from qlora.data.loading import check_sources, load_records
from qlora.data.packing import pack_examples
from qlora.data.pipeline import prepare_datasets
from qlora.data.preference import PreferenceFormat, UnpairedFormat
from qlora.data.tokenization import IGNORE_INDEX, tokenize_records

__all__ = [
    "IGNORE_INDEX", "ChatFormat", "Collator", "DataError", "InstructionFormat", "PromptCompletionFormat",
    "RecordFormat", "TextFormat", "block_causal_mask", "check_sources", "count_supervised_tokens", "load_records",
    "pack_examples", "prepare_datasets", "tokenize_records", "PreferenceFormat", "UnpairedFormat",
]
