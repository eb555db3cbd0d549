"""The user's side of the swarm: route through peers and generate, like transformers."""
from client.model import DistributedModelForCausalLM
from client.text import SwarmClient

__all__ = ["DistributedModelForCausalLM", "SwarmClient"]
