"""Crash- and concurrency-safety of what loraforge keeps on disk: directories replaced as one set, temporary names
of their own per writer, the converted-model cache (seed, damage, unusable folders, leftovers, modes) and the cached
CPU kernels."""

import contextlib
import errno
import linecache
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import loraforge.models as M
import loraforge.utils.files as F
from loraforge.inference import cpu_kernels
from loraforge.utils.files import DiskError, atomic_dir, atomic_file, umask
from loraforge.utils.outputs import make_output


def files(d) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(d.iterdir())}


# --- atomic_dir / atomic_file -------------------------------------------------------------------------------

@pytest.fixture
def old_adapter(tmp_path):
    with atomic_dir(tmp_path / "adapter") as tmp:
        (tmp / "adapter_config.json").write_text("alpha 8")
        (tmp / "adapter_model.safetensors").write_text("old weights")
        (tmp / "README.md").write_text("notes")
    return tmp_path / "adapter"


@pytest.mark.parametrize("exchange", [True, False])  # renameat2's swap, or the two renames where there is none
def test_replacing_a_directory_gives_the_new_set_with_the_files_it_does_not_replace(old_adapter, monkeypatch,
                                                                                   exchange):
    if not exchange:
        monkeypatch.setattr(F, "_exchange", lambda a, b: False)
    with atomic_dir(old_adapter) as tmp:
        (tmp / "adapter_config.json").write_text("alpha 64")
        (tmp / "adapter_model.safetensors").write_text("new weights")
    assert files(old_adapter) == {"README.md": "notes", "adapter_config.json": "alpha 64",
                                  "adapter_model.safetensors": "new weights"}
    assert sorted(p.name for p in old_adapter.parent.iterdir()) == ["adapter"]  # no .tmp- or .old- left


WRITER = """
import os, signal, sys, time
from loraforge.utils.files import atomic_dir
with atomic_dir(sys.argv[1]) as tmp:
    (tmp / "model.safetensors").write_bytes(b"part of a merge")
    print(tmp, flush=True)
    if sys.argv[2] == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    sys.stdin.read()  # a live writer: works until the test closes its stdin
"""


def _writer(final, how):
    """A process writing `final` through atomic_dir; returns it and the temporary folder it writes into."""
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(final), how], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})  # this checkout's loraforge
    return proc, Path(proc.stdout.readline().strip())


def _age(path, seconds):
    for p in (path, *path.rglob("*")):
        os.utime(p, (time.time() - seconds,) * 2)


@pytest.mark.skipif(sys.platform == "win32", reason="no flock: leftovers stay")
def test_a_killed_writers_temporary_folder_goes_at_the_next_write_and_a_live_ones_stays(tmp_path):
    """A merge killed mid-write left `.tmp-<out>-*` beside --out for good (5 kills: 513 MB). The next write of the
    same folder removes it; a live writer's (it holds its folder's flock), another folder's and an empty one made a
    moment ago (a live writer between its mkdtemp and its lock) stay."""
    final = tmp_path / "out"
    live, working = _writer(final, "live")  # first: its own sweep would take the killed one's
    killed, left = _writer(final, "kill")
    killed.wait()
    other = tmp_path / ".tmp-out-2-abcd1234"  # the temporary folder of a folder named out-2
    other.mkdir()
    (other / "model.safetensors").write_bytes(b"x")
    recent = tmp_path / ".tmp-out-abcd1234"  # unlocked and empty, made a moment ago
    recent.mkdir()
    for d in (left, working, other):
        _age(d, 3600)  # an hour untouched
    try:
        assert killed.returncode == -signal.SIGKILL and left.is_dir()
        with atomic_dir(final) as tmp:
            (tmp / "model.safetensors").write_bytes(b"the new merge")
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted([working.name, other.name, recent.name, "out"])
        assert files(working) == {"model.safetensors": "part of a merge"}
        assert files(final) == {"model.safetensors": "the new merge"}
    finally:
        live.communicate("")
    assert live.returncode == 0 and files(final) == {"model.safetensors": "part of a merge"}  # its rename, last


