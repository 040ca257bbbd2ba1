"""The model card (README.md) written into an export folder: Hub front matter, what the model
is, how it was made, how to load, generate and evaluate it, and the run's evaluation figures
at the exported step."""

from __future__ import annotations

FIGURES = {"eval_ocr_cer": "OCR character error rate (greedy, held-out sketches)",
           "eval_ocr_cer_blank_sketch": "OCR CER from blank sketches (language-prior control)",
           "eval_memory_gain": "memory gain, nats/token (blank - true sketches)",
           "eval_memory_compression_gap": "compression gap, nats/token (true sketches - raw text)",
           "eval_loss": "validation loss"}


def model_card(config: dict, leaf_bytes: dict, figures: dict) -> str:
    """``config``: the folder's config.json; ``leaf_bytes``: stored size per leaf; ``figures``:
    ``eval_*`` metrics at (or before) the exported step, with their ``step``."""
    src, lay, dec = config["source"], config["layout"], config["lm_config"]
    base = [b.rstrip("/") for b in (src.get("init_decoder_hf"), src.get("init_vision_hf")) if b]
    front = ["---", "library_name: transformers", "pipeline_tag: text-generation", "license: other",
             "tags:", "- vist2", "- vision-text-compression", "- custom_code", "- qwen3",
             f"- {config['vision_format']}"]
    if base:
        front += ["base_model:"] + [f"- {b}" for b in base]
    front.append("---")
    total = sum(leaf_bytes.values())
    if figures:
        rows = [f"| {FIGURES.get(k, k)} (`{k}`) | {v:.4f} |" for k, v in figures.items() if k != "step"]
        evaluation = (f"Logged by the run at step {figures['step']} (`metrics.jsonl`):\n\n| metric | value |\n"
                      "|---|---|\n" + "\n".join(rows))
    else:
        evaluation = "The run logged no evaluation metrics up to this step (`train.eval_tasks`)."
    return "\n".join(front) + f"""

# VIST2 model (exported from VIST2-JAX)

A VIST2 vision-text compressed language model (arXiv 2601.10378): text is cut into chunks of
L={lay['text_len']} tokens, each finished chunk is rendered into a {lay['image_size']}x{lay['image_size']}
sketch that a {config['vision_format'].upper()} ViT + `{config['projector']}` aligner turn into m={lay['visual_len']}
visual tokens, and the Qwen3 decoder ({dec['num_hidden_layers']} layers, hidden {dec['hidden_size']}, vocab
{dec['vocab_size']}) predicts each token from the visual tokens of earlier chunks plus the current
chunk's text. In `gcc` generation the KV cache holds only the finished chunks' visual tokens
and the open chunk's text.

## Load and generate

Needs torch, transformers, safetensors, pillow, numpy and the tokenizer's library
(sentencepiece); nothing of VIST2-JAX. The renderer and its font (sha256
`{config['font_sha256']}`) are in this folder.

```python
from transformers import AutoModelForCausalLM, AutoTokenizer, TextStreamer
model = AutoModelForCausalLM.from_pretrained("THIS_FOLDER", trust_remote_code=True)
tok = AutoTokenizer.from_pretrained("THIS_FOLDER", trust_remote_code=True)  # pads on the left
batch = tok(["first prompt ...", "a second, longer prompt ..."], return_tensors="pt", padding=True)
out = model.generate(**batch, max_new_tokens=64)                 # gcc (default), greedy
out = model.generate(**batch, max_new_tokens=64, mode="pcc")     # or "text"; sampling: do_sample=True,
print(tok.batch_decode(out[:, batch["input_ids"].shape[1]:]))    # temperature, top_k, top_p, ...
model(**batch).logits                                            # log-likelihoods under gcc
```

Evaluate with lm-evaluation-harness:
`lm_eval --model hf --model_args pretrained=THIS_FOLDER,trust_remote_code=True --tasks TASK`.

## Evaluation

{evaluation}

## How it was made

- run: `{src['run_dir']}`, checkpoint step {src['step']}
- code: VIST2-JAX git commit `{src['git_commit']}`, exported {src['exported_at']} by `vist2 export`
- weights: {config['dtype']} (stored checkpoint: {total / 2**20:.1f} MiB of parameters)
- started from: {', '.join(f'`{b}`' for b in base) if base else 'random initialisation (no HF weights)'}
"""
