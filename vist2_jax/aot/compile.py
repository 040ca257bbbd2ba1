"""Compile a recipe's real train step for a TPU slice on abstract inputs (nothing is
allocated) and report per-chip memory, FLOPs and the compiler's time estimate.

The step is exactly the trainer's: :func:`~vist2_jax.training.trainer.abstract_state`
(mesh, logical rules, parameter and optimizer shardings) and
:func:`~vist2_jax.training.trainer.jitted_steps` (donation, remat, grad accumulation).
The compiler's FLOPs and cost-model time count a loop body (scanned layers, accumulation
micro-steps) once and Pallas calls not at all, so neither is the step's. The step time is
estimated as the executed FLOPs (analytic model FLOPs of a full row of the stage's final
curriculum layout, :mod:`vist2_jax.training.flops`, plus the forward that ``full`` remat
recomputes) at the FLOP rate of the compiler's cost model on what it does count; MFU is
model FLOPs over that time. Both are estimates, not measurements.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

import flax.linen as nn
import jax
import numpy as np

from vist2_jax.aot.topology import Slice, slice_devices
from vist2_jax.config.schema import Config
from vist2_jax.parallel.sharding import LOGICAL_AXIS_RULES, make_mesh
from vist2_jax.row_contract import CHUNK_ID, GLYPH_CELL, IMAGE_FIELDS, ROW_FIELDS, TILE_TOKENS
from vist2_jax.training.distributed import batch_sharding

GIB = 2 ** 30
CAPTION_TOKENS = 48  # a typical short caption, for the FLOPs of a representative caption row


@dataclasses.dataclass
class CompileReport:
    """Per-chip figures of one compiled train step (compiler estimates unless noted)."""

    recipe: str
    slice: str
    chips: int
    mesh: dict
    rows_per_chip: float
    remat: str
    grad_accum: int
    hbm_bytes: int
    argument_bytes: int = 0
    output_bytes: int = 0  # outputs not aliased to (donated) arguments
    temp_bytes: int = 0
    code_bytes: int = 0
    compiler_flops: float = 0.0  # per chip, as XLA counts them (loop bodies once)
    compiler_s: float = 0.0      # the cost model's time for what it counts
    model_flops: float = 0.0     # analytic, whole step, all chips
    executed_flops: float = 0.0  # model FLOPs + the forward recomputed by full remat
    est_step_s: float = 0.0
    peak_tflops: float = 0.0
    compile_s: float = 0.0
    kernel_calls: int = 0        # Mosaic (Pallas TPU) custom calls in the compiled program
    error: str = ""
    largest: list = dataclasses.field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return self.argument_bytes + self.output_bytes + self.temp_bytes + self.code_bytes

    @property
    def fits(self) -> bool:
        return not self.error and self.total_bytes <= self.hbm_bytes

    @property
    def free_fraction(self) -> float:
        return 1.0 - self.total_bytes / self.hbm_bytes

    @property
    def est_mfu(self) -> float:
        if self.est_step_s <= 0:
            return 0.0
        return self.model_flops / self.est_step_s / (self.chips * self.peak_tflops * 1e12)

    def as_dict(self) -> dict:
        return {**dataclasses.asdict(self), "total_bytes": self.total_bytes, "fits": self.fits,
                "free_fraction": self.free_fraction, "est_mfu": self.est_mfu}


def representative_batch(config: Config) -> dict[str, np.ndarray]:
    """One full row (repeated to the global batch) in the stage's final curriculum layout:
    documents of ``max_chunks`` chunks of ``text_len`` tokens (captions: one image and a
    caption of :data:`CAPTION_TOKENS`) packed until the row or its image slots are full.
    Only metadata counts for FLOPs; images are 1x1 placeholders."""
    from data_pipelines.rows import RowBuilder, RowOverflow

    layout, data = config.model.layout, config.data
    last = data.curriculum[-1] if data.curriculum else None
    text_len, max_chunks = (last.text_len, last.max_chunks) if last else (layout.text_len, 8)
    row = RowBuilder(data.seq_len, layout.visual_len, data.images_per_row, (1, 1), CHUNK_ID, layout.visual_stride)
    image = np.zeros((1, 1, 3), np.uint8)
    try:
        while True:
            row.start_document()
            if data.stage == "caption":  # [V_img][T caption]: the caption reads image 1
                row.add_image(image, chunk_id=1)
                row.add_text([5] * CAPTION_TOKENS, chunk_id=2)
                continue
            for index in range(1, max_chunks + 1):
                row.add_text([5] * text_len, chunk_id=index)
                if index < max_chunks:
                    row.add_image(image, chunk_id=index)
    except RowOverflow:
        pass
    fields = row.finish()
    return {k: np.broadcast_to(v, (data.global_batch_size,) + v.shape) for k, v in fields.items()}


def abstract_batch(config: Config, mesh) -> dict[str, jax.ShapeDtypeStruct]:
    """The global batch as sharded shapes (row contract dtypes)."""
    data, layout, sharding = config.data, config.model.layout, batch_sharding(mesh)
    rows = (data.global_batch_size, data.seq_len)
    shapes = {name: (rows, dtype) for name, dtype in ROW_FIELDS.items()}
    shapes["images"] = ((data.global_batch_size, data.images_per_row, layout.image_size,
                         layout.image_size, 3), IMAGE_FIELDS["images"])
    shapes["image_mask"] = ((data.global_batch_size, data.images_per_row), IMAGE_FIELDS["image_mask"])
    cells = layout.image_size // GLYPH_CELL
    shapes["glyphs"] = ((data.global_batch_size, data.images_per_row, cells, cells), IMAGE_FIELDS["glyphs"])
    shapes["tile_tokens"] = ((data.global_batch_size, data.images_per_row, layout.visual_len, TILE_TOKENS),
                             IMAGE_FIELDS["tile_tokens"])
    return {k: jax.ShapeDtypeStruct(s, d, sharding=sharding) for k, (s, d) in shapes.items()}


_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "f32": 4, "s32": 4,
                "u32": 4, "f64": 8, "s64": 8}
_SHAPE = re.compile(r"(?:(\d+)×)?([a-z]+\d*)\[([\d,]*)\]")
_REPORT_ROW = re.compile(r"^\s*[\d.]+\w+\(\s*\d+%\);\s*([\d.]+)(\w+);\s*\d+;\s*\d+;\s*(.*)$")


def _shape_bytes(dtype: str, dims: str) -> int:
    n = 1
    for d in filter(None, dims.split(",")):
        n *= int(d)
    return n * _DTYPE_BYTES.get(dtype, 4)


def largest_buffers(report_text: str, top: int = 5) -> list[tuple[str, str]]:
    """(size, largest shape) of the ``top`` largest allocations in XLA's memory-usage
    report (one allocation may be shared by several values over time)."""
    rows = []
    for line in report_text.splitlines():
        match = _REPORT_ROW.match(line)
        if match:
            shapes = _SHAPE.findall(match.group(3))
            if shapes:
                count, dtype, dims = max(shapes, key=lambda s: _shape_bytes(s[1], s[2]))
                rows.append((f"{match.group(1)} {match.group(2)}", f"{dtype}[{dims}]"))
        if len(rows) == top:
            break
    return rows


def shrinking_knobs(shape: str, config: Config) -> str:
    """The recipe keys that would shrink a buffer of ``shape`` (e.g. 'bf16[28,32,8192,3072]')."""
    dims = [int(d) for d in re.findall(r"\d+", shape.split("[", 1)[1])]
    model = config.model
    if dims and dims[0] == model.decoder.num_layers:
        return ("per-layer saved activations: model.remat_policy=full, "
                "train.grad_accum_steps (fewer rows per chip)")
    if model.decoder.vocab_size in dims:
        return "logits: model.loss_chunk, train.grad_accum_steps"
    if config.model.layout.image_size in dims or model.vision.mlp_dim in dims:
        return "vision tower: train.grad_accum_steps, data.images_per_row"
    return "train.grad_accum_steps (rows per chip), mesh.tensor, model.remat_policy"


def compile_train_step(config: Config, slice_: Slice, recipe: str = "") -> CompileReport:
    """Lower and compile the train step for ``slice_``; a compile the chip cannot hold
    comes back with ``error`` set (and the compiler's largest buffers), not raised."""
    from vist2_jax.training.flops import train_step_flops
    from vist2_jax.training.state import abstract_state
    from vist2_jax.training.step import jitted_steps

    mesh = make_mesh(config.mesh, slice_devices(slice_))
    shape = dict(zip(mesh.axis_names, mesh.devices.shape))
    report = CompileReport(
        recipe=recipe, slice=slice_.name, chips=slice_.chips, mesh=shape,
        rows_per_chip=config.data.global_batch_size / (shape["data"] * shape["fsdp"])
        / config.train.grad_accum_steps,
        remat=config.model.remat_policy, grad_accum=config.train.grad_accum_steps,
        hbm_bytes=int(slice_.hbm_gib * GIB), peak_tflops=slice_.peak_tflops)
    flops = train_step_flops(config, representative_batch(config))
    report.model_flops = flops["train_step"]
    report.executed_flops = report.model_flops + recomputed_flops(config, flops)
    start = time.perf_counter()
    optimizer, abstract, shardings = abstract_state(config, mesh)  # as train() does, outside
    dump = tempfile.mkdtemp(prefix="vist2-aot-")
    try:
        with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_AXIS_RULES):
            train_step, _ = jitted_steps(config, optimizer, shardings, mesh)
            lowered = train_step.lower(abstract, abstract_batch(config, mesh))
            try:
                compiled = lowered.compile(compiler_options={
                    "xla_dump_to": dump, "xla_dump_hlo_module_re": "train_step"})
            except Exception as err:  # noqa: BLE001 - the compiler's own words go to the user
                if "RESOURCE_EXHAUSTED" not in str(err):
                    raise
                report.error = str(err).strip().splitlines()[0][:300]
                _fill_from_oom(report, str(err))
                compiled = None
        report.largest = largest_buffers(_read_report(dump))
    finally:
        shutil.rmtree(dump, ignore_errors=True)
    report.compile_s = time.perf_counter() - start
    if compiled is None:
        return report
    memory = compiled.memory_analysis()
    report.argument_bytes = int(memory.argument_size_in_bytes)
    report.output_bytes = int(memory.output_size_in_bytes - memory.alias_size_in_bytes)
    report.temp_bytes = int(memory.temp_size_in_bytes)
    report.code_bytes = int(memory.generated_code_size_in_bytes)
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    report.compiler_flops = float(cost.get("flops", 0.0))
    report.kernel_calls = compiled.as_text().count('custom_call_target="tpu_custom_call"')
    report.compiler_s = float(cost.get("optimal_seconds", 0.0))
    if report.compiler_flops > 0:
        rate = report.compiler_flops / report.compiler_s  # per chip, FLOP/s
        report.est_step_s = report.executed_flops / slice_.chips / rate
    return report


def recomputed_flops(config: Config, flops: dict) -> float:
    """Forward FLOPs ``full`` remat runs again in the backward pass: the decoder always (a
    gradient passes through it in every stage), the ViT when it is trainable."""
    if config.model.remat_policy != "full":
        return 0.0  # the dots policies save every matmul output
    extra = flops["forward_decoder"]
    if "vision" in config.train.trainable:
        extra += flops["forward_vision"]
    return extra


def _read_report(folder: str) -> str:
    names = sorted(n for n in os.listdir(folder) if n.endswith("memory-usage-report.txt"))
    return (Path(folder) / names[-1]).read_text() if names else ""


def _fill_from_oom(report: CompileReport, text: str) -> None:
    """The temporaries the compiler says it needed when it gave up on memory."""
    need = re.search(r"HLO temporaries \(([\d.]+)([KMGT])\)", text)
    if need:
        scale = {"K": 2 ** 10, "M": 2 ** 20, "G": GIB, "T": 2 ** 40}
        report.temp_bytes = int(float(need.group(1)) * scale[need.group(2)])
