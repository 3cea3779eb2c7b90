"""The converted-GGUF cache: one conversion per file's content, the tokenizer without the weights, and a disk with no
room for the conversion (the model de-quantized in memory instead, the same weights)."""

import os
import random
import re
import shutil

import pytest
import torch

import loraforge.models as M
import loraforge.utils.files as F
from loraforge.export.gguf import export_gguf
from loraforge.utils.files import DiskError

from helpers import tiny_llama


@pytest.fixture(scope="module")
def tiny_gguf(tiny_dir, tmp_path_factory):
    """A tiny random Llama (widths bitsandbytes' CPU 4-bit path takes) with the SmolLM2 tokenizer, as an f32 GGUF."""
    folder = tmp_path_factory.mktemp("tiny64")
    tok = M.load_tokenizer(str(tiny_dir))
    tiny_llama(seed=5, vocab_size=len(tok), hidden_size=64, intermediate_size=128,
               tie_word_embeddings=True).save_pretrained(folder / "model")
    tok.save_pretrained(folder / "model")
    return export_gguf(str(folder / "model"), None, folder / "tiny.gguf", type="f32")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAFORGE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def no_room(m, free=1000):
    """The cache's disk with `free` bytes free (what the check reads, and what the error message says)."""
    m.setattr(M, "free_bytes", lambda folder: free)
    m.setattr(F, "free_bytes", lambda folder: free)


def tensors(model):
    return {**dict(model.named_parameters()), **dict(model.named_buffers())}


def test_one_file_in_two_places_shares_one_conversion_and_other_bytes_do_not(tmp_path, cache):
    """Each fresh clone's virtual environment holds the built-in GGUF at a new path: the cache was keyed by the path,
    so every clone converted again and left 517 MB behind."""
    a, b, c = tmp_path / "a" / "m.gguf", tmp_path / "b" / "m.gguf", tmp_path / "c" / "m.gguf"
    for path, content in [(a, b"GGUF" + b"x" * 100), (b, b"GGUF" + b"x" * 100), (c, b"GGUF" + b"y" * 100)]:
        path.parent.mkdir()
        path.write_bytes(content)
    assert M._gguf_cache_path(a, "m") == M._gguf_cache_path(b, "m") == cache / "m-584c7c1a53"  # sha1 of the bytes
    assert M._gguf_cache_path(c, "m") != M._gguf_cache_path(a, "m")


def test_a_conversion_cached_by_path_is_moved_to_its_content_key_not_converted_again(tmp_path, cache):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + b"x" * 100)
    legacy = M._path_keyed(gguf, None)
    legacy.mkdir(parents=True)
    (legacy / "config.json").write_text("{}")
    (legacy / "model.safetensors").write_bytes(b"w" * 100)
    out = M.resolve_model(str(gguf), weights=False)  # no conversion: a stand-in GGUF would fail one
    assert out == str(M._gguf_cache_path(gguf, None)) and not legacy.exists()
    assert (cache / out / "model.safetensors").read_bytes() == b"w" * 100


def test_the_tokenizer_and_config_alone_convert_no_weights(tiny_gguf, cache):
    tok, config = M.load_tokenizer(str(tiny_gguf)), M.load_config(str(tiny_gguf))
    assert not list(cache.rglob("*.safetensors"))
    light = M._no_weights(M._gguf_cache_path(tiny_gguf, None))
    assert M.resolve_model(str(tiny_gguf), weights=False) == str(light)
    full = M.resolve_model(str(tiny_gguf))
    for name in ["config.json", "tokenizer.json", "tokenizer_config.json"]:  # what a full conversion writes
        assert (light / name).read_bytes() == (cache / full / name).read_bytes(), name
    assert M.resolve_model(str(tiny_gguf), weights=False) == full  # the full conversion, once there is one
    text = "<|im_start|>user\nAdd 2 and 3.<|im_end|>"
    assert tok(text)["input_ids"] == M.load_tokenizer(str(tiny_gguf))(text)["input_ids"]
    again = M.load_config(str(tiny_gguf)).to_dict()
    assert {**config.to_dict(), "_name_or_path": None} == {**again, "_name_or_path": None}


@pytest.mark.parametrize("free, said", [(1000, "1.0 kB"), (0, "0 B")])  # 0: a full disk (the check read 0 as none)
def test_a_conversion_the_disk_has_no_room_for_is_refused_before_anything_is_written(tiny_gguf, cache, monkeypatch,
                                                                                      free, said):
    no_room(monkeypatch, free)
    out = M._gguf_cache_path(tiny_gguf, None)
    with pytest.raises(DiskError, match=rf"cannot write {re.escape(str(out))}: no space left on the device \(about "
                                        rf"{M.converted_bytes(tiny_gguf) / 1e6:.1f} MB needed, {said} free there\); "
                                        rf"converted models are cached there: free space, or set LORAFORGE_CACHE"):
        M.resolve_model(str(tiny_gguf))
    assert sorted(p.name for p in cache.iterdir()) == [f"{out.name}.lock"]


