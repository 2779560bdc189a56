"""Offline pretraining corpus for the embedded base model.

Everything comes from the running interpreter, so nothing is downloaded:

1. ``pydoc_data.topics.topics``: the CPython language reference / library topics that ``help()``
   shows (about 465 K characters of English prose with code).
2. Module, class and function docstrings of the pure-Python standard library, read with ``ast``
   from the source files. Parsing instead of importing avoids the side effects of importing
   arbitrary stdlib modules (``antigravity`` opens a browser, ``this`` prints, GUI toolkits).

The output is deterministic for a given Python version: topics in key order, files in sorted
path order, docstrings in source order. Run as a script to print statistics.
"""
from __future__ import annotations

import ast
import os
import sysconfig
from pathlib import Path

# Folders whose docstrings are noise (tests, vendored code) or whose text is mostly one topic.
_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "lib2to3",
              "ensurepip", "pydoc_data", "__pycache__", "turtledemo", "idlelib", "tkinter"}
# Too short to carry language; mostly "Return self." style one-liners.
_MIN_DOCSTRING_CHARS = 40
# Separates documents; the tokenizer and the model see it as ordinary text.
DOC_SEPARATOR = "\n\n"


def pydoc_topics() -> list[str]:
    """The interpreter's help() topics, one document per topic, in sorted key order."""
    from pydoc_data.topics import topics
    return [topics[key].strip() for key in sorted(topics)]


def _docstrings_of(source: str) -> list[str]:
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    docs = []
    # ast.walk is breadth first and deterministic; module docstring comes first.
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=True)
            if doc and len(doc) >= _MIN_DOCSTRING_CHARS:
                docs.append(doc.strip())
    return docs


def stdlib_docstrings(max_chars: int | None = None) -> list[str]:
    """Docstrings of the stdlib's .py files, one document per file, sorted by path."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
        files += [Path(dirpath) / f for f in sorted(filenames) if f.endswith(".py")]
    docs, total, seen = [], 0, set()
    for path in sorted(files):
        try:
            source = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        # Same docstring repeated across files (e.g. copied helpers) is kept once.
        parts = [d for d in _docstrings_of(source) if d not in seen]
        seen.update(parts)
        if not parts:
            continue
        doc = "\n\n".join(parts)
        if max_chars is not None and total + len(doc) > max_chars:
            break
        docs.append(doc)
        total += len(doc)
    return docs


def documents(include_docstrings: bool = True, max_docstring_chars: int | None = None) -> list[str]:
    """All corpus documents: pydoc topics first, then stdlib docstrings."""
    docs = pydoc_topics()
    if include_docstrings:
        docs += stdlib_docstrings(max_docstring_chars)
    return docs


def corpus_text(include_docstrings: bool = True, max_docstring_chars: int | None = None) -> str:
    return DOC_SEPARATOR.join(documents(include_docstrings, max_docstring_chars))


if __name__ == "__main__":
    import hashlib
    topics, stdlib = pydoc_topics(), stdlib_docstrings()
    text = corpus_text()
    print(f"pydoc topics: {len(topics)} docs, {sum(map(len, topics)):,} chars")
    print(f"stdlib docstrings: {len(stdlib)} files, {sum(map(len, stdlib)):,} chars")
    print(f"total: {len(text):,} chars, sha256 {hashlib.sha256(text.encode()).hexdigest()[:16]}")


def calibration_texts(count: int = 256) -> list[str]:
    """The embedded model's pretraining documents (pydoc topics first): GPTQ calibration that needs no
    download (`qlora quantize dataset=embedded`, `quantization.gptq.dataset=embedded`)."""
    return documents(include_docstrings=False)[:count]
