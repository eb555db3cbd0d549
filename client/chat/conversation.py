"""A conversation whose turns continue one inference session: each turn sends the peers only what they lack."""
from __future__ import annotations

import contextlib
import logging

from client.session import InferenceSession
from client.text import PromptError, SwarmClient, TextStream

logger = logging.getLogger(__name__)


class Conversation:
    """Chat messages and the session that holds them.

    Every turn renders the whole conversation with the model's chat template, as a model expects, but
    sends only the tokens past those the session already holds. If the template renders the history
    differently from what was sent (a retokenized answer), the session is replaced and the history
    sent again once: never a wrong cache.
    """

    def __init__(self, client: SwarmClient, max_length: int, system: str | None = None):
        self.client, self.max_length, self.system = client, max_length, system
        self.messages: list[dict[str, str]] = []
        self.held: list[int] = []  # the token ids the session holds, in order
        self.sent_last = 0  # tokens the last turn sent
        self._prompt_ids: list[int] = []  # the last turn's whole prompt
        self._sessions = contextlib.ExitStack()
        self.session = self._new_session()

    def _new_session(self) -> InferenceSession:
        self._sessions.close()
        self.held = []
        return self._sessions.enter_context(self.client.model.session(self.max_length))

    def ask(self, question: str, **options) -> TextStream:
        """Start the answer to `question`; call answered() once the stream has ended (or was stopped)."""
        messages = ([{"role": "system", "content": self.system}] if self.system else []) + self.messages
        prompt = self.client.chat_prompt([*messages, {"role": "user", "content": question}])
        ids = self.client.tokenizer(prompt, add_special_tokens=False).input_ids
        max_new_tokens = options.get("max_new_tokens", 128)
        if len(ids) + max_new_tokens > self.max_length:
            raise PromptError(f"the conversation ({len(ids)} tokens) and {max_new_tokens} new tokens exceed the "
                              f"session's {self.max_length}: /reset to start over", "context_length_exceeded")
        if ids[: len(self.held)] != self.held:
            logger.info("the chat template rendered the history differently: sending it again")
            self.session = self._new_session()
        self.sent_last = len(ids) - len(self.held)
        self.messages.append({"role": "user", "content": question})
        self._prompt_ids = ids
        return self.client.start(prompt, session=self.session, **options)

    def answered(self, stream: TextStream, text: str) -> None:
        """Record the answer and what the session now holds: the prompt and the answer's tokens sent through it."""
        self.messages.append({"role": "assistant", "content": text})
        through = max(self.session.position - len(self._prompt_ids), 0)
        self.held = self._prompt_ids + stream.token_ids[:through]

    def reset(self) -> None:
        """Forget the conversation and close its session on the peers."""
        self.messages = []
        self.session = self._new_session()

    def close(self) -> None:
        self._sessions.close()
