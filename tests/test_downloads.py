"""A hub model that cannot be downloaded ends in one line naming it and the alternatives, never a traceback.

No test touches the network: HF_HUB_OFFLINE=1 with an empty Hugging Face cache, or huggingface_hub's download
functions replaced by ones that raise what the hub raises (gated, unknown repository, no connection, disk full).
"""

import errno
import importlib
import os
import socket
import subprocess
import sys
import types
from pathlib import Path

import pytest
import transformers.utils.hub
from huggingface_hub import constants
from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

from loraforge.cli import main
from loraforge.models import ModelDownloadError, load_base, load_model, load_tokenizer
from loraforge.training.data import read_records
from loraforge.utils.hub import hub_resolves, hub_unreachable

ROOT = Path(__file__).resolve().parents[1]
HUB_ID = "meta-llama/Llama-3.2-1B"
INSTEAD = "; pass a local transformers directory, a .gguf file, or the built-in name smollm2-135m instead"
HERE = "<cwd>"  # the current directory where the model was looked for, filled in by here()


def not_downloaded(why: str, name: str = HUB_ID) -> str:
    return (f"model '{name}': no folder '{name}' exists in {HERE} (the current directory), so it was tried as a "
            f"Hugging Face Hub name, which could not be downloaded ({why}) and has no cached copy" + INSTEAD)


def here(message: str, cwd: Path | None = None) -> str:
    return message.replace(HERE, str(cwd or Path.cwd()))


OFFLINE = not_downloaded("HF_HUB_OFFLINE is set")


def _response(status: int):
    """An HTTP response as huggingface_hub's errors carry it (its HTTP library: httpx or httpx2)."""
    http = importlib.import_module(HfHubHTTPError.__mro__[1].__module__.split(".")[0])
    url = f"https://huggingface.co/{HUB_ID}/resolve/main/config.json"
    return http.Response(status, request=http.Request("GET", url))


ERRORS = {
    "gated": (lambda: GatedRepoError("Access to model is restricted", response=_response(403)),
              f"model '{HUB_ID}' is gated on the Hugging Face Hub: request access at https://huggingface.co/{HUB_ID} "
              f"and log in (hf auth login, or set HF_TOKEN)" + INSTEAD),
    "unauthorized": (lambda: HfHubHTTPError("401 Client Error", response=_response(401)),
                     f"model '{HUB_ID}' is gated on the Hugging Face Hub: request access at "
                     f"https://huggingface.co/{HUB_ID} and log in (hf auth login, or set HF_TOKEN)" + INSTEAD),
    "unknown": (lambda: RepositoryNotFoundError("Repository Not Found", response=_response(401)),
                f"model '{HUB_ID}' is neither a folder in {HERE} (the current directory) nor a repository on the "
                f"Hugging Face Hub (a private one needs hf auth login)" + INSTEAD),
    "no network": (lambda: LocalEntryNotFoundError("An error happened while trying to locate the file on the Hub"),
                   not_downloaded("no connection to the Hugging Face Hub")),
    "disk full": (lambda: OSError(errno.ENOSPC, "No space left on device"),
                  f"no disk space left to download model '{HUB_ID}' into the Hugging Face cache "
                  f"{constants.HF_HUB_CACHE} (free some, or point HF_HUB_CACHE at a larger disk)" + INSTEAD),
}


@pytest.fixture
def hub_raises(monkeypatch):
    """Make every hub download raise `error()`; returns the list of files asked for."""
    asked = []

    def install(error):
        def download(repo_id, filename=None, **kwargs):
            asked.append((repo_id, filename))
            raise error()

        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(transformers.utils.hub, "hf_hub_download", download)
        monkeypatch.setattr(transformers.utils.hub, "snapshot_download", download)
        return asked

    return install


@pytest.mark.parametrize("kind", list(ERRORS))
def test_each_download_failure_is_one_line_with_the_alternatives(kind, hub_raises):
    error, expected = ERRORS[kind]
    asked = hub_raises(error)
    for load in (load_tokenizer, load_model):
        with pytest.raises(ModelDownloadError) as e:
            load(HUB_ID)
        assert str(e.value) == here(expected)
        assert "\n" not in str(e.value)
    assert asked and all(repo == HUB_ID for repo, _ in asked)  # the hub was asked (the stand-in), for this model


def test_download_failure_through_the_cli_in_process(hub_raises, capsys):
    hub_raises(ERRORS["gated"][0])
    assert main(["generate", "hi", "--model", HUB_ID]) == 2
    assert capsys.readouterr().err == f"error: {ERRORS['gated'][1]}\n"


def test_other_errors_are_not_disguised_as_download_failures(hub_raises, tiny_dir):
    hub_raises(lambda: RuntimeError("a bug, not a download failure"))
    with pytest.raises(Exception) as e:  # transformers' own error (it wraps ours in an OSError), left as it is
        load_tokenizer(HUB_ID)
    assert not isinstance(e.value, ModelDownloadError)
    chain, err = [], e.value
    while err is not None:
        chain.append(err)
        err = err.__cause__ or err.__context__
    assert {str(x) for x in chain if isinstance(x, RuntimeError)} == {"a bug, not a download failure"}
    model, tokenizer = load_base(str(tiny_dir))  # a local directory never reaches the hub
    assert model.config.vocab_size == len(tokenizer)


