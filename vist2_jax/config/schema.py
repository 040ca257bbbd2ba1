"""The one typed config schema: frozen dataclasses, validated on construction.

Every field is reachable from a recipe YAML or a ``key=value`` override by its
dotted path (``model.decoder.num_layers=2``). Validation messages always name
that dotted path, so a bad config fails with one line a user can act on.
"""

from __future__ import annotations

import dataclasses
from typing import Literal


class ConfigError(ValueError):
    """A recipe, override or preset that cannot be used; the message names the key."""


def _require(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"{key}: {message}")


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """Qwen3-style decoder. ``head_dim`` is explicit: Qwen3 does not use hidden/heads."""

    vocab_size: int = 4096
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 32
    intermediate_size: int = 384
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    tie_embeddings: bool = True

    def validate(self, prefix: str) -> None:
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                     "head_dim", "intermediate_size"):
            _require(getattr(self, name) > 0, f"{prefix}.{name}", "must be positive")
        _require(self.num_heads % self.num_kv_heads == 0, f"{prefix}.num_kv_heads",
                 f"{self.num_kv_heads} KV heads do not divide {self.num_heads} query heads")
        _require(self.head_dim % 2 == 0, f"{prefix}.head_dim", "must be even for RoPE")
        _require(self.rope_theta > 0, f"{prefix}.rope_theta", "must be positive")


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """SigLIP-style ViT tower; its input geometry lives in :class:`LayoutConfig`."""

    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    mlp_dim: int = 512
    layer_norm_eps: float = 1e-6
    glyph_head: bool = False  # a per-patch glyph classifier (param ``glyph_head``, trained with the tower)

    def validate(self, prefix: str) -> None:
        for name in ("hidden_size", "num_layers", "num_heads", "mlp_dim"):
            _require(getattr(self, name) > 0, f"{prefix}.{name}", "must be positive")
        _require(self.hidden_size % self.num_heads == 0, f"{prefix}.num_heads",
                 f"{self.num_heads} heads do not divide hidden size {self.hidden_size}")


@dataclasses.dataclass(frozen=True)
class AlignerConfig:
    """Spatial merge of ViT patches, then a projector into the decoder's embedding space.

    ``tanh`` is the paper's per-token ``tanh(x W + b)``; ``mlp`` is Linear-GELU-Linear.
    """

    projector: Literal["mlp", "tanh"] = "mlp"


