"""Datasets: read records, detect their format, render the chat template, mask the prompt, pack, collate.

Three record formats:
  instruction  {"instruction": ..., "input": ... (optional), "output": ...}
  chat         {"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}  (content: a string or
               OpenAI's text parts; the first turn is system or user; tool calls and tool results are refused)
  text         {"text": ...}

Labels follow the Hugging Face convention: `labels` is aligned with `input_ids` and the loss shifts by one, so
labels[t] is the target predicted from tokens[:t]. -100 marks positions with no loss. labels[0] is never a target.

Packing and the attention mask (transformers >= 5): a packed row is passed with restarting `position_ids` and
WITHOUT `attention_mask`; `masking_utils.find_packed_sequence_indices` then builds a block-diagonal causal mask.
It only does so when there is no KV cache, so call the model with `use_cache=False` (or set
`model.config.use_cache = False`): with the default cache the examples of a row silently attend to each other.
"""

from __future__ import annotations

import codecs
import csv
import dataclasses
import functools
import io
import json
import os
import random
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from loraforge.decoding import turn_end_text
from loraforge.training.pieces import text_ids
from loraforge.training.report import progress_bar
from loraforge.utils.files import byte_order_mark, expand_user, missing_note
from loraforge.utils.hub import hub_unreachable, offline_hub
from loraforge.utils.weakcache import per_object

IGNORE = -100
FORMATS = ("instruction", "chat", "text")
SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".txt")
OVERFLOWS = ("auto", "truncate", "drop", "split")
PROGRESS_DELAY_S = 2.0  # build_dataset's progress bar shows only for data that takes longer to tokenize
TOOL_ROLES = ("tool", "function")  # OpenAI's tool results (and the older function results)
TOOL_KEYS = ("tool_calls", "function_call")  # OpenAI's assistant tool calls (and the older single call)
EOS_FIELD = {"instruction": "output", "text": "text"}  # the text that encode ends with the EOS token
TOKENS_VERSION = 2
"""How records become tokens, kept in every checkpoint ("tokens"; one without it is older): 2 since 2026-12-06, when
an instruction record became the chat template's conversation (its answer ending with the template's end of turn)
and a chat record was tokenized whole. Bump it where the same records tokenize otherwise, so that --resume of an
older checkpoint says so instead of calling the data changed."""
TOKENS_CHANGE = ("where the tokenizer has a chat template, an instruction record is now the template's conversation, "
                 "its answer ending with the template's end of turn, and a chat record is tokenized whole")
# a well-formed 2-4 byte UTF-8 sequence (a lead byte and its continuation bytes): a file with one is UTF-8 text
UTF8_MULTIBYTE = re.compile(rb"[\xc2-\xdf][\x80-\xbf]|[\xe0-\xef][\x80-\xbf]{2}|[\xf0-\xf4][\x80-\xbf]{3}")
ALPACA_PROMPT = ("Below is an instruction that describes a task. "
                 "Write a response that appropriately completes the request.\n\n"
                 "### Instruction:\n{instruction}\n\n### Response:\n")


class DataError(ValueError):
    """A problem with the user's data: the message names the file, line or record, and the field."""


@dataclass
class Example:
    """One tokenized example; `labels` has the length of `input_ids`, -100 where there is no loss."""
    input_ids: list[int]
    labels: list[int]


@dataclass
class DataStats:
    """What build_dataset did, for the run report. n_supervised_tokens counts loss targets (labels[1:] != -100)."""
    n_records: int = 0
    n_examples: int = 0
    n_truncated: int = 0   # kept, but cut to max_seq_len
    n_split: int = 0       # text records longer than max_seq_len cut into windows (overflow "split"; "auto" on text)
    n_dropped: int = 0     # too long with overflow="drop", or nothing left to supervise after truncation
    n_tokens: int = 0
    n_supervised_tokens: int = 0
    n_eos_stripped: int = 0  # answers (chat: assistant turns) that ended with the EOS text: learnt once, not twice
    dropped: list[str] = dataclasses.field(default_factory=list)  # the first few dropped records: "file.jsonl:41 (why)"


# ---------------------------------------------------------------------------------------------------- reading

def read_records(source: str) -> list[dict]:
    """Read records from a local .jsonl/.json/.csv/.parquet/.txt file, or else a hub dataset "name[:split]".

    Each record gets a "_source" key ("file.jsonl:12", "file.csv:3", ...) so later errors can point at it. A .txt
    file is plain text: one text record {"text"}, the whole file (_read_plain).
    """
    path = expand_user(source)  # "~/data.jsonl" from a YAML file, where no shell expands it
    if not path.exists():
        if path.suffix.lower() in SUFFIXES or source.startswith(("/", ".", "~")):  # a path, never a hub name
            raise DataError(f"no such file: {source}{missing_note(source) or _relative_note(path)}")
        return _read_hub(source)
    if path.is_dir():
        raise DataError(f"{source} is a directory; give a .jsonl, .json, .csv, .parquet or .txt file")
    suffix = path.suffix.lower()
    readers = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".txt": _read_plain,
               ".parquet": lambda p: [{**row, "_source": f"{p}[row {i}]"} for i, row in enumerate(_read_parquet(p))]}
    if suffix not in readers:
        raise DataError(f"{source}: unknown file type {suffix!r}; use .jsonl, .json, .csv, .parquet or .txt")
    try:
        path.open("rb").close()  # soak: an unreadable file was a PermissionError traceback (parquet: "not Parquet")
    except OSError as e:
        raise DataError(f"{source}: cannot be read ({e.strerror or e}); make it readable (e.g. chmod a+r "
                        f"{source}) or run as a user who may read it") from None
    records = readers[suffix](path)
    if not records:
        size = path.stat().st_size
        why = "the file is empty" if not size else {".csv": "only a header line", ".parquet": "0 rows",
                                                    ".json": "an empty list"}.get(suffix, "only blank lines")
        raise DataError(f"{source}: no records ({why})")
    return records


def _relative_note(path: Path) -> str:
    """Where a relative path was looked for: a config's paths are read from the current directory, not the config's
    folder (soak: the README's `loraforge train examples/demo.yaml`, run outside the repository, said only "no such
    file: loraforge/assets/demo_train.jsonl")."""
    if path.is_absolute() or str(path).startswith("~"):  # ~user that does not exist: said as typed
        return ""
    try:
        return f" (relative paths are read from the current directory, {Path.cwd()})"
    except OSError:  # the current directory was removed
        return " (relative paths are read from the current directory, which no longer exists)"


def _read_plain(path: Path) -> list[dict]:
    """A plain-text file as one text record: the whole file, line ends as "\\n", without the blank space around it.
    One text, not a record per line or paragraph: a record ends with the EOS token, which the model would learn to
    write after every heading. data.overflow's default cuts it into windows of max_seq_len (every token trained)."""
    text = _read_text(path, plain=True).replace("\r\n", "\n").replace("\r", "\n").strip()
    if not text and path.stat().st_size:
        raise DataError(f"{path}: no text (the file holds only blank space)")
    return [{"text": text, "_source": str(path)}] if text else []