@pytest.mark.skipif(sys.platform == "win32", reason="no flock: leftovers stay")
def test_a_killed_writers_written_temporary_folder_goes_at_once_a_live_one_stays(tmp_path):
    """Soak: a merge SIGKILLed a moment ago left its `.tmp-<out>-*` folder beside the rerun's result until it was 60
    s old (the rerun took 33 s: it stayed; up to the size of the model), though its writer's flock on it died with
    it. The writer locks its folder before the first byte (waiting out a sweep's look): a folder that holds
    something and no one holds goes at the next write at once (the reference: the folder then holds what one
    uninterrupted write leaves); a live writer's stays."""
    final = tmp_path / "out"
    live, working = _writer(final, "live")  # first: its own sweep would take the killed one's at once
    killed, left = _writer(final, "kill")
    killed.wait()
    try:
        assert killed.returncode == -signal.SIGKILL and files(left) == {"model.safetensors": "part of a merge"}
        with atomic_dir(final) as tmp:
            (tmp / "model.safetensors").write_bytes(b"the new merge")
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted([working.name, "out"])
        assert files(working) == {"model.safetensors": "part of a merge"}
        assert files(final) == {"model.safetensors": "the new merge"}
    finally:
        live.communicate("")
    assert live.returncode == 0 and files(final) == {"model.safetensors": "part of a merge"}  # its rename, last


def test_a_replacement_that_dies_before_its_swap_leaves_the_old_set_whole(old_adapter, monkeypatch):
    def killed(a, b):
        raise KeyboardInterrupt  # as a signal landing where the old code had renamed half the files

    monkeypatch.setattr(F, "_exchange", killed)
    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(old_adapter) as tmp:
            (tmp / "adapter_config.json").write_text("alpha 64")
            (tmp / "adapter_model.safetensors").write_text("new weights")
    assert files(old_adapter) == {"README.md": "notes", "adapter_config.json": "alpha 8",
                                  "adapter_model.safetensors": "old weights"}
    assert sorted(p.name for p in old_adapter.parent.iterdir()) == ["adapter"]


