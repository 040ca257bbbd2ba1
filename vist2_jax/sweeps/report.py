"""``vist2 sweep report``: every variant and stage side by side, from what the run folders
hold (metrics.jsonl, summary.json, sweep_state.json, ``eval/TASK.json``), as ``report.md``
(+ ``report.json``) and PNG plots: loss curves per stage across variants, and the final
figures against parameter count and against compression ratio. With ``tasks`` the
evaluation of ``vist2 eval`` runs on finished stages that lack those figures, its result
kept in the stage's ``eval/TASK.json``."""

from __future__ import annotations

import functools
import json
import math
import time

from vist2_jax import storage
from vist2_jax.sweeps import state as st
from vist2_jax.sweeps.spec import Stage, Sweep

TASK_KEYS = {"ocr": "cer", "memory": "memory_gain"}  # a figure each task's result always has


@functools.lru_cache(maxsize=None)
def _params(model) -> int:
    from vist2_jax.model.vist2 import param_counts

    return param_counts(model)["total"]


def compression_ratio(stage: Stage) -> float:
    """L/m the stage ends with (its last curriculum point, else the layout's L)."""
    config = stage.config
    text_len = config.data.curriculum[-1].text_len if config.data.curriculum else config.model.layout.text_len
    return text_len / config.model.layout.visual_len


def _eval_file(stage: Stage, task: str):
    return storage.as_path(stage.workdir) / "eval" / f"{task}.json"


def run_missing_evals(stage: Stage, tasks: list[str], limit: int, records: list[dict]) -> None:
    """``vist2 eval`` of each task the finished stage has no figures for."""
    from vist2_jax.cli.eval import default_args, evaluate

    for task in tasks:
        logged = any(f"eval_{task}_{TASK_KEYS[task]}" in r or f"eval_{TASK_KEYS[task]}" in r for r in records)
        if logged or _eval_file(stage, task).exists():
            continue
        args = default_args(stage.workdir, task, limit=limit)
        print(f"[{stage.variant}] {stage.name}: vist2 eval --task {task}", flush=True)
        result = evaluate(args)
        storage.write_atomic(_eval_file(stage, task), json.dumps(result, indent=2))


def _last(records: list[dict], key: str):
    return next((r[key] for r in reversed(records) if key in r), None)


def stage_row(stage: Stage) -> dict:
    """The figures of one stage (None where the run folder has none)."""
    records, summary, state = st.metrics(stage), st.summary(stage) or {}, st.read_state(stage)
    evals = {}
    for task in TASK_KEYS:
        try:
            evals[task] = json.loads(_eval_file(stage, task).read_text())
        except (OSError, ValueError):
            evals[task] = {}
    steps = summary.get("steps_done") or _last(records, "step") or 0
    data = stage.config.data
    memory = {k: _last(records, f"eval_{k}") for k in ("memory_gain", "memory_gain_lo", "memory_gain_hi")}
    if memory["memory_gain"] is None and evals["memory"]:
        memory = {k: evals["memory"].get(k) for k in memory}
    ocr = {k: _last(records, f"eval_ocr_{k}") for k in ("cer", "cer_blank_sketch")}
    if ocr["cer"] is None and evals["ocr"]:
        ocr = {k: evals["ocr"].get(k) for k in ocr}
    return {"variant": stage.variant, "stage": stage.name, "status": st.stage_status(stage).kind,
            "params": _params(stage.config.model), "compression": compression_ratio(stage),
            "steps": steps, "steps_total": stage.steps, "tokens": steps * data.global_batch_size * data.seq_len,
            "train_loss": _last(records, "loss"), "val_loss": _last(records, "eval_loss"),
            "ocr_cer": ocr["cer"], "ocr_cer_blank": ocr["cer_blank_sketch"], **memory,
            "wall_s": state.get("wall_s", summary.get("wall_s")), "cpu_s": state.get("cpu_s"),
            "mfu": _last(records, "mfu"),
            "losses": [(r["step"], r["loss"]) for r in records if "loss" in r]}


def _fmt(value, spec: str) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def _count(n: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n:.0f}"


