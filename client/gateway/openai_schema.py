"""OpenAI's request and response bodies, as far as the swarm gateway (client/gateway/) speaks them.

Every request body is validated here, so a bad field becomes a 400 that names it. Fields OpenAI
defines but the swarm cannot honour (penalties, logprobs, tools) are accepted only at values that
change nothing: silently ignoring them would return something other than what was asked for.
Fields OpenAI does not define are ignored, as OpenAI-compatible servers do. A null means the default.
"""
from __future__ import annotations

from typing import Any, Callable, ClassVar, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    model_serializer,
    model_validator,
)
from typing_extensions import Annotated

from client.text import FinishReason

INT64 = 2**63


def neutral(*allowed: Any) -> Callable[[Any], Any]:
    """A validator for a field this server cannot honour: only values that change nothing pass."""

    only = f" (only {' or '.join(map(repr, allowed))})" if allowed else ""

    def check(value: Any) -> Any:
        if value not in allowed:
            raise ValueError(f"is not supported by this server{only}")
        return value

    return check


def _text_of(content: Any) -> Any:
    """A message's content as one string: OpenAI also allows a list of parts, of which we read text parts."""
    if not isinstance(content, list):
        return content
    texts = []
    for part in content:
        if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise ValueError("only text content parts ({'type': 'text', 'text': ...}) are supported")
        texts.append(part["text"])
    return "".join(texts)


def _as_list(value: Any) -> Any:
    return [value] if isinstance(value, str) else value


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data


class StreamOptions(_Body):
    include_usage: bool = Field(False, description="Send a last chunk with the usage and no choices.")


class _GenerationRequest(_Body):
    model: str = Field(description="A model id from GET /v1/models.")
    max_tokens: int | None = Field(None, ge=1, description="Tokens to generate at most (default: the gateway's "
                                                             "--default-max-tokens).")
    temperature: float = Field(1.0, ge=0, le=2, description="0 is greedy: the same text every time.")
    top_p: float = Field(1.0, ge=0, le=1)
    stop: Annotated[list[Annotated[str, Field(min_length=1)]], BeforeValidator(_as_list)] = Field(
        [], max_length=4, description="Up to 4 strings; the text ends before the first one generated.")
    seed: int | None = Field(None, ge=-INT64, lt=INT64, description="Sampling with the same seed repeats itself.")
    n: Annotated[int, AfterValidator(neutral(1))] = 1
    stream: bool = Field(False, description="Send the text as server-sent events, as it is generated.")
    stream_options: StreamOptions = Field(default_factory=StreamOptions)
    user: str | None = Field(None, description="Accepted and ignored.")
    frequency_penalty: Annotated[float, AfterValidator(neutral(0))] = 0
    presence_penalty: Annotated[float, AfterValidator(neutral(0))] = 0
    logit_bias: Annotated[dict[str, float], AfterValidator(neutral({}))] = {}


class ChatMessage(_Body):
    role: Literal["system", "user", "assistant"]
    content: Annotated[str, BeforeValidator(_text_of)]
    name: str | None = Field(None, description="Accepted and ignored.")


class ChatCompletionRequest(_GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, description="Takes precedence over max_tokens.")
    logprobs: Annotated[bool, AfterValidator(neutral(False))] = False
    top_logprobs: Annotated[int, AfterValidator(neutral(0))] = 0
    tools: Annotated[list[Any], AfterValidator(neutral([]))] = []
    tool_choice: Annotated[Any, AfterValidator(neutral("none"))] = "none"
    response_format: Annotated[Any, AfterValidator(neutral({"type": "text"}))] = {"type": "text"}

    prompt_param: ClassVar[str] = "messages"  # the field a PromptError is about

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def prompt_args(self) -> dict:
        """What SwarmClient.start takes the prompt as."""
        return {"messages": [m.model_dump(include={"role", "content"}) for m in self.messages]}


class CompletionRequest(_GenerationRequest):
    prompt: str = Field(min_length=1, description="One prompt, as a string.")
    logprobs: Annotated[int | None, AfterValidator(neutral())] = Field(None, description="Not supported.")
    echo: Annotated[bool, AfterValidator(neutral(False))] = False
    best_of: Annotated[int, AfterValidator(neutral(1))] = 1
    suffix: Annotated[str | None, AfterValidator(neutral())] = Field(None, description="Not supported.")

    prompt_param: ClassVar[str] = "prompt"

    @property
    def token_limit(self) -> int | None:
        return self.max_tokens

    def prompt_args(self) -> dict:
        return {"prompt": self.prompt}


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int = Field(description="Tokens the model generated, a final end of sequence included.")
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class _Choice(BaseModel):
    index: int = Field(0, description="Always 0: one choice per request (n = 1).")
    logprobs: None = None


class _Answer(BaseModel):
    """What every answer and every chunk of it carries; the chunks of one answer share its id."""

    id: str
    created: int = Field(description="Unix time of the request.")
    model: str


class ChatChoice(_Choice):
    message: AssistantMessage
    finish_reason: FinishReason


class ChatCompletion(_Answer):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(BaseModel):
    """What a chunk adds to the message: OpenAI leaves out what it does not add (the last delta is {})."""

    role: Literal["assistant"] | None = None
    content: str | None = None

    @model_serializer(mode="wrap")
    def _without_nulls(self, serialize: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return {k: v for k, v in serialize(self).items() if v is not None}


class ChatChunkChoice(_Choice):
    delta: ChatDelta
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(_Answer):
    """One server-sent event of a streamed chat completion."""

    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatChunkChoice] = Field(description="Empty in the usage chunk (stream_options.include_usage).")
    usage: Usage | None = None


class CompletionChoice(_Choice):
    text: str
    finish_reason: FinishReason | None = None


class Completion(_Answer):
    """A text completion; streamed, each server-sent event is one of these with a piece of the text."""

    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]
    usage: Usage | None = None


class Model(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(description="When this gateway started serving it (Unix time).")
    owned_by: str = "swarm"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Model]


class ErrorDetail(BaseModel):
    message: str
    type: Literal["invalid_request_error", "server_error"] = Field(
        description="invalid_request_error for a 4xx status, server_error for a 5xx")
    param: str | None = Field(None, description="The request field at fault, e.g. temperature or messages[0].role")
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail
