"""Tokenizers behind one small interface: our SentencePiece models and HF ``tokenizer.json``.

Our SentencePiece models reserve FIXED ids so rows, configs and checkpoints agree without
looking anything up: pad=0, eos=1, bos=2, ``<|chunk|>``=3 (docs/design.md §2), then the chat roles.
Specials are *control* symbols: raw text never encodes to them (a document that contains
the literal string ``<|chunk|>`` stays ordinary text), and ``decode`` drops them.
Normalization is identity, no dummy prefix and byte fallback, so
``decode(encode(text)) == text`` for any string and decoded chunks concatenate exactly
(except where a chunk boundary splits a multi-byte character's fallback bytes).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Mapping, Protocol, Sequence

from vist2_jax import storage
from vist2_jax.row_contract import BOS_ID, CHUNK_ID, EOS_ID, PAD_ID, SPECIAL_TOKENS

UNK_ID = len(SPECIAL_TOKENS)  # SentencePiece needs an unk; byte fallback means it never appears


class TokenizerError(ValueError):
    """A file that is not a usable tokenizer, or text too small to train one; one line."""


class TokenizerNotFound(TokenizerError, FileNotFoundError):
    """No tokenizer file at the given path."""


class Tokenizer(Protocol):
    """What the data pipelines need from a tokenizer."""

    vocab_size: int
    special_ids: Mapping[str, int]  # keys of SPECIAL_TOKENS

    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: Sequence[int]) -> str: ...


class SentencePieceTokenizer:
    """A trained ``.model`` file with the fixed special ids checked on load."""

    def __init__(self, model_file: str | os.PathLike):
        import sentencepiece as spm

        self.path = os.fspath(model_file)  # as given (may be gs://); the bytes are read through storage
        self._sp = spm.SentencePieceProcessor(model_file=storage.local_copy(self.path))
        self.vocab_size = int(self._sp.get_piece_size())
        self.special_ids = {name: i for i, name in enumerate(SPECIAL_TOKENS)}
        for name, i in self.special_ids.items():
            if self._sp.id_to_piece(i) != SPECIAL_TOKENS[name]:
                raise TokenizerError(f"{self.path}: id {i} is {self._sp.id_to_piece(i)!r}, expected "
                                 f"{SPECIAL_TOKENS[name]!r}; not a vist2 tokenizer")

    pad_id, eos_id, bos_id, chunk_id = PAD_ID, EOS_ID, BOS_ID, CHUNK_ID

    def encode(self, text: str) -> list[int]:
        return list(self._sp.encode(text))

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    def id_to_piece(self, i: int) -> str:
        return self._sp.id_to_piece(int(i))


def train_tokenizer(inputs: Iterable[str | os.PathLike], vocab_size: int, out_prefix: str | os.PathLike,
                    *, model_type: str = "bpe", num_threads: int = 2,
                    input_sentence_size: int = 0) -> SentencePieceTokenizer:
    """Train on text files (one sentence per line) and write ``out_prefix.model`` / ``.vocab``.

    ``vocab_size`` counts the 8 specials, the unk and the 256 byte pieces, so it must be
    at least ~300 to leave room for learned pieces.
    """
    import sentencepiece as spm

    files = [str(p) for p in inputs]
    if not files:
        raise ValueError("train_tokenizer: no input files")
    for f in files:
        if not Path(f).is_file():
            raise FileNotFoundError(f"train_tokenizer: no such file {f}")
    floor = UNK_ID + 1 + 256 + 16
    if vocab_size < floor:
        raise ValueError(f"train_tokenizer: vocab_size={vocab_size} < {floor} "
                         "(specials + unk + 256 byte pieces + a few learned pieces)")
    Path(out_prefix).parent.mkdir(parents=True, exist_ok=True)
    try:
        _train_sentencepiece(spm, files, out_prefix, vocab_size, model_type, num_threads, input_sentence_size)
    except RuntimeError as err:
        if "Vocabulary size too high" in str(err) or "Vocabulary size is smaller" in str(err):
            raise TokenizerError(f"the training text supports fewer than {vocab_size} pieces "
                                 f"({str(err).strip().splitlines()[-1][:160]})") from None
        raise
    return SentencePieceTokenizer(f"{out_prefix}.model")


def _train_sentencepiece(spm, files, out_prefix, vocab_size, model_type, num_threads, input_sentence_size):
    spm.SentencePieceTrainer.train(
        input=files, model_prefix=str(out_prefix), vocab_size=vocab_size, model_type=model_type,
        pad_id=PAD_ID, eos_id=EOS_ID, bos_id=BOS_ID, unk_id=UNK_ID,
        control_symbols=list(SPECIAL_TOKENS.values())[CHUNK_ID:],
        byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=False, split_digits=True, allow_whitespace_only_pieces=True,
        character_coverage=0.9995, max_sentence_length=1 << 16, num_threads=num_threads,
        input_sentence_size=input_sentence_size, shuffle_input_sentence=False, minloglevel=2)


# Our special names -> the piece a Qwen3 tokenizer.json already has for that role; names
# that map to None (or to a piece the file lacks) are added as new special tokens.
QWEN3_SPECIALS: dict[str, str | None] = {
    "pad": "<|endoftext|>", "eos": "<|im_end|>", "bos": "<|im_start|>", "chunk": None,
    "system": None, "user": None, "assistant": None, "end": "<|im_end|>",
}


class HFTokenizer:
    """Adapter around a Hugging Face ``tokenizer.json`` (e.g. Qwen3's) with our interface.

    Special tokens the file lacks (``<|chunk|>`` for Qwen3) are appended as new special
    tokens at the end of the vocabulary; ``added_ids`` lists them so the embedding table
    can be checked to have rows for them. Special strings in raw text are encoded as plain
    text (``encode_special_tokens``), matching the SentencePiece behaviour.
    """

    def __init__(self, path: str | os.PathLike, specials: Mapping[str, str | None] = QWEN3_SPECIALS):
        from tokenizers import AddedToken
        from tokenizers import Tokenizer as _HF

        path = storage.as_path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"no tokenizer.json at {path}")
        self.path = os.fspath(path)
        self._tok = _HF.from_file(storage.local_copy(path))
        self._tok.encode_special_tokens = True
        self.special_ids: dict[str, int] = {}
        self.added_ids: list[int] = []
        for name in SPECIAL_TOKENS:
            piece = specials.get(name) or SPECIAL_TOKENS[name]
            i = self._tok.token_to_id(piece)
            if i is None:
                self._tok.add_special_tokens([AddedToken(piece, special=True, normalized=False)])
                i = self._tok.token_to_id(piece)
                self.added_ids.append(i)
            self.special_ids[name] = int(i)
        self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))
        self.pad_id, self.eos_id = self.special_ids["pad"], self.special_ids["eos"]
        self.bos_id, self.chunk_id = self.special_ids["bos"], self.special_ids["chunk"]

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def id_to_piece(self, i: int) -> str:
        return self._tok.id_to_token(int(i))


def load_tokenizer(path: str | os.PathLike) -> SentencePieceTokenizer | HFTokenizer:
    """``*.model`` -> SentencePiece; ``tokenizer.json`` or a folder holding one -> HF adapter."""
    p = storage.as_path(path)
    if not p.exists():
        raise TokenizerNotFound(f"{p}: no such file")
    try:
        return SentencePieceTokenizer(p) if p.suffix == ".model" else HFTokenizer(p)
    except TokenizerError:
        raise
    except Exception as err:  # sentencepiece / tokenizers raise RuntimeError, OSError, JSON errors...
        reason = next((line for line in str(err).splitlines() if line.strip()), type(err).__name__)
        raise TokenizerError(f"{p}: not a usable tokenizer (a SentencePiece .model or a HF "
                             f"tokenizer.json): {reason.strip()[:160]}") from None
