"""Models that are not SmolLM2: tokenizers built in code with the chat templates of other model families (their
logic copied: Gemma, Cohere's Command-R, Mistral, Phi-3), and what generate, eval and serve do with them."""

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from loraforge.cli import main
from loraforge.decoding import greedy, stop_ids
from loraforge.serve import Engine
from loraforge.serve.errors import ServeError
from loraforge.serve.sampling import SamplingParams
from loraforge.serve.schemas import ChatMessage, chat_ids
from loraforge.training.data import IGNORE, DataError, build_dataset, encode, prompt_ids
from loraforge.training.evaluate import accuracy

CORPUS = ["Hello there, how are you today? I am fine, thank you.", "What is 2 plus 3? It is 5.",
          "Paris is the capital of France. Answer briefly: yes or no.", "[INST] [/INST]\n"] * 10
# Gemma's template (system role refused, roles alternate, "model" for the assistant, content trimmed)
GEMMA = ("{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
         "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
         "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
         "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
         "{% endif %}{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}"
         "{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\\n'}}{% endif %}")
# Cohere Command-R's turn markers: an end of turn that no other family uses
COMMAND_R = ("{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
             "{{ '<|START_OF_TURN_TOKEN|><|USER_TOKEN|>' + message['content'] + '<|END_OF_TURN_TOKEN|>' }}"
             "{% elif message['role'] == 'assistant' %}{{ '<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>' + "
             "message['content'] + '<|END_OF_TURN_TOKEN|>' }}{% endif %}{% endfor %}{% if add_generation_prompt %}"
             "{{ '<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>' }}{% endif %}")
# Mistral-7B-Instruct-v0.1's: the answer follows "[/INST]" with no space between
MISTRAL = ("{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
           "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
           "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
           "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}{% endif %}{% endfor %}")
# Phi-3-mini's: the conversation (without a generation prompt) ends with the EOS after its last turn
PHI3 = ("{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\\n' + message['content'] + "
        "'<|end|>\\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\\n' + message['content'] + '<|end|>\\n'}}"
        "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\\n' + message['content'] + '<|end|>\\n'}}{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% else %}{{ eos_token }}{% endif %}")
# Llama 3's: <|begin_of_text|> written by the template (the tokenizer adds it too), turns end with <|eot_id|>
LLAMA3 = ("{% for message in messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>"
          "\\n\\n' + message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + "
          "content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")
# Qwen3's logic: an assistant turn after the last user turn carries a <think> block, earlier ones lose it
QWEN3 = ("{%- set ns = namespace(last=messages|length - 1) %}{%- for m in messages %}{%- if m.role == 'user' %}"
         "{%- set ns.last = loop.index0 %}{%- endif %}{%- endfor %}{%- for m in messages %}"
         "{%- if m.role == 'assistant' and loop.index0 > ns.last %}"
         "{{- '<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n' + m.content + '<|im_end|>\\n' }}"
         "{%- else %}{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{%- endif %}{%- endfor %}"
         "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")
# Mistral v0.3's logic: the system prompt goes into the last user turn
MISTRAL_V3 = ("{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content'] %}"
              "{%- set loop_messages = messages[1:] %}{%- else %}{%- set loop_messages = messages %}{%- endif %}"
              "{{- bos_token }}{%- for message in loop_messages %}{%- if message['role'] == 'user' %}"
              "{%- if loop.last and system_message is defined %}"
              "{{- '[INST] ' + system_message + '\\n\\n' + message['content'] + '[/INST]' }}"
              "{%- else %}{{- '[INST] ' + message['content'] + '[/INST]' }}{%- endif %}"
              "{%- elif message['role'] == 'assistant' %}{{- ' ' + message['content'] + eos_token}}{%- endif %}"
              "{%- endfor %}")
CHAT = [{"role": "user", "content": "Hello there"}, {"role": "assistant", "content": "It is 5."},
        {"role": "user", "content": "What is 2 plus 3?"}, {"role": "assistant", "content": "Paris, of course."}]


