"""``Vist2Config``: the ``config.json`` of an exported VIST2 model (``model_type: vist2``),
read by ``AutoConfig`` with ``trust_remote_code=True``. It holds the HF configs of the Qwen3
decoder and the SigLIP(2) tower, the chunk layout (L, m, image, patch, merge), the aligner,
and the names of the tokenizer, renderer and font files in the folder."""

from __future__ import annotations

from transformers import PretrainedConfig

MODES = ("gcc", "pcc", "text")


class Vist2Config(PretrainedConfig):
    model_type = "vist2"

    def __init__(self, lm_config: dict | None = None, vit_config: dict | None = None, vision_format: str = "siglip",
                 layout: dict | None = None, projector: str = "mlp", special_ids: dict | None = None,
                 tokenizer_file: str = "", renderer_file: str = "renderer.json", font_file: str = "",
                 font_sha256: str = "", source: dict | None = None, **kwargs):
        # not ``decoder`` / ``text_config``: transformers would take a plain dict there for a config object
        self.lm_config, self.vit_config = dict(lm_config or {}), dict(vit_config or {})
        self.vision_format, self.projector = vision_format, projector
        self.layout = dict(layout or {})
        self.special_ids = dict(special_ids or {})
        self.tokenizer_file, self.renderer_file = tokenizer_file, renderer_file
        self.font_file, self.font_sha256 = font_file, font_sha256
        self.source = dict(source or {})
        # what tools read off a causal LM's config (lm-eval: max length; generate: vocab)
        for key in ("vocab_size", "hidden_size", "num_hidden_layers", "max_position_embeddings"):
            if key in self.lm_config:
                kwargs.setdefault(key, self.lm_config[key])
        kwargs.setdefault("tie_word_embeddings", bool(self.lm_config.get("tie_word_embeddings", False)))
        super().__init__(**kwargs)
