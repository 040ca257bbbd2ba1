"""The README.md written into an export folder: what it is, how it was made, how to load it."""

from __future__ import annotations


def export_readme(vist2: dict, leaf_bytes: dict) -> str:
    """``vist2``: the folder's ``vist2_config.json``; ``leaf_bytes``: stored size per leaf."""
    src, lay, tok, ren = vist2["source"], vist2["layout"], vist2["tokenizer"], vist2["renderer"]
    dec = vist2["model_config"]["decoder"]
    total, merge = sum(leaf_bytes.values()), vist2["aligner"]["merge"]
    projector = vist2["aligner"]["projector"]
    return f"""# VIST2 model exported for PyTorch

A VIST2 vision-text compressed language model (arXiv 2601.10378) trained with VIST2-JAX:
text is cut into chunks of L={lay['text_len']} tokens, each finished chunk is rendered
into a {lay['image_size']}x{lay['image_size']} sketch that a ViT + aligner turn into
m={lay['visual_len']} visual tokens, and the Qwen3 decoder predicts each token from the visual
tokens of earlier chunks plus the current chunk's text (the vision-as-memory mask).

## How it was made

- run: `{src['run_dir']}`, checkpoint step {src['step']}
- code: VIST2-JAX git commit `{src['git_commit']}`, exported {src['exported_at']} by `vist2 export`
- weights: {vist2['dtype']} (stored checkpoint: {total / 2**20:.1f} MiB of parameters);
  decoder {dec['num_layers']} layers, hidden {dec['hidden_size']}, vocab {dec['vocab_size']}

## Files

| path | what |
|---|---|
| `decoder/` | `transformers.Qwen3ForCausalLM` (config.json + safetensors) |
| `vision/` | `transformers.{vist2['vision']['class']}` (no pooling head) |
| `aligner.safetensors` | {merge}x{merge} patch merge, then the `{projector}` projector (torch Linear layout) |
| `vist2_config.json` | layout (L, m, image, patch, merge, visual_attends_past_visual), special ids, provenance |
| `{tok['file']}` | the run's tokenizer ({tok['kind']}); `<|chunk|>` is id {tok['special_ids'].get('chunk')} |
| `renderer.json`, `{ren['font']}` | the run's renderer settings and font (sha256 `{ren['font_sha256']}`) |

## Loading

```python
from vist2_jax.export.torch_vist2 import TorchVist2
model = TorchVist2.load("THIS_FOLDER")                     # torch + transformers + pillow + numpy
ids = model.tokenizer.encode(open("prompt.txt").read())
out = model.generate([ids], mode="gcc", max_new_tokens=128)  # gcc | pcc | text
print(model.detokenize(out[0]))
```

or `vist2 generate --torch THIS_FOLDER --prompt-file prompt.txt --mode gcc`. The decoder alone
is a plain Qwen3: `transformers.Qwen3ForCausalLM.from_pretrained("THIS_FOLDER/decoder")` is the
model in text mode (causal attention, one chunk); VIST2 modes need the vision-as-memory mask
that `torch_vist2` passes to it.
"""