def test_the_swap_is_one_step_on_linux(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x").write_text("a")
    (tmp_path / "b").mkdir()
    if not F._exchange(tmp_path / "a", tmp_path / "b"):
        pytest.skip("no renameat2(RENAME_EXCHANGE) here")
    assert files(tmp_path / "b") == {"x": "a"} and files(tmp_path / "a") == {}


def test_two_writers_of_one_directory_each_write_their_own_temporary_one(tmp_path):
    final = tmp_path / "step-0000003"
    with atomic_dir(final) as first:
        (first / "trainable.safetensors").write_text("first")
        with atomic_dir(final) as second:
            assert first != second
            (second / "trainable.safetensors").write_text("second")
        assert files(first) == {"trainable.safetensors": "first"}  # the second did not remove the first's
    assert files(final) == {"trainable.safetensors": "first"}  # the last to finish wins, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-0000003"]


def test_a_writer_that_may_not_replace_leaves_a_directory_another_filled_meanwhile(tmp_path):
    """Two `merge` runs to one new --out without --overwrite both succeeded (the later one replaced the other's)."""
    final = tmp_path / "merged"
    with pytest.raises(FileExistsError, match=f"{final} was written by another command while this one worked"):
        with atomic_dir(final, replace=False) as mine:
            (mine / "model.safetensors").write_text("mine")
            with atomic_dir(final, replace=False) as theirs:
                (theirs / "model.safetensors").write_text("theirs")
    assert files(final) == {"model.safetensors": "theirs"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]
    (tmp_path / "empty").mkdir()  # an empty folder is no one's work: it is taken
    with atomic_dir(tmp_path / "empty", replace=False) as tmp:
        (tmp / "x").write_text("x")
    assert files(tmp_path / "empty") == {"x": "x"}


@pytest.mark.parametrize("exchange", [True, False])
def test_a_link_to_a_folder_is_written_through_and_stays_a_link(old_adapter, monkeypatch, exchange):
    """Soak: `merge --out linkout --overwrite` (linkout -> realout) replaced the link with a folder, left realout with
    the old model and a `.tmp-linkout-*` link no run swept; into a link to an empty folder, without --overwrite, it
    failed after the merge ("a part of the path is a file")."""
    if not exchange:
        monkeypatch.setattr(F, "_exchange", lambda a, b: False)
    root = old_adapter.parent
    (root / "link").symlink_to(old_adapter)
    stray = root / ".tmp-link-abcd1234"  # what the exchange with a link left before
    stray.symlink_to(old_adapter)
    with atomic_dir(root / "link") as tmp:
        (tmp / "adapter_model.safetensors").write_text("new weights")
    assert (root / "link").is_symlink() and os.readlink(root / "link") == str(old_adapter)
    assert files(old_adapter) == {"README.md": "notes", "adapter_config.json": "alpha 8",
                                  "adapter_model.safetensors": "new weights"}
    (root / "empty").mkdir()
    (root / "to-empty").symlink_to("empty")  # a relative link, and a writer that may not replace
    with atomic_dir(root / "to-empty", replace=False) as tmp:
        (tmp / "x").write_text("x")
    assert (root / "to-empty").is_symlink() and files(root / "empty") == {"x": "x"}
    assert sorted(p.name for p in root.iterdir()) == ["adapter", "empty", "link", "to-empty"]  # the stray link swept


def test_a_link_to_a_file_is_written_through_and_stays_a_link(tmp_path):
    (tmp_path / "model.gguf").write_text("old")
    (tmp_path / "link.gguf").symlink_to("model.gguf")
    with atomic_file(tmp_path / "link.gguf") as tmp:
        tmp.write_text("new")
    assert (tmp_path / "link.gguf").is_symlink() and (tmp_path / "model.gguf").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.gguf", "model.gguf"]


def test_dropped_patterns_of_the_old_set_are_not_kept(old_adapter):
    (old_adapter / "model-00001-of-00002.safetensors").write_text("an older export's shard")
    with atomic_dir(old_adapter, drop=("model-*-of-*.safetensors",)) as tmp:
        (tmp / "model.safetensors").write_text("new")
    assert files(old_adapter) == {"README.md": "notes", "adapter_config.json": "alpha 8",
                                  "adapter_model.safetensors": "old weights", "model.safetensors": "new"}


def test_numpys_short_write_is_a_disk_error(tmp_path):
    """numpy's tofile (GGUF tensors) reports a full disk or `ulimit -f` as "N requested and M written", an OSError
    without errno: it was a traceback, not the DiskError line."""
    error = F.disk_error(tmp_path / "x.gguf", OSError("2000 requested and 0 written"), need_bytes=4000)
    assert isinstance(error, DiskError) and str(error).startswith(
        f"cannot write {tmp_path / 'x.gguf'}: the disk took only part of a write (it is full, over a quota, or the "
        f"file passed the largest size allowed: `ulimit -f`) (about 4.0 kB needed, ")
    assert F.disk_error(tmp_path, OSError("something else")) is None


def test_free_space_is_said_only_when_the_error_is_about_space(tmp_path, monkeypatch):
    """Soak (smalls): a 'permission denied' refusal of an output folder added "(83.6 GB free there)", as if room
    were the matter. The room needed and free is said for a full disk, a quota and a file-size limit alone."""
    monkeypatch.setattr(F, "free_bytes", lambda path: 83_600_000_000)
    target = tmp_path / "out"
    for code, reason in [(errno.EACCES, "permission denied"), (errno.EPERM, "operation not permitted"),
                         (errno.EROFS, "the file system is read-only"), (errno.ENOTDIR, "a part of the path is a "
                                                                                        "file, not a folder")]:
        assert str(F.disk_error(target, OSError(code, os.strerror(code)), need_bytes=4000)) == \
            f"cannot write {target}: {reason}"
    for code, reason in [(errno.ENOSPC, "no space left on the device"), (errno.EDQUOT, "the disk quota is exceeded")]:
        assert str(F.disk_error(target, OSError(code, os.strerror(code)), need_bytes=4000)) == \
            f"cannot write {target}: {reason} (about 4.0 kB needed, 83.6 GB free there)"


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="no /proc/self/fd to see open files in")
def test_a_full_disk_under_a_file_is_measured_once_the_partial_file_is_gone(tmp_path, monkeypatch):
    """Soak: `export --to gguf` onto a full 3 MB tmpfs said "(0 B free there)": the partial file was unlinked, but
    its descriptor (the writer's lock) was still open, so its space was not free yet. The free space is now read
    with no descriptor of the partial file open: what the user has once the command has ended."""
    def free_bytes(path):
        held = []
        for fd in os.listdir("/proc/self/fd"):
            with contextlib.suppress(OSError):  # the listing's own descriptor, closed by now
                held.append(os.readlink(f"/proc/self/fd/{fd}"))
        return 0 if any(".tmp-x.gguf-" in target for target in held) else 3_100_000

    monkeypatch.setattr(F, "free_bytes", free_bytes)
    with pytest.raises(DiskError) as e:
        with atomic_file(tmp_path / "x.gguf") as tmp:
            tmp.write_bytes(b"part of a GGUF file")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert str(e.value) == f"cannot write {tmp_path / 'x.gguf'}: no space left on the device (3.1 MB free there)"
    assert os.listdir(tmp_path) == []


