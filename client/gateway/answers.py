"""How each generation endpoint answers: a whole JSON body, or server-sent chunks of the same shapes as OpenAI's."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from pydantic import BaseModel

from client.gateway.openai_schema import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatDelta,
    Completion,
    CompletionChoice,
    Usage,
)
from client.text import FinishReason, TextStream


@dataclass
class Run:
    """One generation request in flight: what its answers are stamped with, and when it arrived."""

    model: str
    id: str
    created: int = field(default_factory=lambda: int(time.time()))
    arrived: float = field(default_factory=time.perf_counter)

    @property
    def stamp(self) -> dict:
        return {"id": self.id, "created": self.created, "model": self.model}


def usage_of(stream: TextStream) -> Usage:
    return Usage(prompt_tokens=stream.prompt_tokens, completion_tokens=stream.completion_tokens,
                 total_tokens=stream.prompt_tokens + stream.completion_tokens)


def sse(message: BaseModel) -> str:
    return f"data: {message.model_dump_json()}\n\n"


def finish_of(stream: TextStream) -> FinishReason:
    """Why an exhausted stream ended."""
    assert stream.finish_reason is not None, "the stream has not ended"
    return stream.finish_reason


class ChatAnswers:
    """A chat completion: whole, or as chunks that open with the assistant's role."""

    id_prefix = "chatcmpl-"

    @staticmethod
    def whole(run: Run, text: str, stream: TextStream) -> BaseModel:
        choice = ChatChoice(message=AssistantMessage(content=text), finish_reason=finish_of(stream))
        return ChatCompletion(**run.stamp, choices=[choice], usage=usage_of(stream))

    @staticmethod
    def chunk(run: Run, delta: ChatDelta | None = None, finish: FinishReason | None = None,
              usage: Usage | None = None) -> BaseModel:
        """A chunk with `delta`, or without choices (the usage chunk)."""
        choices = [] if delta is None else [ChatChunkChoice(delta=delta, finish_reason=finish)]
        return ChatCompletionChunk(**run.stamp, choices=choices, usage=usage)

    @classmethod
    def opening(cls, run: Run) -> list[BaseModel]:
        return [cls.chunk(run, ChatDelta(role="assistant", content=""))]

    @classmethod
    def piece(cls, run: Run, text: str) -> BaseModel:
        return cls.chunk(run, ChatDelta(content=text))

    @classmethod
    def end(cls, run: Run, finish: FinishReason) -> BaseModel:
        return cls.chunk(run, ChatDelta(), finish)

    @classmethod
    def usage(cls, run: Run, usage: Usage) -> BaseModel:
        return cls.chunk(run, usage=usage)


class CompletionAnswers:
    """A text completion: whole, or as chunks of the same shape with pieces of the text."""

    id_prefix = "cmpl-"

    @staticmethod
    def whole(run: Run, text: str, stream: TextStream) -> BaseModel:
        return CompletionAnswers.chunk(run, [CompletionChoice(text=text, finish_reason=finish_of(stream))],
                                       usage_of(stream))

    @staticmethod
    def chunk(run: Run, choices: list[CompletionChoice], usage: Usage | None = None) -> BaseModel:
        return Completion(**run.stamp, choices=choices, usage=usage)

    @staticmethod
    def opening(run: Run) -> list[BaseModel]:
        return []

    @classmethod
    def piece(cls, run: Run, text: str) -> BaseModel:
        return cls.chunk(run, [CompletionChoice(text=text)])

    @classmethod
    def end(cls, run: Run, finish: FinishReason) -> BaseModel:
        return cls.chunk(run, [CompletionChoice(text="", finish_reason=finish)])

    @classmethod
    def usage(cls, run: Run, usage: Usage) -> BaseModel:
        return cls.chunk(run, [], usage)


Answers = type[ChatAnswers] | type[CompletionAnswers]
