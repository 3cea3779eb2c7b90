"""A local model's fingerprint: the same for the same files wherever they lie, changed by a change to any tensor's
values (header and size the same), blind to files that are not the model's; large files are sampled, not read."""

import shutil

from safetensors import safe_open
from safetensors.torch import load_file, save_file

from helpers import tiny_llama
from loraforge.utils import fingerprint
from loraforge.utils.fingerprint import model_fingerprint


def _header(file) -> bytes:
    raw = file.read_bytes()
    return raw[:8 + int.from_bytes(raw[:8], "little")]


def test_a_change_to_one_tensor_changes_the_fingerprint_of_a_sampled_file(tmp_path, monkeypatch):
    monkeypatch.setattr(fingerprint, "WHOLE", 0)  # every file sampled, as a real model's weights are
    tiny_llama(vocab_size=1000, tie_word_embeddings=True).save_pretrained(tmp_path / "a")
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    first = model_fingerprint(str(tmp_path / "a"))
    assert model_fingerprint(str(tmp_path / "b")) == first and len(first) == 64  # the same files elsewhere
    assert model_fingerprint("HuggingFaceTB/SmolLM2-135M") is None  # a hub id: nothing on disk to fingerprint

    (tmp_path / "a" / "README.md").write_text("notes")
    assert model_fingerprint(str(tmp_path / "a")) == first  # not a model file

    weights = tmp_path / "a" / "model.safetensors"
    header, size = _header(weights), weights.stat().st_size
    with safe_open(weights, "pt") as f:
        metadata = f.metadata()
    tensors = load_file(weights)
    name = next(n for n in tensors if "layers.1.self_attn.v_proj" in n)  # one module, as a merged LoRA changes
    tensors[name] = tensors[name] + 0.01
    save_file(tensors, weights, metadata=metadata)
    assert (_header(weights), weights.stat().st_size) == (header, size)  # only the values differ
    assert model_fingerprint(str(tmp_path / "a")) != first

    reads = []
    real_read = fingerprint._read
    monkeypatch.setattr(fingerprint, "_read", lambda f, offset, n: reads.append(n) or real_read(f, offset, n))
    fingerprint.file_fingerprint(weights)
    # the header and SAMPLE bytes at two places of each tensor: far less than the file
    assert sum(reads) == 8 + len(header) - 8 + sum(min(fingerprint.SAMPLE, t.numel() * t.element_size() - half)
                                                    for t in tensors.values()
                                                    for half in (0, t.numel() * t.element_size() // 2))
    assert sum(reads) < size / 4
