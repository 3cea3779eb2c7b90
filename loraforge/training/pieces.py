"""A long text's token ids, tokenized in pieces that are checked to join into the ids of tokenizing it whole.

A fast tokenizer keeps about 240 bytes per character while it encodes a text (its offsets, words and normalized
text): a 5 MB text record cost 1.3 GB and 28 s, a 20 MB one 4.8 GB. A text longer than LONG_TEXT characters is cut
into pieces of about PIECE characters where whitespace starts after something else. Each piece is tokenized with the
CONTEXT characters before it, and kept from its first character on: what a tokenizer does where a text starts (a
SentencePiece "▁" written before it) falls on the tokens that are dropped.

Each cut is checked: the text CONTEXT characters either side of it is tokenized whole, and its tokens that start
within CONTEXT // 2 characters of the cut must be the joined pieces' tokens there (ids and characters), with none of
them running across the cut. A cut that differs (a token made across it) moves to where whitespace starts again
further on; after MOVES moves, or for a tokenizer that gives no character offsets (a Python one), the text is
tokenized whole, as are the texts of LONG_TEXT characters or less.
"""

from __future__ import annotations

import re

LONG_TEXT = 1_000_000  # characters; a text this long or shorter is tokenized whole
PIECE = 250_000  # characters a piece holds, about (the tokenizer's peak grows with it)
CONTEXT = 4096  # characters tokenized before a piece, and either side of a cut to check it
MOVES = 8  # a cut is moved this many times before the text is tokenized whole
_CUT = re.compile(r"(?<=\S)\s")  # whitespace after something else

Token = tuple[int, int, int]  # (id, first character, character after the last)


def text_ids(tokenizer, text: str, add_special_tokens: bool = True, long_text: int = LONG_TEXT,
             piece: int = PIECE, context: int = CONTEXT) -> list[int]:
    """tokenizer(text, add_special_tokens=...)["input_ids"], tokenized in pieces where the text is long (see the
    module's docstring); the special tokens (BOS, EOS) are the ones tokenizer(text) adds."""
    body = None if len(text) <= long_text else _pieces(tokenizer, text, piece, context)
    wrap = _specials(tokenizer, text[:context]) if body is not None and add_special_tokens else ([], [])
    if body is None or wrap is None:
        # tokenizer(text) as before where specials are wanted: a stand-in tokenizer may take no keywords
        return (tokenizer(text) if add_special_tokens else tokenizer(text, add_special_tokens=False))["input_ids"]
    return wrap[0] + body + wrap[1]


def _pieces(tokenizer, text: str, piece: int, context: int) -> list[int] | None:
    """The text's ids (no special tokens) joined from pieces whose every cut is checked; None where a cut cannot
    be made to agree or the tokenizer gives no offsets."""
    n, half = len(text), context // 2
    ids, start, window = [], 0, []  # window: the tokens of the text around `start`, the last cut
    while start < n:
        end, moves = _cut(text, start + max(piece, context)), 0  # the check of `start` stays inside the piece
        while True:
            left = max(0, start - context)
            tokens = _tokens(tokenizer, text[left:end], left)
            if tokens is None:
                return None
            tokens = [t for t in tokens if t[1] >= start]
            if start and _near(tokens, start, start + half) != _near(window, start, start + half):
                return None  # the piece's first tokens are not those the text around the cut has
            if end == n:
                break
            first = max(0, end - context)
            around = _tokens(tokenizer, text[first:end + context], first)
            if _agrees(tokens, around, end, half):
                break
            moves += 1
            if moves > MOVES:
                return None
            end = _cut(text, end + half)
        ids += [t[0] for t in tokens]
        start, window = end, (around if end < n else [])
    return ids


def _cut(text: str, at: int) -> int:
    """Where whitespace first starts at or after `at` (after a character that is not whitespace); the text's end
    where it never does."""
    match = _CUT.search(text, min(at, len(text)))
    return match.start() if match else len(text)


def _tokens(tokenizer, text: str, offset: int) -> list[Token] | None:
    """text's tokens (no special tokens), their characters counted from `offset`; None for a tokenizer that gives
    no offsets."""
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except NotImplementedError:
        return None
    return [(i, offset + a, offset + b) for i, (a, b) in zip(enc["input_ids"], enc["offset_mapping"])]


def _near(tokens: list[Token], first: int, after: int) -> list[Token]:
    return [t for t in tokens if first <= t[1] < after]


def _agrees(tokens: list[Token], around: list[Token], cut: int, half: int) -> bool:
    """Whether a piece's tokens that start within `half` characters before `cut` are the tokens the text around the
    cut has there, none of which runs across the cut."""
    return (_near(tokens, cut - half, cut) == _near(around, cut - half, cut)
            and all(b <= cut for _, a, b in around if a < cut))


def _specials(tokenizer, sample: str) -> tuple[list[int], list[int]] | None:
    """The special tokens tokenizer(text) writes before and after the text's own (BOS; EOS where it adds one), from
    a sample of the text; None where they do not just surround them."""
    full = tokenizer(sample)["input_ids"]
    plain = tokenizer(sample, add_special_tokens=False)["input_ids"]
    for p in range(len(full) - len(plain) + 1):
        if plain and full[p:p + len(plain)] == plain:
            return full[:p], full[p + len(plain):]
    return None
