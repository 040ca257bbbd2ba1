"""Grain pipelines: random-access rows, per-host sharding, worker processes, saved state.

Row ``i`` of a split is ``RowMaker(i)``: deterministic in ``(seed, i)``. Host ``p`` of
``n`` reads rows ``p, p+n, ...`` and batches ``global_batch / n`` of them, so the global
batch at step ``s`` is rows ``[s*B, (s+1)*B)`` whatever the host count. The iterator's
state (the next index) is saved with each checkpoint, which makes resume exact.

A source's samples are a list in memory (small sources) or a prepared folder read and
tokenized lazily inside the workers (``prepared.py``); with ``data.sources`` a
``MixtureMaker`` picks the source of each row from ``(seed, i)`` as well. Training rows
never hold a document of the held-out split (``split.py``); evaluation rows hold only those.
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

import grain
import numpy as np

from data_pipelines.row_makers import MixtureMaker, RowMaker, unweighted
from data_pipelines.sources import open_samples, tokenizer_texts
from data_pipelines.split import HELD_OUT, TRAIN, DocumentSplit
from data_pipelines.tokenizer import TokenizerError, load_tokenizer, train_tokenizer
from vist2_jax import storage
from vist2_jax.config.schema import Config, ConfigError, DataConfig, SourceConfig
from vist2_jax.row_contract import stack_rows

EVAL_SEED_OFFSET = 1_000_003
SOURCE_SEED_STRIDE = 7_000_003  # mixture source k draws its rows from seed + k * stride
TOKENIZER_CHARS_PER_SOURCE = 50_000_000  # what a tokenizer is trained on, per prepared source


def source_parts(data: DataConfig) -> list[tuple[DataConfig, float]]:
    """``(data config of one source, weight)`` per source: ``data.sources``, or ``data.source``."""
    entries = data.sources or (SourceConfig(data.source, 1.0, ""),)
    return [(dataclasses.replace(data, source=e.source, stage=e.stage or data.stage, sources=()), e.weight)
            for e in entries]


def resolve_tokenizer(config: Config, workdir: str | Path):
    """The configured tokenizer, or one trained on the source into ``workdir`` (cached).

    Either may be local or on an object store; SentencePiece trains on local files, so a
    tokenizer for a remote ``workdir`` is trained in a temporary folder and uploaded."""
    if config.data.tokenizer:
        path = storage.as_path(config.data.tokenizer)
        if not path.exists():
            raise ConfigError(f"data.tokenizer: no such file {path}")
        try:
            tokenizer = load_tokenizer(path)
        except TokenizerError as err:
            raise ConfigError(f"data.tokenizer: {err}") from None
    else:
        model = storage.as_path(workdir) / "tokenizer.model"
        if model.is_file():
            tokenizer = load_tokenizer(model)
        else:
            with tempfile.TemporaryDirectory(prefix="vist2-tokenizer-") as scratch:
                local = _train_run_tokenizer(config, Path(scratch))
                for suffix in (".model", ".vocab"):
                    storage.upload(local.with_suffix(suffix), model.with_suffix(suffix))
            tokenizer = load_tokenizer(model)
    if tokenizer.vocab_size > config.model.decoder.vocab_size:
        raise ConfigError(f"data.tokenizer: vocabulary of {tokenizer.vocab_size} exceeds "
                          f"model.decoder.vocab_size={config.model.decoder.vocab_size}")
    return tokenizer


def _train_run_tokenizer(config: Config, folder: Path) -> Path:
    """Train a SentencePiece model on the sources' text in ``folder``; its ``.model`` path."""
    corpus = folder / "tokenizer_corpus.txt"
    with corpus.open("w", encoding="utf-8") as f:
        for part, _ in source_parts(config.data):
            f.writelines(tokenizer_texts(part.source, part.stage, part.data_dir, part.manual_dir,
                                         TOKENIZER_CHARS_PER_SOURCE))
    try:
        train_tokenizer([corpus], config.model.decoder.vocab_size, folder / "tokenizer")
    except TokenizerError as err:
        raise ConfigError(f"data.tokenizer is empty, so a tokenizer is trained on data.source="
                          f"{config.data.source!r}, and {err}: set data.tokenizer to a SentencePiece "
                          ".model or tokenizer.json, or lower model.decoder.vocab_size") from None
    return folder / "tokenizer.model"