def _read_jsonl(path: Path) -> list[dict]:
    records = []
    text = _read_text(path)
    if "\r" in text and "\n" not in text:  # old Mac line ends (CR only); JSON holds no raw CR inside a string
        text = text.replace("\r", "\n")
    for lineno, line in enumerate(_lines(text), start=1):
        if not line.strip():
            continue
        record = _json(line, path, lineno)
        if not isinstance(record, dict):
            raise DataError(f"{path}:{lineno}: expected a JSON object, got {json_type(record)}")
        records.append({**record, "_source": f"{path}:{lineno}"})
    return records


def _lines(text: str):
    """text.split("\n"), one line at a time: the list of every line was a second copy of the file beside the text
    and the records (a soak's 1 GB .jsonl peaked at 3 GB while read)."""
    start = 0
    while (end := text.find("\n", start)) >= 0:
        yield text[start:end]
        start = end + 1
    yield text[start:]


def json_type(value) -> str:
    """A value's type as JSON names it (the user wrote JSON, a CSV or a parquet, not Python): null, true/false,
    number, string, array, object."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (list, tuple)):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__  # a parquet cell: bytes, a timestamp, ...


def _json(text: str, path: Path, lineno: int | None = None) -> object:
    """json.loads, with every refusal a DataError naming where: bad syntax (line and column), an integer of more
    than 4,300 digits (Python's limit), nesting deeper than the parser's recursion allows. `lineno`: the line of
    a .jsonl file that `text` is."""
    where = f"{path}:{lineno}" if lineno else str(path)
    try:
        return json.loads(text, object_pairs_hook=functools.partial(_one_value_per_key, where))
    except json.JSONDecodeError as e:
        msg = e.msg.removesuffix(" at")  # "Invalid control character at": the position follows
        hint = ""
        if lineno is None and e.msg == "Extra data":  # one object per line in a .json file
            hint = f"; one JSON object per line is JSON Lines: name the file {Path(path).with_suffix('.jsonl').name}"
        elif lineno is not None and text.strip() in ("[", "{", "]", "}", "},", "],"):  # a pretty-printed JSON file
            hint = (f"; a .jsonl file holds one whole JSON object per line: a JSON array or pretty-printed JSON "
                    f"belongs in {Path(path).with_suffix('.json').name}")
        raise DataError(f"{path}:{lineno or e.lineno}: invalid JSON ({msg} at column {e.colno}){hint}") from None
    except DataError:  # a key written twice (_one_value_per_key)
        raise
    except ValueError as e:  # "Exceeds the limit (4300 digits) for integer string conversion"
        raise DataError(f"{where}: a number in it is too long to read ({e}); write it as a string") from None
    except RecursionError:
        raise DataError(f"{where}: nested too deeply to read (arrays or objects thousands of levels deep)") from None


def _one_value_per_key(where: str, pairs: list[tuple[str, object]]) -> dict:
    """A JSON object as a dict; a key written twice in one object is refused (json.loads keeps the last value and
    drops the first without a word)."""
    record = dict(pairs)
    if len(record) < len(pairs):
        seen: set[str] = set()
        twice = next(key for key, _ in pairs if key in seen or seen.add(key))
        raise DataError(f"{where}: the key {twice!r} appears twice in one object, and only its last value would be "
                        f"read; remove or rename one of them")
    return record


def _read_csv(path: Path) -> list[dict]:
    """Rows as {column: value}; header names are stripped ("instruction, output" names "output"). A header naming
    a column twice, or a row with more fields than the header, is refused (csv.DictReader would keep the last
    column, or file the extra fields under None). A quote left open is refused with the line it opened on (a
    lenient reader would swallow every later row into one field); a field may be as long as the file."""
    text = _read_text(path)
    csv.field_size_limit(max(csv.field_size_limit(), len(text) + 1))  # the default limit is 131,072 characters
    rows = csv.reader(io.StringIO(text, newline=""), strict=True)
    records, line = [], 1  # line: where the next row starts (a quoted field may span lines)
    try:
        names = [name.strip() for name in next(rows, [])]
        if twice := [name for name in names if names.count(name) > 1]:
            empty = " (an empty name: a comma too many at the header's end?)" if twice[0] == "" else ""
            raise DataError(f"{path}:1: the header names column {twice[0]!r} twice{empty}; rename or remove one of "
                            f"them")
        line = rows.line_num + 1
        for row in rows:
            start, line = line, rows.line_num + 1
            if len(names) > 1 and [field.strip() for field in row] == names:
                raise DataError(f"{path}:{start}: this row repeats the header ({', '.join(names)}), as where two "
                                f"CSV files with headers were joined (cat a.csv b.csv); delete the line")
            records.extend(_csv_record(path, names, row, start))
    except csv.Error as e:
        what = "a quote opened in this row is never closed" if "end of data" in str(e) else f"{e} in this row"
        raise DataError(f"{path}:{line}: {what}; a field that holds a quote must be quoted as a whole, its quotes "
                        f"doubled (\"say \"\"hi\"\"\")") from None
    return records


def _csv_record(path: Path, names: list[str], row: list[str], start: int) -> list[dict]:
    """The row as a record ([] for a blank line); missing trailing fields are None."""
    if not row:  # a blank line
        return []
    if len(row) > len(names):
        raise DataError(f"{path}:{start}: {len(row)} fields, but the header has {len(names)} columns "
                        f"({', '.join(names)}); quote a field that holds a comma (\"a, b\")")
    return [{**dict(zip(names, row + [None] * (len(names) - len(row)))), "_source": f"{path}:{start}"}]


def _read_json(path: Path) -> list[dict]:
    data = _json(_read_text(path) or "[]", path)
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a list of objects or {{\"data\": [...]}}, got {json_type(data)}")
    for i, record in enumerate(data):
        if not isinstance(record, dict):
            raise DataError(f"{path}[{i}]: expected a JSON object, got {json_type(record)}")
    return [{**record, "_source": f"{path}[{i}]"} for i, record in enumerate(data)]


COMPRESSED = [(b"\x1f\x8b", "gzip", "gunzip -c"), (b"BZh", "bzip2", "bunzip2 -c"), (b"\xfd7zXZ\x00", "xz", "unxz -c"),
              (b"\x28\xb5\x2f\xfd", "zstd", "unzstd -c"), (b"PK\x03\x04", "zip", "unzip -p")]
"""(magic bytes, format, the command that writes the file decompressed to stdout)."""
RECORD_FILES = "give a file of records (.jsonl, .json, .csv or .parquet) or of plain text (.txt)"
BINARY_SAMPLE = 8192
"""Bytes looked at to tell a binary file from text that is not UTF-8 (git looks at the first 8000 for a NUL)."""


def _binary_kind(path: Path, raw: bytes) -> str | None:
    """The DataError message for a file that is binary, not text in some other encoding (None for text): a
    compressed file (by its magic bytes), a safetensors or Parquet file, or any file with a NUL byte or more than 5%
    control bytes in its first BINARY_SAMPLE bytes (text in a legacy encoding such as cp1252 has neither). Such a
    file was reported as UTF-8 text with one bad byte to fix."""
    for magic, kind, command in COMPRESSED:
        if raw.startswith(magic):
            out = path.with_suffix(".unpacked" + path.suffix)
            return f"{path}: a binary file ({kind}-compressed), not text; decompress it: {command} {path} > {out}"
    if raw.startswith(b"PAR1"):
        return f"{path}: a binary file (Parquet), not text; give it a .parquet name, which is read as Parquet"
    if len(raw) > 10 and raw[8:10] == b'{"' and int.from_bytes(raw[:8], "little") < len(raw):  # header length, JSON
        return f"{path}: a binary file (safetensors: model weights?), not text; {RECORD_FILES}"
    sample = raw[:BINARY_SAMPLE]
    control = sum(b < 0x20 and b not in b"\t\n\r\f\x1b" or b == 0x7f for b in sample)
    if b"\x00" in sample or control > 0.05 * len(sample):
        what = (f"a NUL byte at byte offset {sample.index(0)}" if b"\x00" in sample
                else f"{control} control bytes in its first {len(sample)}")
        return f"{path}: a binary file ({what}), not text; {RECORD_FILES}"
    return None


def _read_text(path: Path, plain: bool = False) -> str:
    """The file decoded as UTF-8 (a leading byte-order mark, as Windows tools write, is skipped); a byte that is not
    UTF-8 is reported with its line and column, a UTF-16 or UTF-32 file (by its byte-order mark) by its encoding, a
    binary file (compressed, model weights, ...) as one (_binary_kind). plain: a plain-text file, refused as binary
    even where its bytes decode (NULs and control bytes are ASCII): JSON and CSV parsing would catch them, plain
    text would train on them."""
    raw = path.read_bytes()
    if plain and (binary := _binary_kind(path, raw)):
        raise DataError(binary)
    if (encoding := byte_order_mark(raw)) not in (None, "UTF-8"):
        raise DataError(f"{path}: the file is {encoding} (it starts with a {encoding} byte-order mark), not "
                        f"UTF-8; re-encode it: iconv -f {encoding} -t UTF-8 {path} > "
                        f"{path.with_suffix('.utf8' + path.suffix)}")
    bom = len(codecs.BOM_UTF8) if raw.startswith(codecs.BOM_UTF8) else 0
    try:
        return raw[bom:].decode("utf-8")
    except UnicodeDecodeError as e:
        if binary := _binary_kind(path, raw):
            raise DataError(binary) from None
        start = e.start + bom
        line_start = max(raw.rfind(b"\n", 0, start) + 1, bom)
        line, column = raw.count(b"\n", 0, start) + 1, len(raw[line_start:start].decode("utf-8", "replace")) + 1
        if UTF8_MULTIBYTE.search(raw, bom):  # the rest is UTF-8: re-encoding it all from cp1252 would garble it
            fix = "the rest of the file is UTF-8 (it holds non-ASCII UTF-8 text), so fix or delete this byte"
        else:
            fix = (f"re-encode the file as UTF-8 (e.g. for Windows-1252/Latin-1 text: iconv -f cp1252 -t utf-8 "
                   f"{path} > {path.with_suffix('.utf8' + path.suffix)})")
        raise DataError(f"{path}:{line}: byte 0x{raw[start]:02x} at column {column} (byte offset {start}) "
                        f"is not UTF-8; {fix}") from None


def _read_parquet(path: Path) -> list[dict]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: cannot be read as a Parquet file ({e}); check that it was written completely "
                        f"(e.g. pandas' df.to_parquet) or give a .jsonl, .json or .csv file") from None
    try:
        return table.to_pylist()
    except UnicodeDecodeError:  # a string column holding bytes that are not UTF-8: find the first one
        for name in table.column_names:
            if table.schema.field(name).type in (pa.string(), pa.large_string()):
                for row, value in enumerate(table.column(name).cast(pa.binary()).to_pylist()):
                    try:
                        (value or b"").decode("utf-8")
                    except UnicodeDecodeError as e:
                        raise DataError(f"{path}[row {row}]: column {name!r} holds byte 0x{value[e.start]:02x} at "
                                        f"position {e.start}, which is not UTF-8; re-encode the column's text as "
                                        f"UTF-8 and write the file again") from None
        raise


def _read_hub(source: str) -> list[dict]:
    name, _, split = source.partition(":")
    try:
        import datasets
    except ImportError:
        if "/" in name:  # a path (data/trian) as much as a hub name (org/name)
            raise DataError(f"no such file: {source}; if it is a hub dataset (name[:split]), reading it needs the "
                            f"`datasets` package: pip install 'loraforge[hub]'") from None
        raise DataError(f"{source!r} is not a local file, and reading it as a hub dataset needs the `datasets` "
                        f"package: pip install 'loraforge[hub]' (or give a path to a .jsonl/.json/.csv/.parquet/"
                        f".txt file)") from None
    config = getattr(datasets, "config", None)  # its copy of HF_HUB_OFFLINE, taken at its import
    unreachable = hub_unreachable(*[config] if config is not None else [])
    if unreachable:  # soak: it retried for about half a minute before saying so: read the cache only, at once
        print(f"{source!r} is not a local file: loading it as a hub dataset from the cache (no connection to the "
              f"Hugging Face Hub)", file=sys.stderr, flush=True)
    else:
        print(f"{source!r} is not a local file: loading it as a hub dataset (a typo? offline, this retries for "
              f"about half a minute; HF_DATASETS_OFFLINE=1 fails at once)", file=sys.stderr, flush=True)
    try:
        with offline_hub(unreachable, *[config] if config is not None else []):
            ds = datasets.load_dataset(name, split=split or "train")
    except Exception as e:  # noqa: BLE001 -- offline, unknown name, bad split: all end here with the reason
        if unreachable:
            first = (str(e).splitlines() or [""])[0]
            raise DataError(f"{source!r} is not a local file and could not be loaded as a hub dataset from the cache "
                            f"(no connection to the Hugging Face Hub; a dataset loaded once online is read from the "
                            f"cache): {type(e).__name__}: {first}; give a path to a .jsonl/.json/.csv/.parquet/.txt "
                            f"file instead") from e
        raise DataError(f"{source!r} is not a local file and could not be loaded as a hub dataset "
                        f"(name[:split]; needs network access): {type(e).__name__}: {e}") from e
    records = [{**row, "_source": f"{name}:{split or 'train'}[{i}]"} for i, row in enumerate(ds)]
    if not records:
        raise DataError(f"hub dataset {source!r} has no records")
    return records


def train_test_split(records: list, test: float | int, seed: int = 0, field: str = "test",
                     unit: str = "record") -> tuple[list, list]:
    """Deterministic split: `test` is a fraction in (0, 1) or a number of records. Order within each part is kept.
    `field`: how the error names `test` (the config field the user set, e.g. "data.eval_fraction"); `unit`: what
    the error calls the items split (records; windows of a text)."""
    n = len(records)
    n_test = round(test * n) if isinstance(test, float) else int(test)
    if isinstance(test, float) and not 0 < test < 1 or not 0 < n_test < n:
        if n < 2:
            raise DataError(f"{field}={test!r}: {n} {unit} cannot be split; give at least 2")
        if isinstance(test, float):  # round(test * n) within [1, n - 1]: from 1/n to (n - 1)/n, written exactly
            digits = len(str(n)) + 1
            low, high = -(-10**digits // n), 10**digits * (n - 1) // n
            valid = f"a fraction from {_decimal(low, digits)} to {_decimal(high, digits)}"
        else:
            valid = f"a count from 1 to {n - 1}"
        raise DataError(f"{field}={test!r} holds out {n_test} of the {n} {unit}s, leaving {n - n_test} to train on; "
                        f"use {valid} (at least 1 {unit} on each side)")
    test_idx = set(random.Random(seed).sample(range(n), n_test))
    return ([r for i, r in enumerate(records) if i not in test_idx],
            [r for i, r in enumerate(records) if i in test_idx])


def _decimal(units: int, digits: int) -> str:
    """units / 10**digits written out: (25, 3) -> "0.025"."""
    return f"{units / 10**digits:.{digits}f}".rstrip("0").rstrip(".")


# ---------------------------------------------------------------------------------------------------- formats

def detect_format(record: dict) -> str:
    """"chat" (messages), "instruction" (instruction + output) or "text" (text), from the record's keys; a key
    whose value is null counts as absent (a Parquet file written from mixed records has every column in every row)."""
    given = {key for key, value in record.items() if value is not None}
    if "messages" in given:
        return "chat"
    if "instruction" in given or "output" in given:
        return "instruction"
    if "text" in given:
        return "text"
    keys = sorted(k for k in record if not k.startswith("_"))
    raise DataError(f"{_where(record)}cannot tell the format from the keys {keys}; expected "
                    f"instruction/input/output, messages [{{role, content}}], or text")


def _where(record: dict) -> str:
    return f"{record['_source']}: " if "_source" in record else ""


def _field(record: dict, name: str, required: bool = True) -> str:
    value = record.get(name)
    if value is None or (isinstance(value, float) and value != value):  # None, or NaN from a CSV/Parquet gap
        value = ""
    if not isinstance(value, str):
        raise DataError(f"{_where(record)}field {name!r} must be a string, got {json_type(value)}")
    if required and not value.strip():
        keys = sorted(k for k in record if not k.startswith("_"))  # soak: a Dolly-style "response" went unsaid
        found = "empty" if name in record and record[name] is not None else f"missing (the record's keys: {keys})"
        raise DataError(f"{_where(record)}field {name!r} is {found}")
    return _encodable(record, name, value)


def _encodable(record: dict, name: str, value: str) -> str:
    """value, refused where it holds half of a surrogate pair (JSON's "\\ud83d" alone: an emoji cut in two by an
    export that truncates), which no tokenizer can encode."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise DataError(f"{_where(record)}field {name!r} holds an unpaired surrogate {value[e.start]!r} at position "
                        f"{e.start} (half of a character, e.g. an emoji cut in two); remove it or restore the "
                        f"whole character") from None
    return value


