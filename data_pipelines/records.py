"""The bottom of ``data_pipelines``: what a source yields and what a row maker reads.

A ``Record`` is one raw source record (``error`` says why it is unusable); a ``Sample`` is
a tokenized record a row maker packs. ``BadInput`` stops a run on a record or a source it
cannot use; ``record_problem`` is the one check of whether a record is usable.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

# C0/C1 control characters other than tab, newline, carriage return and form feed: a
# sketch could only show them as markers, so such a record is bad input, not rewritten.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0e-\x1f\x7f-\x9f]")


class BadInput(RuntimeError):
    """A record or source the pipeline cannot use (under ``bad_input=fail``, or unusable)."""


@dataclasses.dataclass(frozen=True)
class Record:
    """One source record; ``error`` says why it is unusable. ``image``: path, bytes or
    an object with ``read() -> bytes`` (a lazy reference; caption records)."""

    text: str
    prompt: str | None = None
    location: str = ""
    error: str = ""
    image: object = None


@dataclasses.dataclass(frozen=True)
class Sample:
    """A tokenized source record: a document (``prompt`` empty), a prompt/response pair, or
    a caption with its ``image`` (path, bytes or lazy reference; decoded per row)."""

    tokens: np.ndarray
    prompt: np.ndarray | None = None
    location: str = ""
    image: object = None


def content_problem(record: Record) -> str:
    """Why a record is unusable for any stage ('' when it is usable for some)."""
    if record.error:
        return record.error
    if not record.text.strip():
        return "empty text"
    for text in (record.text, record.prompt or ""):
        bad = _CONTROL.search(text)
        if bad:
            return f"control character U+{ord(bad.group()):04X} at offset {bad.start()}"
    return ""


def record_problem(record: Record, stage: str, source: str) -> str:
    """Why a record cannot be used for ``stage`` ('' when it can)."""
    problem = content_problem(record)
    if problem:
        return problem
    if stage == "sft" and source != "embedded" and not (record.prompt or "").strip():
        return "sft needs prompt/response records"
    if stage == "caption" and record.image is None:
        return "caption record without an image"
    return ""


def caption_lines(text: str) -> list[str]:
    """The captions of a caption record: its non-empty lines, stripped (one sample each)."""
    return [line for line in (line.strip() for line in text.splitlines()) if line]


def problem_kind(problem: str) -> str:
    """The counter key of a problem: its text without the varying details."""
    return "skipped:" + problem.split(" (")[0].split(" at ")[0]
