"""loraforge.training.data: reading, masking, packing, collation, and every bad-input error."""

from __future__ import annotations

import copy
import json
import re
import socket
import sys
import tracemalloc
import types
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from huggingface_hub import constants
from tokenizers.processors import TemplateProcessing
from transformers import LlamaConfig, LlamaForCausalLM

from loraforge.training.data import (IGNORE, DataError, Example, build_dataset, collate, detect_format, encode,
                                     join_rows, pack, padding_fraction, prompt_ids, should_pack, read_records,
                                     reference_output, train_test_split)
from loraforge.kernels import segment_starts
from loraforge.models import load_tokenizer
from loraforge.training.fastpath import runs_by_sequence


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("smollm2-135m")


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def spans(ex: Example) -> list[list[int]]:
    """The runs of supervised tokens, in order."""
    out, run = [], []
    for token, label in zip(ex.input_ids, ex.labels):
        if label == IGNORE:
            out, run = (out + [run] if run else out), []
        else:
            assert label == token
            run.append(token)
    return out + [run] if run else out


# ---------------------------------------------------------------------------------------------------- masking

def test_instruction_masks_exactly_the_prompt(tok):
    record = {"instruction": "Write this date as YYYY-MM-DD.", "input": "March 5, 2021", "output": "2021-03-05"}
    ex = encode(record, tok, "instruction")
    prompt = tok.apply_chat_template([{"role": "user", "content": "Write this date as YYYY-MM-DD.\n\nMarch 5, 2021"}],
                                     tokenize=False, add_generation_prompt=True)
    prompt = tok(prompt, add_special_tokens=False)["input_ids"]
    response = tok("2021-03-05<|im_end|>\n", add_special_tokens=False)["input_ids"]  # the template's end of turn
    assert prompt_ids(record, tok, "instruction") == prompt
    assert ex.input_ids == prompt + response
    assert ex.labels == [IGNORE] * len(prompt) + response
    assert reference_output(record, "instruction") == "2021-03-05"


def test_instruction_without_input_has_no_blank_lines(tok):
    ex = encode({"instruction": "Say hi.", "input": "", "output": "hi"}, tok, "instruction")
    assert "Say hi.<|im_end|>" in tok.decode(ex.input_ids)


def test_chat_supervises_only_assistant_turns(tok):
    messages = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3+3?"},
                {"role": "assistant", "content": "6, of course"}]
    ex = encode({"messages": messages}, tok, "chat")
    assert tok.decode(ex.input_ids) == tok.apply_chat_template(messages, tokenize=False)
    turn = lambda text: tok(text + "<|im_end|>\n", add_special_tokens=False)["input_ids"]  # noqa: E731
    assert spans(ex) == [turn("4"), turn("6, of course")]
    assert prompt_ids({"messages": messages}, tok, "chat") == tok(
        tok.apply_chat_template(messages[:4], tokenize=False, add_generation_prompt=True),
        add_special_tokens=False)["input_ids"]
    assert reference_output({"messages": messages}, "chat") == "6, of course"


def test_the_eval_prompt_of_a_conversation_is_what_training_read_before_its_last_answer(tok):
    """Soak: without a chat template, prompt_ids tokenized the rendered text whole ("\n\n" one token where two
    pieces meet) while encode tokenized it piece by piece ("\n", "\n"): eval started from ids never trained on."""
    plain = copy.deepcopy(tok)
    plain.chat_template = None
    messages = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
                {"role": "user", "content": "and 3+3?"}, {"role": "assistant", "content": "6"}]
    for tokenizer in (tok, plain):
        ex, prompt = encode({"messages": messages}, tokenizer, "chat"), prompt_ids({"messages": messages}, tokenizer,
                                                                                  "chat")
        last = max(i for i, label in enumerate(ex.labels) if label == IGNORE) + 1  # where the last answer starts
        assert prompt == ex.input_ids[:last]
    whole = plain(plain.decode(prompt), add_special_tokens=False)["input_ids"]
    assert whole == prompt  # training, too, tokenizes the rendered conversation whole ("\n\n" two tokens there)


def test_an_assistant_turn_of_weight_0_is_context_not_learnt(tok):
    """OpenAI's fine-tuning format marks turns not to learn with "weight": 0; they were learnt like the others."""
    messages = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "BAD ANSWER", "weight": 0},
                {"role": "user", "content": "Again?"}, {"role": "assistant", "content": "4", "weight": 1}]
    plain = [{"role": m["role"], "content": m["content"]} for m in messages]
    for train_on_prompt in (False, True):
        ex = encode({"messages": messages}, tok, "chat", train_on_prompt=train_on_prompt)
        assert tok.decode(ex.input_ids) == tok.apply_chat_template(plain, tokenize=False)  # the same tokens
        learnt = tok.decode([i for i, label in zip(ex.input_ids, ex.labels) if label != -100])
        assert "BAD ANSWER" not in learnt and "4<|im_end|>" in learnt
    assert spans(encode({"messages": messages}, tok, "chat")) == [tok("4<|im_end|>\n",
                                                                      add_special_tokens=False)["input_ids"]]
    for bad, said in [({**messages[1], "weight": 0.5}, "got 0.5 on a 'assistant' turn"),
                      ({**messages[1], "weight": True}, "got True on a 'assistant' turn")]:
        with pytest.raises(DataError, match=re.escape(f"field 'messages[1].weight' must be 0 (not learnt) or 1 "
                                                      f"(learnt) on an assistant turn, {said}")):
            encode({"messages": [messages[0], bad, *messages[2:]]}, tok, "chat")
    with pytest.raises(DataError, match=re.escape("field 'messages[0].weight' must be 0 (not learnt) or 1 (learnt) "
                                                  "on an assistant turn, got 0 on a 'user' turn")):
        encode({"messages": [{**messages[0], "weight": 0}, *messages[1:]]}, tok, "chat")
    with pytest.raises(DataError, match="every assistant turn has weight 0: nothing to learn or score"):
        encode({"messages": [*messages[:3], {**messages[3], "weight": 0}]}, tok, "chat")



