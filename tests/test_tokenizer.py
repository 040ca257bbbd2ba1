"""Tokenizers: fixed special ids, exact round trips, the HF tokenizer.json adapter, and the
embedded corpus they are trained on."""

import pytest

from data_pipelines import corpus
from data_pipelines.tokenizer import (BOS_ID, CHUNK_ID, EOS_ID, PAD_ID, SPECIAL_TOKENS, HFTokenizer,
                                      SentencePieceTokenizer, load_tokenizer, train_tokenizer)

ROUND_TRIP_TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    " leading space, trailing spaces  ",
    "tabs\tand\nnewlines\n\n\tindented\r\nwindows line",
    "Unicode: héllo wörld — “quotes” ✓ 日本語 Ελληνικά 🙂",
    "control \x00\x07\x1b characters",
    "a literal <|chunk|> and <|user|> stay text",
    "",
    "   ",
    "1234567890 digits 3.14159",
]


def test_corpus_is_deterministic_prose():
    docs = corpus.embedded_documents()
    assert docs == corpus.embedded_documents()
    assert len(docs) > 100 and sum(map(len, docs)) > 200_000
    assert len(corpus.corpus_fingerprint()) == 64
    text = "\n".join(docs)
    assert "attribute access" in text  # a pydoc topic
    assert "socket" in text  # a module docstring


def test_reflow_joins_prose_and_keeps_literal_blocks():
    doc = "Title\n=====\nsome prose\nwrapped here.\n\nExample:\n\n   x = 1\n   y = 2\n\n* item one\n  continued\n"
    assert corpus.reflow(doc) == ("Title\n=====\nsome prose wrapped here.\nExample:\n   x = 1\n   y = 2\n"
                                  "* item one continued")


def test_special_ids_are_fixed(sp_tokenizer):
    assert (PAD_ID, EOS_ID, BOS_ID, CHUNK_ID) == (0, 1, 2, 3)
    for i, (name, piece) in enumerate(SPECIAL_TOKENS.items()):
        assert sp_tokenizer.id_to_piece(i) == piece
        assert sp_tokenizer.special_ids[name] == i
    assert sp_tokenizer.vocab_size == 768


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_sentencepiece_round_trip_is_exact(sp_tokenizer, text):
    ids = sp_tokenizer.encode(text)
    assert sp_tokenizer.decode(ids) == text
    assert not set(ids) & set(range(len(SPECIAL_TOKENS)))  # raw text never yields specials


def test_chunks_decode_and_concatenate_exactly(sp_tokenizer):
    text = corpus.embedded_documents()[3][:3000]
    ids = sp_tokenizer.encode(text)
    assert len(text) / len(ids) > 2  # the tokenizer actually learned pieces
    pieces = [sp_tokenizer.decode(ids[i:i + 64]) for i in range(0, len(ids), 64)]
    assert "".join(pieces) == text
    assert sp_tokenizer.decode([CHUNK_ID, *ids[:10], EOS_ID]) == sp_tokenizer.decode(ids[:10])


def test_load_and_training_errors(sp_tokenizer, tmp_path):
    again = load_tokenizer(sp_tokenizer.path)
    assert isinstance(again, SentencePieceTokenizer)
    assert again.encode("hello world") == sp_tokenizer.encode("hello world")
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer([sp_tokenizer.path], vocab_size=100, out_prefix=tmp_path / "x")
    with pytest.raises(FileNotFoundError):
        train_tokenizer([tmp_path / "missing.txt"], vocab_size=512, out_prefix=tmp_path / "x")
    with pytest.raises(FileNotFoundError):
        load_tokenizer(tmp_path / "missing.model")


@pytest.fixture(scope="module")
def hf_tokenizer_dir(tmp_path_factory):
    """A tiny byte-level BPE tokenizer.json in Qwen's style, built here (no download)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus.embedded_documents()[:20], trainer)
    root = tmp_path_factory.mktemp("hf")
    tok.save(str(root / "tokenizer.json"))
    return root


def test_hf_adapter_maps_and_adds_specials(hf_tokenizer_dir):
    tok = load_tokenizer(hf_tokenizer_dir)
    assert isinstance(tok, HFTokenizer)
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)  # Qwen's pieces, where they already are
    base = tok.vocab_size - len(tok.added_ids)
    assert tok.added_ids == list(range(base, tok.vocab_size))  # appended at the end
    assert tok.chunk_id == tok.special_ids["chunk"] and tok.chunk_id in tok.added_ids
    assert {tok.special_ids[n] for n in ("system", "user", "assistant")} <= set(tok.added_ids)


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS + ["raw <|im_end|> in a document"])
def test_hf_adapter_round_trip(hf_tokenizer_dir, text):
    tok = HFTokenizer(hf_tokenizer_dir / "tokenizer.json")
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert not set(ids) & set(tok.special_ids.values())


def test_hf_adapter_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        HFTokenizer(tmp_path)


def test_exported_transformers_tokenizer_over_a_hf_tokenizer_json(hf_tokenizer_dir, tmp_path):
    """``Vist2Tokenizer`` (the tokenizer of a ``vist2 export`` folder) over a Qwen-style
    tokenizer.json gives the adapter's ids (specials in raw text stay text), pads on the left,
    and saves / reloads the same file."""
    pytest.importorskip("transformers")
    from vist2_jax.export.tokenization_vist2 import Vist2Tokenizer

    inner = HFTokenizer(hf_tokenizer_dir / "tokenizer.json")
    tok = Vist2Tokenizer(tokenizers_file=str(hf_tokenizer_dir / "tokenizer.json"))
    text = "It was the best of times <|chunk|> <|im_end|> ok"
    assert tok(text)["input_ids"] == inner.encode(text)
    assert tok.decode(inner.encode(text)) == text
    assert tok.eos_token_id == inner.special_ids["eos"] and tok.pad_token_id == inner.special_ids["pad"]
    batch = tok(["a", "a much longer text"], padding=True)
    assert batch["attention_mask"][0][0] == 0 and batch["input_ids"][0][-1] == inner.encode("a")[-1]
    tok.save_pretrained(tmp_path)
    assert (tmp_path / "vist2_tokenizer.json").read_bytes() == (hf_tokenizer_dir / "tokenizer.json").read_bytes()