def test_torch_saves_lost_errno_is_a_disk_error_and_dcp_names_a_ranks_os_error(tmp_path):
    """torch.save's zip writer (DCP writes its non-tensor items with it) turns a refused write into RuntimeError
    "unexpected pos N vs M"; DCP's CheckpointException (a BaseException) carries every rank's error: the first
    OSError is the one named, else the first error."""
    from torch.distributed.checkpoint.api import CheckpointException

    from loraforge.training.dcp import written_error

    lost = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
    assert str(F.disk_error(tmp_path, lost)).startswith(f"cannot write {tmp_path}: the disk took only part of a write")
    assert F.disk_error(tmp_path, RuntimeError("unexpected pos 704 vs 598 elsewhere")) is None
    full = OSError(28, "No space left on device")
    both = CheckpointException("save failed", {0: (lost, None), 1: (full, None)})
    assert written_error(both) is full and written_error(CheckpointException("x", {0: (lost, None)})) is lost
    assert str(F.disk_error(tmp_path, written_error(both))).startswith(
        f"cannot write {tmp_path}: no space left on the device")


def test_written_files_and_folders_get_the_usual_modes(tmp_path):
    with atomic_dir(tmp_path / "adapter") as tmp:
        (tmp / "a").write_text("x")
    with atomic_file(tmp_path / "loss.png") as tmp:
        tmp.write_text("png")
    assert (tmp_path / "adapter").stat().st_mode & 0o777 == 0o777 & ~umask()  # not mkdtemp's 0700
    assert (tmp_path / "loss.png").stat().st_mode & 0o777 == 0o666 & ~umask()  # not mkstemp's 0600



