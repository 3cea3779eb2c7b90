"""loraforge.training.pieces: a long text tokenized in pieces has the ids of the text tokenized whole."""

from __future__ import annotations

import random

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from loraforge.models import load_tokenizer
from loraforge.training import pieces
from loraforge.training.data import encode
from test_chat_templates import CORPUS, byte_level, sentencepiece

WORDS = ["Hello", "there,", "how", "are", "you", "today?", "Paris", "é", "naïve", "日本語", "😀", "x", "\n",
         "\n\n", "  ", "    ", "\t", " \n ", "[INST]", "</s>", "<s>", "2", "345", "e\u0301", "<|endoftext|>",
         "\u00a0", "\r\n"]


def awkward(n: int, seed: int) -> str:
    """n words and separators: runs of spaces and newlines, tabs, accents (one combined, one a combining mark),
    CJK, an emoji (4 bytes), special tokens' texts, a no-break space."""
    rng = random.Random(seed)
    return " " * (seed % 3) + "".join(rng.choice(WORDS) + rng.choice([" ", " ", "", "  ", "\n"]) for _ in range(n))


def with_specials(tok: PreTrainedTokenizerFast, single: str) -> PreTrainedTokenizerFast:
    """tok with a post-processor that writes BOS (and EOS) around a text, as Llama 2's and Gemma's do."""
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=single, special_tokens=[(t, tok.convert_tokens_to_ids(t)) for t in ("<s>", "</s>")])
    return tok


def sentencepiece_always() -> PreTrainedTokenizerFast:
    """Llama 2's legacy way: "▁" written before every text (prepend_scheme "always"), BOS and EOS added."""
    tok = sentencepiece(["<unk>", "<s>", "</s>"], "<s>", "</s>")
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="always", split=False)
    return with_specials(tok, "<s> $A </s>")


def across_spaces() -> PreTrainedTokenizerFast:
    """A BPE with no pre-tokenizer: its tokens run across spaces ("e t", "? I"), so a cut at a space can split one."""
    tok = Tokenizer(models.BPE())
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"]))
    return with_specials(PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>"), "<s> $A")


TOKENIZERS = {
    "byte-level BPE": lambda: byte_level(["<|endoftext|>"], "<|endoftext|>", "<|endoftext|>"),
    "SentencePiece, ▁ first": lambda: sentencepiece(["<unk>", "<s>", "</s>"], "<s>", "</s>"),
    "SentencePiece, ▁ always, BOS and EOS": sentencepiece_always,
    "SmolLM2": lambda: load_tokenizer("smollm2-135m"),
}


def naive(tok, text: str, piece: int) -> list[int]:
    """Each piece tokenized alone and joined: what the cut must not give."""
    cuts, at = [0], 0
    while (at := pieces._cut(text, at + piece)) < len(text):
        cuts.append(at)
    return [i for a, b in zip(cuts, [*cuts[1:], len(text)]) for i in tok(text[a:b], add_special_tokens=False)
            ["input_ids"]]


@pytest.mark.parametrize("name", TOKENIZERS)
def test_a_long_text_in_pieces_has_the_ids_of_the_whole_text(name):
    """Pieces of 130 to 400 characters (a cut every 20 to 70 words), each cut checked with 128 characters either side:
    the ids are tokenizer(text)'s, BOS and EOS included, and the pieces were used (no fallback to the whole text)."""
    tok = TOKENIZERS[name]()
    for seed in range(12):
        text = awkward(400, seed)
        piece = (130, 257, 400)[seed % 3]
        assert pieces._pieces(tok, text, piece, 128) is not None, (name, seed)
        for special in (True, False):
            got = pieces.text_ids(tok, text, special, long_text=10, piece=piece, context=128)
            assert got == tok(text, add_special_tokens=special)["input_ids"], (name, seed, special)
    if name.startswith("SentencePiece"):  # a piece alone that starts with a newline gets a "▁" of its own
        text = "Paris\n" * 100
        assert naive(tok, text, 130) != tok(text, add_special_tokens=False)["input_ids"]
        assert pieces.text_ids(tok, text, False, long_text=10, piece=130, context=128) == tok(
            text, add_special_tokens=False)["input_ids"]


def test_a_cut_that_splits_a_token_moves_or_the_text_is_tokenized_whole():
    tok = across_spaces()
    text = " ".join(CORPUS * 5)
    whole = tok(text)["input_ids"]
    assert naive(tok, text, 50)[:40] != whole[1:41]  # a token runs across the first cut
    assert pieces.text_ids(tok, text, long_text=10, piece=50, context=128) == whole
    assert pieces.text_ids(tok, text, long_text=10, piece=50, context=32) == whole


def test_a_tokenizer_without_offsets_tokenizes_the_text_whole(monkeypatch):
    tok = byte_level(["<|endoftext|>"], "<|endoftext|>", "<|endoftext|>")
    original, seen = type(tok).__call__, []

    def no_offsets(self, text, *args, **kwargs):
        if kwargs.get("return_offsets_mapping"):
            raise NotImplementedError("return_offset_mapping is not available when using Python tokenizers")
        seen.append(len(text))
        return original(self, text, *args, **kwargs)

    monkeypatch.setattr(type(tok), "__call__", no_offsets)
    text = awkward(300, 0)
    assert pieces.text_ids(tok, text, long_text=10, piece=40, context=64) == original(tok, text)["input_ids"]
    assert seen == [len(text)]


def test_a_text_record_over_a_million_characters_is_tokenized_in_pieces(monkeypatch):
    """The soak's 5 MB line (+1.3 GB while tokenized whole; 20 MB: +4.8 GB): the tokenizer now sees at most a piece
    and its context at once, and the record's ids (BOS and EOS included) are the whole text's."""
    tok = sentencepiece_always()
    text = "x y \n" * 10 + awkward(2_000, 1) * 130
    assert len(text) > pieces.LONG_TEXT
    whole = tok(text)["input_ids"]
    original, seen = type(tok).__call__, []
    monkeypatch.setattr(type(tok), "__call__", lambda self, t, *a, **k: seen.append(len(t)) or original(self, t,
                                                                                                         *a, **k))
    example = encode({"text": text}, tok, "text")
    assert whole[0] == tok.bos_token_id and whole[-1] == tok.eos_token_id  # its post-processor's
    assert example.input_ids == whole and example.labels == whole
    assert max(seen) <= pieces.PIECE + pieces.CONTEXT + max(map(len, WORDS))
