"""Request bodies of the OpenAI-compatible server, validated by pydantic.

Fields follow OpenAI's API reference (Completions, Chat Completions). As OpenAI does, a field the
API does not have is refused (400), so a typo is not silently ignored; an OpenAI field this server
does not implement is accepted only at its default value (`top_p` 1, no penalties, no `echo` ...)
and refused otherwise, naming it. Types are strict (JSON's): `true` is not a number, 4.0 not an
integer, "4" neither. Limits that depend on the server (`max_tokens`, `n`, the
context) are checked by the routes, with status 422.
"""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_STOP = 4  # OpenAI's limit on stop sequences


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    model: str
    temperature: Annotated[float, Field(ge=0, le=2, allow_inf_nan=False)] = 1.0
    n: Annotated[int, Field(ge=1)] = 1
    stop: Annotated[str | list[str] | None, Field(validate_default=True)] = None  # a list once validated
    stream: bool = False
    stream_options: dict | None = None
    seed: int | None = None
    user: str | None = None
    ignore_eos: bool = False  # not OpenAI's: vLLM's extension, for fixed-length benchmark requests
    # OpenAI fields accepted only at their defaults (see `unsupported`).
    top_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences, got {len(stops)}")
        if any(s == "" for s in stops):
            raise ValueError("a stop sequence must not be empty")
        return stops

    @model_validator(mode="after")
    def _unsupported(self):
        defaults = {"top_p": (None, 1, 1.0), "presence_penalty": (None, 0), "frequency_penalty": (None, 0),
                    "logit_bias": (None, {})} | self._also_default()
        for name, allowed in defaults.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r} is not supported by this server; leave it out "
                                 f"(it samples from the policy's distribution at `temperature`, as it was trained)")
        if self.stream_options is not None and set(self.stream_options) - {"include_usage"}:
            raise ValueError(f"stream_options: only include_usage is supported, got {sorted(self.stream_options)}")
        return self

    def _also_default(self) -> dict:
        return {}

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class CompletionRequest(_Request):
    """POST /v1/completions: the prompt is used verbatim (send the HH format the policy learned,
    "\\n\\nHuman: ...\\n\\nAssistant:")."""
    prompt: str | list[str]
    max_tokens: Annotated[int, Field(ge=1)] = 16
    logprobs: Annotated[int, Field(ge=0, le=5)] | None = None
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _prompts(cls, v):
        prompts = [v] if isinstance(v, str) else v
        if not prompts or any(not p for p in prompts):
            raise ValueError("prompt must be a non-empty string or a non-empty list of non-empty strings")
        return v

    def _also_default(self) -> dict:
        return {"echo": (False,), "suffix": (None,), "best_of": (None, self.n)}

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    role: Literal["system", "developer", "user", "assistant"]
    content: str
    name: str | None = None


class ChatCompletionRequest(_Request):
    """POST /v1/chat/completions: messages become the HH dialogue (or the tokenizer's chat template)."""
    messages: Annotated[list[Message], Field(min_length=1)]
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=5)] | None = None

    @model_validator(mode="after")
    def _top_logprobs(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    @property
    def limit(self) -> int | None:
        """The requested maximum, or None: then as many as the server's limit and the context allow."""
        return self.max_completion_tokens or self.max_tokens


class RewardRequest(BaseModel):
    """POST /v1/rewards: score responses to one prompt with the run's reward (model or gold)."""
    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = None
    prompt: Annotated[str, Field(min_length=1)]
    responses: Annotated[list[str], Field(min_length=1)]