def _messages(record: dict) -> list[dict]:
    messages = record.get("messages")
    if messages is not None and not isinstance(messages, list):
        raise DataError(f"{_where(record)}field 'messages' must be a list of {{role, content}} objects, got "
                        f"{json_type(messages)}" + (" (text, as a CSV cell or a parquet string column holds: give "
                                                        "chats as JSON lists in a .jsonl file)"
                                                        if isinstance(messages, str) else ""))
    if not messages:
        raise DataError(f"{_where(record)}field 'messages' is missing or empty (expected a list of {{role, content}})")
    plain = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise DataError(f"{_where(record)}field 'messages[{i}]' must be a {{role, content}} object, got "
                            f"{json_type(m)}")
        if m.get("role") in TOOL_ROLES or any(m.get(key) for key in TOOL_KEYS):
            what = (f"'messages[{i}].role' is {m['role']!r} (a tool result)" if m.get("role") in TOOL_ROLES else
                    f"'messages[{i}].{next(key for key in TOOL_KEYS if m.get(key))}' holds a tool call")
            raise DataError(f"{_where(record)}field {what}: tool calls are not supported for training yet; leave "
                            f"conversations with tool calls out of the training data")
        if m.get("role") not in ("system", "user", "assistant"):
            role = m.get("role")
            hint = ""
            if isinstance(role, str) and role.strip().lower() in ("system", "user", "assistant"):
                hint = f" (write {role.strip().lower()!r})"
            elif role == "developer":
                hint = " (OpenAI's newer name for the system turn: write 'system')"
            raise DataError(f"{_where(record)}field 'messages[{i}].role' must be system, user or assistant, got "
                            f"{'nothing' if 'role' not in m else repr(role)[:60]}{hint}")
        content = _content(record, i, m.get("content"))
        if content is None or (m["role"] == "assistant" and not content.strip()):
            raise DataError(f"{_where(record)}field 'messages[{i}].content' is missing or empty")
        plain.append({"role": m["role"], "content": content})
        if m.get("weight") is not None:  # OpenAI's format: an assistant turn of weight 0 is context, not learnt
            if m["role"] != "assistant" or m["weight"] not in (0, 1) or isinstance(m["weight"], bool):
                raise DataError(f"{_where(record)}field 'messages[{i}].weight' must be 0 (not learnt) or 1 (learnt) "
                                f"on an assistant turn, got {m['weight']!r} on a {m['role']!r} turn")
            plain[-1]["weight"] = m["weight"]
    if plain[0]["role"] == "assistant":  # the template would render an empty conversation before it
        raise DataError(f"{_where(record)}field 'messages[0]' is an assistant turn; a conversation must start with a "
                        f"system or user turn (drop the opening assistant message or put the user's turn before it)")
    if not any(m["role"] == "assistant" for m in plain):
        raise DataError(f"{_where(record)}field 'messages' has no assistant turn: nothing to learn or score")
    if not any(m["role"] == "assistant" and m.get("weight", 1) for m in plain):
        raise DataError(f"{_where(record)}field 'messages': every assistant turn has weight 0: nothing to learn or "
                        f"score")
    return plain