def test_a_null_weight_is_no_weight_as_parquet_and_hub_datasets_give_every_turn_one(tok, tmp_path):
    """Arrow gives every message of a column the fields of all of them: the user turn's "weight" is None there."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4", "weight": 1}]},
            {"messages": [{"role": "user", "content": "3+3?"}, {"role": "assistant", "content": "6"}]}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "w.parquet")
    write_jsonl(tmp_path / "w.jsonl", rows)
    from_parquet, from_jsonl = read_records(str(tmp_path / "w.parquet")), read_records(str(tmp_path / "w.jsonl"))
    assert from_parquet[0]["messages"][0]["weight"] is None  # what Arrow does
    for a, b in zip(from_parquet, from_jsonl):
        assert encode(a, tok, "chat") == encode(b, tok, "chat")


@pytest.mark.parametrize("role, said", [("developer", "got 'developer' (OpenAI's newer name for the system turn: "
                                                      "write 'system')"),
                                        ("User", "got 'User' (write 'user')"), (None, "got nothing"),
                                        (7, "got 7")])
def test_an_unknown_role_is_named(tok, role, said):
    message = {"content": "Be brief."} if role is None else {"role": role, "content": "Be brief."}
    with pytest.raises(DataError) as e:
        encode({"messages": [message, {"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
               tok, "chat")
    assert str(e.value) == f"field 'messages[0].role' must be system, user or assistant, {said}"

def test_tokenizer_without_chat_template_falls_back_to_plain_templates(tok, monkeypatch):
    monkeypatch.setattr(tok, "chat_template", None)
    ex = encode({"instruction": "Add.", "input": "2 3", "output": "5"}, tok, "instruction")
    assert tok.decode(ex.input_ids).endswith("Add.\n\n2 3\n\n### Response:\n5<|im_end|>")
    assert spans(ex) == [tok("5", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]]
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    ex = encode({"messages": messages}, tok, "chat")
    assert tok.decode(ex.input_ids) == "### User:\nhi\n\n### Assistant:\nhello<|im_end|>\n\n"
    assert spans(ex) == [tok("hello<|im_end|>\n\n", add_special_tokens=False)["input_ids"]]


def test_train_on_prompt_and_text_supervise_everything(tok):
    for record, fmt in [({"instruction": "a", "output": "b"}, "instruction"),
                        ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
                         "chat")]:
        ex = encode(record, tok, fmt, train_on_prompt=True)
        assert ex.labels == ex.input_ids
    ex = encode({"text": "hello world"}, tok, "text")
    assert ex.labels == ex.input_ids == tok("hello world")["input_ids"] + [tok.eos_token_id]


def test_an_answer_that_ends_in_the_eos_text_learns_one_eos(tok):
    """Users who write the EOS text themselves: it is stripped, encode adds the EOS token once; the data counts it."""
    plain = encode({"instruction": "Say hi.", "output": "hi"}, tok, "instruction")
    for output in ["hi<|im_end|>", "hi<|im_end|>\n"]:
        ex = encode({"instruction": "Say hi.", "output": output}, tok, "instruction")
        assert (ex.input_ids, ex.labels) == (plain.input_ids, plain.labels)
        assert spans(ex) == [tok("hi<|im_end|>\n", add_special_tokens=False)["input_ids"]]
    ex = encode({"text": "hello world<|im_end|>"}, tok, "text")
    assert ex.input_ids == ex.labels == tok("hello world")["input_ids"] + [tok.eos_token_id]
    records = [{"instruction": "a", "output": "b<|im_end|>"}, {"instruction": "a", "output": "b"}]
    assert build_dataset(records, tok)[1].n_eos_stripped == 1
    assert build_dataset([{"text": "x<|im_end|>"}, {"text": "y<|im_end|>"}], tok)[1].n_eos_stripped == 2
    long = {"instruction": "a", "output": "b " * 200 + "<|im_end|>"}  # dropped: not among the examples counted
    stats = build_dataset([*records, long], tok, max_seq_len=64, overflow="drop")[1]
    assert (stats.n_dropped, stats.n_eos_stripped) == (1, 1)
    with pytest.raises(DataError) as e:
        build_dataset([{"instruction": "a", "output": " <|im_end|>", "_source": "f.jsonl:4"}], tok)
    assert str(e.value) == ("record 0: f.jsonl:4: field 'output' holds only the end-of-sequence text '<|im_end|>'; "
                            "give the text before it")


def test_eval_references_ending_in_the_eos_text_can_match(tok):
    """Generations are decoded without special tokens: a reference ending in the EOS text is compared without it."""
    assert reference_output({"instruction": "Say hi.", "output": "hi<|im_end|>\n"}, "instruction", tok) == "hi"
    chat = {"messages": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "hi <|im_end|>"}]}
    assert reference_output(chat, "chat", tok) == "hi "
    assert reference_output({"instruction": "Say hi.", "output": "hi<|im_end|>"}, "instruction") == "hi<|im_end|>"


def test_text_eos_is_not_added_twice_when_the_tokenizer_adds_it():
    """Llama-2 style tokenizers (add_eos_token) end every encoding with EOS themselves: encode adds no second one."""
    tok = load_tokenizer("smollm2-135m")  # a fresh one: its post-processor is changed below
    tok.chat_template, tok.bos_token, tok.eos_token = None, "<|im_start|>", "<|endoftext|>"
    tok.backend_tokenizer.post_processor = TemplateProcessing(
        single="<|im_start|> $A <|endoftext|>", special_tokens=[("<|im_start|>", 1), ("<|endoftext|>", 0)])
    hello = tok("hello", add_special_tokens=False)["input_ids"]
    assert tok("hello")["input_ids"] == [1, *hello, 0]
    for text in ["hello", "hello<|endoftext|>"]:
        ex = encode({"text": text}, tok, "text")
        assert ex.input_ids == ex.labels == [1, *hello, 0]


def test_openai_content_parts_are_joined_and_other_types_refused(tok):
    """[{"type": "text", "text": ...}] parts train as their joined text (as serve joins them); an image is named."""
    as_parts = [{"role": "user", "content": [{"type": "text", "text": "2+"}, {"type": "text", "text": "2?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "4"}]}]
    plain = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    ex, expected = encode({"messages": as_parts}, tok, "chat"), encode({"messages": plain}, tok, "chat")
    assert (ex.input_ids, ex.labels) == (expected.input_ids, expected.labels)
    assert reference_output({"messages": as_parts}, "chat") == "4"
    cases = [([{"type": "image_url", "image_url": {"url": "x.png"}}], "field 'messages[0].content[0].type' is "
              "'image_url'; only text parts can be trained on (remove the others)"),
             ([{"type": "text", "text": 4}], "field 'messages[0].content[0].text' must be a string, got a number"),
             (["2+2?"], "field 'messages[0].content[0]' must be a {type, text} object, got a string"),
             (5, "field 'messages[0].content' must be a string, got a number"),
             (None, "field 'messages[0].content' is missing or empty")]
    for content, error in cases:
        record = {"messages": [{"role": "user", "content": content}, plain[1]], "_source": "c.jsonl:2"}
        with pytest.raises(DataError) as e:
            encode(record, tok, "chat")
        assert str(e.value) == f"c.jsonl:2: {error}"


def test_messages_of_the_wrong_type_say_what_they_must_be(tok):
    for messages, error in [({"role": "user", "content": "hi"}, "must be a list of {role, content} objects, got an "
                                                                "object"),
                            ('[{"role": "user"}]', "must be a list of {role, content} objects, got a string (text, as "
                                                   "a CSV cell or a parquet string column holds: give chats as JSON "
                                                   "lists in a .jsonl file)"),
                            (["hi"], None)]:
        with pytest.raises(DataError) as e:
            encode({"messages": messages, "_source": "c.csv:3"}, tok, "chat")
        assert str(e.value) == (f"c.csv:3: field 'messages' {error}" if error else
                                "c.csv:3: field 'messages[0]' must be a {role, content} object, got a string")


def test_tool_calls_and_tool_results_are_refused_not_dropped(tok, tmp_path):
    """OpenAI tool turns: an assistant turn with tool_calls (with or without text), a legacy function_call and a
    tool/function result each stop the run naming the file, line and message; null tool_calls are no call."""
    call = [{"id": "c1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Oslo"}'}}]
    user, answer = {"role": "user", "content": "Weather in Oslo?"}, {"role": "assistant", "content": "Sunny."}
    turns = [({"role": "assistant", "content": "Let me check.", "tool_calls": call}, "'messages[1].tool_calls' holds "
              "a tool call"),
             ({"role": "assistant", "content": None, "tool_calls": call}, "'messages[1].tool_calls' holds a tool call"),
             ({"role": "assistant", "content": None, "function_call": call[0]["function"]},
              "'messages[1].function_call' holds a tool call"),
             ({"role": "tool", "tool_call_id": "c1", "content": "12C"}, "'messages[1].role' is 'tool' (a tool result)"),
             ({"role": "function", "name": "weather", "content": "12C"},
              "'messages[1].role' is 'function' (a tool result)")]
    path = write_jsonl(tmp_path / "tools.jsonl", [{"messages": [user, answer]}] +
                       [{"messages": [user, turn, answer]} for turn, _ in turns])
    records = read_records(path)
    for i, (_, what) in enumerate(turns, start=1):
        with pytest.raises(DataError) as e:
            build_dataset([records[0], records[i]], tok)
        assert str(e.value) == (f"record 1: {path}:{i + 1}: field {what}: tool calls are not supported for training "
                                f"yet; leave conversations with tool calls out of the training data")
    no_call = {"role": "assistant", "content": "Sunny.", "tool_calls": None, "function_call": None}  # SDK dumps
    assert encode({"messages": [user, no_call]}, tok, "chat") == encode({"messages": [user, answer]}, tok, "chat")


def test_a_chat_that_starts_with_an_assistant_turn_is_refused(tok, tmp_path):
    """The template would render an empty conversation before it (SmolLM2's raises, others misplace a default
    system prompt): refused with the file, line and the fix; a system turn first is fine."""
    greeting, user, answer = ({"role": "assistant", "content": "Hello! How can I help?"},
                              {"role": "user", "content": "2+2"}, {"role": "assistant", "content": "4"})
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": [user, answer]}, {"messages": [greeting, user, answer]}])
    with pytest.raises(DataError) as e:
        build_dataset(read_records(path), tok)
    assert str(e.value) == (f"record 1: {path}:2: field 'messages[0]' is an assistant turn; a conversation must start "
                            f"with a system or user turn (drop the opening assistant message or put the user's turn "
                            f"before it)")
    system = {"role": "system", "content": "Be terse."}
    ex = encode({"messages": [system, answer]}, tok, "chat")
    assert tok.decode(ex.input_ids) == tok.apply_chat_template([system, answer], tokenize=False)
    assert spans(ex) == [tok("4<|im_end|>\n", add_special_tokens=False)["input_ids"]]


def test_a_template_that_refuses_a_conversation_is_a_data_error(tok, monkeypatch):
    monkeypatch.setattr(tok, "chat_template", "{{ raise_exception('Conversation roles must alternate') }}")
    chat = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    with pytest.raises(DataError) as e:
        build_dataset([chat], tok)
    assert str(e.value) == ("record 0: the model's chat template refuses this conversation (Conversation roles must "
                            "alternate); change the conversation to what the template accepts")
    for call in (lambda r: build_dataset([r], tok), lambda r: prompt_ids(r, tok, "chat")):  # with its file:line
        with pytest.raises(DataError, match=r"^(record 0: )?chats.jsonl:7: the model's chat template refuses"):
            call({**chat, "_source": "chats.jsonl:7"})


def test_detect_format_and_source_is_ignored(tok):
    assert detect_format({"instruction": "a", "output": "b", "_source": "f:1"}) == "instruction"
    assert detect_format({"messages": []}) == "chat"
    assert detect_format({"text": "x"}) == "text"
    with pytest.raises(DataError, match=r"f\.jsonl:3: cannot tell the format.*\['prompt'\]"):
        detect_format({"prompt": "x", "_source": "f.jsonl:3"})
    ex = encode({"instruction": "a", "output": "b", "_source": "f:1"}, tok, "instruction")
    assert "f:1" not in tok.decode(ex.input_ids)


# ---------------------------------------------------------------------------------------------------- build / truncate

def test_build_dataset_truncates_and_drops(tok):
    records = [{"instruction": "a", "output": "one two three four five six"}, {"instruction": "a", "output": "c"}]
    n_prompt = encode(records[0], tok, "instruction").labels.count(IGNORE)
    examples, stats = build_dataset(records, tok, max_seq_len=n_prompt + 3)  # record 1: "c", <|im_end|>, "\n"
    assert [len(e.input_ids) for e in examples] == [n_prompt + 3, n_prompt + 3]
    assert (stats.n_records, stats.n_examples, stats.n_truncated, stats.n_dropped) == (2, 2, 1, 0)
    assert stats.n_tokens == 2 * (n_prompt + 3) and stats.n_supervised_tokens == 6
    with pytest.raises(DataError, match="all 2 records were dropped"):  # only prompt tokens left
        build_dataset(records, tok, max_seq_len=n_prompt)


def test_build_dataset_drops_examples_with_nothing_supervised(tok):
    records = [{"instruction": "a", "output": "b"}, {"instruction": "a " * 50, "output": "b"}]
    n_short = len(encode(records[0], tok, "instruction").input_ids)
    examples, stats = build_dataset(records, tok, max_seq_len=n_short)
    assert (stats.n_examples, stats.n_truncated, stats.n_dropped) == (1, 0, 1)
    assert stats.dropped == [f"record 1 (its prompt alone fills max_seq_len={n_short})"]  # the data line names it
    examples, stats = build_dataset(records, tok, max_seq_len=n_short, overflow="drop")
    assert (stats.n_examples, stats.n_truncated, stats.n_dropped) == (1, 0, 1)
    assert stats.dropped == [f"record 1 (longer than max_seq_len={n_short}, data.overflow: drop)"]
    many = [{**records[1], "_source": f"long.jsonl:{i + 1}"} for i in range(5)]
    examples, stats = build_dataset(records[:1] + many, tok, max_seq_len=n_short)
    assert stats.n_dropped == 5 and stats.dropped == [
        f"long.jsonl:{i} (its prompt alone fills max_seq_len={n_short})" for i in (1, 2, 3)]  # the first few only


# ---------------------------------------------------------------------------------------------------- bad input

def test_malformed_jsonl_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n{"text": "oops",\n')
    with pytest.raises(DataError, match=rf"{path}:2: invalid JSON"):
        read_records(str(path))


def test_empty_file_is_an_error(tmp_path):
    for name in ["empty.jsonl", "empty.json", "empty.csv"]:
        (tmp_path / name).write_text("")
        with pytest.raises(DataError, match=rf"{name}: no records"):
            read_records(str(tmp_path / name))


def test_missing_field_names_field_record_and_line(tok, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "a", "output": "b"}, {"instruction": "a", "output": ""}])
    with pytest.raises(DataError, match=rf"record 1: {path}:2: field 'output' is empty$"):
        build_dataset(read_records(path), tok)
    dolly = write_jsonl(tmp_path / "dolly.jsonl", [{"instruction": "a", "context": "c", "response": "b"}])
    with pytest.raises(DataError) as e:  # soak: the keys it has went unsaid (rename response, and context is lost)
        build_dataset(read_records(dolly), tok)
    assert str(e.value) == (f"record 0: {dolly}:1: field 'output' is missing (the record's keys: ['context', "
                            f"'instruction', 'response'])")


def test_files_with_no_records_say_what_they_hold_and_unreadable_files_are_named(tmp_path):
    """Soak: "(the file is empty)" was said of files of blank lines, a CSV header or a 0-row Parquet file; a file
    the user may not read was a PermissionError traceback (a Parquet one: "cannot be read as a Parquet file")."""
    (tmp_path / "blank.jsonl").write_text("\n\n  \n")
    (tmp_path / "header.csv").write_text("instruction,output\n")
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), tmp_path / "none.parquet")
    (tmp_path / "list.json").write_text("[]\n")
    for name, why in [("blank.jsonl", "only blank lines"), ("header.csv", "only a header line"),
                      ("none.parquet", "0 rows"), ("list.json", "an empty list")]:
        with pytest.raises(DataError) as e:
            read_records(str(tmp_path / name))
        assert str(e.value) == f"{tmp_path / name}: no records ({why})"
    (tmp_path / "d.parquet").write_bytes((tmp_path / "none.parquet").read_bytes())
    for name in ("d.jsonl", "d.parquet"):
        (tmp_path / name).touch()
        def refuse(*args, **kw):
            raise PermissionError(13, "Permission denied")
        with pytest.MonkeyPatch.context() as mp:  # root reads any file: the open is refused as for another user
            mp.setattr(Path, "open", refuse)
            with pytest.raises(DataError) as e:
                read_records(str(tmp_path / name))
        assert str(e.value) == (f"{tmp_path / name}: cannot be read (Permission denied); make it readable (e.g. "
                                f"chmod a+r {tmp_path / name}) or run as a user who may read it")


def test_null_keys_do_not_decide_the_format_and_cr_only_line_ends_read(tok, tmp_path):
    """Soak: a Parquet file written from mixed records (every column in every row, null where absent) was refused:
    `messages: null` made an instruction record a chat one. And a JSONL file with old Mac line ends (CR only) was
    "invalid JSON (Extra data)" at line 1."""
    records = [{"messages": None, "instruction": "a", "output": "b"}, {"messages": None, "text": "abc"}]
    assert [detect_format(r) for r in records] == ["instruction", "text"]
    (tmp_path / "cr.jsonl").write_bytes(b'{"text": "one"}\r{"text": "two"}\r')
    assert [r["text"] for r in read_records(str(tmp_path / "cr.jsonl"))] == ["one", "two"]
    bad_chat = {"messages": [{"role": "user", "content": "hi"}]}
    with pytest.raises(DataError, match="record 0: field 'messages' has no assistant turn"):
        build_dataset([bad_chat], tok)


def test_mixed_formats_name_the_first_mismatch(tok, tmp_path):
    path = write_jsonl(tmp_path / "mix.jsonl", [{"text": "a"}, {"text": "b"}, {"instruction": "c", "output": "d"}])
    with pytest.raises(DataError, match=rf"record 2 \({path}:3\) is in 'instruction' format but record 0 is in 'text'"):
        build_dataset(read_records(path), tok)


def test_a_txt_file_is_one_text_record(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_bytes("\ufeff\n\nTitle\r\n\r\nFirst line\n  indented\fsecond\n \t \n\n\rLast\n\n".encode())
    # the whole text (not a record per paragraph, each of which would end with EOS), as written: a byte-order mark
    # skipped, \r\n and \r line ends read as \n (a form feed kept), the blank space around the text left out
    assert read_records(str(path)) == [
        {"text": "Title\n\nFirst line\n  indented\fsecond\n \t \n\n\nLast", "_source": str(path)}]
    (tmp_path / "blank.txt").write_text("\n \n")
    with pytest.raises(DataError, match="blank.txt: no text \\(the file holds only blank space\\)"):
        read_records(str(tmp_path / "blank.txt"))
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError, match="empty.txt: no records \\(the file is empty\\)"):
        read_records(str(tmp_path / "empty.txt"))
    (tmp_path / "data.txt").write_bytes(b"abc\x00\x01\x02" * 100)  # valid UTF-8, yet no text to train on
    with pytest.raises(DataError) as e:
        read_records(str(tmp_path / "data.txt"))
    assert str(e.value) == (f"{tmp_path / 'data.txt'}: a binary file (a NUL byte at byte offset 3), not text; give a "
                            f"file of records (.jsonl, .json, .csv or .parquet) or of plain text (.txt)")


def test_overflow_split_trains_every_token_of_a_long_text_in_windows(tok):
    text = {"text": " ".join(f"word{i}" for i in range(300))}
    whole = encode(text, tok, "text")
    n = len(whole.input_ids)
    for size in (8, 64, n - 1, n):
        examples, stats = build_dataset([text, {"text": "short"}], tok, max_seq_len=size, overflow="split")
        windows = examples[:-1]
        assert all(len(w.input_ids) <= size and len(w.input_ids) >= 2 for w in windows)
        # each window starts where the previous one ended: together they are the document, token for token
        joined = windows[0].input_ids + [t for w in windows[1:] for t in w.input_ids[1:]]
        assert joined == whole.input_ids and [w.labels for w in windows] == [w.input_ids for w in windows]
        # every token but the first is a target exactly once (a window's first label is context only)
        short = encode({"text": "short"}, tok, "text")
        assert sum(len(w.input_ids) - 1 for w in windows) == n - 1
        assert stats.n_supervised_tokens == n - 1 + len(short.input_ids) - 1
        assert (stats.n_split, stats.n_truncated, stats.n_examples) == (int(n > size), 0, len(windows) + 1)
        assert examples[-1] == short and stats.n_tokens == sum(len(e.input_ids) for e in examples)
    assert len(build_dataset([text], tok, max_seq_len=n - 1, overflow="split")[0]) == 2  # n - 1 + 1 more token
    # the default, auto: text records split, instruction and chat records truncated
    assert build_dataset([text], tok, max_seq_len=64) == build_dataset([text], tok, max_seq_len=64, overflow="split")
    long = [{"instruction": "a", "output": text["text"]}]
    assert build_dataset(long, tok, max_seq_len=64) == build_dataset(long, tok, max_seq_len=64, overflow="truncate")
    assert build_dataset(long, tok, max_seq_len=64)[1].n_truncated == 1
    with pytest.raises(DataError, match="data.overflow: split cuts text documents into windows; instruction "):
        build_dataset([{"instruction": "a", "output": "b"}], tok, overflow="split")


def test_all_examples_dropped_is_an_error(tok):
    with pytest.raises(DataError) as e:
        build_dataset([{"text": "a long text " * 20}], tok, max_seq_len=8, overflow="drop")
    assert str(e.value) == ("all 1 records were dropped: 1 are longer than max_seq_len=8 with overflow='drop' "
                            "(raise max_seq_len or use overflow='truncate')")


def test_all_dropped_under_truncate_says_the_prompt_fills_max_seq_len(tok):
    """overflow is already 'truncate': the advice is about the prompt, not about overflow."""
    records = [{"instruction": "a " * 50, "output": "b"}] * 3
    with pytest.raises(DataError) as e:
        build_dataset(records, tok, max_seq_len=16)
    assert str(e.value) == ("all 3 records were dropped: 3 have no response token within max_seq_len=16: the prompt "
                            "alone fills it, so truncating leaves nothing to train on (raise max_seq_len or shorten "
                            "the prompts)")


def test_a_lone_surrogate_names_the_file_line_field_and_position(tok, tmp_path):
    """JSON accepts "\\ud83d" alone (half an emoji, cut by a truncating export); no tokenizer can encode it."""
    path = tmp_path / "s.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "broken emoji \\ud83d", "output": "x"}\n'
                    '{"messages": [{"role": "user", "content": "q"}, '
                    '{"role": "assistant", "content": "ok \\udc00"}]}\n')
    records = read_records(str(path))
    with pytest.raises(DataError) as e:
        build_dataset(records[:2], tok)
    assert str(e.value) == (f"record 1: {path}:2: field 'instruction' holds an unpaired surrogate '\\ud83d' at "
                            f"position 13 (half of a character, e.g. an emoji cut in two); remove it or restore the "
                            f"whole character")
    with pytest.raises(DataError) as e:
        build_dataset(records[2:], tok)
    assert str(e.value) == (f"record 0: {path}:3: field 'messages[1].content' holds an unpaired surrogate '\\udc00' "
                            f"at position 3 (half of a character, e.g. an emoji cut in two); remove it or restore the "
                            f"whole character")


def refusal(path, text: str) -> str:
    """The DataError reading `text`, written to `path`, raises."""
    path.write_text(text)
    with pytest.raises(DataError) as e:
        read_records(str(path))
    return str(e.value)


def test_csv_header_spaces_duplicate_columns_and_extra_fields(tok, tmp_path):
    """Header names are stripped; a column named twice and a row longer than the header are refused by line."""
    (tmp_path / "space.csv").write_text("instruction, output\nx,y\n")
    assert strip_source(read_records(str(tmp_path / "space.csv"))) == [{"instruction": "x", "output": "y"}]
    assert refusal(tmp_path / "dup.csv", "instruction,output,output\nx,y,z\n") == (
        f"{tmp_path / 'dup.csv'}:1: the header names column 'output' twice; rename or remove one of them")
    assert refusal(tmp_path / "extra.csv", 'instruction,output\n"multi\nline",y\n\nwhat,this,extra\n') == (
        f"{tmp_path / 'extra.csv'}:5: 3 fields, but the header has 2 columns (instruction, output); quote a field "
        f'that holds a comma ("a, b")')
    (tmp_path / "lines.csv").write_text('instruction,output\n"multi\nline",y\n\nshort\n')
    records = read_records(str(tmp_path / "lines.csv"))  # each record names the line it starts on
    assert records == [{"instruction": "multi\nline", "output": "y", "_source": f"{tmp_path / 'lines.csv'}:2"},
                       {"instruction": "short", "output": None, "_source": f"{tmp_path / 'lines.csv'}:5"}]


def test_csv_unclosed_quote_is_refused_by_line_and_long_fields_are_read(tmp_path):
    """A lenient csv reader folds every row after a stray quote into one field (25 rows read as 3 records); a
    field longer than csv's default 131,072-character limit is a long document, read whole."""
    rows = ["instruction,output"] + [f"Double {i},{2 * i}" for i in range(25)]
    rows[3] = 'Double 2,"4'
    (tmp_path / "open.csv").write_text("\n".join(rows) + "\n")
    with pytest.raises(DataError) as e:
        read_records(str(tmp_path / "open.csv"))
    assert str(e.value) == (f'{tmp_path / "open.csv"}:4: a quote opened in this row is never closed; a field that '
                            f'holds a quote must be quoted as a whole, its quotes doubled ("say ""hi""")')
    (tmp_path / "stray.csv").write_text('instruction,output\nx,y\na,"b"c\n')
    with pytest.raises(DataError, match=r'stray.csv:3: \',\' expected after \'"\' in this row'):
        read_records(str(tmp_path / "stray.csv"))
    long = "word " * 30_000
    (tmp_path / "long.csv").write_text(f"instruction,output\nq,{long}\n")
    assert strip_source(read_records(str(tmp_path / "long.csv"))) == [{"instruction": "q", "output": long}]


