"""Export a training run's checkpoint to a folder PyTorch / ``transformers`` loads as is.

Streaming: parameters are read from the Orbax checkpoint one leaf (or one stored block of
layers of a stacked leaf) at a time, mapped through the declarative HF tables
(``vist2_jax/convert/hf_mapping.py``) and written to safetensors before the next read,
so peak host memory is about twice the largest stored tensor (TensorStore's decoded chunk
plus the array it returns, or a leaf plus its converted copy), not the model. The folder is a
Hugging Face model that ``AutoModelForCausalLM`` / ``AutoTokenizer`` load with
``trust_remote_code=True``: ``config.json`` (with ``auto_map``), the weights (``language_model.``
Qwen3, ``vision_model.`` SigLIP or SigLIP2, ``aligner.``) as safetensors with an index,
``generation_config.json``, the tokenizer, the renderer config with its font, the runtime's
code (``bundle.py``) and a model card, all from the checkpoint itself.

The run may be local or on an object store (``gs://``: small files through
``vist2_jax.storage``, arrays through TensorStore's GCS driver), and so may ``--out``. The
export is always written to a LOCAL folder first (safetensors shards are written by seeking
into local files): for a local ``--out`` a hidden sibling renamed at the end, for a remote
one a temporary folder (under ``TMPDIR``) that holds the whole export, is uploaded file by
file once complete, and is removed afterwards, so a remote export needs local disk for
its full size; host memory stays bounded as above either way.
"""

from __future__ import annotations

import ctypes
import dataclasses
import datetime
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import jax
import ml_dtypes
import numpy as np

from vist2_jax import storage
from vist2_jax.config.loader import build_saved, to_dict
from vist2_jax.config.schema import ConfigError, ModelConfig
from vist2_jax.convert.hf_mapping import QWEN3_DECODER, SIGLIP2_VISION, SIGLIP_VISION, tensor_rows
from vist2_jax.export.metadata import copy_font, decoder_hf_config, git_commit, vision_hf_config
from vist2_jax.export.orbax_reader import OrbaxParams, UnreadableCheckpoint
from vist2_jax.export.bundle import AUTO_MAP, TOKENIZER_AUTO_MAP, write_runtime
from vist2_jax.export.readme import model_card
from vist2_jax.export.safetensors_stream import ShardedWriter
from vist2_jax.checkpointing.checkpoints import RunCheckpoints, one_line_reason, write_tokenizer_asset
from vist2_jax.checkpointing.runs import load_config_of, resolve_run_dir
from vist2_jax.convert.hf_weights import vision_format

log = logging.getLogger(__name__)

FORMAT = "vist2-torch"
FORMAT_VERSION = 2
DEFAULT_SHARD_BYTES = 5 * 10 ** 9  # the transformers default shard size
DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}
VISION_TABLES = {"siglip": SIGLIP_VISION, "siglip2": SIGLIP2_VISION}


@dataclasses.dataclass
class ExportResult:
    out: storage.PathLike  # local or remote (gs://)
    run_dir: storage.PathLike
    step: int
    checkpoint_bytes: int  # all parameter leaves as stored
    largest_tensor_bytes: int  # the largest stored leaf
    written_bytes: int  # safetensors payload written


def release_freed_buffers() -> None:
    """Make glibc return every freed buffer of 1 MiB or more to the OS at once. Its default
    mmap threshold grows after large frees (up to 32 MiB), after which freed tensors stay in
    the heap and RSS climbs towards the model size although one leaf is held at a time."""
    try:
        ctypes.CDLL(None).mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass


def export_run(run_dir: storage.PathLike, out: storage.PathLike, *, step: int | None = None,
               dtype: str = "float32", max_shard_bytes: int = DEFAULT_SHARD_BYTES,
               font: str | None = None, vision: str = "auto") -> ExportResult:
    """Export ``step`` (default: the newest readable checkpoint) of a run into ``out``,
    which must not exist or be empty; either may be local or ``gs://...``. A failed export
    leaves nothing behind: a local ``out`` is written to a sibling temporary folder renamed
    at the end; a remote ``out`` is written to a local temporary folder (holding the whole
    export, so it needs that much local disk) and uploaded once complete (see
    :func:`upload_export`)."""
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype: {dtype!r}; choose one of {', '.join(DTYPES)}")
    release_freed_buffers()
    remote = storage.is_remote(out)
    out = storage.absolute(out) if remote else Path(storage.as_path(out)).absolute()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"--out: {out} exists and is not an empty folder")
    if vision not in ("auto", *VISION_TABLES):
        raise ConfigError(f"--vision-format: {vision!r}; choose auto, siglip or siglip2")
    run_dir, step_in_path = resolve_run_dir(run_dir, "RUN_DIR")
    step = step if step is not None else step_in_path
    checkpoints = RunCheckpoints(run_dir, keep=1000, async_save=False)
    staging = Path(tempfile.mkdtemp(prefix="vist2-export-")) if remote else None
    try:
        steps = checkpoints.steps()
        if step is not None and step not in steps:
            raise ConfigError(f"--step: {run_dir} has no checkpoint {step} (steps: {steps})")
        candidates = [step] if step is not None else list(reversed(steps))
        if not candidates:
            raise ConfigError(f"RUN_DIR: {run_dir} has no checkpoint")
        partial = staging / "export" if remote else out.with_name(f".{out.name}.partial")
        for candidate in candidates:
            shutil.rmtree(partial, ignore_errors=True)
            try:
                result = _export_step(run_dir, checkpoints, candidate, partial, DTYPES[dtype],
                                      max_shard_bytes, font, vision)
            except UnreadableCheckpoint as err:
                shutil.rmtree(partial, ignore_errors=True)
                if step is not None:
                    raise ConfigError(f"--step {step}: {err}") from None
                log.error("checkpoint step %d of %s is unreadable (%s); trying the previous one",
                          candidate, run_dir, str(err).splitlines()[0][:300])
                continue
            except BaseException:
                shutil.rmtree(partial, ignore_errors=True)
                raise
            if remote:
                upload_export(partial, out)
            else:
                if out.exists():
                    out.rmdir()
                partial.rename(out)
            result.out = out
            return result
        raise ConfigError(f"RUN_DIR: no readable checkpoint under {checkpoints.directory}")
    finally:
        checkpoints.close()
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)