def _content(record: dict, i: int, content) -> str | None:
    """A message's text: a string, or OpenAI's content parts [{"type": "text", "text": ...}, ...] joined (as the
    server joins them); None where it is missing. Parts of another type (images, audio) are refused by name."""
    name = f"messages[{i}].content"
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict):
                raise DataError(f"{_where(record)}field '{name}[{j}]' must be a {{type, text}} object, got "
                                f"{json_type(part)}")
            if part.get("type") != "text":
                raise DataError(f"{_where(record)}field '{name}[{j}].type' is {part.get('type')!r}; only text parts "
                                f"can be trained on (remove the others)")
            if not isinstance(part.get("text"), str):
                raise DataError(f"{_where(record)}field '{name}[{j}].text' must be a string, got "
                                f"{json_type(part.get('text'))}")
            texts.append(part["text"])
        content = "".join(texts)
    if content is None:
        return None
    if not isinstance(content, str):
        raise DataError(f"{_where(record)}field {name!r} must be a string, got {json_type(content)}")
    return _encodable(record, name, content)


def _render(tokenizer, messages: list[dict], add_generation_prompt: bool, where: str = "") -> str:
    """The chat template as text; a plain "### Role:" template for tokenizers that have none. `where`: the record's
    file:line prefix for the error (_where)."""
    messages = [{"role": m["role"], "content": m["content"]} for m in messages]  # a turn's weight is ours alone
    if getattr(tokenizer, "chat_template", None):
        try:
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        except Exception as e:  # noqa: BLE001 -- jinja2's TemplateError ("roles must alternate"), ValueError, ...
            raise DataError(f"{where}the model's chat template refuses this conversation ({e}); change the "
                            f"conversation to what the template accepts") from None
    return plain_chat(messages, tokenizer, add_generation_prompt)


