"""The user's side of the swarm: route through peers and generate, like transformers."""
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from client.model import DistributedModelForCausalLM
    from client.text import SwarmClient

__all__ = ["DistributedModelForCausalLM", "SwarmClient"]


def __getattr__(name: str):
    # lazy: tools such as swarm-health import the client package without paying for transformers
    if name == "DistributedModelForCausalLM":
        from client.model import DistributedModelForCausalLM

        return DistributedModelForCausalLM
    if name == "SwarmClient":
        from client.text import SwarmClient

        return SwarmClient
    raise AttributeError(name)
