"""PyTorch runtime for a folder written by ``vist2 export``: torch + transformers + pillow +
numpy only (nothing in its import chain imports JAX; a test checks it with JAX blocked).

It renders chunks with the run's saved renderer settings and font, encodes them with the
exported SigLIP(2) tower and aligner, and runs the HF ``Qwen3ForCausalLM`` weights under the
vision-as-memory mask (docs/design.md §3), given as an additive float mask:

* ``forward_rows(batch)``: logits of row-contract batches (packed documents, several chunks),
  through the HF model's own forward with a 4D mask;
* ``generate(prompts, mode)``: ``gcc`` / ``pcc`` / ``text`` generation with a KV cache, the
  same bookkeeping as ``vist2_jax/inference/generate.py`` (chunk markers, positions of the
  equivalent training row, chunks closed by the chunk rule of ``vist2_jax/row_contract.py``),
  the layers run on the HF modules with our own cache so finished chunks' text entries can
  be dropped.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from data_pipelines.render import SketchRenderer, renderer_from_saved
from data_pipelines.tokenizer import load_tokenizer
from vist2_jax.export.torch_mask import Meta, additive, vision_memory_mask
from vist2_jax.export.torch_sampling import SamplingConfig, sample
from vist2_jax.row_contract import TEXT, VISUAL, close_chunk

MODES = ("gcc", "pcc", "text")


def merge_patches(features: torch.Tensor, grid: int, merge: int) -> torch.Tensor:
    """[N, g*g, D] -> [N, (g/merge)^2, merge*merge*D], each merge x merge block row-major."""
    n, _, dim = features.shape
    out = grid // merge
    x = features.reshape(n, out, merge, out, merge, dim).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(n, out * out, merge * merge * dim)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE, rotate-half layout; x [B, H, S, hd], cos/sin [B, S, hd]."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


@dataclasses.dataclass
class Cache:
    """Per-layer keys/values [B, kv_heads, K, head_dim] (post-RoPE) and their metadata."""

    k: list
    v: list
    meta: Meta

    def keep(self, count: int) -> "Cache":
        """The first ``count`` entries (gcc: the visual memory, dropping the chunk's text)."""
        return Cache([t[:, :, :count] for t in self.k], [t[:, :, :count] for t in self.v], self.meta.take(count))


class TorchVist2:
    """An exported VIST2 model. ``load(folder)`` builds it; see the module docstring."""

    def __init__(self, folder: Path, config: dict, lm, vision, aligner: dict, tokenizer,
                 renderer: SketchRenderer):
        self.folder, self.config, self.lm, self.vision = folder, config, lm, vision
        self.aligner, self.tokenizer, self.renderer = aligner, tokenizer, renderer
        layout = config["layout"]
        self.L, self.m = layout["text_len"], layout["visual_len"]
        self.image_size, self.patch, self.merge = layout["image_size"], layout["patch_size"], layout["merge"]
        self.vapv = bool(layout["visual_attends_past_visual"])
        self.chunk_token = int(tokenizer.special_ids["chunk"])
        self.dtype, self.device = next(lm.parameters()).dtype, next(lm.parameters()).device

    @classmethod
    def load(cls, folder: str | Path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
             attn_implementation: str = "sdpa") -> "TorchVist2":
        """Load an export folder; ``dtype`` defaults to the exported weights' dtype."""
        from transformers import Qwen3ForCausalLM, Siglip2VisionModel, SiglipVisionModel

        folder = Path(folder)
        config = json.loads((folder / "vist2_config.json").read_text())
        if config.get("format") != "vist2-torch":
            raise ValueError(f"{folder}: not a vist2 export (vist2_config.json format {config.get('format')!r})")
        dtype = dtype or getattr(torch, config["dtype"])
        lm = Qwen3ForCausalLM.from_pretrained(folder / config["decoder"]["folder"], dtype=dtype,
                                              attn_implementation=attn_implementation).eval()
        vision_cls = Siglip2VisionModel if config["vision"]["format"] == "siglip2" else SiglipVisionModel
        vision = vision_cls.from_pretrained(folder / config["vision"]["folder"], dtype=dtype,
                                            attn_implementation=attn_implementation).eval()
        aligner = {k: v.to(device, dtype) for k, v in load_file(folder / config["aligner"]["file"]).items()}
        tokenizer = load_tokenizer(folder / config["tokenizer"]["file"])
        renderer = renderer_from_saved(json.loads((folder / config["renderer"]["config"]).read_text()),
                                       str(folder / config["renderer"]["font"]))
        lm.requires_grad_(False).to(device)
        vision.requires_grad_(False).to(device)
        return cls(folder, config, lm, vision, aligner, tokenizer, renderer)

    # ---- text <-> ids <-> sketches ------------------------------------------------------
    def detokenize(self, ids: Sequence[int]) -> str:
        """Text of ids; ids past the tokenizer (a padded model vocab) are dropped, as in the CLI."""
        vocab = self.tokenizer.vocab_size
        return self.tokenizer.decode([int(t) for t in ids if t < vocab])

    def try_render(self, ids: Sequence[int]) -> np.ndarray | None:
        """The sketch of ``ids``, or None when the renderer rejects it (does not fit)."""
        return self.renderer.try_render(self.detokenize(ids))

    # ---- encoders -------------------------------------------------------------------------
    @torch.no_grad()
    def encode_images(self, images: np.ndarray) -> torch.Tensor:
        """uint8 [N, H, W, 3] sketches -> visual tokens [N, m, D]."""
        x = torch.as_tensor(np.asarray(images), device=self.device).to(torch.float32) / 127.5 - 1.0
        n, grid = x.shape[0], self.image_size // self.patch
        x = x.to(self.dtype)
        if self.config["vision"]["format"] == "siglip2":
            p = self.patch
            patches = x.reshape(n, grid, p, grid, p, 3).permute(0, 1, 3, 2, 4, 5).reshape(n, grid * grid, -1)
            valid = torch.ones(n, grid * grid, dtype=torch.long, device=self.device)  # NaFlex: all patches real
            shapes = torch.tensor([[grid, grid]] * n, device=self.device)
            feats = self.vision(pixel_values=patches, pixel_attention_mask=valid,
                                spatial_shapes=shapes).last_hidden_state
        else:
            feats = self.vision(pixel_values=x.permute(0, 3, 1, 2)).last_hidden_state
        h, a = merge_patches(feats, grid, self.merge), self.aligner
        if self.config["aligner"]["projector"] == "tanh":
            return torch.tanh(F.linear(h, a["proj.weight"], a["proj.bias"]))
        h = F.gelu(F.linear(h, a["fc1.weight"], a["fc1.bias"]))
        return F.linear(h, a["fc2.weight"], a["fc2.bias"])

    def _embed(self, tokens: torch.Tensor, modality: torch.Tensor, visual: torch.Tensor | None):
        x = self.lm.model.embed_tokens(tokens)
        x = torch.where((modality == TEXT)[..., None], x, torch.zeros((), dtype=x.dtype, device=x.device))
        if visual is not None:
            x = torch.where((modality == VISUAL)[..., None], visual.to(x.dtype), x)
        return x

    # ---- full rows (training layout) -------------------------------------------------------
    @torch.no_grad()
    def forward_rows(self, batch) -> torch.Tensor:
        """fp32 logits [B, S, V] of row-contract rows (``tokens``, ``modality``, ``chunk_id``,
        ``segment_id``, ``positions``, ``images``), the k-th visual span of a row reading its
        k-th image; the HF model's forward with the mask as a 4D additive float mask."""
        meta = Meta.from_batch(batch, self.device)
        tokens = torch.as_tensor(np.asarray(batch["tokens"]), dtype=torch.long, device=self.device)
        images = np.asarray(batch["images"])
        visual = None
        if images.shape[1]:
            b, n = images.shape[:2]
            flat = self.encode_images(images.reshape(b * n, *images.shape[2:])).reshape(b, n * self.m, -1)
            is_visual = meta.modality == VISUAL
            ordinal = (torch.cumsum(is_visual.long(), dim=1) - 1).clamp(0, n * self.m - 1)
            visual = torch.gather(flat, 1, ordinal[..., None].expand(-1, -1, flat.shape[-1]))
        x = self._embed(tokens, meta.modality, visual)
        mask = additive(vision_memory_mask(meta, meta, self.vapv, self_attention=True), x.dtype)
        out = self.lm(inputs_embeds=x, attention_mask=mask, position_ids=meta.position)
        return out.logits.float().cpu()

    # ---- cached decoding ----------------------------------------------------------------
    def empty_cache(self) -> Cache:
        empty = torch.zeros(1, 0, dtype=torch.long, device=self.device)
        return Cache([], [], Meta(empty, empty, empty, empty))

    @torch.no_grad()
    def extend(self, x: torch.Tensor, meta: Meta, cache: Cache) -> tuple[torch.Tensor, Cache]:
        """New entries ``x`` [1, S, D] attend over the cache plus themselves under the mask;
        returns (final hidden [1, S, D], the cache with the entries appended)."""
        model = self.lm.model
        cos, sin = model.rotary_emb(x, meta.position)
        kv_meta = cache.meta.cat(meta)
        mask = additive(vision_memory_mask(meta, kv_meta, self.vapv), x.dtype)
        keys, values = [], []
        for i, layer in enumerate(model.layers):
            attn, (b, s, _) = layer.self_attn, x.shape
            h = layer.input_layernorm(x)
            q = attn.q_norm(attn.q_proj(h).view(b, s, -1, attn.head_dim)).transpose(1, 2)
            k = attn.k_norm(attn.k_proj(h).view(b, s, -1, attn.head_dim)).transpose(1, 2)
            v = attn.v_proj(h).view(b, s, -1, attn.head_dim).transpose(1, 2)
            q, k = rotate(q, cos, sin), rotate(k, cos, sin)
            if cache.k:
                k, v = torch.cat([cache.k[i], k], dim=2), torch.cat([cache.v[i], v], dim=2)
            keys.append(k)
            values.append(v)
            groups = q.shape[1] // k.shape[1]
            out = F.scaled_dot_product_attention(q, k.repeat_interleave(groups, 1),
                                                 v.repeat_interleave(groups, 1), attn_mask=mask)
            x = x + attn.o_proj(out.transpose(1, 2).reshape(b, s, -1))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return model.norm(x), Cache(keys, values, kv_meta)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm.lm_head(hidden).float()

    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[int]], mode: str = "gcc", max_new_tokens: int = 256, *,
                 sampling: SamplingConfig = SamplingConfig(), seed: int = 0,
                 forced_tokens: Sequence[Sequence[int]] | None = None, record_logits: bool = False,
                 on_token: Callable[[int, int], None] | None = None):
        """New token ids per prompt (up to ``max_new_tokens``, ending at a stop token).
        ``forced_tokens`` [B][M] replaces the sampled tokens (teacher forcing); with
        ``record_logits`` returns (tokens, per prompt fp32 logits [steps, V])."""
        if mode not in MODES:
            raise ValueError(f"mode {mode!r}; choose one of {', '.join(MODES)}")
        if max_new_tokens < 1 or not prompts or min(len(p) for p in prompts) < 1:
            raise ValueError("need at least one non-empty prompt and max_new_tokens >= 1")
        results = [self._generate_one(list(p), mode, max_new_tokens, sampling, seed, record_logits,
                                      None if forced_tokens is None else list(forced_tokens[b]),
                                      (lambda tok, b=b: on_token(b, tok)) if on_token else None)
                   for b, p in enumerate(prompts)]
        tokens = [r[0] for r in results]
        return (tokens, [np.stack(r[1]) for r in results]) if record_logits else tokens

    def _prefill(self, prompt: list[int], mode: str):
        """Prefill a prompt; returns (last logits, cache, state of the open chunk). Prompt chunks
        close by the chunk rule: at L tokens, or before the token that would not fit the sketch."""
        L, m = self.L, self.m
        if mode == "text":
            n = len(prompt)
            meta = Meta.of([TEXT] * n, [0] * n, range(n), device=self.device)
            x = self._embed(torch.tensor([prompt], device=self.device), meta.modality, None)
            hidden, cache = self.extend(x, meta, self.empty_cache())
            return self.logits(hidden[:, -1])[0], cache, dict(chunk=0, tokens=list(prompt), pos=n, marker=0,
                                                               image=None)
        modality, chunk_ids, position, images = [], [], [], []
        start, marker, chunk, open_image = 0, 0, 0, None
        while start < len(prompt):
            k, image = close_chunk(prompt[start:start + L], self.try_render)
            if k == len(prompt) - start < L:  # the rest fits a sketch: it stays the open chunk's text
                open_image = image
                break
            chunk += 1
            visual_start = marker + 1 + k
            modality += [VISUAL] * m
            chunk_ids += [chunk] * m
            position += [visual_start + i for i in range(m)]
            images.append(image)
            start, marker = start + k, visual_start + m
        rest = prompt[start:]
        text = [self.chunk_token] + rest
        modality += [TEXT] * len(text)
        chunk_ids += [chunk + 1] * len(text)
        position += [marker + i for i in range(len(text))]
        meta = Meta.of(modality, chunk_ids, position, device=self.device)
        visual = None
        if images:
            k = len(images)
            visual = torch.cat([self.encode_images(np.stack(images)).reshape(1, k * m, -1),
                                torch.zeros(1, len(text), self.lm.config.hidden_size, dtype=self.dtype,
                                            device=self.device)], dim=1)
        tokens = torch.tensor([[0] * (len(images) * m) + text], device=self.device)
        hidden, cache = self.extend(self._embed(tokens, meta.modality, visual), meta, self.empty_cache())
        state = dict(chunk=chunk + 1, tokens=list(rest), pos=marker + len(text), marker=marker, image=open_image)
        return self.logits(hidden[:, -1])[0], cache, state

    def _compress(self, cache: Cache, state: dict) -> Cache:
        """Close the open chunk: drop its text, append the m visual entries of its sketch."""
        m = self.m
        cache = cache.keep(int((cache.meta.modality == VISUAL).sum()))
        image = state["image"] if state["image"] is not None else close_chunk(state["tokens"], self.try_render)[1]
        visual_start = state["marker"] + 1 + len(state["tokens"])
        visual = self.encode_images(image[None])
        meta = Meta.of([VISUAL] * m, [state["chunk"]] * m, [visual_start + i for i in range(m)],
                       device=self.device)
        x = self._embed(torch.zeros(1, m, dtype=torch.long, device=self.device), meta.modality, visual)
        state.update(chunk=state["chunk"] + 1, tokens=[], marker=visual_start + m, pos=visual_start + m, image=None)
        return self.extend(x, meta, cache)[1]

    def _generate_one(self, prompt, mode, max_new, sampling, seed, record, forced, on_token):
        logits, cache, state = self._prefill(prompt, mode)
        history, generated, recorded = list(prompt), [], []
        generator = torch.Generator().manual_seed(seed)
        next_tok = sample(logits, history, sampling, generator)
        while True:
            tok = next_tok if forced is None else int(forced[len(generated)])
            stops = (tok in sampling.stop_tokens and forced is None) or len(generated) + 1 == max_new
            close = False
            if mode == "gcc" and not stops and state["tokens"]:
                image = self.try_render(state["tokens"] + [tok])
                close = image is None  # the chunk closes before this token, which is predicted again
                state["image"] = state["image"] if close else image
            if not close:
                generated.append(tok)
                history.append(tok)
                if record:
                    recorded.append(logits.cpu().numpy())
                if on_token is not None:
                    on_token(tok)
                if stops:
                    break
                state["tokens"].append(tok)
                close = mode == "gcc" and len(state["tokens"]) == self.L
            feed = tok
            if close:
                cache = self._compress(cache, state)
                feed = self.chunk_token
            meta = Meta.of([TEXT], [state["chunk"]], [state["pos"]], device=self.device)
            feed_ids = torch.tensor([[feed]], device=self.device)
            hidden, cache = self.extend(self._embed(feed_ids, meta.modality, None), meta, cache)
            state["pos"] += 1
            logits = self.logits(hidden[:, -1])[0]
            next_tok = sample(logits, history, sampling, generator)
        return generated, recorded
