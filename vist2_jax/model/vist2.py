"""The VIST2 model: text embeddings and sketch-image tokens interleaved in one row,
decoded under the vision-as-memory mask (docs/design.md §2, §3).
"""

from __future__ import annotations

from typing import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from vist2_jax.config.schema import ModelConfig
from vist2_jax.kernels.mask import RowMeta
from vist2_jax.row_contract import (GLYPH_BLANK, GLYPH_CELL, GLYPH_UNKNOWN, IMAGE_FIELDS, ROW_FIELDS, TEXT,
                                    TILE_TOKEN_NONE, TILE_TOKENS, VISUAL)
from vist2_jax.model.decoder import BSE, Qwen3Decoder
from vist2_jax.model.layers import DTYPES, constrain
from vist2_jax.model.loss import blockwise_next_token_loss
from vist2_jax.model.vision import Aligner, GlyphHead, VisionTower


def normalize_pixels(images: jax.Array) -> jax.Array:
    """uint8 [0, 255] -> float in [-1, 1] (SigLIP's mean 0.5, std 0.5)."""
    return images.astype(jnp.float32) / 127.5 - 1.0


def place_visual_tokens(text_embeddings: jax.Array, visual_tokens: jax.Array,
                        modality: jax.Array) -> jax.Array:
    """Write image k's m tokens into the k-th visual span of each row.

    text_embeddings: [B, S, D]; visual_tokens: [B, N, m, D]; modality: [B, S].
    The j-th visual position of a row (counting along the row) takes flat token j of
    ``visual_tokens[b].reshape(N*m, D)``, which is token j % m of image j // m because
    every visual span is exactly m long (row contract). Positions past N*m visual tokens
    cannot occur in a valid row; they are clamped rather than read out of bounds.
    """
    batch, num_images, m, dim = visual_tokens.shape
    is_visual = modality == VISUAL
    ordinal = jnp.cumsum(is_visual.astype(jnp.int32), axis=1) - 1
    index = jnp.clip(ordinal, 0, num_images * m - 1)
    flat = visual_tokens.reshape(batch, num_images * m, dim).astype(text_embeddings.dtype)
    gathered = jnp.take_along_axis(flat, index[..., None], axis=1)
    return jnp.where(is_visual[..., None], gathered, text_embeddings)