def test_json_numbers_too_long_and_nesting_too_deep_are_data_errors(tmp_path):
    """json.loads refuses these with ValueError / RecursionError, not JSONDecodeError."""
    (tmp_path / "big.jsonl").write_text('{"instruction": "a", "output": "b", "id": ' + "9" * 5000 + "}\n")
    with pytest.raises(DataError, match=r"big.jsonl:1: a number in it is too long to read \(Exceeds the limit"):
        read_records(str(tmp_path / "big.jsonl"))
    (tmp_path / "deep.json").write_text('[{"x": ' + "[" * 100_000 + "]" * 100_000 + "}]")
    with pytest.raises(DataError) as e:
        read_records(str(tmp_path / "deep.json"))
    assert str(e.value) == (f"{tmp_path / 'deep.json'}: nested too deeply to read (arrays or objects thousands of "
                            f"levels deep)")
    (tmp_path / "bad.json").write_text('[\n{"x": 1,}]')
    with pytest.raises(DataError, match=r"bad.json:2: invalid JSON \(Expecting property name"):
        read_records(str(tmp_path / "bad.json"))


def test_a_path_under_an_unknown_users_home_is_no_such_file():
    """Path.expanduser raises RuntimeError for ~nouser; the path stays as typed and is reported missing."""
    with pytest.raises(DataError) as e:
        read_records("~no-such-user-here/data.jsonl")
    assert str(e.value) == "no such file: ~no-such-user-here/data.jsonl"


