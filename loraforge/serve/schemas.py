"""The API's request bodies, checked field by field (type and range), and how they become token ids and
SamplingParams. Types are strict: a string where a number belongs, or a number where text belongs, is a 400
naming the field, never a 500 from deeper down. Text must be valid Unicode: a lone UTF-16 surrogate (valid as a
JSON escape, "\\ud800") is a 400 naming the field, as the tokenizer cannot encode it.

OpenAI fields that change the output and are not implemented here (UNSUPPORTED: logprobs, logit_bias, tools,
penalties, ...) are refused naming the field, unless they carry the value that means "off" (what some clients send
by default); fields that change nothing a client reads (user, metadata, store, ...) and unknown ones are ignored.
"""

from __future__ import annotations

from typing import Annotated, Literal

from jinja2 import TemplateError
from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError

from loraforge.serve.errors import SURROGATE, ServeError, shown
from loraforge.serve.sampling import SEED_RANGE, SamplingParams
from loraforge.training.data import plain_chat_prompt_ids

STRICT = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)  # OpenAI clients send fields we don't use

PositiveInt = Annotated[int, Field(ge=1)]
TokenId = Annotated[int, Field(ge=0)]
# field -> the values that mean "off" (accepted, as clients send some of them by default); any other value is a 400
UNSUPPORTED = {
    "logprobs": (None, False), "top_logprobs": (None, 0), "echo": (None, False), "logit_bias": (None, {}),
    "response_format": (None, {"type": "text"}), "tools": (None, []), "tool_choice": (None, "none", "auto"),
    "functions": (None, []), "function_call": (None, "none", "auto"), "frequency_penalty": (None, 0),
    "presence_penalty": (None, 0), "best_of": (None, 1), "suffix": (None, ""),
    # vLLM's sampling extensions beyond top_k and ignore_eos, which are served
    "repetition_penalty": (None, 1), "min_p": (None, 0), "min_tokens": (None, 0), "use_beam_search": (None, False),
}


def valid_text(text: str, what: str = "") -> str:
    """`text` unchanged, or a validation error naming the first lone surrogate and where it is."""
    found = SURROGATE.search(text)
    if found is None:
        return text
    raise PydanticCustomError("unpaired_surrogate", "{what}contains an unpaired surrogate ({char}) at character "
                              "{at}; send valid UTF-8 text", {"what": what, "char": ascii(found.group())[1:-1],
                                                             "at": found.start()})


def valid_texts(texts, what: str):
    """A string or a list of strings (other items left to the type checks), each valid text; `what` names an
    item, e.g. "part" gives "part 2 contains ..."."""
    if isinstance(texts, str):
        return valid_text(texts)
    for i, text in enumerate(texts or ()):
        if isinstance(text, str):
            valid_text(text, f"{what} {i} ")
    return texts


def _is_off(value, offs: tuple) -> bool:
    return any(value == off and isinstance(value, bool) == isinstance(off, bool) for off in offs)


class _Params(BaseModel):
    model_config = ConfigDict(STRICT, extra="allow")  # extra fields kept: the unsupported ones are refused

    model: str
    max_tokens: PositiveInt | None = None
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=-1)  # vLLM's extension; 0 or -1: every token
    stop: str | list[str] | None = Field(None)
    stream: bool = False
    stream_options: dict | None = None
    seed: int | None = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    n: int = 1
    ignore_eos: bool = False  # vLLM's extension, for benchmarks

    @field_validator("max_tokens", "temperature", "top_p", "top_k", "stream", "n", "ignore_eos", mode="before")
    @classmethod
    def _null_is_the_default(cls, value, info):  # OpenAI's API documents these as nullable; clients send null
        # the class's own default: max_tokens null is 16 on a completion (as omitted), the engine's on a chat
        return cls.model_fields[info.field_name].default if value is None else value

    @field_validator("stop")
    @classmethod
    def _stop_text(cls, stop):
        return valid_texts(stop, "string")

    @field_validator("stream_options")
    @classmethod
    def _stream_options(cls, options):
        usage = (options or {}).get("include_usage")
        if usage is not None and not isinstance(usage, bool):
            raise PydanticCustomError("include_usage", "include_usage: {value} must be true or false",
                                      {"value": shown(usage)})
        return options

    def sampling(self, max_tokens: int | None) -> SamplingParams:
        if self.n != 1:
            raise ServeError(f"n: {shown(self.n)} is not supported; send n=1 (several requests batch together "
                             f"anyway)")
        for name, value in (self.model_extra or {}).items():
            if name in UNSUPPORTED and not _is_off(value, UNSUPPORTED[name]):
                raise ServeError(f"{name}: {shown(value)} is not supported by this server; leave {name} out")
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        return SamplingParams(max_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p,
                              top_k=self.top_k, stop=stop, seed=self.seed, ignore_eos=self.ignore_eos)


class CompletionRequest(_Params):
    prompt: str | list[str] | list[TokenId]
    max_tokens: PositiveInt | None = 16  # OpenAI's default for completions

    @field_validator("prompt")
    @classmethod
    def _prompt_text(cls, prompt):
        return valid_texts(prompt, "item")


class TextPart(BaseModel):
    model_config = STRICT

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = STRICT

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[TextPart] | None = None

    @field_validator("content")
    @classmethod
    def _content_text(cls, content):
        valid_texts([part.text for part in content] if isinstance(content, list) else content, "part")
        return content


class ChatRequest(_Params):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: PositiveInt | None = None


class AdapterLoadRequest(BaseModel):
    model_config = STRICT

    name: str
    path: str

    @field_validator("name", "path")
    @classmethod
    def _plain(cls, value):
        if "\x00" in value:
            raise PydanticCustomError("nul", "contains a NUL character (\\x00) at character {at}; send the name or "
                                      "path without it", {"at": value.index("\x00")})
        return valid_text(value)


def prompt_ids(tokenizer, prompt) -> list[int]:
    """The completion prompt's token ids: given as ids (checked against the vocabulary), or text encoded."""
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
        vocab = len(tokenizer)  # once: len() of a transformers tokenizer counts its added tokens each time
        if max(prompt) >= vocab:
            raise ServeError(f"prompt: token ids must be in [0, {vocab})")
        return prompt
    if isinstance(prompt, list):
        if len(prompt) != 1:
            raise ServeError(f"prompt: a list of {len(prompt)} prompts is not supported; send one per request")
        prompt = prompt[0]
    return tokenizer(prompt)["input_ids"]


def chat_ids(tokenizer, messages: list[ChatMessage]) -> list[int]:
    """The chat's token ids through the tokenizer's chat template, ending with the assistant's turn; for a tokenizer
    with no template, the "### Role:" text chat training uses there (plain_chat_prompt_ids): an adapter trained on
    chat records is asked in the format it learnt."""
    plain = []
    for m in messages:
        content = m.content or ""
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            content = "".join(part.text for part in content)
        plain.append({"role": "system" if m.role == "developer" else m.role, "content": content})
    if not getattr(tokenizer, "chat_template", None):
        return plain_chat_prompt_ids(plain, tokenizer)
    try:
        text = tokenizer.apply_chat_template(plain, add_generation_prompt=True, tokenize=False)
    except TemplateError as e:  # soak: Gemma's "System role not supported" was a 500 internal error and a traceback
        raise ServeError(f"messages: the model's chat template refuses this conversation ({e}); send what it "
                         f"accepts (Gemma and Mistral templates take no system message, and user and assistant "
                         f"turns must alternate)") from None
    return tokenizer(text, add_special_tokens=False)["input_ids"]
