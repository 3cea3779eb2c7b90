"""TextStream: a request's text decoded a window at a time equals decoding all its tokens, at every token."""

import random

import pytest
from tokenizers import Tokenizer, decoders, models
from transformers import PreTrainedTokenizerFast

from loraforge.serve.detokenize import TextStream

TEXT = ("Hello , world . 日本語の文章 🙂🚀 naïve café — \"quotes\"\n\tTabs and   spaces; ümlauts: ÄÖÜ ß. "
        "Ελληνικά, русский, עברית, हिन्दी, 한국어. The end.")


@pytest.fixture(scope="module", autouse=True)
def decode_path():
    """No engine here: once, not on both of conftest's decode paths."""


def full(tokenizer, ids):
    return tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def check_stream(tokenizer, ids):
    stream = TextStream(tokenizer)
    for n, token in enumerate(ids, 1):
        stream.add(token)
        assert stream.text() == full(tokenizer, ids[:n]), f"after {n} tokens"
    return stream


def test_text_equals_whole_decode_at_every_token(tokenizer):
    ids = tokenizer(TEXT * 3)["input_ids"]
    assert any(tokenizer.decode([i]).endswith("\ufffd") for i in ids)  # characters split across tokens are in it
    assert check_stream(tokenizer, ids).text() == TEXT * 3


def test_special_tokens_are_skipped_as_whole_decode_does(tokenizer):
    ids = tokenizer(TEXT)["input_ids"]
    specials = tokenizer.all_special_ids
    mixed = [t for i, t in enumerate(ids) for t in ([t, specials[i % len(specials)]] if i % 7 == 3 else [t])]
    assert check_stream(tokenizer, mixed).text() == TEXT
    kept = TextStream(tokenizer, skip_special_tokens=False)
    for t in mixed:
        kept.add(t)
    assert kept.text() == tokenizer.decode(mixed, skip_special_tokens=False, clean_up_tokenization_spaces=False)


@pytest.mark.parametrize("seed", [0, 1])
def test_random_tokens_including_broken_bytes(tokenizer, seed):
    rng = random.Random(seed)
    ids = [rng.randrange(len(tokenizer)) for _ in range(400)]  # any byte sequence, invalid UTF-8 included
    check_stream(tokenizer, ids)


def test_each_token_decodes_a_short_window(tokenizer, monkeypatch):
    """The point of it: the tokens decoded per added token do not grow with the text (whole decoding: n at n)."""
    ids = tokenizer(TEXT * 20)["input_ids"]
    stream = TextStream(tokenizer)
    lengths = []
    decode = tokenizer.decode
    monkeypatch.setattr(tokenizer, "decode", lambda i, **kw: lengths.append(len(i)) or decode(i, **kw))
    for t in ids:
        stream.add(t)
    assert len(ids) > 1000 and max(lengths) <= 8
    assert stream.text() == TEXT * 20


class JoiningTokenizer:
    """A stand-in with two habits real tokenizers have: the first piece's leading space is dropped (SentencePiece),
    and some neighbours decode together to other text than apart ("a" "b" -> "X")."""

    pieces = [" a", "b", " c", "d", " "]

    def decode(self, ids, skip_special_tokens=True, clean_up_tokenization_spaces=False):
        return "".join(self.pieces[i] for i in ids).replace(" ab", " X").removeprefix(" ")


@pytest.mark.parametrize("seed", range(5))
def test_a_token_that_changes_the_text_before_it_redecodes_from_the_start(seed):
    tok = JoiningTokenizer()
    rng = random.Random(seed)
    ids = [0, 1, 2, 0, 1] + [rng.randrange(5) for _ in range(60)]
    stream = TextStream(tok)
    for n, token in enumerate(ids, 1):
        stream.add(token)
        assert stream.text() == tok.decode(ids[:n]), f"after {n} tokens"


def test_complete_drops_only_an_unfinished_characters_bytes_not_a_u_fffd_the_model_wrote(tokenizer):
    """A token that is U+FFFD's three bytes (EF BF BD) is a character the model wrote: complete() keeps it, last or
    not; only the bytes of a character cut off (the first tokens of an emoji's four bytes) are dropped. It dropped
    every trailing U+FFFD: "ok \ufffd\ufffd\ufffd" ended "ok "."""
    fffd = tokenizer.encode("\ufffd", add_special_tokens=False)
    emoji = tokenizer.encode("😀", add_special_tokens=False)
    assert len(fffd) == 1 and len(emoji) == 3  # SmolLM2: one token of EF BF BD; the emoji's F0 9F 98 80 in three
    ok = tokenizer.encode("ok ", add_special_tokens=False)
    cases = [(ok + fffd * 3, "ok \ufffd\ufffd\ufffd", 0), (ok + fffd + emoji[:1], "ok \ufffd", 1),
             (ok + fffd + emoji[:2], "ok \ufffd", 1), (ok + fffd + emoji, "ok \ufffd😀", 0)]
    for ids, expected, held in cases:
        stream = check_stream(tokenizer, ids)
        assert (stream.complete(), stream.incomplete) == (expected, held), ids


def test_sentencepiece_byte_tokens_drop_one_u_fffd_per_unfinished_byte_and_keep_a_written_one():
    """SentencePiece's byte fallback (<0xF0> tokens; a decoder that writes a U+FFFD per byte it cannot finish): the
    bytes of a cut character are dropped, each of its U+FFFD s, and a U+FFFD the model wrote stays, as a piece of its
    own or as its three byte tokens."""
    vocab = {"<unk>": 0, "\u2581ok": 1, **{f"<0x{b:02X}>": 2 + b for b in range(256)}, "\ufffd": 258}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok)
    emoji = [2 + b for b in "😀".encode()]
    written = [2 + b for b in "\ufffd".encode()]
    cases = [([1, 258, 258], " ok\ufffd\ufffd"), ([1, 258, *emoji[:1]], " ok\ufffd"),
             ([1, 258, *emoji[:3]], " ok\ufffd"), ([1, *written], " ok\ufffd"), ([1, *emoji], " ok😀")]
    for ids, expected in cases:
        assert check_stream(tokenizer, ids).complete() == expected, ids