def test_a_long_conversation_stops_rendering_past_max_seq_len_with_the_same_first_tokens(tok, monkeypatch):
    """Each assistant turn renders the conversation up to it: 800 turns took 8 s for 64 kept tokens. With the
    limit build_dataset passes, rendering stops once the example holds more than max_seq_len tokens; the tokens
    kept are the ones the whole conversation gives."""
    messages = [m for i in range(300) for m in ({"role": "user", "content": f"question {i}"},
                                                 {"role": "assistant", "content": f"answer {i}"})]
    whole = encode({"messages": messages}, tok, "chat")
    renders = []
    original = type(tok).apply_chat_template
    monkeypatch.setattr(type(tok), "apply_chat_template",
                        lambda self, *a, **k: renders.append(1) or original(self, *a, **k))
    cut = encode({"messages": messages}, tok, "chat", limit=64)
    assert 64 < len(cut.input_ids) < len(whole.input_ids) and len(renders) < 20
    assert cut.input_ids[:64] == whole.input_ids[:64] and cut.labels[:64] == whole.labels[:64]
    examples, stats = build_dataset([{"messages": messages}], tok, max_seq_len=64)
    assert examples[0].input_ids == whole.input_ids[:64] and stats.n_truncated == 1


HUGE = {  # a record far past max_seq_len: prose, one word with no space, digits, emoji (4 byte tokens each), CJK
    "prose": (Path(__file__).resolve().parents[2] / "loraforge" / "assets" / "general_text.txt").read_text() * 10,
    "one word": "a" * 300_000,
    "digits": "31415926535897932384626433832795" * 10_000,
    "emoji": "🙂🚀 " * 50_000,
    "cjk": "汉字的分词测试" * 40_000,
}