def upload_export(folder: Path, out) -> None:
    """Upload a finished local export ``folder`` to the remote folder ``out``.

    An object store has no atomic folder rename, so the export cannot appear all at once.
    Chosen: upload every file with README.md last, and on any failure delete every object
    uploaded so far. README.md last makes it the completion marker (a folder with a README
    is a whole export, even if this process is killed mid-upload, when no clean-up can run);
    deleting on failure keeps the local guarantee that a failed export leaves nothing
    behind (``out`` was checked empty, so everything under it is ours)."""
    files = sorted(Path(root, name).relative_to(folder)
                   for root, _, names in os.walk(folder) for name in names)
    files.sort(key=lambda relative: relative == Path("README.md"))  # stable: README.md last
    uploaded = []
    try:
        for relative in files:
            target = out / relative.as_posix()
            storage.upload(folder / relative, target)
            uploaded.append(target)
    except BaseException:
        for target in uploaded:
            try:
                target.unlink()
            except OSError as err:
                log.error("could not remove %s after a failed upload: %s", target, err)
        raise


def read_item(checkpoints: RunCheckpoints, step: int, name: str) -> dict | None:
    """A JSON item of a checkpoint (``checksums``: the saved array checksums, None for a
    checkpoint saved before them); UnreadableCheckpoint when it cannot be read."""
    try:
        return checkpoints.saved_checksums(step) if name == "checksums" else checkpoints.read_json(step, name)
    except Exception as err:  # orbax raises many kinds for missing or damaged items
        raise UnreadableCheckpoint(f"step {step} item {name!r}: {one_line_reason(err)}") from None


def _export_step(run_dir, checkpoints, step, out, dtype, max_shard_bytes, font, vision):
    # The checkpoint's own resolved config (config.yaml is the latest invocation's).
    has_config = (checkpoints.directory / str(step) / "config").is_dir()
    config = (build_saved(read_item(checkpoints, step, "config")) if has_config
              else load_config_of(run_dir))
    vision = vision_format(config) if vision == "auto" else vision
    tokenizer_asset = read_item(checkpoints, step, "tokenizer")
    renderer = read_item(checkpoints, step, "renderer")
    checksums = read_item(checkpoints, step, "checksums")
    if checksums is None:
        log.warning("checkpoint step %d was saved without checksums; its arrays are exported unchecked", step)
    reader = OrbaxParams(checkpoints.directory / str(step) / "params", checksums)
    model = config.model
    out.mkdir(parents=True)
    components = [plan_component(reader, QWEN3_DECODER, model, "language_model.", dtype),
                  plan_component(reader, VISION_TABLES[vision], model, "vision_model.", dtype),
                  plan_aligner(reader, "aligner.", dtype)]
    writer = ShardedWriter(out, [entry for plan, _ in components for entry in plan], max_shard_bytes)
    for _, write in components:
        write(writer)
    writer.close()
    try:
        tokenizer_file = write_tokenizer_asset(tokenizer_asset, out)
    except ValueError as err:
        raise ConfigError(f"step {step}: {err}") from None
    from data_pipelines.tokenizer import load_tokenizer
    from vist2_jax.export.tokenization_vist2 import FILES
    tokenizer_name = FILES["sentencepiece_file" if tokenizer_file.name.endswith(".model") else "tokenizers_file"]
    tokenizer_file.rename(out / tokenizer_name)
    tokenizer = load_tokenizer(out / tokenizer_name)
    special_ids = dict(tokenizer.special_ids)
    font_file, font_sha = copy_font(renderer, out / "font", font)
    (out / "renderer.json").write_text(json.dumps(renderer, indent=2))
    sizes = {path: reader.nbytes(path) for path in reader.paths}
    source = {"run_dir": str(storage.absolute(run_dir)), "step": step, "git_commit": git_commit(),
              "exported_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "init_decoder_hf": config.train.init_decoder_hf or None,
              "init_vision_hf": config.train.init_vision_hf or None}
    layout = model.layout
    hf_config = {
        "architectures": ["Vist2ForCausalLM"], "model_type": "vist2", "auto_map": AUTO_MAP,
        "format": FORMAT, "format_version": FORMAT_VERSION, "dtype": dtype.name,
        "lm_config": decoder_hf_config(model, dtype, special_ids),
        "vit_config": vision_hf_config(model, vision, dtype), "vision_format": vision,
        "layout": {"text_len": layout.text_len, "visual_len": layout.visual_len,
                   "image_size": layout.image_size, "patch_size": layout.patch_size, "merge": layout.merge,
                   "visual_attends_past_visual": layout.visual_attends_past_visual,
                   "visual_stride": layout.visual_stride},
        "projector": model.aligner.projector, "special_ids": special_ids,
        "tokenizer_file": tokenizer_name, "renderer_file": "renderer.json", "font_file": font_file,
        "font_sha256": font_sha, "pad_token_id": special_ids["pad"], "bos_token_id": special_ids["bos"],
        "eos_token_id": special_ids["eos"], "source": source, "model_config": to_dict(model),
    }
    (out / "config.json").write_text(json.dumps(hf_config, indent=2))
    stops = sorted({special_ids[name] for name in ("eos", "end") if name in special_ids})
    (out / "generation_config.json").write_text(json.dumps({
        "mode": "gcc", "do_sample": False, "eos_token_id": stops, "pad_token_id": special_ids["pad"],
        "bos_token_id": special_ids["bos"]}, indent=2))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "Vist2Tokenizer", "auto_map": TOKENIZER_AUTO_MAP, "padding_side": "left",
        "model_max_length": 1 << 30, "clean_up_tokenization_spaces": False}, indent=2))
    write_runtime(out)
    figures = eval_figures(run_dir, step)
    (out / "README.md").write_text(model_card(hf_config, sizes, figures))
    return ExportResult(out, run_dir, step, sum(sizes.values()), max(sizes.values()), writer.total_bytes)


