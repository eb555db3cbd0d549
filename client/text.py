"""SwarmClient: text in, text out, for people who do not want to touch token ids."""
from __future__ import annotations

import contextlib
from typing import Generator, Iterator, Literal, cast

import torch
from jinja2 import TemplateError

from client.generation import eos_ids
from client.model import DistributedModelForCausalLM
from client.session import InferenceSession, StepTiming
from client.streaming import Generation

FinishReason = Literal["stop", "length"]


class PromptError(ValueError):
    """A prompt nothing can be generated from; `code` says why, in OpenAI's words where it has them."""

    def __init__(self, message: str, code: str):
        super().__init__(message)
        self.code = code


class SwarmClient:
    def __init__(self, initial_peers: list[str], model: str | None = None, **settings):
        self.model = DistributedModelForCausalLM.from_pretrained(model, initial_peers=initial_peers, **settings)
        self.tokenizer = self.model.resolved.tokenizer()

    def generate(self, prompt: str | None = None, *, stream: bool = False, **options) -> str | Iterator[str]:
        """The continuation of a prompt, or the assistant's answer to chat `messages` (via the chat template).

        `options` are start()'s: messages, max_new_tokens, temperature, top_p, stop, seed, fit_context.
        """
        pieces = self.start(prompt, **options)
        return pieces if stream else "".join(pieces)

    def start(
        self,
        prompt: str | None = None,
        *,
        messages: list[dict[str, str]] | None = None,
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        top_p: float = 1.0,
        stop: list[str] | None = None,
        seed: int | None = None,
        fit_context: bool = False,
        session: InferenceSession | None = None,
    ) -> "TextStream":
        """Start a generation: a TextStream of its text, which also tells token counts and why it ended.

        generate(stream=True) returns the same. Nothing is sent to the swarm until the first piece is asked for, so a PromptError (no chat
        template, empty prompt, longer than the model's context) comes before any network work. With
        `fit_context`, `max_new_tokens` is a default the caller did not choose: it shrinks to what the
        context leaves after the prompt instead of being refused. With `session` (the caller's, kept open
        across turns), the prompt must continue what the session holds: only its new tokens are sent.
        """
        if (prompt is None) == (messages is None):
            raise ValueError("give either prompt or messages")
        if messages is not None:
            prompt = self.chat_prompt(messages)
        input_ids = self.tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids
        if input_ids.shape[1] == 0:
            raise PromptError("the prompt is empty", "empty_prompt")
        context = getattr(self.model.config, "max_position_embeddings", None)
        if fit_context and context is not None and input_ids.shape[1] < context:
            max_new_tokens = min(max_new_tokens, context - input_ids.shape[1])
        if context is not None and input_ids.shape[1] + max_new_tokens > context:
            raise PromptError(
                f"{self.model.resolved.name} has a context of {context} tokens, but {input_ids.shape[1]} prompt tokens "
                f"and {max_new_tokens} new tokens were asked for", "context_length_exceeded")
        sampling: dict = dict(do_sample=True, temperature=temperature, top_p=top_p, seed=seed) if temperature > 0 \
            else dict(do_sample=False)
        return TextStream(self, input_ids, max_new_tokens, stop or [], sampling, session)

    def chat_prompt(self, messages: list[dict[str, str]]) -> str:
        """The text the model sees for chat `messages`, ending where the assistant's answer begins."""
        if self.tokenizer.chat_template is None:
            raise PromptError(f"{self.model.resolved.name} has no chat template: send a plain prompt instead",
                              "no_chat_template")
        try:
            return cast(str, self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
        except TemplateError as e:  # templates reject what they cannot render, e.g. roles out of order
            raise PromptError(f"the chat template of {self.model.resolved.name} rejects these messages: {e}",
                              "invalid_messages") from None

    def close(self) -> None:
        self.model.close()


class TextStream:
    """One generation's text, piece by piece as it is decoded: an iterator of str.

    `prompt_tokens` is known at once; `completion_tokens` (every token the model produced, an end of
    sequence included) and `finish_reason` ("stop": end of sequence or a stop string, "length":
    `max_new_tokens` reached) are final once the iterator is exhausted. close() ends the generation
    early, and with it the inference session on the peers unless the caller gave its own. `token_ids` are
    the completion's tokens so far, `timings` the session's steps with each hop's time.
    """

    def __init__(self, client: SwarmClient, input_ids: torch.Tensor, max_new_tokens: int, stop: list[str],
                 sampling: dict, session: InferenceSession | None = None):
        self.prompt_tokens = input_ids.shape[1]
        self.max_new_tokens = max_new_tokens  # at most this many tokens come
        self.completion_tokens = 0
        self.finish_reason: FinishReason | None = None
        self.token_ids: list[int] = []
        self.timings: list[StepTiming] = [] if session is None else session.timings
        self._pieces = self._decode(client, input_ids, max_new_tokens, stop, sampling, session)

    def __iter__(self) -> "TextStream":
        return self

    def __next__(self) -> str:
        return next(self._pieces)

    def close(self) -> None:
        self._pieces.close()

    def _decode(self, client: SwarmClient, input_ids: torch.Tensor, max_new_tokens: int, stop: list[str],
                sampling: dict, session: InferenceSession | None) -> Generator[str, None, None]:
        """Yield new text as soon as it is final: never half of a multi-byte character, never the start
        of what may turn out to be a stop string, and nothing from a stop string on."""
        tokenizer, eos = client.tokenizer, eos_ids(client.model.generation_config)
        tokens = self.token_ids
        text, sent = "", 0
        with contextlib.ExitStack() as stack:  # closed at once when we are, which closes our own session
            session = session or client.model.active_session  # the caller's, or an inference_session() block's
            if session is None:
                session = stack.enter_context(client.model.session(input_ids.shape[1] + max_new_tokens))
            self.timings = session.timings
            generation = stack.enter_context(contextlib.closing(Generation(
                client.model, input_ids, session=session, max_new_tokens=max_new_tokens, **sampling)))
            for token in generation:  # stop strings are ours to find: text is cut where one begins
                tokens.append(token)
                self.completion_tokens = len(tokens)
                text = cast(str, tokenizer.decode(tokens, skip_special_tokens=True))
                cut = min((text.find(s) for s in stop if s in text), default=-1)
                if cut >= 0:
                    self.finish_reason = "stop"
                    if cut > sent:
                        yield text[sent:cut]
                    return
                if text.endswith("\ufffd"):
                    continue  # half of a multi-byte character: wait for the rest
                final = len(text) - _stop_prefix_length(text, stop)
                if final > sent:
                    yield text[sent:final]
                    sent = final
        ended = bool(tokens) and tokens[-1] in eos
        self.finish_reason = "length" if len(tokens) == max_new_tokens and not ended else "stop"
        if len(text) > sent:
            yield text[sent:]  # held back for a stop string that never came, or a character never completed


def _stop_prefix_length(text: str, stop: list[str]) -> int:
    """Length of the longest end of `text` that a stop string starts with: text that may yet be cut."""
    return max((n for s in stop for n in range(1, len(s)) if text.endswith(s[:n])), default=0)