def plain_chat(messages: list[dict], tokenizer, add_generation_prompt: bool) -> str:
    """A conversation as the "### Role:" text chat records are trained on where the tokenizer has no chat template,
    each assistant turn ending with the EOS text; with add_generation_prompt, ending with the assistant's header.
    The one rendering training and serve's /v1/chat/completions share (soak: serve refused such a model's chats)."""
    eos = getattr(tokenizer, "eos_token", None) or ""
    text = "".join(f"### {m['role'].capitalize()}:\n{m['content']}" + (eos if m["role"] == "assistant" else "")
                   + "\n\n" for m in messages)
    return text + ("### Assistant:\n" if add_generation_prompt else "")


def plain_chat_prompt_ids(messages: list[dict], tokenizer) -> list[int]:
    """The ids a model with no chat template is given to answer `messages` (role, content): the ids training read
    before an answer that follows them (a BOS where the tokenizer adds one, then plain_chat's text)."""
    return _bos(tokenizer) + _ids(tokenizer, plain_chat(messages, tokenizer, add_generation_prompt=True))


def _ids(tokenizer, text: str, limit: int | None = None) -> list[int]:
    # Rendered templates already carry their special tokens, so never add BOS/EOS here.
    return tokenizer(_head(text, tokenizer, limit), add_special_tokens=False)["input_ids"]


def _head(text: str, tokenizer, limit: int | None) -> str:
    """The start of `text` that holds its first `limit` tokens and more: a record is cut to `limit` tokens anyway,
    and tokenizing a 20 MB one whole took 58 s. No token covers more characters than the vocabulary's longest
    entry, so twice (limit + 1) of them hold more than `limit` tokens; the cut changes only the last word's."""
    longest = _longest_token(tokenizer) if limit is not None else None
    if longest is None:
        return text
    bound = 2 * (limit + 1) * longest
    return text if len(text) <= bound else text[:bound]


@per_object
def _longest_token(tokenizer) -> int | None:
    """Characters in the vocabulary's longest entry as stored (byte-level 'Ġ' and SentencePiece '▁' are one
    character each, as the space they stand for); None for a tokenizer that shows no vocabulary (no cut)."""
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else None
    return max((len(token) for token in vocab), default=1) if vocab else None


def _bos(tokenizer) -> list[int]:
    """[BOS] when the tokenizer adds one and there is no chat template to add it; a template writes its own."""
    if getattr(tokenizer, "chat_template", None) or tokenizer.bos_token_id is None:
        return []
    return [tokenizer.bos_token_id] if tokenizer("x")["input_ids"][:1] == [tokenizer.bos_token_id] else []


def _instruction_prompt(record: dict) -> str:
    """The Alpaca prompt, for a tokenizer with no chat template."""
    return ALPACA_PROMPT.format(instruction=_instruction_user(record))


def _instruction_user(record: dict) -> str:
    instruction, extra = _field(record, "instruction"), _field(record, "input", required=False)
    return instruction + ("\n\n" + extra if extra.strip() else "")


def _as_chat(record: dict, tokenizer) -> dict:
    """An instruction record as the conversation a chat template renders: the instruction (and input) as the user's
    turn, the output (less an EOS text it ends with) as the assistant's, which ends with the template's own end of
    turn (soak: it ended with the tokenizer's EOS, so Llama 3 learnt <|end_of_text|> where its chats end with
    <|eot_id|>, Gemma <eos> for <end_of_turn>, Phi-3 <|endoftext|> for <|end|>)."""
    answer = _without_eos(record, "output", tokenizer)[0]
    messages = [{"role": "user", "content": _instruction_user(record)}, {"role": "assistant", "content": answer}]
    return {"messages": messages, **{k: v for k, v in record.items() if k == "_source"}}


def _chat_layout(messages: list[dict], tokenizer, where: str = "",
                 limit: int | None = None) -> tuple[str, list[tuple[int, int, bool | None, bool]]]:
    """The conversation as the template renders it whole, and each assistant turn's characters in it: (start, end,
    learnt, exact). learnt: None for a turn of weight 0 (never learnt, not even with train_on_prompt).

    A turn starts where render(messages[:i], generation prompt) ends: the prompt generate and serve give the model.
    It ends where render(messages[:i+1]) ends (exact), or, for a template that writes a turn otherwise once later
    ones follow (Phi-3 ends a conversation with its EOS, Qwen3 drops earlier turns' reasoning), after its content and
    the end of turn the template writes (_end_in; not exact: a token that runs past that point is not the turn's).
    A template that renders the conversation before a turn otherwise once later ones follow: DataError. Each turn
    renders the conversation up to it (quadratic in the turns), so with
    `limit` the text stops after the turn that takes it past `limit` tokens.
    """
    full = _render(tokenizer, messages, add_generation_prompt=False, where=where)
    turns, done, counted, n = [], 0, 0, 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], add_generation_prompt=True, where=where)
        upto = _render(tokenizer, messages[: i + 1], add_generation_prompt=False, where=where)
        end = len(upto) if full.startswith(upto) else _end_in(full, messages, i, tokenizer, where)
        if not (full.startswith(before) and upto.startswith(before) and done <= len(before) < end):
            raise DataError(f"{where}the chat template renders the conversation before messages[{i}] (an assistant "
                            f"turn) otherwise once later turns follow, so the turn cannot be located in it (a "
                            f"template that moves the system prompt to the last user turn, as Mistral's newer ones "
                            f"do); give each such conversation as records that end at one assistant turn each")
        turns.append((len(before), end, True if m.get("weight", 1) else None, end == len(upto)))
        done = end
        # the tokens so far, counted a piece at a time (linear in the turns; the whole text tokenizes otherwise only
        # where pieces meet: a margin of two tokens each), once the text has more UTF-8 bytes than `limit` (no token
        # holds less than a byte, a prepended "▁" aside)
        if limit is not None and len(full[:end].encode("utf-8", "surrogatepass")) + len(turns) > limit:
            n, counted = n + len(_ids(tokenizer, full[counted:end], limit)), end
            if n > limit + 2 * len(turns):
                return full[:end], turns
    return full, turns


TURN_MARK = "\ue000"  # a private-use character, as an assistant turn's content: no template trims or rewrites it


def _end_in(full: str, messages: list[dict], i: int, tokenizer, where: str) -> int:
    """Where assistant turn i ends in `full`, the whole conversation, for a template that writes the turn otherwise
    once later turns follow (Qwen3 drops an earlier turn's <think> block; Phi-3 writes its EOS after the last turn
    only): after its content, found by rendering the conversation with TURN_MARK as the turn's content, as much of
    the text the template writes after a last turn as follows it there; -1 where the content is not found."""
    marked = [*messages[:i], {**messages[i], "content": TURN_MARK}, *messages[i + 1:]]
    whole = _render(tokenizer, marked, add_generation_prompt=False, where=where)
    alone = _render(tokenizer, marked[: i + 1], add_generation_prompt=False, where=where)
    if whole.count(TURN_MARK) != 1 or alone.count(TURN_MARK) != 1:
        return -1
    rest = whole[whole.index(TURN_MARK) + 1:]  # what follows the turn's content in the whole conversation
    after = alone[alone.index(TURN_MARK) + 1:]  # what the template writes after a last turn's content
    if not full.endswith(rest):
        return -1
    return len(full) - len(rest) + len(os.path.commonprefix([after, rest]))


