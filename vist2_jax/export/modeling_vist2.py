"""The PyTorch VIST2 model: ``Vist2ForCausalLM``, a ``transformers`` model that
``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`` loads from a folder
written by ``vist2 export`` (this file is copied there). torch + transformers + pillow + numpy
and the tokenizer's library only: nothing in its import chain imports JAX or needs this
project installed (a test checks both).

It renders chunks with the run's saved renderer settings and font (files in the folder),
encodes them with the SigLIP(2) tower and aligner, and runs the Qwen3 decoder layers under
the vision-as-memory mask (docs/design.md §3) with its own per-row KV cache, so a finished
chunk's text entries can be dropped and its visual entries appended:

* ``model(input_ids, attention_mask)``: logits under gcc semantics (``mode="text"``: plain
  causal); each row is cut into chunks by the chunk rule, earlier chunks rendered, and
  ``logits[:, i]`` predicts token ``i + 1`` exactly as in a training row (the first token of a
  chunk is predicted by that chunk's marker, which reads the earlier chunks' sketches);
* ``model.generate(...)``: transformers' ``generate`` with its logits processors, stopping
  criteria and streamers; the decoding loop (``_sample``) keeps, per row, the bookkeeping of
  ``vist2_jax/inference/generate.py``: ``gcc`` (default; ``mode=`` keyword or generation
  config) closes chunks by the chunk rule of ``vist2_jax/row_contract.py`` (at L tokens, or
  before a token the sketch cannot take, which the next chunk's marker predicts again),
  ``pcc`` compresses the prompt only, ``text`` is a plain LM; rows of a left-padded batch
  close their chunks independently;
* ``forward_rows(batch)``: logits of row-contract batches (packed documents), for parity tests.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import (GenerationMixin, PreTrainedModel, Qwen3Config, Qwen3ForCausalLM, Siglip2VisionConfig,
                          Siglip2VisionModel, SiglipVisionConfig, SiglipVisionModel)
from transformers.generation.utils import GenerateDecoderOnlyOutput
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.utils import cached_file

from data_pipelines.render import renderer_from_saved
from data_pipelines.tokenizer import load_tokenizer
from vist2_jax.export.configuration_vist2 import MODES, Vist2Config
from vist2_jax.export.torch_mask import Meta, additive, vision_memory_mask
from vist2_jax.row_contract import PAD, TEXT, VISUAL, close_chunk


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
    """Per-layer keys/values [B, kv_heads, K, head_dim] (post-RoPE) and their metadata; rows of
    a batch hold different entries, padded with PAD entries nothing attends to."""

    k: list
    v: list
    meta: Meta

    def row(self, b: int, keep: int | None = None) -> "Cache":
        """Row ``b`` alone (batch 1) without its padding; ``keep=VISUAL``: its visual entries only."""
        live = self.meta.modality[b] != PAD if keep is None else self.meta.modality[b] == keep
        idx = live.nonzero()[:, 0]
        return Cache([t[b:b + 1, :, idx] for t in self.k], [t[b:b + 1, :, idx] for t in self.v],
                     Meta(*(a[b:b + 1, idx] for a in self.meta)))

    @staticmethod
    def stack(rows: Sequence["Cache"]) -> "Cache":
        """Batch-1 caches -> one batch, each row padded at its end to the longest."""
        size = max(r.meta.modality.shape[1] for r in rows)

        def pad(t, dim):
            extra = size - t.shape[dim]
            if not extra:
                return t
            shape = list(t.shape)
            shape[dim] = extra
            return torch.cat([t, t.new_zeros(shape)], dim=dim)

        k = [torch.cat([pad(r.k[i], 2) for r in rows]) for i in range(len(rows[0].k))]
        v = [torch.cat([pad(r.v[i], 2) for r in rows]) for i in range(len(rows[0].v))]
        return Cache(k, v, Meta(*(torch.cat([pad(r.meta[j], 1) for r in rows]) for j in range(4))))


class Aligner(nn.Module):
    """merge x merge patch merge, then ``mlp`` (fc1, GELU, fc2) or the paper's ``tanh`` (proj)."""

    def __init__(self, projector: str, in_dim: int, hidden: int):
        super().__init__()
        self.projector = projector
        if projector == "tanh":
            self.proj = nn.Linear(in_dim, hidden)
        else:
            self.fc1, self.fc2 = nn.Linear(in_dim, hidden), nn.Linear(hidden, hidden)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.projector == "tanh":
            return torch.tanh(self.proj(h))
        return self.fc2(F.gelu(self.fc1(h)))