@dataclasses.dataclass(frozen=True)
class LayoutConfig:
    """How text chunks and sketch images share a row (docs/design.md §1, §4).

    ``text_len`` is L (text tokens per chunk), ``visual_len`` is m (visual tokens per
    image) and must equal ``(image_size / patch_size / merge) ** 2``. ``visual_stride``: RoPE
    positions between consecutive visual tokens of a span (1: continuous, the paper's row;
    r: a span takes m*r positions, so with token-aligned tiles of r tokens each visual token
    sits where its tokens would, docs/design.md §2).
    """

    text_len: int = 64
    visual_len: int = 16
    image_size: int = 128
    patch_size: int = 16
    merge: int = 2
    visual_attends_past_visual: bool = False
    visual_stride: int = 1

    @property
    def patch_grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def compression_ratio(self) -> float:
        return self.text_len / self.visual_len

    def validate(self, prefix: str) -> None:
        for name in ("text_len", "visual_len", "image_size", "patch_size", "merge", "visual_stride"):
            _require(getattr(self, name) > 0, f"{prefix}.{name}", "must be positive")
        _require(self.image_size % self.patch_size == 0, f"{prefix}.patch_size",
                 f"patch size {self.patch_size} does not divide image size {self.image_size}")
        _require(self.patch_grid % self.merge == 0, f"{prefix}.merge",
                 f"merge {self.merge} does not divide the {self.patch_grid}x{self.patch_grid} patch grid")
        expected = (self.patch_grid // self.merge) ** 2
        _require(self.visual_len == expected, f"{prefix}.visual_len",
                 f"is {self.visual_len} but the layout gives ({self.image_size}/{self.patch_size}"
                 f"/{self.merge})^2 = {expected} visual tokens per image")
        _require(self.text_len % self.visual_len == 0, f"{prefix}.text_len",
                 f"L={self.text_len} is not a whole multiple of m={self.visual_len} "
                 "(the compression ratio L/m must be an integer)")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    decoder: DecoderConfig = DecoderConfig()
    vision: VisionConfig = VisionConfig()
    aligner: AlignerConfig = AlignerConfig()
    layout: LayoutConfig = LayoutConfig()
    dtype: Literal["float32", "bfloat16"] = "bfloat16"
    param_dtype: Literal["float32", "bfloat16"] = "float32"
    scan_layers: bool = True
    remat_policy: Literal["none", "full", "dots", "dots_no_batch"] = "none"
    attention_impl: Literal["auto", "dense", "xla_chunked", "pallas_tpu", "pallas_gpu"] = "auto"
    loss_chunk: int = 512  # sequence positions per block of the training loss; 0: whole row

    def validate(self, prefix: str) -> None:
        _require(self.loss_chunk >= 0, f"{prefix}.loss_chunk", "must be >= 0 (0: whole row)")
        self.decoder.validate(f"{prefix}.decoder")
        self.vision.validate(f"{prefix}.vision")
        self.layout.validate(f"{prefix}.layout")


@dataclasses.dataclass(frozen=True)
class CurriculumPoint:
    """From ``start_step`` until the next point: L per image, chunks per document window,
    the share of OCR rows mixed into OLM (stage 3's curriculum, docs/design.md §1) and the L
    values of those OCR rows, one drawn per row (empty: the point's L; all of the stage's L
    values keep every tile read at every ratio while the OLM chunks are still short), and the
    L values of its OLM rows, one drawn per row (empty: the point's L; a repeated value is
    drawn more often). ``max_chunks`` caps a window; the row's positions and image slots may
    allow fewer (``data.images_per_row`` + 1 chunks at most)."""

    start_step: int = 0
    text_len: int = 64
    max_chunks: int = 8
    ocr_fraction: float = 0.0
    ocr_text_lens: tuple[int, ...] = ()
    olm_text_lens: tuple[int, ...] = ()

    def lengths(self) -> list[tuple[str, int]]:
        """(key, L) of every chunk length this point draws: its L, its OCR and its OLM rows' L values."""
        return [("text_len", self.text_len), *(("ocr_text_lens", length) for length in self.ocr_text_lens),
                *(("olm_text_lens", length) for length in self.olm_text_lens)]


@dataclasses.dataclass(frozen=True)
class SourceConfig:
    """One source of a mixture: rows come from it with probability ``weight / sum``, built
    for ``stage`` (empty: ``data.stage``), e.g. pretraining text (olm), OCR, captions, chat."""

    source: str = ""
    weight: float = 1.0
    stage: Literal["", "caption", "ocr", "olm", "sft"] = ""


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """What one packed row looks like (docs/design.md §2) and where rows come from.

    ``source``: ``embedded`` (prose shipped with CPython), a folder of .txt / .jsonl files
    (stage caption: images with captions), or ``tfds:NAME``, a TFDS ArrayRecord dataset
    prepared into ``data_dir`` (default ``~/tensorflow_datasets``) from ``manual_dir``.
    ``tokenizer``: a SentencePiece ``.model`` or HF ``tokenizer.json``; empty means "train
    one on the source into the run's workdir" (vocab = model.decoder.vocab_size).
    A folder written by ``vist2 data prepare`` (local or ``gs://``) is read lazily.
    ``sources``: a mixture of several sources (``SourceConfig``), chosen per row; when set,
    ``source`` is not used.
    ``bad_input``: ``skip`` (count and log each bad record) or ``fail`` (stop the run).
    Fonts: ``font_family`` picks a bundled font (DejaVu Sans Mono / DejaVu Sans);
    ``font_path`` (face ``font_index`` of a .ttc) replaces it, e.g. Noto Sans CJK, and
    ``font_sha256`` pins the file's hash. The hash in use is saved with every checkpoint.
    """

    stage: Literal["caption", "ocr", "olm", "sft"] = "olm"
    source: str = "embedded"
    tokenizer: str = ""
    seq_len: int = 512
    global_batch_size: int = 8
    images_per_row: int = 8
    curriculum: tuple[CurriculumPoint, ...] = ()
    num_workers: int = 0
    prefetch: int = 2
    bad_input: Literal["skip", "fail"] = "skip"
    font_path: str = ""
    font_family: str = "DejaVu Sans Mono"
    font_index: int = 0
    font_sha256: str = ""
    font_sizes: tuple[int, ...] = (10, 9, 8, 7)
    # 0: the paper's page (one text box, word-wrapped); t > 0: t x t px tiles filled in reading
    # order, character-wrapped (monospace fonts); t = patch_size * merge puts each visual
    # token's text in its own tile (docs/design.md §4)
    sketch_tile: int = 0
    # r > 0 (with tiles): token-aligned tiles, tile k showing exactly the chunk's tokens
    # k*r .. k*r + r - 1, so that each visual token holds a fixed r tokens (docs/design.md §4)
    sketch_tile_tokens: int = 0
    # the fraction of OCR documents read with their window's tokens in random order: that
    # text can be neither recited from memory nor guessed from the language prior, only read
    # (1.0: every one, a diagnostic; a part of them: a reader that generalises to new text)
    ocr_shuffle: float = 0.0
    # olm rows with their visual spans removed: the same documents, chunks and targets as one
    # causal text span per document (the native-LM baseline of ``vist2 demo --proof``)
    text_only: bool = False
    # OLM rows: the first ``chunk_start_tokens`` targets of every chunk after the first (its
    # marker's and the next ones: what the earlier chunks' sketches alone can tell) weigh
    # ``chunk_start_weight`` in the loss; evaluation rows always weigh 1 (docs/design.md §2)
    chunk_start_tokens: int = 0
    chunk_start_weight: float = 1.0
    eval_rows: int = 16
    glyph_targets: bool = False  # fill each sketch's glyph map (row field ``glyphs``) for train.glyph_loss_weight
    data_dir: str = ""
    manual_dir: str = ""
    sources: tuple[SourceConfig, ...] = ()

    def validate(self, prefix: str) -> None:
        _require(self.source != "" and self.source.strip() not in ("tfds", "tfds:"), f"{prefix}.source",
                 "must be 'embedded', a folder or tfds:NAME")
        for name in ("seq_len", "global_batch_size", "images_per_row", "prefetch", "eval_rows"):
            _require(getattr(self, name) > 0, f"{prefix}.{name}", "must be positive")
        _require(self.num_workers >= 0, f"{prefix}.num_workers", "must be >= 0")
        _require(len(self.font_sizes) > 0 and min(self.font_sizes) > 0, f"{prefix}.font_sizes",
                 "must list positive pixel sizes")
        from data_pipelines.fonts import BUNDLED

        _require(bool(self.font_path) or self.font_family in BUNDLED, f"{prefix}.font_family",
                 f"must be a bundled family ({', '.join(BUNDLED)}) or set {prefix}.font_path")
        _require(self.font_index >= 0, f"{prefix}.font_index", "must be >= 0")
        _require(self.font_sha256 == "" or (len(self.font_sha256) == 64 and
                                            all(c in "0123456789abcdef" for c in self.font_sha256)),
                 f"{prefix}.font_sha256", "must be empty or 64 lowercase hex digits")
        steps = [point.start_step for point in self.curriculum]
        _require(steps == sorted(set(steps)) and (not steps or steps[0] == 0), f"{prefix}.curriculum",
                 "start_step values must begin at 0 and increase")
        for i, point in enumerate(self.curriculum):
            key = f"{prefix}.curriculum[{i}]"
            _require(point.text_len > 0 and point.max_chunks > 0, key, "text_len and max_chunks must be positive")
            _require(0.0 <= point.ocr_fraction <= 1.0, f"{key}.ocr_fraction", "must lie in [0, 1]")
            _require(all(length > 0 for length in point.ocr_text_lens), f"{key}.ocr_text_lens", "must be positive")
            _require(all(length > 0 for length in point.olm_text_lens), f"{key}.olm_text_lens", "must be positive")
        _require(self.chunk_start_tokens >= 0, f"{prefix}.chunk_start_tokens", "must be >= 0")
        _require(self.chunk_start_weight > 0, f"{prefix}.chunk_start_weight", "must be positive")
        _require(0.0 <= self.ocr_shuffle <= 1.0, f"{prefix}.ocr_shuffle", "must be a fraction in [0, 1]")
        _require(not self.text_only or self.stage == "olm", f"{prefix}.text_only",
                 f"needs {prefix}.stage=olm (it removes the sketches of OLM rows), got {self.stage!r}")
        _require(not (self.sources and self.source != "embedded"), f"{prefix}.sources",
                 "set data.source or data.sources, not both")
        for i, entry in enumerate(self.sources):
            key = f"{prefix}.sources[{i}]"
            _require(entry.source.strip() not in ("", "tfds", "tfds:"), f"{key}.source",
                     "must be 'embedded', a folder, a prepared folder or tfds:NAME")
            _require(entry.weight > 0, f"{key}.weight", "must be positive")


COMPONENTS = ("vision", "aligner", "decoder")
AUXILIARY_HEADS = {"glyph_head": "vision"}  # parameters outside the three components -> the one they train with


def component_of(param_group: str) -> str:
    """The component a top-level parameter group trains and freezes with."""
    return AUXILIARY_HEADS.get(param_group, param_group)


@dataclasses.dataclass(frozen=True)
class ComponentRates:
    """Peak learning rate per component; 0 means ``train.learning_rate``. VLM trainers give a
    pretrained tower a much smaller rate than a fresh aligner: Adam moves every weight by up
    to the rate per step, so one shared rate erases a tower's features within a few dozen
    steps (docs/design.md §1)."""

    vision: float = 0.0
    aligner: float = 0.0
    decoder: float = 0.0


@dataclasses.dataclass(frozen=True)
class ComponentSteps:
    """Step at which a component's learning-rate schedule starts (its warm-up begins then;
    before it the component is held still), e.g. the aligner settles before the tower moves."""

    vision: int = 0
    aligner: int = 0
    decoder: int = 0


TRAINING_EVAL_TASKS = ("ocr", "memory")  # cheap enough to run inside training (vist2_jax/evaluation)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimisation and the loop around it.

    ``trainable`` lists the components that get updates (docs/design.md §1 per stage); frozen ones
    get no optimizer state. ``init_from`` is a previous stage's workdir (its latest
    checkpoint's parameters start this stage). ``init_decoder_hf`` / ``init_vision_hf`` are
    Hugging Face folders (Qwen3 / SigLIP or SigLIP2 safetensors) loaded into a fresh run. ``peak_tflops_per_device`` (bf16 dense peak
    of the accelerator) turns on MFU in the metrics; 0 leaves it out.
    ``component_learning_rate`` / ``component_start_step``: each component's own peak rate
    and schedule start. The objective is ``text_loss_weight`` x next-token loss +
    ``glyph_loss_weight`` x the glyph loss of the sketches (docs/design.md §4; 0 text weight:
    a vision-only stage that never runs the decoder) + ``tile_token_loss_weight`` x the
    tile-token loss of the visual tokens (§4).
    """

    steps: int = 100
    learning_rate: float = 3e-4
    warmup_steps: int = 10
    end_learning_rate_fraction: float = 0.1
    weight_decay: float = 0.1
    grad_clip_norm: float = 1.0
    z_loss_weight: float = 0.0
    grad_accum_steps: int = 1
    trainable: tuple[str, ...] = COMPONENTS
    component_learning_rate: ComponentRates = ComponentRates()
    component_start_step: ComponentSteps = ComponentSteps()
    glyph_loss_weight: float = 0.0
    tile_token_loss_weight: float = 0.0
    text_loss_weight: float = 1.0
    init_from: str = ""
    init_decoder_hf: str = ""
    init_vision_hf: str = ""
    eval_every: int = 50
    eval_batches: int = 2
    eval_tasks: tuple[str, ...] = ()  # run every eval_every steps: ocr CER, memory gain
    eval_task_limit: int = 24  # ocr chunks / memory rows per evaluation
    checkpoint_every: int = 50
    keep_checkpoints: int = 3
    # Model selection: every evaluation also saves a checkpoint with its held-out loss, and
    # the one with the lowest is kept beside the newest keep_checkpoints (RUN/summary.json:
    # best_eval_step); early_stop_evals > 0 ends the run once that many evaluations in a row
    # have not improved on it (a small corpus overfits: the proof's text-only baseline).
    keep_best: bool = False
    early_stop_evals: int = 0
    nan_policy: Literal["stop", "skip"] = "stop"
    peak_tflops_per_device: float = 0.0
    # The collapse guard (evaluation/during_training.py): visual_spread of held-out sketches,
    # logged every run.log_every steps; below the threshold (0: never) a run warns or stops.
    collapse_threshold: float = 0.05
    collapse_action: Literal["warn", "stop"] = "warn"

    def validate(self, prefix: str) -> None:
        for name in ("steps", "grad_accum_steps", "eval_every", "eval_batches", "checkpoint_every",
                     "keep_checkpoints"):
            _require(getattr(self, name) > 0, f"{prefix}.{name}", "must be positive")
        _require(self.learning_rate > 0, f"{prefix}.learning_rate", "must be positive")
        _require(self.early_stop_evals >= 0, f"{prefix}.early_stop_evals", "must be >= 0 (0: never)")
        _require(not self.early_stop_evals or self.keep_best, f"{prefix}.early_stop_evals",
                 f"needs {prefix}.keep_best=true (the stopped run's model is its best checkpoint)")
        for name in COMPONENTS:
            _require(getattr(self.component_learning_rate, name) >= 0,
                     f"{prefix}.component_learning_rate.{name}", "must be >= 0 (0: train.learning_rate)")
            start = getattr(self.component_start_step, name)
            _require(0 <= start < self.steps, f"{prefix}.component_start_step.{name}",
                     f"must lie in [0, train.steps={self.steps})")
        _require(self.glyph_loss_weight >= 0, f"{prefix}.glyph_loss_weight", "must be >= 0")
        _require(self.tile_token_loss_weight >= 0, f"{prefix}.tile_token_loss_weight", "must be >= 0")
        _require(self.text_loss_weight >= 0, f"{prefix}.text_loss_weight", "must be >= 0")
        _require(self.text_loss_weight > 0 or self.glyph_loss_weight > 0, f"{prefix}.text_loss_weight",
                 "is 0 and so is train.glyph_loss_weight: nothing would be learned")
        _require(0 <= self.warmup_steps <= self.steps, f"{prefix}.warmup_steps",
                 f"must lie in [0, train.steps={self.steps}]")
        _require(0 <= self.end_learning_rate_fraction <= 1, f"{prefix}.end_learning_rate_fraction",
                 "must lie in [0, 1]")
        _require(self.weight_decay >= 0, f"{prefix}.weight_decay", "must be >= 0")
        _require(self.grad_clip_norm >= 0, f"{prefix}.grad_clip_norm", "must be >= 0 (0 turns it off)")
        _require(self.z_loss_weight >= 0, f"{prefix}.z_loss_weight", "must be >= 0")
        _require(self.peak_tflops_per_device >= 0, f"{prefix}.peak_tflops_per_device", "must be >= 0")
        unknown = set(self.trainable) - set(COMPONENTS)
        _require(not unknown, f"{prefix}.trainable", f"unknown components {sorted(unknown)}; "
                 f"choose from {', '.join(COMPONENTS)}")
        _require(len(self.trainable) > 0, f"{prefix}.trainable", "nothing would be trained")
        unknown = set(self.eval_tasks) - set(TRAINING_EVAL_TASKS)
        _require(not unknown, f"{prefix}.eval_tasks", f"unknown tasks {sorted(unknown)}; "
                 f"choose from {', '.join(TRAINING_EVAL_TASKS)}")
        _require(self.eval_task_limit > 0, f"{prefix}.eval_task_limit", "must be positive")
        _require(not (self.init_from and (self.init_decoder_hf or self.init_vision_hf)), f"{prefix}.init_from",
                 "a stage starts either from a previous stage or from Hugging Face weights, not both")
        _require(0 <= self.collapse_threshold < 1, f"{prefix}.collapse_threshold",
                 "must lie in [0, 1) (a share of the visual tokens' norm; 0 turns the guard off)")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh sizes; one axis may be -1, meaning "all devices left over"."""

    data: int = 1
    fsdp: int = -1
    tensor: int = 1

    def axis_sizes(self) -> dict[str, int]:
        return {"data": self.data, "fsdp": self.fsdp, "tensor": self.tensor}

    def validate(self, prefix: str) -> None:
        sizes = self.axis_sizes()
        for name, size in sizes.items():
            _require(size == -1 or size > 0, f"{prefix}.{name}", "must be positive or -1")
        _require(sum(size == -1 for size in sizes.values()) <= 1, prefix,
                 "at most one mesh axis may be -1")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    workdir: str = "runs/default"
    seed: int = 0
    log_every: int = 10
    progress: bool = True

    def validate(self, prefix: str) -> None:
        _require(self.log_every > 0, f"{prefix}.log_every", "must be positive")
        _require(bool(self.workdir), f"{prefix}.workdir", "must name a folder")


@dataclasses.dataclass(frozen=True)
class Config:
    """A whole run. ``preset`` names the model preset the recipe started from."""

    preset: str = "tiny"
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    mesh: MeshConfig = MeshConfig()
    run: RunConfig = RunConfig()

    def validate(self) -> "Config":
        self.model.validate("model")
        self.data.validate("data")
        self.train.validate("train")
        self.mesh.validate("mesh")
        self.run.validate("run")
        tile, size = self.data.sketch_tile, self.model.layout.image_size
        _require(tile == 0 or (tile > 4 and size % tile == 0), "data.sketch_tile",
                 f"{tile} px must be 0 (the page) or a tile size dividing the {size} px sketch")
        per_tile = self.data.sketch_tile_tokens
        _require(per_tile >= 0, "data.sketch_tile_tokens", "must be >= 0 (0: tiles filled by characters)")
        # (a chunk longer than per_tile x tiles tokens closes early by the chunk rule, as on a full page)
        _require(not per_tile or tile > 0, "data.sketch_tile_tokens",
                 "needs data.sketch_tile > 0 (token groups fill tiles)")
        if self.train.glyph_loss_weight > 0:
            _require(self.model.vision.glyph_head, "train.glyph_loss_weight",
                     "needs model.vision.glyph_head=true (the classifier the glyph loss trains)")
            _require(self.data.glyph_targets, "train.glyph_loss_weight",
                     "needs data.glyph_targets=true (the rows must carry each sketch's glyph map)")
            _require("vision" in self.train.trainable, "train.glyph_loss_weight",
                     "trains the vision tower, which train.trainable leaves frozen")
        if self.train.tile_token_loss_weight > 0:
            layout = self.model.layout
            _require(tile == layout.patch_size * layout.merge, "train.tile_token_loss_weight",
                     f"needs one tile per visual token: data.sketch_tile={tile} must equal "
                     f"patch_size x merge = {layout.patch_size * layout.merge}")
            _require(self.data.glyph_targets, "train.tile_token_loss_weight",
                     "needs data.glyph_targets=true (the rows must carry each tile's tokens)")
            _require(self.train.text_loss_weight > 0, "train.tile_token_loss_weight",
                     "reads the decoder's embedding table, which a vision-only stage (text_loss_weight=0) never runs")
            _require({"vision", "aligner"} & set(self.train.trainable), "train.tile_token_loss_weight",
                     "trains the vision tower and aligner, which train.trainable both leave frozen")
        m = self.model.layout.visual_len
        for i, point in enumerate(self.data.curriculum):
            for name, length in point.lengths():
                _require(length % m == 0, f"data.curriculum[{i}].{name}", f"L={length} is not a whole multiple of m={m}")
        _require(self.data.global_batch_size % self.train.grad_accum_steps == 0, "train.grad_accum_steps",
                 f"does not divide data.global_batch_size={self.data.global_batch_size}")
        # A row must hold at least one chunk and its sketch (docs/design.md §2: a text span of
        # L tokens takes L+1 positions with its marker, an image m); refused here, before a
        # pipeline is built or a step compiled.
        lengths = [("model.layout.text_len", self.model.layout.text_len)] + [
            (f"data.curriculum[{i}].{name}", length) for i, point in enumerate(self.data.curriculum)
            for name, length in point.lengths()]
        where, text_len = max(lengths, key=lambda item: item[1])
        need = text_len + 1 + m
        _require(self.data.seq_len >= need, "data.seq_len",
                 f"{self.data.seq_len} positions cannot hold one chunk and its sketch: {where}={text_len} "
                 f"text tokens + 1 marker + m={m} visual tokens = {need}")
        return self
