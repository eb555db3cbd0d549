"""The parts of a model a client runs itself: token embeddings, the final norm and the LM head."""
from __future__ import annotations

import time

import torch

from swarm.dtypes import to_torch_dtype
from swarm.errors import WeightsError
from swarm.families import family_of
from swarm.linear import weight_major
from swarm.reference import ResolvedModel
from swarm.weights import load_client_weights


class ClientParts(torch.nn.Module):
    """Ids -> hidden states before the blocks, and hidden states -> logits after them.

    HALF_HEAD keeps a float16 copy of a float32 LM head for the states that come back in float16 (a
    route of float16 peers), one row at a time, if that product measures faster on this CPU: the
    matrix-vector product every token pays then reads half the bytes. Several rows keep the float32
    product, the faster one on a CPU without float16 arithmetic (swarm/linear.py).
    """

    def __init__(self, model: ResolvedModel, dtype: str = "float32", half_head: bool = False):
        super().__init__()
        config = model.config
        weights = load_client_weights(model)
        self.dtype = to_torch_dtype(dtype)
        family = family_of(config)
        self.embed_tokens = torch.nn.Embedding.from_pretrained(weights["model.embed_tokens.weight"], freeze=True)
        self.embedding_scale = family.embedding_scale(config)  # Gemma: sqrt(hidden), in the embeddings' dtype
        self.logit_softcap: float | None = getattr(config, "final_logit_softcapping", None)
        self.norm = family.norm(config.hidden_size, eps=config.rms_norm_eps)
        self.norm.load_state_dict({"weight": weights["model.norm.weight"]})
        head = weights.get("lm_head.weight")
        if head is None:
            if not getattr(config, "tie_word_embeddings", False):
                raise WeightsError(f"{model.name}: no lm_head.weight and the config does not tie embeddings")
            head = weights["model.embed_tokens.weight"]
        self.lm_head = torch.nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.lm_head.weight = torch.nn.Parameter(head, requires_grad=False)
        weight_major(self.to(self.dtype).eval())
        self.half_head: torch.Tensor | None = None
        if half_head and self.dtype == torch.float32:
            copy = self.lm_head.weight.to(torch.float16)
            self.half_head = copy if _faster_in_float16(self.lm_head.weight, copy) else None

    @torch.inference_mode()
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)
        if self.embedding_scale is not None:
            hidden = hidden * torch.tensor(self.embedding_scale, dtype=hidden.dtype)
        return hidden

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Float32 logits, whatever the dtype, so that sampling behaves the same everywhere."""
        if self.half_head is not None and hidden.dtype == torch.float16 and hidden.numel() == hidden.shape[-1]:
            logits = torch.nn.functional.linear(self.norm(hidden).to(torch.float16), self.half_head)
        else:
            logits = self.lm_head(self.norm(hidden.to(self.dtype)))
        if self.logit_softcap is not None:  # Gemma 2: logits squashed into (-cap, cap)
            logits = torch.tanh(logits / self.logit_softcap) * self.logit_softcap
        return logits.float()


HALF_HEAD_MARGIN = 1.15  # the float16 copy must be this much faster: it is the less exact of the two
_PROBE_ROWS = 4096  # of the head's vocabulary rows: enough to time a product, cheap for any model


def _faster_in_float16(weight: torch.Tensor, half: torch.Tensor, rounds: int = 3) -> bool:
    """Whether one row through the float16 head is clearly faster than through the float32 one, on part of it."""
    parts = {torch.float32: weight[:_PROBE_ROWS], torch.float16: half[:_PROBE_ROWS]}
    best = dict.fromkeys(parts, float("inf"))
    with torch.inference_mode():
        for _ in range(rounds):  # in turns, so a busy moment of the machine favours neither
            for dtype, part in parts.items():
                row = torch.ones(1, part.shape[1], dtype=dtype)
                started = time.perf_counter()
                for _ in range(8):
                    torch.nn.functional.linear(row, part)
                best[dtype] = min(best[dtype], time.perf_counter() - started)
    return best[torch.float32] > HALF_HEAD_MARGIN * best[torch.float16]