@pytest.mark.parametrize("mask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)])
def test_published_weights_and_folders_get_the_umask_modes_not_the_temporary_files(tmp_path, mask, file_mode,
                                                                                    dir_mode):
    """adapter_model.safetensors, checkpoints' safetensors and the merged model were 0600 (safetensors' writer and
    mkstemp make private files) and a merged folder 0700, while the JSON beside them was 0644: another user or a
    container under another uid could not read the weights. Now what the atomic writers publish, at any depth, has
    the modes a plain open() / mkdir give under the umask."""
    import tempfile

    from safetensors.torch import save_file

    from loraforge.lora.adapters import write_adapter_dir

    old = os.umask(mask)
    try:
        assert umask() == mask
        with atomic_dir(tmp_path / "ckpt") as tmp:
            save_file({"w": torch.zeros(2)}, tmp / "trainable.safetensors")  # 0600 whatever the umask
            (tmp / "trainer_state.json").write_text("{}")
            (tmp / "sub").mkdir(mode=0o700)
            fd, name = tempfile.mkstemp(dir=tmp / "sub")
            os.close(fd)
            os.rename(name, tmp / "sub" / "model.safetensors")
        with atomic_dir(tmp_path / "ckpt") as tmp:  # a replacement: the new files get the modes too
            save_file({"w": torch.ones(2)}, tmp / "optimizer.safetensors")
        with atomic_file(tmp_path / "model.gguf") as tmp:
            save_file({"w": torch.zeros(2)}, tmp)
        write_adapter_dir(tmp_path / "adapter", {"w": torch.zeros(2)}, {"peft_type": "LORA"})
    finally:
        os.umask(old)

    def mode(path):
        return path.stat().st_mode & 0o777

    ckpt = tmp_path / "ckpt"
    assert {p.relative_to(tmp_path).as_posix(): oct(mode(p)) for p in [ckpt, *sorted(ckpt.rglob("*"))]} == {
        "ckpt": oct(dir_mode), "ckpt/sub": oct(dir_mode), "ckpt/sub/model.safetensors": oct(file_mode),
        "ckpt/trainable.safetensors": oct(file_mode), "ckpt/trainer_state.json": oct(file_mode),
        "ckpt/optimizer.safetensors": oct(file_mode)}
    assert mode(tmp_path / "model.gguf") == file_mode
    adapter = tmp_path / "adapter"
    assert [oct(mode(p)) for p in (adapter, adapter / "adapter_model.safetensors", adapter / "adapter_config.json")] \
        == [oct(dir_mode), oct(file_mode), oct(file_mode)]


def test_the_umask_is_read_without_changing_it(monkeypatch):
    """Reading the mask by setting it left a moment in which another thread's new files got mask 0 (world-writable):
    Linux shows it in /proc/self/status, read from there."""
    if not os.path.exists("/proc/self/status"):
        pytest.skip("no /proc/self/status here")
    old = os.umask(0o027)
    try:
        monkeypatch.setattr(os, "umask", lambda mask: pytest.fail("the umask was changed to read it"))
        assert umask() == 0o027
    finally:
        monkeypatch.undo()
        os.umask(old)

# --- the converted-model cache ------------------------------------------------------------------------------

def stand_in(gguf, tmp):
    """A conversion that draws random numbers, as building models does."""
    torch.rand(1000)
    random.random()
    (tmp / "config.json").write_text("{}")
    (tmp / "model.safetensors").write_bytes(b"w" * 100)


def test_a_conversion_leaves_the_seeded_random_state_as_it_found_it(tmp_path):
    """The run seeds, then the cache converts (cold) or not (warm): the adapter's init must draw the same numbers."""
    torch.manual_seed(3)
    random.seed(3)
    warm = torch.rand(5), random.random()
    torch.manual_seed(3)
    random.seed(3)
    assert M.cached_conversion(tmp_path / "m.gguf", tmp_path / "m-1", stand_in) == tmp_path / "m-1"
    cold = torch.rand(5), random.random()
    torch.testing.assert_close(cold[0], warm[0], rtol=0, atol=0)
    assert cold[1] == warm[1]


def test_a_damaged_conversion_is_refused_with_the_folder_to_delete(tmp_path):
    out = M.cached_conversion(tmp_path / "m.gguf", tmp_path / "m-1", stand_in)
    assert M.cached_conversion(tmp_path / "m.gguf", out, stand_in) == out  # whole: used
    os.truncate(out / "model.safetensors", 40)
    with pytest.raises(FileExistsError) as e:
        M.cached_conversion(tmp_path / "m.gguf", out, stand_in)
    assert str(e.value) == (f"the converted model {out} is damaged (model.safetensors is 40 bytes, written as 100); "
                            f"delete {out} and run again to convert it anew")


def test_a_conversion_removes_the_leftovers_of_killed_ones_and_is_readable_by_all(tmp_path):
    left = tmp_path / "m-1.tmp-abc123"  # a converter killed mid-way
    left.mkdir()
    (left / "model.safetensors").write_bytes(b"half")
    out = M.cached_conversion(tmp_path / "m.gguf", tmp_path / "m-1", stand_in)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m-1", "m-1.lock"]
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask()  # not mkdtemp's 0700: a shared cache stays shared


def test_a_cache_below_a_file_is_refused_with_one_line_naming_loraforge_cache(tmp_path, monkeypatch):
    (tmp_path / "afile").write_text("x")
    monkeypatch.setenv("LORAFORGE_CACHE", str(tmp_path / "afile" / "cache"))
    with pytest.raises(DiskError) as e:
        M.cached_conversion(tmp_path / "m.gguf", M.cache_dir() / "m-1", stand_in)
    text = str(e.value)
    assert text.startswith(f"cannot write {tmp_path / 'afile' / 'cache'}: a part of the path is a file, not a folder")
    assert text.endswith("; converted models are cached there: set LORAFORGE_CACHE to a folder this user can write")



@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc")
@pytest.mark.parametrize("writer", [atomic_dir, atomic_file])
def test_a_path_the_file_system_will_not_create_is_one_line_naming_it(writer):
    """/proc takes no new files (ENOENT though it exists): merge and export printed Python's "[Errno 2] No such
    file or directory: '/proc/.tmp-m-itp0dt0_'", naming a temporary the user never chose."""
    target = Path("/proc/loraforge-out")
    with pytest.raises(DiskError) as e:
        with writer(target):
            pass
    assert str(e.value) == (f"cannot write {target}: No such file or directory (the file system's answer); choose "
                            f"another path")


@pytest.mark.skipif(not hasattr(os, "getuid"), reason="no user ids here")
def test_no_home_directory_is_one_line_naming_loraforge_cache(tmp_path, monkeypatch):
    """Soak: HOME unset for a user id the password database lacks (`env -i`, a container run as an arbitrary
    user): every command, on a local model too, ended in pathlib's "RuntimeError: Could not determine home
    directory." (the kernels' cache path is read at import). XDG_CACHE_HOME and LORAFORGE_CACHE still serve."""
    for name in ("HOME", "LORAFORGE_CACHE", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    def no_home(cls):
        raise RuntimeError("Could not determine home directory.")  # pathlib's, as on such a system

    monkeypatch.setattr(Path, "home", classmethod(no_home))
    with pytest.raises(DiskError) as e:
        M.cache_dir()
    assert str(e.value) == (f"loraforge has no folder to cache in: HOME is not set and user id {os.getuid()} has no "
                            f"home directory; set LORAFORGE_CACHE (or HOME) to a folder this user can write")
    # the kernels' cache, read at import (a command's parse imports it): no kernels, said when they would be built
    code = ("import pathlib, sys\n"
            "def no_home(cls):\n    raise RuntimeError('Could not determine home directory.')\n"
            "pathlib.Path.home = classmethod(no_home)\n"
            "from loraforge.inference import cpu_kernels as k\n"
            "print(k.CACHE, k._build())\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert (proc.returncode, proc.stdout) == (0, "None None\n"), proc.stderr[-2000:]
    assert proc.stderr.splitlines()[-1] == f"warning: {e.value}; decoding falls back to the slower plain PyTorch path"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert M.cache_dir() == tmp_path / "loraforge"


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc")
def test_a_study_output_folder_the_file_system_will_not_create_names_the_flag(tmp_path):
    """forgetting and continual make --out with make_output: /proc's refusal was Python's "[Errno 2] ..."."""
    with pytest.raises(DiskError) as e:
        make_output("/proc/loraforge-study")
    assert str(e.value) == ("--out: cannot write /proc/loraforge-study: No such file or directory (the file "
                            "system's answer); choose another --out")
    assert make_output(tmp_path / "a" / "b") == tmp_path / "a" / "b" and (tmp_path / "a" / "b").is_dir()


def test_the_cache_follows_loraforge_cache_then_xdg_cache_home_then_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("LORAFORGE_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert M.cache_dir() == tmp_path / "home" / ".cache" / "loraforge"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/cache")  # the XDG spec: a relative path is ignored
    assert M.cache_dir() == tmp_path / "home" / ".cache" / "loraforge"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert M.cache_dir() == tmp_path / "xdg" / "loraforge"
    monkeypatch.setenv("LORAFORGE_CACHE", str(tmp_path / "mine"))
    assert M.cache_dir() == tmp_path / "mine"

# --- the cached CPU kernels ---------------------------------------------------------------------------------

@pytest.mark.skipif(not (shutil.which(os.environ.get("CC", "cc")) and torch.cpu._is_avx2_supported()),
                    reason="builds the AVX2 kernels with a C compiler")
def test_a_damaged_cached_kernel_library_is_built_again(tmp_path, monkeypatch):
    """A truncated .so would kill the process with SIGBUS when loaded: its SHA-256 no longer matches, so it is
    rebuilt, byte-for-byte the size it was."""
    monkeypatch.setattr(cpu_kernels, "CACHE", tmp_path)
    assert cpu_kernels._build() is not None
    (lib,) = tmp_path.glob("decode-*.so")
    size = lib.stat().st_size
    cut = tmp_path / "cut.so"
    cut.write_bytes(lib.read_bytes()[:size // 2])
    os.replace(cut, lib)  # a new file: truncating the one this process has mapped would bring SIGBUS here
    assert not cpu_kernels._intact(lib)
    assert cpu_kernels._build() is not None
    assert lib.stat().st_size == size and cpu_kernels._intact(lib)


@pytest.mark.parametrize("noreplace", [True, False])  # renameat2's RENAME_NOREPLACE, or a look before the rename
def test_a_file_writer_that_may_not_replace_leaves_a_file_another_wrote_meanwhile(tmp_path, monkeypatch, noreplace):
    if not noreplace:
        monkeypatch.setattr(F, "_renameat2", lambda a, b, flag: False)
    final = tmp_path / "x.gguf"
    with pytest.raises(FileExistsError, match=f"{final} was written by another command while this one worked"):
        with atomic_file(final, replace=False) as mine:
            mine.write_text("mine")
            final.write_text("theirs")
    assert final.read_text() == "theirs" and sorted(p.name for p in tmp_path.iterdir()) == ["x.gguf"]
    with atomic_file(tmp_path / "new.gguf", replace=False) as tmp:
        tmp.write_text("new")
    assert (tmp_path / "new.gguf").read_text() == "new"


def test_a_cache_that_is_a_file_is_one_line_naming_loraforge_cache(tmp_path, monkeypatch):
    """Soak: LORAFORGE_CACHE set to a file gave "error: [Errno 17] File exists: '...'", naming neither."""
    (tmp_path / "cachefile").write_text("x")
    monkeypatch.setenv("LORAFORGE_CACHE", str(tmp_path / "cachefile"))
    with pytest.raises(DiskError) as e:
        M.cached_conversion(tmp_path / "m.gguf", M.cache_dir() / "m-1", stand_in)
    assert str(e.value) == (f"cannot write {tmp_path / 'cachefile'}: it is a file, not a folder; converted models are "
                            f"cached there: set LORAFORGE_CACHE to a folder this user can write")


def test_a_tokenizer_conversion_the_disk_refuses_names_the_cache_and_loraforge_cache(tmp_path, monkeypatch):
    """Soak: the weights' conversion on a nearly full cache said where converted models go and LORAFORGE_CACHE;
    the tokenizer's alone (weights=False, whose size is not checked first) said only "no space left"."""
    monkeypatch.setenv("LORAFORGE_CACHE", str(tmp_path / "cache"))

    def full(gguf, tmp):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    out = M.cache_dir() / "m-1-no-weights"
    with pytest.raises(DiskError) as e:
        M.cached_conversion(tmp_path / "m.gguf", out, full, weights=False)
    assert str(e.value).startswith(f"cannot write {out}: no space left on the device")
    assert str(e.value).endswith("; converted models are cached there: free space, or set LORAFORGE_CACHE to a folder "
                                 "with room") and e.value.errno == errno.ENOSPC
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["m-1-no-weights.lock"]


FILE_WRITER = """
import os, signal, sys
from loraforge.utils.files import atomic_file
with atomic_file(sys.argv[1]) as tmp:
    tmp.write_bytes(b"part of a GGUF file")
    print(tmp, flush=True)
    if sys.argv[2] == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    sys.stdin.read()
"""


def _file_writers(final):
    """A process writing `final` through atomic_file that lives on, then one killed mid-write (in this order: the
    live one's own sweep would take the killed one's temporary at once): (process, its temporary file) of each."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}  # this checkout's loraforge
    started = []
    for how in ("live", "kill"):
        proc = subprocess.Popen([sys.executable, "-c", FILE_WRITER, str(final), how], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True, env=env)
        started.append((proc, Path(proc.stdout.readline().strip())))
    started[1][0].wait()
    return started


@pytest.mark.skipif(sys.platform == "win32", reason="no flock: leftovers stay")
def test_a_killed_file_writers_temporary_file_goes_at_the_next_write_and_a_live_ones_stays(tmp_path):
    """Soak: a SIGKILL during export --to gguf left `.tmp-x.gguf-*` for good."""
    final = tmp_path / "x.gguf"
    (live, working), (killed, left) = _file_writers(final)
    try:
        assert killed.returncode == -signal.SIGKILL and left.is_file()
        for p in (left, working):
            _age(p, 3600)
        with atomic_file(final) as tmp:
            tmp.write_bytes(b"the new export")
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted([working.name, "x.gguf"])
    finally:
        live.communicate("")
    assert live.returncode == 0 and final.read_bytes() == b"part of a GGUF file"


@pytest.mark.skipif(sys.platform == "win32", reason="no flock: leftovers stay")
def test_a_killed_file_writers_written_temporary_goes_at_once_an_empty_or_live_one_stays(tmp_path):
    """Soak: the partial `.tmp-x.gguf-*` of an export --to gguf SIGKILLed a moment ago stayed beside the rerun's file
    (the size of the model) until it was 60 s old. The writer locks its file before the first byte and the kernel
    drops the lock at its death: a written file no one holds goes at the next write at once (the reference: the
    folder holds what one uninterrupted write leaves), a live writer's stays, and so does an unlocked empty one (a
    live writer between its mkstemp and its lock)."""
    final = tmp_path / "x.gguf"
    (live, working), (killed, left) = _file_writers(final)
    empty = tmp_path / ".tmp-x.gguf-abcd1234"
    empty.touch()
    try:
        assert killed.returncode == -signal.SIGKILL and left.read_bytes() == b"part of a GGUF file"
        with atomic_file(final) as tmp:
            tmp.write_bytes(b"the new export")
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted([working.name, empty.name, "x.gguf"])
        assert working.read_bytes() == b"part of a GGUF file" and final.read_bytes() == b"the new export"
    finally:
        live.communicate("")
    assert live.returncode == 0 and final.read_bytes() == b"part of a GGUF file"


@pytest.mark.parametrize("name,cut", [("m" * 255, "m" * 241), ("日" * 85, "日" * 80),
                                      ("m" * 240 + ".gguf", "m" * 240 + ".")], ids=["ascii", "japanese", "gguf"])
def test_a_name_as_long_as_the_file_system_takes_is_written_and_its_leftovers_swept(tmp_path, name, cut):
    """Soak: `merge --out` or `export --out` named 242-255 bytes (the file system takes up to 255) was refused as too
    long after the whole merge had run: its temporary `.tmp-<name>-<8>` was 14 bytes longer. The name in the
    temporary's is cut to 241 bytes (at a character: 80 × '日' is 240), and a killed writer's cut temporary is
    still swept."""
    left = tmp_path / f".tmp-{cut}-abcd1234"  # a killed writer's, an hour untouched
    left.mkdir()
    _age(left, 3600)
    with atomic_dir(tmp_path / name) as tmp:
        (tmp / "model.safetensors").write_bytes(b"the merge")
    with atomic_file(tmp_path / "x" / name) as tmp:
        tmp.write_bytes(b"the export")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([name, "x"])
    assert files(tmp_path / name) == {"model.safetensors": "the merge"}
    assert (tmp_path / "x" / name).read_bytes() == b"the export"


def ctrl_c_at_line(n: int):
    """A tracer that sends this process SIGINT (Ctrl-C, a notebook's stop button) as the nth line run in
    utils/files.py starts: KeyboardInterrupt comes from the tracer at that line. A bare `try:` line is not counted:
    raised there (a no-op instruction), CPython 3.11 skips the handler of the try around it, which a real Ctrl-C,
    delivered at a call or a jump, never meets."""
    seen = [0]

    def trace(frame, event, arg):
        if (event == "line" and frame.f_code.co_filename == F.__file__
                and linecache.getline(F.__file__, frame.f_lineno).strip() != "try:"):
            seen[0] += 1
            if seen[0] == n:
                os.kill(os.getpid(), signal.SIGINT)
        return trace
    return trace, seen


@pytest.mark.parametrize("kind", ["file", "dir"])
def test_ctrl_c_at_any_line_of_an_atomic_write_leaves_the_result_or_nothing(tmp_path, kind):
    """Soak (export --to gguf-lora stopped by a tracer): Ctrl-C between mkstemp (mkdtemp) and the assignment of its
    name left `.tmp-out.gguf-<8>` beside --out, named nowhere, so nothing removed it. Stopped at each line, the
    folder holds the whole result or nothing, and the write run again gives the uninterrupted bytes."""
    def write(path):
        with (atomic_file(path) if kind == "file" else atomic_dir(path)) as tmp:
            (tmp if kind == "file" else tmp / "a.txt").write_text("whole\n")

    def written(root):
        return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

    trace, seen = ctrl_c_at_line(-1)
    sys.settrace(trace)
    try:
        write(tmp_path / "ref" / "out")
    finally:
        sys.settrace(None)
    expected, stopped = written(tmp_path / "ref"), 0
    for n in range(1, seen[0] + 1):
        root = tmp_path / str(n)
        root.mkdir()
        sys.settrace(ctrl_c_at_line(n)[0])
        try:
            write(root / "out")
        except KeyboardInterrupt:
            stopped += 1
        finally:
            sys.settrace(None)
        assert sorted(p.name for p in root.iterdir()) in ([], ["out"]), n
        assert written(root) in ({}, expected), n
        write(root / "out")  # run again: replaces a whole result, or writes the first
        assert written(root) == expected, n
    assert stopped > seen[0] // 2
