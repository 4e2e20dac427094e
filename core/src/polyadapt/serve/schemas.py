"""Request bodies in exactly OpenAI's shapes (the fields polyadapt uses; others the official client may send are
ignored), strictly typed: a string where a number belongs is a 400, not a guess. ``seed`` and ``lora_scale`` on image
generation are polyadapt's extensions."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class Request(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class StreamOptions(Request):
    include_usage: bool = False


class Sampling(Request):
    """What completions and chat completions share."""

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("give at most 4 non-empty stop sequences")
        return value

    @property
    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class CompletionRequest(Sampling):
    prompt: str | list[str]

    @field_validator("prompt")
    @classmethod
    def _prompts(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and not value:
            raise ValueError("give at least one prompt")
        return value

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


class ContentPart(Request):
    type: Literal["text"]
    text: str


class ChatMessage(Request):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart]
    name: str | None = None

    @property
    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class ImageRequest(Request):
    prompt: str = Field(min_length=1)
    model: str
    n: int = Field(1, ge=1)
    size: str | None = Field(None, description="WIDTHxHEIGHT; default: the adapter's training resolution.")
    response_format: Literal["b64_json", "url"] | None = None
    seed: int | None = Field(None, description="polyadapt extension: seed of the first image (then +1 each).")
    lora_scale: float | None = Field(None, ge=0, le=4, description="polyadapt extension: the adapter's strength.")
    user: str | None = None


#: response formats of /v1/audio/transcriptions
TRANSCRIPTION_FORMATS = ("json", "text", "verbose_json")
