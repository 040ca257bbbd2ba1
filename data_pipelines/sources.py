"""Record sources: the embedded corpus, a local folder, ``tfds:NAME``, or a prepared folder.

* folder, text stages: ``.txt`` / ``.jsonl`` files (``readers``); caption stage: an image
  folder with sidecar captions or a ``captions.jsonl``.
* ``tfds:NAME``: records read with ``tfds.data_source`` (see ``tfds_builders``).

``load_samples`` reads the whole source and tokenizes it up front: right for small
sources. Large ones are prepared once (``prepare``) and read lazily (``prepared``);
``open_samples`` picks the one a source needs.
Bad records are skipped, counted and logged with their location (``bad_input=skip``) or
stop the run (``fail``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterator

import numpy as np

from data_pipelines.readers import caption_folder_records, text_file_records
from data_pipelines.records import BadInput, Record, Sample, caption_lines, problem_kind, record_problem
from vist2_jax import storage

log = logging.getLogger(__name__)


def iter_records(source: str, stage: str = "olm", data_dir: str = "",
                 manual_dir: str = "") -> Iterator[Record]:
    """Every record of a source, bad ones included (with ``error``). Raises BadInput
    (naming the config key) only when the source itself is unusable."""
    if source == "embedded":
        if stage == "caption":
            return  # stage 1 then uses the synthetic captioned shapes
        from data_pipelines.corpus import embedded_documents

        for i, doc in enumerate(embedded_documents()):
            yield Record(doc, None, f"embedded:{i}")
        return
    if source.startswith("tfds:"):
        from data_pipelines.tfds_builders import tfds_records

        yield from tfds_records(source[len("tfds:"):], data_dir, manual_dir, stage)
        return
    if storage.is_remote(source):  # is_prepared() said no: raw folders are read from local disk only
        raise BadInput(f"data.source: {source} is not a prepared folder (no manifest.json); sources on an "
                       "object store must be prepared: vist2 data prepare FOLDER --out " + source)
    folder = Path(source)
    if not folder.is_dir():
        raise BadInput(f"data.source: {source!r} is neither 'embedded', tfds:NAME nor a folder")
    if stage == "caption":
        yield from caption_folder_records(folder)
        return
    files = sorted(p for p in folder.rglob("*") if p.suffix in (".txt", ".jsonl"))
    if not files:
        raise BadInput(f"data.source: {folder} holds no .txt or .jsonl files")
    for path in files:
        yield from text_file_records(path)


def load_samples(source: str, tokenizer, stage: str, bad_input: str = "skip", data_dir: str = "",
                 manual_dir: str = "") -> tuple[list[Sample], dict]:
    """Tokenized samples of a source for a stage, and counters of what was skipped
    (``skipped`` in all, ``skipped:<reason>`` per kind)."""
    counters = {"records": 0, "skipped": 0}
    samples: list[Sample] = []
    for record in iter_records(source, stage, data_dir, manual_dir):
        counters["records"] += 1
        problem = record_problem(record, stage, source)
        if problem:
            if bad_input == "fail":
                raise BadInput(f"{record.location}: {problem} (data.bad_input=fail)")
            counters["skipped"] += 1
            kind = problem_kind(problem)
            counters[kind] = counters.get(kind, 0) + 1
            log.warning("skipping %s: %s", record.location, problem)
            continue
        if stage == "caption":
            for caption in caption_lines(record.text):
                samples.append(Sample(np.asarray(tokenizer.encode(caption), np.int32), None,
                                      record.location, record.image))
            continue
        tokens = np.asarray(tokenizer.encode(record.text), np.int32)
        prompt_tokens = np.asarray(tokenizer.encode(record.prompt), np.int32) if record.prompt else None
        samples.append(Sample(tokens, prompt_tokens, record.location))
    if stage == "sft" and source == "embedded":
        samples = [split_for_sft(s) for s in samples if len(s.tokens) > 16]
    return samples, counters


def split_for_sft(sample: Sample) -> Sample:
    """Embedded stand-in for chat data: the first third of a document is the (rendered)
    query, the rest is the response to reproduce. It keeps the document's location, which
    the held-out split hashes (``split.py``): held out in every stage or in none."""
    cut = max(1, len(sample.tokens) // 3)
    return Sample(sample.tokens[cut:], sample.tokens[:cut], sample.location)


def open_samples(data, tokenizer) -> tuple[object, dict]:
    """The samples of ``data.source`` for ``data.stage`` and the source counters: a prepared
    folder is opened lazily (``PreparedSamples``), anything else is loaded into memory."""
    from data_pipelines.prepared import PreparedSamples, is_prepared

    if not is_prepared(data.source):
        return load_samples(data.source, tokenizer, data.stage, data.bad_input, data.data_dir, data.manual_dir)
    samples = PreparedSamples(data.source, data.stage, tokenizer)
    counters = samples.counters()
    if counters["skipped"] and data.bad_input == "fail":
        first = samples.first_bad() or f"{data.source}: records not usable for stage {data.stage}"
        raise BadInput(f"{first} (data.bad_input=fail; {counters['skipped']} records of the prepared "
                       "source are bad or unusable)")
    return samples, counters


def tokenizer_texts(source: str, stage: str, data_dir: str = "", manual_dir: str = "",
                    max_chars: int = 0) -> Iterator[str]:
    """Texts to train a tokenizer on: the source's usable records in order, at most
    ``max_chars`` characters of a prepared source (0: all of it)."""
    from data_pipelines.prepared import PreparedSamples, is_prepared

    if not is_prepared(source):
        if stage == "caption" and source == "embedded":
            stage = "olm"
        for record in iter_records(source, stage, data_dir, manual_dir):
            if not record.error:
                yield (record.prompt or "") + "\n" + record.text + "\n"
        return
    prepared, written = PreparedSamples(source, "olm", None), 0
    total = int(prepared.manifest["counts"]["stored"])
    for number in range(total):
        record = prepared.record(number)
        text = (record.prompt or "") + "\n" + record.text + "\n"
        yield text
        written += len(text)
        if max_chars and written >= max_chars:
            return
