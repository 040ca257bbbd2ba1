"""``vist2 check``: compile and run one forward+backward of a preset on random OLM rows.

The quickest real end-to-end thing the code does (row packing -> ViT -> aligner ->
decoder under the vision-as-memory mask -> loss -> gradients); it reports compile and
step time so a new machine or install can be checked in seconds.
"""

from __future__ import annotations

import json
import statistics
import time

import numpy as np

from vist2_jax.config import load_config


def register(subparsers) -> None:
    parser = subparsers.add_parser("check", help="one timed forward+backward on random rows (JSON)")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps after compile")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    parser.set_defaults(func=run)


def random_olm_batch(config, seed: int = 0) -> dict[str, np.ndarray]:
    """Rows of random documents, each filling its row with as many chunks as fit."""
    from data_pipelines.rows import pack_olm_row
    from vist2_jax.row_contract import stack_rows
    from data_pipelines.tokenizer import CHUNK_ID

    layout, data = config.model.layout, config.data
    rng = np.random.default_rng(seed)
    per_chunk = 1 + layout.text_len + layout.visual_len
    chunks = max(1, min((data.seq_len + layout.visual_len) // per_chunk, data.images_per_row + 1))
    rows = []
    for _ in range(data.global_batch_size):
        doc = [list(rng.integers(4, config.model.decoder.vocab_size, layout.text_len)) for _ in range(chunks)]
        images = rng.integers(0, 256, (chunks, layout.image_size, layout.image_size, 3), dtype=np.uint8)
        rows.append(pack_olm_row([doc], [list(images)], seq_len=data.seq_len, visual_len=layout.visual_len,
                                 num_image_slots=data.images_per_row,
                                 image_shape=(layout.image_size, layout.image_size), chunk_token=CHUNK_ID))
    return stack_rows(rows)


def run(args) -> int:
    import jax

    from vist2_jax.model.vist2 import Vist2Model

    config = load_config(overrides=args.overrides, preset=args.preset)
    batch = random_olm_batch(config)
    model = Vist2Model(config.model)
    params = jax.jit(model.init)(jax.random.key(config.run.seed), batch)

    def loss_fn(p):
        out = model.apply(p, batch)
        return out["loss"], out

    step = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
    start = time.perf_counter()
    (loss, out), grads = jax.block_until_ready(step(params))
    compile_s = time.perf_counter() - start
    times = []
    for _ in range(max(1, args.repeats)):
        start = time.perf_counter()
        jax.block_until_ready(step(params))
        times.append(time.perf_counter() - start)
    step_s = statistics.median(times)
    grad_norm = float(jax.numpy.sqrt(sum(jax.numpy.sum(g * g) for g in jax.tree_util.tree_leaves(grads))))
    tokens = int(batch["tokens"].size)
    report = {
        "preset": config.preset, "device": str(jax.devices()[0].platform),
        "batch_shape": list(batch["tokens"].shape), "images_shape": list(batch["images"].shape),
        "loss": float(loss), "loss_at_uniform": float(np.log(config.model.decoder.vocab_size)),
        "grad_norm": grad_norm, "target_tokens": int(out["target_tokens"]),
        "compile_plus_first_step_s": round(compile_s, 3), "step_s_median": round(step_s, 4),
        "decoder_tokens_per_s": round(tokens / step_s, 1),
    }
    print(json.dumps(report, indent=2))
    ok = np.isfinite(report["loss"]) and np.isfinite(grad_norm)
    return 0 if ok else 1
