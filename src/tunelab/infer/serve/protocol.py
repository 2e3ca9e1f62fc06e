"""The OpenAI request bodies the server accepts, validated at the door, and OpenAI's error shape.

Fields clients commonly send but that change nothing here (`user`, `frequency_penalty` 0, ...) are ignored as
OpenAI's own server ignores unknown ones; fields whose meaning tunelab does not implement (tools, logprobs,
response formats) are refused with a 400 naming them rather than silently answered without.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

UNSUPPORTED = ("tools", "tool_choice", "functions", "function_call", "logprobs", "top_logprobs", "response_format",
               "logit_bias", "echo", "best_of", "suffix", "frequency_penalty", "presence_penalty")
"""Request fields that would change the answer and are not implemented: a 400 when set to anything but off."""
NO_OP_VALUES = {"response_format": ({"type": "text"},), "tool_choice": ("none",), "best_of": (1,)}
"""Values of those fields that ask for what the server does anyway."""
DEFAULTED = ("temperature", "top_p", "n", "stream")
"""Fields OpenAI's API lets clients send as null, meaning the default."""


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


STRICT = ConfigDict(strict=True)
"""OpenAI's API answers a 400 to `"max_tokens": "3"` or `"stream": "yes"`; pydantic would coerce them."""


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else value or []
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop takes up to 4 non-empty strings")
        return value

    @field_validator(*DEFAULTED, mode="before")
    @classmethod
    def _null_is_default(cls, value: Any, info) -> Any:
        return cls.model_fields[info.field_name].default if value is None else value

    @model_validator(mode="after")
    def _supported(self) -> _Request:
        for name in UNSUPPORTED:
            value = (self.model_extra or {}).get(name)
            if value not in (None, False, [], 0) and value not in NO_OP_VALUES.get(name, ()):
                raise ValueError(f"'{name}' is not supported by tunelab serve")
        return self

    @property
    def stops(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())


class StreamOptions(BaseModel):
    model_config = STRICT

    include_usage: bool = False


class TextPart(BaseModel):
    model_config = STRICT

    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = STRICT

    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart]

    @property
    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class ChatRequest(_Request):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _ends_with_a_prompt(self) -> ChatRequest:
        if self.messages[-1].role == "assistant":
            raise ValueError("the last message must be from the user (or system): tunelab writes the next reply")
        return self

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(_Request):
    prompt: str | list[str]

    @field_validator("prompt")
    @classmethod
    def _not_empty(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and not value:
            raise ValueError("prompt is an empty list")
        return value

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    @property
    def token_limit(self) -> int | None:
        return self.max_tokens


_Request.model_rebuild()
ChatRequest.model_rebuild()
CompletionRequest.model_rebuild()