def _padded_positions(positions: list[int], size: int) -> list[int]:
    """A row's positions, continued one by one over its padding (which attends only to itself)."""
    start = positions[-1] + 1 if positions else 0
    return positions + list(range(start, start + size - len(positions)))


class Vist2ForCausalLM(PreTrainedModel, GenerationMixin):
    """An exported VIST2 model; see the module docstring."""

    config_class = Vist2Config
    base_model_prefix = "vist2"
    main_input_name = "input_ids"
    _no_split_modules = ["Qwen3DecoderLayer", "SiglipEncoderLayer", "Siglip2EncoderLayer"]
    _supports_sdpa = True

    def __init__(self, config: Vist2Config):
        super().__init__(config)
        layout = config.layout
        self.L, self.m = layout["text_len"], layout["visual_len"]
        self.stride = layout.get("visual_stride", 1)  # positions per visual token
        self.image_size, self.patch, self.merge = layout["image_size"], layout["patch_size"], layout["merge"]
        self.vapv = bool(layout["visual_attends_past_visual"])
        self.language_model = Qwen3ForCausalLM(Qwen3Config(**config.lm_config))
        siglip2 = config.vision_format == "siglip2"
        vision_config = (Siglip2VisionConfig if siglip2 else SiglipVisionConfig)(**config.vit_config)
        self.vision_model = (Siglip2VisionModel if siglip2 else SiglipVisionModel)(vision_config)
        self.aligner = Aligner(config.projector, vision_config.hidden_size * self.merge ** 2,
                               config.lm_config["hidden_size"])
        self.chunk_token = int(config.special_ids["chunk"])
        self._files = None
        self.post_init()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # generation keeps its own per-row cache (see ``_sample``)

    # ---- the run's tokenizer and renderer (files in the folder) ----------------------------
    def _load_files(self):
        if self._files is None:
            def path(name):
                return cached_file(self.config.name_or_path, name)

            saved = json.loads(Path(path(self.config.renderer_file)).read_text())
            font = path(self.config.font_file)  # checked against the recorded sha256 by the renderer
            self._files = (load_tokenizer(path(self.config.tokenizer_file)), renderer_from_saved(saved, font))
        return self._files

    @property
    def tokenizer(self):
        """The run's tokenizer (``data_pipelines/tokenizer.py`` interface)."""
        return self._load_files()[0]

    @property
    def renderer(self):
        """The run's sketch renderer (font sha256-checked)."""
        return self._load_files()[1]

    @renderer.setter
    def renderer(self, renderer):
        self._files = (self.tokenizer, renderer)

    def detokenize(self, ids: Sequence[int]) -> str:
        """Text of ids; ids past the tokenizer (a padded model vocab) are dropped, as in the CLI."""
        vocab = self.tokenizer.vocab_size
        return self.tokenizer.decode([int(t) for t in ids if t < vocab])

    def try_render(self, ids: Sequence[int]) -> np.ndarray | None:
        """The sketch of ``ids``, or None when the renderer rejects it (does not fit)."""
        return self.renderer.try_render(self.renderer.sketch_text(ids, self.detokenize))

    # ---- encoders -------------------------------------------------------------------------
    @torch.no_grad()
    def encode_images(self, images: np.ndarray) -> torch.Tensor:
        """uint8 [N, H, W, 3] sketches -> visual tokens [N, m, D]."""
        x = torch.as_tensor(np.asarray(images), device=self.device).to(torch.float32) / 127.5 - 1.0
        n, grid = x.shape[0], self.image_size // self.patch
        x = x.to(self.dtype)
        if self.config.vision_format == "siglip2":
            p = self.patch
            patches = x.reshape(n, grid, p, grid, p, 3).permute(0, 1, 3, 2, 4, 5).reshape(n, grid * grid, -1)
            valid = torch.ones(n, grid * grid, dtype=torch.long, device=self.device)  # NaFlex: all patches real
            shapes = torch.tensor([[grid, grid]] * n, device=self.device)
            feats = self.vision_model(pixel_values=patches, pixel_attention_mask=valid,
                                      spatial_shapes=shapes).last_hidden_state
        else:
            feats = self.vision_model(pixel_values=x.permute(0, 3, 1, 2)).last_hidden_state
        return self.aligner(merge_patches(feats, grid, self.merge))

    def _embed(self, tokens: torch.Tensor, modality: torch.Tensor, visual: torch.Tensor | None):
        x = self.language_model.model.embed_tokens(tokens)
        x = torch.where((modality == TEXT)[..., None], x, torch.zeros((), dtype=x.dtype, device=x.device))
        if visual is not None:
            x = torch.where((modality == VISUAL)[..., None], visual.to(x.dtype), x)
        return x

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.language_model.lm_head(hidden).float()

    # ---- the decoder under the mask, with a cache ------------------------------------------
    @torch.no_grad()
    def extend(self, x: torch.Tensor, meta: Meta, cache: Cache | None = None) -> tuple[torch.Tensor, Cache]:
        """New entries ``x`` [B, S, D] attend over the cache plus themselves under the mask;
        returns (final hidden [B, S, D], the cache with the entries appended). Without a cache,
        padding entries attend to themselves (a full row)."""
        model = self.language_model.model
        cos, sin = model.rotary_emb(x, meta.position)
        kv_meta = meta if cache is None else cache.meta.cat(meta)
        mask = additive(vision_memory_mask(meta, kv_meta, self.vapv, self_attention=cache is None), x.dtype)
        keys, values = [], []
        for i, layer in enumerate(model.layers):
            attn, (b, s, _) = layer.self_attn, x.shape
            h = layer.input_layernorm(x)
            q = attn.q_norm(attn.q_proj(h).view(b, s, -1, attn.head_dim)).transpose(1, 2)
            k = attn.k_norm(attn.k_proj(h).view(b, s, -1, attn.head_dim)).transpose(1, 2)
            v = attn.v_proj(h).view(b, s, -1, attn.head_dim).transpose(1, 2)
            q, k = rotate(q, cos, sin), rotate(k, cos, sin)
            if cache is not None:
                k, v = torch.cat([cache.k[i], k], dim=2), torch.cat([cache.v[i], v], dim=2)
            keys.append(k)
            values.append(v)
            groups = q.shape[1] // k.shape[1]
            out = F.scaled_dot_product_attention(q, k.repeat_interleave(groups, 1),
                                                 v.repeat_interleave(groups, 1), attn_mask=mask)
            x = x + attn.o_proj(out.transpose(1, 2).reshape(b, s, -1))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return model.norm(x), Cache(keys, values, kv_meta)

    # ---- full rows (training layout) -------------------------------------------------------
    @torch.no_grad()
    def forward_rows(self, batch) -> torch.Tensor:
        """fp32 logits [B, S, V] of row-contract rows (``tokens``, ``modality``, ``chunk_id``,
        ``segment_id``, ``positions``, ``images``), the k-th visual span of a row reading its
        k-th image."""
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
        hidden, _ = self.extend(self._embed(tokens, meta.modality, visual), meta)
        return self._logits(hidden).cpu()

    def _chunks(self, ids: list[int]) -> tuple[list[tuple[list[int], np.ndarray]], list[int], np.ndarray | None]:
        """The chunk rule over a text: (closed chunks with their sketches, the open chunk's
        tokens, its sketch). The open chunk is the rest when it fits a sketch and has < L tokens."""
        closed, start = [], 0
        while start < len(ids):
            k, image = close_chunk(ids[start:start + self.L], self.try_render)
            if k == len(ids) - start < self.L:
                return closed, ids[start:], image
            closed.append((ids[start:start + k], image))
            start += k
        return closed, [], None

    def _row(self, ids: list[int], mode: str) -> tuple[dict, list[int]]:
        """The training row of a text (marker, text, then the sketch's m visual entries per
        closed chunk; marker and text of the open one) and, for each token i of ``ids`` and
        one more, the row position whose output predicts it."""
        if mode == "text":
            n = len(ids)
            return dict(tokens=list(ids), modality=[TEXT] * n, chunk_id=[0] * n, positions=list(range(n)),
                        images=[]), [0, *range(n)]
        closed, rest, _ = self._chunks(ids)
        row = dict(tokens=[], modality=[], chunk_id=[], positions=[], images=[])
        predictors, position = [], 0
        for c, (text, image) in enumerate([*closed, (rest, None)], start=1):
            marker = len(row["tokens"])
            predictors += range(marker, marker + len(text) + (image is None))
            row["tokens"] += [self.chunk_token, *text]
            row["modality"] += [TEXT] * (len(text) + 1)
            row["chunk_id"] += [c] * (len(text) + 1)
            row["positions"] += range(position, position + len(text) + 1)
            position += len(text) + 1
            if image is not None:
                row["tokens"] += [0] * self.m
                row["modality"] += [VISUAL] * self.m
                row["chunk_id"] += [c] * self.m
                row["positions"] += range(position, position + self.m * self.stride, self.stride)
                position += self.m * self.stride
                row["images"].append(image)
        return row, predictors

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                mode: str | None = None, return_dict: bool | None = None, **kwargs) -> CausalLMOutputWithPast:
        """Logits [B, S, V] (fp32) of ``input_ids`` (padding where ``attention_mask`` is 0, left
        or right); ``mode``: ``gcc`` (default; ``pcc`` scores the same) or ``text``."""
        mode = mode or "gcc"
        if mode not in MODES:
            raise ValueError(f"mode {mode!r}; choose one of {', '.join(MODES)}")
        ids = input_ids.cpu()
        real = torch.ones_like(ids, dtype=torch.bool) if attention_mask is None else attention_mask.cpu().bool()
        rows, where = [], []
        for b in range(ids.shape[0]):
            cols = real[b].nonzero()[:, 0]
            rows.append(self._row(ids[b, cols].tolist(), mode))
            where.append(cols)
        size = max(len(r["tokens"]) for r, _ in rows)
        slots = max(len(r["images"]) for r, _ in rows)
        empty = np.zeros((self.image_size, self.image_size, 3), np.uint8)
        batch = {name: np.array([r[name] + [0] * (size - len(r[name])) for r, _ in rows])
                 for name in ("tokens", "modality", "chunk_id")}
        batch["segment_id"] = np.where(batch["modality"] == PAD, 2, 1)  # padding: its own segment
        batch["positions"] = np.array([_padded_positions(r["positions"], size) for r, _ in rows])
        batch["images"] = np.array([r["images"] + [empty] * (slots - len(r["images"])) for r, _ in rows]).reshape(
            len(rows), slots, self.image_size, self.image_size, 3)
        row_logits = self.forward_rows(batch)
        logits = torch.zeros(*ids.shape, row_logits.shape[-1], dtype=torch.float32)
        for b, ((_, predictors), cols) in enumerate(zip(rows, where)):
            logits[b, cols] = row_logits[b, predictors[1:]]
        return CausalLMOutputWithPast(logits=logits.to(self.device))

    # ---- cached decoding ----------------------------------------------------------------
    def _prefill(self, prompt: list[int], mode: str):
        """Prefill one prompt; returns (last logits [V], cache (batch 1), the open chunk's state).
        gcc/pcc: the prompt's closed chunks enter the cache as their visual entries only."""
        m = self.m
        if mode == "text":
            n = len(prompt)
            meta = Meta.of([TEXT] * n, [0] * n, range(n), device=self.device)
            hidden, cache = self.extend(self._embed(torch.tensor([prompt], device=self.device), meta.modality, None),
                                        meta, None)
            return self._logits(hidden[:, -1])[0], cache, dict(chunk=0, tokens=list(prompt), pos=n, marker=0,
                                                                image=None)
        closed, rest, open_image = self._chunks(prompt)
        modality, chunk_ids, position, marker = [], [], [], 0
        for c, (text, _) in enumerate(closed, start=1):
            visual_start = marker + 1 + len(text)
            modality += [VISUAL] * m
            chunk_ids += [c] * m
            position += range(visual_start, visual_start + m * self.stride, self.stride)
            marker = visual_start + m * self.stride
        chunk, text = len(closed), [self.chunk_token, *rest]
        modality += [TEXT] * len(text)
        chunk_ids += [chunk + 1] * len(text)
        position += range(marker, marker + len(text))
        meta = Meta.of(modality, chunk_ids, position, device=self.device)
        visual = None
        if closed:
            encoded = self.encode_images(np.stack([image for _, image in closed])).reshape(1, len(closed) * m, -1)
            visual = torch.cat([encoded, encoded.new_zeros(1, len(text), encoded.shape[-1])], dim=1)
        tokens = torch.tensor([[0] * (len(closed) * m) + text], device=self.device)
        hidden, cache = self.extend(self._embed(tokens, meta.modality, visual), meta, None)
        state = dict(chunk=chunk + 1, tokens=list(rest), pos=marker + len(text), marker=marker, image=open_image)
        return self._logits(hidden[:, -1])[0], cache, state

    def _compress(self, cache: Cache, b: int, state: dict) -> Cache:
        """Close row ``b``'s open chunk: drop its text entries, append the m visual entries of
        its sketch (the row alone, batch 1)."""
        m = self.m
        image = state["image"] if state["image"] is not None else close_chunk(state["tokens"], self.try_render)[1]
        visual_start = state["marker"] + 1 + len(state["tokens"])
        end = visual_start + m * self.stride
        meta = Meta.of([VISUAL] * m, [state["chunk"]] * m, range(visual_start, end, self.stride), device=self.device)
        x = self._embed(torch.zeros(1, m, dtype=torch.long, device=self.device), meta.modality,
                        self.encode_images(image[None]))
        state.update(chunk=state["chunk"] + 1, tokens=[], marker=end, pos=end, image=None)
        return self.extend(x, meta, cache.row(b, keep=VISUAL))[1]

    def _feed(self, cache: Cache, feeds: list[int], states: list[dict]) -> tuple[torch.Tensor, Cache]:
        """One text entry per row (token ``feeds[b]`` at its row's next position); fp32 logits [B, V]."""
        meta = Meta(*(torch.tensor(v, dtype=torch.long, device=self.device)[:, None] for v in (
            [TEXT] * len(feeds), [s["chunk"] for s in states], [1] * len(feeds), [s["pos"] for s in states])))
        ids = torch.tensor(feeds, dtype=torch.long, device=self.device)[:, None]
        hidden, cache = self.extend(self._embed(ids, meta.modality, None), meta, cache)
        return self._logits(hidden[:, -1]), cache

    def _replace_rows(self, cache: Cache, new: dict[int, Cache]) -> Cache:
        return Cache.stack([new[b] if b in new else cache.row(b) for b in range(cache.meta.modality.shape[0])])

    @torch.no_grad()
    def _sample(self, input_ids, logits_processor, stopping_criteria, generation_config, synced_gpus=False,
                streamer=None, **model_kwargs):
        """transformers' greedy / sampling loop with VIST2's per-row chunk bookkeeping: each step
        the logits processors and the sampler pick a token per row; in gcc a token the open
        chunk's sketch cannot take closes that chunk first (its text entries dropped, its visual
        entries appended) and the new chunk's marker predicts the token again; a chunk that
        reaches L tokens closes after it. Stopping criteria, streamers and the returned
        ``GenerateDecoderOnlyOutput`` are transformers'."""
        from transformers.generation.utils import StopCheck

        mode = model_kwargs.get("mode") or getattr(generation_config, "mode", None) or "gcc"
        if mode not in MODES:
            raise ValueError(f"mode {mode!r}; choose one of {', '.join(MODES)}")
        attention_mask = model_kwargs.get("attention_mask")
        pad = generation_config._pad_token_tensor
        pad_id = int(pad) if pad is not None else 0
        eos = generation_config._eos_token_tensor
        stop_ids = set() if eos is None else {int(t) for t in eos.reshape(-1)}
        max_length = generation_config.max_length
        want_scores = generation_config.return_dict_in_generate and generation_config.output_scores
        want_logits = generation_config.return_dict_in_generate and generation_config.output_logits
        scores, raw_logits = (), ()
        has_eos = any(hasattr(c, "eos_token_id") for c in stopping_criteria)

        batch = input_ids.shape[0]
        prompts = [input_ids[b][attention_mask[b].bool()].tolist() if attention_mask is not None
                   else input_ids[b].tolist() for b in range(batch)]
        if min(len(p) for p in prompts) < 1:
            raise ValueError("every prompt needs at least one token")
        prefilled = [self._prefill(p, mode) for p in prompts]
        logits = torch.stack([p[0] for p in prefilled]).to(input_ids.device)
        cache, states = Cache.stack([p[1] for p in prefilled]), [p[2] for p in prefilled]
        unfinished = torch.ones(batch, dtype=torch.long, device=input_ids.device)
        stop_check = StopCheck(streamer)
        while True:
            tokens = torch.zeros(batch, dtype=torch.long, device=input_ids.device)
            step_scores, step_logits = torch.zeros_like(logits), torch.zeros_like(logits)
            todo = list(range(batch))
            while todo:
                processed = logits_processor(input_ids, logits)
                chosen = (torch.multinomial(F.softmax(processed, dim=-1), 1)[:, 0] if generation_config.do_sample
                          else torch.argmax(processed, dim=-1))
                again = []
                for b in todo:
                    tok, state = int(chosen[b]), states[b]
                    tokens[b], step_scores[b], step_logits[b] = tok, processed[b], logits[b]
                    last = tok in stop_ids or input_ids.shape[1] + 1 >= max_length
                    if mode == "gcc" and unfinished[b] and not last and state["tokens"]:
                        image = self.try_render(state["tokens"] + [tok])
                        if image is None:  # the chunk closes before this token, which is predicted again
                            again.append(b)
                        else:
                            state["image"] = image
                if again:  # those rows alone: close, then feed the new chunk's marker
                    sub = Cache.stack([self._compress(cache, b, states[b]) for b in again])
                    fresh, sub = self._feed(sub, [self.chunk_token] * len(again), [states[b] for b in again])
                    cache = self._replace_rows(cache, {b: sub.row(i) for i, b in enumerate(again)})
                    for i, b in enumerate(again):
                        states[b]["pos"] += 1
                        logits[b] = fresh[i]
                todo = again
            if has_eos:
                tokens = tokens * unfinished + pad_id * (1 - unfinished)
            input_ids = torch.cat([input_ids, tokens[:, None]], dim=-1)
            if want_scores:
                scores += (step_scores,)
            if want_logits:
                raw_logits += (step_logits,)
            unfinished = unfinished & ~stopping_criteria(input_ids, step_scores)
            if stop_check(unfinished, tokens, input_ids.shape[1]):
                break
            feeds, closing = [], {}
            for b, state in enumerate(states):
                tok = int(tokens[b])
                if unfinished[b]:
                    state["tokens"].append(tok)
                    if mode == "gcc" and len(state["tokens"]) == self.L:
                        closing[b] = self._compress(cache, b, state)
                        tok = self.chunk_token
                feeds.append(tok)
            if closing:
                cache = self._replace_rows(cache, closing)
            logits, cache = self._feed(cache, feeds, states)
            for b, state in enumerate(states):
                state["pos"] += int(unfinished[b])
            if not unfinished.all():  # a finished row's entry is never read: keep its cache from growing
                cache = self._replace_rows(cache, {b: self._drop_last(cache, b) for b in range(batch)
                                                   if not unfinished[b]})
        if streamer is not None:
            streamer.end()
        if generation_config.return_dict_in_generate:
            return GenerateDecoderOnlyOutput(sequences=input_ids, scores=scores if want_scores else None,
                                             logits=raw_logits if want_logits else None)
        return input_ids

    def _beam_search(self, *args, **kwargs):
        raise NotImplementedError("VIST2 generate supports greedy and sampling (num_beams=1), not beam search")

    @staticmethod
    def _drop_last(cache: Cache, b: int) -> Cache:
        row = cache.row(b)
        return Cache([t[:, :, :-1] for t in row.k], [t[:, :, :-1] for t in row.v], row.meta.take(
            row.meta.modality.shape[1] - 1))