def test_with_no_room_for_the_conversion_the_model_is_read_from_the_gguf_with_the_same_weights(
        tiny_gguf, cache, monkeypatch, capsys):
    cases = [("fp32", None), ("bf16", None), ("bf16", "nf4")]
    in_memory, draws = [], []  # the random numbers a seeded run draws after loading: its adapter's init
    with monkeypatch.context() as m:
        no_room(m)
        for dtype, quantize in cases:
            torch.manual_seed(3)
            random.seed(3)
            in_memory.append(M.load_model(str(tiny_gguf), dtype, quantize=quantize))
            draws.append((torch.rand(5), random.random()))
    said = capsys.readouterr().out
    assert said.count(f"reading the weights from {tiny_gguf} in memory instead, this run only") == 3
    assert "no space left on the device" in said and not list(cache.rglob("*.safetensors"))
    for (dtype, quantize), model, (numbers, number) in zip(cases, in_memory, draws):
        torch.manual_seed(3)
        random.seed(3)
        cached = M.load_model(str(tiny_gguf), dtype, quantize=quantize)  # converted the first time round
        assert torch.equal(torch.rand(5), numbers) and random.random() == number, (dtype, quantize)
        a, b = tensors(model), tensors(cached)
        assert sorted(a) == sorted(b)
        for name in a:
            assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), (dtype, quantize, name)
        assert model.config.dtype == cached.config.dtype
        ids = torch.tensor([[1, 5, 9, 4]])
        with torch.no_grad():
            assert torch.equal(model(ids).logits, cached(ids).logits), (dtype, quantize)
    out = cache / M.resolve_model(str(tiny_gguf))  # what the conversion needed is what it wrote, and a tokenizer's
    weights = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    raw = M.converted_bytes(tiny_gguf) - (16 << 20)
    assert raw <= weights < raw + 64 * 1024  # every tensor in fp32, and safetensors' header
    assert sum(p.stat().st_size for p in out.iterdir()) < M.converted_bytes(tiny_gguf)


def test_a_gguf_whose_name_is_not_utf8_converts_and_loads_the_same_model(tiny_gguf, tiny_dir, tmp_path, cache):
    """Soak: a GGUF named in Latin-1 (b'caf\\xe9.gguf', as os.listdir gives it: 'caf\\udce9.gguf') de-quantized, then
    failed with UnicodeEncodeError: the legacy cache key encoded the path as UTF-8, and the cache folder took the
    file's name, which the tokenizers library cannot save into. The Python API's path (the CLI refuses such a name
    before anything loads). One conversion (~30 s here, the tokenizer's most of it), compared with the model the
    fixture wrote."""
    latin = tmp_path / os.fsdecode(b"caf\xe9.gguf")
    shutil.copy(tiny_gguf, latin)
    model, tok = M.load_model(str(latin)), M.load_tokenizer(str(latin))
    assert M._gguf_cache_path(latin, None).name.startswith("caf\ufffd-")
    reference = M.load_tokenizer(str(tiny_dir))
    text = "<|im_start|>user\nAdd 2 and 3.<|im_end|>"
    ids = tok(text, return_tensors="pt")["input_ids"]
    assert ids.tolist() == reference(text, return_tensors="pt")["input_ids"].tolist()
    written = tiny_llama(seed=5, vocab_size=len(reference), hidden_size=64, intermediate_size=128,
                         tie_word_embeddings=True)  # as tiny_gguf made it
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, written(ids).logits)  # f32 GGUF: the same weights


def test_a_cache_that_refuses_writes_for_another_reason_is_not_worked_around(tiny_gguf, tmp_path, monkeypatch):
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("LORAFORGE_CACHE", str(tmp_path / "file" / "cache"))
    with pytest.raises(DiskError, match="set LORAFORGE_CACHE to a folder this user can write"):
        M.load_model(str(tiny_gguf))


def test_the_built_in_tokenizer_needs_only_a_few_mb_of_cache(cache):
    """CI's machine had 490 MB free: the tests' tokenizer converted the whole model (538 MB) first."""
    M.load_tokenizer("smollm2-135m")
    assert sum(p.stat().st_size for p in cache.rglob("*") if p.is_file()) < 8e6
    shutil.rmtree(cache)