@pytest.mark.parametrize("kind", HUGE)
def test_a_huge_record_is_tokenized_only_as_far_as_max_seq_len_reaches(tok, kind, monkeypatch):
    """Tokenizing a 20 MB text record whole took 58 s for the 512 tokens kept: the tokenizer now sees only a start
    of each field long enough to hold more than the limit (twice its tokens at the vocabulary's longest entry);
    the tokens kept are the ones the whole record gives, in the text, instruction and chat formats."""
    text, limit = HUGE[kind], 256
    seen = []
    original = type(tok).__call__
    monkeypatch.setattr(type(tok), "__call__",
                        lambda self, t, *a, **k: seen.append(len(t)) or original(self, t, *a, **k))
    for record, fmt in [({"text": text}, "text"), ({"instruction": text, "output": "y"}, "instruction"),
                        ({"instruction": "x", "output": text}, "instruction"),
                        ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": text}]},
                         "chat")]:
        seen.clear()
        cut = encode(record, tok, fmt, limit=limit)
        assert max(seen) < len(text) / 2, (kind, fmt)  # the field was cut before tokenizing
        whole = encode(record, tok, fmt)
        assert len(whole.input_ids) > limit and len(cut.input_ids) > limit
        assert cut.input_ids[:limit] == whole.input_ids[:limit] and cut.labels[:limit] == whole.labels[:limit]


def test_utf16_and_utf32_files_are_named_with_the_right_iconv(tmp_path):
    text = '{"instruction": "x", "output": "y"}\n'
    for encoding, name in [("utf-16-le", "UTF-16"), ("utf-16-be", "UTF-16"), ("utf-32-le", "UTF-32"),
                           ("utf-32-be", "UTF-32")]:  # UTF-32-LE's mark FF FE 00 00 starts like UTF-16-LE's FF FE
        path, fixed = tmp_path / f"{encoding}.jsonl", tmp_path / f"{encoding}.utf8.jsonl"
        path.write_bytes(("\ufeff" + text).encode(encoding))  # the byte-order mark Windows tools write first
        with pytest.raises(DataError) as e:
            read_records(str(path))
        assert str(e.value) == (f"{path}: the file is {name} (it starts with a {name} byte-order mark), not UTF-8; "
                                f"re-encode it: iconv -f {name} -t UTF-8 {path} > {fixed}")


def test_unknown_extension_and_hub_fallback(tmp_path, monkeypatch):
    (tmp_path / "data.md").write_text("hello")
    with pytest.raises(DataError, match=r"unknown file type '\.md'; use \.jsonl, \.json, \.csv, \.parquet or \.txt"):
        read_records(str(tmp_path / "data.md"))
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed, so the test never touches the network
    with pytest.raises(DataError) as e:
        read_records("some-dataset:train")
    assert str(e.value) == ("'some-dataset:train' is not a local file, and reading it as a hub dataset needs the "
                            "`datasets` package: pip install 'loraforge[hub]' (or give a path to a "
                            ".jsonl/.json/.csv/.parquet/.txt file)")


def test_a_missing_local_path_is_no_such_file_not_install_datasets(tmp_path, monkeypatch):
    """A data-file suffix or a /, ., ~ start is a path, never a hub name; with a separator and no `datasets`, both."""
    monkeypatch.setitem(sys.modules, "datasets", None)
    monkeypatch.chdir(tmp_path)
    for source in [str(tmp_path / "trian.jsonl"), "trian.csv", "./train", "~/no-such-dir/train"]:
        with pytest.raises(DataError) as e:
            read_records(source)
        # soak: a config's relative path run from another folder (the README's examples/demo.yaml) said only this
        relative = "" if source.startswith(("/", "~")) else f" (relative paths are read from the current directory, " \
                                                             f"{tmp_path})"
        assert str(e.value) == f"no such file: {source}{relative}"
    with pytest.raises(DataError) as e:
        read_records("data/trian")
    assert str(e.value) == ("no such file: data/trian; if it is a hub dataset (name[:split]), reading it needs the "
                            "`datasets` package: pip install 'loraforge[hub]'")
    monkeypatch.setenv("HOME", str(tmp_path))  # "~/" as a YAML file leaves it: expanded, and read
    write_jsonl(tmp_path / "home.jsonl", RECORDS)
    assert strip_source(read_records("~/home.jsonl")) == RECORDS


# ---------------------------------------------------------------------------------------------------- readers

RECORDS = [{"instruction": "a", "input": "", "output": "b"},
           {"instruction": "c, \"d\"", "input": "e\nf", "output": "g"}]


def strip_source(records):
    return [{k: v for k, v in r.items() if k != "_source"} for r in records]


