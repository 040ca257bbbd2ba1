"""``vist2 demo [--workdir DIR] [--proof]``: the tiny preset through the paper's stages on the
embedded corpus (no download), each stage starting from the previous one's parameters.
Nothing can be downloaded, so stage 0 makes the pretrained parts the paper starts from: a
language model (text only) and a text-oriented vision tower (the glyph objective). Writes
checkpoints, metrics.jsonl and TensorBoard logs per stage, a loss-curve PNG, sample
sketch PNGs, a PNG of held-out sketches beside stage 2's reconstruction, and prints a
summary table with the evaluation figures (stage-2 OCR CER before/after, stage-3 memory
gain with its 95% interval; ``train.eval_tasks`` in the recipes).

``--proof`` runs the same recipe longer (``recipes/proof/``, under an hour on a 2-core
CPU), trains a text-only model of the same size on the same text with the same budget
(a ``vist2 train`` process beside stages 0b-4: it needs only stage 0a's LM), and ends
with the compression table (``compression.json`` / ``.png``): OCR CER with true
and blank sketches, memory gain and the gap to the text-only model at 1x, 2x and 4x."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

STAGES = ("stage0_lm", "stage0_vision", "stage1_caption", "stage2_ocr", "stage3_olm", "stage4_sft")
RECIPE_ROOT = Path(__file__).resolve().parents[2] / "recipes"
RECIPES = RECIPE_ROOT / "demo"
TEXT_ONLY = "text_only"  # --proof: the native-LM baseline of the compression table


def register(subparsers) -> None:
    parser = subparsers.add_parser("demo", help="train the tiny preset through the four stages (CPU, minutes)")
    parser.add_argument("--workdir", default="runs/demo")
    parser.add_argument("--proof", action="store_true",
                        help="the longer proof run (recipes/proof/) with a text-only baseline and the "
                             "compression table at 1x/2x/4x")
    parser.add_argument("--steps-scale", type=float, default=1.0,
                        help="multiply every stage's steps (tests use a small value)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="overrides for every stage")
    parser.set_defaults(func=run)


def _scaled(config, scale: float) -> list[str]:
    if scale == 1.0:
        return []
    steps = max(2, int(round(config.train.steps * scale)))
    every = max(1, steps // 2)
    return [f"train.steps={steps}", f"train.warmup_steps={min(config.train.warmup_steps, steps // 2)}",
            f"train.eval_every={every}", f"train.checkpoint_every={every}", f"run.log_every={max(1, steps // 4)}",
            f"train.eval_task_limit={max(4, int(round(config.train.eval_task_limit * scale)))}"]


def _copy_sketches(stage_dir: Path, out_dir: Path) -> list[Path]:
    """The sketches the trainer saved for its first evaluation row (``stage/sketches/``)."""
    import shutil

    return [Path(shutil.copy(png, out_dir / png.name)) for png in sorted((stage_dir / "sketches").glob("*.png"))]


def run(args) -> int:
    from data_pipelines.pipeline import resolve_tokenizer
    from vist2_jax.cli.train import setup_logging
    from vist2_jax.config import load_config

    setup_logging()
    workdir = Path(args.workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    recipes = RECIPE_ROOT / "proof" if args.proof else RECIPES
    tokenizer = resolve_tokenizer(load_config(recipes / "base.yaml", args.overrides), workdir)
    baseline = _Baseline(workdir)
    # SIGTERM outside a stage's step loop (building a pipeline, compiling, between stages,
    # waiting for the baseline) and Ctrl-C there stop the demo through `finally`: the
    # baseline process is stopped too (at a saved step), never orphaned
    on_sigterm = signal.signal(signal.SIGTERM, _raise_stopped)
    try:
        results = _train_stages(args, recipes, workdir, tokenizer, baseline)
        proof = _proof_table(workdir, baseline.wait()) if results is not None and args.proof else []
    except (_Stopped, KeyboardInterrupt) as stop:
        name = stop.args[0] if isinstance(stop, _Stopped) else "SIGINT"
        print(f"vist2 demo: stopped by {name}; every stage keeps its last checkpoint (the text-only baseline "
              "too); run the same command again to resume", file=sys.stderr, flush=True)
        return 0  # as `vist2 train` after a preemption: saved and resumable
    finally:
        baseline.stop()
        signal.signal(signal.SIGTERM, on_sigterm)
    if results is None or proof is None:  # a stage or the baseline was preempted and saved its step
        return 0
    wall = time.time() - started  # the whole command: every stage, the baseline and the table
    lines = [f"{'stage':<16}{'steps':>6}{'loss first':>12}{'loss last':>11}{'eval start':>12}"
             f"{'eval end':>10}{'wall s':>8}{'text tok/s':>12}"]
    if args.proof:
        results.append((TEXT_ONLY, None, json.loads((workdir / TEXT_ONLY / "summary.json").read_text())))
    for stage, config, summary in results:  # a stage resumed at its last step trained nothing now: nan
        value = {key: nan_if_none(summary.get(key)) for key in ("loss_first", "loss_last", "eval_loss_start",
                                                                  "eval_loss_end", "wall_s", "text_tokens_per_s_median")}
        lines.append(f"{stage:<16}{summary['steps_done']:>6}{value['loss_first']:>12.3f}{value['loss_last']:>11.3f}"
                     f"{value['eval_loss_start']:>12.3f}{value['eval_loss_end']:>10.3f}"
                     f"{value['wall_s']:>8.1f}{value['text_tokens_per_s_median']:>12.0f}")
    if args.proof:
        lines.append(f"({TEXT_ONLY} trained beside stages 0b-4: their wall s and tok/s are those of two processes "
                     "sharing the machine)")
    # from the metrics, not the summary: a stage resumed at its last step evaluated nothing now
    olm_evals = [json.loads(line).get("eval_loss") for line in
                 (workdir / "stage3_olm" / "metrics.jsonl").read_text().splitlines()]
    olm_evals = [loss for loss in olm_evals if loss is not None] or [float("nan")]
    ratio = olm_evals[-1] / olm_evals[0]
    lines.append(f"stage 3 validation loss: start {olm_evals[0]:.3f} -> end {olm_evals[-1]:.3f} (x{ratio:.3f})")
    figures = _eval_figures(workdir)
    lines += _eval_lines(figures)
    lines += proof
    lines.append(f"demo wall time: {wall:.0f} s; outputs in {workdir} (loss_curve.png, sketch_*.png, "
                 "ocr_reconstruction.png, stage*/metrics.jsonl, stage*/tensorboard, stage*/checkpoints)")
    report = "\n".join(lines)
    print(report)
    (workdir / "summary.txt").write_text(report + "\n")
    (workdir / "summary.json").write_text(json.dumps(
        {"wall_s": wall, "stages": {s: summary for s, _, summary in results}, "stage3_eval_ratio": ratio,
         "evaluation": figures}, indent=2))
    return 0


def _train_stages(args, recipes: Path, workdir: Path, tokenizer, baseline: "_Baseline") -> list | None:
    """Each stage from the previous one's parameters; writes the loss-curve PNG. None: a stage
    was preempted (it saved its step; later stages must not start from a half-trained one)."""
    from vist2_jax.config import load_config
    from vist2_jax.plotting import line_chart
    from vist2_jax.training.trainer import train

    previous, results = None, []
    for stage in STAGES:
        recipe = recipes / f"{stage}.yaml"
        overrides = _stage_overrides(args, recipe, workdir / stage, tokenizer, previous)
        config = load_config(recipe, overrides)
        print(f"== {stage}: {config.train.steps} steps, trainable {', '.join(config.train.trainable)}",
              file=sys.stderr, flush=True)
        result = train(config)
        if result.preempted:
            _say_stopped(stage, result.steps_done)
            return None
        baseline.check()  # a failed baseline is reported now, not after the last stage
        results.append((stage, config, result.summary))
        previous = workdir / stage
        if args.proof and stage == STAGES[0]:
            baseline.start(args, recipes, tokenizer)
        if stage == "stage3_olm":
            _copy_sketches(workdir / stage, workdir)
        if stage == "stage2_ocr":
            from vist2_jax.evaluation.context import load_context
            from vist2_jax.evaluation.figures import reconstruction_png
            reconstruction_png(load_context(workdir / stage), workdir / "ocr_reconstruction.png")

    series = {}
    for stage, _, _ in results:
        records = [json.loads(line) for line in (workdir / stage / "metrics.jsonl").read_text().splitlines()]
        offset = sum(c.train.steps for s, c, _ in results[:[r[0] for r in results].index(stage)])
        series[stage] = [(offset + r["step"], r["loss"]) for r in records if "loss" in r]
    line_chart(series, workdir / "loss_curve.png", "VIST2 demo: training loss per stage", "step", "nats/token")
    return results


def _stage_overrides(args, recipe: Path, run_dir: Path, tokenizer, init_from: Path | None) -> list[str]:
    """The command line's overrides, the steps scaled, the run folder, the shared tokenizer and
    the parameters to start from: the same for every stage and for the baseline."""
    from vist2_jax.config import load_config

    overrides = [*args.overrides, *_scaled(load_config(recipe, args.overrides), args.steps_scale),
                 f"run.workdir={run_dir}", f"data.tokenizer={tokenizer.path}"]
    return overrides + ([f"train.init_from={init_from}"] if init_from is not None else [])


def _say_stopped(run: str, step: int) -> None:
    print(f"vist2 demo: {run} stopped at step {step} (checkpoint saved); run the same command again to resume",
          file=sys.stderr, flush=True)


def nan_if_none(value) -> float:
    return float("nan") if value is None else float(value)


class _Stopped(Exception):
    """SIGTERM where no stage's step loop handles it (its argument: the signal's name)."""


def _raise_stopped(signum, frame):
    raise _Stopped(signal.Signals(signum).name)


class _Baseline:
    """``--proof``: the text-only baseline (from the same stage-0a LM, on the same text, with the
    steps the VIST2 decoder took after it) in its own ``vist2 train`` process beside stages
    0b-4: it shares nothing with them but stage 0a. Two processes on a 2-core CPU train ~1.25x
    more steps per second together than one alone (the data workers and the step leave cores
    idle), so the proof's hour holds without fewer steps. Output: ``WORKDIR/text_only.log``."""

    # a child that saw these would set up a multi-process run of its own
    DISTRIBUTED_ENV = ("VIST2_COORDINATOR", "SLURM_NTASKS", "TPU_WORKER_HOSTNAMES")

    def __init__(self, workdir: Path):
        self.workdir, self.log_path, self.process = workdir, workdir / f"{TEXT_ONLY}.log", None

    def start(self, args, recipes: Path, tokenizer) -> None:
        from vist2_jax.config import load_config

        recipe = recipes / f"{TEXT_ONLY}.yaml"
        overrides = _stage_overrides(args, recipe, self.workdir / TEXT_ONLY, tokenizer, self.workdir / STAGES[0])
        steps = load_config(recipe, overrides).train.steps  # a bad override fails here, not in the log
        env = {k: v for k, v in os.environ.items() if k not in self.DISTRIBUTED_ENV}
        # on one GPU the stages' process holds most of its memory: the baseline takes what it uses
        env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "vist2_jax.cli.main", "train", str(recipe), *overrides],
                stdout=log, stderr=subprocess.STDOUT, env=env)
        print(f"== {TEXT_ONLY}: {steps} steps, the native-LM baseline, beside the next stages "
              f"(log: {self.log_path})", file=sys.stderr, flush=True)

    def check(self) -> None:
        """Raise if the baseline has exited with an error."""
        if self.process is not None and self.process.poll() not in (None, 0):
            lines = self.log_path.read_text(errors="replace").strip().splitlines() or ["(empty)"]
            from vist2_jax.cli.errors import UsageError
            raise UsageError(f"the text-only baseline exited with code {self.process.returncode}; the last line "
                             f"of {self.log_path}: {lines[-1]}")

    def wait(self) -> dict | None:
        """Its summary once it ends; None if it was stopped (it saved its step)."""
        self.process.wait()
        self.check()
        summary = json.loads((self.workdir / TEXT_ONLY / "summary.json").read_text())
        if summary["preempted"]:
            _say_stopped(TEXT_ONLY, summary["steps_done"])
            return None
        return summary

    def stop(self) -> None:
        """SIGTERM it if it still runs (it saves its step, as `vist2 train` does) and wait, deaf to
        a second Ctrl-C or SIGTERM meanwhile: the parent must not exit while the baseline saves."""
        if self.process is None or self.process.poll() is not None:
            return
        previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=600)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def _proof_table(workdir: Path, summary: dict | None) -> list[str] | None:
    """The compression table of stage 3 against the finished baseline (its summary; None: the
    baseline was stopped, and so is the table)."""
    from vist2_jax.evaluation.compression import compression_table, table_lines, write_table
    from vist2_jax.evaluation.context import load_context

    if summary is None:
        return None
    # the baseline at its lowest held-out loss (train.keep_best: it overfits a small corpus),
    # VIST2 at its last step: any selection here favours the baseline
    best = summary.get("best_eval_step")
    native_run = workdir / TEXT_ONLY / "checkpoints" / str(best) if best else workdir / TEXT_ONLY
    vist2, native = load_context(workdir / "stage3_olm"), load_context(native_run)
    limit = vist2.config.train.eval_task_limit
    table = compression_table(vist2, native, chunks=limit, documents=limit)
    write_table(table, workdir, {"vist2_run": str(workdir / "stage3_olm"), "vist2_step": vist2.step,
                                 "text_only_run": str(native_run), "text_only_step": native.step,
                                 "text_only_steps_done": summary["steps_done"],
                                 "text_only_wall_s": summary["wall_s"],
                                 "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())})
    return [f"compression table (stage 3 at step {vist2.step} vs the text-only model at step {native.step} of "
            f"{summary['steps_done']}, its lowest held-out loss; nats/token; compression.json/.png):",
            *table_lines(table)]


def _eval_figures(workdir: Path) -> dict:
    """First and last ``eval_*`` task figures of each stage's metrics.jsonl."""
    figures = {}
    for stage in STAGES:
        records = [json.loads(line) for line in (workdir / stage / "metrics.jsonl").read_text().splitlines()]
        evaluated = [r for r in records if any(k.startswith(("eval_ocr", "eval_memory")) for k in r)]
        if evaluated:
            figures[stage] = {"start": evaluated[0], "end": evaluated[-1]}
    return figures


ROWS = (  # (stage, metric key, label, interval key prefix or None)
    ("stage2_ocr", "eval_ocr_cer", "stage 2 OCR CER, held-out sketches", "eval_ocr_cer"),
    ("stage2_ocr", "eval_ocr_cer_blank_sketch", "stage 2 OCR CER, blank sketches", "eval_ocr_cer_blank_sketch"),
    ("stage2_ocr", "eval_ocr_cer_gap", "stage 2 OCR CER gap (blank-true)", "eval_ocr_cer_gap"),
    ("stage2_ocr", "eval_ocr_exact_match", "stage 2 OCR exact match", None),
    ("stage3_olm", "eval_memory_gain", "stage 3 memory gain (blank-true)", "eval_memory_gain"),
    ("stage3_olm", "eval_memory_gain_foreign", "stage 3 memory gain (foreign-true)", "eval_memory_gain_foreign"),
    ("stage3_olm", "eval_memory_compression_gap", "stage 3 compression gap (true-text)", None),
    ("stage3_olm", "eval_memory_nll_true", "stage 3 loss, true sketches", None),
    ("stage3_olm", "eval_memory_nll_blank", "stage 3 loss, blank sketches", None),
    ("stage3_olm", "eval_memory_nll_foreign", "stage 3 loss, other documents' sketches", None),
    ("stage3_olm", "eval_memory_nll_text", "stage 3 loss, raw text context", None),
    ("stage3_olm", "eval_memory_visual_spread", "stage 3 image-dependent share of V", None),
)


def _eval_lines(figures: dict) -> list[str]:
    """The evaluation table: each figure at the stage's start and end (nats/token for losses)."""
    lines = [f"{'evaluation (train.eval_tasks)':<40}{'start':>9}{'end':>9}  95% CI at end"]
    for stage, key, label, interval in ROWS:
        if key not in figures.get(stage, {}).get("end", {}):
            continue
        first, last = figures[stage]["start"], figures[stage]["end"]
        ci = f"  [{last[interval + '_lo']:+.4f}, {last[interval + '_hi']:+.4f}]" if interval else ""
        lines.append(f"{label:<40}{first[key]:>+9.4f}{last[key]:>+9.4f}{ci}")
    return lines if len(lines) > 1 else []