def byte_level(specials: list[str], bos: str, eos: str, pad: str | None = None) -> PreTrainedTokenizerFast:
    """A byte-level BPE (GPT-2, Llama 3, Qwen style) of ~300 tokens trained on CORPUS, with `specials` first."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=pad or eos)


def sentencepiece(specials: list[str], bos: str, eos: str) -> PreTrainedTokenizerFast:
    """A SentencePiece-style BPE as transformers converts Llama 2's, Mistral's and Phi-3's: "▁" for a space, one
    written before the text's start (prepend_scheme "first"), no split at spaces, bytes for unknown characters."""
    tok = Tokenizer(models.BPE(byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first", split=True)  # pieces never cross a space
    tok.decoder = decoders.Metaspace(prepend_scheme="first")
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=400, special_tokens=specials + [
        f"<0x{i:02X}>" for i in range(256)]))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first", split=False)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=eos)


def chain_model(tokenizer, chain: list[str], eos=None) -> LlamaForCausalLM:
    """A tiny Llama whose greedy next token after chain[i] is chain[i + 1] (and chain[-1] after itself), whatever
    came before: the attention and MLP outputs are zero, so the last hidden state is the token's embedding."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=128, tie_word_embeddings=False)).eval()
    model.generation_config = GenerationConfig(eos_token_id=eos, pad_token_id=tokenizer.pad_token_id)
    ids = tokenizer.convert_tokens_to_ids(chain)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        unit = model.model.embed_tokens.weight / model.model.embed_tokens.weight.norm(dim=1, keepdim=True)
        model.lm_head.weight.zero_()
        for a, b in zip(ids, ids[1:] + ids[-1:]):
            model.lm_head.weight[b] += 40 * unit[a]
    return model


@pytest.fixture(scope="module")
def gemma():
    """Gemma's tokens: <eos> ends a text, <end_of_turn> a chat turn; generation_config lists both ([1, 107])."""
    tok = byte_level(["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"], "<bos>", "<eos>", "<pad>")
    tok.chat_template = GEMMA
    return tok