def _chat_tokens(record: dict, tokenizer, train_on_prompt: bool = False,
                 limit: int | None = None) -> tuple[Example, int]:
    """The conversation's tokens as tokenizer.apply_chat_template(messages) gives them: the rendered text tokenized
    whole, never piece by piece (soak: a SentencePiece tokenizer, Mistral's and Phi-3's, writes "▁" before the start
    of every piece, so each answer was learnt as "▁It" after "[/INST]", where the chat template's own tokens, and
    the prompts generate gives, have "It"); labels from each token's characters (its offsets); and where the last
    assistant turn's tokens start (the eval prompt)."""
    text, turns = _chat_layout(_chat_without_eos(record, tokenizer)[0], tokenizer, _where(record), limit)
    ids, offsets = _tokens_at(_head(text, tokenizer, limit), tokenizer, [c for t in turns for c in t[:2]])
    bos = _bos(tokenizer)
    labels, k, last = [IGNORE] * len(bos), 0, None
    for token, (first, after) in zip(ids, offsets):
        while k < len(turns) and first >= turns[k][1]:
            k += 1
        start, end, learnt, exact = turns[k] if k < len(turns) else (len(text), len(text), False, True)
        supervised = learnt if start <= first and (exact or after <= end) else False
        labels.append(token if supervised or (train_on_prompt and supervised is not None) else IGNORE)
        if last is None and first >= turns[-1][0]:
            last = len(labels) - 1
    return Example(bos + ids, labels), len(bos + ids) if last is None else last


def _tokens_at(text: str, tokenizer, cuts: list[int]) -> tuple[list[int], list[tuple[int, int]]]:
    """text's token ids and each token's (start, end) characters; a tokenizer with no offsets (a Python one) tokenizes
    the pieces between `cuts` apart, each token spanning its piece."""
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        return enc["input_ids"], [tuple(o) for o in enc["offset_mapping"]]
    except NotImplementedError:
        ids, offsets = [], []
        for a, b in zip([0, *cuts], [*cuts, len(text)]):
            piece = tokenizer(text[a:b], add_special_tokens=False)["input_ids"] if b > a else []
            ids, offsets = ids + piece, offsets + [(a, b)] * len(piece)
        return ids, offsets


def encode(record: dict, tokenizer, fmt: str, train_on_prompt: bool = False, limit: int | None = None) -> Example:
    """Tokenize one record; labels are -100 on the prompt (unless train_on_prompt) and equal the ids elsewhere.

    A conversation is tokenized whole, as the chat template gives it (_chat_tokens), and so is an instruction
    record where the tokenizer has a chat template (as a user turn and the answer: _as_chat). Without one, an
    instruction's Alpaca prompt and its response are tokenized separately and concatenated. `limit`: a conversation
    stops being rendered once it holds more than that many tokens (the caller keeps at most `limit`; the first ones
    are the same): 800 turns took 8 s; and a field's text is tokenized only as far as `limit` tokens reach (_head).
    """
    if fmt == "instruction" and getattr(tokenizer, "chat_template", None):
        return _chat_tokens(_as_chat(record, tokenizer), tokenizer, train_on_prompt, limit)[0]
    if fmt == "instruction":
        prompt = _bos(tokenizer) + _ids(tokenizer, _instruction_prompt(record), limit)
        response = _ids(tokenizer, _without_eos(record, "output", tokenizer)[0], limit) + [tokenizer.eos_token_id]
        segments = [(prompt, False), (response, True)]
    elif fmt == "chat":
        return _chat_tokens(record, tokenizer, train_on_prompt, limit)[0]
    elif fmt == "text":
        text = _head(_without_eos(record, "text", tokenizer)[0], tokenizer, limit)
        ids = text_ids(tokenizer, text)  # adds BOS (and EOS) as tokenizer(text) does; a long text in pieces
        segments = [(ids + ([tokenizer.eos_token_id] if ids[-1:] != [tokenizer.eos_token_id] else []), True)]
    else:
        raise DataError(f"unknown format {fmt!r}; use one of {FORMATS} or 'auto'")
    input_ids, labels = [], []
    for ids, supervised in segments:
        input_ids += ids
        labels += ids if supervised or (train_on_prompt and supervised is not None) else [IGNORE] * len(ids)
    return Example(input_ids, labels)


def _without_eos(record: dict, name: str, tokenizer) -> tuple[str, bool]:
    """The field's text less an EOS text it ends with (users who write "</s>" or "<|im_end|>" themselves), and
    whether it had one: encode adds the EOS token itself, so it is learnt once, not twice."""
    value, eos = _field(record, name), getattr(tokenizer, "eos_token", None)  # a minimal tokenizer may lack it
    if not eos or not value.rstrip().endswith(eos):
        return value, False
    value = value.rstrip()[: -len(eos)]
    if not value.strip():
        raise DataError(f"{_where(record)}field {name!r} holds only the end-of-sequence text {eos!r}; give the text "
                        f"before it")
    return value, True


def _chat_without_eos(record: dict, tokenizer) -> tuple[list[dict], int]:
    """The conversation with each assistant turn less an EOS text, or the chat template's own end-of-turn text
    (turn_end_text), it ends with (the template writes the end of the turn itself, so it is learnt once, not twice;
    soak: Llama 3's "<|eot_id|>" was learnt twice, its EOS being "<|end_of_text|>"), and how many turns had one."""
    messages, n = _messages(record), 0
    ends = [e for e in (getattr(tokenizer, "eos_token", None), turn_end_text(tokenizer)) if e]
    for i, m in enumerate(messages):
        end = next((e for e in ends if m["role"] == "assistant" and m["content"].rstrip().endswith(e)), None)
        if end is None:
            continue
        m["content"] = m["content"].rstrip()[: -len(end)]
        n += 1
        if not m["content"].strip():
            raise DataError(f"{_where(record)}field 'messages[{i}].content' holds only the end-of-sequence text "
                            f"{end!r}; give the text before it")
    return messages, n


def prompt_ids(record: dict, tokenizer, fmt: str) -> list[int]:
    """The prompt to generate from at eval: everything before the (last) response."""
    if fmt == "instruction" and not getattr(tokenizer, "chat_template", None):
        return _bos(tokenizer) + _ids(tokenizer, _instruction_prompt(record))
    if fmt in ("instruction", "chat"):  # what training read before the last answer (soak: tokenized apart, it
        # could differ)
        example, start = _chat_tokens(_as_chat(record, tokenizer) if fmt == "instruction" else record, tokenizer)
        return example.input_ids[:start]
    raise DataError(f"format {fmt!r} has no prompt/answer split; generation eval needs instruction or chat records")


def reference_output(record: dict, fmt: str, tokenizer=None) -> str:
    """The expected answer: the output (instruction) or the last assistant message (chat); with `tokenizer`, less
    an EOS text it ends with (generations are decoded without special tokens, so it could never match)."""
    if fmt == "instruction":
        answer = _field(record, "output")
    elif fmt == "chat":
        answer = [m for m in _messages(record) if m["role"] == "assistant"][-1]["content"]
    else:
        raise DataError(f"format {fmt!r} has no reference answer; generation eval needs instruction or chat records")
    eos = getattr(tokenizer, "eos_token", None)
    return answer.rstrip()[: -len(eos)] if eos and answer.rstrip().endswith(eos) else answer


# ---------------------------------------------------------------------------------------------------- datasets

