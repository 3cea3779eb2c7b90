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
its final text lacks them too), and the engine sends that text, streamed or not, never a trailing U+FFFD. A U+FFFD
the model writes as a character of its own is dropped too when it is the last character (the bytes cannot tell it
from an unfinished one there); within the text it stays.

Decoding runs with clean_up_tokenization_spaces=False: that cleanup (" ." -> ".") is made across the whole text and
would change characters already sent; the built-in model's tokenizer has it off.
"""

from __future__ import annotations


class TextStream:
    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self.ids: list[int] = []
        self._committed: list[str] = []  # pieces of committed text, joined on demand
        self._context = 0  # the window starts here: tokens whose text was committed last, as context
        self._read = 0  # tokens before this are committed
        self._pending = ""  # the window's text beyond its context, not yet committed

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
        stream holds back until the rest comes, and what `complete()` drops."""
        return len(self._pending) - len(self._pending.rstrip("\ufffd"))

    def complete(self) -> str:
        """text() less the U+FFFD s of a last character the tokens never finished: the text once output ends."""
        text = self.text()
        return text[:len(text) - self.incomplete]