def eval_figures(run_dir, step: int) -> dict:
    """The run's evaluation metrics (``eval_*`` in metrics.jsonl) logged at ``step``, or at the
    last logged step before it; {} when the run logged none."""
    path = storage.as_path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return {}
    best = {}
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        figures = {k: v for k, v in record.items() if k.startswith("eval_") and isinstance(v, (int, float))}
        if figures and record.get("step", step + 1) <= step and record["step"] >= best.get("step", -1):
            best = {"step": record["step"], **figures}
    return best


def _hf_shape(transform, shape, dims) -> tuple[int, ...]:
    """The HF shape of one of our tensors, traced (no data)."""
    return jax.eval_shape(lambda w: transform.to_hf(w, dims), jax.ShapeDtypeStruct(shape, np.float32)).shape


def plan_component(reader: OrbaxParams, table, model: ModelConfig, prefix: str, dtype):
    """One HF component (decoder or vision tower) under ``prefix``: every tensor's (name, shape,
    dtype) planned from metadata, and a function writing them, each stored leaf read once."""
    dims = table.dims(model)
    groups: dict[tuple, list] = {}
    for hf, path, transform, index in tensor_rows(table, model):
        groups.setdefault(path, []).append((index, prefix + hf, transform))
    plan = []
    for path, rows in groups.items():
        rows.sort(key=lambda r: -1 if r[0] is None else r[0])
        shape = reader.shape(path)
        for index, hf, transform in rows:
            plan.append((hf, _hf_shape(transform, shape if index is None else shape[1:], dims), dtype))

    def write(writer: ShardedWriter) -> None:
        def emit(hf, transform, value):
            writer.write(hf, np.ascontiguousarray(transform.to_hf(value.astype(dtype, copy=False), dims)))

        for path, rows in groups.items():
            if rows[0][0] is None:
                (_, hf, transform), = rows
                emit(hf, transform, reader.read(path))
                continue
            wanted = {index: (hf, transform) for index, hf, transform in rows}
            for start, block in reader.layer_blocks(path):
                for offset in range(block.shape[0]):
                    if start + offset in wanted:
                        emit(*wanted[start + offset], block[offset])
                del block

    return plan, write


def plan_aligner(reader: OrbaxParams, prefix: str, dtype):
    """The aligner's Linear layers in torch layout (``fc1.weight`` [out, in], ``fc1.bias``...)."""
    leaves = sorted(p for p in reader.paths if p[:2] == ("params", "aligner"))
    plan = []
    for path in leaves:
        name = f"{prefix}{'.'.join(path[2:-1])}.{'weight' if path[-1] == 'kernel' else 'bias'}"
        shape = reader.shape(path)
        plan.append((name, shape[::-1] if path[-1] == "kernel" else shape, dtype))

    def write(writer: ShardedWriter) -> None:
        for path, (name, _, _) in zip(leaves, plan):
            value = reader.read(path).astype(dtype, copy=False)
            writer.write(name, np.ascontiguousarray(value.T if path[-1] == "kernel" else value))

    return plan, write
