"""``Vist2Tokenizer``: the run's own tokenizer (``data_pipelines/tokenizer.py``: a SentencePiece
``.model`` or a HF ``tokenizer.json`` adapter) behind the ``transformers`` tokenizer API, so
``AutoTokenizer`` / ``AutoProcessor`` load it with ``trust_remote_code=True`` and ids equal
what training and ``vist2 generate`` use: text is encoded by the run's tokenizer alone
(special strings in raw text stay text), padding is on the left."""

from __future__ import annotations

import shutil
from pathlib import Path

from transformers import PreTrainedTokenizer

from data_pipelines.tokenizer import load_tokenizer

FILES = {"sentencepiece_file": "vist2_tokenizer.model", "tokenizers_file": "vist2_tokenizer.json"}


class Vist2Tokenizer(PreTrainedTokenizer):
    vocab_files_names = FILES
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, sentencepiece_file: str | None = None, tokenizers_file: str | None = None, **kwargs):
        self.file = sentencepiece_file or tokenizers_file
        if not self.file:
            raise ValueError(f"Vist2Tokenizer needs one of {', '.join(FILES.values())}")
        self.inner = load_tokenizer(self.file)
        self._pieces = [self.inner.id_to_piece(i) for i in range(self.inner.vocab_size)]
        self._ids = {piece: i for i, piece in enumerate(self._pieces)}
        ids = self.inner.special_ids
        for name in ("pad", "eos", "bos"):
            kwargs.setdefault(f"{name}_token", self._pieces[ids[name]])
        kwargs.setdefault("padding_side", "left")
        super().__init__(**kwargs)

    @property
    def vocab_size(self) -> int:
        return self.inner.vocab_size

    def get_vocab(self) -> dict[str, int]:
        return dict(self._ids)

    def tokenize(self, text: str, **kwargs) -> list[str]:
        return [self._pieces[i] for i in self.inner.encode(text)]

    def _convert_token_to_id(self, token: str) -> int:
        return self._ids[token]

    def _convert_id_to_token(self, index: int) -> str:
        return self._pieces[index]

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return self.inner.decode([self._ids[t] for t in tokens])

    def _decode(self, token_ids, skip_special_tokens: bool = False, **kwargs) -> str:
        """The run tokenizer's text; special tokens appear as their pieces unless skipped (as
        in transformers: lm-eval stops at the decoded EOS)."""
        ids = [int(i) for i in ([token_ids] if isinstance(token_ids, int) else token_ids)]
        special = set() if skip_special_tokens else set(self.inner.special_ids.values())
        text, run = [], []
        for i in ids + [None]:
            if i is None or i in special:
                text.append(self.inner.decode([t for t in run if t < self.inner.vocab_size]))
                text.append("" if i is None else self._pieces[i])
                run = []
            else:
                run.append(i)
        return "".join(text)

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str]:
        key = "sentencepiece_file" if self.file.endswith(".model") else "tokenizers_file"
        target = Path(save_directory) / f"{filename_prefix + '-' if filename_prefix else ''}{FILES[key]}"
        if Path(self.file).resolve() != target.resolve():
            shutil.copyfile(self.file, target)
        return (str(target),)
