"""Text of a :class:`~vist2_jax.aot.compile.CompileReport` and the README recipe table."""

from __future__ import annotations

import re
from pathlib import Path

from vist2_jax.aot.compile import GIB, CompileReport, shrinking_knobs

TABLE_BEGIN, TABLE_END = "<!-- aot-table:begin -->", "<!-- aot-table:end -->"


def _gib(n: float) -> str:
    return f"{n / GIB:.1f} GiB"


def describe(r: CompileReport, config) -> str:
    mesh = " ".join(f"{k}={v}" for k, v in r.mesh.items())
    lines = [f"{r.recipe} on {r.slice}: {r.chips} chips, mesh {mesh}; {r.rows_per_chip:g} rows/chip "
             f"per micro-step x {r.grad_accum} accumulation, remat {r.remat}",
             "memory per chip (compiler):"]
    if r.error:
        lines.append(f"  temporaries      {_gib(r.temp_bytes):>10}  (at least; the compiler stopped)")
    else:
        lines += [f"  arguments        {_gib(r.argument_bytes):>10}",
                  f"  outputs          {_gib(r.output_bytes):>10}  (not aliased to donated arguments)",
                  f"  temporaries      {_gib(r.temp_bytes):>10}",
                  f"  generated code   {_gib(r.code_bytes):>10}",
                  f"  total            {_gib(r.total_bytes):>10}  of {_gib(r.hbm_bytes)} HBM "
                  f"({100 * r.free_fraction:.0f}% free)",
                  f"FLOPs per step: compiler {r.compiler_flops:.3g} per chip (a scanned layer body "
                  "counted once, Pallas calls not at all); analytic model "
                  f"{r.model_flops / r.chips:.3g} per chip",
                  f"cost model: {r.compiler_s:.3g} s for those FLOPs, "
                  f"{r.compiler_flops / max(r.compiler_s, 1e-12) / 1e12:.0f} TFLOP/s per chip",
                  f"step time (estimate: {r.executed_flops / r.chips:.3g} executed FLOPs per chip at "
                  f"that rate): {r.est_step_s:.3g} s -> MFU (estimate) {100 * r.est_mfu:.1f}%"]
    kernels = "" if r.error else f"; Pallas TPU kernel calls in the program: {r.kernel_calls}"
    lines.append(f"compile time {r.compile_s:.0f} s{kernels}")
    if not r.fits:
        lines.append(f"DOES NOT FIT: {r.error or 'total exceeds HBM'}")
        lines.append("largest buffers and the knobs that shrink them:")
        for size, shape in r.largest:
            lines.append(f"  {size:>11}  {shape}: {shrinking_knobs(shape, config)}")
    return "\n".join(lines)


def table(rows: list[dict]) -> str:
    """Markdown table of sweep results (dicts of ``CompileReport.as_dict`` plus size/stage;
    ``{"size", "stage", "slice", "skipped": reason}`` for runs not compiled)."""
    out = ["| size | stage | slice | rows/chip x accum | remat | memory/chip | fits (>=10% free) "
           "| est. step time | est. MFU |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        head = f"| {r['size']} | {r['stage']} | {r['slice']} "
        if r.get("skipped"):
            out.append(head + f"| | | not compiled: {r['skipped']} | | | |")
            continue
        fits = "yes" if r["fits"] and r["free_fraction"] >= 0.1 else ("tight" if r["fits"] else "no")
        memory = f"{r['total_bytes'] / GIB:.1f} / {r['hbm_bytes'] / GIB:.1f} GiB"
        step = f"{r['est_step_s']:.2f} s" if r["fits"] else "-"
        mfu = f"{100 * r['est_mfu']:.0f}%" if r["fits"] else "-"
        out.append(head + f"| {r['rows_per_chip']:g} x {r['grad_accum']} | {r['remat']} | {memory} "
                   f"| {fits} | {step} | {mfu} |")
    return "\n".join(out)


def update_readme(readme: Path, text: str) -> None:
    """Replace what lies between the table markers of ``readme`` with ``text``."""
    content = readme.read_text()
    pattern = re.compile(re.escape(TABLE_BEGIN) + ".*?" + re.escape(TABLE_END), re.S)
    if not pattern.search(content):
        raise ValueError(f"{readme}: no {TABLE_BEGIN} ... {TABLE_END} markers")
    readme.write_text(pattern.sub(lambda _: f"{TABLE_BEGIN}\n{text}\n{TABLE_END}", content))
