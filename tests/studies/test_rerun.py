"""A study's recorded settings fingerprint its base wherever the base's files are on this machine, not only for a
local folder: the built-in model's GGUF inside its package and a hub id's cached snapshot changed between runs (an
upgraded package, a newer revision fetched) without a rerun seeing it."""

import shutil

import huggingface_hub.constants
import pytest

from loraforge.config import load_train_config
from loraforge.models import BUILTIN_MODELS
from loraforge.studies.rerun import going_on, study_settings
from loraforge.utils import fingerprint
from loraforge.utils.fingerprint import model_fingerprint
from loraforge.utils.outputs import OutputError, write_own


def _refusal_after_change(name, files, change, tmp_path, data_file):
    """Record a study's settings for base `name`, change its `files` with `change`, and return the rerun's refusal
    (the settings, recorded and now, checked first against the files' own fingerprint)."""
    cfg = load_train_config(None, [f"model.name={name}", f"data.train={data_file}", f"output_dir={tmp_path}"])
    settings = study_settings(cfg, [])
    assert settings["base"] == {"path": name, "fingerprint": model_fingerprint(str(files))}
    out = tmp_path / "study"
    out.mkdir()
    write_own(out, "forgetting", {}, overwrite=False, settings=settings)
    assert going_on(out, "forgetting", study_settings(cfg, []), overwrite=False)  # unchanged: it goes on
    change()
    with pytest.raises(OutputError) as e:
        going_on(out, "forgetting", study_settings(cfg, []), overwrite=False)
    return str(e.value)


def test_the_built_in_models_file_changed_in_its_package_is_refused(data_file, tmp_path, monkeypatch):
    """The built-in name fingerprints the GGUF file in its package (before: no fingerprint, so a reinstalled package
    holding other weights went on)."""
    monkeypatch.setattr(fingerprint, "WHOLE", 0)  # sampled, as the real 100 MB file is
    package = tmp_path / "site" / "fake_builtin_pkg"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    gguf = package / "model.gguf"
    gguf.write_bytes(b"GGUF" + bytes(range(256)) * 400)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setitem(BUILTIN_MODELS, "fake-builtin", ("fake_builtin_pkg", "model.gguf"))

    def reinstalled():  # the same size, other bytes
        gguf.write_bytes(b"GGUF" + bytes(reversed(range(256))) * 400)
    message = _refusal_after_change("fake-builtin", gguf, reinstalled, tmp_path, data_file)
    assert "(the base model fake-builtin (its weights, config or tokenizer) changed)" in message, message
    assert "pass --overwrite (overwrite=True)" in message


def test_a_hub_models_cached_snapshot_changed_is_refused(tiny_dir, data_file, tmp_path, monkeypatch):
    """A hub id fingerprints the snapshot its cached config.json is in (what an offline load reads); a newer
    revision in the cache is seen (before: no fingerprint, the rerun went on). Not cached at all: no fingerprint."""
    cache = tmp_path / "hub"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    repo = cache / "models--someone--tiny"
    shutil.copytree(tiny_dir, repo / "snapshots" / ("a" * 40))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    cfg = load_train_config(None, ["model.name=someone/other", f"data.train={data_file}", f"output_dir={tmp_path}"])
    assert "base" not in study_settings(cfg, [])

    def newer_revision():
        shutil.copytree(tiny_dir, repo / "snapshots" / ("b" * 40))
        (repo / "snapshots" / ("b" * 40) / "config.json").write_text(
            (tiny_dir / "config.json").read_text().replace('"rms_norm_eps"', '"rope_theta_unused": 1, "rms_norm_eps"'))
        (repo / "refs" / "main").write_text("b" * 40)
    message = _refusal_after_change("someone/tiny", repo / "snapshots" / ("a" * 40), newer_revision, tmp_path,
                                     data_file)
    assert "(the base model someone/tiny (its weights, config or tokenizer) changed)" in message, message
