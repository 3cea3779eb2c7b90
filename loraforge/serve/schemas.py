"""The API's request bodies, checked field by field (type and range), and how they become token ids and
SamplingParams. Types are strict: a string where a number belongs, or a number where text belongs, is a 400
naming the field, never a 500 from deeper down.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from loraforge.serve.errors import ServeError
from loraforge.serve.sampling import SEED_RANGE, SamplingParams

STRICT = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)  # OpenAI clients send fields we don't use

PositiveInt = Annotated[int, Field(ge=1)]
TokenId = Annotated[int, Field(ge=0)]


class _Params(BaseModel):
    model_config = STRICT

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

    def sampling(self, max_tokens: int | None) -> SamplingParams:
        if self.n != 1:
            raise ServeError(f"n: {self.n} is not supported; send n=1 (several requests batch together anyway)")
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        return SamplingParams(max_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p,
                              top_k=self.top_k, stop=stop, seed=self.seed, ignore_eos=self.ignore_eos)


class CompletionRequest(_Params):
    prompt: str | list[str] | list[TokenId]
    max_tokens: PositiveInt | None = 16  # OpenAI's default for completions


class TextPart(BaseModel):
    model_config = STRICT

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = STRICT

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[TextPart] | None = None


class ChatRequest(_Params):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: PositiveInt | None = None


class AdapterLoadRequest(BaseModel):
    model_config = STRICT

    name: str
    path: str


def prompt_ids(tokenizer, prompt) -> list[int]:
    """The completion prompt's token ids: given as ids (checked against the vocabulary), or text encoded."""
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
        if any(t < 0 or t >= len(tokenizer) for t in prompt):
            raise ServeError(f"prompt: token ids must be in [0, {len(tokenizer)})")
        return prompt
    if isinstance(prompt, list):
        if len(prompt) != 1:
            raise ServeError(f"prompt: a list of {len(prompt)} prompts is not supported; send one per request")
        prompt = prompt[0]
    return tokenizer(prompt)["input_ids"]


def chat_ids(tokenizer, messages: list[ChatMessage]) -> list[int]:
    """The chat's token ids through the tokenizer's chat template, ending with the assistant's turn."""
    if not getattr(tokenizer, "chat_template", None):
        raise ServeError("this model's tokenizer has no chat template; use /v1/completions")
    plain = []
    for m in messages:
        content = m.content or ""
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            content = "".join(part.text for part in content)
        plain.append({"role": "system" if m.role == "developer" else m.role, "content": content})
    text = tokenizer.apply_chat_template(plain, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]
