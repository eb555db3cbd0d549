"""SwarmClient: text in, text out, for people who do not want to touch token ids."""
from __future__ import annotations

from typing import Iterator

from client.model import DistributedModelForCausalLM


class SwarmClient:
    def __init__(self, initial_peers: list[str], model: str | None = None, **settings):
        self.model = DistributedModelForCausalLM.from_pretrained(model, initial_peers=initial_peers, **settings)
        self.tokenizer = self.model.model.tokenizer()

    def generate(
        self,
        prompt: str | None = None,
        *,
        messages: list[dict[str, str]] | None = None,
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        top_p: float = 1.0,
        stop: list[str] | None = None,
        stream: bool = False,
    ) -> str | Iterator[str]:
        """The continuation of a prompt, or the assistant's answer to chat `messages` (via the chat template)."""
        if (prompt is None) == (messages is None):
            raise ValueError("give either prompt or messages")
        if messages is not None:
            prompt = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        pieces = self._pieces(prompt, max_new_tokens, temperature, top_p, stop)
        return pieces if stream else "".join(pieces)

    def _pieces(self, prompt: str, max_new_tokens: int, temperature: float, top_p: float, stop: list[str] | None) -> Iterator[str]:
        input_ids = self.tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids
        sampling = dict(do_sample=True, temperature=temperature, top_p=top_p) if temperature > 0 else dict(do_sample=False)
        tokens: list[int] = []
        sent = ""
        for step in self.model.iter_tokens(input_ids, max_new_tokens=max_new_tokens, stop_strings=stop,
                                           tokenizer=self.tokenizer, **sampling):
            tokens.append(int(step[0]))
            text = self.tokenizer.decode(tokens, skip_special_tokens=True)
            cut = min((text.find(s) for s in stop or [] if s in text), default=-1)
            if cut >= 0:
                text = text[:cut]
            elif text.endswith("\ufffd"):
                continue  # half of a multi-byte character: wait for the rest
            if len(text) > len(sent):
                yield text[len(sent):]
                sent = text
            if cut >= 0:
                return

    def close(self) -> None:
        self.model.close()
