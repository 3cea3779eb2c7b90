"""Where export --to gguf and gguf-lora write: the room their paths need, checked before any work."""

import os
import tempfile

import pytest
import torch
from transformers import AutoModelForCausalLM

from helpers import long_output
from loraforge.config import LoraConfig
from loraforge.export import gguf as gguf_export
from loraforge.export import gguf_lora
from loraforge.export.gguf import export_gguf
from loraforge.export.gguf_lora import export_gguf_lora
from loraforge.lora.adapters import save_adapter
from loraforge.lora.inject import inject

PATH_MAX = 4095  # the longest path Linux takes, in bytes (4,096 with the NUL)


@pytest.fixture(scope="module")
def adapter(tiny_dir, tmp_path_factory):
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("adapter") / "a"
    save_adapter(inject(AutoModelForCausalLM.from_pretrained(tiny_dir), LoraConfig(r=2, init_lora_weights=False)), out)
    return out


def export(to, base, adapter, out, **kwargs):
    return (export_gguf(base, adapter, out, type="f32", **kwargs) if to == "gguf" else
            export_gguf_lora(base, adapter, out, **kwargs))


@pytest.mark.parametrize("to", ["gguf", "gguf-lora"])
def test_a_gguf_out_too_long_for_its_temporaries_is_refused_before_any_work(to, tiny_dir, adapter, tmp_path,
                                                                           monkeypatch):
    """Soak: --out of 4,083 bytes (gguf) loaded, merged and converted the model, then failed on its temporary file
    (.tmp-<name>-<8>, 14 bytes more: "the path is too long"); gguf-lora at 4,081 wrote the .gguf, then failed on its
    Modelfile's temporary (19 bytes more), leaving the .gguf that a rerun refused. The room is the longest path the
    export makes, measured here: at an --out that long the export writes what it writes into a short folder, one byte
    longer is refused before the base or its config is read."""
    made = []
    mkstemp = tempfile.mkstemp

    def recorded(*args, **kwargs):
        fd, name = mkstemp(*args, **kwargs)
        made.append(name)
        return fd, name

    monkeypatch.setattr(tempfile, "mkstemp", recorded)
    short = export(to, str(tiny_dir), str(adapter), tmp_path / "short" / "m.gguf")
    written = [*made, *(str(p) for p in short.parent.iterdir())]
    room = max(len(os.fsencode(p)) for p in written) - len(os.fsencode(short))
    assert room == {"gguf": 14, "gguf-lora": 19}[to]  # .tmp-m.gguf-<8>, .tmp-m.Modelfile-<8> beside m.gguf
    edge = long_output(tmp_path / "edge", PATH_MAX - room - len("/m.gguf")) / "m.gguf"
    assert len(os.fsencode(edge)) == PATH_MAX - room
    out = export(to, str(tiny_dir), str(adapter), edge)
    assert sorted(p.name for p in out.parent.iterdir()) == sorted(p.name for p in short.parent.iterdir())
    assert out.read_bytes() == short.read_bytes()
    assert max(len(os.fsencode(p)) for p in made[-2:]) == PATH_MAX  # the longest temporary: at the limit
    monkeypatch.setattr(gguf_export, "load_base", lambda *a, **k: pytest.fail("loaded before the check"))
    monkeypatch.setattr(gguf_lora.AutoConfig, "from_pretrained", lambda *a, **k: pytest.fail("read before the check"))
    over = long_output(tmp_path / "over", PATH_MAX - room - len("/m.gguf") + 1) / "m.gguf"
    what = "the temporary file written beside it" if to == "gguf" else \
        "the temporary files written beside it and m.Modelfile"
    with pytest.raises(gguf_export.OutputError) as e:
        export(to, str(tiny_dir), str(adapter), over)
    assert str(e.value) == (f"--out {str(over)[:40]}...{str(over)[-30:]}: its full path is {PATH_MAX - room + 1:,} "
                            f"bytes, too long for {what} (this system takes paths of at most {PATH_MAX:,} bytes); "
                            f"choose a shorter --out")
    assert not over.parent.exists()  # nothing made


def test_a_gguf_lora_export_stopped_before_its_modelfile_is_finished_by_its_rerun(tiny_dir, adapter, tmp_path,
                                                                                   monkeypatch):
    """Soak: Ctrl-C between the .gguf and its Modelfile left the .gguf alone, and the rerun asked for --overwrite
    (a file it had written itself). The rerun now writes the Modelfile and leaves the .gguf as it is (the same
    file, not replaced), and the pair equals an uninterrupted export's; a .gguf of another adapter without its
    Modelfile is still refused, unchanged."""
    out = tmp_path / "ollama" / "m.gguf"
    stop = gguf_lora.atomic_file

    def interrupted(path, *args, **kwargs):
        if str(path).endswith(".Modelfile"):
            raise KeyboardInterrupt
        return stop(path, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(gguf_lora, "atomic_file", interrupted)
        with pytest.raises(KeyboardInterrupt):
            export_gguf_lora(str(tiny_dir), str(adapter), out)
    assert sorted(p.name for p in out.parent.iterdir()) == ["m.gguf"]
    first = os.stat(out)
    assert export_gguf_lora(str(tiny_dir), str(adapter), out) == out
    assert os.stat(out).st_ino == first.st_ino and os.stat(out).st_mtime_ns == first.st_mtime_ns  # left as it was
    finished = {p.name: p.read_bytes() for p in out.parent.iterdir()}
    export_gguf_lora(str(tiny_dir), str(adapter), out, overwrite=True)  # the reference: one uninterrupted export
    assert finished == {p.name: p.read_bytes() for p in out.parent.iterdir()}
    assert sorted(finished) == ["m.Modelfile", "m.gguf"]
    (out.parent / "m.Modelfile").unlink()  # the .gguf alone, now of another --type
    with pytest.raises(gguf_export.OutputError) as e:
        export_gguf_lora(str(tiny_dir), str(adapter), out, type="f16")
    assert str(e.value) == (f"--out {out} exists without its Modelfile m.Modelfile and holds another adapter file than "
                            f"this export writes (another --adapter or --type?); pass --overwrite (overwrite=True) to "
                            f"replace it, or choose another file")
    assert {p.name: p.read_bytes() for p in out.parent.iterdir()} == {"m.gguf": finished["m.gguf"]}
