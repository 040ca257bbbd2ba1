"""Record sources: the embedded corpus, or a local folder of ``.txt`` / ``.jsonl`` files.

Text files are one document each. JSONL lines are ``{"text": ...}`` documents or
``{"prompt": ..., "response": ...}`` / ``{"messages": [{"role", "content"}, ...]}`` chat
records. A bad record (invalid UTF-8, malformed JSON, missing fields, empty text) is
skipped and logged with its file and line (``bad_input=skip``) or stops the run (``fail``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Iterator

import numpy as np

from data_pipelines.stages import BadInput, Sample

log = logging.getLogger(__name__)


def _chat_record(record: dict) -> tuple[str, str] | None:
    if "prompt" in record and "response" in record:
        return str(record["prompt"]), str(record["response"])
    messages = record.get("messages")
    if isinstance(messages, list):
        users = [m.get("content", "") for m in messages if isinstance(m, dict) and m.get("role") == "user"]
        answers = [m.get("content", "") for m in messages if isinstance(m, dict) and m.get("role") == "assistant"]
        if users and answers:
            return "\n".join(users), answers[-1]
    return None


def iter_records(source: str) -> Iterator[tuple[str, str | None, str]]:
    """(text, prompt or None, location) for every record; raises BadInput on bad ones."""
    if source == "embedded":
        from data_pipelines.corpus import embedded_documents

        for i, doc in enumerate(embedded_documents()):
            yield doc, None, f"embedded:{i}"
        return
    folder = Path(source)
    if not folder.is_dir():
        raise BadInput(f"data.source: {source!r} is neither 'embedded' nor a folder")
    files = sorted(p for p in folder.rglob("*") if p.suffix in (".txt", ".jsonl"))
    if not files:
        raise BadInput(f"data.source: {folder} holds no .txt or .jsonl files")
    for path in files:
        raw = path.read_bytes()
        if path.suffix == ".txt":
            try:
                yield raw.decode("utf-8"), None, str(path)
            except UnicodeDecodeError as err:
                raise BadInput(f"{path}: not valid UTF-8 ({err})") from None
            continue
        for number, line in enumerate(raw.split(b"\n"), start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(line.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as err:
                raise BadInput(f"{where}: malformed JSONL line ({err})") from None
            if not isinstance(record, dict):
                raise BadInput(f"{where}: a record must be a JSON object")
            chat = _chat_record(record)
            if chat is not None:
                yield chat[1], chat[0], where
            elif isinstance(record.get("text"), str):
                yield record["text"], None, where
            else:
                raise BadInput(f"{where}: record has neither 'text' nor prompt/response fields")


def load_samples(source: str, tokenizer, stage: str, bad_input: str = "skip") -> tuple[list[Sample], dict]:
    """Tokenized samples of a source for a stage, and counters of what was skipped."""
    counters = {"records": 0, "skipped": 0}
    samples: list[Sample] = []
    records = iter_records(source)
    while True:
        try:
            text, prompt, where = next(records)
        except StopIteration:
            break
        except BadInput as err:
            if bad_input == "fail" or "data.source" in str(err):
                raise
            counters["skipped"] += 1
            log.warning("skipping bad record: %s", err)
            continue
        counters["records"] += 1
        problem = None
        if not text.strip():
            problem = "empty text"
        elif stage == "sft" and source != "embedded" and not (prompt or "").strip():
            problem = "sft needs prompt/response records"
        if problem:
            if bad_input == "fail":
                raise BadInput(f"{where}: {problem}")
            counters["skipped"] += 1
            log.warning("skipping %s: %s", where, problem)
            continue
        tokens = np.asarray(tokenizer.encode(text), np.int32)
        prompt_tokens = np.asarray(tokenizer.encode(prompt), np.int32) if prompt else None
        samples.append(Sample(tokens, prompt_tokens, where))
    if stage == "sft" and source == "embedded":
        samples = [split_for_sft(s) for s in samples if len(s.tokens) > 16]
    return samples, counters


def split_for_sft(sample: Sample) -> Sample:
    """Embedded stand-in for chat data: the first third of a document is the (rendered)
    query, the rest is the response to reproduce."""
    cut = max(1, len(sample.tokens) // 3)
    return Sample(sample.tokens[cut:], sample.tokens[:cut], sample.location + ":sft")
