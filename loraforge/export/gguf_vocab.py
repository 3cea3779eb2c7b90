"""The tokenizer and chat template inside a GGUF file (`tokenizer.*` keys).

A GGUF base (the built-in model is one) already holds them: they are copied key by key, so llama.cpp tokenizes
exactly as it did for the base. A transformers base gets them the way llama.cpp's converter writes a byte-level
BPE vocabulary (tokens by id, token types, merges, special ids, chat template); other tokenizer kinds
(SentencePiece) are refused with the alternative.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf

from loraforge.export.gguf_names import ExportError


LINEAGE_KEYS = ("general.organization", "general.basename", "general.size_label", "general.license",
                "general.languages")
"""What a GGUF base says of where it comes from, kept in a merged export (LM Studio and Ollama show license and
size from them; soak: they were dropped). general.name and general.finetune describe the export itself."""


def copy_vocab(writer: gguf.GGUFWriter, source: Path) -> None:
    """Every `tokenizer.*` key of GGUF file `source`, and its LINEAGE_KEYS, with their value types."""
    reader = gguf.GGUFReader(source)
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer.") and key not in LINEAGE_KEYS:
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), vtype, sub)


def check_tokenizer(tokenizer_dir: Path) -> None:
    """Refuse a tokenizer write_vocab cannot write (before the model is loaded and merged)."""
    path = Path(tokenizer_dir) / "tokenizer.json"
    model = json.loads(path.read_text()).get("model", {}) if path.is_file() else {}
    if model.get("type") != "BPE":
        raise ExportError(f"{tokenizer_dir}: only byte-level BPE tokenizers (tokenizer.json) are written into GGUF "
                          f"here; convert the merged model (`loraforge merge`) with llama.cpp's convert_hf_to_gguf.py")


def write_vocab(writer: gguf.GGUFWriter, tokenizer_dir: Path, tokenizer, n_vocab: int) -> None:
    """A byte-level BPE tokenizer of a transformers directory as llama.cpp's `gpt2` tokenizer model, `n_vocab`
    entries (the embedding's rows; ids the tokenizer lacks become unused [PADn] tokens, as llama.cpp's converter
    writes them)."""
    check_tokenizer(tokenizer_dir)
    vocab = tokenizer.get_vocab()
    # llama.cpp's converter: an added token marked special is CONTROL (not printed, not parsed from text), any
    # other added token USER_DEFINED (soak: SmolLM2's <repo_name>, <file_sep>, ... were USER_DEFINED here)
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    added = {t.content for t in tokenizer.added_tokens_decoder.values()}
    by_id = {i: t for t, i in vocab.items()}
    tokens, types = [], []
    for i in range(max(n_vocab, max(by_id) + 1)):
        token = by_id.get(i, f"[PAD{i}]")
        tokens.append(token)
        if i in special or i not in by_id:
            types.append(gguf.TokenType.CONTROL if i in by_id else gguf.TokenType.UNUSED)
        else:
            types.append(gguf.TokenType.USER_DEFINED if token in added else gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")  # llama.cpp names its pre-tokenizers by hash; "default" is its generic one
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    vocab = gguf.SpecialVocab(tokenizer_dir, load_merges=True, n_vocab=len(tokens))
    bos = tokenizer.bos_token_id  # what the tokenizer does, said: llama.cpp's own default may differ (soak)
    vocab.add_special_token.setdefault("bos", bos is not None and tokenizer("a")["input_ids"][:1] == [bos])
    vocab.add_to_gguf(writer)
