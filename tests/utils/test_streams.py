"""The command line's standard streams (utils.streams): a reader that leaves, a full disk under the output, an
encoding without a character end no command."""

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import tiny_llama
from loraforge import __version__
from loraforge.models import load_tokenizer
from loraforge.utils.streams import ESCAPE, GuardedStream

ROOT = Path(__file__).resolve().parents[2]


def test_text_an_encoding_lacks_is_escaped_and_a_file_names_byte_is_kept():
    """'×' and a Japanese character as backslash escapes (as Python's stderr writes them); the lone surrogate that
    stands for a file name's byte 0xe9 (not UTF-8) as that byte, as `ls` shows the name."""
    assert "1 × 2 日 caf\udce9".encode("ascii", ESCAPE) == b"1 \\xd7 2 \\u65e5 caf\xe9"
    assert "caf\udce9 \ud83d".encode("utf-8", ESCAPE) == b"caf\xe9 \\ud83d"  # half an emoji: escaped, not dropped


def test_a_stream_whose_reader_left_writes_to_dev_null_from_then_on():
    read, write = os.pipe()
    os.close(read)  # the reader leaves (`| head -3` after three lines)
    note = io.StringIO()
    stream = GuardedStream(io.TextIOWrapper(io.FileIO(write, "w"), encoding="utf-8"), "stdout")
    stream.other = note
    try:
        assert stream.write("step 1\n") == 7
        stream.flush()  # the write reaches the pipe here: EPIPE
        print("step 2", file=stream, flush=True)
        assert os.readlink(f"/proc/self/fd/{write}") == os.devnull
    finally:
        stream.close()
    assert note.getvalue() == ""  # a closed pipe is the reader's choice: nothing to say


@pytest.mark.parametrize("stdout", ["closed pipe", "full disk", "ascii"])
def test_train_ends_and_saves_whatever_becomes_of_its_output(stdout, tiny_dir, data_file, tmp_path):
    """`loraforge train ... | head -3` ended with a BrokenPipeError traceback at its fourth line, before training;
    `> log` on a full disk with an OSError; PYTHONIOENCODING=ascii with a UnicodeEncodeError at the '×' of its data
    line. Now each run trains and writes its adapter; the full disk is said once on stderr and in the exit code (its
    output did not all arrive), the '×' escaped."""
    if stdout == "full disk" and not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full here")
    config = tmp_path / "c.yaml"
    config.write_text("{}\n")
    argv = [sys.executable, "-m", "loraforge", "train", str(config), f"model.name={tiny_dir}",
            f"data.train={data_file}", "data.eval_fraction=0", "lora.r=4", "training.max_steps=2",
            "training.batch_size=3", "training.precision=fp32", f"output_dir={tmp_path / 'run'}"]
    env = {**os.environ, "PYTHONIOENCODING": "ascii"} if stdout == "ascii" else None
    log = tmp_path / "stdout.txt"
    with open("/dev/full" if stdout == "full disk" else log, "w") as out:
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE if stdout == "closed pipe" else out,
                                stderr=subprocess.PIPE, text=True)
        if stdout == "closed pipe":
            proc.stdout.close()
        err = proc.communicate(timeout=300)[1]
    assert proc.returncode == (1 if stdout == "full disk" else 0), err[-3000:]  # its output lost: as coreutils'
    assert "Traceback" not in err
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
    note = ("warning: cannot write to stdout (no space left on the device); the command goes on without its output "
            "there, and it ends with exit code 1")
    assert (note in err.splitlines()) == (stdout == "full disk")
    if stdout == "ascii":
        assert "13 whole steps of batch_size 3 \\xd7 gradient_accumulation 1" in log.read_text()