def test_a_hub_whose_host_does_not_resolve_is_read_offline_at_once(hub_raises, monkeypatch):
    """Soak: without a network huggingface_hub retried each request for about 85 s before the one-line error; where
    the Hub's host does not resolve, the cache is read as under HF_HUB_OFFLINE (a cached copy loads), only then."""
    offline_when_asked = []
    hub_raises(lambda: LocalEntryNotFoundError("not in the cache, and offline"))

    def download(repo_id, filename=None, **kwargs):
        offline_when_asked.append(constants.is_offline_mode())
        raise LocalEntryNotFoundError("not in the cache, and offline")

    def no_dns(host, *args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(transformers.utils.hub, "hf_hub_download", download)
    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    with pytest.raises(ModelDownloadError) as e:
        load_tokenizer(HUB_ID)
    assert str(e.value) == here(not_downloaded("no connection to the Hugging Face Hub"))
    assert offline_when_asked and all(offline_when_asked) and not constants.HF_HUB_OFFLINE  # set for the load only


def test_the_hub_is_looked_up_once_a_process_and_decided_in_one_place(hub_raises, monkeypatch, capsys):
    """A model load asked the resolver three times (config, weights, tokenizer) and a hub dataset once more, each
    deciding offline-or-not from its own library's copy of HF_HUB_OFFLINE. One lookup now, for all of them; and
    HF_HUB_OFFLINE set (in huggingface_hub or the datasets copy) asks none."""
    lookups = []

    def no_dns(host, *args, **kwargs):
        lookups.append(host)
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    hub_raises(lambda: LocalEntryNotFoundError("not in the cache, and offline"))
    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    for load in (load_base, load_model, load_tokenizer):
        with pytest.raises(ModelDownloadError):
            load(HUB_ID)
    fake = types.ModuleType("datasets")
    fake.config = types.SimpleNamespace(HF_HUB_OFFLINE=False)
    fake.load_dataset = lambda name, split: [{"text": "cached"}]
    monkeypatch.setitem(sys.modules, "datasets", fake)
    assert read_records("org/name") == [{"text": "cached", "_source": "org/name:train[0]"}]
    assert "from the cache (no connection to the Hugging Face Hub)" in capsys.readouterr().err
    assert lookups == ["huggingface.co"]
    assert hub_unreachable() and not hub_unreachable(types.SimpleNamespace(HF_HUB_OFFLINE=True))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert not hub_unreachable()
    hub_resolves.cache_clear()
    assert not hub_unreachable() and lookups == ["huggingface.co"]  # offline asked for: no lookup


def test_offline_without_a_cached_copy_through_the_command_line(tmp_path, data_file):
    """The real thing, no stand-ins: HF_HUB_OFFLINE=1, an empty Hugging Face cache, `loraforge train`."""
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"model: {{name: {HUB_ID}}}\ndata: {{train: {data_file}}}\noutput_dir: {tmp_path / 'out'}\n"
                   "training: {precision: fp32, max_steps: 1}\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
           "HF_HUB_CACHE": str(tmp_path / "hf" / "hub")}
    env.pop("TRANSFORMERS_OFFLINE", None)
    done = subprocess.run([sys.executable, "-m", "loraforge", "train", str(cfg)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stderr.splitlines() == [f"error: {here(OFFLINE, ROOT)}"], done.stderr
    assert not (tmp_path / "out").exists()  # nothing written


def test_a_name_that_is_no_folder_here_says_where_it_was_looked_for_before_the_hub(hub_raises, tmp_path,
                                                                                    monkeypatch, capsys):
    """Carried over: `cd /tmp; loraforge eval data --model tiny`, whose ./tiny was in another folder, said only that
    'tiny' could not be downloaded: now that no folder tiny exists in the current directory, then the Hub's answer."""
    (tmp_path / "d.jsonl").write_text('{"text": "hello world"}\n')
    monkeypatch.chdir(tmp_path)
    hub_raises(lambda: LocalEntryNotFoundError("An error happened while trying to locate the file on the Hub"))
    for name in ("tiny", "models/tiny"):
        assert main(["eval", "d.jsonl", "--model", name, "--precision", "fp32"]) == 2
        said = not_downloaded("no connection to the Hugging Face Hub", name)
        assert capsys.readouterr().err == f"error: {here(said, tmp_path)}\n"


@pytest.mark.parametrize("content, said", [(b"notgguf\n", "not a GGUF file (it starts with b'notg', not b'GGUF')"),
                                           (b"", "an empty file")])
def test_a_gguf_path_that_holds_no_gguf_is_one_line_before_any_conversion(tmp_path, capsys, monkeypatch, content,
                                                                          said):
    """transformers' 'does not start with the GGUF magic bytes' (or mmap's 'cannot mmap an empty file') was a
    traceback, after a conversion lock was taken in the cache."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    path = tmp_path / "model.gguf"
    path.write_bytes(content)
    assert main(["generate", "hi", "--model", str(path)]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: model {path}: {said}; give a llama.cpp .gguf file, a transformers directory, a hub id or a "
        f"built-in name (smollm2-135m)")
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("*.lock"))