def test_generate_eval_and_serve_stop_at_every_end_of_turn_the_model_or_template_names(gemma):
    """Soak: eval (and generate) stopped at the tokenizer's eos and three end-of-turn names only: Gemma's
    <end_of_turn>, in its generation_config, ran on ("Hi yes yes yes"), so exact match was 0%; serve stopped at the
    generation_config's ids only: a ChatML model whose generation_config names <|endoftext|> ran past <|im_end|>."""
    hi, yes = gemma.tokenize("Paris"), gemma.tokenize(" yes")
    model = chain_model(gemma, ["Ċ", *hi, "<end_of_turn>", *yes], eos=[gemma.eos_token_id, 4])
    assert stop_ids(gemma, model) == [1, 4]
    record = {"messages": [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Paris"}]}
    assert accuracy(model, gemma, [record], "chat", max_new_tokens=6)["samples"] == [
        {"reference": "Paris", "prediction": "Paris"}]

    cohere = byte_level(["<PAD>", "<BOS_TOKEN>", "<|END_OF_TURN_TOKEN|>", "<|START_OF_TURN_TOKEN|>",
                         "<|USER_TOKEN|>", "<|CHATBOT_TOKEN|>", "<EOS_TOKEN>"], "<BOS_TOKEN>", "<EOS_TOKEN>", "<PAD>")
    cohere.chat_template = COMMAND_R
    end = cohere.convert_tokens_to_ids("<|END_OF_TURN_TOKEN|>")
    model = chain_model(cohere, ["<|CHATBOT_TOKEN|>", *hi, "<|END_OF_TURN_TOKEN|>", *yes], eos=cohere.eos_token_id)
    assert stop_ids(cohere, model) == sorted([end, cohere.eos_token_id])  # from the template alone
    prompt = cohere.apply_chat_template([{"role": "user", "content": "Hello"}], add_generation_prompt=True,
                                        return_dict=False)
    assert greedy(model, [prompt], stop_ids(cohere, model), 6) == [cohere.convert_tokens_to_ids(hi) + [end]]
    engine = Engine(model, cohere)
    try:
        done = engine.generate(prompt, None, SamplingParams(max_tokens=6))
    finally:
        engine.stop()
    assert (done.text, done.finish_reason) == ("Paris", "stop")
    assert done.token_ids == cohere.convert_tokens_to_ids(hi) + [end]


def test_a_template_that_refuses_a_system_message_is_an_argument_error_in_generate_and_a_400_in_serve(
        gemma, tmp_path, capsys):
    """Soak: Gemma's template raises on a system turn: `generate --system` ended in a jinja2 traceback, and serve
    answered a chat request with one 500 internal error (the traceback in its log)."""
    gemma.save_pretrained(tmp_path)
    chain_model(gemma, ["Ċ"]).save_pretrained(tmp_path)
    args = ["--model", str(tmp_path), "--max-new-tokens", "2", "--precision", "fp32"]
    assert main(["generate", "hi", "--system", "Be brief.", *args]) == 2
    assert ("error: invalid arguments:\n  --system: the model's chat template refuses it (System role not "
            "supported); leave --system out and put the instructions in PROMPT") in capsys.readouterr().err
    messages = [ChatMessage(role="system", content="Be brief."), ChatMessage(role="user", content="hi")]
    with pytest.raises(ServeError) as e:
        chat_ids(gemma, messages)
    assert e.value.status == 400 and str(e.value) == (
        "messages: the model's chat template refuses this conversation (System role not supported); send what it "
        "accepts (Gemma and Mistral templates take no system message, and user and assistant turns must alternate)")


def test_a_conversation_is_learnt_as_its_chat_templates_tokens_with_sentencepiece_and_a_trailing_eos():
    """Soak: assistant turns were tokenized apart from the text before them, and a SentencePiece tokenizer writes
    "▁" before the start of a text: Mistral's and Phi-3's answers were learnt as "▁It" where the template's tokens
    (and every prompt generate and serve build) have "It", and "▁[INST]" after each "</s>". Phi-3's template, which
    ends a conversation with its EOS, was refused for every conversation of more than one turn."""
    for template, specials, (bos, eos) in [
            (MISTRAL, ["<unk>", "<s>", "</s>"], ("<s>", "</s>")),
            (PHI3, ["<unk>", "<s>", "<|endoftext|>", "<|user|>", "<|assistant|>", "<|end|>"],
             ("<s>", "<|endoftext|>"))]:
        tok = sentencepiece(specials, bos, eos)
        tok.chat_template = template
        full = tok.apply_chat_template(CHAT, return_dict=False)
        ex = encode({"messages": CHAT}, tok, "chat")
        assert ex.input_ids == full
        # each answer from where its generation prompt ends to the start of the next user turn (or the end)
        first = len(tok.apply_chat_template(CHAT[:1], add_generation_prompt=True, return_dict=False))
        second = len(tok.apply_chat_template(CHAT[:3], add_generation_prompt=True, return_dict=False))
        next_user = (len(tok.apply_chat_template(CHAT[:2], return_dict=False)) if template == MISTRAL
                     else full.index(tok.convert_tokens_to_ids("<|user|>"), first))  # Phi-3: CHAT[:2] ends in EOS
        assert tok.convert_ids_to_tokens(full[first]) == "I"  # no "▁" before the answer
        assert spans(ex) == [full[first:next_user], full[second:]]
        assert prompt_ids({"messages": CHAT}, tok, "chat") == full[:second] == tok.apply_chat_template(
            CHAT[:3], add_generation_prompt=True, return_dict=False)
    assert tok.decode(spans(ex)[0]) == "It is 5.<|end|>\n"
    assert tok.decode(spans(ex)[1]).endswith("<|end|>\n<|endoftext|>")


def spans(ex) -> list[list[int]]:
    """The runs of supervised tokens, in order."""
    out, run = [], []
    for token, label in zip(ex.input_ids, ex.labels):
        if label == IGNORE:
            out, run = (out + [run] if run else out), []
        else:
            run.append(token)
    return out + [run] if run else out


def test_an_instruction_record_ends_with_the_templates_end_of_turn_not_the_tokenizers_eos():
    """Soak: an instruction record's answer ended with the tokenizer's EOS whatever the template writes: Llama 3
    learnt <|end_of_text|> where its chats (and the template) end a turn with <|eot_id|>. It is now the conversation
    [user, assistant] as the template renders it; its tokens are apply_chat_template's, with one <|begin_of_text|>
    (the template writes it; the tokenizer, which adds one too, adds none here)."""
    tok = byte_level(["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                      "<|eot_id|>"], "<|begin_of_text|>", "<|end_of_text|>")
    tok.chat_template = LLAMA3
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", tok.bos_token_id)])
    assert tok("It")["input_ids"][0] == tok.bos_token_id
    record = {"instruction": "What is 2 plus 3?", "input": "Answer briefly.", "output": "It is 5.<|end_of_text|>"}
    messages = [{"role": "user", "content": "What is 2 plus 3?\n\nAnswer briefly."},
                {"role": "assistant", "content": "It is 5."}]
    full = tok.apply_chat_template(messages, return_dict=False)
    prompt = tok.apply_chat_template(messages[:1], add_generation_prompt=True, return_dict=False)
    ex = encode(record, tok, "instruction")
    assert ex.input_ids == full and full.count(tok.bos_token_id) == 1
    assert ex.labels == [IGNORE] * len(prompt) + full[len(prompt):]
    assert tok.convert_ids_to_tokens(full[-1]) == "<|eot_id|>" and tok.eos_token_id not in full
    assert prompt_ids(record, tok, "instruction") == prompt


def test_a_template_that_rewrites_earlier_turns_learns_them_as_the_whole_conversation_writes_them():
    """Qwen3's template drops the <think> block of the turns before the last user turn, so the conversation up to
    such a turn renders otherwise than the whole one: every conversation of two answers was refused. Each turn is
    now its content and end of turn as the whole conversation writes them (apply_chat_template's tokens)."""
    tok = byte_level(["<|endoftext|>", "<|im_start|>", "<|im_end|>"], None, "<|im_end|>", "<|endoftext|>")
    tok.chat_template = QWEN3
    ex = encode({"messages": CHAT}, tok, "chat")
    full = tok.apply_chat_template(CHAT, return_dict=False)
    assert ex.input_ids == full
    assert [tok.decode(run) for run in spans(ex)] == [
        "It is 5.<|im_end|>\n", "<think>\n\n</think>\n\nParis, of course.<|im_end|>\n"]
    assert prompt_ids({"messages": CHAT}, tok, "chat") == tok.apply_chat_template(
        CHAT[:3], add_generation_prompt=True, return_dict=False)


def test_a_template_that_moves_the_system_prompt_to_the_last_user_turn_is_refused_by_turn():
    """Mistral v0.3's template writes the system prompt into the last user turn: the prompt of an earlier answer
    is not where the whole conversation has it, so that answer cannot be located. Refused by record and turn, with
    what to do, never trained on everything or nothing."""
    tok = sentencepiece(["<unk>", "<s>", "</s>"], "<s>", "</s>")
    tok.chat_template = MISTRAL_V3
    with pytest.raises(DataError) as e:
        encode({"messages": [{"role": "system", "content": "Answer briefly."}, *CHAT], "_source": "chat.jsonl:3"}, tok,
               "chat")
    assert str(e.value) == (
        "chat.jsonl:3: the chat template renders the conversation before messages[2] (an assistant turn) otherwise "
        "once later turns follow, so the turn cannot be located in it (a template that moves the system prompt to "
        "the last user turn, as Mistral's newer ones do); give each such conversation as records that end at one "
        "assistant turn each")
    assert encode({"messages": CHAT}, tok, "chat").input_ids == tok.apply_chat_template(CHAT, return_dict=False)


def test_a_tokenizer_without_offsets_tokenizes_the_pieces_between_turns_apart(monkeypatch):
    """A Python tokenizer has no offset mapping (NotImplementedError): the text between turn boundaries is then
    tokenized piece by piece, each token labelled by its piece; for a byte-level BPE that splits there anyway, the
    same tokens and labels as the offsets give."""
    tok = byte_level(["<|endoftext|>", "<|im_start|>", "<|im_end|>"], None, "<|im_end|>", "<|endoftext|>")
    tok.chat_template = QWEN3
    with_offsets = encode({"messages": CHAT}, tok, "chat")
    original = type(tok).__call__

    def no_offsets(self, *args, **kwargs):
        if kwargs.get("return_offsets_mapping"):
            raise NotImplementedError("return_offset_mapping is not available when using Python tokenizers")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(tok), "__call__", no_offsets)
    pieces = encode({"messages": CHAT}, tok, "chat")
    assert (pieces.input_ids, pieces.labels) == (with_offsets.input_ids, with_offsets.labels)
    assert pieces.input_ids == tok.apply_chat_template(CHAT, return_dict=False)


def test_serve_asks_a_model_without_a_chat_template_in_the_plain_chat_format_training_used():
    """Soak: chat records on a tokenizer with no chat template are learnt as "### User:\\n...\\n\\n### Assistant:\\n"
    text, but /v1/chat/completions refused such a model (an adapter trained so was served as raw text only). Its
    prompt ids are now the ids training read before the last answer, BOS included."""
    tok = byte_level(["<bos>", "<eos>"], "<bos>", "<eos>")
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", tok.bos_token_id)])
    assert not tok.chat_template
    record = {"messages": [{"role": "system", "content": "Answer briefly."}, *CHAT]}
    trained = prompt_ids(record, tok, "chat")
    served = chat_ids(tok, [ChatMessage(**m) for m in record["messages"][:-1]])
    assert served == trained
    assert tok.decode(served) == ("<bos>### System:\nAnswer briefly.\n\n### User:\nHello there\n\n### Assistant:\n"
                                  "It is 5.<eos>\n\n### User:\nWhat is 2 plus 3?\n\n### Assistant:\n")


def test_an_assistant_turn_that_ends_with_the_templates_end_of_turn_text_learns_it_once():
    """Soak: Llama 3 (EOS <|end_of_text|>) learnt <|eot_id|> twice for an assistant turn whose content ends with
    "<|eot_id|>": only the EOS text was stripped. The template's own end-of-turn text is stripped as the EOS is."""
    tok = byte_level(["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                      "<|eot_id|>"], "<|begin_of_text|>", "<|end_of_text|>")
    tok.chat_template = LLAMA3
    plain = [{"role": "user", "content": "What is 2 plus 3?"}, {"role": "assistant", "content": "It is 5."}]
    marked = [plain[0], {"role": "assistant", "content": "It is 5.<|eot_id|>"}]
    full = tok.apply_chat_template(plain, return_dict=False)
    prompt = tok.apply_chat_template(plain[:1], add_generation_prompt=True, return_dict=False)
    ex = encode({"messages": marked}, tok, "chat")
    assert ex.input_ids == full and full.count(tok.convert_tokens_to_ids("<|eot_id|>")) == 2  # the user's, the answer's
    assert ex.labels == [IGNORE] * len(prompt) + full[len(prompt):]
    assert build_dataset([{"messages": marked}], tok, "chat")[1].n_eos_stripped == 1