@pytest.mark.parametrize("argv", [["--help"], ["--version"], ["merge", "--help"]])
def test_help_or_version_on_a_full_disk_exits_1_as_its_warning_says(argv):
    """Soak: `loraforge --help > /dev/full` warned "it ends with exit code 1" and exited 0: argparse's exit after the
    help passed main() by. The lost output is now in the exit code, as for any command's; a usage error stays 2."""
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full here")
    with open("/dev/full", "w") as out:
        proc = subprocess.run([sys.executable, "-m", "loraforge", *argv], cwd=ROOT, stdout=out, stderr=subprocess.PIPE,
                              text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr == ("warning: cannot write to stdout (no space left on the device); the command goes on "
                           "without its output there, and it ends with exit code 1\n")


# `loraforge --version` started without one standard descriptor: its exit code and what descriptors 0-2 are
WITHOUT_ONE = """
import json, os, sys
from loraforge.cli import main
sys.argv = ["loraforge", "--version"]
try:
    code = main()
except SystemExit as e:
    code = e.code
fds = [os.readlink(f"/proc/self/fd/{fd}") for fd in (0, 1, 2)]
with open(os.environ["RESULT_TO"], "w") as f:
    json.dump([code, fds], f)
"""


@pytest.mark.parametrize("closed", [0, 1, 2])
def test_a_standard_descriptor_closed_at_start_is_dev_null_and_a_closed_stdout_is_said_and_exits_1(closed, tmp_path):
    """Soak: `loraforge eval data.jsonl 1>&-` printed its scores to nowhere and exited 0, silent (Python's sys.stdout
    is None then); and a closed 0, 1 or 2 is the number the next file opened takes, where what C code writes to
    stdout or stderr would land. Each is /dev/null now; a closed stdout is said on stderr and exits 1, as a full
    disk under it does; a closed stdin or stderr is the caller's choice, nothing said."""
    result = tmp_path / "result.json"
    proc = subprocess.run([sys.executable, "-c", WITHOUT_ONE], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "RESULT_TO": str(result)}, preexec_fn=lambda: os.close(closed))
    code, fds = json.loads(result.read_text())
    assert fds[closed] == os.devnull
    assert code == (1 if closed == 1 else 0)
    assert proc.stdout == ("" if closed == 1 else f"loraforge {__version__}\n")
    assert proc.stderr == ("warning: cannot write to stdout (it was closed); the command goes on without its output "
                           "there, and it ends with exit code 1\n" if closed == 1 else "")


# a tqdm bar of 20 updates over ~1 s, drawn by a command-line process (its streams guarded) into a log
BAR_INTO_A_LOG = """
import time
from loraforge.utils.streams import guard_streams
guard_streams()
from tqdm import tqdm
for _ in tqdm(range(20), desc="loading"):
    time.sleep(0.05)
"""


@pytest.mark.parametrize("interval", [None, "0"])
def test_every_progress_bar_into_a_log_is_redrawn_at_its_start_and_end_only(interval):
    """Soak: `merge ... 2> merge.log` kept transformers' "Loading weights" and "Writing model shards" bars redrawn
    every 0.1 s (training.report's own bars already waited LOG_INTERVAL_S where stderr is no terminal). Every tqdm
    bar of a command-line process now does; a TQDM_MININTERVAL the user set is kept (0: each of the 20 updates)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TQDM_")}
    env.update({"TQDM_MININTERVAL": interval} if interval is not None else {})
    proc = subprocess.run([sys.executable, "-c", BAR_INTO_A_LOG], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env=env)
    draws = [d.split("|")[0].strip() for d in re.split("[\r\n]", proc.stderr) if d.startswith("loading")]
    assert draws == (["loading:   0%", "loading: 100%"] if interval is None else
                     ["loading:   0%", *(f"loading: {5 * i:3d}%" for i in range(1, 21)), "loading: 100%"]), draws


# `loraforge generate`, its tokens counted as the streamer takes them (the first put is the prompt)
COUNTING = """
import os, sys, transformers
from loraforge.cli import main
count, put = [0], transformers.TextStreamer.put
def counted(self, value):
    count[0] += 1
    return put(self, value)
transformers.TextStreamer.put = counted
sys.argv[0] = "loraforge"
code = main()
with open(os.environ["TOKENS_TO"], "w") as f:
    f.write(str(count[0] - 1))
sys.exit(code)
"""


@pytest.mark.parametrize("flags", [[], ["--temperature", "0.7"]], ids=["static decoder", "transformers"])
def test_generate_stops_once_its_reader_has_left(flags, tmp_path):
    """`loraforge generate ... | head -c 10` went on to --max-new-tokens after head had left, its tokens written to
    /dev/null. It now ends at the first token after a write failed, exit 0 as before; on both decoding paths."""
    tokenizer = load_tokenizer("smollm2-135m")
    tiny_llama(vocab_size=len(tokenizer), max_position_embeddings=1024).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    argv = [sys.executable, "-c", COUNTING, "generate", "hi", "--model", str(tmp_path / "model"), "--max-new-tokens",
            "900", "--precision", "fp32", *flags]
    counts = []
    for reader_leaves in (True, False) if not flags else (True,):  # the reference once: sampling takes 0.1 s a token
        proc = subprocess.Popen(argv, cwd=ROOT, env={**os.environ, "TOKENS_TO": str(tmp_path / "count")},
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        if reader_leaves:
            assert proc.stdout.read(1)  # `head -c 1`: the first byte, then the reader leaves
            proc.stdout.close()
        err = proc.communicate(timeout=300)[1].decode()
        assert proc.returncode == 0 and "Traceback" not in err, err[-3000:]
        counts.append(int((tmp_path / "count").read_text()))
    assert counts[0] < 50, counts  # ended at once, but for the tokens written before the pipe closed
    assert counts[1:] in ([], [900])  # the reference: every token, the reader there (this random model never ends)