def test_csv_parquet_json_round_trip(tmp_path):
    import csv

    import pyarrow as pa
    import pyarrow.parquet as pq
    with open(tmp_path / "d.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["instruction", "input", "output"])
        writer.writeheader()
        writer.writerows(RECORDS)
    pq.write_table(pa.Table.from_pylist(RECORDS), tmp_path / "d.parquet")
    (tmp_path / "list.json").write_text(json.dumps(RECORDS))
    (tmp_path / "dict.json").write_text(json.dumps({"data": RECORDS}))
    write_jsonl(tmp_path / "d.jsonl", RECORDS)
    for name in ["d.csv", "d.parquet", "list.json", "dict.json", "d.jsonl"]:
        records = read_records(str(tmp_path / name))
        assert strip_source(records) == RECORDS, name
        assert records[1]["_source"].startswith(str(tmp_path / name))


def test_jsonl_and_csv_with_a_byte_order_mark_are_read(tmp_path):
    """Windows tools often save UTF-8 with a BOM (EF BB BF); it is skipped, not part of the first key."""
    bom = "\ufeff".encode()
    (tmp_path / "bom.jsonl").write_bytes(bom + "".join(json.dumps(r) + "\n" for r in RECORDS).encode())
    (tmp_path / "bom.csv").write_bytes(bom + b"instruction,output\na,b\n")
    assert strip_source(read_records(str(tmp_path / "bom.jsonl"))) == RECORDS
    assert strip_source(read_records(str(tmp_path / "bom.csv"))) == [{"instruction": "a", "output": "b"}]
    (tmp_path / "bad.jsonl").write_bytes(bom + b'{"text": "a"}\n{"text": "\xff"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: byte 0xff at column 11 \(byte offset 27\)"):
        read_records(str(tmp_path / "bad.jsonl"))  # positions count the file's bytes, BOM included


def test_a_stray_byte_is_placed_by_character_and_cp1252_advised_only_for_a_file_that_is_not_utf8(tmp_path):
    """The column counted bytes (a BOM and each é as two); iconv -f cp1252 was advised for a UTF-8 file with one
    damaged byte, which would garble every é in it."""
    (tmp_path / "utf8.jsonl").write_bytes('\ufeff{"text": "ok"}\n{"text": "éé '.encode() + b'\xff"}\n')
    with pytest.raises(DataError) as e:
        read_records(str(tmp_path / "utf8.jsonl"))
    assert str(e.value) == (f"{tmp_path / 'utf8.jsonl'}:2: byte 0xff at column 14 (byte offset 33) is not UTF-8; the "
                            f"rest of the file is UTF-8 (it holds non-ASCII UTF-8 text), so fix or delete this byte")
    (tmp_path / "latin1.jsonl").write_bytes('\ufeff{"text": "café"}\n'.encode("utf-8")[:3] + '{"text": "café"}\n'
                                            .encode("cp1252"))
    with pytest.raises(DataError) as e:
        read_records(str(tmp_path / "latin1.jsonl"))
    assert str(e.value).startswith(f"{tmp_path / 'latin1.jsonl'}:1: byte 0xe9 at column 14 (byte offset 16) is not "
                                   f"UTF-8; re-encode the file as UTF-8 (e.g. for Windows-1252/Latin-1 text: iconv "
                                   f"-f cp1252")


def test_a_json_key_written_twice_in_one_object_is_refused(tmp_path):
    """json.loads keeps the last value and drops the first silently."""
    (tmp_path / "twice.jsonl").write_text('{"instruction": "a", "output": "b"}\n{"output": "1", "output": "2", '
                                          '"instruction": "x"}\n')
    (tmp_path / "twice.json").write_text('[{"messages": [{"role": "user", "role": "assistant", "content": "x"}]}]')
    for name, where in [("twice.jsonl", "twice.jsonl:2"), ("twice.json", "twice.json")]:
        with pytest.raises(DataError) as e:
            read_records(str(tmp_path / name))
        key = "output" if name.endswith("l") else "role"
        assert str(e.value) == (f"{tmp_path / where}: the key {key!r} appears twice in one object, and only its last "
                                f"value would be read; remove or rename one of them")


def test_a_csv_header_repeated_mid_file_or_naming_an_empty_column_twice_is_refused(tmp_path):
    """cat a.csv b.csv leaves b's header as a row, which trained as an example ('instruction' -> 'output')."""
    assert refusal(tmp_path / "ab.csv", "instruction,output\na,b\ninstruction, output\nc,d\n") == (
        f"{tmp_path / 'ab.csv'}:3: this row repeats the header (instruction, output), as where two CSV files with "
        f"headers were joined (cat a.csv b.csv); delete the line")
    assert refusal(tmp_path / "commas.csv", "instruction,output,,\na,b,,\n") == (
        f"{tmp_path / 'commas.csv'}:1: the header names column '' twice (an empty name: a comma too many at the "
        f"header's end?); rename or remove one of them")


def test_a_corrupt_parquet_file_is_a_data_error_naming_it(tmp_path):
    path = tmp_path / "bad.parquet"
    path.write_text('{"instruction": "a", "output": "b"}\n')  # JSON under a .parquet name
    with pytest.raises(DataError) as e:
        read_records(str(path))
    assert str(e.value).startswith(f"{path}: cannot be read as a Parquet file (")
    assert str(e.value).endswith("); check that it was written completely (e.g. pandas' df.to_parquet) or give a "
                                 ".jsonl, .json or .csv file")


def test_train_test_split_is_deterministic_and_disjoint():
    records = [{"text": str(i)} for i in range(20)]
    train, test = train_test_split(records, 0.25, seed=1)
    assert (len(train), len(test)) == (15, 5)
    assert (train, test) == train_test_split(records, 5, seed=1)
    assert sorted(r["text"] for r in train + test) == sorted(r["text"] for r in records)
    with pytest.raises(DataError) as e:
        train_test_split(records, 0)
    assert str(e.value) == ("test=0 holds out 0 of the 20 records, leaving 20 to train on; use a count from 1 to 19 "
                            "(at least 1 record on each side)")


def test_an_eval_fraction_that_empties_a_side_names_the_field_and_the_valid_fractions():
    records = [{"text": str(i)} for i in range(40)]
    with pytest.raises(DataError) as e:
        train_test_split(records, 0.99, field="data.eval_fraction")
    assert str(e.value) == ("data.eval_fraction=0.99 holds out 40 of the 40 records, leaving 0 to train on; use a "
                            "fraction from 0.025 to 0.975 (at least 1 record on each side)")
    with pytest.raises(DataError) as e:
        train_test_split(records[:20], 0.01, field="data.eval_fraction")
    assert str(e.value) == ("data.eval_fraction=0.01 holds out 0 of the 20 records, leaving 20 to train on; use a "
                            "fraction from 0.05 to 0.95 (at least 1 record on each side)")
    for n in [2, 3, 7, 21, 333, 123457]:  # the bounds the error gives split n records with 1 .. n - 1 held out
        rows = [{"text": str(i)} for i in range(n)]
        with pytest.raises(DataError) as e:
            train_test_split(rows, 1e-9, field="data.eval_fraction")
        low, high = (float(x) for x in re.search(r"from (\S+) to (\S+) ", str(e.value)).groups())
        assert [len(train_test_split(rows, f)[1]) for f in (low, high)] == [1, n - 1], (n, low, high)


# ---------------------------------------------------------------------------------------------------- packing

def random_examples(n: int, vocab: int, seed: int) -> list[Example]:
    g = torch.Generator().manual_seed(seed)
    examples = []
    for _ in range(n):
        length = int(torch.randint(3, 12, (1,), generator=g))
        n_prompt = int(torch.randint(1, length - 1, (1,), generator=g))
        ids = torch.randint(0, vocab, (length,), generator=g).tolist()
        examples.append(Example(ids, [IGNORE] * n_prompt + ids[n_prompt:]))
    return examples


@pytest.fixture(scope="module")
def tiny_llama():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def test_pack_rows_fit_and_keep_every_example():
    examples = random_examples(20, 128, seed=0)
    rows = pack(examples, max_seq_len=24)
    assert all(len(r["input_ids"]) == len(r["labels"]) == len(r["position_ids"]) <= 24 for r in rows)
    assert sum(len(r["input_ids"]) for r in rows) == sum(len(e.input_ids) for e in examples)
    assert len(rows) < len(examples)
    with pytest.raises(DataError, match="does not fit max_seq_len=4"):
        pack(examples, max_seq_len=4)


def test_packed_forward_equals_each_example_alone(tiny_llama):
    examples = random_examples(12, 128, seed=1)
    examples[0].labels[0] = 5  # a supervised first token (as in train_on_prompt): pack must still mask it
    rows = pack(examples, max_seq_len=24)
    batch = collate(rows, pad_id=0)
    assert "attention_mask" not in batch  # packed: transformers builds the block-diagonal mask from position_ids
    labels = batch.pop("labels")
    with torch.no_grad():
        logits = tiny_llama(**batch, use_cache=False).logits  # use_cache=False: see loraforge/data.py docstring
    seen = 0
    for b, row in enumerate(rows):
        starts = [t for t, p in enumerate(row["position_ids"]) if p == 0] + [len(row["input_ids"])]
        for start, end in zip(starts, starts[1:]):
            ids = batch["input_ids"][b, start:end]
            with torch.no_grad():
                alone = tiny_llama(input_ids=ids[None], use_cache=False).logits[0]
            # fp32, same kernels: only summation order may differ (masked vs. shorter sequence), hence default
            # fp32 tolerances (rtol 1.3e-6, atol 1e-5).
            torch.testing.assert_close(logits[b, start:end], alone)
            assert labels[b, start] == IGNORE  # never predict an example's first token from the previous one
            seen += 1
    assert seen == len(examples)


def test_packed_loss_equals_unpacked_loss(tiny_llama):
    examples = random_examples(12, 128, seed=2)
    packed = collate(pack(examples, max_seq_len=32), pad_id=0)
    unpacked = collate(examples, pad_id=0)
    assert "attention_mask" in unpacked and "position_ids" not in unpacked
    with torch.no_grad():
        loss_packed = tiny_llama(**packed, use_cache=False).loss
        loss_unpacked = tiny_llama(**unpacked, use_cache=False).loss
    n_supervised = sum(sum(label != IGNORE for label in e.labels[1:]) for e in examples)
    assert int((packed["labels"][:, 1:] != IGNORE).sum()) == n_supervised
    torch.testing.assert_close(loss_packed, loss_unpacked)


def test_join_rows_balances_packed_rows_into_joins_near_the_limit():
    """Rows of 3, 2, 4 and 7 tokens (16) under a limit of 6: ⌈16 / 6⌉ = 3 joins, the longest row first into the
    shortest join: 7, 4, then 3 + 2. Every token, label and position id stays, each row's in its order, and the
    input rows are not changed."""
    def row(n, first):
        return {"input_ids": list(range(first, first + n)), "labels": [IGNORE] + list(range(first + 1, first + n)),
                "position_ids": list(range(n))}

    rows = [row(3, 10), row(2, 20), row(4, 30), row(7, 40)]
    before = json.dumps(rows)
    joined = join_rows(rows, max_tokens=6)
    assert [len(r["input_ids"]) for r in joined] == [7, 4, 5]
    assert joined[2] == {"input_ids": [10, 11, 12, 20, 21], "labels": [IGNORE, 11, 12, IGNORE, 21],
                         "position_ids": [0, 1, 2, 0, 1]}
    for key in ("input_ids", "labels", "position_ids"):
        assert sorted(sum((r[key] for r in joined), [])) == sorted(sum((r[key] for r in rows), []))
    # joins differ by at most one row's length: 3 rows of 10 and 2 of 1 under 12 join as 10 + 1, 10 + 1, 10
    assert [len(r["input_ids"]) for r in join_rows([row(10, 0)] * 3 + [row(1, 50)] * 2, max_tokens=12)] == [11, 11, 10]
    assert json.dumps(rows) == before
    # under the default limit a batch of packed rows becomes one row: collate pads nothing
    examples = random_examples(20, 128, seed=4)
    packed = pack(examples, max_seq_len=24)
    one = collate(join_rows(packed), pad_id=0)
    assert len(packed) > 1 and one["input_ids"].shape == (1, sum(len(e.input_ids) for e in examples))
    assert int((one["labels"] != IGNORE).sum()) == int((collate(packed, pad_id=0)["labels"] != IGNORE).sum())
    # collate's multiple: 1 row of 5 tokens to 16 positions, the padding its own sequence; 3 rows of up to 5 to 16
    padded = collate(join_rows(rows[:2]), pad_id=9, multiple=16)
    assert padded["input_ids"].tolist() == [[10, 11, 12, 20, 21] + [9] * 11]
    assert padded["position_ids"].tolist() == [[0, 1, 2, 0, 1] + list(range(11))]
    assert padded["labels"].tolist() == [[IGNORE, 11, 12, IGNORE, 21] + [IGNORE] * 11]
    assert collate(rows[:3], pad_id=9, multiple=16)["input_ids"].shape == (3, 16)
    assert collate(rows[:3], pad_id=9)["input_ids"].shape == (3, 4)
    # a long padding goes in as sequences of up to PAD_RUN positions, so lean attention still runs it by sequence
    long = collate([join_rows(rows[:2])[0], row(300, 100)], pad_id=9)
    assert long["position_ids"][0].tolist() == [0, 1, 2, 0, 1] + list(range(128)) * 2 + list(range(39))
    assert runs_by_sequence(segment_starts(long["position_ids"]))


def test_collate_pads_and_padding_fraction():
    rows = [Example([1, 2, 3], [IGNORE, 2, 3]), Example([4], [IGNORE])]
    batch = collate(rows, pad_id=9)
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 9, 9]]
    assert batch["labels"].tolist() == [[IGNORE, 2, 3], [IGNORE, IGNORE, IGNORE]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    packed = collate([{"input_ids": [1, 2, 3], "labels": [IGNORE, 2, IGNORE], "position_ids": [0, 1, 0]},
                      {"input_ids": [4], "labels": [IGNORE], "position_ids": [0]}], pad_id=9)
    assert set(packed) == {"input_ids", "labels", "position_ids"}
    assert packed["position_ids"].tolist() == [[0, 1, 0], [0, 0, 1]]
    assert padding_fraction(rows, batch_size=2) == pytest.approx(2 / 6)
    assert padding_fraction(rows, batch_size=1) == 0.0


def test_auto_packing_packs_only_when_padding_is_worth_it():
    def ex(n):
        return Example(list(range(n)), list(range(n)))

    similar = [ex(10), ex(11), ex(10), ex(12)]  # padded in pairs: 1 + 2 of 46 positions are padding
    varied = [ex(2), ex(20), ex(3), ex(30)]  # 18 + 27 of 100
    assert padding_fraction(similar, 2) == pytest.approx(3 / 46) and padding_fraction(varied, 2) == pytest.approx(0.45)
    similar, varied = padding_fraction(similar, 2), padding_fraction(varied, 2)
    assert not should_pack("auto", similar) and should_pack("auto", varied)
    assert should_pack(True, similar) and not should_pack(False, varied)


def test_padding_fraction_nets_out_what_a_shared_prefix_saves():
    """Padded rows that compute a shared prefix once can cost fewer positions than packed rows (which share none):
    2 rows of 6 and 4 tokens sharing 3 compute 12 - 3 positions for 10 real tokens. bench/train.py-style A/B on the
    demo data with padded-out prompts (bf16, 6 steps each): at 31% padding, 16% net of the prefix, padded rows ran
    1.10× the packed rows' tokens/s; at 34% padding, 23% net, packed rows ran 1.20× the padded ones."""
    rows = [Example([1, 2, 3, 4, 5, 6], [IGNORE] * 4 + [5, 6]), Example([1, 2, 3, 7], [IGNORE] * 3 + [7])]
    assert padding_fraction(rows, 2) == pytest.approx(2 / 12)
    calls = []
    net = padding_fraction(rows, 2, lambda chunk: calls.append(len(chunk)) or 3)
    assert calls == [2] and net == pytest.approx(1 - 10 / 9)  # below 0: fewer positions than real tokens
    assert not should_pack("auto", net)
    # a 1-row batch shares none
    assert padding_fraction(rows + rows[:1], 2, lambda chunk: 3) == pytest.approx(1 - 16 / 15)
    assert padding_fraction(rows * 3, 2, max_batches=1) == pytest.approx(2 / 12)  # only the first batch is read


def test_a_chat_turn_that_ends_in_the_eos_text_learns_one_end_of_turn(tok):
    """The chat template ends each assistant turn with <|im_end|> itself: a turn that already ends in it is
    stripped (every assistant turn, earlier ones in an eval prompt too), counted per turn."""
    def chat(first, last):
        return {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": first},
                             {"role": "user", "content": "c"}, {"role": "assistant", "content": last}]}

    plain = encode(chat("b", "d"), tok, "chat")
    for first, last in [("b<|im_end|>", "d"), ("b", "d<|im_end|>\n"), ("b<|im_end|>", "d<|im_end|>")]:
        ex = encode(chat(first, last), tok, "chat")
        assert (ex.input_ids, ex.labels) == (plain.input_ids, plain.labels)
        assert prompt_ids(chat(first, last), tok, "chat") == prompt_ids(chat("b", "d"), tok, "chat")
    assert tok.decode(plain.input_ids).count("<|im_end|>") == 5  # one per turn (the default system turn too)
    records = [chat("b<|im_end|>", "d<|im_end|>"), chat("b", "d<|im_end|>"), chat("b", "d")]
    assert build_dataset(records, tok)[1].n_eos_stripped == 3
    with pytest.raises(DataError) as e:
        build_dataset([{**chat("b", "<|im_end|>"), "_source": "f.jsonl:2"}], tok)
    assert str(e.value) == ("record 0: f.jsonl:2: field 'messages[3].content' holds only the end-of-sequence text "
                            "'<|im_end|>'; give the text before it")