def next_token_loss(logits: jax.Array, targets: jax.Array, weights: jax.Array
                    ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Weighted mean cross-entropy over target positions, in fp32, with token accuracy and
    the z-loss term mean(log Z^2) (PaLM) that a config may add to keep logits anchored.
    ``row_nll`` / ``row_tokens`` ([B]) let callers split the loss by task per row."""
    logits = logits.astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    nll = log_z - target_logit
    weights = weights.astype(jnp.float32)
    denom = jnp.maximum(weights.sum(), 1.0)
    loss = (nll * weights).sum() / denom
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    metrics = {"loss": loss, "accuracy": (correct * weights).sum() / denom,
               "target_tokens": weights.sum(), "z_loss": (jnp.square(log_z) * weights).sum() / denom,
               "row_nll": (nll * weights).sum(axis=-1), "row_tokens": weights.sum(axis=-1)}
    return loss, metrics


def glyph_loss(logits: jax.Array, glyphs: jax.Array) -> dict[str, jax.Array]:
    """Cross-entropy of the glyph head over known cells (``GLYPH_UNKNOWN`` ignored), blank
    cells weighted 0.1 so the few inked ones dominate; accuracy over inked cells; the count
    of inked cells (``glyph_cells``), which weighs the figures when micro-batches are summed."""
    logits = logits.astype(jnp.float32)
    known = glyphs != GLYPH_UNKNOWN
    labels = jnp.where(known, glyphs, 0).astype(jnp.int32)
    nll = jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, labels[..., None], axis=-1)[..., 0]
    inked = known & (glyphs != GLYPH_BLANK)
    weight = jnp.where(inked, 1.0, jnp.where(known, 0.1, 0.0))
    correct = (jnp.argmax(logits, axis=-1) == labels) & inked
    return {"glyph_loss": (nll * weight).sum() / jnp.maximum(weight.sum(), 1e-6),
            "glyph_accuracy": correct.sum() / jnp.maximum(inked.sum(), 1),
            "glyph_cells": inked.sum().astype(jnp.float32)}


def tile_token_loss(visual: jax.Array, table: jax.Array, tile_tokens: jax.Array) -> dict[str, jax.Array]:
    """The tile-token objective (docs/design.md §4): each visual token [.., m, D], read
    through the decoder's own embedding table [V, D] as logits, against the ids of the tokens
    its tile shows [.., m, K] (``TILE_TOKEN_NONE`` ignored): mean cross-entropy per label, so
    the optimum spreads a visual token's probability over its tile's tokens. The table gets no
    gradient: the objective moves the vision side into the decoder's token space, not the
    reverse. ``tile_token_accuracy``: the share of tiles whose top id is one of their tokens."""
    logits = jnp.einsum("...d,vd->...v", visual.astype(jnp.float32),
                        jax.lax.stop_gradient(table).astype(jnp.float32))
    valid = tile_tokens != TILE_TOKEN_NONE
    labels = jnp.where(valid, tile_tokens, 0)
    nll = jax.nn.logsumexp(logits, axis=-1)[..., None] - jnp.take_along_axis(logits, labels, axis=-1)
    tiles = valid.any(axis=-1)
    hit = ((jnp.argmax(logits, axis=-1)[..., None] == labels) & valid).any(axis=-1)
    return {"tile_token_loss": (nll * valid).sum() / jnp.maximum(valid.sum(), 1),
            "tile_token_accuracy": hit.sum() / jnp.maximum(tiles.sum(), 1),
            "tile_token_labels": valid.sum().astype(jnp.float32),
            "tile_token_tiles": tiles.sum().astype(jnp.float32)}


class Vist2Model(nn.Module):
    """ViT + aligner + Qwen3 decoder over rows of the docs/design.md §2 contract.

    ``__call__(batch)`` returns ``{"logits": fp32 [B, S, V], "loss": scalar, ...metrics}``
    (``with_logits=False``: the same metrics from the blockwise loss, no logits).
    Padded image slots (``image_mask`` false) are still encoded (shapes stay static) but no
    visual span reads them.
    """

    config: ModelConfig

    def setup(self):
        self.vision = VisionTower(self.config)
        self.aligner = Aligner(self.config)
        self.decoder = Qwen3Decoder(self.config)
        if self.config.vision.glyph_head:
            self.glyph_head = GlyphHead(self.config)

    def _features(self, images: jax.Array) -> jax.Array:
        batch, num_images = images.shape[:2]
        return self.vision(normalize_pixels(images.reshape((batch * num_images,) + images.shape[2:])))

    def encode_images(self, images: jax.Array) -> jax.Array:
        """uint8 [B, N, H, W, 3] -> visual tokens [B, N, m, D]."""
        tokens = self.aligner(self._features(images))
        return tokens.reshape(images.shape[0], images.shape[1], *tokens.shape[1:])

    def _glyph_loss(self, features: jax.Array, glyphs: jax.Array) -> dict[str, jax.Array]:
        """The glyph head on tower features [B*N, P, D] against maps [B, N, G, G]."""
        return glyph_loss(self.glyph_head(features), glyphs.reshape(-1, *glyphs.shape[2:]))

    def glyph_metrics(self, batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
        """The glyph loss of a batch's sketches alone: the tower and its head, no decoder."""
        return self._glyph_loss(self._features(batch["images"]), batch["glyphs"])

    def embed_row(self, batch: Mapping[str, jax.Array], tile_tokens: bool = False
                  ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """(decoder input, auxiliary metrics): token embeddings at text positions, image tokens
        at visual ones; with a glyph head and ``glyphs`` in the batch, also the glyph loss of
        the row's sketches (from the same tower features); with ``tile_tokens``, the
        tile-token loss of their visual tokens."""
        modality = batch["modality"]
        text = self.decoder.embed(batch["tokens"])
        text = jnp.where((modality == TEXT)[..., None], text, jnp.zeros_like(text))
        if batch["images"].shape[1] == 0:
            return text, {}
        images = batch["images"]
        features = self._features(images)
        visual = self.aligner(features).reshape(images.shape[0], images.shape[1], -1, text.shape[-1])
        aux = {}
        if self.config.vision.glyph_head and "glyphs" in batch:
            aux.update(self._glyph_loss(features, batch["glyphs"]))
        if tile_tokens:
            aux.update(tile_token_loss(visual, self.decoder.embedding_table(), batch["tile_tokens"]))
        return constrain(place_visual_tokens(text, visual, modality), BSE), aux

    def __call__(self, batch: Mapping[str, jax.Array], with_logits: bool = True,
                 tile_tokens: bool = False) -> dict[str, jax.Array]:
        """Loss and metrics; with ``with_logits`` also the full fp32 logits (the loss then
        comes from them), else the loss is blockwise (:mod:`vist2_jax.model.loss`, what
        training uses) and no [B, S, V] array exists; ``tile_tokens`` adds the tile-token
        loss (``batch["tile_tokens"]`` needed)."""
        embedded, aux = self.embed_row(batch, tile_tokens)
        hidden = self.decoder(embedded, RowMeta.from_batch(batch))
        if not with_logits:
            return {**blockwise_next_token_loss(
                hidden, self.decoder.head_weight(), batch["targets"], batch["loss_mask"],
                tied=self.config.decoder.tie_embeddings, dtype=DTYPES[self.config.dtype],
                chunk=self.config.loss_chunk)[1], **aux}
        logits = self.decoder.logits(hidden)
        loss, metrics = next_token_loss(logits, batch["targets"], batch["loss_mask"])
        return {"logits": logits, **metrics, **aux}


def example_batch(config: ModelConfig, batch_size: int = 1, seq_len: int = 32,
                  num_images: int = 1) -> dict[str, jax.Array]:
    """A row-contract batch of zeros with the right dtypes, for init and shape tracing."""
    size = config.layout.image_size
    batch = {name: jnp.zeros((batch_size, seq_len), dtype) for name, dtype in ROW_FIELDS.items()}
    batch["images"] = jnp.zeros((batch_size, num_images, size, size, 3), IMAGE_FIELDS["images"])
    batch["image_mask"] = jnp.zeros((batch_size, num_images), IMAGE_FIELDS["image_mask"])
    cells = size // GLYPH_CELL
    batch["glyphs"] = jnp.full((batch_size, num_images, cells, cells), GLYPH_UNKNOWN, IMAGE_FIELDS["glyphs"])
    batch["tile_tokens"] = jnp.full((batch_size, num_images, config.layout.visual_len, TILE_TOKENS),
                                    TILE_TOKEN_NONE, IMAGE_FIELDS["tile_tokens"])
    return batch


def abstract_params(config: ModelConfig):
    """Boxed parameter shapes (``nn.Partitioned`` of ShapeDtypeStruct), no memory used."""
    return jax.eval_shape(lambda: Vist2Model(config).init(jax.random.key(0), example_batch(config)))


def param_counts(config: ModelConfig) -> dict[str, int]:
    """Parameters per component (vision, aligner, decoder) and in total; tied embeddings once."""
    params = nn.unbox(abstract_params(config))["params"]
    counts = {name: sum(int(x.size) for x in jax.tree_util.tree_leaves(params[name]))
              for name in ("vision", "aligner", "decoder")}
    embedding = params["decoder"]["embedding"].size
    counts["decoder_embedding"] = int(embedding)
    counts["decoder_non_embedding"] = counts["decoder"] - int(embedding)
    counts["total"] = counts["vision"] + counts["aligner"] + counts["decoder"]
    return counts