@dataclasses.dataclass
class Pipeline:
    """The training rows of a run and a fixed evaluation set."""

    config: Config
    tokenizer: object
    row_maker: RowMaker | MixtureMaker
    eval_maker: RowMaker | MixtureMaker
    process_index: int = 0
    process_count: int = 1
    source_counters: dict = dataclasses.field(default_factory=dict)

    def counters(self) -> dict[str, int]:
        """Records skipped at load time, rows made, chunks skipped, glyphs missing: all counted.

        Rows made in Grain worker processes count there; this process sees the source's
        load-time counters and the rows it made itself (``data.num_workers=0``, eval rows)."""
        stats = self.row_maker.render_stats().merge(self.eval_maker.render_stats())
        return {**{f"source_{k}": v for k, v in self.source_counters.items()}, **self.row_maker.counters,
                **stats.scalars("render_")}

    def problems(self) -> dict:
        """The first few skipped records (with their location) and the characters the font
        lacks, by reason, with where they were."""
        stats = self.row_maker.render_stats().merge(self.eval_maker.render_stats())
        return {"skipped": (self.row_maker.examples + self.eval_maker.examples)[:5],
                "missing_glyphs": stats.missing_summary()}

    @property
    def local_batch_size(self) -> int:
        return self.config.data.global_batch_size // self.process_count

    def train_dataset(self) -> grain.IterDataset:
        data = self.config.data
        rows = self.config.train.steps * data.global_batch_size
        dataset = grain.MapDataset.range(rows)[self.process_index::self.process_count]
        dataset = dataset.map(self.row_maker).batch(self.local_batch_size, drop_remainder=True)
        iterable = dataset.to_iter_dataset()
        if data.num_workers > 0:
            from absl import flags

            if not flags.FLAGS.is_parsed():  # Grain's workers read absl flags; unparsed, they fail
                flags.FLAGS.mark_as_parsed()
            iterable = iterable.mp_prefetch(grain.MultiprocessingOptions(
                num_workers=data.num_workers, per_worker_buffer_size=data.prefetch))
        return iterable

    def eval_batches(self) -> list[dict[str, np.ndarray]]:
        """The fixed evaluation rows of this host, batched; built once per run, at the last
        step's curriculum point: ``eval_loss`` (and ``train.keep_best``'s choice) measures
        the shape the run ends in, not the first point's shorter chunks."""
        data = self.config.data
        rows = max(data.eval_rows, data.global_batch_size)
        last = max(self.config.train.steps - 1, 0) * data.global_batch_size  # row index -> step: index // batch
        indices = [last + i for i in range(self.process_index, rows, self.process_count)]
        made = [self.eval_maker(i) for i in indices]
        size = self.local_batch_size
        return [stack_rows(made[i:i + size]) for i in range(0, len(made) - size + 1, size)]


def build_pipeline(config: Config, workdir: str | Path, process_index: int = 0,
                   process_count: int = 1) -> Pipeline:
    if config.data.global_batch_size % process_count:
        raise ConfigError(f"data.global_batch_size={config.data.global_batch_size} is not divisible "
                          f"by the {process_count} hosts")
    tokenizer = resolve_tokenizer(config, workdir)
    seed, layout, parts = config.run.seed, config.model.layout, source_parts(config.data)
    train, evals, counters = [], [], {}
    for k, (part, _) in enumerate(parts):
        samples, part_counters = open_samples(part, tokenizer)
        source_seed, split = seed + k * SOURCE_SEED_STRIDE, DocumentSplit(samples)
        train.append(RowMaker(part, layout, samples, tokenizer, source_seed, TRAIN, split))
        evals.append(RowMaker(unweighted(part), layout, samples, tokenizer, source_seed + EVAL_SEED_OFFSET,
                              HELD_OUT, split))
        for key, value in part_counters.items():
            counters[key] = counters.get(key, 0) + value
    if len(parts) == 1:
        return Pipeline(config, tokenizer, train[0], evals[0], process_index, process_count, counters)
    weights = [weight for _, weight in parts]
    return Pipeline(config, tokenizer, MixtureMaker(train, weights, seed),
                    MixtureMaker(evals, weights, seed + EVAL_SEED_OFFSET), process_index, process_count, counters)