def test_json_lines_in_a_json_file_and_pretty_json_in_a_jsonl_file_say_which_extension_fits(tmp_path):
    lines = tmp_path / "lines.json"
    lines.write_text('{"text": "a"}\n{"text": "b"}\n')
    with pytest.raises(DataError, match=re.escape(f"{lines}:2: invalid JSON (Extra data at column 1); one JSON object "
                                                  f"per line is JSON Lines: name the file lines.jsonl")):
        read_records(str(lines))
    pretty = tmp_path / "pretty.jsonl"
    pretty.write_text('[\n  {"text": "a"}\n]\n')
    with pytest.raises(DataError, match=re.escape(f"{pretty}:1: invalid JSON (Expecting value at column 2); a .jsonl "
                                                  f"file holds one whole JSON object per line: a JSON array or "
                                                  f"pretty-printed JSON belongs in pretty.json")):
        read_records(str(pretty))
    control = tmp_path / "control.jsonl"
    control.write_text('{"text": "a\tb"}\n')
    with pytest.raises(DataError, match=re.escape(f"{control}:1: invalid JSON (Invalid control character at column "
                                                  f"12)")):
        read_records(str(control))


def test_a_binary_file_is_named_binary_not_utf8_with_one_bad_byte(tmp_path):
    """A gzip file or model weights renamed .jsonl was "UTF-8 text" whose first bad byte was to be fixed or deleted:
    compressed files are named by their magic bytes with the command that unpacks them, other binary files by
    their NUL or control bytes. Text in a legacy encoding is still advised to be re-encoded."""
    import gzip
    import struct

    text = "".join(f'{{"instruction": "Add {a} and 2.", "output": "{a + 2}"}}\n' for a in range(50)).encode()
    weights = b'{"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}'
    RECORDS = "give a file of records (.jsonl, .json, .csv or .parquet) or of plain text (.txt)"
    files = {
        "gz.jsonl": (gzip.compress(text), "a binary file (gzip-compressed), not text; decompress it: gunzip -c "
                                          "{path} > {unpacked}"),
        "bz.csv": (__import__("bz2").compress(text), "a binary file (bzip2-compressed), not text; decompress it: "
                                                     "bunzip2 -c {path} > {unpacked}"),
        "st.jsonl": (struct.pack("<Q", len(weights)) + weights + bytes(range(200, 216)),
                     "a binary file (safetensors: model weights?), not text; " + RECORDS),
        "pq.json": (b"PAR1\x15\x04\xff\xfe", "a binary file (Parquet), not text; give it a .parquet name, which is "
                                             "read as Parquet"),
        "nul.jsonl": (b'{"text": "a\xff\x00b"}\n', "a binary file (a NUL byte at byte offset 12), not text; "
                                                  + RECORDS),
        "ctl.jsonl": (bytes([0xff, 1, 2, 3, 4, 5]) + b"abcdefghijklmnopqrst", "a binary file (5 control bytes in "
                                                                             "its first 26), not text; " + RECORDS),
    }
    for name, (content, message) in files.items():
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(DataError) as e:
            read_records(str(path))
        assert str(e.value) == f"{path}: " + message.format(path=path, unpacked=path.with_suffix(
            ".unpacked" + path.suffix)), name
    assert gzip.decompress((tmp_path / "gz.jsonl").read_bytes()) == text  # the command's output is the records
    (tmp_path / "latin1.jsonl").write_bytes('{"text": "déjà vu, façade, naïve"}\n'.encode("cp1252"))
    with pytest.raises(DataError, match=r"byte 0xe9 at column 12 .* re-encode the file as UTF-8"):
        read_records(str(tmp_path / "latin1.jsonl"))


