"""The embedded default corpus: English prose that ships with every CPython, no download.

Documents are the ``pydoc_data.topics`` help texts (sorted by topic) followed by the
docstrings of the standard library's top-level modules (sorted by name). For one
interpreter the list is deterministic; ``corpus_fingerprint`` records which one a run used.

Both sources are hard-wrapped at ~70 columns. Prose paragraphs are reflowed (lines joined
by spaces, paragraphs separated by one newline) so a sketch wraps text at its own width
instead of breaking every source line in two; indented blocks (code, lists with hanging
indents, doctests) keep their line breaks.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib
import inspect
import io
import re
import sys
import warnings

# Modules with side effects on import (a browser, a printed poem, a GUI, a changed
# terminal) or no prose worth having.
_SKIP = frozenset({"antigravity", "this", "idlelib", "turtledemo", "tkinter", "turtle",
                   "readline", "rlcompleter", "pydoc_data", "sitecustomize", "usercustomize"})
MIN_DOC_CHARS = 200


_RULE = re.compile(r"^([*=\-~^#+])\1{2,}$")  # an RST heading underline
_BULLET = re.compile(r"^([*+-]|\d+\.|\(\w\)) ")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _reflow_block(block: list[str]) -> list[str]:
    """Join runs of lines of one paragraph (same indent, or a bullet's hanging indent)."""
    runs: list[list[str]] = []
    for line in block:
        body = line.lstrip()
        if _RULE.match(body):  # a heading underline stands alone, and so does what follows
            runs += [[line], []]
            continue
        if runs and not runs[-1]:
            runs[-1].append(line)
            continue
        if runs and not _BULLET.match(body):
            first = runs[-1][0]
            bullet = _BULLET.match(first.lstrip())
            hang = _indent(first) + (bullet.end() if bullet else 0)
            if _indent(line) == hang:
                runs[-1].append(body)
                continue
        runs.append([line])
    return [" ".join([run[0].rstrip()] + run[1:]) for run in runs if run]


def reflow(doc: str) -> str:
    """Join the hard-wrapped lines of prose paragraphs; literal blocks (after a line that
    ends in ':', doctests, headings) keep their line breaks. Paragraphs end in one newline."""
    out, block, literal = [], [], False
    for line in doc.splitlines() + [""]:
        if line.strip():
            block.append(line.rstrip())
            continue
        if not block:
            continue
        verbatim = literal or any(l.lstrip().startswith(">>>") for l in block)
        out += block if verbatim else _reflow_block(block)
        literal, block = block[-1].endswith(":"), []
    return "\n".join(out)


def _module_names() -> list[str]:
    names = getattr(sys, "stdlib_module_names", None)
    if names is None:  # Python < 3.10
        raise RuntimeError("the embedded corpus needs Python >= 3.10 (sys.stdlib_module_names)")
    return sorted(n for n in names if not n.startswith("_") and n not in _SKIP)


def _module_doc(name: str) -> str | None:
    """The module's cleaned docstring, or None when it will not import quietly."""
    module = sys.modules.get(name)
    if module is None:
        sink = io.StringIO()
        try:
            with warnings.catch_warnings(), contextlib.redirect_stdout(sink), \
                    contextlib.redirect_stderr(sink):
                warnings.simplefilter("ignore")
                module = importlib.import_module(name)
        except BaseException:  # ImportError, platform-only modules, SystemExit from odd ones
            return None
    doc = getattr(module, "__doc__", None)
    return inspect.cleandoc(doc) if isinstance(doc, str) else None


@functools.lru_cache(maxsize=1)
def _documents() -> tuple[str, ...]:
    from pydoc_data.topics import topics

    docs = [topics[key] for key in sorted(topics)]
    docs += [doc for doc in map(_module_doc, _module_names()) if doc]
    return tuple(doc for doc in map(reflow, docs) if len(doc) >= MIN_DOC_CHARS)


def embedded_documents() -> list[str]:
    """All documents of the embedded corpus, in a fixed order."""
    return list(_documents())


def corpus_fingerprint() -> str:
    """sha256 of the corpus (documents joined by NUL): which interpreter's text a run saw."""
    h = hashlib.sha256()
    for doc in _documents():
        h.update(doc.encode("utf-8") + b"\0")
    return h.hexdigest()


def write_corpus_text(path, max_chars: int | None = None) -> int:
    """Write the corpus (or its first ``max_chars`` characters) as a text file for
    tokenizer training, one document after another; returns the characters written."""
    written = 0
    with open(path, "w", encoding="utf-8") as f:
        for doc in _documents():
            if max_chars is not None and written >= max_chars:
                break
            piece = doc if max_chars is None else doc[:max_chars - written]
            f.write(piece + "\n")
            written += len(piece)
    return written