def build_dataset(records: list[dict], tokenizer, fmt: str = "auto", max_seq_len: int = 512,
                  train_on_prompt: bool = False, overflow: str = "auto",
                  progress: str | None = None) -> tuple[list[Example], DataStats]:
    """Encode every record. overflow="truncate" cuts to max_seq_len, "drop" skips longer examples, "split" cuts a
    longer text record into windows of max_seq_len tokens (see windows) and keeps them all; "auto" splits text
    records and truncates instruction and chat records. `progress`: the label of a progress bar on stderr, shown
    once tokenizing has taken PROGRESS_DELAY_S (a soak's 1,000,000 chat-templated rows: minutes, nothing said).

    Examples left with no supervised token are dropped. Raises DataError when nothing is left.
    """
    if overflow not in OVERFLOWS:
        raise DataError(f"overflow={overflow!r}; use {', '.join(map(repr, OVERFLOWS))}")
    if max_seq_len < 2:
        raise DataError(f"max_seq_len={max_seq_len} is too small; use at least 2 (typically 512-4096)")
    if not records:
        raise DataError("no records to build a dataset from")
    if fmt == "auto":
        fmt = detect_format(records[0])
        for i, record in enumerate(records):
            if (other := detect_format(record)) != fmt:
                raise DataError(f"record {i} ({record.get('_source', 'no source')}) is in {other!r} format but "
                                f"record 0 is in {fmt!r}; a dataset must use one format")
    if overflow == "auto":
        overflow = "split" if fmt == "text" else "truncate"
    if overflow == "split" and fmt != "text":
        raise DataError(f"data.overflow: split cuts text documents into windows; {fmt} records keep their prompt "
                        f"before their answer, so a window could hold an answer without its question: use "
                        f"truncate or drop")
    stats, examples, n_too_long = DataStats(n_records=len(records)), [], 0
    with progress_bar(len(records), enabled=progress is not None, desc=progress or "", unit="record",
                      delay=PROGRESS_DELAY_S) as bar:  # closed before an error is said: on a line of its own
        for i, record in enumerate(records):
            bar.update()  # counted as it starts: every path below ends the record (kept, dropped or an error)
            try:
                ex = encode(record, tokenizer, fmt, train_on_prompt, limit=None if overflow == "split" else max_seq_len)
            except DataError as e:
                raise DataError(f"record {i}: {e}") from None
            if overflow == "split" and len(ex.input_ids) > max_seq_len:
                kept = windows(ex, max_seq_len)  # a text's: every token of every window is supervised
                n_sup = sum(map(targets, kept))
                stats.n_split += 1
            else:
                truncated = len(ex.input_ids) > max_seq_len
                if truncated and overflow == "drop":
                    stats.n_dropped += 1
                    n_too_long += 1
                    _note_dropped(stats, record, i, f"longer than max_seq_len={max_seq_len}, data.overflow: drop")
                    continue
                kept = [Example(ex.input_ids[:max_seq_len], ex.labels[:max_seq_len])]
                n_sup = targets(kept[0])
                if n_sup == 0:  # the response was cut off entirely
                    stats.n_dropped += 1
                    _note_dropped(stats, record, i, f"its prompt alone fills max_seq_len={max_seq_len}")
                    continue
                stats.n_truncated += truncated
            if fmt in EOS_FIELD:  # counted among the examples kept, as the data line reports them
                stats.n_eos_stripped += _without_eos(record, EOS_FIELD[fmt], tokenizer)[1]
            elif fmt == "chat":
                stats.n_eos_stripped += _chat_without_eos(record, tokenizer)[1]
            examples += kept
            stats.n_tokens += sum(len(e.input_ids) for e in kept)
            stats.n_supervised_tokens += n_sup
    stats.n_examples = len(examples)
    if not examples:
        why = []
        if n_too_long:
            why.append(f"{n_too_long} are longer than max_seq_len={max_seq_len} with overflow='drop' (raise "
                       f"max_seq_len or use overflow='truncate')")
        if len(records) - n_too_long:
            why.append(f"{len(records) - n_too_long} have no response token within max_seq_len={max_seq_len}: the "
                       f"prompt alone fills it, so truncating leaves nothing to train on (raise max_seq_len or "
                       f"shorten the prompts)")
        raise DataError(f"all {len(records)} records were dropped: " + "; ".join(why))
    return examples, stats


def targets(example: Example) -> int:
    """The example's loss targets: its labels after the first that are not IGNORE (DataStats.n_supervised_tokens)."""
    return sum(label != IGNORE for label in example.labels[1:])


def windows(example: Example, max_seq_len: int) -> list[Example]:
    """A long example cut into windows of max_seq_len tokens that overlap by one: each window's first token is the
    previous window's last, so every token but the very first is a target once (a window's first token is only
    context) and no window is shorter than two tokens (one target)."""
    ids, labels, step = example.input_ids, example.labels, max_seq_len - 1
    return [Example(ids[s:s + max_seq_len], labels[s:s + max_seq_len]) for s in range(0, len(ids) - 1, step)]


def _note_dropped(stats: DataStats, record: dict, index: int, why: str, keep: int = 3) -> None:
    """Remember where a dropped record came from and why (the first `keep` of a source), for the data line."""
    if len(stats.dropped) < keep:
        stats.dropped.append(f"{record.get('_source', f'record {index}')} ({why})")


def pack(examples: list[Example], max_seq_len: int) -> list[dict]:
    """First-fit-decreasing packing into rows of at most max_seq_len tokens.

    Each row: {"input_ids", "labels", "position_ids"}; position_ids restart at 0 for each example, and the label
    at each example's first token is -100 (it would be predicted from the previous example's last token).
    """
    bins: list[list[Example]] = []
    space: list[int] = []
    for ex in sorted(examples, key=lambda e: len(e.input_ids), reverse=True):  # stable: ties keep input order
        n = len(ex.input_ids)
        if n > max_seq_len:
            raise DataError(f"an example of {n} tokens does not fit max_seq_len={max_seq_len}; "
                            f"build the dataset with the same max_seq_len")
        j = next((j for j, free in enumerate(space) if free >= n), None)
        if j is None:
            bins.append([])
            space.append(max_seq_len)
            j = len(bins) - 1
        bins[j].append(ex)
        space[j] -= n
    rows = []
    for row in bins:
        input_ids, labels, position_ids = [], [], []
        for ex in row:
            input_ids += ex.input_ids
            labels += [IGNORE] + ex.labels[1:]
            position_ids += list(range(len(ex.input_ids)))
        rows.append({"input_ids": input_ids, "labels": labels, "position_ids": position_ids})
    return rows


def padding_fraction(examples: list[Example], batch_size: int, shared_prefix=None,
                     max_batches: int = 200) -> float:
    """Fraction of the positions that padded batches (the examples in order, the first `max_batches` of them) would
    compute beyond their real tokens: their padding, less the positions a prefix shared by a batch's rows saves
    (shared_prefix(examples of a batch) -> the tokens computed once for all its rows; None: nothing is shared).
    Below 0 where sharing saves more than the padding costs."""
    total = real = 0
    for start in range(0, min(len(examples), max_batches * batch_size), batch_size):
        chunk = examples[start:start + batch_size]
        lengths = [len(ex.input_ids) for ex in chunk]
        total += max(lengths) * len(lengths)
        real += sum(lengths)
        if shared_prefix is not None and len(chunk) > 1:
            total -= (len(chunk) - 1) * shared_prefix(chunk)
    return 1 - real / total if total else 0.0