def test_a_hub_dataset_whose_host_does_not_resolve_is_read_from_the_cache_at_once(monkeypatch, capsys):
    """Soak: without a network a hub dataset name retried for about half a minute before its error (models were
    fixed by reading the Hub offline when its host does not resolve; datasets was not). Now the same: `datasets`
    (a stand-in, as offline as the real one with HF_HUB_OFFLINE set) loads under its offline flags, which are set
    back after; a cached copy loads, a missing one is one line at once."""
    fake = types.ModuleType("datasets")
    fake.config = types.SimpleNamespace(HF_HUB_OFFLINE=False, HF_DATASETS_OFFLINE=False)
    cached = {"org/cached": [{"text": "kept"}]}
    offline_when_asked = []

    def load_dataset(name, split):
        offline_when_asked.append((constants.HF_HUB_OFFLINE, fake.config.HF_HUB_OFFLINE,
                                   fake.config.HF_DATASETS_OFFLINE))
        if name in cached:
            return cached[name]
        raise ConnectionError(f"Couldn't reach '{name}' on the Hub (offline mode is enabled)\nmore lines")

    def no_dns(host, *args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    fake.load_dataset = load_dataset
    monkeypatch.setitem(sys.modules, "datasets", fake)
    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    assert read_records("org/cached") == [{"text": "kept", "_source": "org/cached:train[0]"}]
    with pytest.raises(DataError) as e:
        read_records("org/name:test")
    assert str(e.value) == ("'org/name:test' is not a local file and could not be loaded as a hub dataset from the "
                            "cache (no connection to the Hugging Face Hub; a dataset loaded once online is read from "
                            "the cache): ConnectionError: Couldn't reach 'org/name' on the Hub (offline mode is "
                            "enabled); give a path to a .jsonl/.json/.csv/.parquet/.txt file instead")
    assert offline_when_asked == [(True, True, True)] * 2  # offline for the loads only
    assert (constants.HF_HUB_OFFLINE, fake.config.HF_HUB_OFFLINE, fake.config.HF_DATASETS_OFFLINE) == (False,) * 3
    assert capsys.readouterr().err == ("'org/cached' is not a local file: loading it as a hub dataset from the cache "
                                       "(no connection to the Hugging Face Hub)\n") + \
        "'org/name:test' is not a local file: loading it as a hub dataset from the cache (no connection to the " \
        "Hugging Face Hub)\n"


def test_a_hub_dataset_name_says_it_goes_to_the_hub_and_reads_its_rows(monkeypatch, capsys):
    """The hub path with a stand-in `datasets` (no network here): rows become records named by split and index,
    and a line says a name that is not a local file goes to the hub (soak: a typo sat through ~34 s of retries
    without a word)."""
    fake = types.ModuleType("datasets")
    fake.load_dataset = lambda name, split: [{"text": f"{name} {split} {i}"} for i in range(2)]
    monkeypatch.setitem(sys.modules, "datasets", fake)
    monkeypatch.setattr(socket, "getaddrinfo", lambda host, *args, **kwargs: [])  # the Hub's host resolves
    assert read_records("org/name:test") == [{"text": "org/name test 0", "_source": "org/name:test[0]"},
                                             {"text": "org/name test 1", "_source": "org/name:test[1]"}]
    assert capsys.readouterr().err == ("'org/name:test' is not a local file: loading it as a hub dataset (a typo? "
                                       "offline, this retries for about half a minute; HF_DATASETS_OFFLINE=1 fails "
                                       "at once)\n")


def test_a_jsonl_file_is_read_holding_the_text_and_its_records_not_a_list_of_its_lines_too(tmp_path):
    """Soak: a 1 GB .jsonl peaked at 3 GB while read (its text, the list of its lines and the records). Python's
    allocations while reading a 4 MB one: the bytes and their text (2x the file), then the text and the records
    (2.2x); the list of lines made it 3.2x."""
    path = tmp_path / "long.jsonl"
    path.write_text("".join(json.dumps({"text": f"{i} " + "word " * 400}) + "\n" for i in range(2000)))
    tracemalloc.start()
    try:
        records = read_records(str(path))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert [r["text"].split()[0] for r in records] == [str(i) for i in range(2000)]
    assert records[-1]["_source"] == f"{path}:2000"
    assert peak < 2.5 * path.stat().st_size, peak / path.stat().st_size
