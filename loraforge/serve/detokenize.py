"""A request's generated text, decoded a few tokens at a time instead of whole at every token.

Decoding all of a request's output again for each new token costs O(n) per token and O(n²) per request, on the
engine thread every request waits for: with SmolLM2's tokenizer 0.2 ms a token at 1,000 tokens and 1.1 ms at 4,000
(bench/detokenize.py; this way 0.017 ms at any length). TextStream decodes a short window at each token: the
tokens not yet committed to text, after the ones committed last as context (vLLM's and TGI's prefix and read
offsets). A window's new text is committed when it decodes to more characters than its context alone and does not
end in U+FFFD (the bytes of a character split across tokens: its rest is still to come). text() is the committed
text plus the window's pending part, so it equals decoding the whole list (tests/serve/test_detokenize.py checks
this token by token).

Output that stops inside a character (max_tokens, a stop token or an abort after the first of its bytes) ends in
bytes that are no text: `complete()` drops them (vLLM's detokenizers never emit text ending in U+FFFD either, so
its final text lacks them too), and the engine sends that text, streamed or not, never that U+FFFD. They are told
from a U+FFFD the model writes as a character of its own (its three bytes EF BF BD, complete) by the pending
tokens' bytes: only a trailing UTF-8 sequence that is a character's start, unfinished, is dropped. The bytes are
read off the tokens of a byte-level BPE (GPT-2, SmolLM2, Llama 3) or SentencePiece's byte tokens (<0xE4>); with any
other tokenizer every trailing U+FFFD counts as unfinished, as the text cannot tell them apart.

Decoding runs with clean_up_tokenization_spaces=False: that cleanup (" ." -> ".") is made across the whole text and
would change characters already sent; the built-in model's tokenizer has it off.
"""

from __future__ import annotations

import codecs
import re

BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # SentencePiece's byte fallback: a token per byte


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE: each byte is written as one printable character (transformers' bytes_to_unicode);
    character -> byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


BYTE_LEVEL = _byte_level_alphabet()


def _byte_kind(tokenizer) -> str | None:
    """How the tokenizer's tokens carry bytes: "byte_level", "byte_fallback", or None (not known)."""
    decoder = repr(getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None))
    if not hasattr(tokenizer, "convert_ids_to_tokens"):
        return None
    if "ByteLevel" in decoder:
        return "byte_level"
    return "byte_fallback" if "ByteFallback" in decoder else None


class TextStream:
    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self.ids: list[int] = []
        self._committed: list[str] = []  # pieces of committed text, joined on demand
        self._context = 0  # the window starts here: tokens whose text was committed last, as context
        self._read = 0  # tokens before this are committed
        self._pending = ""  # the window's text beyond its context, not yet committed
        self._kind = _byte_kind(tokenizer)
        self._special = set(getattr(tokenizer, "all_special_ids", ()) or ()) if skip_special_tokens else set()

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip, clean_up_tokenization_spaces=False)

    def add(self, token: int) -> None:
        self.ids.append(token)
        context = self._decode(self.ids[self._context:self._read])
        window = self._decode(self.ids[self._context:])
        if not window.startswith(context):  # the new token changed the context's text: decode from the start
            self._committed, context, window = [], "", self._decode(self.ids)
            self._context = self._read = 0
        if len(window) > len(context) and not window.endswith("\ufffd"):
            self._committed.append(window[len(context):])
            self._context, self._read, self._pending = self._read, len(self.ids), ""
        else:
            self._pending = window[len(context):]

    def text(self) -> str:
        """All of the tokens' text so far, as decoding them whole gives (an incomplete last character as U+FFFD)."""
        if len(self._committed) > 1:
            self._committed = ["".join(self._committed)]
        return (self._committed[0] if self._committed else "") + self._pending

    @property
    def incomplete(self) -> int:
        """Characters at the end of text() that stand for the bytes of an unfinished character (U+FFFD s): what a
        stream holds back until the rest comes, and what `complete()` drops. A U+FFFD the model wrote is none."""
        trailing = len(self._pending) - len(self._pending.rstrip("\ufffd"))
        if not trailing or self._kind is None:
            return trailing
        unfinished = self._unfinished_bytes()
        if not unfinished:
            return 0
        # byte-level BPE decodes an unfinished character to one U+FFFD; SentencePiece's byte fallback, one a byte
        return min(trailing, 1 if self._kind == "byte_level" else len(unfinished))

    def _unfinished_bytes(self) -> bytes:
        """The bytes at the end of the pending tokens that start a UTF-8 character and do not finish it."""
        utf8 = codecs.getincrementaldecoder("utf-8")("replace")
        for token, piece in zip(self.ids[self._read:], self._tokenizer.convert_ids_to_tokens(self.ids[self._read:])):
            if token in self._special:
                continue  # skipped by the decode: the bytes either side of it join
            if self._kind == "byte_level" and piece and all(c in BYTE_LEVEL for c in piece):
                utf8.decode(bytes(BYTE_LEVEL[c] for c in piece))
            elif self._kind == "byte_fallback" and (byte := BYTE_TOKEN.fullmatch(piece or "")):
                utf8.decode(bytes([int(byte[1], 16)]))
            else:  # a token of text (an added token, a SentencePiece piece): what came before it is finished
                utf8.reset()
        return utf8.getstate()[0]

    def complete(self) -> str:
        """text() less the U+FFFD s of a last character the tokens never finished: the text once output ends."""
        text = self.text()
        return text[:len(text) - self.incomplete]