# Packed rows are joined into rows of about this many tokens (join_rows): the block-diagonal causal mask
# transformers builds for a row is T × T, so much longer joins would cost more in the mask than their padding did.
JOIN_MAX_TOKENS = 2048
# Joined rows are padded to a multiple of this many positions (collate's `multiple`): a CPU's bf16 matrix kernels
# (AMX tiles: 16 rows) run the linear layers' products at full speed only on a multiple of 16 rows. Measured on a
# 2-core Zen 5 EPYC (AMX), torch.nn.functional.linear in bf16 over 1,700-2,000 rows: (rows, 576) × (576, 1536) at a
# median 418 GFLOP/s (lowest 346) at any row count, 433 (lowest 424) at multiples of 16 (1,798 rows: 392, 1,808:
# 432); fp32 alike at any.
JOIN_MULTIPLE = 16


def join_rows(rows: list[dict], max_tokens: int = JOIN_MAX_TOKENS) -> list[dict]:
    """Packed rows (pack's dicts) joined end to end into ⌈tokens / max_tokens⌉ rows of near-equal length (longest
    row first into the shortest join, so joins differ by at most one row's length; a join may pass max_tokens by
    less than that): collate then pads only the joins, so a batch of packed rows computes no padding at all where it
    joins into one (padding-free batches, as HF's DataCollatorWithFlattening). The position ids still restart at
    every example, so attention that runs each packed sequence on its own (fastpath's lean attention) does the same
    work; attention over whole rows would do more (T² of the joined row)."""
    total = sum(len(r["input_ids"]) for r in rows)
    joins = [{"input_ids": [], "labels": [], "position_ids": []} for _ in range(max(1, -(-total // max_tokens)))]
    for r in sorted(rows, key=lambda r: len(r["input_ids"]), reverse=True):  # stable: ties keep their order
        shortest = min(joins, key=lambda j: len(j["input_ids"]))
        for k in shortest:
            shortest[k] += r[k]
    return joins


def collate_joined(rows: list[dict], pad_id: int, multiple: int = JOIN_MULTIPLE) -> dict[str, torch.Tensor]:
    """Packed rows joined (join_rows) and collated, to a multiple of JOIN_MULTIPLE positions: the batch a run whose
    packed rows are joined trains on (loop.make_batch; bench/train.py, whose lf-joinany passes multiple=1)."""
    return collate(join_rows(rows), pad_id, multiple)


PACK_MIN_PADDING = 0.2  # packing="auto" packs from this padding fraction on
PROBE_LENGTHS = (6, 5)  # keeps_packed_apart's two examples: the first (drawn twice), the second
PROBE_TOLERANCE = 1e-4  # the most the second example's logits may move (relative) with the first's tokens


@torch.no_grad()
def keeps_packed_apart(model, loss=None) -> bool:
    """Whether `model` keeps the examples of a packed row apart, given the row as collate passes it (restarting
    position_ids, no attention_mask, use_cache=False): the logits of a row's second example must not move when
    its first example's tokens change. Llama, Qwen, Gemma, Phi-3, GPT-2, GPT-NeoX, Falcon build a block-diagonal
    mask from the position_ids; OPT, BLOOM, BioGPT and XGLM build a plain causal one, so each example attended to
    the ones before it (a soak: OPT's logits moved by 18% of their largest). Two forwards of 11 tokens, in eval mode
    (no dropout), on the model's device. `loss`: the run's loss module (CausalLMLoss) to call instead of the model,
    which FSDP needs (its root, the loss module, must run before the layers): the second example's summed token
    loss is compared then."""
    device = next(model.parameters()).device
    vocab = model.get_input_embeddings().num_embeddings
    g = torch.Generator().manual_seed(0)
    first, again = (torch.randint(vocab, (1, PROBE_LENGTHS[0]), generator=g) for _ in range(2))
    second = torch.randint(vocab, (1, PROBE_LENGTHS[1]), generator=g)
    position_ids = torch.cat([torch.arange(n) for n in PROBE_LENGTHS])[None].to(device)
    # the second example's tokens after its first, each predicted from the second example's positions only
    labels = torch.cat([torch.full((1, PROBE_LENGTHS[0] + 1), IGNORE), second[:, 1:]], 1).to(device)
    was_training = model.training
    model.eval()
    try:
        outputs = [model(input_ids=torch.cat([a, second], 1).to(device), position_ids=position_ids,
                         use_cache=False).logits[0, PROBE_LENGTHS[0]:].float() if loss is None else
                   loss({"input_ids": torch.cat([a, second], 1).to(device), "position_ids": position_ids,
                         "labels": labels})[0].float() for a in (first, again)]
    finally:
        model.train(was_training)
    return bool((outputs[0] - outputs[1]).abs().max() <= PROBE_TOLERANCE * outputs[0].abs().max())


def should_pack(packing: bool | str, padding: float) -> bool:
    """data.packing resolved: True/False as given; "auto" packs when padded batches would waste ≥ 20% on padding
    (`padding`: their padding fraction, from padding_fraction, net of what a shared prefix saves: packed rows
    share none).

    Packed rows are longer (max_seq_len) and need a block-diagonal attention mask, so when examples have similar
    lengths plain padded batches are cheaper (bench/train.py measures both on the demo data).
    """
    if packing == "auto":
        return padding >= PACK_MIN_PADDING
    return bool(packing)


# A packed row's padding goes in as sequences of up to this many positions (collate): attention that runs each packed
# sequence on its own (fastpath's lean attention, up to its LEAN_MAX_LENGTH) then runs the padding in pieces as cheap
# as a sequence's query blocks, however long the padding.
PAD_RUN = 128


def _restarts(position_ids: list[int]) -> bool:
    return any(b != a + 1 for a, b in zip(position_ids, position_ids[1:]))


def collate(rows: list[dict | Example], pad_id: int, multiple: int = 1) -> dict[str, torch.Tensor]:
    """Right-pad rows to the longest into tensors: input_ids (pad_id), labels (-100); multiple: pad the rows further,
    to the least width at which rows × width is a multiple of it (data.JOIN_MULTIPLE for joined rows).

    The rule: if any row's position_ids restart (a packed row), the batch is packed: it gets position_ids (the
    padding continues as more "sequences" 0, 1, ..., of up to PAD_RUN positions each) and NO attention_mask, so
    transformers builds the block-diagonal causal mask. Otherwise it gets an attention_mask (1 real, 0 padding) and
    no position_ids.
    Either way call the model with use_cache=False (see the module docstring).
    """
    rows = [{"input_ids": r.input_ids, "labels": r.labels} if isinstance(r, Example) else r for r in rows]
    width = max(len(r["input_ids"]) for r in rows)
    while (len(rows) * width) % multiple:
        width += 1
    packed = any(_restarts(r.get("position_ids", [])) for r in rows)
    batch = {"input_ids": [], "labels": [], "position_ids" if packed else "attention_mask": []}
    for r in rows:
        n, pad = len(r["input_ids"]), width - len(r["input_ids"])
        batch["input_ids"].append(r["input_ids"] + [pad_id] * pad)
        batch["labels"].append(r["labels"] + [IGNORE] * pad)
        if packed:  # the padding as sequences of up to PAD_RUN positions: each attends within itself, cheaply
            batch["position_ids"].append(r.get("position_ids", list(range(n))) + [i % PAD_RUN for i in range(pad)])
        else:
            batch["attention_mask"].append([1] * n + [0] * pad)
    return {k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()}