def table(rows: list[dict]) -> str:
    head = ("| variant | stage | params | L/m | steps | tokens | train loss | val loss | OCR CER (blank) "
            "| memory gain [95% CI] | wall | MFU |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        gain = "-" if r["memory_gain"] is None else (
            f"{r['memory_gain']:+.3g} [{r['memory_gain_lo']:+.3g}, {r['memory_gain_hi']:+.3g}]")
        cer = "-" if r["ocr_cer"] is None else f"{r['ocr_cer']:.3f} ({_fmt(r['ocr_cer_blank'], '.3f')})"
        steps = f"{r['steps']}/{r['steps_total']}" + ("" if r["status"] == "done" else f" {r['status']}")
        wall = "-" if r["wall_s"] is None else f"{r['wall_s']:.0f} s" + (
            "" if r["cpu_s"] is None else f" (CPU {r['cpu_s']:.0f} s)")
        mfu = "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        lines.append(f"| {r['variant']} | {r['stage']} | {_count(r['params'])} | {r['compression']:g} | {steps} | "
                     f"{_count(r['tokens'])} | {_fmt(r['train_loss'], '.3f')} | {_fmt(r['val_loss'], '.3f')} | {cer} | "
                     f"{gain} | {wall} | {mfu} |")
    return "\n".join(lines)


def _plot(panels: list[dict], out, name: str) -> str | None:
    from vist2_jax.plotting import line_charts

    panels = [p for p in panels if any(p["series"].values())]
    if not panels:
        return None
    local = storage.scratch_folder("sweep-report") + f"/{name}"
    line_charts(panels, local)
    storage.upload(local, storage.as_path(out) / name)
    return name


def plots(rows: list[dict], stages: list[str], out) -> list[str]:
    made = []
    curves = [{"title": f"{stage}: training loss", "x_label": "step", "y_label": "nats/token",
               "series": {r["variant"]: r["losses"] for r in rows if r["stage"] == stage}} for stage in stages]
    made.append(_plot(curves, out, "loss_curves.png"))
    figures = (("val_loss", "final validation loss", "nats/token"), ("ocr_cer", "OCR CER", "CER"),
               ("memory_gain", "memory gain (blank - true)", "nats/token"))
    for x_key, x_label, group_key, group_name, name in (
            ("params", "parameters", "compression", "L/m={:g}", "vs_params.png"),
            ("compression", "compression ratio L/m", "params", "{}", "vs_compression.png")):
        panels = []
        for key, title, unit in figures:
            series: dict = {}
            for r in rows:
                if r[key] is None or r["status"] != "done":
                    continue
                label = group_name.format(r[group_key] if group_key == "compression" else _count(r[group_key]))
                series.setdefault(f"{r['stage']} {label}", []).append((r[x_key], r[key]))
            series = {k: sorted(v) for k, v in series.items()}
            panels.append({"title": f"{title} vs {x_label}", "x_label": x_label, "y_label": unit, "series": series,
                           "log_x": x_key == "params"})
        made.append(_plot(panels, out, name))
    return [m for m in made if m]


def write_report(sweep: Sweep, out, tasks: list[str] = (), eval_limit: int = 0) -> str:
    """report.md + report.json + plots in ``out``; returns the report's text."""
    out = storage.as_path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for stage in sweep.stages():
        if tasks and st.finished(stage):
            run_missing_evals(stage, list(tasks), eval_limit, st.metrics(stage))
        rows.append(stage_row(stage))
    stages = list(dict.fromkeys(s.name for s in sweep.stages()))
    images = plots(rows, stages, out)
    text = "\n".join([f"# Sweep report: {sweep.path}", "",
                      f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; runs under {sweep.root}/runs. "
                      "tokens = decoder positions (steps x batch x seq_len); wall = training attempts' wall time (with `--launcher local` also their CPU time); "
                      "OCR CER and memory gain are the last figures logged in training (train.eval_tasks) or "
                      "from `--eval`.", "", table(rows), "", *[f"![{name}]({name})" for name in images], ""])
    storage.write_atomic(out / "report.md", text)
    storage.write_atomic(out / "report.json", json.dumps([{k: v for k, v in r.items() if k != "losses"}
                                                          for r in rows], indent=2))
    return text
