"""The parts of a model a client runs itself: token embeddings, the final norm and the LM head."""
from __future__ import annotations

import torch

from swarm.dtypes import to_torch_dtype
from swarm.errors import WeightsError
from swarm.families import family_of
from swarm.linear import weight_major
from swarm.reference import ResolvedModel
from swarm.weights import load_client_weights


class ClientParts(torch.nn.Module):
    """Ids -> hidden states before the blocks, and hidden states -> logits after them."""

    def __init__(self, model: ResolvedModel, dtype: str = "float32"):
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

    @torch.inference_mode()
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)
        if self.embedding_scale is not None:
            hidden = hidden * torch.tensor(self.embedding_scale, dtype=hidden.dtype)
        return hidden

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Float32 logits, whatever the dtype, so that sampling behaves the same everywhere."""
        logits = self.lm_head(self.norm(hidden.to(self.dtype)))
        if self.logit_softcap is not None:  # Gemma 2: logits squashed into (-cap, cap)
            logits = torch.tanh(logits / self.logit_softcap) * self.logit_softcap
        return logits.float()
